"""Weight quantization as part of the pattern: the group grid kept weights are rounded onto.

A :class:`QuantSpec` (``int4`` / ``int8``, ``group_size`` input columns per scale, symmetric or not)
rides on a :class:`~llmprune.patterns.Pattern`, so the constraint a method must meet is
"support ∩ grid". Groups run along the input dimension of ``[out, in]`` weights, as in GPTQ: row
``r``, columns ``[g·gs, (g+1)·gs)`` share ``scale[r, g]`` (and ``zero[r, g]``). Scales are fitted on
the **kept** weights only (a pruned weight is 0 whatever the grid), and are always values an fp16
holds exactly, since checkpoints and kernels store them as fp16.

Stored codes are unsigned, ``u ∈ [0, 2^bits − 1]``, and a kept weight is ``(u − zero) · scale``:

- asymmetric (the default): ``scale = (max − min) / (2^bits − 1)`` over the kept values and 0, ``zero``
  an integer in the code range (stored);
- symmetric: ``scale = absmax / (2^(bits−1) − 1)``, ``zero = 2^(bits−1)`` (not stored), codes in
  ``zero ± (2^(bits−1) − 1)``.

The range is then shrunk to whichever of ``SHRINK`` × it rounds the group's kept weights with the least
squared error (GPTQ's ``mse`` search): clipping a few large weights buys a finer step for the rest.
Measured on 8 SmolLM2 layers at 2:4 + int4 g128 (benchmarks/NOTES_admm.md §12), the int4 share of the
layer error fell from 20 % (symmetric, no search) to 14 % (asymmetric, search). Refitting a projected
weight finds its own grid again (factor 1, zero error), so the projection stays idempotent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .errors import LLMPruneError

_QUANT = re.compile(r"^int(4|8)$")
SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


class Grid(NamedTuple):
    """The fitted grid of one ``[out, in]`` weight: ``scale`` and ``zero`` are fp32 ``[out, groups]``
    (``zero`` holds integers)."""

    scale: torch.Tensor
    zero: torch.Tensor


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # input columns per scale; -1: one group per row (per channel)
    symmetric: bool = False

    def __str__(self) -> str:
        return f"int{self.bits}" + (f"g{self.group_size}" if self.group_size > 0 else "ch") + ("s" if self.symmetric else "")

    @property
    def top(self) -> int:
        """The largest code, ``2^bits − 1``."""
        return 2**self.bits - 1

    def group_len(self, in_f: int) -> int:
        return in_f if self.group_size <= 0 else self.group_size

    def groups(self, in_f: int) -> int:
        """Scales per row: ``ceil(in / gs)`` (a last, shorter group when ``gs`` does not divide ``in``)."""
        return -(-in_f // self.group_len(in_f))

    def check_unit(self, unit: int, pattern: str) -> None:
        """Refuse a group size that cuts the pattern's groups (``unit``: M of N:M, C of RxC:K, 1 otherwise)."""
        if self.group_size > 0 and self.group_size % unit:
            raise LLMPruneError(f"quantization group size {self.group_size} must be a multiple of pattern {pattern}'s "
                                f"group width {unit}, so every scale covers whole groups of kept values")

    def _grouped(self, t: torch.Tensor) -> torch.Tensor:
        """``[..., out, in]`` as ``[..., out, groups, gs]``, a short last group padded with zeros (False)."""
        gs, n = self.group_len(t.shape[-1]), self.groups(t.shape[-1])
        t = torch.nn.functional.pad(t, (0, n * gs - t.shape[-1]))
        return t.reshape(*t.shape[:-1], n, gs)

    def fit(self, w: torch.Tensor, keep: torch.Tensor) -> Grid:
        """The grid of ``w`` (``[..., out, in]``) fitted on its ``keep`` positions; scales rounded to fp16,
        the range shrunk by the factor of ``SHRINK`` with the least rounding error per group."""
        return self._fit(self._grouped(torch.where(keep, w.float(), 0.0)))

    def _fit(self, g: torch.Tensor) -> Grid:
        """:meth:`fit` on grouped weights ``g`` that are 0 wherever not kept (0 rounds to 0 on every grid,
        so those positions add no error)."""
        if self.symmetric:
            base, lo = g.abs().amax(-1) / (2 ** (self.bits - 1) - 1), None
        else:
            lo = g.amin(-1)  # 0 is always in range: the grid holds it exactly
            base = (g.amax(-1) - lo) / self.top
        best, best_err = None, None
        for shrink in SHRINK:
            scale = _fp16(base * shrink)
            zero = (torch.full_like(scale, 2 ** (self.bits - 1)) if lo is None
                    else torch.round(-lo * shrink / scale).clamp(0, self.top))
            err = (self._round_grouped(g, scale, zero) - g).square().sum(-1)
            if best is None:
                best, best_err = Grid(scale, zero), err
                continue
            better = err < best_err  # ties keep the larger range, so a projected weight finds its own grid
            best = Grid(torch.where(better, scale, best.scale), torch.where(better, zero, best.zero))
            best_err = torch.minimum(err, best_err)
        return best

    def _round_grouped(self, g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return self.round_with(g, scale.unsqueeze(-1), zero.unsqueeze(-1))

    def _minmax(self, w: torch.Tensor, keep: torch.Tensor) -> Grid:
        """The plain min-max (absmax) grid, no range search (what the search is measured against)."""
        g = self._grouped(torch.where(keep, w.float(), 0.0))
        if self.symmetric:
            scale = _fp16(g.abs().amax(-1) / (2 ** (self.bits - 1) - 1))
            return Grid(scale, torch.full_like(scale, 2 ** (self.bits - 1)))
        lo = g.amin(-1)
        scale = _fp16((g.amax(-1) - lo) / self.top)
        return Grid(scale, torch.round(-lo / scale).clamp(0, self.top))

    def codes(self, w: torch.Tensor, grid: Grid) -> torch.Tensor:
        """The unsigned codes (as int32) of ``w`` on ``grid``, rounded to nearest and clamped.

        A weight held in bf16/fp16 is its grid value rounded to that dtype; where two neighbouring grid
        values round to the same number (int8 codes near the range's end in bf16) the code whose rounded
        value is ``w`` is chosen, so ``dequantize(codes).to(w.dtype) == w`` holds for every on-grid weight.
        """
        scale, zero = self.expand(grid, w.shape[-1])
        u = self.code_of(w, scale, zero)
        if w.dtype != torch.float32:
            for step in (-1.0, 1.0):
                other = (u + step).clamp(1 if self.symmetric else 0, self.top)
                miss = ((u - zero) * scale).to(w.dtype) != w
                u = torch.where(miss & (((other - zero) * scale).to(w.dtype) == w), other, u)
        return u.to(torch.int32)

    def dequantize(self, codes: torch.Tensor, grid: Grid) -> torch.Tensor:
        """fp32 weights of ``codes`` (the exact computation loading uses, so round trips are bit-exact)."""
        scale, zero = self.expand(grid, codes.shape[-1])
        return (codes.float() - zero) * scale

    def round(self, w: torch.Tensor, grid: Grid) -> torch.Tensor:
        """``w`` rounded onto ``grid`` (fp32)."""
        scale, zero = self.expand(grid, w.shape[-1])
        return self.round_with(w, scale, zero)

    def expand(self, grid: Grid, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``grid``'s scale and zero repeated over their groups' columns: ``[..., out, in]``."""
        gs = self.group_len(in_f)
        return grid.scale.repeat_interleave(gs, -1)[..., :in_f], grid.zero.repeat_interleave(gs, -1)[..., :in_f]

    def code_of(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Codes (as floats) of ``w`` for broadcastable ``scale`` and ``zero``."""
        # symmetric codes stay in ±(2^(bits−1) − 1) around the zero, so the grid really is symmetric
        return (torch.round(w.float() / scale) + zero).clamp(1 if self.symmetric else 0, self.top)

    def round_with(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``w`` rounded onto the grid of broadcastable ``scale`` and ``zero`` (a column at a time in a sweep)."""
        return (self.code_of(w, scale, zero) - zero) * scale

    def project(self, w: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """Π_quant: fit the grid on the kept weights and round them onto it; pruned positions become 0."""
        g = self._grouped(torch.where(keep, w.float(), 0.0))
        grid = self._fit(g)
        rounded = self._round_grouped(g, grid.scale, grid.zero)
        return rounded.reshape(*w.shape[:-1], -1)[..., : w.shape[-1]], grid

    def off_grid(self, w: torch.Tensor, keep: torch.Tensor, grid: Grid) -> int:
        """How many kept weights of ``w`` are not exactly (in ``w``'s dtype) on ``grid``."""
        exact = self.dequantize(self.codes(w, grid), grid).to(w.dtype)
        return int((keep & (exact != w)).sum())


def _fp16(scale: torch.Tensor) -> torch.Tensor:
    """Scales as fp16 values (held in fp32); an empty or all-zero group gets scale 1."""
    s = scale.clamp_max(65504.0).to(torch.float16).float()
    return torch.where(s > 0, s, 1.0)


def parse_quant(spec: str | None, group_size: int = 128, symmetric: bool = False) -> QuantSpec | None:
    """``int4`` / ``int8`` (``None`` or ``none``: no quantization) into a :class:`QuantSpec`."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return None
    if not (mt := _QUANT.match(spec.strip().lower())):
        raise LLMPruneError(f"unknown quantization {spec!r}: use int4, int8 or none")
    if group_size == 0 or group_size < -1:
        raise LLMPruneError(f"quantization group size must be positive or -1 (one group per row), got {group_size}")
    return QuantSpec(int(mt[1]), group_size, symmetric)
