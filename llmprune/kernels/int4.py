"""int4 weights for decode, dense or sparse: packed codes + fp16 group scales, dequantised in registers.

:class:`Int4Weight` holds, for ``W [N, K]`` on a grid of groups of ``group_size`` input columns
(:mod:`llmprune.quant`):

- dense: ``codes`` uint8 ``[N, K/2]``, two codes a byte (column ``2j`` in the low nibble);
- sparse: ``meta`` and ``layout``, the position words of a :mod:`kernels.formats` layout (2:4, RxC:K tiles or
  the unstructured bitmask), and ``codes`` uint8, a tile row's kept codes in that layout's value order, two a
  byte (value ``j`` in nibble ``j``, low first). For 2:4 that is one byte per group of four columns holding its
  two kept codes (the lower kept column in the low nibble); a bitmask row holds 2 bytes past the layout's slack
  (the kernels' 8-code loads may start at an odd nibble);
- ``scale`` fp16 ``[N, ceil(K / group_size)]`` and, for asymmetric grids, ``zero`` uint8 (same shape;
  symmetric grids have zero ``8``).

A weight is ``(code − zero) · scale``. 2:4 + int4 reads ``0.25 + 0.125 + 2/group_size`` bytes a weight
against 2 for fp16 and ``0.5 + 2/group_size`` for dense int4: the decode (memory-bound) GEMV's ceiling
is ≈5× fp16 and ≈1.3× dense int4. The byte layouts are the checkpoint's own (``export/FORMAT.md``):
:func:`from_parts` only repacks the position bitmask into words.

:func:`int4_mm` is one Triton kernel for ``M = 1 … 16`` tokens (GEMV when ``BLOCK_M == 1``, else
``tl.dot`` on the dequantised tile), and :func:`reference_mm` the pure-torch path it is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dispatch import layout_key
from .formats import Layout, PackedWeight, layout_for, pack, unpack

LAYOUT_24 = Layout("2:4", 1, 4, 2)
CODE_SLACK = 4  # bytes past a bitmask row's value slack: 8 codes from an odd nibble come from one 8-byte load


@dataclass
class Int4Weight:
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    meta: torch.Tensor | None  # the layout's position words; None for dense int4
    shape: tuple[int, int]
    group_size: int
    layout: Layout = LAYOUT_24  # of meta (ignored when dense)

    @property
    def sparse(self) -> bool:
        return self.meta is not None

    @property
    def nbytes(self) -> int:
        parts = [self.codes, self.scale, *(t for t in (self.zero, self.meta) if t is not None)]
        return sum(t.numel() * t.element_size() for t in parts)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight ``[N, K]`` (the reference for the kernel)."""
        n, k = self.shape
        lo, hi = (self.codes & 15).long(), (self.codes >> 4).long()
        zero = 8.0 if self.zero is None else self.zero.float().repeat_interleave(self.group_size, 1)[:, : k]
        scale = self.scale.float().repeat_interleave(self.group_size, 1)[:, :k]
        codes = torch.stack([lo, hi], -1).flatten(1)
        if not self.sparse:
            return (codes[:, :k].float() - zero) * scale
        lay = self.layout  # the codes + 1 through the float codec: 0 where pruned
        count = codes.shape[1] if lay.fmt == "bitmask" else self.meta.shape[1] * lay.tiles_per_word * lay.kv
        plus = unpack(PackedWeight(lay, (codes[:, :count] + 1).float(), self.meta, self.shape))
        return torch.where(plus > 0, (plus - 1 - zero) * scale, 0.0)


def quantize(weight: torch.Tensor, group_size: int = 128, sparse: bool | str = False,
             symmetric: bool = False) -> Int4Weight:
    """Round ``weight`` (magnitude-pruned first to ``sparse``: a pattern such as ``"4x4:8"`` or
    ``"unstructured"`` (50 %), True for 2:4) onto an int4 grid and pack it (for benchmarks and tests; pruned
    checkpoints come through :func:`from_parts`)."""
    from ..patterns import parse_pattern
    from ..quant import QuantSpec

    spec = QuantSpec(4, group_size, symmetric)
    spec_str = "2:4" if sparse is True else sparse
    pattern = parse_pattern(spec_str, quant=spec) if sparse else parse_pattern("unstructured", 0.0, quant=spec)
    w = weight.float()
    keep = pattern.project(w.abs()) if sparse else torch.ones_like(w, dtype=torch.bool)
    wq, grid = spec.project(w, keep)
    codes = torch.where(keep, spec.codes(wq, grid), 0)
    lay = layout_for(parse_pattern(spec_str)) if sparse else None
    return _pack(codes, keep, grid.scale, None if symmetric else grid.zero, group_size, lay)


def _pack(codes: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, gs: int,
          lay: Layout | None) -> Int4Weight:
    n, k = codes.shape
    z = None if zero is None else zero.to(torch.uint8)
    if lay is None:
        u = torch.nn.functional.pad(codes.to(torch.uint8), (0, k % 2))
        return Int4Weight((u[:, 0::2] | (u[:, 1::2] << 4)).contiguous(), scale.half(), z, None, (n, k), gs)
    # the float packer on (code + 1) gives the words and every tile row's codes in value order
    packed = pack(torch.where(keep, codes + 1, 0).float(), lay, keep)
    u = (packed.values - 1).clamp_min(0).to(torch.uint8)
    extra = u.shape[1] % 2 + (2 * CODE_SLACK if lay.fmt == "bitmask" else 0)
    u = torch.nn.functional.pad(u, (0, extra))
    return Int4Weight((u[:, 0::2] | (u[:, 1::2] << 4)).contiguous(), scale.half(), z, packed.meta, (n, k), gs, lay)


def from_parts(parts: dict[str, torch.Tensor], pattern: object) -> Int4Weight:
    """The kernel layout of a checkpoint's int4 weight, dense or pruned to any packable pattern
    (``export/quantized.py`` parts)."""
    from dataclasses import replace

    from ..export import codecs

    quant = pattern.quant
    dense_grid = not pattern.structured and pattern.sparsity == 0
    if quant is None or quant.bits != 4:
        raise ValueError(f"the int4 kernels run int4 weights, not {pattern.label}")
    lay = None if dense_grid else layout_for(replace(pattern, quant=None))  # ValueError: no packed layout
    n, k = (int(v) for v in parts["shape"].flatten())
    dense = codecs.decode(parts, pattern, "weight")  # verifies every part
    spec = quant
    from ..quant import Grid

    zero = parts.get("grid_zero")
    grid = Grid(parts["grid_scale"].float(), torch.full_like(parts["grid_scale"], 8.0, dtype=torch.float32)
                if zero is None else zero.float())
    keep = codecs.mask_of(parts, pattern, "weight")
    codes = torch.where(keep, spec.codes(dense, grid), 0)
    return _pack(codes, keep, parts["grid_scale"], zero, spec.group_len(k), lay)


def reference_mm(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.nn.functional.linear(x.float(), w.dequantize(), None if bias is None else bias.float()).to(x.dtype)


def int4_mm(x: torch.Tensor, w: Int4Weight, block_n: int = 32, block_k: int = 128) -> torch.Tensor:
    """``x [M, K] @ W.T`` through the Triton kernel (M ≤ 16: the decode regime it is written for)."""
    from .triton_int4 import launch

    m, k = x.shape
    if k != w.shape[1]:
        raise ValueError(f"x has {k} features, weight expects {w.shape[1]}")
    if m > 16:
        raise ValueError(f"int4_mm is the decode kernel (M <= 16 tokens), got M={m}")
    return launch(x.contiguous(), w, block_n, block_k)


class Int4Linear(torch.nn.Module):
    """An inference Linear holding an :class:`Int4Weight`: the Triton kernel on CUDA for fp16/bf16 inputs of
    at most 16 tokens, the C++ kernels (:mod:`kernels.cpu`) on the CPU, else the weight dequantised for the
    call (CUDA prefill, no C++ build)."""

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        for name in ("codes", "scale", "zero", "meta"):
            self.register_buffer(name, getattr(weight, name))
        self.layout = weight.layout
        self.register_buffer("bias", bias)
        self.act_int8 = True  # CPU, few tokens: multiply int8-rounded tokens (kernels.cpu.linear); False: fp32

    @property
    def weight4(self) -> Int4Weight:
        return Int4Weight(self.codes, self.scale, self.zero, self.meta, (self.out_features, self.in_features),
                          self.group_size, self.layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        from . import cpu

        if flat.device.type == "cpu" and flat.shape[0] and cpu.available():
            y = cpu.linear(flat, self.weight4, self.bias, act_int8=self.act_int8)
        elif flat.is_cuda and flat.dtype in (torch.float16, torch.bfloat16) and flat.shape[0] <= 16 \
                and (self.meta is None or self.layout == LAYOUT_24):  # the Triton kernel: dense and 2:4
            y = int4_mm(flat, self.weight4)
            y = y if self.bias is None else y + self.bias
        else:
            y = torch.nn.functional.linear(flat, self.weight4.dequantize().to(flat.dtype), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = "int4" if self.meta is None else f"{layout_key(self.layout)} + int4"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind} g{self.group_size}"
