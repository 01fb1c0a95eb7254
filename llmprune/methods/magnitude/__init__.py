"""Magnitude pruning: keep the largest |W| under the pattern. The data-free baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...patterns import Pattern
from ..base import LayerStats, PruneResult, masked


@dataclass
class MagnitudeConfig:
    """Magnitude pruning has no options."""


def magnitude_prune(weight: torch.Tensor, stats: LayerStats, pattern: Pattern, config: MagnitudeConfig) -> PruneResult:
    mask = pattern.project(weight.abs())
    return masked(weight, mask, pattern)
