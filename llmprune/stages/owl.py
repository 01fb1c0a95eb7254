"""Per-block sparsity allocation: uniform, or outlier-weighted (OWL, Yin et al. 2024, arXiv 2310.05175).

OWL observes that blocks differ in how many "outlier" weights they hold, weights whose Wanda score
|W_ij|·‖x_j‖ is far above the block's mean, and that removing outliers hurts most. So blocks with more
outliers keep more weights: densities are spread over a band of width 2λ in proportion to each block's
outlier ratio and centred on the target density, which keeps the model's overall sparsity exact
(decoder blocks all have the same size).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LLMPruneError
from ..patterns import Pattern
from ..targets import find_targets

if TYPE_CHECKING:
    from ..engine.capture import Activations
    from ..engine.sources import Blocks


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of a block's scores above ``m`` times their mean (OWL's layerwise outlier distribution)."""
    flat = torch.cat([s.flatten().to(torch.float32) for s in scores])
    return float((flat > m * flat.mean()).to(torch.float32).mean())


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsities: densities min-max scaled onto [0, 2λ] by outlier ratio, then shifted to average
    ``1 - sparsity``. Equal ratios give the uniform allocation."""
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = float(r.max() - r.min())
    density = (r - r.min()) * (2 * lam / spread) if spread > 0 else torch.zeros_like(r)
    density = density - density.mean() + (1.0 - sparsity)
    out = [1.0 - float(d) for d in density]
    if min(out) < 0.0 or max(out) >= 1.0:
        raise LLMPruneError(f"OWL with lambda {lam:g} around sparsity {sparsity:g} gives a block sparsity outside "
                            f"[0, 1) ({min(out):.3f}..{max(out):.3f}); use a smaller --owl-lambda")
    return out


@torch.no_grad()
def outlier_scan(prefix: str, blocks: nn.ModuleList, io: Blocks, acts: Activations, skip: tuple[str, ...], m: float,
                 device: torch.device, quiet: bool = False) -> list[float | None]:
    """OWL's outlier ratio of every dense block (``None`` for a block without targets).

    One pass of the dense model over the calibration data, a block at a time, collecting only the
    ``input_sq`` statistics (the Wanda score's ‖x_j‖², O(d) per Linear). ``acts`` is left as it was.
    """
    from ..engine.block import run_block
    from ..engine.statistics import StatsCollector

    acts = replace(acts, batches=list(acts.batches))  # the pruning pass restarts from block 0's inputs
    ratios: list[float | None] = []
    for i in tqdm(range(len(blocks)), desc="owl scan", disable=quiet, unit="block", leave=False):
        io.load(i, device)
        acts.block = i
        targets = find_targets(blocks[i], f"{prefix}.{i}", skip)
        collector = StatsCollector(targets, device, ("input_sq",))
        try:
            run_block(blocks[i], acts, device, replace=True, collector=collector)
        finally:
            collector.remove()
        scores = [t.weight.detach().abs().to(torch.float32) * collector.get(n).input_sq.sqrt()
                  for n, t in targets.items() if collector.get(n).input_sq is not None]  # not: experts no token reached
        ratios.append(outlier_ratio(scores, m) if scores else None)
        io.unload(i)
    return ratios


def allocate(ratios: list[float | None], pattern: Pattern, lam: float) -> list[Pattern]:
    """One pattern per block: OWL sparsities over the blocks that have targets (the rest keep ``pattern``)."""
    have = [i for i, r in enumerate(ratios) if r is not None]
    out = [pattern] * len(ratios)
    for i, s in zip(have, owl_sparsities([ratios[i] for i in have], pattern.sparsity, lam)):
        out[i] = replace(pattern, sparsity=s)
    return out
