"""The layer objectives: output reconstruction error from XᵀX, against the dense model's outputs, and the
dense-target weights that turn the latter into the former."""

from __future__ import annotations

import torch

from .linalg import damped


def reconstruction_error(w0: torch.Tensor, w1: torch.Tensor, xtx: torch.Tensor) -> float:
    """Relative output error ``‖XW₀ᵀ − XW₁ᵀ‖² / ‖XW₀ᵀ‖²`` computed from ``XᵀX`` alone."""
    # fp32 suffices for a ratio reported to a few digits, and avoids fp64 copies of XᵀX (1 GB at 7B).
    d = w0 - w1
    num = ((d @ xtx) * d).sum()
    den = ((w0 @ xtx) * w0).sum()
    return float(num / den.clamp_min(1e-30))


def paired_error(w0: torch.Tensor, w1: torch.Tensor, xtx: torch.Tensor, xtd: torch.Tensor, dense_sq: float) -> float:
    """Relative error ``‖XₚW₁ᵀ − X_dW₀ᵀ‖² / ‖X_dW₀ᵀ‖²`` of the pruned layer on the pruned model's inputs
    ``Xₚ`` against the dense layer on the dense model's inputs ``X_d``, from ``XₚᵀXₚ``, ``XₚᵀX_d`` and
    ``‖X_dW₀ᵀ‖²``."""
    num = ((w1 @ xtx) * w1).sum() - 2 * ((w1 @ xtd) * w0).sum() + dense_sq
    return float(num.clamp_min(0) / max(dense_sq, 1e-30))


def dense_target(w: torch.Tensor, xtx: torch.Tensor, xtd: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The weights whose outputs on the pruned model's inputs best match the dense outputs.

    ``W̃ = argmin ‖XₚW̃ᵀ − X_dWᵀ‖² + λ‖W̃ − W‖²``, i.e. ``W̃ᵀ = (XₚᵀXₚ + λI)⁻¹(XₚᵀX_d + λI)Wᵀ`` with
    ``λ = percdamp · mean diag XₚᵀXₚ``. Up to a constant, ``‖XₚŴᵀ − X_dWᵀ‖² = ‖Xₚ(Ŵ − W̃)ᵀ‖²``, so any
    method pruning ``W̃`` against ``XₚᵀXₚ`` minimises the error to the dense outputs. ``W̃ = W`` when the
    inputs agree (block 0).
    """
    if torch.equal(xtx, xtd):
        return w.clone()
    h = damped(xtx, percdamp)
    lam = float(h[0, 0] - xtx[0, 0])
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise FloatingPointError(f"XᵀX damped by percdamp={percdamp} is not positive definite (raise it)")
    return torch.cholesky_solve(xtd @ w.T + lam * w.T, factor).T.contiguous()
