// Torch glue of the GGUF block matmul (core/gemv.h): registered as the torch op
// GGUF_NS::gguf_matmul(Tensor x, Tensor raw, int qtype, int n, int k) -> Tensor, with
// gguf_isa() -> str (the variant this library was built as) and gguf_quantize_rows(x)
// (the activation quantization alone, for tests). GGUF_NS is llama2_kernels, or a test
// build's own (-DGGUF_NS=...).

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <tuple>

#include "gguf_kernels.h"

static_assert(sizeof(c10::Half) == sizeof(llama2::fp16), "fp16 storage is 16 bits");

namespace GGUF_NS {

at::Tensor gguf_matmul(const at::Tensor& x_in, const at::Tensor& raw_in, int64_t qtype, int64_t n, int64_t k) {
  TORCH_CHECK(x_in.device().is_cpu() && raw_in.device().is_cpu(), "gguf_matmul: CPU tensors only");
  TORCH_CHECK(llama2::matmul_type(qtype), "gguf_matmul: unsupported qtype ", qtype,
              " (Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14)");
  const int64_t block_values = llama2::values_per_block(qtype);
  TORCH_CHECK(k > 0 && k % block_values == 0, "gguf_matmul: k must be a positive multiple of ", block_values,
              " (the type's block), got ", k);
  TORCH_CHECK(n >= 0, "gguf_matmul: n must be >= 0");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == k, "gguf_matmul: x's last dimension must be k = ", k);
  TORCH_CHECK(raw_in.scalar_type() == at::kByte, "gguf_matmul: raw must be uint8");
  const int64_t expected = n * llama2::row_bytes(qtype, k);
  TORCH_CHECK(raw_in.numel() == expected, "gguf_matmul: raw has ", raw_in.numel(), " bytes, an [", n, ", ", k,
              "] weight of this type needs ", expected);
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "gguf_matmul: x must be float32, bfloat16 or float16");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor raw = raw_in.contiguous();

  at::DimVector out_shape(x.sizes());  // no heap allocation
  out_shape.back() = n;
  at::Tensor y = at::empty(out_shape, x.options().dtype(at::kFloat));  // the kernels write fp32
  const int64_t m_rows = x.numel() / k;
  const uint8_t* w = raw.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  switch (dtype) {
    case at::kFloat: K::matmul(x.data_ptr<float>(), m_rows, w, qtype, n, k, yp, AtParallel{}); break;
    case at::kBFloat16: {
      const auto* xp = reinterpret_cast<const llama2::bf16*>(x.data_ptr<c10::BFloat16>());
      K::matmul(xp, m_rows, w, qtype, n, k, yp, AtParallel{});
      break;
    }
    default: {
      const auto* xp = reinterpret_cast<const llama2::fp16*>(x.data_ptr<c10::Half>());
      K::matmul(xp, m_rows, w, qtype, n, k, yp, AtParallel{});
      break;
    }
  }
  return dtype == at::kFloat ? y : y.to(dtype);
}

}  // namespace GGUF_NS

namespace {

std::string gguf_isa() { return llama2::LLAMA2_SIMD::kName; }

// The activation quantization alone (for tests): x [M, K] -> (int8 q [M, K], fp32 d [M, K / 32]).
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) > 0 && x_in.size(1) % 32 == 0,
              "gguf_quantize_rows: x must be [M, K] with K % 32 == 0");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();  // bf16 / fp16 -> fp32 is exact
  const int64_t m_rows = x.size(0), k = x.size(1), nb = k / 32;
  const auto acts = GGUF_NS::K::quantize_acts(x.data_ptr<float>(), m_rows, k, 0, GGUF_NS::AtParallel{});
  at::Tensor q = at::empty({m_rows, k}, at::kChar), d = at::empty({m_rows, nb}, at::kFloat);
  for (int64_t m = 0; m < m_rows; ++m) {
    std::memcpy(q.data_ptr<int8_t>() + m * k, acts.q(m), k);
    std::memcpy(d.data_ptr<float>() + m * nb, acts.d(m), nb * 4);
  }
  return {q, d};
}

}  // namespace

// TORCH_LIBRARY pastes its namespace argument, so GGUF_NS is expanded through one more macro.
#define GGUF_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define GGUF_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

GGUF_LIBRARY(GGUF_NS, m) {
  m.def("gguf_matmul(Tensor x, Tensor raw, int qtype, int n, int k) -> Tensor");
  m.def("gguf_isa() -> str", &gguf_isa);
  m.def("gguf_quantize_rows(Tensor x) -> (Tensor, Tensor)", &quantize_rows);
}

GGUF_LIBRARY_IMPL(GGUF_NS, CPU, m) { m.impl("gguf_matmul", &GGUF_NS::gguf_matmul); }
