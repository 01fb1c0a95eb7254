// Weights spread from their packed values to dense columns by byte shuffles (AVX2): the unstructured bitmask's
// row kernel, and the 16-bit decoders of the many-token path (bitmask and 2:4 rows straight into the BLAS's
// bf16 / fp16 buffer, one shuffle a 8 columns, no float round trip).
#pragma once
#include "avx2.h"

namespace llmp {

// Bitmask (unstructured): a byte of keep bits spreads the next popcount(byte) values of the row to its 8
// columns, zeros elsewhere, by one byte shuffle (16-bit values) or a permute and a mask (fp32); then one FMA
// a token against 8 columns of x. bf16 needs no conversion: the shuffle writes it to the top of each fp32 lane.
// `e` is the byte offset of the byte's 32-byte entry in a table (byte * 32), so no table needs its own index;
// the tables are fetched once a row (a function-local static's guard inside the loop costs every register).
// Quantized codes (SpreadQ4) have the group's zero point subtracted before the spread, so pruned lanes are 0.
inline const uint8_t* entry(const void* table, uint32_t e) { return static_cast<const uint8_t*>(table) + e; }
inline __m256 spread_f32(const Luts& L, __m256 f, uint32_t e) {
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(entry(L.rank_lo, e)));
  const __m256 keep = _mm256_load_ps(reinterpret_cast<const float*>(entry(L.mask, e)));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(f, idx), keep);
}
struct SpreadF32 {
  static constexpr bool quant = false;
  static __m256 at(const Luts& L, const uint8_t* v, int64_t j, uint32_t e, __m256) { return spread_f32(L, F32::load(v, j), e); }
};
struct SpreadF16 {
  static constexpr bool quant = false;
  static __m256 at(const Luts& L, const uint8_t* v, int64_t j, uint32_t e, __m256) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 2 * j));
    return _mm256_cvtph_ps(_mm_shuffle_epi8(h, _mm_load_si128(reinterpret_cast<const __m128i*>(entry(L.spread16, e)))));
  }
};
struct SpreadBF16 {
  static constexpr bool quant = false;
  static __m256 at(const Luts& L, const uint8_t* v, int64_t j, uint32_t e, __m256) {
    const __m256i h = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 2 * j)));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(h, _mm256_load_si256(reinterpret_cast<const __m256i*>(entry(L.spread_bf, e)))));
  }
};
struct SpreadQ4 {  // 8 codes from nibble j: 8 bytes from byte j / 2 (one load: 5 would go through the stack),
  static constexpr bool quant = true;  // shifted by a nibble when j is odd
  static __m256 at(const Luts& L, const uint8_t* v, int64_t j, uint32_t e, __m256 z) {
    uint64_t b;
    std::memcpy(&b, v + (j >> 1), 8);
    const uint32_t codes = static_cast<uint32_t>(b >> (4 * (j & 1)));
    return spread_f32(L, _mm256_sub_ps(Q4::load(reinterpret_cast<const uint8_t*>(&codes), 0), z), e);
  }
};

// A word's four bytes start at values j, j + popcount(low byte), ... (independent of each other); only the
// word's total carries to the next word, clamped to kv so a corrupt mask never reads past the row's slack.
// Quantized codes accumulate (u - zero) * x per group of gs columns (a multiple of 32) and scale it once.
template <class S, int MB>
void bitmask_row(const Packed& w, int64_t n, const float* x, int64_t xs, float* y, int64_t ys) {
  const Luts& L = luts();
  const int32_t* meta = w.mrow(n);
  const uint8_t* v = w.vrow(n);
  const int64_t words = w.kp / 32, wpg = (!S::quant || w.groups == 1) ? words : w.gs / 32;
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  int64_t j = 0;
  for (int64_t w0 = 0; w0 < words; w0 += wpg) {
    const int64_t w1 = std::min(words, w0 + wpg), g = S::quant ? w.group_of(w0 * 32) : 0;
    const __m256 z = S::quant ? _mm256_set1_ps(w.zero_at(n, g)) : _mm256_setzero_ps();
    constexpr int NA = MB <= 2 ? 4 : 2;  // independent sums a token: one FMA chain was the limit at 2
    __m256 part[MB][NA];
    for (int m = 0; m < MB; ++m)
      for (int a = 0; a < NA; ++a) part[m][a] = _mm256_setzero_ps();
    for (int64_t wi = w0; wi < w1; ++wi) {
      const uint32_t word = static_cast<uint32_t>(meta[wi]);
      prefetch(v + (S::quant ? j / 2 : 2 * j));  // 16-bit values; fp32 ones stream at half the prefetched rate
      if (!(wi & 15)) prefetch(meta + wi);
      const int64_t j1 = j + __builtin_popcount(word & 0xFF), j2 = j + __builtin_popcount(word & 0xFFFF);
      const int64_t j3 = j + __builtin_popcount(word & 0xFFFFFF);
      const __m256 d[4] = {S::at(L, v, j, (word << 5) & 0x1FE0, z), S::at(L, v, j1, (word >> 3) & 0x1FE0, z),
                           S::at(L, v, j2, (word >> 11) & 0x1FE0, z), S::at(L, v, j3, (word >> 19) & 0x1FE0, z)};
      j = std::min<int64_t>(j + __builtin_popcount(word), w.kv);
      for (int m = 0; m < MB; ++m)
        for (int q = 0; q < 4; ++q)
          part[m][q % NA] = _mm256_fmadd_ps(d[q], _mm256_loadu_ps(x + m * xs + wi * 32 + 8 * q), part[m][q % NA]);
    }
    for (int m = 0; m < MB; ++m) {
      __m256 sum = part[m][0];
      for (int a = 1; a < NA; ++a) sum = _mm256_add_ps(sum, part[m][a]);
      acc[m] = S::quant ? _mm256_fmadd_ps(_mm256_set1_ps(w.scale_at(n, g)), sum, acc[m]) : _mm256_add_ps(acc[m], sum);
    }
  }
  for (int m = 0; m < MB; ++m) y[m * ys] = hsum(acc[m]);
}

// 2:4 with bf16 values: each meta byte's 4 values (8 bytes) spread to its 8 columns' fp32 lanes by one shuffle,
// then one FMA a token: no shuffle per token (nm24_row gathers x for every token), so it wins from M = 1 up.
// Loads bound it (values, controls, x: 2 a cycle), so two meta bytes share one 16-byte load of values.
template <int MB>
void nm24_bf16_row(const Packed& w, int64_t n, const float* x, int64_t xs, float* y, int64_t ys) {
  constexpr int NA = MB <= 2 ? 4 : 2;  // independent sums a token: one FMA chain was the limit at 2
  const Luts& L = luts();
  const int32_t* meta = w.mrow(n);
  const uint8_t* v = w.vrow(n);
  __m256 acc[MB][NA];
  for (int m = 0; m < MB; ++m)
    for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
  for (int64_t wi = 0, words = w.kp / 32; wi < words; ++wi) {
    const uint32_t word = static_cast<uint32_t>(meta[wi]);
    if (!(wi & 1)) prefetch(v + 32 * wi);  // a 64-byte line of values every two words; meta: 1/8 of the bytes
    if (!(wi & 15)) prefetch(meta + wi);
    __m256 d[4];
    for (int h = 0; h < 2; ++h) {  // 16 bytes = the 8 values of two meta bytes, broadcast to both halves
      const __m256i vals = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 32 * wi + 16 * h)));
      for (int e = 0; e < 2; ++e) {
        const int q = 2 * h + e;
        d[q] = _mm256_castsi256_ps(_mm256_shuffle_epi8(
            vals, _mm256_load_si256(reinterpret_cast<const __m256i*>(L.spread24_bf[e][(word >> (8 * q)) & 255]))));
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int q = 0; q < 4; ++q)
        acc[m][q % NA] = _mm256_fmadd_ps(d[q], _mm256_loadu_ps(x + m * xs + wi * 32 + 8 * q), acc[m][q % NA]);
  }
  for (int m = 0; m < MB; ++m) {
    __m256 t = acc[m][0];
    for (int a = 1; a < NA; ++a) t = _mm256_add_ps(t, acc[m][a]);
    y[m * ys] = hsum(t);
  }
}

// 4x4:8 with bf16 values: a meta word holds two tiles; each tile's 8 values (16 bytes, broadcast to both
// halves) go to rows 0-1 and 2-3 by one shuffle each, straight into fp32 lanes; x's 4 columns broadcast to both
// halves. Four accumulators: the FMA latency, not the issue width, bounded a tile a step.
template <int MB>
void tile44_bf16_row(const Packed& w, int64_t tr, const float* x, int64_t xs, float* y, int64_t ys) {
  const Luts& L = luts();
  const int32_t* meta = w.mrow(tr);
  const uint8_t* v = w.vrow(tr);
  __m256 a01[MB], a23[MB], b01[MB], b23[MB];
  for (int m = 0; m < MB; ++m) a01[m] = a23[m] = b01[m] = b23[m] = _mm256_setzero_ps();
  auto shuffle = [](__m256i h, const int8_t* ctrl) {
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(h, _mm256_load_si256(reinterpret_cast<const __m256i*>(ctrl))));
  };
  for (int64_t wi = 0, words = w.kp / 8; wi < words; ++wi) {
    const uint32_t word = static_cast<uint32_t>(meta[wi]);
    if (!(wi & 1)) prefetch(v + 32 * wi);
    if (!(wi & 15)) prefetch(meta + wi);
    const __m256i h0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 32 * wi)));
    const __m256i h1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 32 * wi + 16)));
    const __m256 d0 = shuffle(h0, L.spread_bf[word & 255]), d1 = shuffle(h0, L.spread_bf_hi[(word >> 8) & 255]);
    const __m256 d2 = shuffle(h1, L.spread_bf[(word >> 16) & 255]), d3 = shuffle(h1, L.spread_bf_hi[word >> 24]);
    for (int m = 0; m < MB; ++m) {
      const float* xp = x + m * xs + 8 * wi;
      const __m256 x0 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xp));
      const __m256 x1 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xp + 4));
      a01[m] = _mm256_fmadd_ps(d0, x0, a01[m]), a23[m] = _mm256_fmadd_ps(d1, x0, a23[m]);
      b01[m] = _mm256_fmadd_ps(d2, x1, b01[m]), b23[m] = _mm256_fmadd_ps(d3, x1, b23[m]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    const __m256 r01 = _mm256_add_ps(a01[m], b01[m]), r23 = _mm256_add_ps(a23[m], b23[m]);
    float* ym = y + m * ys;
    ym[0] = hsum128(_mm256_castps256_ps128(r01));
    ym[1] = hsum128(_mm256_extractf128_ps(r01, 1));
    ym[2] = hsum128(_mm256_castps256_ps128(r23));
    ym[3] = hsum128(_mm256_extractf128_ps(r23, 1));
  }
}

// Whether decode16_row has w's layout: 16-bit values of 2:4, 4x4:8 or the bitmask.
inline bool has_decode16(const Packed& w) {
  return !w.bits && w.vdtype != at::kFloat &&
         (w.kind == NM24 || w.kind == BITMASK || (w.kind == TILE && w.r == 4 && w.c == 4 && w.kv == 8));
}

// Tile row tr of a has_decode16 weight as r dense 16-bit rows, ld apart, in out (kp columns; the caller zeroes
// the columns past kp once).
inline void decode16_row(const Packed& w, int64_t tr, uint16_t* out, int64_t ld) {
  const Luts& L = luts();
  const int32_t* meta = w.mrow(tr);
  const uint8_t* v = w.vrow(tr);
  __m128i* o = reinterpret_cast<__m128i*>(out);
  if (w.kind == TILE) {  // 4x4:8: a tile's 8 values (16 bytes) to rows 0-1 and 2-3 by a shuffle each
    for (int64_t t = 0, tiles = w.kp / 4; t < tiles; ++t) {
      const uint32_t code = (static_cast<uint32_t>(meta[t >> 1]) >> ((t & 1) * 16)) & 0xFFFF;
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 16 * t));
      const __m128i r01 = _mm_shuffle_epi8(h, _mm_load_si128(reinterpret_cast<const __m128i*>(L.spread16[code & 255])));
      const __m128i r23 = _mm_shuffle_epi8(h, _mm_load_si128(reinterpret_cast<const __m128i*>(L.spread_hi[code >> 8])));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + 4 * t), r01);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + ld + 4 * t), _mm_unpackhi_epi64(r01, r01));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + 2 * ld + 4 * t), r23);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + 3 * ld + 4 * t), _mm_unpackhi_epi64(r23, r23));
    }
    return;
  }
  if (w.kind == NM24) {
    for (int64_t wi = 0, words = w.kp / 32; wi < words; ++wi) {
      const uint32_t word = static_cast<uint32_t>(meta[wi]);
      for (int q = 0; q < 4; ++q) {  // 8 columns keep 4 values (8 bytes): a 64-bit load stays inside the row
        const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(v + 2 * (wi * 16 + 4 * q)));
        const __m128i c = _mm_load_si128(reinterpret_cast<const __m128i*>(L.spread24[(word >> (8 * q)) & 255]));
        _mm_storeu_si128(o + wi * 4 + q, _mm_shuffle_epi8(h, c));
      }
    }
    return;
  }
  int64_t j = 0;  // as bitmask_row: a word's bytes start at independent offsets, the word's total carries
  for (int64_t wi = 0, words = w.kp / 32; wi < words; ++wi) {
    const uint32_t word = static_cast<uint32_t>(meta[wi]);
    const int64_t from[4] = {j, j + __builtin_popcount(word & 0xFF), j + __builtin_popcount(word & 0xFFFF),
                           j + __builtin_popcount(word & 0xFFFFFF)};
    for (int q = 0; q < 4; ++q) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 2 * from[q]));
      const __m128i c = _mm_load_si128(reinterpret_cast<const __m128i*>(L.spread16[(word >> (8 * q)) & 255]));
      _mm_storeu_si128(o + wi * 4 + q, _mm_shuffle_epi8(h, c));
    }
    j = std::min<int64_t>(j + __builtin_popcount(word), w.kv);
  }
}

// Tile row tr of int4 / int8 codes (dense, 2:4, 4x4:8, or the bitmask with int4) as fp32 (u - zero) * scale,
// r rows ld apart in out (kp columns): the many-token path's decoder. Groups must be whole 32-column steps.
template <class V>
inline void decode_q_row(const Packed& w, int64_t tr, float* out, int64_t ld) {
  const Luts& L = luts();
  const uint8_t* v = w.vrow(tr);
  const int32_t* meta = w.kind == DENSE ? nullptr : w.mrow(tr);
  if (w.kind == DENSE) {
    const int64_t full = w.k / 32 * 32;
    for (int64_t col = 0; col < full; col += 32) {
      const int64_t g = w.group_of(col);
      const __m256 z = _mm256_set1_ps(w.zero_at(tr, g)), s = _mm256_set1_ps(w.scale_at(tr, g));
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + col + 8 * i, _mm256_mul_ps(_mm256_sub_ps(V::load(v, col + 8 * i), z), s));
    }
    for (int64_t col = full; col < w.kp; ++col) out[col] = col < w.k ? w.value(tr, col, tr, col) : 0.f;
    return;
  }
  if (w.kind == TILE) {  // 4x4:8, as tile44_row: permute, subtract the rows' zeros, mask, scale per row
    const int64_t row = 4 * tr;
    auto pair = [&](bool scale, int64_t r, int64_t g) {
      const float a = scale ? w.scale_at(row + r, g) : w.zero_at(row + r, g);
      const float b = scale ? w.scale_at(row + r + 1, g) : w.zero_at(row + r + 1, g);
      return _mm256_setr_ps(a, a, a, a, b, b, b, b);
    };
    for (int64_t t0 = 0, tiles = w.kp / 4, tpg = w.groups == 1 ? tiles : w.gs / 4; t0 < tiles; t0 += tpg) {
      const int64_t g = w.group_of(4 * t0);
      const __m256 z01 = pair(false, 0, g), z23 = pair(false, 2, g), s01 = pair(true, 0, g), s23 = pair(true, 2, g);
      for (int64_t t = t0, t1 = std::min(tiles, t0 + tpg); t < t1; ++t) {
        const uint32_t code = (static_cast<uint32_t>(meta[t >> 1]) >> ((t & 1) * 16)) & 0xFFFF, lo = code & 255, hi = code >> 8;
        const __m256 val = V::load(v, t * 8);
        const __m256 d01 = _mm256_mul_ps(_mm256_and_ps(_mm256_sub_ps(_mm256_permutevar8x32_ps(val, lut(L.rank_lo, lo)), z01),
                                                       _mm256_castsi256_ps(lut(L.mask, lo))), s01);
        const __m256 d23 = _mm256_mul_ps(_mm256_and_ps(_mm256_sub_ps(_mm256_permutevar8x32_ps(val, lut(L.rank_hi, hi)), z23),
                                                       _mm256_castsi256_ps(lut(L.mask, hi))), s23);
        _mm_storeu_ps(out + 4 * t, _mm256_castps256_ps128(d01));
        _mm_storeu_ps(out + ld + 4 * t, _mm256_extractf128_ps(d01, 1));
        _mm_storeu_ps(out + 2 * ld + 4 * t, _mm256_castps256_ps128(d23));
        _mm_storeu_ps(out + 3 * ld + 4 * t, _mm256_extractf128_ps(d23, 1));
      }
    }
    return;
  }
  int64_t j = 0;  // the bitmask's running value index (as bitmask_row)
  for (int64_t wi = 0, words = w.kp / 32; wi < words; ++wi) {
    const uint32_t word = static_cast<uint32_t>(meta[wi]);
    const int64_t g = w.group_of(wi * 32);
    const __m256 z = _mm256_set1_ps(w.zero_at(tr, g)), s = _mm256_set1_ps(w.scale_at(tr, g));
    if (w.kind == BITMASK) {
      const int64_t from[4] = {j, j + __builtin_popcount(word & 0xFF), j + __builtin_popcount(word & 0xFFFF),
                               j + __builtin_popcount(word & 0xFFFFFF)};
      for (int q = 0; q < 4; ++q)
        _mm256_storeu_ps(out + wi * 32 + 8 * q, _mm256_mul_ps(SpreadQ4::at(L, v, from[q], ((word >> (8 * q)) & 255) << 5, z), s));
      j = std::min<int64_t>(j + __builtin_popcount(word), w.kv);
      continue;
    }
    // 2:4: 16 codes a word, spread to 32 columns
    const __m256 half[2] = {_mm256_mul_ps(_mm256_sub_ps(V::load(v, wi * 16), z), s),
                            _mm256_mul_ps(_mm256_sub_ps(V::load(v, wi * 16 + 8), z), s)};
    for (int q = 0; q < 4; ++q) {  // byte q: 4 values from value 4q of the word
      const uint32_t keep = L.keep24[(word >> (8 * q)) & 255];
      const __m256i idx = _mm256_add_epi32(lut(L.rank_lo, keep), _mm256_set1_epi32(4 * (q & 1)));
      _mm256_storeu_ps(out + wi * 32 + 8 * q, _mm256_and_ps(_mm256_permutevar8x32_ps(half[q >> 1], idx),
                                                             _mm256_castsi256_ps(lut(L.mask, keep))));
    }
  }
}

// decode_q_row where it has w's layout (then true).
inline bool decode_q(const Packed& w, int64_t tr, float* out, int64_t ld) {
  const bool tile44 = w.kind == TILE && w.r == 4 && w.c == 4 && w.kv == 8;
  const bool fits = w.kind == DENSE || w.kind == NM24 || tile44 || (w.kind == BITMASK && w.bits == 4);
  if (!w.bits || !fits || !(w.groups == 1 || w.gs % 32 == 0)) return false;
  w.bits == 4 ? decode_q_row<Q4>(w, tr, out, ld) : decode_q_row<Q8>(w, tr, out, ld);
  return true;
}

}  // namespace llmp
