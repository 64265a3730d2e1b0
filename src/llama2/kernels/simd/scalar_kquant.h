// unpacked_isums and decode_kquant_block in portable C++: the reference for x86_kquant.h and
// neon_kquant.h.
//
// unpacked_isums<HALVES>(w, x, slo, shi, cnt): the exact integer dot products of 16 blocks of
// 32 int8 weights w (|w| <= 64, as decoded by core/kquant_blocks.h) with 16 activation blocks
// x (|x| <= 127), block i in lane i: lo_i = sum_{j < 16} w[32 i + j] x[32 i + j], hi_i the
// same over j = 16..31, and lane i = slo[i] lo_i + shi[i] hi_i (HALVES: Q6_K's scales of 16
// values) or lo_i + hi_i. Exact in int32: |lane| <= 2 * 128 * 16 * 64 * 127. Blocks from cnt
// on are zero padding (their lanes are 0 however they are computed, so a variant may skip them).
#pragma once

#include <cstdint>

#include "../core/isa.h"
#include "../core/kquant_blocks.h"

namespace llama2 {
namespace LLAMA2_SIMD {

template <bool HALVES>
inline I16 unpacked_isums(const int8_t* w, const int8_t* x, const int32_t* slo, const int32_t* shi, int) {
  I16 out;
  for (int i = 0; i < 16; ++i) {
    int32_t lo = 0, hi = 0;
    for (int j = 0; j < 16; ++j) {
      lo += w[32 * i + j] * x[32 * i + j];
      hi += w[32 * i + 16 + j] * x[32 * i + 16 + j];
    }
    out.v[i] = HALVES ? slo[i] * lo + shi[i] * hi : lo + hi;
  }
  return out;
}

// kquant_blocks.h's decode_block (a variant may decode in registers: x86_kquant.h).
template <int64_t QT>
inline void decode_kquant_block(const uint8_t* blk, const DecodedBlocks& out) {
  decode_block<QT>(blk, out);
}

}  // namespace LLAMA2_SIMD
}  // namespace llama2
