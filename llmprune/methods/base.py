"""The contract every pruning method follows.

A method is a pure function ``fn(weight, stats, pattern, config) -> PruneResult``:

- ``weight``: ``[out, in]`` fp32 tensor (a copy: methods may modify it);
- ``stats``: :class:`LayerStats`, holding what the method declares in ``Method.stats`` and nothing
  more, so the engine collects only that: ``"xtx"`` is the ``[in, in]`` fp32 sum of ``x xᵀ`` over
  calibration tokens (undamped, O(d²)), ``"input_sq"`` the ``[in]`` sum of ``x²`` per input feature
  (O(d), Wanda's ‖x_j‖²); methods that need no data (magnitude) declare nothing;
- ``pattern``: a :class:`llmprune.patterns.Pattern`;
- ``config``: the method's own dataclass (fields carry ``help`` metadata for the CLI).

It returns the new weight (exact zeros outside the mask) and the boolean mask, and for a pattern with
quantization (``pattern.quant``) the fitted :class:`~llmprune.quant.Grid` its kept weights lie on. Nothing here knows
about models, hooks or devices, so every method is testable on a random matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, NamedTuple

import torch

from ..quant import Grid

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
    grid: Grid | None = None  # with pattern.quant: the scales (and zeros) the kept weights lie on


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    fn: Callable[..., PruneResult]
    stats: tuple[str, ...] = ("xtx",)  # the statistics (of STATISTICS) the engine must collect for it
    weight_update: bool = True  # such a method's config has ``percdamp`` (used by the engine's dense targets)
    batched: bool = False  # fn also takes ``[E, out, in]`` weights with ``[E, in, in]`` statistics (experts at once)
    quantizes: bool = False  # it only quantizes: needs pattern.quant (gptq)
    help: str = ""

    def default_config(self, **overrides: Any) -> Any:
        known = {f.name for f in fields(self.config_cls)}
        return self.config_cls(**{k: v for k, v in overrides.items() if k in known})


def masked(weight: torch.Tensor, mask: torch.Tensor, pattern: Any) -> PruneResult:
    """``weight`` cut to ``mask``; with ``pattern.quant`` its kept weights rounded to nearest on their fitted
    grid (RTN, for the methods that do not update weights)."""
    if pattern.quant is None:
        return PruneResult(weight * mask, mask)
    w, grid = pattern.quant.project(weight, mask)
    return PruneResult(w, mask, grid)
