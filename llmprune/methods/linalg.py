"""The linear algebra the weight-update methods share: damping and SPD inverses, in fp32."""

from __future__ import annotations

import torch


def damped(xtx: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``XᵀX + percdamp · mean(diag) · I`` (a copy), the usual guard against ill-conditioning."""
    h = xtx.clone()
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += percdamp * torch.diag(h).mean().clamp_min(1e-8)
    return h


def spd_inverse(h: torch.Tensor, what: str) -> torch.Tensor:
    """Inverse of a symmetric positive-definite matrix through its Cholesky factor.

    Solving against the identity is ~15x faster on CPU than ``torch.cholesky_inverse`` for the same
    result. Raises ``FloatingPointError`` (``what`` names the matrix) when ``h`` is not positive definite.
    """
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise FloatingPointError(f"{what} is not positive definite")
    return torch.cholesky_solve(torch.eye(h.shape[0], dtype=h.dtype, device=h.device), factor)
