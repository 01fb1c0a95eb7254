"""Triton kernels over the packed layouts of :mod:`kernels.formats` (imported only when triton is).

One kernel computes ``y = x @ W.T (+ bias)`` for every token count. Each program walks K over a
``BLOCK_N`` slice of rows, reading the packed values and metadata once (contiguous along K) and
decoding in registers, with fp32 accumulation:

- M = 1 (GEMV, ``BLOCK_M == 1``): for 2:4 each kept value picks its input by two selects, so W is
  never expanded; for tiles the dense tile is rebuilt (popcount rank + gather) and FMA'd. Either way
  the sum over K happens once, at the end.
- M > 1: the decoded dense tile feeds ``tl.dot`` (BLOCK_M 16-64 for decode, 64-128 for prefill).

When N gives too few programs for the SMs, K is split across programs, which add fp32 partials
atomically. A second kernel decompresses to a dense weight (the decompress-then-cuBLAS path).

Configs are tuned on first use per (layout, N, K, M bucket, dtype) with ``triton.testing.do_bench``,
never while a CUDA graph is being captured. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU
tensors with an explicit or default config, doing popcount with bit arithmetic instead of POPC.
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
def _load_24(vptr, mptr, k0, KP, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """Kept values (v0, v1) and codes of the [BLOCK_N, BLOCK_K / 4] 2:4 groups at ``vptr``/``mptr``.

    Values and metadata words are loaded contiguously (16-byte vectors) and split in registers; a
    thread-per-group load of each word would cost an instruction per group.
    """
    G: tl.constexpr = BLOCK_K // 4
    if EVEN_K:
        v = tl.load(vptr)
        word = tl.load(mptr)
    else:
        v = tl.load(vptr, mask=(k0 // 2 + tl.arange(0, 2 * G) < KP // 2)[None, :], other=0.0)
        word = tl.load(mptr, mask=(k0 // 32 + tl.arange(0, G // 8) < KP // 32)[None, :], other=0)
    v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, G, 2)))
    code = tl.reshape((word[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 15, (BLOCK_N, G))
    return v0, v1, code


@triton.jit
def _expand_24(v0, v1, code, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense [BLOCK_N, BLOCK_K] tile: each weight is v0, v1 or 0 by two compares."""
    p = tl.arange(0, 4)[None, None, :]
    w = tl.where(p == (code & 3)[:, :, None], v0[:, :, None], 0.0)
    w = tl.where(p == (code >> 2)[:, :, None], v1[:, :, None], w)
    return tl.reshape(w.to(v0.dtype), (BLOCK_N, BLOCK_K))


@triton.jit
def _gemv_24(v0, v1, code, x, G: tl.constexpr):
    """[BLOCK_N, G] partial products of a 2:4 GEMV: pick each value's x instead of expanding W.

    ``x`` is [G, 4] (a group's four inputs); i0 is in 0..2 and i1 in 1..3, so two selects each.
    """
    xa, xb = tl.split(tl.reshape(x.to(tl.float32), (G, 2, 2)))
    x0, x2 = tl.split(xa)
    x1, x3 = tl.split(xb)
    i0 = code & 3
    i1 = code >> 2
    s0 = tl.where(i0 == 0, x0[None, :], tl.where(i0 == 1, x1[None, :], x2[None, :]))
    s1 = tl.where(i1 == 3, x3[None, :], tl.where(i1 == 2, x2[None, :], x1[None, :]))
    return v0.to(tl.float32) * s0 + v1.to(tl.float32) * s1


@triton.jit
def _decode_tile(
    vals_ptr, meta_ptr, widx, low, k0, KP,
    TPW: tl.constexpr, KV: tl.constexpr, CPW: tl.constexpr, W: tl.constexpr,
    EVEN_K: tl.constexpr, USE_POPC: tl.constexpr,
):
    """Dense [BLOCK_N, W, CPW] weights of the RxC:KV words ``widx``: value = popcount of lower code bits.

    ``low`` holds, per weight, the word bits below its own (loop-invariant; its own bit is low + 1,
    recomputed rather than kept to save registers). The rank is always inside the word's values, so
    the gather is unmasked and dropped weights are selected away.
    """
    if EVEN_K:
        word = tl.load(meta_ptr + widx)
    else:
        ok = (k0 // CPW + tl.arange(0, W) < KP // CPW)[None, :]
        word = tl.load(meta_ptr + widx, mask=ok, other=0)
    word = word.to(tl.uint32, bitcast=True)[:, :, None]
    off = widx[:, :, None] * (TPW * KV) + _popc(word & low, USE_POPC)
    if EVEN_K:
        v = tl.load(vals_ptr + off)
    else:
        v = tl.load(vals_ptr + off, mask=ok[:, :, None], other=0.0)
    return tl.where((word & (low + 1)) != 0, v, 0.0).to(v.dtype)


@triton.jit
def _tile_low_bits(rn, R: tl.constexpr, C: tl.constexpr, CPW: tl.constexpr):
    """[BLOCK_N, 1, CPW] mask of the word's code bits below each (row, column of a word)'s own bit."""
    j = tl.arange(0, CPW)
    sh = (((j // C) * (R * C) + (j % C))[None, :] + ((rn % R) * C)[:, None]).to(tl.uint32)[:, None, :]
    one = tl.full((1, 1, 1), 1, tl.uint32)
    return (one << sh) - one


@triton.jit
def _sparse_mm_kernel(
    x_ptr, vals_ptr, meta_ptr, bias_ptr, out_ptr,
    M, N, K, KP, stride_xm,
    IDX24: tl.constexpr, R: tl.constexpr, C: tl.constexpr, KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, USE_POPC: tl.constexpr,
):
    TPW: tl.constexpr = 32 // (R * C)
    CPW: tl.constexpr = C * TPW
    W: tl.constexpr = BLOCK_K // CPW
    G: tl.constexpr = BLOCK_K // 4
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    # M-tiles vary fastest so concurrent programs share (and decode from L2) the same weight tiles.
    rm = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid // num_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows load row M-1 / N-1 instead of being masked; the store drops them.
    rm_c = tl.minimum(rm, M - 1)
    rn_c = tl.minimum(rn, N - 1)
    k_blocks = tl.cdiv(KP, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    kb_start = tl.program_id(1) * per_split
    kb_end = tl.minimum(kb_start + per_split, k_blocks)
    k_start = kb_start * BLOCK_K

    if IDX24:
        vptr = vals_ptr + rn_c[:, None] * (KP // 2) + (k_start // 2 + tl.arange(0, 2 * G))[None, :]
        mptr = meta_ptr + rn_c[:, None] * (KP // 32) + (k_start // 32 + tl.arange(0, G // 8))[None, :]
    else:
        widx = (rn_c // R)[:, None] * (KP // CPW) + (k_start // CPW + tl.arange(0, W))[None, :]
        low = _tile_low_bits(rn_c, R, C, CPW)
    if BLOCK_M == 1:
        if IDX24:  # x as [group, position]
            xk = k_start + 4 * tl.arange(0, G)[:, None] + tl.arange(0, 4)[None, :]
            acc = tl.zeros((BLOCK_N, G), tl.float32)
        else:  # x as [word, column]
            xk = k_start + CPW * tl.arange(0, W)[:, None] + tl.arange(0, CPW)[None, :]
            acc = tl.zeros((BLOCK_N, W, CPW), tl.float32)
        xptr = x_ptr + rm_c * stride_xm + xk
    else:
        xk = k_start + tl.arange(0, BLOCK_K)[None, :]
        xptr = x_ptr + rm_c[:, None] * stride_xm + xk
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)

    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        if EVEN_K:
            x = tl.load(xptr)
        else:
            x = tl.load(xptr, mask=xk < K, other=0.0)
        if IDX24:
            v0, v1, code = _load_24(vptr, mptr, k0, KP, BLOCK_N, BLOCK_K, EVEN_K)
            if BLOCK_M == 1:
                acc += _gemv_24(v0, v1, code, x, G)
            else:
                acc = tl.dot(x, tl.trans(_expand_24(v0, v1, code, BLOCK_N, BLOCK_K)), acc)
            vptr += BLOCK_K // 2
            mptr += BLOCK_K // 32
        else:
            w = _decode_tile(vals_ptr, meta_ptr, widx, low, k0, KP, TPW, KV, CPW, W, EVEN_K, USE_POPC)
            if BLOCK_M == 1:
                acc += w.to(tl.float32) * x.to(tl.float32)[None, :, :]
            else:
                acc = tl.dot(x, tl.trans(tl.reshape(w, (BLOCK_N, BLOCK_K))), acc)
            widx += W
        xptr += BLOCK_K
        if not EVEN_K:
            xk += BLOCK_K

    if BLOCK_M == 1:
        if IDX24:
            res = tl.sum(acc, axis=1)[None, :]
        else:
            res = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
    else:
        res = acc
    out_mask = (rm < M)[:, None] & (rn < N)[None, :]
    out_off = rm[:, None] * N + rn[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            res += tl.load(bias_ptr + rn_c).to(tl.float32)[None, :]
        tl.store(out_ptr + out_off, res.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptr + out_off, res, mask=out_mask)


@triton.jit
def _unpack_kernel(
    vals_ptr, meta_ptr, out_ptr, N, K, KP,
    IDX24: tl.constexpr, R: tl.constexpr, C: tl.constexpr, KV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, USE_POPC: tl.constexpr,
):
    TPW: tl.constexpr = 32 // (R * C)
    CPW: tl.constexpr = C * TPW
    W: tl.constexpr = BLOCK_K // CPW
    G: tl.constexpr = BLOCK_K // 4
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_c = tl.minimum(rn, N - 1)
    k0 = tl.program_id(1) * BLOCK_K
    if IDX24:
        vptr = vals_ptr + rn_c[:, None] * (KP // 2) + (k0 // 2 + tl.arange(0, 2 * G))[None, :]
        mptr = meta_ptr + rn_c[:, None] * (KP // 32) + (k0 // 32 + tl.arange(0, G // 8))[None, :]
        v0, v1, code = _load_24(vptr, mptr, k0, KP, BLOCK_N, BLOCK_K, EVEN_K)
        w = _expand_24(v0, v1, code, BLOCK_N, BLOCK_K)
    else:
        widx = (rn_c // R)[:, None] * (KP // CPW) + (k0 // CPW + tl.arange(0, W))[None, :]
        low = _tile_low_bits(rn_c, R, C, CPW)
        w = _decode_tile(vals_ptr, meta_ptr, widx, low, k0, KP, TPW, KV, CPW, W, EVEN_K, USE_POPC)
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
    rk = k0 + tl.arange(0, BLOCK_K)
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


# (block_m or 0 = "by M", block_n, block_k, num_warps, num_stages) candidates per regime. The GEMV lists
# were picked from sm_90 SASS compiled offline (no spills; ~4.8 instructions per weight for 2:4, ~12 for
# 4x4:8, whose larger blocks spill); none of them has been timed on a GPU yet.
_GEMV_24 = [
    (1, 32, 256, 4, 3), (1, 16, 256, 4, 3), (1, 32, 128, 4, 3), (1, 64, 128, 4, 3), (1, 32, 512, 8, 2), (1, 64, 256, 8, 3),
]
_GEMV_TILE = [
    (1, 64, 64, 4, 3), (1, 64, 128, 8, 3), (1, 128, 64, 8, 3), (1, 32, 128, 8, 3), (1, 32, 128, 4, 3), (1, 32, 64, 4, 3),
]
_SMALL_24 = [(0, 64, 128, 4, 3), (0, 32, 128, 4, 3), (0, 32, 256, 4, 3), (0, 64, 256, 4, 3), (0, 128, 128, 8, 3)]
_LARGE_24 = [
    (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3), (128, 256, 32, 8, 3),
]
# Tile decode holds more per weight (rank, gather offsets): smaller tiles, which compile without spills.
_SMALL_TILE = [(0, 64, 64, 4, 3), (0, 32, 64, 4, 3), (0, 32, 128, 4, 3), (0, 64, 64, 8, 3)]
_LARGE_TILE = [(128, 128, 32, 8, 3), (64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 64, 64, 4, 3), (64, 128, 32, 4, 3)]
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
    is24 = lay.fmt == "2:4"
    if m == 1:
        table = _GEMV_24 if is24 else _GEMV_TILE
    elif m <= 64:
        table = _SMALL_24 if is24 else _SMALL_TILE
    else:
        table = _LARGE_24 if is24 else _LARGE_TILE
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
        EVEN_K=k % cfg.block_k == 0, HAS_BIAS=bias is not None, USE_POPC=not INTERPRET,
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
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, USE_POPC=not INTERPRET,
    )  # fmt: skip
    return out
