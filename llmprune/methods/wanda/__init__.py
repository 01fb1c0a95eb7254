"""Wanda (Sun et al. 2023): keep the largest |W_ij| · ‖x_j‖ under the pattern, no weight update."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...patterns import Pattern
from ..base import LayerStats, PruneResult, masked


@dataclass
class WandaConfig:
    """Wanda has no options: the score is |W| times the input-feature norm."""


def wanda_prune(weight: torch.Tensor, stats: LayerStats, pattern: Pattern, config: WandaConfig) -> PruneResult:
    if stats.input_sq is None:
        raise ValueError("wanda needs calibration statistics (the input norms)")
    norms = stats.input_sq.clamp_min(0).sqrt()
    mask = pattern.project(weight.abs() * norms.unsqueeze(0))
    return masked(weight, mask, pattern)
