"""SparseGPT: prune column by column, compensating each removal with the OBS update.

With ``Hinv`` the upper Cholesky factor of ``(XᵀX + damp·I)⁻¹``, removing the weights of column ``i``
is corrected by spreading ``err = (w − q) / Hinv[i, i]`` over the not-yet-processed columns along
``Hinv[i, i:]``. Updates inside a block of ``blocksize`` columns are applied eagerly, the rest lazily
once per block. Masks are chosen as late as possible, from the already-updated weights, with the OBS
saliency ``w² / Hinv[i, i]²``: per block for unstructured sparsity, per ``M`` (N:M) or ``C`` (RxC:K)
columns for structured patterns. With ``pattern.quant`` the kept weights are also rounded onto the group
grid column by column, with the same error feedback (the paper's joint sparsify + quantize mode; GPTQ is
this sweep on a fixed support).
"""

from __future__ import annotations

import torch

from ...patterns import Pattern, count
from ...quant import Grid
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
    if pattern.sparsity == 0 and pattern.quant is None:
        return PruneResult(weight, torch.ones_like(weight, dtype=torch.bool))
    return obs_sweep(weight, xtx, pattern, config.blocksize, config.percdamp)


def obs_sweep(weight: torch.Tensor, xtx: torch.Tensor, pattern: Pattern, blocksize: int, percdamp: float,
              keep: torch.Tensor | None = None) -> PruneResult:
    """The OBS column sweep: each column is pruned (and, with ``pattern.quant``, its kept weights rounded onto
    the grid) and the error spread over the columns to its right.

    Without ``keep`` the mask is chosen on the way (SparseGPT); with ``keep`` it is fixed (GPTQ on a given
    support). With quantization each group's grid is fitted, GPTQ-style, on the group's kept weights as
    they stand when the sweep reaches the group; structured masks are then chosen a whole quantization
    group at a time, so that the grid is fitted on exactly the weights it will hold (SparseGPT's joint mode).
    """
    in_f = weight.shape[1]
    w = weight.clone()
    h = xtx.clone()
    # A feature never seen in calibration has no curvature: make its Hessian row harmless and let its
    # weights score 0, so they are the first pruned.
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_cholesky(h, percdamp)
    quant = pattern.quant
    gs = quant.group_len(in_f) if quant is not None else 0
    group = 0 if not pattern.structured else (gs or pattern.unit)  # columns whose masks are chosen together
    unit = max(group, gs)
    # Mask and quantization groups must not straddle blocks.
    bs = max(unit, blocksize // unit * unit) if unit else max(1, blocksize)
    pruned = torch.zeros_like(w, dtype=torch.bool) if keep is None else ~keep
    choose = keep is None and pattern.sparsity > 0
    scales, zeros = [], []
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        w1 = w[:, i1:i2].clone()
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        err1 = torch.zeros_like(w1)
        p1 = pruned[:, i1:i2]
        if choose and not group:
            p1 |= _unstructured_block_mask(w1**2 / d**2, pattern, i1, i2)
        for i in range(i2 - i1):
            if choose and group and i % group == 0:
                scores = w1[:, i : i + group] ** 2 / d[i : i + group] ** 2
                p1[:, i : i + group] = ~pattern.project(scores)
            col = w1[:, i]
            if quant is None:
                new = torch.where(p1[:, i], 0.0, col)
            else:
                if i % gs == 0:
                    grid = quant.fit(w1[:, i : i + gs], ~p1[:, i : i + gs])
                    scales.append(grid.scale)
                    zeros.append(grid.zero)  # [out, 1]: the group's grid
                new = torch.where(p1[:, i], 0.0, quant.round_with(col, grid.scale[:, 0], grid.zero[:, 0]))
            err = (col - new) / d[i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = new
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if not torch.isfinite(w).all():
        raise FloatingPointError("sparsegpt produced non-finite weights (non-finite inputs, or raise percdamp)")
    grid = None if quant is None else Grid(torch.cat(scales, 1), torch.cat(zeros, 1))
    return PruneResult(w, ~pruned, grid)
