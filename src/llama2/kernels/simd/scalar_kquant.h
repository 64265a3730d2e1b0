// The K-quant primitives in portable C++: the reference for x86_kquant.h and neon_kquant.h.
//
// unpacked_isums(w, x, cnt) (kquant_gemv.h: Q5_0 / Q5_1 outside AVX2): the exact integer dot
// products of 16 blocks of 32 int8 weights w (|w| <= 31, as decoded by core/kquant_blocks.h)
// with 16 activation blocks x (|x| <= 127), block i in lane i. Blocks from cnt on are zero
// padding (their lanes are 0 however they are computed, so a variant may skip them).
//
// superblock_isums, mins_products: the S and M lanes of core/superblock_gemv.h.
#pragma once

#include <cstdint>

#include "../core/isa.h"
#include "../core/kquant_blocks.h"

namespace llama2 {
namespace LLAMA2_SIMD {

inline I16 unpacked_isums(const int8_t* w, const int8_t* x, int) {
  I16 out;
  for (int i = 0; i < 16; ++i) {
    int32_t sum = 0;
    for (int j = 0; j < 32; ++j) sum += w[32 * i + j] * x[32 * i + j];
    out.v[i] = sum;
  }
  return out;
}

// superblock_gemv.h's S lanes of one super-block against MD activation rows x[md] (256 int8 each).
template <int64_t QT, int MD>
inline void superblock_isums(const uint8_t* sb, const uint8_t* scale_bytes, const int8_t* const* x, I16* out) {
  int8_t w[QK_K];
  superblock_values<QT>(sb, w);
  for (int md = 0; md < MD; ++md) {
    for (int lane = 0; lane < 16; ++lane) {
      int32_t sum = 0;
      for (int c = 0; c < 4; ++c) {
        const int v = 64 * c + 32 * (lane / 8) + 4 * (lane % 8);
        int32_t dot = 0;
        for (int i = 0; i < 4; ++i) dot += w[v + i] * x[md][v + i];
        sum += value_scale<QT>(scale_bytes, v) * dot;
      }
      out[md].v[lane] = sum;
    }
  }
}

// superblock_gemv.h's M lanes: mins[s] * sum32[s], s < 8, then 0.
inline I16 mins_products(const uint8_t* mins, const int32_t* sum32) {
  I16 out{};
  for (int s = 0; s < 8; ++s) out.v[s] = mins[s] * sum32[s];
  return out;
}

}  // namespace LLAMA2_SIMD
}  // namespace llama2
