"""Per-block sparsity allocation: uniform, or outlier-weighted (OWL, Yin et al. 2024, arXiv 2310.05175).

OWL observes that blocks differ in how many "outlier" weights they hold, weights whose Wanda score
|W_ij|·‖x_j‖ is far above the block's mean, and that removing outliers hurts most. So blocks with more
outliers keep more weights: densities are spread over a band of width 2λ in proportion to each block's
outlier ratio and centred on the target density, which keeps the model's overall sparsity exact
(decoder blocks all have the same size).
"""

from __future__ import annotations

import torch

from .errors import LLMPruneError


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
