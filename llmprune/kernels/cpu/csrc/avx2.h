// AVX2 + FMA + F16C row kernels: one tile row of a packed weight against MB tokens of x (fp32, padded to kp).
// Each is the vector form of decode_tile_row (packed.h) followed by dot products; ops.cpp picks one or falls
// back to that scalar path.
#pragma once
#include <immintrin.h>

#include <algorithm>

#include "packed.h"

namespace llmp {

struct Luts {
  alignas(32) int32_t nm24[256][8];     // byte of 2:4 meta (2 groups) -> lanes of x to gather, twice
  alignas(32) int32_t rank_lo[256][8];  // tile code low byte: bit j -> index of its value
  alignas(32) int32_t rank_hi[256][8];  // high byte of a 16-bit tile keeping 8: counted from the top
  alignas(32) int32_t mask[256][8];     // bit j set -> all ones
  alignas(32) int8_t spread16[256][32]; // bitmask byte -> pshufb of 8 16-bit values to their columns (0x80: zero); 16 used
  alignas(32) int8_t spread_bf[256][32];// the same to the high halves of 8 fp32 lanes (a bf16 is a truncated fp32)
  alignas(16) int8_t spread24[256][16]; // byte of 2:4 meta -> pshufb of its 4 16-bit values to their 8 columns
  alignas(16) int8_t spread_hi[256][16];// high byte of a 4x4 tile keeping 8: spread16 counted from 8 - popcount
  alignas(32) int8_t spread_bf_hi[256][32];  // the same as spread_bf
  alignas(32) int8_t spread24_bf[2][256][32];  // spread24 to the high halves of 8 fp32 lanes; [1]: values 4-7
  uint8_t keep24[256];                  // byte of 2:4 meta -> its 8 columns' keep bits (for rank_lo / mask)
  Luts() {
    for (int b = 0; b < 256; ++b) {
      const int ga = b & 15, gb = b >> 4, pc = __builtin_popcount(b);
      const int gather[4] = {ga & 3, ga >> 2, 4 + (gb & 3), 4 + (gb >> 2)};
      keep24[b] = static_cast<uint8_t>((1 << gather[0]) | (1 << gather[1]) | (1 << gather[2]) | (1 << gather[3]));
      for (int j = 0; j < 8; ++j) {
        const int rank = __builtin_popcount(b & ((1 << j) - 1));
        nm24[b][j] = gather[j & 3];
        rank_lo[b][j] = rank & 7;
        rank_hi[b][j] = (8 - pc + rank) & 7;
        mask[b][j] = ((b >> j) & 1) ? -1 : 0;
        const bool set = (b >> j) & 1;
        const int8_t lo = set ? static_cast<int8_t>(2 * rank) : -128, hi = set ? static_cast<int8_t>(2 * rank + 1) : -128;
        spread16[b][2 * j] = lo, spread16[b][2 * j + 1] = hi;
        const int top = (8 - pc + rank) & 7;
        spread_hi[b][2 * j] = set ? static_cast<int8_t>(2 * top) : -128;
        spread_hi[b][2 * j + 1] = set ? static_cast<int8_t>(2 * top + 1) : -128;
        int8_t* fh = spread_bf_hi[b] + 4 * j;
        fh[0] = fh[1] = -128, fh[2] = spread_hi[b][2 * j], fh[3] = spread_hi[b][2 * j + 1];
        int8_t* f = spread_bf[b] + 4 * j;  // lane j of the ymm: byte 4 * (j % 4) of 128-bit half j / 4
        f[0] = f[1] = -128, f[2] = lo, f[3] = hi;
        const int code = j < 4 ? ga : gb, base = j < 4 ? 0 : 2, p = j & 3;
        const int idx = p == (code & 3) ? base : p == (code >> 2) ? base + 1 : -1;
        spread24[b][2 * j] = idx < 0 ? -128 : static_cast<int8_t>(2 * idx);
        spread24[b][2 * j + 1] = idx < 0 ? -128 : static_cast<int8_t>(2 * idx + 1);
        for (int h = 0; h < 2; ++h) {
          int8_t* f24 = spread24_bf[h][b] + 4 * j;
          f24[0] = f24[1] = -128;
          f24[2] = idx < 0 ? -128 : static_cast<int8_t>(2 * idx + 8 * h);
          f24[3] = idx < 0 ? -128 : static_cast<int8_t>(2 * idx + 1 + 8 * h);
        }
      }
    }
  }
};
inline const Luts& luts() {
  static const Luts l;
  return l;
}

inline float hsum128(__m128 s) {
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
inline float hsum(__m256 v) { return hsum128(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1))); }
inline __m256i lut(const int32_t (*t)[8], uint32_t b) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(t[b])); }

// Eight consecutive values (or codes, as floats) starting at value j of a tile row.
struct F32 {
  static constexpr bool quant = false;
  static constexpr int64_t nibbles = 8;  // per value: value j starts at byte j * nibbles / 2
  static __m256 load(const uint8_t* p, int64_t j) { return _mm256_loadu_ps(reinterpret_cast<const float*>(p) + j); }
};
struct F16 {
  static constexpr bool quant = false;
  static constexpr int64_t nibbles = 4;  // per value: value j starts at byte j * nibbles / 2
  static __m256 load(const uint8_t* p, int64_t j) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * j)));
  }
};
struct BF16 {
  static constexpr bool quant = false;
  static constexpr int64_t nibbles = 4;  // per value: value j starts at byte j * nibbles / 2
  static __m256 load(const uint8_t* p, int64_t j) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * j)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
};
struct Q4 {
  static constexpr bool quant = true;
  static constexpr int64_t nibbles = 1;  // per value: value j starts at byte j * nibbles / 2
  static __m256 load(const uint8_t* p, int64_t j) {  // 8 codes from 4 bytes, low nibble first
    int32_t b;
    std::memcpy(&b, p + j / 2, 4);
    const __m128i v = _mm_cvtsi32_si128(b), m = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
  }
};
struct Q8 {
  static constexpr bool quant = true;
  static constexpr int64_t nibbles = 2;  // per value: value j starts at byte j * nibbles / 2
  static __m256 load(const uint8_t* p, int64_t j) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + j))));
  }
};

// 2:4: per meta word (32 columns, 16 values) gather x at the kept columns with two permutes a ymm, then
// FMA with the values: the multiply-adds are half of dense. Quantized values accumulate (u - zero) * x per
// group (gs a multiple of 32, or one group) and are scaled once per group.
template <class V, int MB>
void nm24_row(const Packed& w, int64_t n, const float* x, int64_t xs, float* y, int64_t ys) {
  const Luts& L = luts();
  const int32_t* meta = w.mrow(n);
  const uint8_t* v = w.vrow(n);
  const int64_t words = w.kp / 32, wpg = (!V::quant || w.groups == 1) ? words : w.gs / 32;
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t w0 = 0; w0 < words; w0 += wpg) {
    const int64_t w1 = std::min(words, w0 + wpg), g = V::quant ? w.group_of(w0 * 32) : 0;
    const __m256 z = V::quant ? _mm256_set1_ps(w.zero_at(n, g)) : _mm256_setzero_ps();
    __m256 part[MB];
    for (int m = 0; m < MB; ++m) part[m] = _mm256_setzero_ps();
    for (int64_t wi = w0; wi < w1; ++wi) {
      const uint32_t word = static_cast<uint32_t>(meta[wi]);
      prefetch(v + wi * 16 * V::nibbles / 2);
      if (!(wi & 15)) prefetch(meta + wi);
      const __m256i p0 = lut(L.nm24, word & 255), p1 = lut(L.nm24, (word >> 8) & 255);
      const __m256i p2 = lut(L.nm24, (word >> 16) & 255), p3 = lut(L.nm24, word >> 24);
      __m256 v0 = V::load(v, wi * 16), v1 = V::load(v, wi * 16 + 8);
      if (V::quant) v0 = _mm256_sub_ps(v0, z), v1 = _mm256_sub_ps(v1, z);
      for (int m = 0; m < MB; ++m) {
        const float* xp = x + m * xs + wi * 32;
        const __m256 g0 = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xp), p0),
                                          _mm256_permutevar8x32_ps(_mm256_loadu_ps(xp + 8), p1), 0xF0);
        const __m256 g1 = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xp + 16), p2),
                                          _mm256_permutevar8x32_ps(_mm256_loadu_ps(xp + 24), p3), 0xF0);
        part[m] = _mm256_fmadd_ps(v1, g1, _mm256_fmadd_ps(v0, g0, part[m]));
      }
    }
    for (int m = 0; m < MB; ++m)
      acc[m] = V::quant ? _mm256_fmadd_ps(_mm256_set1_ps(w.scale_at(n, g)), part[m], acc[m])
                        : _mm256_add_ps(acc[m], part[m]);
  }
  for (int m = 0; m < MB; ++m) y[m * ys] = hsum(acc[m]);
}

// 4x4:8: a tile's 8 values expand to its 4 rows x 4 columns (two ymm: rows 0-1, rows 2-3) by one permute
// and mask each; x's 4 columns are broadcast to both halves. The values of rows 2-3 are the last
// 8 - popcount(low byte), so both tables depend on one byte only. Quantized codes: the rows' zero points are
// subtracted after the permute (lanes 0-3 one row, 4-7 the next), the mask zeroes the pruned lanes after it,
// and each row's scale multiplies its lanes once per group of gs columns.
template <class V, int MB>
void tile44_row(const Packed& w, int64_t tr, const float* x, int64_t xs, float* y, int64_t ys) {
  const Luts& L = luts();
  const int32_t* meta = w.mrow(tr);
  const uint8_t* v = w.vrow(tr);
  const int64_t tiles = w.kp / 4, tpg = (!V::quant || w.groups == 1) ? tiles : w.gs / 4, row = 4 * tr;
  __m256 a01[MB], a23[MB];
  for (int m = 0; m < MB; ++m) a01[m] = a23[m] = _mm256_setzero_ps();
  for (int64_t t0 = 0; t0 < tiles; t0 += tpg) {
    const int64_t t1 = std::min(tiles, t0 + tpg), g = V::quant ? w.group_of(4 * t0) : 0;
    auto pair = [&](auto at, int64_t r) {  // lanes 0-3: row r, 4-7: row r + 1
      const float a = V::quant ? at(row + r, g) : 0.f, b = V::quant ? at(row + r + 1, g) : 0.f;
      return _mm256_setr_ps(a, a, a, a, b, b, b, b);
    };
    auto zero = [&](int64_t r, int64_t gg) { return w.zero_at(r, gg); };
    auto scale = [&](int64_t r, int64_t gg) { return w.scale_at(r, gg); };
    const __m256 z01 = pair(zero, 0), z23 = pair(zero, 2);
    __m256 p01[MB], p23[MB];
    for (int m = 0; m < MB; ++m) p01[m] = p23[m] = _mm256_setzero_ps();
    for (int64_t t = t0; t < t1; ++t) {
      const uint32_t code = (static_cast<uint32_t>(meta[t >> 1]) >> ((t & 1) * 16)) & 0xFFFF;
      const uint32_t lo = code & 255, hi = code >> 8;
      prefetch(v + t * 8 * V::nibbles / 2);
      if (!(t & 31)) prefetch(meta + (t >> 1));
      const __m256 val = V::load(v, t * 8);
      __m256 d01 = _mm256_permutevar8x32_ps(val, lut(L.rank_lo, lo)), d23 = _mm256_permutevar8x32_ps(val, lut(L.rank_hi, hi));
      if (V::quant) d01 = _mm256_sub_ps(d01, z01), d23 = _mm256_sub_ps(d23, z23);
      d01 = _mm256_and_ps(d01, _mm256_castsi256_ps(lut(L.mask, lo)));
      d23 = _mm256_and_ps(d23, _mm256_castsi256_ps(lut(L.mask, hi)));
      for (int m = 0; m < MB; ++m) {
        const __m256 xx = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + m * xs + t * 4));
        p01[m] = _mm256_fmadd_ps(d01, xx, p01[m]);
        p23[m] = _mm256_fmadd_ps(d23, xx, p23[m]);
      }
    }
    const __m256 s01 = pair(scale, 0), s23 = pair(scale, 2);
    for (int m = 0; m < MB; ++m) {
      a01[m] = V::quant ? _mm256_fmadd_ps(s01, p01[m], a01[m]) : _mm256_add_ps(a01[m], p01[m]);
      a23[m] = V::quant ? _mm256_fmadd_ps(s23, p23[m], a23[m]) : _mm256_add_ps(a23[m], p23[m]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    float* ym = y + m * ys;
    ym[0] = hsum128(_mm256_castps256_ps128(a01[m]));
    ym[1] = hsum128(_mm256_extractf128_ps(a01[m], 1));
    ym[2] = hsum128(_mm256_castps256_ps128(a23[m]));
    ym[3] = hsum128(_mm256_extractf128_ps(a23[m], 1));
  }
}

// Unpruned int4 / int8 codes: 32 columns a step, the columns past the last whole step in scalar code
// (a row's codes end there, so the vector loads must too).
template <int BITS, int MB>
void dense_q_row(const Packed& w, int64_t n, const float* x, int64_t xs, float* y, int64_t ys) {
  const uint8_t* v = w.vrow(n);
  const int64_t full = w.k / 32 * 32, span = w.groups == 1 ? std::max<int64_t>(full, 32) : w.gs;
  const __m128i m15 = _mm_set1_epi8(15);
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < full; c0 += span) {
    const int64_t g = w.group_of(c0);
    const __m256 z = _mm256_set1_ps(w.zero_at(n, g));
    __m256 part[MB];
    for (int m = 0; m < MB; ++m) part[m] = _mm256_setzero_ps();
    for (int64_t col = c0, c1 = std::min(full, c0 + span); col < c1; col += 32) {
      prefetch(v + col * BITS / 8);
      __m256 f[4];
      if (BITS == 4) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + col / 2));
        const __m128i lo = _mm_and_si128(b, m15), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m15);
        const __m128i c0v = _mm_unpacklo_epi8(lo, hi), c1v = _mm_unpackhi_epi8(lo, hi);
        f[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c0v));
        f[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c0v, 8)));
        f[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c1v));
        f[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c1v, 8)));
      } else {
        for (int i = 0; i < 4; ++i) f[i] = Q8::load(v, col + 8 * i);
      }
      for (int i = 0; i < 4; ++i) f[i] = _mm256_sub_ps(f[i], z);
      for (int m = 0; m < MB; ++m)
        for (int i = 0; i < 4; ++i) part[m] = _mm256_fmadd_ps(f[i], _mm256_loadu_ps(x + m * xs + col + 8 * i), part[m]);
    }
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(w.scale_at(n, g)), part[m], acc[m]);
  }
  for (int m = 0; m < MB; ++m) {
    float t = hsum(acc[m]);
    for (int64_t col = full; col < w.k; ++col) t += w.value(n, col, n, col) * x[m * xs + col];
    y[m * ys] = t;
  }
}

inline float dot(const float* a, const float* b, int64_t k) {  // k a multiple of 8 (padded rows)
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i < k; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  return hsum(_mm256_add_ps(s0, s1));
}

}  // namespace llmp
