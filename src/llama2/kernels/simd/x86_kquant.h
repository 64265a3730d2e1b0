// unpacked_isums and decode_kquant_block (see scalar_kquant.h) for the x86 variants, on
// 256-bit vectors: avx2 (vpmaddubsw + vpmaddwd), avx_vnni (AVX-VNNI's vpdpbusd),
// avx512_vnni (AVX512-VNNI's vpdpbusd on ymm, the two halves joined into a zmm). Signed weights go through the sign
// trick: |w| (unsigned) times x * sign(w); vpmaddubsw cannot saturate, |w| <= 64.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../core/isa.h"
#include "x86_superblocks.h"

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

// unpacked_isums of 8 blocks: 8 int32.
template <bool HALVES>
inline __m256i unpacked_isums8(const int8_t* w, const int8_t* x, const int32_t* slo, const int32_t* shi) {
  __m256i p[8];
  for (int i = 0; i < 8; ++i) {
    p[i] = kquant_dot32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * i)),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * i)));
  }
  // Per 4 blocks: [lo_0, lo_1, lo_2, lo_3 | hi_0, hi_1, hi_2, hi_3] (values 0..15 are lanes 0..3).
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
  const __m256i lo = _mm256_permute2x128_si256(a, b, 0x20), hi = _mm256_permute2x128_si256(a, b, 0x31);
  if (!HALVES) return _mm256_add_epi32(lo, hi);
  const __m256i s_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(slo));
  const __m256i s_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(shi));
  return _mm256_add_epi32(_mm256_mullo_epi32(lo, s_lo), _mm256_mullo_epi32(hi, s_hi));
}

template <bool HALVES>
inline I16 unpacked_isums(const int8_t* w, const int8_t* x, const int32_t* slo, const int32_t* shi, int cnt) {
  const __m256i first = unpacked_isums8<HALVES>(w, x, slo, shi);
  const __m256i second =
      cnt > 8 ? unpacked_isums8<HALVES>(w + 8 * 32, x + 8 * 32, slo + 8, shi + 8) : _mm256_setzero_si256();
#if defined(LLAMA2_ISA_AVX512_VNNI)
  return {_mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1)};
#else
  return {first, second};
#endif
}

// kquant_blocks.h's decode_block, Q4_K and Q6_K in registers (the same bytes out).
template <int64_t QT>
inline void decode_kquant_block(const uint8_t* blk, const DecodedBlocks& out) {
  if constexpr (QT == Q4_K || QT == Q6_K) {
    __m256i w[8];
    auto store = [](void* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); };
    if constexpr (QT == Q4_K) {
      q4_k_weights(blk, w);
      __m256 d32, m32;
      q4_k_scales(blk, d32, m32);
      store(out.slo, _mm256_set1_epi32(1));
      store(out.shi, _mm256_set1_epi32(1));
      _mm256_storeu_ps(out.d32, d32);
      _mm256_storeu_ps(out.m32, m32);
    } else {
      q6_k_weights(blk, w);
      __m256i lo, hi;
      q6_k_scales(blk, lo, hi);
      store(out.slo, lo);
      store(out.shi, hi);
      _mm256_storeu_ps(out.d32, _mm256_set1_ps(fp16_to_fp32(load_u16(blk + offsetof(block_q6_K, d)))));
      _mm256_storeu_ps(out.m32, _mm256_setzero_ps());
    }
    for (int i = 0; i < 8; ++i) store(out.q + 32 * i, w[i]);
  } else {
    decode_block<QT>(blk, out);
  }
}

}  // namespace LLAMA2_SIMD
}  // namespace llama2
