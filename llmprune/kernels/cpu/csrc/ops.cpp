// Torch ops of llmprune's CPU kernels (namespace llmprune_cpu):
//   linear(x, packed weight..., bias, small_m, act_int8) -> x @ W.T + bias; small M through the row kernels
//     (int4 / int8 codes against int8-rounded tokens when act_int8, q8.h), large M (prefill) by decoding a
//     few MB of rows at a time into the BLAS;
//   decode(packed weight...) -> W (fp32), the scalar reference; isa() -> "avx2" | "scalar";
//   threads_used(n) -> how many of torch's intra-op threads a parallel_for of n items ran on;
//   class Decoder(norms, weights, geometry, caches, rotary tables, ...).step(h, pos): every decoder layer for
//     one token, in place (layer.h).
#include <torch/library.h>

#include <atomic>
#include <string>

#include "layer.h"
#include "linear.h"

namespace llmp {
namespace {

at::Tensor linear(const at::Tensor& x, const at::Tensor& values, const Opt& meta, const Opt& scale, const Opt& zero,
                  const Opt& bias, int64_t kind, int64_t r, int64_t c, int64_t kv, int64_t n, int64_t k, int64_t bits,
                  int64_t gs, int64_t small_m, bool act_int8) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.device().is_cpu(), "llmprune_cpu: x must be [M, ", k, "] on the CPU");
  const Packed w = view(values, meta, scale, zero, kind, r, c, kv, n, k, bits, gs);
  const int64_t M = x.size(0), ld = round_up(w.kp, 64);
  at::Tensor xf = at::zeros({M, ld}, x.options().dtype(at::kFloat));
  xf.narrow(1, 0, k).copy_(x);
  at::Tensor y = at::empty({M, n}, xf.options());
  if (M > small_m)
    prefill(w, xf, x.scalar_type(), y, ld);
  else if (M > 0 && act_int8 && w.bits)
    small_q8(w, xf.data_ptr<float>(), M, ld, y.data_ptr<float>());
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
        "int c, int kv, int n, int k, int bits, int group_size, int small_m, bool act_int8) -> Tensor");
  m.def("decode(Tensor values, Tensor? meta, Tensor? scale, Tensor? zero, int kind, int r, int c, int kv, int n, "
        "int k, int bits, int group_size) -> Tensor");
  m.class_<llmp::Decoder>("Decoder")
      .def(torch::init<c10::List<std::optional<at::Tensor>>, c10::List<std::optional<at::Tensor>>, std::vector<int64_t>,
                       at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t, int64_t, double, bool>())
      .def("step", &llmp::Decoder::step);
  m.def("isa() -> str", &llmp::isa);
  m.def("threads_used(int n) -> int", &llmp::threads_used);
}

TORCH_LIBRARY_IMPL(llmprune_cpu, CPU, m) {
  m.impl("linear", &llmp::linear);
  m.impl("decode", &llmp::decode);
}
