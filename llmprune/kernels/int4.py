"""int4 weights for decode, dense or 2:4-sparse: packed codes + fp16 group scales, dequantised in registers.

:class:`Int4Weight` holds, for ``W [N, K]`` on a grid of groups of ``group_size`` input columns
(:mod:`llmprune.quant`):

- dense: ``codes`` uint8 ``[N, K/2]``, two codes a byte (column ``2j`` in the low nibble);
- 2:4: ``codes`` uint8 ``[N, Kp/4]``, one byte per group of four columns holding its two kept codes
  (the lower kept column in the low nibble) and ``meta``, the 2:4 position words of
  :mod:`kernels.formats` (``i0 | i1 << 2`` per group, 8 groups an int32);
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

from .formats import Layout, pack

LAYOUT_24 = Layout("2:4", 1, 4, 2)


@dataclass
class Int4Weight:
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    meta: torch.Tensor | None  # 2:4 position words; None for dense int4
    shape: tuple[int, int]
    group_size: int

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
        if not self.sparse:
            codes = torch.stack([lo, hi], -1).flatten(1)[:, :k]
        else:
            words = self.meta.long() & 0xFFFFFFFF
            pos = ((words.unsqueeze(-1) >> (4 * torch.arange(8, device=words.device))) & 15).flatten(1)  # [N, groups]
            codes = torch.full((n, pos.shape[1], 4), -1, dtype=torch.long, device=lo.device)
            codes.scatter_(-1, (pos & 3).unsqueeze(-1), lo.unsqueeze(-1)).scatter_(-1, (pos >> 2).unsqueeze(-1), hi.unsqueeze(-1))
            codes = codes.flatten(1)[:, :k]
        w = (codes.float() - zero) * scale
        return torch.where(codes >= 0, w, 0.0)


def quantize(weight: torch.Tensor, group_size: int = 128, sparse: bool = False, symmetric: bool = False) -> Int4Weight:
    """Round ``weight`` (2:4-pruned first, by magnitude, if ``sparse``) onto an int4 grid and pack it
    (for benchmarks and tests; pruned checkpoints come through :func:`from_parts`)."""
    from ..patterns import parse_pattern
    from ..quant import QuantSpec

    spec = QuantSpec(4, group_size, symmetric)
    pattern = parse_pattern("2:4" if sparse else "unstructured", None if sparse else 0.0, quant=spec)
    w = weight.float()
    keep = pattern.project(w.abs()) if sparse else torch.ones_like(w, dtype=torch.bool)
    wq, grid = spec.project(w, keep)
    codes = torch.where(keep, spec.codes(wq, grid), 0)
    return _pack(codes, keep, grid.scale, None if symmetric else grid.zero, group_size)


def _pack(codes: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, gs: int) -> Int4Weight:
    n, k = codes.shape
    z = None if zero is None else zero.to(torch.uint8)
    if bool(keep.all()):
        u = torch.nn.functional.pad(codes.to(torch.uint8), (0, k % 2))
        return Int4Weight((u[:, 0::2] | (u[:, 1::2] << 4)).contiguous(), scale.half(), z, None, (n, k), gs)
    # the 2:4 packer on (code + 1) gives the words and each group's two codes in column order
    packed = pack(torch.where(keep, codes + 1, 0).float(), LAYOUT_24, keep)
    pair = (packed.values - 1).clamp_min(0).to(torch.uint8).reshape(n, -1, 2)
    return Int4Weight((pair[..., 0] | (pair[..., 1] << 4)).contiguous(), scale.half(), z, packed.meta, (n, k), gs)


def from_parts(parts: dict[str, torch.Tensor], pattern: object) -> Int4Weight:
    """The kernel layout of a checkpoint's 2:4 + int4 or int4 weight (``export/quantized.py`` parts)."""
    from ..export import codecs

    quant = pattern.quant
    if quant is None or quant.bits != 4 or not (pattern.kind == "nm" and (pattern.n, pattern.m) == (2, 4)
                                                or not pattern.structured and pattern.sparsity == 0):
        raise ValueError(f"the int4 kernels run 2:4 + int4 and dense int4 weights, not {pattern.label}")
    n, k = (int(v) for v in parts["shape"].flatten())
    dense = codecs.decode(parts, pattern, "weight")  # verifies every part
    spec = quant
    from ..quant import Grid

    zero = parts.get("grid_zero")
    grid = Grid(parts["grid_scale"].float(), torch.full_like(parts["grid_scale"], 8.0, dtype=torch.float32)
                if zero is None else zero.float())
    keep = codecs.mask_of(parts, pattern, "weight")
    codes = torch.where(keep, spec.codes(dense, grid), 0)
    return _pack(codes, keep, parts["grid_scale"], zero, spec.group_len(k))


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
        self.register_buffer("bias", bias)
        self.act_int8 = True  # CPU, few tokens: multiply int8-rounded tokens (kernels.cpu.linear); False: fp32

    @property
    def weight4(self) -> Int4Weight:
        return Int4Weight(self.codes, self.scale, self.zero, self.meta, (self.out_features, self.in_features),
                          self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        from . import cpu

        if flat.device.type == "cpu" and flat.shape[0] and cpu.available():
            y = cpu.linear(flat, self.weight4, self.bias, act_int8=self.act_int8)
        elif flat.is_cuda and flat.dtype in (torch.float16, torch.bfloat16) and flat.shape[0] <= 16:
            y = int4_mm(flat, self.weight4)
            y = y if self.bias is None else y + self.bias
        else:
            y = torch.nn.functional.linear(flat, self.weight4.dequantize().to(flat.dtype), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = "2:4 + int4" if self.meta is not None else "int4"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind} g{self.group_size}"
