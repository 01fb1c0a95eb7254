"""Exact least-squares re-solve of the kept weights once the mask is frozen."""

from __future__ import annotations

import torch


def masked_cg(
    w: torch.Tensor, target: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, iters: int
) -> torch.Tensor:
    """Minimise ``tr((W − W₀) H (W − W₀)ᵀ)`` over ``W`` that is zero outside ``mask``, from ``w``.

    ``target = W₀ H``. Rows are independent problems ``H_SS w_S = (W₀H)_S``; plain conjugate
    gradient runs on all of them at once (per-row step sizes), one ``[out, in] × [in, in]`` matmul
    an iteration. Callers work in the input-norm-normalised space, where this is Jacobi-preconditioned
    CG. Each iteration lowers the objective, so any ``iters`` is safe. Leading batch dimensions
    (``[E, out, in]`` with ``h [E, in, in]``) are independent problems.
    """
    w = w * mask
    r = (target - w @ h) * mask
    p = r
    rr = (r * r).sum(-1, keepdim=True)
    for _ in range(iters):
        hp = p @ h
        curv = (p * hp).sum(-1, keepdim=True)
        # Converged rows (and rows with nothing kept) have p = 0: give them a zero step, not 0/0.
        alpha = torch.where(curv > 0, rr / curv.clamp_min(1e-30), 0.0)
        w = w + alpha * p
        r = r - alpha * hp * mask
        rr_new = (r * r).sum(-1, keepdim=True)
        p = r + torch.where(rr > 0, rr_new / rr.clamp_min(1e-30), 0.0) * p
        rr = rr_new
    return w
