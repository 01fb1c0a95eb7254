"""ADMM: minimise ‖XWᵀ − XŴᵀ‖² subject to Ŵ following the pattern.

Splitting Ŵ = Z with Z constrained to the pattern gives three cheap steps per iteration:
ridge solve for W with the cached inverse of (H + ρI), projection of W + U onto the pattern, dual
update of U. Everything runs in the space normalised by the input-feature norms, where H has unit
diagonal, so one ρ fits every layer. The mask is picked gradually from |W + U| with a cubic sparsity
ramp, so early iterations can still move weight mass before it is cut.
"""

from __future__ import annotations

import torch

from ...patterns import Pattern
from ..base import PruneResult, damped
from .config import ADMMConfig


def ramp_sparsity(target: float, step: int, ramp_steps: int) -> float:
    """Cubic ramp: sparsity after ``step + 1`` of ``ramp_steps`` mask updates (``target`` at the end)."""
    return target - target * (1.0 - (step + 1) / ramp_steps) ** 3


def admm_prune(weight: torch.Tensor, xtx: torch.Tensor | None, pattern: Pattern, config: ADMMConfig) -> PruneResult:
    if xtx is None:
        raise ValueError("admm needs calibration statistics (XᵀX)")
    if pattern.sparsity == 0:
        return PruneResult(weight, torch.ones_like(weight, dtype=torch.bool))
    norm = torch.diag(xtx).clamp_min(0).sqrt() + 1e-8
    h = damped(xtx / norm.unsqueeze(0) / norm.unsqueeze(1), config.percdamp)
    w = weight * norm.unsqueeze(0)
    if config.iters == 0:
        mask = pattern.project(w.abs())
        return PruneResult((w * mask) / norm.unsqueeze(0), mask)

    target = w @ h  # (W₀ H) is the right-hand side of every ridge solve
    h.diagonal().add_(config.rho)
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u = torch.zeros_like(w)
    mask = pattern.project(w.abs()) if config.ramp_steps == 0 else None
    for it in range(config.iters):
        if it < config.ramp_steps:
            mask = pattern.project((w + u).abs(), ramp_sparsity(pattern.sparsity, it, config.ramp_steps))
        z = (w + u) * mask
        u = u + (w - z)
        w = (target + config.rho * (z - u)) @ h_inv
    z = (w + u) * mask
    return PruneResult(z / norm.unsqueeze(0), mask)
