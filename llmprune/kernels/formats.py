"""Packed layouts for pruned weights, with the pure-torch (CPU reference) pack/unpack.

Both layouts cut the ``[N, K]`` weight (``nn.Linear`` order) into tiles of ``r x c`` weights of which
at most ``kv`` are kept, store the ``kv`` kept values of every tile and a ``r*c``-bit code per tile.
The codes of ``32 // (r*c)`` consecutive tiles along K share one int32 word (tile ``t`` of a word at
bits ``t*r*c ...``), so ``K`` is zero-padded to ``Kp``, a multiple of ``32 // r`` columns:

- ``values``: ``[N/r, Kp/c * kv]``, the values of tile row ``i`` in tile order along K, ``kv`` per tile;
- ``meta``: ``[N/r, Kp/(32/r)]`` int32 words.

``"2:4"`` (r=1, c=4, kv=2): the code of a group is its two kept in-group indices ``i0 < i1`` as
``i0 | i1 << 2`` (2 bits per kept value); decoding is two compares per weight, no popcount.
``"tile"`` (any RxC:K with r*c dividing 32, N:M other than 2:4 as 1xM:N): the code is the tile's
occupancy mask, bit ``b = row*c + col``; values are in ascending bit order. The packer always sets
exactly ``kv`` bits (padding with zero-valued positions), so the value of bit ``b`` of tile ``t`` sits
at ``word_index * values_per_word + popcount(word & ((1 << (t*r*c + b)) - 1))``: one AND + POPC.

``"bitmask"`` (unstructured; r=1, c=32, kv=0): the code of 32 columns is their keep bits (one word); a row's
kept values in column order, then zeros up to ``values.shape[1]`` = the most any row keeps + ``SLACK`` (rows
padded to one stride so every row starts at a fixed place; the kernels' 8-value loads may run past the last). The
checkpoint's ``sparse-bitmask`` is the same bits and values, its rows padded to bytes and packed end to end.

Bytes per weight with 16-bit values: ``(2*kv + r*c/8) / (r*c)``; 2:4 and 4x4:8 both read
``1 + 0.125 = 1.125`` bytes per weight, 0.5625x of dense fp16; a 50 % bitmask the same when rows keep alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WORD_BITS = 32
SLACK = 32  # zero values past a bitmask row's widest: 8-value loads from up to 24 past a word's start stay inside


@dataclass(frozen=True)
class Layout:
    """Geometry of a packed format; see the module docstring."""

    fmt: str  # "2:4" | "tile" | "bitmask"
    r: int
    c: int
    kv: int

    @property
    def bits(self) -> int:
        """Code bits per tile."""
        return self.r * self.c

    @property
    def tiles_per_word(self) -> int:
        return WORD_BITS // self.bits

    @property
    def cols_per_word(self) -> int:
        return self.c * self.tiles_per_word

    @property
    def values_per_word(self) -> int:
        return self.kv * self.tiles_per_word

    def padded_k(self, k: int) -> int:
        return -(-k // self.cols_per_word) * self.cols_per_word

    def bytes_per_weight(self, value_bytes: int = 2, density: float = 0.5) -> float:
        """Bytes a weight reads (``density``: the kept fraction, for the bitmask's variable count)."""
        kept = density * self.bits if self.fmt == "bitmask" else self.kv
        return (kept * value_bytes + self.bits / 8) / self.bits


BITMASK = Layout("bitmask", 1, WORD_BITS, 0)
_BITS = Layout("tile", 1, 1, 1)  # one bit a column: the bitmask's words through the tile word packer


def layout_for(pattern: object) -> Layout:
    """The packed layout of a structured pattern (an ``llmprune.patterns.Pattern`` or its string)."""
    if isinstance(pattern, str):
        from llmprune.patterns import parse_pattern

        pattern = parse_pattern(pattern)
    kind = getattr(pattern, "kind", None)
    if kind == "unstructured" and pattern.sparsity > 0:
        return BITMASK
    if kind == "nm" and (pattern.n, pattern.m) == (2, 4):
        return Layout("2:4", 1, 4, 2)
    if kind == "nm":
        r, c, kv = 1, pattern.m, pattern.n
    elif kind == "tile":
        r, c, kv = pattern.r, pattern.c, pattern.k
    else:
        raise ValueError(f"no packed layout for pattern {pattern}: only pruned patterns can be packed")
    if WORD_BITS % (r * c):
        raise ValueError(f"pattern {pattern}: tiles of {r * c} weights must divide {WORD_BITS} bits to be packed")
    return Layout("tile", r, c, kv)


@dataclass
class PackedWeight:
    """A packed pruned weight of logical shape ``shape`` = (out_features, in_features)."""

    layout: Layout
    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]

    @property
    def padded_k(self) -> int:
        return self.meta.shape[1] * self.layout.cols_per_word

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel() * 4

    def unpack(self) -> torch.Tensor:
        return unpack(self)


def _to_words(codes: torch.Tensor, lay: Layout) -> torch.Tensor:
    """[..., tiles] codes (int64) -> [..., tiles / tiles_per_word] int32 words (two's complement)."""
    shifts = torch.arange(lay.tiles_per_word, device=codes.device) * lay.bits
    words = (codes.unflatten(-1, (-1, lay.tiles_per_word)) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _from_words(meta: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Inverse of :func:`_to_words`: int32 words -> [..., tiles] int64 codes."""
    shifts = torch.arange(lay.tiles_per_word, device=meta.device) * lay.bits
    return ((meta.long().unsqueeze(-1) >> shifts) & ((1 << lay.bits) - 1)).flatten(-2)


def _tiles(weight: torch.Tensor, lay: Layout) -> torch.Tensor:
    """[N, Kp] -> [N/r, Kp/c, r*c], tile elements in bit order (row-major inside the tile)."""
    n, k = weight.shape
    return weight.reshape(n // lay.r, lay.r, k // lay.c, lay.c).transpose(1, 2).reshape(n // lay.r, k // lay.c, -1)


def _untile(tiles: torch.Tensor, lay: Layout) -> torch.Tensor:
    tr, tc, _ = tiles.shape
    return tiles.reshape(tr, tc, lay.r, lay.c).transpose(1, 2).reshape(tr * lay.r, tc * lay.c)


def pack(weight: torch.Tensor, lay: Layout, mask: torch.Tensor | None = None) -> PackedWeight:
    """Pack a pruned ``[N, K]`` weight; raises ``ValueError`` if a tile holds more than ``kv`` non-zeros.

    ``mask``: the positions the pruner kept (bool ``[N, K]``, covering every non-zero); without it they
    are read off the non-zeros.
    """
    n, k = weight.shape
    if lay.fmt != "bitmask" and (n % lay.r or k % lay.c):
        raise ValueError(f"weight {n}x{k} is not divisible into {lay.r}x{lay.c} tiles")
    kp = lay.padded_k(k)
    tiles = _tiles(torch.nn.functional.pad(weight, (0, kp - k)), lay)
    nz = tiles != 0
    if mask is not None:
        if mask.shape != weight.shape or bool((weight != 0)[~mask].any()):
            raise ValueError("mask does not fit the weight or leaves a non-zero outside it")
        nz = _tiles(torch.nn.functional.pad(mask, (0, kp - k)), lay)
    if lay.fmt == "bitmask":
        return _pack_bitmask(torch.nn.functional.pad(weight, (0, kp - k)), nz.flatten(1), (n, k))
    if bool((nz.sum(-1) > lay.kv).any()):
        raise ValueError(f"weight has {lay.r}x{lay.c} tiles with more than {lay.kv} non-zeros: not pruned to the pattern")
    # Kept positions: the kept (non-zero) ones, then the lowest other positions up to kv; ascending, so
    # values are stored in bit order and every code has exactly kv entries.
    pos = torch.sort((~nz).to(torch.uint8), dim=-1, stable=True).indices[..., : lay.kv].sort(-1).values
    values = tiles.gather(-1, pos).flatten(1).contiguous()
    if lay.fmt == "2:4":
        codes = pos[..., 0] | (pos[..., 1] << 2)
    else:
        codes = (1 << pos).sum(-1)
    return PackedWeight(lay, values, _to_words(codes, lay), (n, k))


def unpack(packed: PackedWeight) -> torch.Tensor:
    """Dense ``[N, K]`` weight from its packed form (vectorised; the reference for the kernels)."""
    lay, n, k = packed.layout, *packed.shape
    if lay.fmt == "bitmask":
        keep = _from_words(packed.meta, _BITS).bool()
        dense = torch.zeros(keep.shape, dtype=packed.values.dtype, device=keep.device)
        counts = keep.sum(1, keepdim=True)
        dense[keep] = packed.values[torch.arange(packed.values.shape[1], device=keep.device) < counts]
        return dense[:n, :k]
    codes = _from_words(packed.meta, lay)  # [N/r, Kp/c]
    if lay.fmt == "2:4":
        pos = torch.stack([codes & 3, codes >> 2], -1)
    else:
        bits = (codes.unsqueeze(-1) >> torch.arange(lay.bits, device=codes.device)) & 1
        # Exactly kv bits are set: the first kv of a stable sort (set bits first) are their positions.
        pos = torch.sort(1 - bits.to(torch.uint8), dim=-1, stable=True).indices[..., : lay.kv]
    values = packed.values.reshape(*codes.shape, lay.kv)
    tiles = torch.zeros(*codes.shape, lay.bits, dtype=values.dtype, device=values.device)
    return _untile(tiles.scatter_(-1, pos, values), lay)[:n, :k]


def _pack_bitmask(weight: torch.Tensor, keep: torch.Tensor, shape: tuple[int, int]) -> PackedWeight:
    """Bitmask layout of a padded ``[N, Kp]`` weight keeping ``keep`` (bool, same shape)."""
    counts = keep.sum(1, keepdim=True)
    widest = int(counts.max()) if keep.numel() else 0
    cols = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :widest]  # kept columns, ascending
    taken = torch.arange(widest, device=keep.device) < counts
    values = torch.where(taken, weight.gather(1, cols), 0)
    values = torch.nn.functional.pad(values, (0, SLACK)).contiguous()
    return PackedWeight(BITMASK, values, _to_words(keep.long(), _BITS), shape)
