// Q5_0 / Q5_1 / Q2_K .. Q6_K blocks decoded to bfloat16 (torch-free), the types of
// kquant_blocks.h for the prefill GEMMs as dequant.h does for Q4_0 / Q4_1 / Q8_0. Each
// value is computed in fp32 exactly as gguf.quants does (an exact scale times the integer,
// rounded once, then the minimum added: one more rounding, or none where the product is
// exact) and rounded once to bf16. Scalar code, the same in every variant.
#pragma once

#include <cstdint>

#include "dequant.h"
#include "kquant_blocks.h"

namespace llama2 {
namespace LLAMA2_ISA_NS {

// out[j] for values j of groups of 16 with `scale` and (HAS_MIN) `minimum` each.
template <bool HAS_MIN>
inline void scaled_values_bf16(const int8_t* q, const float* scale, const float* minimum, int groups, bf16* out) {
  for (int g = 0; g < groups; ++g) {
    for (int j = 0; j < 16; ++j) {
      const float product = scale[g] * static_cast<float>(q[16 * g + j]);
      out[16 * g + j].bits = fp32_to_bf16_bits(HAS_MIN ? product + minimum[g] : product);
    }
  }
}

// One block (32 or 256 values) of type QT -> out[0 .. values).
template <int64_t QT>
inline void dequantize_kquant_block(const uint8_t* blk, bf16* out) {
  int8_t q[QK_K];
  float scale[QK_K / 16], minimum[QK_K / 16];
  if constexpr (QT == Q2_K) {
    decode_q2_k(blk, q, scale, minimum);
    scaled_values_bf16<true>(q, scale, minimum, 16, out);
  } else if constexpr (QT == Q3_K) {
    decode_q3_k(blk, q, scale);
    scaled_values_bf16<false>(q, scale, nullptr, 16, out);
  } else {
    constexpr int blocks = values_per_block(QT) / QK;
    int32_t slo[8], shi[8];
    float d32[8], m32[8];
    decode_block<QT>(blk, DecodedBlocks{q, slo, shi, d32, m32});
    for (int b = 0; b < blocks; ++b) {  // d32 * s: exact (an fp16 times at most 8 bits)
      scale[2 * b] = d32[b] * static_cast<float>(slo[b]);
      scale[2 * b + 1] = d32[b] * static_cast<float>(shi[b]);
      minimum[2 * b] = minimum[2 * b + 1] = m32[b];
    }
    scaled_values_bf16<kquant_has_min(QT)>(q, scale, minimum, 2 * blocks, out);
  }
}

template <int64_t QT>
inline void dequantize_kquant_row(const uint8_t* row, int64_t k, bf16* out) {
  constexpr int64_t values = values_per_block(QT), bytes = kquant_block_bytes(QT);
  for (int64_t b = 0; b < k / values; ++b) dequantize_kquant_block<QT>(row + b * bytes, out + b * values);
}

// W [n, k] of any type dequantize_type() takes, as bfloat16 [n, k]; rows split by parallel_for.
template <class ParallelFor>
void dequantize_any(const uint8_t* w, int64_t qtype, int64_t n, int64_t k, bf16* out, const ParallelFor& parallel_for) {
  if (!kquant_type(qtype)) return dequantize(w, qtype, n, k, out, parallel_for);
  const int64_t bytes = row_bytes(qtype, k);
  parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* src = w + r * bytes;
      bf16* dst = out + r * k;
      switch (qtype) {
        case Q5_0: dequantize_kquant_row<Q5_0>(src, k, dst); break;
        case Q5_1: dequantize_kquant_row<Q5_1>(src, k, dst); break;
        case Q2_K: dequantize_kquant_row<Q2_K>(src, k, dst); break;
        case Q3_K: dequantize_kquant_row<Q3_K>(src, k, dst); break;
        case Q4_K: dequantize_kquant_row<Q4_K>(src, k, dst); break;
        case Q5_K: dequantize_kquant_row<Q5_K>(src, k, dst); break;
        default: dequantize_kquant_row<Q6_K>(src, k, dst); break;
      }
    }
  });
}

}  // namespace LLAMA2_ISA_NS
}  // namespace llama2
