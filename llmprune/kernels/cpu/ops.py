"""Python face of the CPU ops: the arguments of a packed weight, ``linear`` and the ``decode`` reference."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..formats import SLACK, Layout, PackedWeight
from ..int4 import CODE_SLACK, Int4Weight
from ..int8 import Int8Weight
from .build import available

SMALL_M = 16  # up to this many tokens the row kernels run; above, decoded rows go through the BLAS
AMX_SMALL_M = 8  # the same for 16-bit float weights and tokens where oneDNN's bf16 GEMMs run on AMX tiles
NM24, TILE, DENSE, BITMASK = 0, 1, 2, 3  # packed.h's layout kinds
DENSE_FLOAT = 4  # layer.h: an nn.Linear's float weight


Weight = PackedWeight | Int4Weight | Int8Weight


def _geometry(lay: Layout, row_len: int, slack: int) -> tuple[int, int, int, int]:
    """(kind, r, c, kv) of a layout; a bitmask's kv is the most a row keeps: its row length less the slack."""
    if lay.fmt == "bitmask":
        return (BITMASK, 1, 32, row_len - slack)
    return (NM24 if lay.fmt == "2:4" else TILE, lay.r, lay.c, lay.kv)


def weight_args(w: Weight) -> tuple:
    """``(values, meta, scale, zero, kind, r, c, kv, n, k, bits, group_size)`` as the ops take them."""
    n, k = w.shape
    if isinstance(w, Int8Weight):
        return (w.codes, None, w.scale, None, DENSE, 1, 1, 1, n, k, 8, k)
    if isinstance(w, Int4Weight):
        geometry = _geometry(w.layout, 2 * w.codes.shape[1], SLACK + 2 * CODE_SLACK) if w.sparse else (DENSE, 1, 1, 1)
        return (w.codes, w.meta, w.scale, w.zero, *geometry, n, k, 4, w.group_size)
    return (w.values, w.meta, None, None, *_geometry(w.layout, w.values.shape[1], SLACK), n, k, 0, 0)


@functools.cache
def _amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def small_m_for(w: Weight, dtype: torch.dtype) -> int:
    """Up to how many tokens of ``dtype`` the row kernels beat decoding into the BLAS (measured with
    ``benchmarks/cpu.py --part linear``: on a CPU with AMX, dense bf16 GEMMs cost the same from 1 to 16 tokens and
    the crossover for 16-bit 2:4, 4x4:8 and bitmask weights, which shuffle straight into the GEMM's buffer, is
    ~8 tokens; elsewhere, and for other layouts and int4 / int8 codes, 16)."""
    if not isinstance(w, PackedWeight) or w.values.dtype != dtype or dtype not in (torch.bfloat16, torch.float16):
        return SMALL_M
    lay = w.layout
    shuffled = lay.fmt in ("2:4", "bitmask") or (lay.r, lay.c, lay.kv) == (4, 4, 8)
    return AMX_SMALL_M if shuffled and _amx() else SMALL_M


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None, small_m: int | None = None,
           act_int8: bool = True) -> torch.Tensor:
    """``x [M, K] @ W.T + bias`` in ``x``'s dtype, computed in fp32 by the C++ kernels (``available()`` first).

    ``act_int8``: for int4 / int8 codes and at most ``small_m`` tokens, round the tokens to int8 per 32 columns
    (one scale a block, as llama.cpp's Q8_0) and multiply in integers: about twice the speed, an error of the
    order of that rounding (:func:`quantize_act` is the reference). Float weights ignore it.
    """
    *parts, = weight_args(w)
    small = small_m_for(w, x.dtype) if small_m is None else small_m
    return torch.ops.llmprune_cpu.linear(x, *parts[:4], bias, *parts[4:], small, act_int8)


def quantize_act(x: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` as the int8-activation kernels see it: rounded per 32 columns to ``max|x| / 127`` steps."""
    k = x.shape[1]
    blocks = torch.nn.functional.pad(x.float(), (0, -k % 32)).unflatten(1, (-1, 32))
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return ((blocks * inv).round() * d).flatten(1)[:, :k]


def decode(w: Weight) -> torch.Tensor:
    """The fp32 weight ``[N, K]`` by the kernels' scalar decoder."""
    return torch.ops.llmprune_cpu.decode(*weight_args(w))


def threads_used(items: int = 64) -> int:
    """How many of torch's intra-op threads one ``at::parallel_for`` of the kernels ran on."""
    return torch.ops.llmprune_cpu.threads_used(items)


__all__ = ["SMALL_M", "available", "decode", "linear", "quantize_act", "small_m_for", "threads_used", "weight_args"]
