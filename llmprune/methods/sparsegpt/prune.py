"""SparseGPT: prune column by column, compensating each removal with the OBS update.

With ``Hinv`` the upper Cholesky factor of ``(XᵀX + damp·I)⁻¹``, removing the weights of column ``i``
is corrected by spreading ``err = (w − q) / Hinv[i, i]`` over the not-yet-processed columns along
``Hinv[i, i:]``. Updates inside a block of ``blocksize`` columns are applied eagerly, the rest lazily
once per block. Masks are chosen as late as possible, from the already-updated weights, with the OBS
saliency ``w² / Hinv[i, i]²``: per block for unstructured sparsity, per ``M`` (N:M) or ``C`` (RxC:K)
columns for structured patterns.
"""

from __future__ import annotations

import torch

from ...patterns import Pattern, count
from ..base import LayerStats, PruneResult
from ..linalg import damped, spd_inverse
from .config import SparseGPTConfig


def _inverse_cholesky(xtx: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian."""
    h_inv = spd_inverse(damped(xtx, percdamp), f"sparsegpt: XᵀX damped by percdamp={percdamp} (raise it)")
    return torch.linalg.cholesky(h_inv, upper=True)


def _unstructured_block_mask(scores: torch.Tensor, pattern: Pattern, i1: int, i2: int) -> torch.Tensor:
    """Prune mask of columns ``i1:i2``: each block takes its exact share of the final count.

    The share is ``count(s, up to i2) − count(s, up to i1)``, so the per-row (or per-layer) totals add
    up to exactly ``count(s, in_f)`` (or ``count(s, out·in_f)``) however the blocks fall.
    """
    s = pattern.sparsity
    if pattern.granularity == "row":
        k = count(s, i2) - count(s, i1)
        idx = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
    rows = scores.shape[0]
    k = count(s, rows * i2) - count(s, rows * i1)
    idx = torch.topk(scores.flatten(), k, largest=False, sorted=False).indices
    pruned = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device).scatter_(0, idx, True)
    return pruned.view_as(scores)


def sparsegpt_prune(weight: torch.Tensor, stats: LayerStats, pattern: Pattern, config: SparseGPTConfig) -> PruneResult:
    xtx = stats.xtx
    if xtx is None:
        raise ValueError("sparsegpt needs calibration statistics (XᵀX)")
    pattern.check_shape(weight.shape)
    if pattern.sparsity == 0:
        return PruneResult(weight, torch.ones_like(weight, dtype=torch.bool))
    in_f = weight.shape[1]
    w = weight.clone()
    h = xtx.clone()
    # A feature never seen in calibration has no curvature: make its Hessian row harmless and let its
    # weights score 0, so they are the first pruned.
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_cholesky(h, config.percdamp)

    group = {"nm": pattern.m, "tile": pattern.c}.get(pattern.kind, 0)
    # Structured groups must not straddle blocks.
    bs = max(group, config.blocksize // group * group) if group else max(1, config.blocksize)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        w1 = w[:, i1:i2].clone()
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        err1 = torch.zeros_like(w1)
        p1 = pruned[:, i1:i2]
        if not group:
            p1 |= _unstructured_block_mask(w1**2 / d**2, pattern, i1, i2)
        for i in range(i2 - i1):
            if group and i % group == 0:
                scores = w1[:, i : i + group] ** 2 / d[i : i + group] ** 2
                p1[:, i : i + group] = ~pattern.project(scores)
            col = w1[:, i]
            err = torch.where(p1[:, i], col, 0.0) / d[i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = w1.masked_fill(p1, 0.0)
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if not torch.isfinite(w).all():
        raise FloatingPointError("sparsegpt produced non-finite weights (non-finite inputs, or raise percdamp)")
    return PruneResult(w, ~pruned)
