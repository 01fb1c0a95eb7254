"""Sparsity patterns and the one projection primitive every method uses.

A pattern names *which* weights may survive:

- ``unstructured``: any ``1 - sparsity`` fraction, compared per output row (``granularity="row"``,
  the Wanda/ADMM default) or over the whole layer (``granularity="layer"``);
- ``N:M``: ``N`` kept in every ``M`` consecutive weights along the input dimension (2:4, 4:8, 1:4);
- ``RxC:K``: every ``R x C`` tile of the weight matrix keeps ``K`` (e.g. ``4x4:8``).

Weights are ``[out_features, in_features]`` as in ``nn.Linear``. ``Pattern.project(scores)`` returns
the boolean mask keeping the highest scores under the pattern. Passing a smaller ``sparsity`` than the
pattern's own relaxes it, which is how gradual (ramped) mask selection works for structured patterns:
the structured mask is always kept, plus the globally highest remaining scores up to the requested
density, so at the end of the ramp the mask is exactly the pattern.

A pattern may also carry a :class:`~llmprune.quant.QuantSpec` (``quant``): the kept weights must then lie
on its group grid too, and a method's projection is Π_quant ∘ Π_pattern.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import LLMPruneError
from .quant import QuantSpec

_NM = re.compile(r"^(\d+):(\d+)$")
_TILE = re.compile(r"^(\d+)x(\d+):(\d+)$")


def count(fraction: float, total: int) -> int:
    """``floor(fraction * total)``, robust to float error (0.7 * 10 is 6.999...)."""
    return min(total, math.floor(fraction * total + 1e-6))


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern; build it with :func:`parse_pattern`."""

    kind: str  # "unstructured" | "nm" | "tile"
    sparsity: float
    n: int = 0
    m: int = 0
    r: int = 0
    c: int = 0
    k: int = 0
    granularity: str = "row"  # unstructured only: "row" | "layer"
    quant: QuantSpec | None = None  # the grid kept weights are rounded onto (None: full precision)

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "tile":
            return f"{self.r}x{self.c}:{self.k}"
        return "unstructured"

    @property
    def label(self) -> str:
        """The pattern with its quantization, e.g. ``2:4+int4g128``."""
        return str(self) if self.quant is None else f"{self}+{self.quant}"

    @property
    def unit(self) -> int:
        """Input columns of one comparison group's width: M (N:M), C (RxC:K), 1 (unstructured)."""
        return {"nm": self.m, "tile": self.c}.get(self.kind, 1)

    @property
    def structured(self) -> bool:
        return self.kind != "unstructured"

    def check_shape(self, shape: tuple[int, ...] | torch.Size, name: str = "weight") -> None:
        """Refuse a weight shape the pattern cannot tile."""
        out_f, in_f = int(shape[0]), int(shape[1])
        if self.kind == "nm" and in_f % self.m:
            raise LLMPruneError(f"{name}: in_features {in_f} is not divisible by M={self.m} of pattern {self}")
        if self.kind == "tile" and (out_f % self.r or in_f % self.c):
            raise LLMPruneError(
                f"{name}: shape {out_f}x{in_f} is not divisible by the {self.r}x{self.c} tiles of pattern {self}"
            )

    def group_shape(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, int, int]:
        """``[rows of groups, groups per row, group size]`` of an ``[out, in]`` weight: the comparison groups
        (a row or the whole layer for unstructured, M weights for N:M, an R x C tile for RxC:K)."""
        out_f, in_f = int(shape[0]), int(shape[1])
        if self.kind == "nm":
            return out_f, in_f // self.m, self.m
        if self.kind == "tile":
            return out_f // self.r, in_f // self.c, self.r * self.c
        return (out_f, 1, in_f) if self.granularity == "row" else (1, 1, out_f * in_f)

    def keep_per_group(self, shape: tuple[int, ...] | torch.Size, sparsity: float | None = None) -> int:
        """How many weights each group keeps (``sparsity`` overrides an unstructured pattern's own)."""
        if self.kind == "nm":
            return self.n
        if self.kind == "tile":
            return self.k
        size = self.group_shape(shape)[2]
        return size - count(self.sparsity if sparsity is None else sparsity, size)

    def groups(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` ``[out, in]`` as ``[rows of groups, groups per row, group size]`` (a copy for tiles, else a view)."""
        shape = self.group_shape(t.shape)
        if self.kind != "tile":
            return t.reshape(shape)
        (out_f, in_f), r, c = t.shape, self.r, self.c
        return t.reshape(out_f // r, r, in_f // c, c).permute(0, 2, 1, 3).reshape(shape)

    def ungroup(self, g: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Inverse of :meth:`groups`."""
        if self.kind != "tile":
            return g.reshape(tuple(shape))
        r, c = self.r, self.c
        return g.reshape(shape[0] // r, shape[1] // c, r, c).permute(0, 2, 1, 3).reshape(tuple(shape))

    def project(self, scores: torch.Tensor, sparsity: float | None = None) -> torch.Tensor:
        """Boolean mask keeping the highest ``scores`` under this pattern.

        ``sparsity`` below the pattern's own gives the relaxed mask used while ramping (see module doc).
        ``scores [E, out, in]`` projects E layers (the experts of a fused tensor), each exactly as alone.
        """
        target = self.sparsity if sparsity is None else sparsity
        if scores.dim() == 3:
            return self._project_batch(scores, target)
        if not self.structured:
            return self._top(scores, self.keep_per_group(scores.shape, target))
        mask = self._top(scores, self.keep_per_group(scores.shape))
        if target >= self.sparsity - 1e-9:
            return mask
        # Relaxation: keep the structured mask, then add the best of the rest up to 1 - target density.
        extra = (scores.numel() - count(target, scores.numel())) - int(mask.sum())
        if extra > 0:
            rest = scores.float().masked_fill(mask, -math.inf).flatten()
            idx = torch.topk(rest, extra, sorted=False).indices
            mask = mask.flatten().clone()
            mask[idx] = True
            mask = mask.view_as(scores)
        return mask

    def _project_batch(self, scores: torch.Tensor, target: float) -> torch.Tensor:
        if not self.structured and self.granularity == "layer":
            return torch.stack([self.project(s, target) for s in scores])
        # Groups never cross a layer's rows (R divides out), so the stacked rows project as one matrix.
        e, shape = scores.shape[0], scores.shape[1:]
        flat = scores.reshape(-1, shape[-1])
        if not self.structured:
            return self._top(flat, self.keep_per_group(shape, target)).view_as(scores)
        mask = self._top(flat, self.keep_per_group(shape)).view_as(scores)
        extra = (shape.numel() - count(target, shape.numel())) - int(mask[0].sum())  # the same for every layer
        if target >= self.sparsity - 1e-9 or extra <= 0:
            return mask
        rest = scores.float().masked_fill(mask, -math.inf).reshape(e, -1)
        idx = torch.topk(rest, extra, dim=-1, sorted=False).indices
        return mask.reshape(e, -1).clone().scatter_(-1, idx, True).view_as(scores)

    def _top(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        """The ``keep`` highest scores of every group."""
        groups = self.groups(scores)
        if keep == groups.shape[-1]:
            return torch.ones_like(scores, dtype=torch.bool)
        idx = torch.topk(groups, keep, dim=-1, sorted=False).indices
        return self.ungroup(torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True), scores.shape)

    def violations(self, weight: torch.Tensor) -> int:
        """Number of groups (rows, N:M groups or tiles) holding more non-zeros than the pattern allows."""
        nz = weight != 0
        return int((self.groups(nz).sum(-1) > self.keep_per_group(nz.shape)).sum())


def parse_pattern(spec: str, sparsity: float | None = None, granularity: str = "row",
                  quant: QuantSpec | None = None) -> Pattern:
    """Parse ``unstructured``, ``N:M`` or ``RxC:K`` and check it against ``sparsity``; ``quant`` adds a grid.

    For structured patterns the sparsity is implied (2:4 -> 0.5); an explicit different one is refused.
    """
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise LLMPruneError(f"sparsity must be in [0, 1), got {sparsity}")
    if granularity not in ("row", "layer"):
        raise LLMPruneError(f"granularity must be 'row' or 'layer', got {granularity!r}")
    spec = spec.strip().lower()
    if spec in ("unstructured", "dense", "none"):
        return Pattern("unstructured", 0.5 if sparsity is None else sparsity, granularity=granularity, quant=quant)
    if granularity != "row":
        raise LLMPruneError(f"--granularity applies to unstructured sparsity only, not pattern {spec}")
    if mt := _NM.match(spec):
        n, m = int(mt[1]), int(mt[2])
        if not 0 < n <= m:
            raise LLMPruneError(f"pattern {spec}: need 0 < N <= M")
        pattern = Pattern("nm", 1.0 - n / m, n=n, m=m, quant=quant)
    elif mt := _TILE.match(spec):
        r, c, k = int(mt[1]), int(mt[2]), int(mt[3])
        if r <= 0 or c <= 0 or not 0 < k <= r * c:
            raise LLMPruneError(f"pattern {spec}: need R, C > 0 and 0 < K <= R*C = {r * c}")
        pattern = Pattern("tile", 1.0 - k / (r * c), r=r, c=c, k=k, quant=quant)
    else:
        raise LLMPruneError(f"unknown pattern {spec!r}: use 'unstructured', 'N:M' (e.g. 2:4) or 'RxC:K' (e.g. 4x4:8)")
    if quant is not None:
        quant.check_unit(pattern.unit, str(pattern))
    if sparsity is not None and abs(sparsity - pattern.sparsity) > 1e-6:
        raise LLMPruneError(
            f"pattern {pattern} implies sparsity {pattern.sparsity:g}, but --sparsity {sparsity:g} was given"
        )
    return pattern
