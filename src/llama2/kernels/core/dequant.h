// GGUF Q4_0 / Q4_1 / Q8_0 blocks decoded to bfloat16 (torch-free), for the engine's and the
// modules' prefill GEMMs: one pass over the blocks at memory speed. Values are computed
// in fp32 as ggml does (Q4_0: d * (q - 8), Q4_1: d * q + m, Q8_0: d * q; here as one fused
// d * q + offset, which rounds the same: d * q is exact) and rounded once to bf16 (nearest
// even), identically in every variant.
#pragma once

#include <cstdint>

#include "blocks.h"
#include "isa.h"

namespace llama2 {
namespace LLAMA2_ISA_NS {

namespace V = ::llama2::LLAMA2_SIMD;

// Decodes one row of `blocks` blocks into out[0 .. 32 * blocks).
template <int64_t QT>
inline void dequantize_row(const uint8_t* row, int64_t blocks, bf16* out) {
  constexpr int64_t BS = block_bytes(QT);
  for (int64_t b = 0; b < blocks; ++b, row += BS, out += QK) {
    const float d = fp16_to_fp32(load_u16(row));
    // Q4: value = d * nibble + offset; offset = -8 d (Q4_0) or the block minimum m (Q4_1).
    const float offset = QT == Q4_0 ? -8.0f * d : QT == Q4_1 ? fp16_to_fp32(load_u16(row + 2)) : 0.0f;
    const V::F16 scale = V::set1(d), shift = V::set1(offset);
    V::F16 lo, hi;
    V::block_values<QT>(row + qs_offset(QT), lo, hi);
    V::store_bf16(out, V::fmadd(lo, scale, shift));
    V::store_bf16(out + 16, V::fmadd(hi, scale, shift));
  }
}

// W [n, k] as bfloat16 [n, k] (qtype checked by the caller); rows split by parallel_for.
template <class ParallelFor>
void dequantize(const uint8_t* w, int64_t qtype, int64_t n, int64_t k, bf16* out, const ParallelFor& parallel_for) {
  const int64_t row_bytes = k / QK * block_bytes(qtype);
  parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const uint8_t* src = w + row * row_bytes;
      bf16* dst = out + row * k;
      switch (qtype) {
        case Q4_0: dequantize_row<Q4_0>(src, k / QK, dst); break;
        case Q4_1: dequantize_row<Q4_1>(src, k / QK, dst); break;
        default: dequantize_row<Q8_0>(src, k / QK, dst); break;
      }
    }
  });
}

}  // namespace LLAMA2_ISA_NS
}  // namespace llama2
