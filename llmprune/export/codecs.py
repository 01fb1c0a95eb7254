"""Compress one pruned weight into kept values plus position metadata, and back, bit-exactly.

Layouts (see FORMAT.md for the byte-level description and the compressed-tensors comparison):

- ``sparse-bitmask`` (unstructured): ``compressed`` = non-zeros in row-major order (1-D), ``bitmask`` =
  one bit per weight, ``row_offsets`` = index of each row's first value, ``shape`` = ``[out, in]``;
- ``sparse-24-bitmask`` (2:4) / ``nm-bitmask`` (other N:M): ``compressed`` = ``[out, in*N/M]`` kept values
  in row-major order, exactly N per group, ``bitmask`` = one bit per weight, ``shape`` = ``[[out], [in]]``;
- ``tile-bitmask`` (RxC:K): ``compressed`` = ``[out/R, (in/C)*K]`` kept values tile by tile (tiles in
  row-major order, row-major inside a tile), ``bitmask`` = each tile's R*C-bit code, tiles concatenated
  along a row of tiles, ``shape`` = ``[out, in]``.

Bitmasks pack 8 positions per ``uint8`` along the last axis, the first position in the lowest bit
(numpy ``packbits(bitorder="little")``, as compressed-tensors does), each row padded to whole bytes.
Structured layouts store exactly N (K) values per group so a kernel can index them without offsets;
groups with fewer non-zeros get zero-valued slots. Zeros always decode as ``+0.0``: a ``-0.0`` left by
``weight * mask`` is numerically identical and not worth a stored value.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from ..errors import LLMPruneError
from ..patterns import Pattern
from ..quant import Grid

# Suffixes of the stored parts of one pruned weight, appended to its prefix (``name`` minus ``.weight``).
PARTS = ("compressed", "bitmask", "shape", "row_offsets")
QUANT_PARTS = ("codes", "grid_scale", "grid_zero")  # a quantized weight's codes and grid (export/quantized.py)


def guard() -> torch.Tensor:
    """The empty tensor the compressed format stores under each pruned parameter's own name. transformers
    without llmprune then fails on its size instead of initialising the missing weight randomly."""
    return torch.empty(0, dtype=torch.uint8)


def layout_of(pattern: Pattern) -> str:
    """Name of the storage layout used for ``pattern`` (``+int4`` / ``+int8`` with quantization: codes in
    place of values, :mod:`llmprune.export.quantized`)."""
    if pattern.quant is not None:
        plain = "packed" if not pattern.structured and pattern.sparsity == 0 else layout_of(replace(pattern, quant=None))
        return f"{plain}+int{pattern.quant.bits}"
    if pattern.kind == "unstructured":
        return "sparse-bitmask"
    if pattern.kind == "nm":
        return "sparse-24-bitmask" if (pattern.n, pattern.m) == (2, 4) else "nm-bitmask"
    return "tile-bitmask"


def parts_of(pattern: Pattern) -> tuple[str, ...]:
    """The part suffixes stored for ``pattern``'s layout."""
    if pattern.quant is not None:
        from .quantized import parts

        return parts(pattern)
    return PARTS if pattern.kind == "unstructured" else PARTS[:3]


def prefix_of(name: str) -> str:
    """Stored-name prefix of a pruned parameter (compressed-tensors drops the ``.weight`` suffix)."""
    return name.removesuffix(".weight")


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., L]`` -> uint8 ``[..., ceil(L/8)]``; position ``8b+j`` is bit ``j`` of byte ``b``."""
    pad = -mask.shape[-1] % 8
    if pad:
        mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], pad)], dim=-1)
    bits = mask.reshape(*mask.shape[:-1], -1, 8).to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (bits << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...], name: str = "bitmask",
                verify: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_bits` giving a bool tensor of ``shape``; refuses a wrongly shaped bitmask
    or (with ``verify``) set padding bits, both signs of corruption."""
    expected = (*shape[:-1], -(-shape[-1] // 8))
    if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
        raise LLMPruneError(f"{name}: expected a uint8 bitmask of shape {expected}, "
                            f"got {packed.dtype} {tuple(packed.shape)}")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = ((packed.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)
    if verify and bits[..., shape[-1]:].any():
        raise LLMPruneError(f"{name}: padding bits are set (corrupt bitmask)")
    return bits[..., : shape[-1]]


class PackedMask(NamedTuple):
    """A pruning mask kept at one bit a weight (:func:`pack_bits` layout); :meth:`unpack` gives the bool tensor."""

    bits: torch.Tensor
    shape: tuple[int, ...]

    @classmethod
    def of(cls, mask: torch.Tensor) -> PackedMask:
        return cls(pack_bits(mask.to("cpu")), tuple(mask.shape))

    def unpack(self) -> torch.Tensor:
        return unpack_bits(self.bits, self.shape, verify=False)


def check(weight: torch.Tensor, pattern: Pattern, name: str) -> None:
    """Refuse a pruned weight that is not a 2-D float tensor obeying ``pattern`` (error names it)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise LLMPruneError(f"{name}: a pruned weight must be a 2-D float tensor, got {weight.dtype} "
                            f"{tuple(weight.shape)}")
    pattern.check_shape(weight.shape, name)
    if bad := pattern.violations(weight):
        raise LLMPruneError(f"{name}: {bad} group(s) break the declared pattern {pattern} "
                            f"(sparsity {pattern.sparsity:g})")


def encode(weight: torch.Tensor, pattern: Pattern, name: str, mask: torch.Tensor | None = None,
           grid: Grid | None = None) -> dict[str, torch.Tensor]:
    """Compress ``weight`` (which must obey ``pattern``) into its parts, keyed by suffix.

    ``mask``: the positions the pruner kept (which must obey the pattern and cover every non-zero);
    without it they are read off the non-zeros. ``grid``: a quantized pattern's scales (and zeros).
    """
    if pattern.quant is not None:
        from . import quantized

        return quantized.encode(weight, pattern, name, mask, grid)
    check(weight, pattern, name)
    if mask is not None:
        mask = mask.to(weight.device)
        if mask.shape != weight.shape or mask.dtype != torch.bool:
            raise LLMPruneError(f"{name}: mask {mask.dtype} {tuple(mask.shape)} does not fit weight {tuple(weight.shape)}")
        if bool(weight[~mask].any()):
            raise LLMPruneError(f"{name}: non-zero weights outside the pruner's mask")
        if bad := pattern.violations(mask):
            raise LLMPruneError(f"{name}: the mask breaks pattern {pattern} in {bad} group(s)")
    shape = torch.tensor(weight.shape, dtype=torch.int64)
    if not pattern.structured:
        keep = weight != 0 if mask is None else mask
        counts = keep.sum(1)
        return {
            "compressed": weight[keep],
            "bitmask": pack_bits(keep),
            "shape": shape,
            "row_offsets": counts.cumsum(0) - counts,
        }
    groups = pattern.groups(weight)
    size, n = groups.shape[-1], pattern.keep_per_group(weight.shape)
    # Exactly n slots per group: the kept (or non-zero) positions first, then the earliest others (unique
    # keys, so deterministic).
    position = torch.arange(size - 1, -1, -1, dtype=torch.int32, device=weight.device)
    kept = groups != 0 if mask is None else pattern.groups(mask)
    key = kept.to(torch.int32) * size + position
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, key.topk(n, dim=-1).indices, True)
    values = groups[keep].reshape(groups.shape[0], -1)
    values = values.masked_fill(values == 0, 0)  # -0.0 in a padding slot -> +0.0, as everywhere else
    # N:M keeps compressed-tensors' sparse-24-bitmask shape tensor ([[out], [in]]); tiles use the plain [out, in].
    return {
        "compressed": values,
        "bitmask": pack_bits(keep.flatten(-2)),
        "shape": shape.reshape(-1, 1) if pattern.kind == "nm" else shape,
    }


def _shape(parts: dict[str, torch.Tensor], pattern: Pattern, name: str) -> tuple[int, int]:
    missing = [s for s in parts_of(pattern) if s not in parts]
    if missing:
        raise LLMPruneError(f"{name}: missing stored part(s) {', '.join(missing)} for layout {layout_of(pattern)}")
    shape_t = parts["shape"]
    if shape_t.dtype != torch.int64 or shape_t.numel() != 2 or bool((shape_t < 0).any()):
        raise LLMPruneError(f"{name}: bad stored shape tensor {shape_t.dtype} {tuple(shape_t.shape)}")
    shape = (int(shape_t.flatten()[0]), int(shape_t.flatten()[1]))
    pattern.check_shape(shape, name)
    return shape


def _keep(parts: dict[str, torch.Tensor], pattern: Pattern, shape: tuple[int, int], name: str, verify: bool) -> torch.Tensor:
    """The stored positions, ``[out, in]`` for unstructured layouts, grouped for structured ones."""
    if not pattern.structured:
        return unpack_bits(parts["bitmask"], shape, name, verify)
    rows, per_row, size = pattern.group_shape(shape)
    keep = unpack_bits(parts["bitmask"], (rows, per_row * size), name, verify).reshape(rows, per_row, size)
    if verify and not bool((keep.sum(-1) == pattern.keep_per_group(shape)).all()):
        raise LLMPruneError(f"{name}: bitmask does not mark exactly {pattern.keep_per_group(shape)} positions per "
                            f"group of pattern {pattern}")
    return keep


def mask_of(parts: dict[str, torch.Tensor], pattern: Pattern, name: str) -> torch.Tensor:
    """The pruner's mask (bool ``[out, in]``) stored with a compressed weight."""
    shape = _shape(parts, pattern, name)
    if pattern.quant is not None:
        pattern = replace(pattern, quant=None)
        if not pattern.structured and pattern.sparsity == 0:  # the packed layout keeps every weight
            return torch.ones(shape, dtype=torch.bool, device=parts["codes"].device)
    keep = _keep(parts, pattern, shape, name, verify=True)
    return pattern.ungroup(keep, shape) if pattern.structured else keep


def decode(parts: dict[str, torch.Tensor], pattern: Pattern, name: str, verify: bool = True) -> torch.Tensor:
    """Rebuild the dense weight from its parts, refusing anything inconsistent.

    ``verify=False`` skips the data-dependent checks (bitmask counts, offsets, the pattern itself), which
    cost a device sync: for parts already verified once, e.g. in :class:`CompressedLinear`'s forward.
    A quantized pattern's parts decode to fp32 (:func:`llmprune.export.quantized.decode`).
    """
    if pattern.quant is not None:
        from . import quantized

        return quantized.decode(parts, pattern, name, verify)
    shape, values = _shape(parts, pattern, name), parts["compressed"]
    if not values.is_floating_point():
        raise LLMPruneError(f"{name}: stored values have non-float dtype {values.dtype}")
    keep = _keep(parts, pattern, shape, name, verify)
    if not pattern.structured:
        if verify:
            counts = keep.sum(1)
            if values.dim() != 1 or values.numel() != int(counts.sum()):
                raise LLMPruneError(f"{name}: {values.numel()} stored values for {int(counts.sum())} "
                                    "bitmask positions")
            offsets = parts["row_offsets"]
            if offsets.dtype != torch.int64 or not torch.equal(offsets, counts.cumsum(0) - counts):
                raise LLMPruneError(f"{name}: row_offsets disagree with the bitmask")
        dense = values.new_zeros(shape)
        dense[keep] = values
    else:
        rows, per_row, size = pattern.group_shape(shape)
        n = pattern.keep_per_group(shape)
        if tuple(values.shape) != (rows, per_row * n):
            raise LLMPruneError(f"{name}: stored values have shape {tuple(values.shape)}, "
                                f"expected {(rows, per_row * n)}")
        groups = values.new_zeros(rows, per_row, size)
        groups[keep] = values.flatten()
        dense = pattern.ungroup(groups, shape)
    # Exact group counts already bound structured layouts, but an unstructured bitmask can hold more positions
    # than the sparsity allows: counting the decoded non-zeros checks every kind the same way.
    if verify and (bad := pattern.violations(dense)):
        raise LLMPruneError(f"{name}: {bad} group(s) break the declared pattern {pattern}")
    return dense
