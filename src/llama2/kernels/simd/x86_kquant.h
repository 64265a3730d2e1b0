// unpacked_isums, superblock_isums and mins_products (see scalar_kquant.h) for the x86
// variants, on 256-bit vectors: avx2 (vpmaddubsw + vpmaddwd), avx_vnni (AVX-VNNI's
// vpdpbusd), avx512_vnni (AVX512-VNNI's vpdpbusd on ymm, the two halves joined into a zmm).
// unpacked_isums' signed weights go through the sign trick: |w| (unsigned) times x * sign(w);
// vpmaddubsw cannot saturate, |w| <= 31. superblock_isums takes vpmaddubsw + vpmaddwd in
// every x86 variant (the integer scales enter through vpmaddwd).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../core/isa.h"
#include "../core/kquant_blocks.h"

namespace llama2 {
namespace LLAMA2_SIMD {

// The 16 int32 lanes of two 8-lane halves.
inline I16 join_halves(__m256i lo, __m256i hi) {
#if defined(LLAMA2_ISA_AVX512_VNNI)
  return {_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)};
#else
  return {lo, hi};
#endif
}

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

// unpacked_isums of 8 blocks: 8 int32.
inline __m256i unpacked_isums8(const int8_t* w, const int8_t* x) {
  __m256i p[8];
  for (int i = 0; i < 8; ++i) {
    p[i] = kquant_dot32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * i)),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * i)));
  }
  __m256i lo, hi;
  half_sums8(p, lo, hi);
  return _mm256_add_epi32(lo, hi);
}

inline I16 unpacked_isums(const int8_t* w, const int8_t* x, int cnt) {
  const __m256i first = unpacked_isums8(w, x);
  const __m256i second = cnt > 8 ? unpacked_isums8(w + 8 * 32, x + 8 * 32) : _mm256_setzero_si256();
  return join_halves(first, second);
}

// vpshufb masks picking sub-block b's scale words out of ScaleWords' registers, per 128-bit
// lane (bytes of word w: 2w, 2w + 1). Q4_K / Q5_K: word b in both lanes; Q6_K: word 2b % 8 in
// the low lane and the next word in the high one.
struct ScaleMasks {
  alignas(32) uint8_t bytes[2][8][32];  // [Q6_K][b][byte]
};
constexpr ScaleMasks make_scale_masks() {
  ScaleMasks masks{};
  for (int b = 0; b < 8; ++b) {
    for (int j = 0; j < 32; ++j) {
      const int lane = j / 16, byte = j % 2;
      masks.bytes[0][b][j] = static_cast<uint8_t>(2 * b + byte);
      masks.bytes[1][b][j] = static_cast<uint8_t>(2 * ((2 * b) % 8 + lane) + byte);
    }
  }
  return masks;
}
inline constexpr ScaleMasks kScaleMasks = make_scale_masks();

// A super-block's integer scales as int16 words, each 128-bit lane holding 8 of them (Q4_K /
// Q5_K: the 8 scales; Q6_K: scales 0..7 in `low`, 8..15 in `high`), so that one vpshufb gives
// a sub-block's 16 scale words for vpmaddwd (Q4_K / Q5_K: scale b everywhere; Q6_K: scale 2b
// on values 0..15, 2b + 1 on values 16..31).
template <int64_t QT>
struct ScaleWords {
  __m256i low, high;

  explicit ScaleWords(const uint8_t* scale_bytes) {
    const __m128i bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(scale_bytes));
    if constexpr (QT == Q6_K) {
      low = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(bytes));
      high = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_unpackhi_epi64(bytes, bytes)));
    } else {
      low = high = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(bytes));
    }
  }
  __m256i operator[](int b) const {
    const __m256i mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(kScaleMasks.bytes[QT == Q6_K][b]));
    return _mm256_shuffle_epi8(QT == Q6_K && b >= 4 ? high : low, mask);
  }
};

// Sub-blocks 2c and 2c + 1 (values 64 c .. 64 c + 63) of a Q4_K / Q5_K / Q6_K super-block
// as unsigned bytes (Q6_K: q, 0..63, its 32 taken off by the caller).
template <int64_t QT>
inline void chunk_weights(const uint8_t* sb, int c, __m256i& lo, __m256i& hi) {
  auto load = [](const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  if constexpr (QT == Q6_K) {
    // Value 128 j + 32 s + l: nibble s / 2 of ql[64 j + 32 (s % 2) + l], bits 2s of qh[32 j + l].
    const int j = c / 2, shift = 4 * (c % 2);
    const __m256i a = load(sb + offsetof(block_q6_K, ql) + 64 * j), b = load(sb + offsetof(block_q6_K, ql) + 64 * j + 32);
    const __m256i qh = _mm256_srl_epi16(load(sb + offsetof(block_q6_K, qh) + 32 * j), _mm_cvtsi32_si128(4 * (c % 2)));
    const __m128i count = _mm_cvtsi32_si128(shift);
    const __m256i low2 = _mm256_set1_epi8(0x03);
    lo = _mm256_or_si256(_mm256_and_si256(_mm256_srl_epi16(a, count), low4),
                         _mm256_slli_epi16(_mm256_and_si256(qh, low2), 4));
    hi = _mm256_or_si256(_mm256_and_si256(_mm256_srl_epi16(b, count), low4),
                         _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), low2), 4));
  } else {
    constexpr int64_t QS = QT == Q4_K ? offsetof(block_q4_K, qs) : offsetof(block_q5_K, qs);
    const __m256i v = load(sb + QS + 32 * c);
    lo = _mm256_and_si256(v, low4);
    hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    if constexpr (QT == Q5_K) {  // value 32 s + l: bit s of qh[l] as bit 4
      const __m256i qh = _mm256_srl_epi16(load(sb + offsetof(block_q5_K, qh)), _mm_cvtsi32_si128(2 * c));
      const __m256i one = _mm256_set1_epi8(1);
      lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(qh, one), 4));
      hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4));
    }
  }
}

// superblock_gemv.h's S lanes of one super-block against MD activation rows x[md] (256 int8
// each): per sub-block the 16 pair sums of vpmaddubsw (unsigned weights <= 63 times
// |x| <= 127: no saturation; Q6_K's 32 * x taken off as int16, |difference| <= 24130),
// weighed by the scale words and widened by vpmaddwd: lane l the 4 values 4l .. 4l + 3.
template <int64_t QT, int MD>
inline void superblock_isums(const uint8_t* sb, const uint8_t* scale_bytes, const int8_t* const* x, I16* out) {
  const ScaleWords<QT> scales(scale_bytes);
  __m256i acc[MD][2];
  for (int md = 0; md < MD; ++md) acc[md][0] = acc[md][1] = _mm256_setzero_si256();
  for (int c = 0; c < 4; ++c) {
    __m256i w[2];
    chunk_weights<QT>(sb, c, w[0], w[1]);
    const __m256i scale[2] = {scales[2 * c], scales[2 * c + 1]};
    for (int md = 0; md < MD; ++md) {
      for (int h = 0; h < 2; ++h) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[md] + 64 * c + 32 * h));
        __m256i pairs = _mm256_maddubs_epi16(w[h], xv);
        if constexpr (QT == Q6_K) pairs = _mm256_sub_epi16(pairs, _mm256_maddubs_epi16(_mm256_set1_epi8(32), xv));
        acc[md][h] = _mm256_add_epi32(acc[md][h], _mm256_madd_epi16(pairs, scale[h]));
      }
    }
  }
  for (int md = 0; md < MD; ++md) out[md] = join_halves(acc[md][0], acc[md][1]);
}

// superblock_gemv.h's M lanes: mins[s] * sum32[s], s < 8.
inline I16 mins_products(const uint8_t* mins, const int32_t* sum32) {
  const __m256i m = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mins)));
  return join_halves(_mm256_mullo_epi32(m, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sum32))),
                     _mm256_setzero_si256());
}

}  // namespace LLAMA2_SIMD
}  // namespace llama2
