// Q4_K and Q6_K super-blocks decoded in 256-bit registers, and the signed block dot
// products they take, for the x86 variants (avx2, avx_vnni: the generic kernel's groups,
// simd/avx2.h; avx512_vnni: kquant_gemv.h's decoded tiles, simd/x86_kquant.h). The values
// and scales are exactly kquant_blocks.h's decode_block's.
#pragma once

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../core/isa_name.h"
#include "../core/kquant_blocks.h"

namespace llama2 {
namespace LLAMA2_SIMD {

// 32 int8 weights times 32 int8 activations -> 8 int32, lane l the sum of products 4l..4l+3.
inline __m256i kquant_dot32(__m256i w, __m256i x) {
  const __m256i u = _mm256_sign_epi8(w, w), s = _mm256_sign_epi8(x, w);
#if defined(LLAMA2_ISA_AVX512_VNNI)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(LLAMA2_ISA_AVX_VNNI)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// 8 blocks' products p[i] (8 int32 lanes each, lanes 0..3 over values 0..15) -> lo, hi: lane i
// block i's sum over values 0..15, and over 16..31.
inline void half_sums8(const __m256i* p, __m256i& lo, __m256i& hi) {
  // Per 4 blocks: [lo_0, lo_1, lo_2, lo_3 | hi_0, hi_1, hi_2, hi_3].
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
  lo = _mm256_permute2x128_si256(a, b, 0x20);
  hi = _mm256_permute2x128_si256(a, b, 0x31);
}

// lo * scale_lo + hi * scale_hi, lane by lane (Q6_K's scales of 16 values).
inline __m256i scaled_halves(__m256i lo, __m256i hi, __m256i scale_lo, __m256i scale_hi) {
  return _mm256_add_epi32(_mm256_mullo_epi32(lo, scale_lo), _mm256_mullo_epi32(hi, scale_hi));
}

// Q4_K: the 8 blocks of 32 of super-block sb as unsigned bytes 0..15: its 32-byte chunk c
// holds block 2c in its low nibbles and block 2c + 1 in its high ones.
inline void q4_k_weights(const uint8_t* sb, __m256i* w) {
  const uint8_t* qs = sb + offsetof(block_q4_K, qs);
  const __m256i mask = _mm256_set1_epi8(0x0F);
  for (int c = 0; c < 4; ++c) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
    w[2 * c] = _mm256_and_si256(v, mask);
    w[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
  }
}

// Q4_K: the blocks' d * scale and -(dmin * min) (exact fp32), scale_min_k4 of the 8 blocks
// at once on 32-bit words (bytes 0..7 the scales, 8..15 the minimums).
inline void q4_k_scales(const uint8_t* sb, __m256& d32, __m256& m32) {
  uint32_t u[4];
  std::memcpy(u, sb + offsetof(block_q4_K, scales), 12);
  u[3] = ((u[2] >> 4) & 0x0F0F0F0Fu) | (((u[1] >> 6) & 0x03030303u) << 4);
  const uint32_t low_mins = u[1] & 0x3F3F3F3Fu;
  u[1] = (u[2] & 0x0F0F0F0Fu) | (((u[0] >> 6) & 0x03030303u) << 4);
  u[2] = low_mins;
  u[0] &= 0x3F3F3F3Fu;
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u));
  const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
  const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)));
  d32 = _mm256_mul_ps(_mm256_set1_ps(fp16_to_fp32(load_u16(sb + offsetof(block_q4_K, d)))), sc);
  m32 = _mm256_xor_ps(_mm256_mul_ps(_mm256_set1_ps(fp16_to_fp32(load_u16(sb + offsetof(block_q4_K, dmin)))), mn),
                      _mm256_set1_ps(-0.f));
}

// Q6_K: the 8 blocks of super-block sb as signed bytes -32..31, block 4j + s (j = 0, 1) the
// values (ql[64 j + 32 (s % 2) + l] nibble s / 2) | (bits 2s, 2s + 1 of qh[32 j + l]) << 4, - 32.
inline void q6_k_weights(const uint8_t* sb, __m256i* w) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), low2 = _mm256_set1_epi8(0x03), offset = _mm256_set1_epi8(32);
  auto load = [](const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  for (int j = 0; j < 2; ++j) {
    const __m256i a = load(sb + offsetof(block_q6_K, ql) + 64 * j), b = load(sb + offsetof(block_q6_K, ql) + 64 * j + 32);
    const __m256i qh = load(sb + offsetof(block_q6_K, qh) + 32 * j);
    auto value = [&](__m256i nibble, int s) {
      const __m256i high = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * s), low2), 4);
      return _mm256_sub_epi8(_mm256_or_si256(nibble, high), offset);
    };
    w[4 * j] = value(_mm256_and_si256(a, low4), 0);
    w[4 * j + 1] = value(_mm256_and_si256(b, low4), 1);
    w[4 * j + 2] = value(_mm256_and_si256(_mm256_srli_epi16(a, 4), low4), 2);
    w[4 * j + 3] = value(_mm256_and_si256(_mm256_srli_epi16(b, 4), low4), 3);
  }
}

// Q6_K: block i's int8 scales of values 0..15 (lane i of lo) and 16..31 (lane i of hi).
inline void q6_k_scales(const uint8_t* sb, __m256i& lo, __m256i& hi) {
  const __m128i scales = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + offsetof(block_q6_K, scales)));
  const __m128i pairs = _mm_shuffle_epi8(scales, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  lo = _mm256_cvtepi8_epi32(pairs);
  hi = _mm256_cvtepi8_epi32(_mm_srli_si128(pairs, 8));
}

}  // namespace LLAMA2_SIMD
}  // namespace llama2
