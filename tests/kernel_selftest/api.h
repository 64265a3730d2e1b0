// The kernels of one variant behind plain function pointers: variant.cpp is compiled once
// per variant (-DLLAMA2_ISA_<NAME>, that variant's flags) and main.cpp compares them.
#pragma once

#include <cstdint>

struct KernelApi {
  const char* name;
  void (*matmul)(const float* x, int64_t m, const uint8_t* w, int64_t qtype, int64_t n, int64_t k, float* y);
  void (*dequantize)(const uint8_t* w, int64_t qtype, int64_t n, int64_t k, uint16_t* out);
  float (*dot)(const float* a, const float* b, int64_t n);
  float (*dot_bf16)(const float* a, const uint16_t* b, int64_t n);
  void (*softmax)(float* x, int64_t n);
  void (*swiglu)(const float* gate, const float* up, float* out, int64_t n);
  void (*rms_norm)(const float* x, const float* weight, int64_t n, float eps, float* out);
  void (*weighted_rows)(const float* p, const float* v, int64_t keys, int64_t n, float* out);
};

#define LLAMA2_SELFTEST_API(isa) selftest_api_##isa
#define LLAMA2_SELFTEST_DECLARE(isa) const KernelApi& LLAMA2_SELFTEST_API(isa)();
