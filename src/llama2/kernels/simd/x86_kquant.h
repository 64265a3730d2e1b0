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

// unpacked_isums of 8 blocks: 8 int32.
template <bool HALVES>
inline __m256i unpacked_isums8(const int8_t* w, const int8_t* x, const int32_t* slo, const int32_t* shi) {
  __m256i p[8];
  for (int i = 0; i < 8; ++i) {
    p[i] = kquant_dot32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * i)),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * i)));
  }
  __m256i lo, hi;
  half_sums8(p, lo, hi);
  if (!HALVES) return _mm256_add_epi32(lo, hi);
  return scaled_halves(lo, hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(slo)),
                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(shi)));
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
