// One kernel variant (the -DLLAMA2_ISA_<NAME> of this compilation) as a KernelApi, serial.
#include <cstdint>

#include "api.h"
#include "core/gemv.h"
#include "core/kquant_dequant.h"
#include "core/vec_math.h"

namespace {

namespace K = llama2::LLAMA2_ISA_NS;

struct Serial {
  template <class Fn>
  void operator()(int64_t begin, int64_t end, int64_t, const Fn& fn) const {
    if (begin < end) fn(begin, end);
  }
};

void matmul(const float* x, int64_t m, const uint8_t* w, int64_t qtype, int64_t n, int64_t k, float* y) {
  K::matmul(x, m, w, qtype, n, k, y, Serial{});
}
void dequantize(const uint8_t* w, int64_t qtype, int64_t n, int64_t k, uint16_t* out) {
  K::dequantize_any(w, qtype, n, k, reinterpret_cast<llama2::bf16*>(out), Serial{});
}
float dot(const float* a, const float* b, int64_t n) { return K::dot(a, b, n); }
float dot_bf16(const float* a, const uint16_t* b, int64_t n) {
  return K::dot(a, reinterpret_cast<const llama2::bf16*>(b), n);
}
void softmax(float* x, int64_t n) { K::softmax_inplace(x, n); }
void swiglu(const float* g, const float* u, float* o, int64_t n) { K::swiglu(g, u, o, n); }
void rms_norm(const float* x, const float* w, int64_t n, float eps, float* o) { K::rms_norm(x, w, n, eps, o); }
void weighted_rows(const float* p, const float* v, int64_t keys, int64_t n, float* o) {
  K::weighted_rows(p, v, keys, n, o);
}

}  // namespace

#define LLAMA2_DEFINE_API(isa)                                                                              \
  const KernelApi& LLAMA2_SELFTEST_API(isa)() {                                                             \
    static const KernelApi api{llama2::LLAMA2_SIMD::kName, matmul, dequantize, dot, dot_bf16, softmax, swiglu, \
                               rms_norm, weighted_rows};                                                     \
    return api;                                                                                             \
  }
#define LLAMA2_DEFINE_API_OF(isa) LLAMA2_DEFINE_API(isa)
LLAMA2_DEFINE_API_OF(LLAMA2_ISA_NS)
