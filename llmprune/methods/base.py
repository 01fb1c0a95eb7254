"""The contract every pruning method follows.

A method is a pure function ``fn(weight, stats, pattern, config) -> PruneResult``:

- ``weight``: ``[out, in]`` fp32 tensor (a copy: methods may modify it);
- ``stats``: :class:`LayerStats`, holding what the method declares in ``Method.stats`` and nothing
  more, so the engine collects only that: ``"xtx"`` is the ``[in, in]`` fp32 sum of ``x xᵀ`` over
  calibration tokens (undamped, O(d²)), ``"input_sq"`` the ``[in]`` sum of ``x²`` per input feature
  (O(d), Wanda's ‖x_j‖²); methods that need no data (magnitude) declare nothing;
- ``pattern``: a :class:`llmprune.patterns.Pattern`;
- ``config``: the method's own dataclass (fields carry ``help`` metadata for the CLI).

It returns the new weight (exact zeros outside the mask) and the boolean mask. Nothing here knows
about models, hooks or devices, so every method is testable on a random matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, NamedTuple

import torch


STATISTICS = ("xtx", "input_sq")


class LayerStats(NamedTuple):
    """Calibration statistics of one Linear's input; a field a method did not declare is ``None``."""

    xtx: torch.Tensor | None = None
    input_sq: torch.Tensor | None = None

    @classmethod
    def from_xtx(cls, xtx: torch.Tensor) -> LayerStats:
        """Both statistics from a Gram matrix (``input_sq`` is its diagonal)."""
        return cls(xtx, torch.diag(xtx).clone())


class PruneResult(NamedTuple):
    weight: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    fn: Callable[..., PruneResult]
    stats: tuple[str, ...] = ("xtx",)  # the statistics (of STATISTICS) the engine must collect for it
    weight_update: bool = True  # such a method's config has ``percdamp`` (used by the engine's dense targets)
    help: str = ""

    def default_config(self, **overrides: Any) -> Any:
        known = {f.name for f in fields(self.config_cls)}
        return self.config_cls(**{k: v for k, v in overrides.items() if k in known})


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
