// Torch ops of llmprune's CPU kernels (namespace llmprune_cpu):
//   linear(x, packed weight..., bias) -> x @ W.T + bias; small M through the row kernels, large M (prefill)
//     by decoding a few MB of rows at a time into the BLAS;
//   decode(packed weight...) -> W (fp32), the scalar reference; isa() -> "avx2" | "scalar";
//   threads_used(n) -> how many of torch's intra-op threads a parallel_for of n items ran on.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <string>
#include <vector>

#include "packed.h"
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LLMP_AVX2 1
#include "avx2.h"
#endif

namespace llmp {
namespace {

using Opt = std::optional<at::Tensor>;
using RowFn = void (*)(const Packed&, int64_t, const float*, int64_t, float*, int64_t);

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

#ifndef LLMP_AVX2
float dot(const float* a, const float* b, int64_t k) {
  float s = 0.f;
  for (int64_t i = 0; i < k; ++i) s += a[i] * b[i];
  return s;
}
#endif

Packed view(const at::Tensor& values, const Opt& meta, const Opt& scale, const Opt& zero, int64_t kind, int64_t r,
            int64_t c, int64_t kv, int64_t n, int64_t k, int64_t bits, int64_t gs) {
  TORCH_CHECK(kind >= NM24 && kind <= DENSE, "llmprune_cpu: unknown layout kind ", kind);
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
    w.meta = meta->data_ptr<int32_t>(), w.mstride = meta->size(1);
    w.kp = w.mstride * w.tiles_per_word() * c;
    TORCH_CHECK(w.kp >= k, "llmprune_cpu: meta covers fewer columns than k");
    count = w.kp / c * kv;
  }
  const int64_t need = bits == 0 ? count * values.element_size() : bits == 8 ? count : (count + 1) / 2;
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
    return f32 ? nm24_row<F32, MB> : f16 ? nm24_row<F16, MB> : nm24_row<BF16, MB>;
  }
  if (w.kind == TILE && w.r == 4 && w.c == 4 && w.kv == 8 && w.bits == 0)
    return f32 ? tile44_row<F32, MB> : f16 ? tile44_row<F16, MB> : tile44_row<BF16, MB>;
  if (w.kind == DENSE && whole_groups) return w.bits == 4 ? dense_q_row<4, MB> : dense_q_row<8, MB>;
#endif
  return nullptr;
}

// Few tokens: every tile row once, its weights read from memory once for all M tokens (4 at a time).
void small(const Packed& w, const float* x, int64_t M, int64_t ld, float* y) {
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

void decode_rows(const Packed& w, int64_t t0, int64_t t1, float* out, int64_t ld) {
  at::parallel_for(t0, t1, 1, [&](int64_t b, int64_t e) {
    for (int64_t tr = b; tr < e; ++tr) decode_tile_row(w, tr, out + (tr - t0) * w.r * ld, ld);
  });
}

// Many tokens: decode ~4 MB of rows at a time and hand them to the BLAS in x's dtype (the GEMM dense x's
// dtype gets: bf16 runs oneDNN's bf16 kernels where the CPU has them); no dense copy is kept.
void prefill(const Packed& w, const at::Tensor& xf, at::ScalarType dtype, at::Tensor& y, int64_t ld) {
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 20) / (w.r * ld));
  const at::Tensor xd = xf.to(dtype);
  at::Tensor buf = at::empty({chunk * w.r, ld}, xf.options());
  for (int64_t t0 = 0; t0 < w.tile_rows(); t0 += chunk) {
    const int64_t t1 = std::min(w.tile_rows(), t0 + chunk), rows = (t1 - t0) * w.r;
    decode_rows(w, t0, t1, buf.data_ptr<float>(), ld);
    y.narrow(1, t0 * w.r, rows).copy_(at::mm(xd, buf.narrow(0, 0, rows).to(dtype).t()));
  }
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& values, const Opt& meta, const Opt& scale, const Opt& zero,
                  const Opt& bias, int64_t kind, int64_t r, int64_t c, int64_t kv, int64_t n, int64_t k, int64_t bits,
                  int64_t gs, int64_t small_m) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.device().is_cpu(), "llmprune_cpu: x must be [M, ", k, "] on the CPU");
  const Packed w = view(values, meta, scale, zero, kind, r, c, kv, n, k, bits, gs);
  const int64_t M = x.size(0), ld = round_up(w.kp, 32);
  at::Tensor xf = at::zeros({M, ld}, x.options().dtype(at::kFloat));
  xf.narrow(1, 0, k).copy_(x);
  at::Tensor y = at::empty({M, n}, xf.options());
  if (M > small_m)
    prefill(w, xf, x.scalar_type(), y, ld);
  else if (M > 0)
    small(w, xf.data_ptr<float>(), M, ld, y.data_ptr<float>());
  if (bias) y.add_(*bias);
  return y.to(x.scalar_type());
}

at::Tensor decode(const at::Tensor& values, const Opt& meta, const Opt& scale, const Opt& zero, int64_t kind, int64_t r,
                  int64_t c, int64_t kv, int64_t n, int64_t k, int64_t bits, int64_t gs) {
  const Packed w = view(values, meta, scale, zero, kind, r, c, kv, n, k, bits, gs);
  at::Tensor out = at::empty({n, w.kp}, values.options().dtype(at::kFloat));
  decode_rows(w, 0, w.tile_rows(), out.data_ptr<float>(), w.kp);
  return out.narrow(1, 0, k).contiguous();
}

std::string isa() {
#ifdef LLMP_AVX2
  return "avx2";
#else
  return "scalar";
#endif
}

int64_t threads_used(int64_t n) {
  std::atomic<int64_t> most{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    int64_t t = at::get_thread_num() + 1, seen = most.load();
    while (t > seen && !most.compare_exchange_weak(seen, t)) {
    }
  });
  return most.load();
}

}  // namespace
}  // namespace llmp

TORCH_LIBRARY(llmprune_cpu, m) {
  m.def("linear(Tensor x, Tensor values, Tensor? meta, Tensor? scale, Tensor? zero, Tensor? bias, int kind, int r, "
        "int c, int kv, int n, int k, int bits, int group_size, int small_m) -> Tensor");
  m.def("decode(Tensor values, Tensor? meta, Tensor? scale, Tensor? zero, int kind, int r, int c, int kv, int n, "
        "int k, int bits, int group_size) -> Tensor");
  m.def("isa() -> str", &llmp::isa);
  m.def("threads_used(int n) -> int", &llmp::threads_used);
}

TORCH_LIBRARY_IMPL(llmprune_cpu, CPU, m) {
  m.impl("linear", &llmp::linear);
  m.impl("decode", &llmp::decode);
}
