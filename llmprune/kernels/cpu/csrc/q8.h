// int8-activation row kernels for int4 / int8 codes (AVX2): the tokens are rounded to int8 per block of 32
// columns (one fp32 scale a block, llama.cpp's Q8_0), then 32 code x activation products take one maddubs.
// Decoding codes to floats costs ~4 instructions per 8 weights; this costs ~1 per 32, so a weight costs
// about half the instructions of the float kernels in avx2.h, which are compute-bound on int4.
//
// Products: (u - zero) * q as maddubs(|u - zero|, sign(q, u - zero)) (the first operand of maddubs is
// unsigned): |u - zero| <= 15 for int4 and <= 128 for symmetric int8, |q| <= 127, so the int16 pair sums
// cannot saturate. 2:4 gathers the kept activations with pshufb (the meta's 2-bit positions become shuffle
// bytes in registers): 64 columns a step, 32 kept weights, one ymm.
#pragma once
#include <immintrin.h>

#include "packed.h"

namespace llmp {

// Tokens as int8 blocks: row m holds q[m * ld ...] and scales s[m * ld / 32 ...]; `pat` holds, per token and
// 64-column chunk, the scales of the 2:4 kernel's 8 sums (block A four times, then block B).
struct XQ {
  const int8_t* q;
  const float* s;
  const float* pat;
  int64_t ld;  // a multiple of 64
};

// 8 int32 sums of 4 products each: (signed codes w) x (int8 activations x).
inline __m256i dot_i8(__m256i w, __m256i x) {
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

// Two codes a byte (low nibble first) widened to 16 bits with the high nibble moved up a byte: 32 codes in
// column order for one shuffle-port instruction.
inline __m256i split_nibbles(const uint8_t* p) {
  const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_or_si256(_mm256_and_si256(w, _mm256_set1_epi16(0x000F)),
                         _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x00F0)), 4));
}

// 32 codes of a dense row from column col, in column order, minus zero (BITS 4: two a byte, low nibble first).
template <int BITS>
inline __m256i dense_codes(const uint8_t* v, int64_t col, __m256i zero) {
  if (BITS == 8) return _mm256_sub_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + col)), zero);
  return _mm256_sub_epi8(split_nibbles(v + col / 2), zero);
}

// Dense int4 / int8 codes, 32 columns a step; the columns past the last whole step in scalar code.
template <int BITS, int MB>
void dense_q8_row(const Packed& w, int64_t n, const XQ& x, float* y, int64_t ys) {
  const uint8_t* v = w.vrow(n);
  const int64_t full = w.k / 32 * 32, span = w.groups == 1 ? std::max<int64_t>(full, 32) : w.gs;
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < full; c0 += span) {
    const int64_t g = w.group_of(c0);
    const __m256i z = _mm256_set1_epi8(static_cast<char>(static_cast<int>(w.zero_at(n, g))));
    __m256 part[MB];
    for (int m = 0; m < MB; ++m) part[m] = _mm256_setzero_ps();
    for (int64_t col = c0, c1 = std::min(full, c0 + span); col < c1; col += 32) {
      prefetch(v + col * BITS / 8);
      const __m256i wq = dense_codes<BITS>(v, col, z);
      for (int m = 0; m < MB; ++m) {
        const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + m * x.ld + col));
        part[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8(wq, xq)), _mm256_set1_ps(x.s[m * (x.ld / 32) + col / 32]),
                                  part[m]);
      }
    }
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(w.scale_at(n, g)), part[m], acc[m]);
  }
  for (int m = 0; m < MB; ++m) {
    float t = hsum(acc[m]);
    for (int64_t col = full; col < w.k; ++col)
      t += w.value(n, col, n, col) * (x.q[m * x.ld + col] * x.s[m * (x.ld / 32) + col / 32]);
    y[m * ys] = t;
  }
}

// 2:4 codes of 64 columns (16 groups) minus zero, in column order: groups 0-7 | groups 8-15.
template <int BITS>
inline __m256i nm24_codes(const uint8_t* v, int64_t chunk, __m256i zero) {
  if (BITS == 8) return _mm256_sub_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32 * chunk)), zero);
  return _mm256_sub_epi8(split_nibbles(v + 16 * chunk), zero);
}

// Shuffle bytes of 64 columns from two meta words, one control for both gathers: lane 0 holds groups 0-3 in
// bytes 0-7 and groups 4-7 in bytes 8-15, lane 1 groups 8-11 and 12-15 (each index within its 16 columns).
// A meta byte holds four 2-bit indices (two groups); widened to 32 bits, shifts by 0, 6, 12 and 18 put index
// j at bits 8j, 8j + 1.
inline __m256i nm24_ctrl(const int32_t* meta) {
  const __m256i m = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(meta)));
  const __m256i spread = _mm256_or_si256(_mm256_or_si256(m, _mm256_slli_epi32(m, 6)),
                                         _mm256_or_si256(_mm256_slli_epi32(m, 12), _mm256_slli_epi32(m, 18)));
  return _mm256_add_epi8(_mm256_and_si256(spread, _mm256_set1_epi8(3)),
                         _mm256_setr_epi8(0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12,
                                          0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12));
}

// 2:4 + int4 / int8 codes against int8 tokens, 64 columns a step (w.kp a multiple of 64; groups of a
// multiple of 64 columns, or one group). The tokens come in lane order (lane_order below): per 64 columns,
// columns 0-15, 32-47 | 16-31, 48-63, so one pshufb gathers the kept tokens of groups 0-3 and 8-11, the
// other those of groups 4-7 and 12-15, and a blend lines them up with the codes' column order.
template <int BITS, int MB>
void nm24_q8_row(const Packed& w, int64_t n, const XQ& x, float* y, int64_t ys) {
  const int32_t* meta = w.mrow(n);
  const uint8_t* v = w.vrow(n);
  const int64_t chunks = w.kp / 64, cpg = w.groups == 1 ? chunks : w.gs / 64;
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < chunks; c0 += cpg) {
    const int64_t g = w.group_of(c0 * 64);
    const __m256i z = _mm256_set1_epi8(static_cast<char>(static_cast<int>(w.zero_at(n, g))));
    __m256 part[MB];
    for (int m = 0; m < MB; ++m) part[m] = _mm256_setzero_ps();
    for (int64_t c = c0, c1 = std::min(chunks, c0 + cpg); c < c1; ++c) {
      prefetch(v + 16 * c * (BITS / 4));
      if (!(c & 7)) prefetch(meta + 2 * c);
      const __m256i ctrl = nm24_ctrl(meta + 2 * c), wq = nm24_codes<BITS>(v, c, z);
      for (int m = 0; m < MB; ++m) {
        const int8_t* xp = x.q + m * x.ld + 64 * c;
        const __m256i ga = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp)), ctrl);
        const __m256i gb = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 32)), ctrl);
        const __m256 s = _mm256_loadu_ps(x.pat + (m * (x.ld / 64) + c) * 8);
        part[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8(wq, _mm256_blend_epi32(ga, gb, 0xCC))), s, part[m]);
      }
    }
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(w.scale_at(n, g)), part[m], acc[m]);
  }
  for (int m = 0; m < MB; ++m) y[m * ys] = hsum(acc[m]);
}

// Tokens [M, ld] in the 2:4 kernel's lane order: per 64 columns, 0-15, 32-47, 16-31, 48-63.
inline void lane_order(const int8_t* q, int64_t M, int64_t ld, int8_t* out) {
  for (int64_t i = 0; i < M * ld; i += 64) {
    std::memcpy(out + i, q + i, 16), std::memcpy(out + i + 16, q + i + 32, 16);
    std::memcpy(out + i + 32, q + i + 16, 16), std::memcpy(out + i + 48, q + i + 48, 16);
  }
}

}  // namespace llmp
