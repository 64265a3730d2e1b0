// unpacked_isums (see scalar_kquant.h) in aarch64 Advanced SIMD, on neon.h's dot16 (sdot in
// the neon_dot variant, widening multiplies in neon).
#pragma once

#include <arm_neon.h>

#include <cstdint>

#include "../core/isa.h"
#include "../core/kquant_blocks.h"

namespace llama2 {
namespace LLAMA2_SIMD {

template <bool HALVES>
inline I16 unpacked_isums(const int8_t* w, const int8_t* x, const int32_t* slo, const int32_t* shi, int cnt) {
  int32_t sums[16] = {};
  for (int i = 0; i < cnt; ++i) {
    const int32x4_t zero = vdupq_n_s32(0);
    const int32_t lo = vaddvq_s32(dot16(zero, vld1q_s8(w + 32 * i), vld1q_s8(x + 32 * i)));
    const int32_t hi = vaddvq_s32(dot16(zero, vld1q_s8(w + 32 * i + 16), vld1q_s8(x + 32 * i + 16)));
    sums[i] = HALVES ? slo[i] * lo + shi[i] * hi : lo + hi;
  }
  return {{vld1q_s32(sums), vld1q_s32(sums + 4), vld1q_s32(sums + 8), vld1q_s32(sums + 12)}};
}

// kquant_blocks.h's decode_block (a variant may decode in registers: x86_kquant.h).
template <int64_t QT>
inline void decode_kquant_block(const uint8_t* blk, const DecodedBlocks& out) {
  decode_block<QT>(blk, out);
}

}  // namespace LLAMA2_SIMD
}  // namespace llama2
