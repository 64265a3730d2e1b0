// GGUF Q4_0 / Q4_1 / Q8_0 blocks decoded to a bfloat16 matrix, for prefill chunks: one
// pass over the blocks at memory speed, then PyTorch's bf16 GEMM (oneDNN) does the math.
//
// Registered as llama2_kernels::gguf_dequantize(Tensor raw, int qtype, int n, int k) -> Tensor
// (a fragment of the library gguf_gemv.cpp defines). Values are computed in fp32 exactly as
// ggml does (Q4_0: d * (q - 8), Q4_1: d * q + m, Q8_0: d * q) and rounded once to bf16
// (round to nearest even).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "gguf_kernels.h"

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)
#define GGUF_DEQUANT_AVX512 1
#include <immintrin.h>
#else
#define GGUF_DEQUANT_AVX512 0
#endif

namespace {

using GGUF_NS::kQ4_0;
using GGUF_NS::kQ4_1;
using GGUF_NS::kQ8_0;

float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(bits);
}

#if GGUF_DEQUANT_AVX512
using GGUF_NS::store_bf16x16;

// One block of 32 values: q holds the 32 unsigned (Q4) or signed (Q8_0) integers as int32 in two halves.
inline void store_block(c10::BFloat16* out, __m512i q_lo, __m512i q_hi, float d, float offset) {
  __m512 scale = _mm512_set1_ps(d), shift = _mm512_set1_ps(offset);
  store_bf16x16(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(q_lo), scale, shift));
  store_bf16x16(out + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(q_hi), scale, shift));
}
#endif

// Decode one row of k / 32 blocks into out[0 .. k).
void dequantize_row(const uint8_t* row, int64_t qtype, int64_t blocks, c10::BFloat16* out) {
  const int64_t block_bytes = GGUF_NS::gguf_block_bytes(qtype);
  for (int64_t b = 0; b < blocks; ++b, row += block_bytes, out += 32) {
    const float d = half_at(row);
    if (qtype == kQ8_0) {
      const int8_t* qs = reinterpret_cast<const int8_t*>(row + 2);
#if GGUF_DEQUANT_AVX512
      __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
      store_block(out, _mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)),
                  _mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)), d, 0.0f);
#else
      for (int j = 0; j < 32; ++j) out[j] = c10::BFloat16(d * qs[j]);
#endif
      continue;
    }
    // Q4: value = d * nibble + offset; offset = -8 d (Q4_0) or the block minimum m (Q4_1).
    const float offset = qtype == kQ4_0 ? -8.0f * d : half_at(row + 2);
    const uint8_t* qs = row + (qtype == kQ4_0 ? 2 : 4);
#if GGUF_DEQUANT_AVX512
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    __m512i low = _mm512_and_si512(bytes, _mm512_set1_epi32(0x0F));  // values 0..15
    __m512i high = _mm512_srli_epi32(bytes, 4);                       // values 16..31
    store_block(out, low, high, d, offset);
#else
    for (int j = 0; j < 16; ++j) {
      out[j] = c10::BFloat16(d * static_cast<float>(qs[j] & 0x0F) + offset);
      out[j + 16] = c10::BFloat16(d * static_cast<float>(qs[j] >> 4) + offset);
    }
#endif
  }
}

}  // namespace

namespace GGUF_NS {

at::Tensor gguf_dequantize(const at::Tensor& raw, int64_t qtype, int64_t n, int64_t k) {
  TORCH_CHECK(qtype == kQ4_0 || qtype == kQ4_1 || qtype == kQ8_0, "gguf_dequantize: unsupported qtype ", qtype);
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.device().is_cpu(), "gguf_dequantize: raw must be uint8 on the CPU");
  TORCH_CHECK(k % 32 == 0 && n >= 0, "gguf_dequantize: k must be a multiple of 32");
  const int64_t block_bytes = gguf_block_bytes(qtype);
  const int64_t row_bytes = k / 32 * block_bytes;
  TORCH_CHECK(raw.numel() == n * row_bytes, "gguf_dequantize: raw has ", raw.numel(), " bytes, an [", n, ", ", k,
              "] weight of this type needs ", n * row_bytes);
  at::Tensor blocks = raw.contiguous();
  at::Tensor out = at::empty({n, k}, at::TensorOptions().dtype(at::kBFloat16));
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  c10::BFloat16* dst = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) dequantize_row(src + row * row_bytes, qtype, k / 32, dst + row * k);
  });
  return out;
}

}  // namespace GGUF_NS

TORCH_LIBRARY_FRAGMENT(GGUF_NS, m) { m.def("gguf_dequantize(Tensor raw, int qtype, int n, int k) -> Tensor"); }
TORCH_LIBRARY_IMPL(GGUF_NS, CPU, m) { m.impl("gguf_dequantize", &GGUF_NS::gguf_dequantize); }
