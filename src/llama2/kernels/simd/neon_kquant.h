// The K-quant primitives (see scalar_kquant.h) in aarch64 Advanced SIMD: sdot in the
// neon_dot variant, widening multiplies in neon.
#pragma once

#include <arm_neon.h>

#include <cstdint>

#include "../core/isa.h"
#include "../core/kquant_blocks.h"

namespace llama2 {
namespace LLAMA2_SIMD {

inline I16 unpacked_isums(const int8_t* w, const int8_t* x, int cnt) {
  int32_t sums[16] = {};
  for (int i = 0; i < cnt; ++i) {
    sums[i] = vaddvq_s32(dot16(dot16(vdupq_n_s32(0), vld1q_s8(w + 32 * i), vld1q_s8(x + 32 * i)),
                               vld1q_s8(w + 32 * i + 16), vld1q_s8(x + 32 * i + 16)));
  }
  return {{vld1q_s32(sums), vld1q_s32(sums + 4), vld1q_s32(sums + 8), vld1q_s32(sums + 12)}};
}

// 4 int32 lanes, lane l the sum of products 4l .. 4l + 3 of 16 int8 pairs (sdot in
// neon_dot; widening multiplies and pairwise adds in neon, exact: |product| <= 128 * 127).
inline int32x4_t dot4_lanes(int8x16_t w, int8x16_t x) {
#if defined(LLAMA2_NEON_DOT)
  return vdotq_s32(vdupq_n_s32(0), w, x);
#else
  const int32x4_t low = vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(x)));
  const int32x4_t high = vpaddlq_s16(vmull_high_s8(w, x));
  return vpaddq_s32(low, high);
#endif
}

// superblock_gemv.h's S lanes (see scalar_kquant.h), the values decoded by superblock_values.
template <int64_t QT, int MD>
inline void superblock_isums(const uint8_t* sb, const uint8_t* scale_bytes, const int8_t* const* x, I16* out) {
  int8_t w[QK_K];
  superblock_values<QT>(sb, w);
  for (int md = 0; md < MD; ++md) {
    int32x4_t acc[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
    for (int c = 0; c < 4; ++c) {
      for (int q = 0; q < 4; ++q) {  // lanes 4q .. 4q + 3: values 64 c + 16 q ..
        const int v = 64 * c + 16 * q;
        acc[q] = vmlaq_n_s32(acc[q], dot4_lanes(vld1q_s8(w + v), vld1q_s8(x[md] + v)), value_scale<QT>(scale_bytes, v));
      }
    }
    out[md] = {{acc[0], acc[1], acc[2], acc[3]}};
  }
}

// superblock_gemv.h's M lanes: mins[s] * sum32[s], s < 8, then 0.
inline I16 mins_products(const uint8_t* mins, const int32_t* sum32) {
  const uint16x8_t m = vmovl_u8(vld1_u8(mins));
  const int32x4_t lo = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(m)));
  const int32x4_t hi = vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(m)));
  return {{vmulq_s32(lo, vld1q_s32(sum32)), vmulq_s32(hi, vld1q_s32(sum32 + 4)), vdupq_n_s32(0), vdupq_n_s32(0)}};
}

}  // namespace LLAMA2_SIMD
}  // namespace llama2
