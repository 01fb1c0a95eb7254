"""ADMM: minimise ‖XWᵀ − XŴᵀ‖² subject to Ŵ following the pattern.

Splitting Ŵ = Z with Z constrained to the pattern gives three cheap steps per iteration:
ridge solve for W with the cached inverse of (H + ρI), projection of W + U onto the pattern, dual
update of U. Everything runs in the space normalised by the input-feature norms, where H has unit
diagonal, so one ρ fits every layer. The mask is picked gradually from |W + U| with a cubic sparsity
ramp, so early iterations can still move weight mass before it is cut.

Beyond the paper (each measured in benchmarks/NOTES_admm.md): ρ starts small and grows geometrically
to its final value over the ramp, so early mask choices follow the unconstrained optimum more closely,
and once the mask is frozen the kept weights are re-solved exactly by masked conjugate gradient.

Quantization (``pattern.quant``): the projection becomes Π_quant ∘ Π_pattern, the support chosen first,
then the kept weights rounded onto their group grid (scales fitted on them, in the original weight
space), from iteration ``quant_from``; after the final re-solve a GPTQ sweep on the final mask puts the
kept weights exactly on the grid, with error feedback (:func:`~llmprune.methods.sparsegpt.prune.obs_sweep`),
and ``grid_rounds`` of coordinate descent on the codes and scale refits polish them (:mod:`..grid_refine`).

Batched: ``weight [E, out, in]`` with ``xtx [E, in, in]`` solves E independent layers (the experts of a
fused MoE tensor) in one set of batched matmuls and Cholesky factorisations, each exactly as alone.
"""

from __future__ import annotations

import torch

from ...patterns import Pattern
from ..base import LayerStats, PruneResult
from ..linalg import damped, spd_inverse
from ...quant import Grid
from ..grid_refine import refine_on_grid
from ..sparsegpt.prune import obs_sweep
from .cg import masked_cg
from .config import ADMMConfig


def ramp_sparsity(target: float, step: int, ramp_steps: int) -> float:
    """Cubic ramp: sparsity after ``step + 1`` of ``ramp_steps`` mask updates (``target`` at the end)."""
    return target - target * (1.0 - (step + 1) / ramp_steps) ** 3


def rho_at(it: int, ramp_steps: int, config: ADMMConfig) -> float:
    """ρ of iteration ``it``: ``rho_updates`` geometric steps from ``rho_start`` to ``rho`` over the ramp."""
    k = config.rho_updates
    if k == 0 or it >= ramp_steps:
        return config.rho
    stage = min(k, it * (k + 1) // ramp_steps)
    return config.rho_start * (config.rho / config.rho_start) ** (stage / k)


def _ridge_inverse(h: torch.Tensor, rho: float) -> torch.Tensor:
    shifted = h.clone()
    shifted.diagonal(dim1=-2, dim2=-1).add_(rho)
    return spd_inverse(shifted, f"admm: XᵀX + ρI (ρ={rho:g}; non-finite activations?)")


def admm_prune(weight: torch.Tensor, stats: LayerStats, pattern: Pattern, config: ADMMConfig) -> PruneResult:
    xtx = stats.xtx
    if xtx is None:
        raise ValueError("admm needs calibration statistics (XᵀX)")
    pattern.check_shape(weight.shape[-2:])
    quant = pattern.quant
    if pattern.sparsity == 0:
        # Nothing to prune: the continuous optimum is the weight itself, so quantization alone is the grid step
        # from there (ADMM's iterations only moved its starting point off it: NOTES_admm.md §12).
        keep = torch.ones_like(weight, dtype=torch.bool)
        if quant is None:
            return PruneResult(weight, keep)
        return _quantize_kept(weight, weight, xtx, keep, pattern, config)
    out, mask = _admm(weight, xtx, pattern, config)
    if quant is None:
        return PruneResult(out, mask)
    return _quantize_kept(out, weight, xtx, mask, pattern, config)


def _admm(weight: torch.Tensor, xtx: torch.Tensor, pattern: Pattern, config: ADMMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The ADMM iterations and the final re-solve: the continuous kept weights and the mask."""
    quant = pattern.quant
    norm = xtx.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt() + 1e-8
    h = damped(xtx / norm.unsqueeze(-2) / norm.unsqueeze(-1), config.percdamp)
    w = weight * norm.unsqueeze(-2)
    target = w @ h  # (W₀ H) is the right-hand side of every ridge solve
    # A ramp longer than the run would end with a mask short of the target sparsity.
    ramp = min(config.ramp_steps, config.iters)
    mask = pattern.project(w.abs()) if ramp == 0 else None
    u = torch.zeros_like(w)
    rho, h_inv = 0.0, None
    for it in range(config.iters):
        if it < ramp:
            mask = pattern.project((w + u).abs(), ramp_sparsity(pattern.sparsity, it, ramp))
        # ρ rises after the mask is picked: scoring with U still scaled for the smaller ρ measured
        # better than rescaling first (NOTES_admm.md).
        new_rho = rho_at(it, ramp, config)
        if new_rho != rho:
            u = u * (rho / new_rho)  # U is the dual scaled by 1/ρ: keep the unscaled dual fixed
            rho, h_inv = new_rho, _ridge_inverse(h, new_rho)
        z = (w + u) * mask
        if quant is not None and it >= config.quant_from:
            z = quant.project(z / norm.unsqueeze(-2), mask)[0] * norm.unsqueeze(-2)
        u = u + (w - z)
        w = (target + rho * (z - u)) @ h_inv
    z = (w + u) * mask
    if config.final_cg_iters:
        z = masked_cg(z, target, h, mask, config.final_cg_iters)
    out = z / norm.unsqueeze(-2)
    if not torch.isfinite(out).all():
        raise FloatingPointError("admm produced non-finite weights (non-finite weights or activations?)")
    return out, mask


def _quantize_kept(w: torch.Tensor, target: torch.Tensor, xtx: torch.Tensor, mask: torch.Tensor, pattern: Pattern,
             config: ADMMConfig) -> PruneResult:
    """:func:`_onto_grid` for one layer, or expert by expert for ``[E, out, in]``."""
    if w.dim() == 2:
        return _onto_grid(w, target, xtx, mask, pattern, config)
    experts = [_onto_grid(*args, pattern, config) for args in zip(w, target, xtx, mask)]
    return PruneResult(torch.stack([r.weight for r in experts]), mask,
                       Grid(*(torch.stack([getattr(r.grid, f) for r in experts]) for f in Grid._fields)))


def _onto_grid(w: torch.Tensor, target: torch.Tensor, xtx: torch.Tensor, mask: torch.Tensor, pattern: Pattern,
               config: ADMMConfig) -> PruneResult:
    """The final mask's kept weights onto the grid: GPTQ sweep, then coordinate descent and scale refits."""
    swept = obs_sweep(w, xtx, pattern, 128, config.sweep_percdamp, mask)
    if not config.grid_rounds:
        return swept
    weight, grid = refine_on_grid(swept.weight, target, xtx, mask, pattern.quant, swept.grid, config.grid_rounds)
    return PruneResult(weight, mask, grid)
