// Functions the GGUF kernels share between their source files (one library, namespace
// GGUF_NS: llama2_kernels, or a test build's own).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

#ifndef GGUF_NS
#define GGUF_NS llama2_kernels
#endif

namespace GGUF_NS {

// GGML type ids (gguf.GGMLQuantizationType) of the block formats the kernels compute on.
constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8;

// Bytes of one block of 32 values.
constexpr int64_t gguf_block_bytes(int64_t qtype) {
  return qtype == kQ4_0 ? 18 : qtype == kQ4_1 ? 20 : qtype == kQ8_0 ? 34 : 0;
}

// y[m, n] = x[m, k] W^T for W [n, k] given as GGUF blocks `w` (row-major, k / 32 blocks a
// row); x and y are contiguous float32. The arithmetic of the op gguf_matmul.
void gguf_matmul_f32(const float* x, int64_t m, const uint8_t* w, int64_t qtype, int64_t n, int64_t k, float* y);

// W [n, k] as bfloat16 from its blocks (the op gguf_dequantize).
at::Tensor gguf_dequantize(const at::Tensor& raw, int64_t qtype, int64_t n, int64_t k);

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16 fp32 lanes rounded to bf16 (nearest even; finite values) and stored at out.
inline void store_bf16x16(c10::BFloat16* out, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}
#endif

}  // namespace GGUF_NS
