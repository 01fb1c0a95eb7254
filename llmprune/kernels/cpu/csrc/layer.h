// The decoder layers of a Llama-family model for one token, in one call (torch.classes.llmprune_cpu.Decoder): RMSNorm, the fused q/k/v
// projection, q/k norms (qwen3), rotary embedding, the KV-cache write, attention over the cache, o_proj,
// RMSNorm, the fused gate/up projection, SiLU-and-multiply, down_proj, both residual adds. A small
// model's decode step is ~50 torch ops a layer, each costing microseconds of dispatch next to
// microseconds of work; here one call a token, and the only thread fan-outs are the four matrix products
// and the attention heads of each layer.
// The arithmetic is transformers' (fp32 throughout); llmprune/lean.py is the same step in torch ops.
#pragma once
#include <cmath>
#include <type_traits>
#include <vector>

#include <torch/custom_class.h>

#include "linear.h"

namespace llmp {

constexpr int64_t DENSE_FLOAT = 4;  // a float weight [n, k] the kernels do not hold (an nn.Linear)

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

// A layer's weights as the step reads them: norms (fp32) and its four projections, checked once.
struct Layer {
  const float *ln1, *ln2, *q_norm, *k_norm;  // q/k norms: null outside qwen3
  Proj qkv, o, gu, down;
};

// Layer l of the flat lists: norms[4l .. 4l+3] = ln1, ln2, q_norm, k_norm; projections 4l .. 4l+3 (proj_at).
inline Layer layer_at(const c10::List<std::optional<at::Tensor>>& norms, const c10::List<std::optional<at::Tensor>>& weights,
                      at::IntArrayRef geometry, int64_t l, int64_t H, int64_t nq, int64_t nkv, int64_t d) {
  auto norm = [&](int64_t j, int64_t size, bool need) -> const float* {
    const Opt t = norms.get(4 * l + j);
    TORCH_CHECK(t || !need, "llmprune_cpu: layer ", l, " lacks a norm");
    TORCH_CHECK(!t || (t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == size),
                "llmprune_cpu: norms are contiguous float32 of the hidden size (q/k norms: head_dim)");
    return t ? t->data_ptr<float>() : nullptr;
  };
  Layer L{norm(0, H, true), norm(1, H, true), norm(2, d, false), norm(3, d, false),
          proj_at(weights, geometry, 4 * l), proj_at(weights, geometry, 4 * l + 1),
          proj_at(weights, geometry, 4 * l + 2), proj_at(weights, geometry, 4 * l + 3)};
  TORCH_CHECK(!L.q_norm == !L.k_norm, "llmprune_cpu: q and k norms come together");
  TORCH_CHECK(L.qkv.k == H && L.qkv.n == (nq + 2 * nkv) * d && L.o.k == nq * d && L.o.n == H && L.gu.k == H &&
                  L.gu.n % 2 == 0 && L.down.k == L.gu.n / 2 && L.down.n == H,
              "llmprune_cpu: projection shapes do not chain");
  return L;
}

// One layer for one token, in place on x [H] (fp32); the cache of this layer is [nkv, len, d].
template <class T>
void run_layer(const Layer& L, float* x, int64_t H, T* kc, T* vc, int64_t len, const float* cos, const float* sin,
               int64_t pos, int64_t nq, int64_t nkv, int64_t d, float eps, bool act_int8) {
  std::vector<float> a(H), y(L.qkv.n), att(nq * d), r(std::max(H, L.gu.n)), out(H);
  rms_norm(x, L.ln1, H, eps, a.data());
  project(L.qkv, a.data(), y.data(), act_int8);
  float *q = y.data(), *k = q + nq * d, *v = k + nkv * d;
  for (int64_t i = 0; i < nq + nkv; ++i) {
    if (L.q_norm) rms_norm(q + i * d, i < nq ? L.q_norm : L.k_norm, d, eps, q + i * d);
    rope(q + i * d, cos, sin, d);
  }
  attend<T>(q, kc, vc, k, v, pos, len, nq, nkv, d, att.data());
  project(L.o, att.data(), r.data(), act_int8);
  for (int64_t i = 0; i < H; ++i) x[i] += r[i];
  rms_norm(x, L.ln2, H, eps, a.data());
  project(L.gu, a.data(), r.data(), act_int8);
  const int64_t I = L.gu.n / 2;
  for (int64_t i = 0; i < I; ++i) r[i] = r[i] / (1.f + std::exp(-r[i])) * r[I + i];
  project(L.down, r.data(), out.data(), act_int8);
  for (int64_t i = 0; i < H; ++i) x[i] += out[i];
}

// Every layer of a model, held once (weights, KV caches [layers, nkv, len, d], rotary tables [len, d]) and run
// for one token a call: torch.classes.llmprune_cpu.Decoder, the step of llmprune/lean.py.
struct Decoder : torch::CustomClassHolder {
  c10::List<std::optional<at::Tensor>> norms, weights;  // kept alive: the layers point into them
  at::Tensor k, v, cos, sin;
  std::vector<Layer> layers;
  int64_t hidden, nq, nkv, d;
  double eps;
  bool act_int8;

  Decoder(c10::List<std::optional<at::Tensor>> norms_, c10::List<std::optional<at::Tensor>> weights_,
          std::vector<int64_t> geometry, at::Tensor k_, at::Tensor v_, at::Tensor cos_, at::Tensor sin_,
          int64_t hidden_, int64_t nq_, int64_t nkv_, double eps_, bool act_int8_)
      : norms(std::move(norms_)), weights(std::move(weights_)), k(k_), v(v_), cos(cos_), sin(sin_), hidden(hidden_),
        nq(nq_), nkv(nkv_), d(cos_.size(-1)), eps(eps_), act_int8(act_int8_) {
    const int64_t n = k.dim() == 4 ? k.size(0) : -1;
    TORCH_CHECK(n > 0 && norms.size() == 4 * n && weights.size() == 20 * n && geometry.size() == 32 * n,
                "llmprune_cpu: per layer, 4 norms, 4 projections (5 tensors, 8 numbers each) and a cache");
    TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && v.sizes() == k.sizes() && k.size(1) == nkv && k.size(3) == d &&
                    nq % nkv == 0, "llmprune_cpu: caches must be contiguous [layers, kv_heads, length, head_dim]");
    TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                    sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) >= k.size(2),
                "llmprune_cpu: rotary tables must be float32 [length, head_dim]");
    for (int64_t l = 0; l < n; ++l) layers.push_back(layer_at(norms, weights, geometry, l, hidden, nq, nkv, d));
  }

  // Every layer for the token h [hidden] (fp32, in place) at position pos.
  void step(at::Tensor h, int64_t pos) {
    const int64_t len = k.size(2);
    TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.numel() == hidden && pos >= 0 && pos < len,
                "llmprune_cpu: h must be float32 [hidden] and pos inside the cache");
    const int64_t per = nkv * len * d;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "llmprune_cpu_step", [&] {
      for (size_t l = 0; l < layers.size(); ++l)
        run_layer<scalar_t>(layers[l], h.data_ptr<float>(), hidden, k.data_ptr<scalar_t>() + l * per,
                            v.data_ptr<scalar_t>() + l * per, len, cos.data_ptr<float>() + pos * d,
                            sin.data_ptr<float>() + pos * d, pos, nq, nkv, d, static_cast<float>(eps), act_int8);
    });
  }
};

}  // namespace llmp
