"""Sparse + quantized weights: the pattern's layout with integer codes in place of float values.

A quantized target stores its codes ``u`` (unsigned, :mod:`llmprune.quant`) where the float layout stores
``compressed``: ``<p>.codes`` (uint8; int4 two codes a byte, the first in the low nibble, a row's odd
count padded with a zero nibble; int8 one a byte), plus ``<p>.grid_scale`` (fp16 ``[out, groups]``) and, for
asymmetric grids, ``<p>.grid_zero`` (uint8 ``[out, groups]``). The bitmask, shape and row offsets are the
sparsity layout's own. Without sparsity the layout is ``packed``: ``<p>.codes`` ``[out, ceil(in/2)]``
(int4) or ``[out, in]`` (int8), ``<p>.shape`` and the grid, no bitmask.

A kept weight decodes as ``(u − zero) · scale`` in fp32, the computation the pruner used, so the weights
load bit-exactly. A structured group's spare slots (fewer kept weights than N) hold the zero point and
decode to 0. Encoding refuses a kept weight that is not exactly on its grid.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import LLMPruneError
from ..patterns import Pattern
from ..quant import Grid, QuantSpec
from . import codecs


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (int, ``[..., L]``) as uint8: int8 as is, int4 two a byte (low nibble first, odd L padded)."""
    u = codes.to(torch.uint8)
    if bits == 8:
        return u
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 codes ``[..., length]``."""
    if bits == 8:
        return packed.to(torch.int32)
    both = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)
    return both[..., :length].to(torch.int32)


def parts(pattern: Pattern) -> tuple[str, ...]:
    """The stored part suffixes of a quantized layout."""
    grid = ("grid_scale",) if pattern.quant.symmetric else ("grid_scale", "grid_zero")
    if dense(pattern):
        return ("codes", "shape", *grid)
    return ("codes", *(p for p in codecs.parts_of(base(pattern)) if p != "compressed"), *grid)


def dense(pattern: Pattern) -> bool:
    """Quantization without sparsity: the ``packed`` layout, no position metadata."""
    return not pattern.structured and pattern.sparsity == 0


def base(pattern: Pattern) -> Pattern:
    return replace(pattern, quant=None)


def encode(weight: torch.Tensor, pattern: Pattern, name: str, mask: torch.Tensor | None, grid: Grid | None) -> dict[str, torch.Tensor]:
    """The parts of a weight that obeys ``pattern`` with its kept weights exactly on ``grid``."""
    quant: QuantSpec = pattern.quant
    codecs.check(weight, pattern, name)
    out_f, in_f = weight.shape
    if grid is None:
        raise LLMPruneError(f"{name}: a {pattern.label} weight needs its quantization grid (save through PruneResult.save)")
    g = quant.groups(in_f)
    if tuple(grid.scale.shape) != (out_f, g) or tuple(grid.zero.shape) != (out_f, g):
        raise LLMPruneError(f"{name}: grid of shape {tuple(grid.scale.shape)}, expected {(out_f, g)}")
    grid = Grid(grid.scale.to(weight.device, torch.float32), grid.zero.to(weight.device, torch.float32))
    keep = (weight != 0) if mask is None else mask.to(weight.device)
    if bad := quant.off_grid(weight, keep, grid):
        raise LLMPruneError(f"{name}: {bad} kept weight(s) are not on the declared {quant} grid")
    zero = quant.expand(grid, in_f)[1].to(torch.int32)
    codes = torch.where(keep, quant.codes(weight, grid), zero)  # non-kept positions decode to 0
    stored = {"grid_scale": grid.scale.to(torch.float16)}
    if not quant.symmetric:
        stored["grid_zero"] = grid.zero.to(torch.uint8)
    if dense(pattern):
        return {"codes": pack_codes(codes, quant.bits), "shape": torch.tensor([out_f, in_f]), **stored}
    plain = base(pattern)
    # The float layout of (code + 1) on the kept positions gives the slots (bitmask, offsets); the codes
    # are then gathered in the layout's value order.
    out = codecs.encode(torch.where(keep, codes + 1, 0).float(), plain, name, None if mask is None else keep)
    slots = codecs.mask_of(out, plain, name)
    values = plain.groups(codes)[plain.groups(slots)] if plain.structured else codes[slots]
    del out["compressed"]
    shape = (-1,) if not plain.structured else (plain.group_shape(weight.shape)[0], -1)
    return {"codes": pack_codes(values.reshape(shape), quant.bits), **out, **stored}


def decode(stored: dict[str, torch.Tensor], pattern: Pattern, name: str, verify: bool = True) -> torch.Tensor:
    """The fp32 weight of a quantized target's parts, refusing anything inconsistent."""
    quant: QuantSpec = pattern.quant
    if missing := [s for s in parts(pattern) if s not in stored]:
        raise LLMPruneError(f"{name}: missing stored part(s) {', '.join(missing)} for layout {codecs.layout_of(pattern)}")
    shape_t = stored["shape"]
    if shape_t.dtype != torch.int64 or shape_t.numel() != 2:
        raise LLMPruneError(f"{name}: bad stored shape tensor {shape_t.dtype} {tuple(shape_t.shape)}")
    out_f, in_f = (int(v) for v in shape_t.flatten())
    pattern.check_shape((out_f, in_f), name)
    grid = _grid(stored, quant, out_f, in_f, name, verify)
    packed = stored["codes"]
    if packed.dtype != torch.uint8:
        raise LLMPruneError(f"{name}: packed codes must be uint8, got {packed.dtype}")
    if dense(pattern):
        width = in_f if quant.bits == 8 else -(-in_f // 2)
        if tuple(packed.shape) != (out_f, width):
            raise LLMPruneError(f"{name}: packed codes of shape {tuple(packed.shape)}, expected {(out_f, width)}")
        return quant.dequantize(unpack_codes(packed, quant.bits, in_f), grid)
    plain = base(pattern)
    if plain.structured:
        rows, per_row, _ = plain.group_shape((out_f, in_f))
        lead, length = (rows,), per_row * plain.keep_per_group((out_f, in_f))
    else:
        if "bitmask" not in stored:
            raise LLMPruneError(f"{name}: missing stored part bitmask")
        lead, length = (), int(codecs.unpack_bits(stored["bitmask"], (out_f, in_f), name, verify).sum())
    want = (*lead, length if quant.bits == 8 else -(-length // 2))
    if tuple(packed.shape) != want:
        raise LLMPruneError(f"{name}: packed codes of shape {tuple(packed.shape)}, expected {want}")
    floats = dict(stored, compressed=unpack_codes(packed, quant.bits, length).float())
    dense_codes = codecs.decode(floats, plain, name, verify)
    keep = codecs.mask_of(floats, plain, name)
    return torch.where(keep, quant.dequantize(dense_codes, grid), 0.0)


def _grid(stored: dict[str, torch.Tensor], quant: QuantSpec, out_f: int, in_f: int, name: str, verify: bool) -> Grid:
    scale, want = stored["grid_scale"], (out_f, quant.groups(in_f))
    if scale.dtype != torch.float16 or tuple(scale.shape) != want:
        raise LLMPruneError(f"{name}: grid_scale must be fp16 {want}, got {scale.dtype} {tuple(scale.shape)}")
    if quant.symmetric:
        zero = torch.full(want, float(2 ** (quant.bits - 1)), device=scale.device)
    else:
        zp = stored["grid_zero"]
        if zp.dtype != torch.uint8 or tuple(zp.shape) != want:
            raise LLMPruneError(f"{name}: grid_zero must be uint8 {want}, got {zp.dtype} {tuple(zp.shape)}")
        zero = zp.float()
        if verify and bool((zero > quant.top).any()):
            raise LLMPruneError(f"{name}: grid_zero outside the int{quant.bits} code range")
    if verify and not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise LLMPruneError(f"{name}: scales must be finite and positive")
    return Grid(scale.float(), zero)
