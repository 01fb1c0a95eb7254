// A packed pruned weight as the CPU kernels see it, and the scalar decoder every layout falls back to.
//
// Layouts (llmprune/kernels/formats.py and int4.py): a weight [n, k] in tiles of r x c keeping kv each;
// values (or uint8 codes) tile by tile along a tile row, int32 meta words holding 32 / (r*c) tile codes.
//   NM24  (r=1, c=4, kv=2): code = i0 | i1 << 2, values in column order.
//   TILE  (any r x c dividing 32 bits): code = occupancy bits (row*c + col), values in bit order.
//   DENSE (r=1, no meta): every column stored (int4 / int8 codes of an unpruned weight).
//   BITMASK (r=1, c=32, unstructured): one keep bit a column, 32 a word; a row's kept values in column order
//     from the row's start, kv = the most any row keeps (the row stride holds 32 more: vector loads' slack).
// Quantized values (bits 4 or 8) are unsigned codes u, decoded as (u - zero) * scale per row and group of
// gs input columns; int4 puts two codes a byte, the first in the low nibble.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace llmp {

// Weights stream from memory once per token: the hardware prefetcher alone left the row kernels at ~13 GB/s
// from DRAM against oneDNN's ~21 (measured with working sets past the L3); asking for the line 4 KB ahead of
// the one in use brought 2:4 to ~17 and 2:4 + int4 from ~5 to ~12 (4.9x less time: it is compute-light).
constexpr int64_t PREFETCH = 4096;
inline void prefetch(const void* p) { __builtin_prefetch(static_cast<const char*>(p) + PREFETCH, 0, 3); }

enum Kind : int64_t { NM24 = 0, TILE = 1, DENSE = 2, BITMASK = 3 };

struct Packed {
  int64_t kind, r, c, kv, n, k, kp;  // kp: K padded to whole meta words (DENSE: to 32 columns)
  int64_t bits;                      // 0: float values of vdtype; 4 or 8: codes
  at::ScalarType vdtype;
  const uint8_t* values;             // values or codes, tile row tr at values + tr * vstride bytes
  int64_t vstride;
  const int32_t* meta;               // tile row tr at meta + tr * mstride words
  int64_t mstride;
  const at::Half* scale;             // [n, groups] (quantized only)
  const uint8_t* zero;               // [n, groups] or null: symmetric, zero = 2^(bits-1)
  int64_t groups, gs;

  int64_t tile_rows() const { return n / r; }
  int64_t tiles_per_word() const { return 32 / (r * c); }
  const uint8_t* vrow(int64_t tr) const { return values + tr * vstride; }
  const int32_t* mrow(int64_t tr) const { return meta + tr * mstride; }
  int64_t group_of(int64_t col) const { return std::min(col / gs, groups - 1); }  // padded columns: last
  float scale_at(int64_t row, int64_t g) const { return static_cast<float>(scale[row * groups + g]); }
  float zero_at(int64_t row, int64_t g) const {
    return zero ? static_cast<float>(zero[row * groups + g]) : static_cast<float>(1 << (bits - 1));
  }

  // Value j of tile row tr, belonging to weight row `row` and column `col` (for its group).
  float value(int64_t tr, int64_t j, int64_t row, int64_t col) const {
    const uint8_t* v = vrow(tr);
    if (bits == 0) {
      switch (vdtype) {
        case at::kFloat: return reinterpret_cast<const float*>(v)[j];
        case at::kHalf: return static_cast<float>(reinterpret_cast<const at::Half*>(v)[j]);
        default: return static_cast<float>(reinterpret_cast<const at::BFloat16*>(v)[j]);
      }
    }
    const int u = bits == 8 ? v[j] : (v[j >> 1] >> ((j & 1) * 4)) & 15;
    const int64_t g = group_of(col);
    return (static_cast<float>(u) - zero_at(row, g)) * scale_at(row, g);
  }
};

// Value j of a float tile row, typed (the decoder's inner loop has no switch).
template <class T>
inline float as_float(const uint8_t* v, int64_t j) {
  return static_cast<float>(reinterpret_cast<const T*>(v)[j]);
}

// Scalar reference: tile row tr as r dense rows of floats, ld apart (ld >= kp; padding columns decode to 0).
// `val(j, row, col)` gives value j of the tile row, which sits at weight row `row`, column `col`.
template <class Val>
inline void scatter_tile_row(const Packed& w, int64_t tr, float* out, int64_t ld, const Val& val) {
  std::memset(out, 0, sizeof(float) * w.r * ld);
  if (w.kind == DENSE) {
    for (int64_t col = 0; col < w.k; ++col) out[col] = val(col, tr, col);
    return;
  }
  if (w.kind == BITMASK) {  // a corrupt mask keeping more than kv stops at kv: never a read past the row
    const int32_t* meta = w.mrow(tr);
    int64_t j = 0;
    for (int64_t wi = 0; wi < w.kp / 32; ++wi)
      for (uint32_t rest = static_cast<uint32_t>(meta[wi]); rest && j < w.kv; rest &= rest - 1) {
        const int64_t col = wi * 32 + __builtin_ctz(rest);
        out[col] = val(j++, tr, col);
      }
    return;
  }
  const int64_t rc = w.r * w.c, tpw = w.tiles_per_word(), words = w.kp / (w.c * tpw);
  const uint32_t bits = rc == 32 ? 0xFFFFFFFFu : (1u << rc) - 1;
  const int32_t* meta = w.mrow(tr);
  for (int64_t wi = 0; wi < words; ++wi) {
    const uint32_t word = static_cast<uint32_t>(meta[wi]);
    for (int64_t t = 0; t < tpw; ++t) {
      const int64_t tile = wi * tpw + t;
      const uint32_t code = (word >> (t * rc)) & bits;
      int64_t j = tile * w.kv;
      if (w.kind == NM24) {
        const int64_t col0 = tile * 4, i0 = code & 3, i1 = code >> 2;
        out[col0 + i0] = val(j, tr, col0 + i0);
        out[col0 + i1] = val(j + 1, tr, col0 + i1);
        continue;
      }
      for (uint32_t rest = code; rest; rest &= rest - 1) {
        const int64_t b = __builtin_ctz(rest), row = b / w.c, col = tile * w.c + b % w.c;
        out[row * ld + col] = val(j++, tr * w.r + row, col);
      }
    }
  }
}

inline void decode_tile_row(const Packed& w, int64_t tr, float* out, int64_t ld) {
  const uint8_t* v = w.vrow(tr);
  if (w.bits) return scatter_tile_row(w, tr, out, ld, [&](int64_t j, int64_t row, int64_t col) {
    return w.value(tr, j, row, col);
  });
  switch (w.vdtype) {
    case at::kFloat: return scatter_tile_row(w, tr, out, ld, [v](int64_t j, int64_t, int64_t) { return as_float<float>(v, j); });
    case at::kHalf: return scatter_tile_row(w, tr, out, ld, [v](int64_t j, int64_t, int64_t) { return as_float<at::Half>(v, j); });
    default: return scatter_tile_row(w, tr, out, ld, [v](int64_t j, int64_t, int64_t) { return as_float<at::BFloat16>(v, j); });
  }
}

// Rounds tokens x [M, ld] (fp32, ld a multiple of 64) to int8 blocks of 32 columns, scale max|x| / 127 a block
// (s [M, ld / 32]); pat: per token and 64-column chunk, the 2:4 int8 kernel's lane scales (A x 4, B x 4).
inline void quantize_rows(const float* x, int64_t M, int64_t ld, int8_t* q, float* s, float* pat) {
  const int64_t blocks = ld / 32;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + m * ld + b * 32;
      float amax = 0.f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
      for (int i = 0; i < 32; ++i) q[m * ld + b * 32 + i] = static_cast<int8_t>(std::nearbyint(xb[i] * id));
      s[m * blocks + b] = d;
    }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < ld / 64; ++c) {
      const float a = s[m * blocks + 2 * c], b = s[m * blocks + 2 * c + 1];
      const float lanes[8] = {a, a, a, a, b, b, b, b};
      std::memcpy(pat + (m * (ld / 64) + c) * 8, lanes, sizeof lanes);
    }
}

}  // namespace llmp
