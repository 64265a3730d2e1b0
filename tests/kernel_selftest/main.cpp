// Self-test of the kernel variants against the scalar reference, torch-free: every
// variant named on the command line must give bitwise the same results as `scalar` on the
// GGUF matmul (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K; M = 1, 2, 3, 5, 7, 16, 17; k from 1 to
// 128 blocks of 32), the bf16 dequantizer (those and Q2_K, Q3_K) and the engine's row math.
// Built by tests/test_kernel_variants.py with the variants' objects (variant.cpp) linked in
// (-DHAVE_<NAME> for each), natively on x86 and
// as a static aarch64 binary run under qemu. Exit status 0 and one "ok" line per variant,
// or 1 and the first difference.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "api.h"

LLAMA2_SELFTEST_DECLARE(isa_scalar)
#ifdef HAVE_AVX2
LLAMA2_SELFTEST_DECLARE(isa_avx2)
#endif
#ifdef HAVE_AVX_VNNI
LLAMA2_SELFTEST_DECLARE(isa_avx_vnni)
#endif
#ifdef HAVE_AVX512_VNNI
LLAMA2_SELFTEST_DECLARE(isa_avx512_vnni)
#endif
#ifdef HAVE_NEON
LLAMA2_SELFTEST_DECLARE(isa_neon)
#endif
#ifdef HAVE_NEON_DOT
LLAMA2_SELFTEST_DECLARE(isa_neon_dot)
#endif

namespace {

const KernelApi* find(const std::string& name) {
  const KernelApi* all[] = {
      &LLAMA2_SELFTEST_API(isa_scalar)(),
#ifdef HAVE_AVX2
      &LLAMA2_SELFTEST_API(isa_avx2)(),
#endif
#ifdef HAVE_AVX_VNNI
      &LLAMA2_SELFTEST_API(isa_avx_vnni)(),
#endif
#ifdef HAVE_AVX512_VNNI
      &LLAMA2_SELFTEST_API(isa_avx512_vnni)(),
#endif
#ifdef HAVE_NEON
      &LLAMA2_SELFTEST_API(isa_neon)(),
#endif
#ifdef HAVE_NEON_DOT
      &LLAMA2_SELFTEST_API(isa_neon_dot)(),
#endif
  };
  for (const KernelApi* api : all)
    if (name == api->name) return api;
  return nullptr;
}

std::mt19937 rng(1234);

std::vector<float> randn(size_t n, float scale = 1.f) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// GGUF block geometry: values, bytes and the offsets of the fp16 fields of a block of qtype.
struct Geometry {
  int64_t values, bytes;
  std::vector<int> halves;
};
Geometry geometry(int64_t qtype) {
  switch (qtype) {
    case 2: return {32, 18, {0}};           // Q4_0
    case 3: return {32, 20, {0, 2}};        // Q4_1
    case 6: return {32, 22, {0}};           // Q5_0
    case 7: return {32, 24, {0, 2}};        // Q5_1
    case 8: return {32, 34, {0}};           // Q8_0
    case 10: return {256, 84, {80, 82}};    // Q2_K
    case 11: return {256, 110, {108}};      // Q3_K
    case 12: return {256, 144, {0, 2}};     // Q4_K
    case 13: return {256, 176, {0, 2}};     // Q5_K
    default: return {256, 210, {208}};      // Q6_K
  }
}

// Random bytes with well-formed fp16 scales (and minimums) of either sign, ~1e-3..1e-1.
std::vector<uint8_t> random_blocks(int64_t qtype, int64_t n, int64_t k) {
  const Geometry g = geometry(qtype);
  const int64_t blocks = n * k / g.values;
  std::vector<uint8_t> raw(blocks * g.bytes);
  for (uint8_t& b : raw) b = static_cast<uint8_t>(rng());
  for (int64_t b = 0; b < blocks; ++b) {
    for (int offset : g.halves) {
      const uint16_t h = static_cast<uint16_t>((rng() & 0x8000u) | ((5 + rng() % 7) << 10) | (rng() & 0x3FFu));
      std::memcpy(&raw[b * g.bytes + offset], &h, 2);
    }
  }
  return raw;
}

int checks = 0;

template <typename T>
bool same(const char* what, const std::vector<T>& a, const std::vector<T>& b, const KernelApi& api) {
  ++checks;
  if (std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0) return true;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) {
      std::printf("FAIL %s: %s differs from scalar at element %zu\n", api.name, what, i);
      break;
    }
  }
  return false;
}

using Shapes = std::vector<std::pair<int64_t, int64_t>>;
// Blocks of 32 values: 1 to 128 a row, with last groups of 1, 3, 6 and 13 blocks.
const Shapes kShapes32 = {{5, 32}, {7, 96}, {3, 192}, {5, 416}, {33, 544}, {61, 1056}, {9, 4096}};
const Shapes kShapes256 = {{5, 256}, {7, 512}, {6, 1536}, {3, 2816}, {9, 4096}};  // K-quant super-blocks

bool check_variant(const KernelApi& ref, const KernelApi& api) {
  char what[128];
  for (int64_t qtype : {2, 3, 6, 7, 8, 10, 11, 12, 13, 14}) {
    const bool matmul = qtype != 10 && qtype != 11;  // Q2_K, Q3_K: dequantized only
    for (auto [n, k] : geometry(qtype).values == 32 ? kShapes32 : kShapes256) {
      const std::vector<uint8_t> w = random_blocks(qtype, n, k);
      for (int64_t m : {1, 2, 3, 5, 7, 16, 17}) {
        if (!matmul) break;
        std::vector<float> x = randn(m * k);
        std::fill(x.begin(), x.begin() + 32, 0.f);  // an all-zero block
        std::vector<float> y0(m * n), y1(m * n);
        ref.matmul(x.data(), m, w.data(), qtype, n, k, y0.data());
        api.matmul(x.data(), m, w.data(), qtype, n, k, y1.data());
        std::snprintf(what, sizeof what, "matmul qtype %lld [%lld x %lld] x [%lld x %lld]^T", (long long)qtype,
                      (long long)m, (long long)k, (long long)n, (long long)k);
        if (!same(what, y0, y1, api)) return false;
      }
      std::vector<uint16_t> d0(n * k), d1(n * k);
      ref.dequantize(w.data(), qtype, n, k, d0.data());
      api.dequantize(w.data(), qtype, n, k, d1.data());
      std::snprintf(what, sizeof what, "dequantize qtype %lld [%lld x %lld]", (long long)qtype, (long long)n,
                    (long long)k);
      if (!same(what, d0, d1, api)) return false;
    }
  }
  for (int64_t n : {1, 7, 16, 17, 64, 100, 576, 1536}) {
    const std::vector<float> a = randn(n), b = randn(n), weight = randn(n);
    std::vector<uint16_t> b16(n);
    for (int64_t i = 0; i < n; ++i) std::memcpy(&b16[i], reinterpret_cast<const char*>(&b[i]) + 2, 2);
    std::snprintf(what, sizeof what, "row math, n = %lld", (long long)n);
    const std::vector<float> dots0 = {ref.dot(a.data(), b.data(), n), ref.dot_bf16(a.data(), b16.data(), n)};
    const std::vector<float> dots1 = {api.dot(a.data(), b.data(), n), api.dot_bf16(a.data(), b16.data(), n)};
    std::vector<float> s0 = randn(n, 8.f), s1 = s0, g0(n), g1(n), r0(n), r1(n);
    ref.softmax(s0.data(), n);
    api.softmax(s1.data(), n);
    ref.swiglu(a.data(), b.data(), g0.data(), n);
    api.swiglu(a.data(), b.data(), g1.data(), n);
    ref.rms_norm(a.data(), weight.data(), n, 1e-5f, r0.data());
    api.rms_norm(a.data(), weight.data(), n, 1e-5f, r1.data());
    if (!same(what, dots0, dots1, api) || !same(what, s0, s1, api) || !same(what, g0, g1, api) ||
        !same(what, r0, r1, api))
      return false;
  }
  for (int64_t head_dim : {32, 64, 128}) {
    const int64_t keys = 37;
    std::vector<float> p = randn(keys), v = randn(keys * head_dim), o0(head_dim), o1(head_dim);
    ref.weighted_rows(p.data(), v.data(), keys, head_dim, o0.data());
    api.weighted_rows(p.data(), v.data(), keys, head_dim, o1.data());
    if (!same("weighted rows", o0, o1, api)) return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const KernelApi* ref = find("scalar");
  int failed = 0;
  for (int i = 1; i < argc; ++i) {
    const KernelApi* api = find(argv[i]);
    if (api == nullptr) {
      std::printf("FAIL %s: not linked into this driver\n", argv[i]);
      return 1;
    }
    checks = 0;
    if (check_variant(*ref, *api)) {
      std::printf("ok %s: %d comparisons bitwise equal to scalar\n", api->name, checks);
    } else {
      failed = 1;
    }
  }
  return failed;
}
