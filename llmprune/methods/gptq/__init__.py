"""GPTQ (Frantar et al. 2023, arXiv 2210.17323): round each column onto the quantization grid and spread
the rounding error over the columns not yet rounded, through the inverse Hessian's Cholesky factor.

The quantization-only baseline, and the second half of the "prune, then quantize" chain: the support is
magnitude's under the pattern, which on an already pruned model is exactly its own non-zeros (they are the
largest), so GPTQ keeps a pruned model's mask. The sweep is SparseGPT's with the mask fixed
(:func:`~llmprune.methods.sparsegpt.prune.obs_sweep`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import LLMPruneError
from ...patterns import Pattern
from ..base import LayerStats, PruneResult
from ..sparsegpt.prune import obs_sweep


@dataclass
class GPTQConfig:
    """Options of GPTQ (defaults: the reference implementation)."""

    blocksize: int = field(default=128, metadata={"help": "columns per lazy-update block"})
    percdamp: float = field(default=0.01, metadata={"help": "damping added to XᵀX, as a fraction of its mean diagonal"})


def gptq_prune(weight: torch.Tensor, stats: LayerStats, pattern: Pattern, config: GPTQConfig) -> PruneResult:
    if pattern.quant is None:
        raise LLMPruneError("gptq quantizes: give it a grid (--quant int4 or int8)")
    if stats.xtx is None:
        raise ValueError("gptq needs calibration statistics (XᵀX)")
    pattern.check_shape(weight.shape)
    keep = pattern.project(weight.abs()) if pattern.sparsity > 0 else torch.ones_like(weight, dtype=torch.bool)
    return obs_sweep(weight, stats.xtx, pattern, config.blocksize, config.percdamp, keep)
