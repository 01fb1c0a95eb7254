"""Triton kernels over the packed layouts of :mod:`kernels.formats` (imported only when triton is).

One kernel computes ``y = x @ W.T (+ bias)`` for every token count: each program decodes a
``[BLOCK_N, BLOCK_K]`` tile of W in registers from the packed values + metadata (read once, contiguous
along K) and accumulates in fp32, either as a GEMV (``BLOCK_M == 1``: elementwise FMA, reduced once at
the end) or with ``tl.dot`` (``BLOCK_M >= 16``). Small grids split K across programs and combine with
fp32 atomics. A second kernel decompresses to a dense weight for the decompress-then-cuBLAS path.

Configurations are tuned per (layout, N, K, M bucket, dtype) on first use with ``triton.testing.do_bench``
(never while a CUDA graph is being captured). Under ``TRITON_INTERPRET=1`` the same kernels run on CPU
tensors with an explicit or default config; popcount is then done with bit arithmetic instead of POPC.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
import triton.testing
from triton.language.extra import libdevice

from .formats import Layout, PackedWeight

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _popc(x, USE_POPC: tl.constexpr):
    """Population count of uint32 ``x``: the POPC instruction on GPU, SWAR in the interpreter."""
    if USE_POPC:
        out = libdevice.popc(x.to(tl.int32, bitcast=True))
    else:
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        out = ((((x + (x >> 4)) & 0x0F0F0F0F) * 0x01010101) >> 24).to(tl.int32)
    return out


@triton.jit
def _decode_24(vals_ptr, meta_ptr, rn, k0, N, KP, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense [BLOCK_N, BLOCK_K] tile of a 2:4 weight: each weight is v0, v1 or 0 by two compares."""
    G: tl.constexpr = BLOCK_K // 4
    g = k0 // 4 + tl.arange(0, G)
    ok = (rn < N)[:, None] & (g < KP // 4)[None, :]
    word = tl.load(meta_ptr + rn[:, None] * (KP // 32) + (g // 8)[None, :], mask=ok, other=0)
    code = (word >> ((g % 8) * 4)[None, :]) & 15
    i0 = (code & 3)[:, :, None]
    i1 = (code >> 2)[:, :, None]
    voff = rn[:, None, None] * (KP // 2) + 2 * g[None, :, None] + tl.arange(0, 2)[None, None, :]
    v0, v1 = tl.split(tl.load(vals_ptr + voff, mask=ok[:, :, None], other=0.0))
    p = tl.arange(0, 4)[None, None, :]
    w = tl.where(p == i0, v0[:, :, None], tl.where(p == i1, v1[:, :, None], 0.0))
    return tl.reshape(w.to(v0.dtype), (BLOCK_N, BLOCK_K))


@triton.jit
def _decode_tile(
    vals_ptr, meta_ptr, rn, k0, N, KP,
    R: tl.constexpr, C: tl.constexpr, KV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_POPC: tl.constexpr,
):
    """Dense [BLOCK_N, BLOCK_K] tile of an RxC:KV weight: value offset = popcount of the lower code bits."""
    TPW: tl.constexpr = 32 // (R * C)
    CPW: tl.constexpr = C * TPW
    W: tl.constexpr = BLOCK_K // CPW
    wpr = KP // CPW  # words per tile row
    wi = k0 // CPW + tl.arange(0, W)
    ok = (rn < N)[:, None] & (wi < wpr)[None, :]
    widx = (rn // R)[:, None] * wpr + wi[None, :]
    word = tl.load(meta_ptr + widx, mask=ok, other=0).to(tl.uint32, bitcast=True)[:, :, None]
    j = tl.arange(0, CPW)
    # Bit of (row rn, column j of the word) counted from the word's start; loop-invariant.
    sh = ((j // C) * (R * C) + (j % C))[None, :] + ((rn % R) * C)[:, None]
    sh = sh.to(tl.uint32)[:, None, :]
    one = tl.full((1, 1, 1), 1, tl.uint32)
    keep = ((word >> sh) & one) != 0
    off = widx[:, :, None] * (TPW * KV) + _popc(word & ((one << sh) - one), USE_POPC)
    w = tl.load(vals_ptr + off, mask=keep & ok[:, :, None], other=0.0)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _decode(
    vals_ptr, meta_ptr, rn, k0, N, KP,
    IDX24: tl.constexpr, R: tl.constexpr, C: tl.constexpr, KV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_POPC: tl.constexpr,
):
    if IDX24:
        w = _decode_24(vals_ptr, meta_ptr, rn, k0, N, KP, BLOCK_N, BLOCK_K)
    else:
        w = _decode_tile(vals_ptr, meta_ptr, rn, k0, N, KP, R, C, KV, BLOCK_N, BLOCK_K, USE_POPC)
    return w


@triton.jit
def _sparse_mm_kernel(
    x_ptr, vals_ptr, meta_ptr, bias_ptr, out_ptr,
    M, N, K, KP, stride_xm,
    IDX24: tl.constexpr, R: tl.constexpr, C: tl.constexpr, KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_POPC: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    # M-tiles vary fastest so concurrent programs share (and decode from L2) the same weight tiles.
    pid_m = pid % num_m
    pid_n = pid // num_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_blocks = tl.cdiv(KP, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    kb_start = tl.program_id(1) * per_split
    kb_end = tl.minimum(kb_start + per_split, k_blocks)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0
        )
        w = _decode(vals_ptr, meta_ptr, rn, k0, N, KP, IDX24, R, C, KV, BLOCK_N, BLOCK_K, USE_POPC)
        if BLOCK_M == 1:
            acc += w.to(tl.float32) * x.to(tl.float32)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if BLOCK_M == 1:
        res = tl.sum(acc, axis=1)[None, :]
    else:
        res = acc
    out_mask = (rm < M)[:, None] & (rn < N)[None, :]
    out_off = rm[:, None] * N + rn[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            res += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_off, res.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptr + out_off, res, mask=out_mask)


@triton.jit
def _unpack_kernel(
    vals_ptr, meta_ptr, out_ptr, N, K, KP,
    IDX24: tl.constexpr, R: tl.constexpr, C: tl.constexpr, KV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_POPC: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    w = _decode(vals_ptr, meta_ptr, rn, k0, N, KP, IDX24, R, C, KV, BLOCK_N, BLOCK_K, USE_POPC)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w, mask=(rn < N)[:, None] & (rk < K)[None, :])


@dataclass(frozen=True)
class Config:
    """Launch configuration of :func:`sparse_mm`; ``block_m == 1`` selects the GEMV variant."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


# (block_m or 0 = "by M", block_n, block_k, num_warps, num_stages) candidates per regime.
_GEMV = [(1, 32, 256, 4, 3), (1, 16, 256, 4, 3), (1, 32, 128, 4, 4), (1, 64, 128, 4, 3), (1, 32, 512, 8, 2), (1, 64, 256, 8, 3)]
_SMALL = [(0, 64, 128, 4, 3), (0, 32, 128, 4, 3), (0, 32, 256, 4, 3), (0, 64, 256, 4, 3), (0, 128, 128, 8, 3)]
_LARGE = [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3), (128, 256, 32, 8, 3)]
_TUNED: dict[tuple, Config] = {}


def m_bucket(m: int) -> int:
    """Token counts sharing one tuned config: 1, <=16, <=64, <=256, <=1024, more."""
    for b in (1, 16, 64, 256, 1024):
        if m <= b:
            return b
    return 4096


def _split_k(tiles: int, k_blocks: int, sms: int) -> int:
    # Enough programs to keep every SM streaming, but at least 4 K-blocks per program.
    split = 1
    while split < 16 and tiles * split < 2 * sms and k_blocks >= 8 * split:
        split *= 2
    return split


def candidates(m: int, n: int, kp: int, lay: Layout, sms: int) -> list[Config]:
    """Configs worth timing for this problem (the first is the untuned default)."""
    if m == 1:
        table = _GEMV
    elif m <= 64:
        table = _SMALL
    else:
        table = _LARGE
    out = []
    for bm, bn, bk, warps, stages in table:
        bm = bm or (16 if m <= 16 else 32 if m <= 32 else 64)
        if bn % lay.r or bk % lay.cols_per_word:
            continue
        tiles = -(-m // bm) * -(-n // bn)
        split = 1 if m > 64 else _split_k(tiles, -(-kp // bk), sms)
        out.append(Config(bm, bn, bk, split, warps, stages))
    return out


def _launch(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None, cfg: Config) -> torch.Tensor:
    m, k = x.shape
    n = packed.shape[0]
    lay = packed.layout
    if cfg.split_k > 1:  # programs add fp32 partial sums into a zeroed buffer
        y = torch.zeros((m, n), device=x.device, dtype=torch.float32)
    else:
        y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    _sparse_mm_kernel[grid](
        x, packed.values, packed.meta, bias if bias is not None else y, y,
        m, n, k, packed.padded_k, x.stride(0),
        IDX24=lay.fmt == "2:4", R=lay.r, C=lay.c, KV=lay.kv,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        HAS_BIAS=bias is not None, USE_POPC=not INTERPRET,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if cfg.split_k > 1:
        y = (y if bias is None else y + bias.float()).to(x.dtype)
    return y


def _tune(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None, cands: list[Config]) -> Config:
    best, best_ms = cands[0], float("inf")
    for cfg in cands:
        try:
            ms = triton.testing.do_bench(lambda: _launch(x, packed, bias, cfg), warmup=5, rep=25, return_mode="median")
        except Exception:  # noqa: BLE001 - a config that does not compile/fit on this GPU is just skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best


def sparse_mm(
    x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None, config: Config | None = None
) -> torch.Tensor:
    """``x [M, K] @ W.T + bias`` with W packed; ``config`` None = tuned (GPU) or default (interpreter)."""
    m, k = x.shape
    n = packed.shape[0]
    if k != packed.shape[1]:
        raise ValueError(f"x has {k} features, weight expects {packed.shape[1]}")
    if max(m * max(k, n), packed.values.numel(), n * packed.padded_k) >= 2**31:
        raise ValueError("tensor too large for the kernel's 32-bit offsets")
    if x.stride(1) != 1:
        x = x.contiguous()
    if config is None:
        key = (packed.layout, n, k, m_bucket(m), x.dtype, bias is not None, x.device)
        config = _TUNED.get(key)
        if config is None:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
            cands = candidates(m, n, packed.padded_k, packed.layout, sms)
            tune = x.is_cuda and not torch.cuda.is_current_stream_capturing()
            tune = tune and os.environ.get("LLMPRUNE_KERNELS_AUTOTUNE", "1") != "0"
            config = _tune(x, packed, bias, cands) if tune else cands[0]
            _TUNED[key] = config
    return _launch(x, packed, bias, config)


def unpack(packed: PackedWeight, block_n: int = 64, block_k: int = 128) -> torch.Tensor:
    """Dense weight decoded by the same code as :func:`sparse_mm` (for decompress-then-cuBLAS)."""
    n, k = packed.shape
    lay = packed.layout
    out = torch.empty((n, k), device=packed.values.device, dtype=packed.values.dtype)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _unpack_kernel[grid](
        packed.values, packed.meta, out, n, k, packed.padded_k,
        IDX24=lay.fmt == "2:4", R=lay.r, C=lay.c, KV=lay.kv,
        BLOCK_N=block_n, BLOCK_K=block_k, USE_POPC=not INTERPRET,
    )  # fmt: skip
    return out
