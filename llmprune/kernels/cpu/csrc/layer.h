// One decoder layer of a Llama-family model for one token, in one op call: RMSNorm, the fused q/k/v
// projection, q/k norms (qwen3), rotary embedding, the KV-cache write, attention over the cache, o_proj,
// RMSNorm, the fused gate/up projection, SiLU-and-multiply, down_proj, both residual adds. A small
// model's decode step is ~50 torch ops a layer, each costing microseconds of dispatch next to
// microseconds of work; here the only thread fan-outs are the four matrix products and the attention heads.
// The arithmetic is transformers' (fp32 throughout); llmprune/lean.py is the same step in torch ops.
#pragma once
#include <cmath>
#include <type_traits>
#include <vector>

#include "linear.h"

namespace llmp {

constexpr int64_t DENSE_FLOAT = 3;  // a float weight [n, k] the kernels do not hold (an nn.Linear)

// A projection as the step sees it: a packed view or a dense float weight, and an fp32 bias.
struct Proj {
  bool dense = false;
  Packed w{};
  at::Tensor weight;
  Opt bias;
  int64_t n = 0, k = 0;
};

// Projection i of the list: tensors t[5i .. 5i+4] = values, meta, scale, zero, bias and geometry
// g[8i .. 8i+7] = kind, r, c, kv, n, k, bits, group_size.
inline Proj proj_at(const c10::List<std::optional<at::Tensor>>& t, at::IntArrayRef g, int64_t i) {
  auto get = [&](int64_t j) -> Opt { return t.get(5 * i + j); };
  const int64_t* q = g.data() + 8 * i;
  Proj p;
  p.n = q[4], p.k = q[5], p.bias = get(4);
  TORCH_CHECK(get(0).has_value(), "llmprune_cpu: projection ", i, " has no weight");
  TORCH_CHECK(!p.bias || (p.bias->scalar_type() == at::kFloat && p.bias->numel() == p.n && p.bias->is_contiguous()),
              "llmprune_cpu: a bias must be contiguous float32 [n]");
  if (q[0] == DENSE_FLOAT) {
    p.dense = true, p.weight = *get(0);
    TORCH_CHECK(p.weight.dim() == 2 && p.weight.size(0) == p.n && p.weight.size(1) == p.k, "llmprune_cpu: bad dense weight");
  } else {
    p.w = view(*get(0), get(1), get(2), get(3), q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]);
  }
  return p;
}

// y [n] = W x + bias for one token x [k].
inline void project(const Proj& p, const float* x, float* y, bool act_int8) {
  if (p.dense) {
    const at::Tensor xt = at::from_blob(const_cast<float*>(x), {p.k}, at::kFloat).to(p.weight.scalar_type());
    at::from_blob(y, {p.n}, at::kFloat).copy_(at::mv(p.weight, xt));
  } else {
    const int64_t ld = round_up(p.w.kp, 64);
    std::vector<float> xp(ld, 0.f);
    std::copy(x, x + p.k, xp.begin());
    if (act_int8 && p.w.bits)
      small_q8(p.w, xp.data(), 1, ld, y);
    else
      small(p.w, xp.data(), 1, ld, y);
  }
  if (p.bias) {
    const float* b = p.bias->data_ptr<float>();
    for (int64_t i = 0; i < p.n; ++i) y[i] += b[i];
  }
}

inline void rms_norm(const float* x, const float* w, int64_t n, float eps, float* y) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float r = 1.f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

// transformers' rotate-half rotary embedding of one head: x * cos + cat(-x2, x1) * sin.
inline void rope(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t h = d / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * cos[i] - b * sin[i];
    x[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

// q . k for one cached position: the vector dot product for an fp32 cache (d a multiple of 8).
template <class T>
inline float score(const float* q, const T* k, int64_t d) {
  if constexpr (std::is_same_v<T, float>) {
    if (d % 8 == 0) return dot(q, k, d);
  }
  float s = 0.f;
  for (int64_t i = 0; i < d; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}

// Softmax attention of nq query heads over positions 0..pos of the cache [nkv, L, d] (grouped heads).
template <class T>
void attend(const float* q, T* kc, T* vc, const float* k, const float* v, int64_t pos, int64_t len, int64_t nq,
            int64_t nkv, int64_t d, float* out) {
  for (int64_t h = 0; h < nkv; ++h)
    for (int64_t i = 0; i < d; ++i) kc[(h * len + pos) * d + i] = T(k[h * d + i]), vc[(h * len + pos) * d + i] = T(v[h * d + i]);
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  at::parallel_for(0, nq, 1, [&](int64_t b, int64_t e) {
    std::vector<float> p(pos + 1), acc(d);
    for (int64_t h = b; h < e; ++h) {
      const int64_t g = h / (nq / nkv);
      const float* qh = q + h * d;
      float top = -INFINITY, sum = 0.f;
      for (int64_t t = 0; t <= pos; ++t) {
        p[t] = score(qh, kc + (g * len + t) * d, d) * scale, top = std::max(top, p[t]);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t <= pos; ++t) {
        const float w = std::exp(p[t] - top);
        const T* vr = vc + (g * len + t) * d;
        sum += w;
        for (int64_t i = 0; i < d; ++i) acc[i] += w * static_cast<float>(vr[i]);
      }
      for (int64_t i = 0; i < d; ++i) out[h * d + i] = acc[i] / sum;
    }
  });
}

// The layer, in place on h [hidden] (fp32). Projections: qkv, o, gate_up, down.
inline void layer_step(at::Tensor& h, const at::Tensor& ln1, const at::Tensor& ln2, const Opt& q_norm,
                       const Opt& k_norm, const c10::List<std::optional<at::Tensor>>& weights, at::IntArrayRef geometry,
                       at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cos, const at::Tensor& sin, int64_t pos,
                       int64_t nq, int64_t nkv, double eps, bool act_int8) {
  const int64_t H = h.numel(), d = cos.numel(), len = k_cache.size(1);
  TORCH_CHECK(weights.size() == 20 && geometry.size() == 32, "llmprune_cpu: four projections expected");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&h, &ln1, &ln2, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "llmprune_cpu: norms, rotary rows and h are float32");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous() && k_cache.size(0) == nkv && k_cache.size(2) == d && pos >= 0 && pos < len &&
                  nq % nkv == 0 && sin.numel() == d,
              "llmprune_cpu: cache must be [kv_heads, length, head_dim] with pos inside it");
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "llmprune_cpu: q and k norms come together");
  for (const Opt* t : {&q_norm, &k_norm})
    TORCH_CHECK(!*t || ((*t)->scalar_type() == at::kFloat && (*t)->is_contiguous() && (*t)->numel() == d),
                "llmprune_cpu: q/k norms are float32 [head_dim]");
  const Proj qkv = proj_at(weights, geometry, 0), o = proj_at(weights, geometry, 1);
  const Proj gu = proj_at(weights, geometry, 2), down = proj_at(weights, geometry, 3);
  TORCH_CHECK(qkv.k == H && qkv.n == (nq + 2 * nkv) * d && o.k == nq * d && o.n == H && gu.k == H && gu.n % 2 == 0 &&
                  down.k == gu.n / 2 && down.n == H, "llmprune_cpu: projection shapes do not chain");
  float* x = h.data_ptr<float>();
  std::vector<float> a(H), y(qkv.n), att(nq * d), r(std::max(H, gu.n));
  rms_norm(x, ln1.data_ptr<float>(), H, eps, a.data());
  project(qkv, a.data(), y.data(), act_int8);
  float *q = y.data(), *k = q + nq * d, *v = k + nkv * d;
  for (int64_t i = 0; i < nq + nkv; ++i) {
    if (q_norm) rms_norm(q + i * d, (i < nq ? *q_norm : *k_norm).data_ptr<float>(), d, eps, q + i * d);
    rope(q + i * d, cos.data_ptr<float>(), sin.data_ptr<float>(), d);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "llmprune_cpu_attend", [&] {
    attend<scalar_t>(q, k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), k, v, pos, len, nq, nkv, d, att.data());
  });
  project(o, att.data(), r.data(), act_int8);
  for (int64_t i = 0; i < H; ++i) x[i] += r[i];
  rms_norm(x, ln2.data_ptr<float>(), H, eps, a.data());
  project(gu, a.data(), r.data(), act_int8);
  const int64_t I = gu.n / 2;
  for (int64_t i = 0; i < I; ++i) r[i] = r[i] / (1.f + std::exp(-r[i])) * r[I + i];
  std::vector<float> out(H);
  project(down, r.data(), out.data(), act_int8);
  for (int64_t i = 0; i < H; ++i) x[i] += out[i];
}

}  // namespace llmp
