// Torch glue of the bf16 dequantizer (core/dequant.h): registered as
// GGUF_NS::gguf_dequantize(Tensor raw, int qtype, int n, int k) -> Tensor, a fragment of the
// library gguf_gemv.cpp defines.

#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "core/kquant_dequant.h"
#include "gguf_kernels.h"

static_assert(sizeof(c10::BFloat16) == sizeof(llama2::bf16), "bf16 storage is 16 bits");

namespace GGUF_NS {

at::Tensor gguf_dequantize(const at::Tensor& raw, int64_t qtype, int64_t n, int64_t k) {
  TORCH_CHECK(llama2::dequantize_type(qtype), "gguf_dequantize: unsupported qtype ", qtype);
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.device().is_cpu(), "gguf_dequantize: raw must be uint8 on the CPU");
  TORCH_CHECK(k % llama2::values_per_block(qtype) == 0 && n >= 0, "gguf_dequantize: k must be a multiple of ",
              llama2::values_per_block(qtype));
  const int64_t row_bytes = llama2::row_bytes(qtype, k);
  TORCH_CHECK(raw.numel() == n * row_bytes, "gguf_dequantize: raw has ", raw.numel(), " bytes, an [", n, ", ", k,
              "] weight of this type needs ", n * row_bytes);
  const at::Tensor blocks = raw.contiguous();
  at::Tensor out = at::empty({n, k}, at::TensorOptions().dtype(at::kBFloat16));
  K::dequantize_any(blocks.data_ptr<uint8_t>(), qtype, n, k,
                    reinterpret_cast<llama2::bf16*>(out.data_ptr<c10::BFloat16>()), AtParallel{});
  return out;
}

}  // namespace GGUF_NS

#define GGUF_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define GGUF_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
GGUF_LIBRARY_FRAGMENT(GGUF_NS, m) { m.def("gguf_dequantize(Tensor raw, int qtype, int n, int k) -> Tensor"); }
GGUF_LIBRARY_IMPL(GGUF_NS, CPU, m) { m.impl("gguf_dequantize", &GGUF_NS::gguf_dequantize); }
