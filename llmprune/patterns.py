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
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import LLMPruneError

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

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "tile":
            return f"{self.r}x{self.c}:{self.k}"
        return "unstructured"

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

    def project(self, scores: torch.Tensor, sparsity: float | None = None) -> torch.Tensor:
        """Boolean mask keeping the highest ``scores`` under this pattern.

        ``sparsity`` below the pattern's own gives the relaxed mask used while ramping (see module doc).
        """
        target = self.sparsity if sparsity is None else sparsity
        if self.kind == "unstructured":
            return _topk_mask(scores, target, per_row=self.granularity == "row")
        mask = self._structured_mask(scores)
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

    def _structured_mask(self, scores: torch.Tensor) -> torch.Tensor:
        out_f, in_f = scores.shape
        if self.kind == "nm":
            groups = scores.reshape(out_f, in_f // self.m, self.m)
            keep = torch.topk(groups, self.n, dim=-1, sorted=False).indices
            mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
            return mask.reshape(out_f, in_f)
        r, c = self.r, self.c
        tiles = scores.reshape(out_f // r, r, in_f // c, c).permute(0, 2, 1, 3).reshape(out_f // r, in_f // c, r * c)
        keep = torch.topk(tiles, self.k, dim=-1, sorted=False).indices
        mask = torch.zeros_like(tiles, dtype=torch.bool).scatter_(-1, keep, True)
        return mask.reshape(out_f // r, in_f // c, r, c).permute(0, 2, 1, 3).reshape(out_f, in_f)

    def violations(self, weight: torch.Tensor) -> int:
        """Number of groups (rows, N:M groups or tiles) holding more non-zeros than the pattern allows."""
        nz = weight != 0
        out_f, in_f = nz.shape
        if self.kind == "nm":
            return int((nz.reshape(out_f, in_f // self.m, self.m).sum(-1) > self.n).sum())
        if self.kind == "tile":
            per_tile = nz.reshape(out_f // self.r, self.r, in_f // self.c, self.c).sum(dim=(1, 3))
            return int((per_tile > self.k).sum())
        if self.granularity == "row":
            return int((nz.sum(1) > in_f - count(self.sparsity, in_f)).sum())
        return int(nz.sum() > nz.numel() - count(self.sparsity, nz.numel()))


def _topk_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    if per_row:
        keep = scores.shape[1] - count(sparsity, scores.shape[1])
        if keep == scores.shape[1]:
            return torch.ones_like(scores, dtype=torch.bool)
        idx = torch.topk(scores, keep, dim=1, sorted=False).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
    keep = scores.numel() - count(sparsity, scores.numel())
    if keep == scores.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    idx = torch.topk(scores.flatten(), keep, sorted=False).indices
    return torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device).scatter_(0, idx, True).view_as(scores)


def parse_pattern(spec: str, sparsity: float | None = None, granularity: str = "row") -> Pattern:
    """Parse ``unstructured``, ``N:M`` or ``RxC:K`` and check it against ``sparsity``.

    For structured patterns the sparsity is implied (2:4 -> 0.5); an explicit different one is refused.
    """
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise LLMPruneError(f"sparsity must be in [0, 1), got {sparsity}")
    if granularity not in ("row", "layer"):
        raise LLMPruneError(f"granularity must be 'row' or 'layer', got {granularity!r}")
    spec = spec.strip().lower()
    if spec in ("unstructured", "dense", "none"):
        return Pattern("unstructured", 0.5 if sparsity is None else sparsity, granularity=granularity)
    if granularity != "row":
        raise LLMPruneError(f"--granularity applies to unstructured sparsity only, not pattern {spec}")
    if mt := _NM.match(spec):
        n, m = int(mt[1]), int(mt[2])
        if not 0 < n <= m:
            raise LLMPruneError(f"pattern {spec}: need 0 < N <= M")
        pattern = Pattern("nm", 1.0 - n / m, n=n, m=m)
    elif mt := _TILE.match(spec):
        r, c, k = int(mt[1]), int(mt[2]), int(mt[3])
        if r <= 0 or c <= 0 or not 0 < k <= r * c:
            raise LLMPruneError(f"pattern {spec}: need R, C > 0 and 0 < K <= R*C = {r * c}")
        pattern = Pattern("tile", 1.0 - k / (r * c), r=r, c=c, k=k)
    else:
        raise LLMPruneError(f"unknown pattern {spec!r}: use 'unstructured', 'N:M' (e.g. 2:4) or 'RxC:K' (e.g. 4x4:8)")
    if sparsity is not None and abs(sparsity - pattern.sparsity) > 1e-6:
        raise LLMPruneError(
            f"pattern {pattern} implies sparsity {pattern.sparsity:g}, but --sparsity {sparsity:g} was given"
        )
    return pattern
