// The drivers behind the ops: a packed weight's view over its tensors (checked), the few-token row loops
// (float tokens, or int8-rounded ones for quantized weights) and the many-token BLAS path.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>
#include <vector>

#include "packed.h"
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LLMP_AVX2 1
#include "avx2.h"
#include "q8.h"
#include "spread.h"
#endif

namespace llmp {

using Opt = std::optional<at::Tensor>;
using RowFn = void (*)(const Packed&, int64_t, const float*, int64_t, float*, int64_t);

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

#ifndef LLMP_AVX2
inline float dot(const float* a, const float* b, int64_t k) {
  float s = 0.f;
  for (int64_t i = 0; i < k; ++i) s += a[i] * b[i];
  return s;
}
#endif

inline Packed view(const at::Tensor& values, const Opt& meta, const Opt& scale, const Opt& zero, int64_t kind, int64_t r,
                   int64_t c, int64_t kv, int64_t n, int64_t k, int64_t bits, int64_t gs) {
  TORCH_CHECK(kind >= NM24 && kind <= BITMASK, "llmprune_cpu: unknown layout kind ", kind);
  TORCH_CHECK(r > 0 && c > 0 && 32 % (r * c) == 0 && n % r == 0 && k > 0, "llmprune_cpu: bad tile geometry");
  TORCH_CHECK(bits == 0 || bits == 4 || bits == 8, "llmprune_cpu: bits must be 0, 4 or 8");
  TORCH_CHECK(values.device().is_cpu() && values.is_contiguous() && values.dim() == 2 && values.size(0) == n / r,
              "llmprune_cpu: values must be a contiguous CPU tensor with one row per tile row");
  const auto vt = values.scalar_type();
  TORCH_CHECK(bits ? vt == at::kByte : (vt == at::kFloat || vt == at::kHalf || vt == at::kBFloat16),
              "llmprune_cpu: values must be float32/float16/bfloat16, or uint8 codes when quantized");
  Packed w{};
  w.kind = kind, w.r = r, w.c = c, w.kv = kv, w.n = n, w.k = k, w.bits = bits, w.vdtype = vt;
  w.values = static_cast<const uint8_t*>(values.data_ptr());
  w.vstride = values.size(1) * values.element_size();
  int64_t count = k;  // values a tile row holds
  if (kind == DENSE) {
    TORCH_CHECK(bits != 0 && r == 1, "llmprune_cpu: the dense layout is for int4/int8 codes");
    w.kp = round_up(k, 32);
  } else {
    TORCH_CHECK(meta && meta->scalar_type() == at::kInt && meta->is_contiguous() && meta->dim() == 2 &&
                    meta->size(0) == n / r, "llmprune_cpu: meta must be contiguous int32 words, a row per tile row");
    TORCH_CHECK(kind != NM24 || (r == 1 && c == 4 && kv == 2), "llmprune_cpu: 2:4 is 1x4 keeping 2");
    TORCH_CHECK(kind != BITMASK || (r == 1 && c == 32 && bits != 8 && kv >= 0),
                "llmprune_cpu: the bitmask is 1x32 words of float values or int4 codes");
    w.meta = meta->data_ptr<int32_t>(), w.mstride = meta->size(1);
    w.kp = w.mstride * w.tiles_per_word() * c;
    TORCH_CHECK(w.kp >= k, "llmprune_cpu: meta covers fewer columns than k");
    count = kind == BITMASK ? kv + 32 : w.kp / c * kv;
  }
  // a bitmask's int4 row: 4 bytes past its slack, for 8-byte loads of 8 codes from any nibble
  const int64_t need = bits == 0 ? count * values.element_size() : bits == 8 ? count : (count + 1) / 2 + (kind == BITMASK) * 4;
  TORCH_CHECK(w.vstride >= need, "llmprune_cpu: values hold ", w.vstride, " bytes a tile row, need ", need);
  if (bits) {
    TORCH_CHECK(scale && scale->scalar_type() == at::kHalf && scale->is_contiguous() && scale->dim() == 2 &&
                    scale->size(0) == n && gs > 0 && scale->size(1) == (k + gs - 1) / gs,
                "llmprune_cpu: scale must be contiguous float16 [n, ceil(k / group_size)]");
    w.scale = scale->data_ptr<at::Half>(), w.groups = scale->size(1), w.gs = gs;
    if (zero) {
      TORCH_CHECK(zero->scalar_type() == at::kByte && zero->is_contiguous() && zero->sizes() == scale->sizes(),
                  "llmprune_cpu: zero must be contiguous uint8 shaped like scale");
      w.zero = zero->data_ptr<uint8_t>();
    }
  }
  return w;
}

template <int MB>
RowFn pick(const Packed& w) {
#ifdef LLMP_AVX2
  const bool whole_groups = w.bits == 0 || w.groups == 1 || w.gs % 32 == 0;
  const bool f32 = w.vdtype == at::kFloat, f16 = w.vdtype == at::kHalf;
  if (w.kind == NM24 && whole_groups) {
    if (w.bits) return w.bits == 4 ? nm24_row<Q4, MB> : nm24_row<Q8, MB>;
    return f32 ? nm24_row<F32, MB> : f16 ? nm24_row<F16, MB> : nm24_bf16_row<MB>;
  }
  if (w.kind == TILE && w.r == 4 && w.c == 4 && w.kv == 8 && whole_groups) {
    if (w.bits) return w.bits == 4 ? tile44_row<Q4, MB> : tile44_row<Q8, MB>;
    return f32 ? tile44_row<F32, MB> : f16 ? tile44_row<F16, MB> : tile44_bf16_row<MB>;
  }
  if (w.kind == DENSE && whole_groups) return w.bits == 4 ? dense_q_row<4, MB> : dense_q_row<8, MB>;
  if (w.kind == BITMASK && whole_groups) {
    if (w.bits) return bitmask_row<SpreadQ4, MB>;
    return f32 ? bitmask_row<SpreadF32, MB> : f16 ? bitmask_row<SpreadF16, MB> : bitmask_row<SpreadBF16, MB>;
  }
#endif
  return nullptr;
}

// Few tokens: every tile row once, its weights read from memory once for all M tokens (4 at a time).
inline void small(const Packed& w, const float* x, int64_t M, int64_t ld, float* y) {
  const RowFn f4 = pick<4>(w), f2 = pick<2>(w), f1 = pick<1>(w);
  const int64_t N = w.n, grain = std::max<int64_t>(1, 16384 / (w.r * ld));
  at::parallel_for(0, w.tile_rows(), grain, [&](int64_t b, int64_t e) {
    if (!f1) {  // scalar path: decode the tile row, then dot products
      std::vector<float> buf(w.r * ld);
      for (int64_t tr = b; tr < e; ++tr) {
        decode_tile_row(w, tr, buf.data(), ld);
        for (int64_t i = 0; i < w.r; ++i)
          for (int64_t m = 0; m < M; ++m) y[m * N + tr * w.r + i] = dot(x + m * ld, buf.data() + i * ld, ld);
      }
      return;
    }
    for (int64_t tr = b; tr < e; ++tr) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) f4(w, tr, x + m * ld, ld, y + m * N + tr * w.r, N);
      for (; m + 2 <= M; m += 2) f2(w, tr, x + m * ld, ld, y + m * N + tr * w.r, N);
      for (; m < M; ++m) f1(w, tr, x + m * ld, ld, y + m * N + tr * w.r, N);
    }
  });
}

#ifdef LLMP_AVX2
using Q8Fn = void (*)(const Packed&, int64_t, const XQ&, float*, int64_t);

// The int8-activation kernel for w (q8.h), or null: int4 codes, or int8 codes on a symmetric grid; 2:4 needs
// whole 64-column steps and groups.
template <int MB>
Q8Fn pick_q8(const Packed& w) {
  if (w.bits == 8 && w.zero) return nullptr;
  if (w.kind == DENSE && (w.groups == 1 || w.gs % 32 == 0)) return w.bits == 4 ? dense_q8_row<4, MB> : dense_q8_row<8, MB>;
  if (w.kind == NM24 && w.kp % 64 == 0 && (w.groups == 1 || w.gs % 64 == 0))
    return w.bits == 4 ? nm24_q8_row<4, MB> : nm24_q8_row<8, MB>;
  return nullptr;
}
#endif

// Few tokens, quantized weights, tokens rounded to int8 blocks (act_int8): the integer kernels where one
// fits w, else the float path on the rounded tokens (the same products, so the result never depends on
// which ran).
inline void small_q8(const Packed& w, const float* x, int64_t M, int64_t ld, float* y) {
  std::vector<int8_t> q(M * ld);
  std::vector<float> s(M * ld / 32), pat(M * ld / 64 * 8);
  quantize_rows(x, M, ld, q.data(), s.data(), pat.data());
#ifdef LLMP_AVX2
  const Q8Fn f4 = pick_q8<4>(w), f2 = pick_q8<2>(w), f1 = pick_q8<1>(w);
  if (f1) {
    if (w.kind == NM24) {  // the 2:4 kernel reads the tokens in its lane order
      std::vector<int8_t> natural(q);
      lane_order(natural.data(), M, ld, q.data());
    }
    const int64_t N = w.n, grain = std::max<int64_t>(1, 16384 / ld);
    auto tok = [&](int64_t m) { return XQ{q.data() + m * ld, s.data() + m * ld / 32, pat.data() + m * ld / 64 * 8, ld}; };
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) f4(w, n, tok(m), y + m * N + n, N);
        for (; m + 2 <= M; m += 2) f2(w, n, tok(m), y + m * N + n, N);
        for (; m < M; ++m) f1(w, n, tok(m), y + m * N + n, N);
      }
    });
    return;
  }
#endif
  std::vector<float> xd(M * ld);
  for (int64_t i = 0; i < M * ld; ++i) xd[i] = q[i] * s[i / 32];
  small(w, xd.data(), M, ld, y);
}

// Tile rows t0 .. t1 as dense fp32 rows, ld apart: the scalar decoder, or with `fast` the vector one where the
// layout has it (int4 / int8 codes, spread.h).
inline void decode_rows(const Packed& w, int64_t t0, int64_t t1, float* out, int64_t ld, bool fast = false) {
  at::parallel_for(t0, t1, 1, [&](int64_t b, int64_t e) {
    for (int64_t tr = b; tr < e; ++tr) {
#ifdef LLMP_AVX2
      float* rows = out + (tr - t0) * w.r * ld;
      if (fast && decode_q(w, tr, rows, ld)) {  // it writes kp columns; the BLAS reads ld
        for (int64_t i = 0; i < w.r; ++i) std::fill(rows + i * ld + w.kp, rows + (i + 1) * ld, 0.f);
        continue;
      }
#endif
      decode_tile_row(w, tr, out + (tr - t0) * w.r * ld, ld);
    }
  });
}

// Many tokens: decode ~4 MB of rows at a time and hand them to the BLAS in x's dtype (the GEMM dense x's
// dtype gets: bf16 runs oneDNN's bf16 kernels where the CPU has them); no dense copy is kept. 2:4, 4x4:8 and
// bitmask rows whose 16-bit values are x's dtype are shuffled straight into a 16-bit buffer (spread.h).
inline void prefill(const Packed& w, const at::Tensor& xf, at::ScalarType dtype, at::Tensor& y, int64_t ld) {
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 20) / (w.r * ld));
  const at::Tensor xd = xf.to(dtype);
#ifdef LLMP_AVX2
  if (dtype == w.vdtype && has_decode16(w)) {
    // 4 MB, up to 32 MB as M grows: one GEMM of a whole 7B MLP weight beats 22 of 512 rows by ~20 %
    const int64_t bytes = std::clamp<int64_t>(xf.size(0) << 17, int64_t{1} << 22, int64_t{1} << 25);
    const int64_t chunk = std::max<int64_t>(1, bytes / (2 * w.r * ld));
    at::Tensor buf = at::zeros({chunk * w.r, ld}, xd.options());  // columns past kp stay zero
    auto* out = static_cast<uint16_t*>(buf.data_ptr());
    for (int64_t t0 = 0; t0 < w.tile_rows(); t0 += chunk) {
      const int64_t t1 = std::min(w.tile_rows(), t0 + chunk), rows = (t1 - t0) * w.r;
      at::parallel_for(t0, t1, 16, [&](int64_t b, int64_t e) {
        for (int64_t tr = b; tr < e; ++tr) decode16_row(w, tr, out + (tr - t0) * w.r * ld, ld);
      });
      y.narrow(1, t0 * w.r, rows).copy_(at::mm(xd, buf.narrow(0, 0, rows).t()));
    }
    return;
  }
#endif
  at::Tensor buf = at::empty({chunk * w.r, ld}, xf.options());
  for (int64_t t0 = 0; t0 < w.tile_rows(); t0 += chunk) {
    const int64_t t1 = std::min(w.tile_rows(), t0 + chunk), rows = (t1 - t0) * w.r;
    decode_rows(w, t0, t1, buf.data_ptr<float>(), ld, true);
    y.narrow(1, t0 * w.r, rows).copy_(at::mm(xd, buf.narrow(0, 0, rows).to(dtype).t()));
  }
}

}  // namespace llmp
