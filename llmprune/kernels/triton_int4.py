"""The Triton decode kernel of :mod:`kernels.int4` (imported only when triton is).

Each program owns ``BLOCK_N`` output rows and walks K in ``BLOCK_K`` steps, reading per step the rows'
packed codes (contiguous), the 2:4 words (sparse) and the group scales, dequantising in registers and
accumulating in fp32. 2:4 expands each group's two values by two compares, as the fp16 2:4 kernel does;
the expansion costs ALU, not bytes, and decode is bound by the bytes. ``BLOCK_M == 1`` is the GEMV
(a multiply and a row sum); more tokens go through ``tl.dot``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int4 import Int4Weight
from .triton_kernels import _expand_24


@triton.jit
def _int4_mm_kernel(
    x_ptr, q_ptr, meta_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, QW, MW, NG, GS, stride_xm,
    SPARSE: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn_c = tl.minimum(rn, N - 1)
    rm_c = tl.minimum(rm, M - 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm_c[:, None] * stride_xm + rk[None, :], mask=(rk < K)[None, :], other=0.0)
        if SPARSE:
            G: tl.constexpr = BLOCK_K // 4
            rg = k0 // 4 + tl.arange(0, G)
            byte = tl.load(q_ptr + rn_c[:, None] * QW + rg[None, :], mask=(rg < QW)[None, :], other=0)
            rw = k0 // 32 + tl.arange(0, G // 8)
            word = tl.load(meta_ptr + rn_c[:, None] * MW + rw[None, :], mask=(rw < MW)[None, :], other=0)
            code = tl.reshape((word[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 15, (BLOCK_N, G))
            sidx = tl.minimum((4 * rg) // GS, NG - 1)
            scale = tl.load(s_ptr + rn_c[:, None] * NG + sidx[None, :]).to(tl.float32)
            if HAS_ZERO:
                zero = tl.load(z_ptr + rn_c[:, None] * NG + sidx[None, :]).to(tl.float32)
            else:
                zero = 8.0
            v0 = ((byte & 15).to(tl.float32) - zero) * scale
            v1 = ((byte >> 4).to(tl.float32) - zero) * scale
            w = _expand_24(v0, v1, code, BLOCK_N, BLOCK_K)
        else:
            H: tl.constexpr = BLOCK_K // 2
            rb = k0 // 2 + tl.arange(0, H)
            byte = tl.load(q_ptr + rn_c[:, None] * QW + rb[None, :], mask=(rb < QW)[None, :], other=0)
            u = tl.reshape(tl.join(byte & 15, byte >> 4), (BLOCK_N, BLOCK_K)).to(tl.float32)
            sidx = tl.minimum(rk // GS, NG - 1)
            scale = tl.load(s_ptr + rn_c[:, None] * NG + sidx[None, :]).to(tl.float32)
            if HAS_ZERO:
                zero = tl.load(z_ptr + rn_c[:, None] * NG + sidx[None, :]).to(tl.float32)
            else:
                zero = 8.0
            w = (u - zero) * scale
        if BLOCK_M == 1:
            acc += tl.sum(w * x.to(tl.float32), axis=1)[None, :]
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def launch(x: torch.Tensor, w: Int4Weight, block_n: int, block_k: int) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    block_m = 1 if m == 1 else 16
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _int4_mm_kernel[grid](
        x, w.codes, w.meta if w.sparse else w.codes, w.scale, w.zero if w.zero is not None else w.scale, y,
        m, n, k, w.codes.shape[1], w.meta.shape[1] if w.sparse else 1, w.scale.shape[1], w.group_size, x.stride(0),
        SPARSE=w.sparse, HAS_ZERO=w.zero is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return y
