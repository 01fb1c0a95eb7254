"""Polish weights that already lie on support ∩ grid: coordinate descent on the codes, then the scales.

The objective is the layer's reconstruction error e(Ŵ) = (Ŵ − W) XᵀX (Ŵ − W)ᵀ, summed over rows. Along one
coordinate it is a parabola, so the best grid value of weight (r, j), the others fixed, is the grid point
nearest to its unconstrained optimum Ŵ[r, j] − G[r, j] / H[j, j], with G = (Ŵ − W) H (QuantEase-style
coordinate descent). A pass sweeps every column once, all rows at a time; the error never rises. Columns
go in blocks, as in GPTQ: within a block only the block's part of G is kept current, and the rest is
brought up to date with one matmul per block.

After each round of passes the group scales are refitted with the codes fixed: per row, e is quadratic in
that row's scales, a least-squares solve of groups × groups. A row keeps its old scales unless the new
ones (rounded to fp16, all positive) lower its error. Zeros stay: they are integer codes.

Measured on 8 real SmolLM2 layers at 2:4 + int4 g128 (benchmarks/NOTES_admm.md §12): after admm's GPTQ
sweep, 2 rounds take the int4 share of the layer error from 12 % to 9 %.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import Grid, QuantSpec, _fp16


def _row_errors(w: torch.Tensor, target: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    e = w - target
    return ((e @ h) * e).sum(1)


def _cd_pass(w: torch.Tensor, target: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, quant: QuantSpec,
             scale: torch.Tensor, zero: torch.Tensor, blocksize: int) -> None:
    """One coordinate-descent pass over every column of ``w`` (in place), kept weights on the grid."""
    g = (w - target) @ h
    diag = h.diagonal()
    in_f = w.shape[1]
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        before = w[:, i1:i2].clone()
        gb, hb = g[:, i1:i2].clone(), h[i1:i2, i1:i2]
        for j in range(i2 - i1):
            c = i1 + j
            if diag[c] <= 0:  # a feature never seen: any value costs nothing, keep the current one
                continue
            star = w[:, c] - gb[:, j] / diag[c]
            new = torch.where(keep[:, c], quant.round_with(star, scale[:, c], zero[:, c]), 0.0)
            gb += (new - w[:, c]).unsqueeze(1) * hb[j].unsqueeze(0)
            w[:, c] = new
        g += (w[:, i1:i2] - before) @ h[i1:i2]


def _refit_scales(w: torch.Tensor, target: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, quant: QuantSpec,
                  grid: Grid) -> tuple[torch.Tensor, Grid]:
    """Least-squares group scales for the codes of ``w`` (row by row, kept only where the error falls)."""
    out, in_f = w.shape
    gs, groups = quant.group_len(in_f), quant.groups(in_f)
    pad = groups * gs - in_f
    scale, _ = quant.expand(grid, in_f)
    steps = torch.where(keep, torch.round(w / scale), 0.0)  # code − zero of every kept weight (exact integers)
    padded = F.pad(steps, (0, pad)).reshape(out, groups, gs)
    ah = torch.einsum("rgk,gkj->rgj", padded, F.pad(h, (0, pad, 0, pad)).reshape(groups, gs, groups * gs))
    m = torch.einsum("rghk,rhk->rgh", ah.reshape(out, groups, groups, gs), padded)
    b = torch.einsum("rgj,rj->rg", ah, F.pad(target, (0, pad)))
    ridge = 1e-6 * m.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)  # an empty group's row/column is zero
    m = m + ridge[:, None, None] * torch.eye(groups, dtype=m.dtype, device=m.device)
    new_scale = torch.linalg.solve(m, b.unsqueeze(-1)).squeeze(-1)
    ok = (new_scale > 0).all(1) & torch.isfinite(new_scale).all(1)
    new_scale = torch.where(ok.unsqueeze(1), _fp16(new_scale.clamp_min(0)), grid.scale)
    candidate = steps * quant.expand(Grid(new_scale, grid.zero), in_f)[0]  # as dequantize computes it
    better = ok & (_row_errors(candidate, target, h) < _row_errors(w, target, h))
    return (torch.where(better.unsqueeze(1), candidate, w),
            Grid(torch.where(better.unsqueeze(1), new_scale, grid.scale), grid.zero))


def refine_on_grid(weight: torch.Tensor, target: torch.Tensor, xtx: torch.Tensor, keep: torch.Tensor,
                   quant: QuantSpec, grid: Grid, rounds: int, passes: int = 2,
                   blocksize: int = 128) -> tuple[torch.Tensor, Grid]:
    """``rounds`` × (``passes`` coordinate-descent passes, then a scale refit) on ``weight [out, in]``, whose
    kept weights (``keep``) lie on ``grid``; ``target`` is the weight being reconstructed. Returns the new
    weight (on the returned grid, same support) and grid."""
    w, h = weight.float().clone(), xtx.float()
    target = target.float()
    for _ in range(rounds):
        scale, zero = quant.expand(grid, w.shape[1])
        for _ in range(passes):
            _cd_pass(w, target, h, keep, quant, scale, zero, blocksize)
        w, grid = _refit_scales(w, target, h, keep, quant, grid)
    return w, grid
