// The primitive interface (see scalar.h) in AVX-512 (F, BW, VL) + FMA + F16C: F16 is one
// zmm. The block matmul of this variant does not go through group_isums: it has its own
// VNNI kernels (avx512_vnni_gemv.h) that compute the same exact block sums and the same
// float accumulation, laid out for zmm.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../core/blocks.h"

namespace llama2 {
namespace simd_avx512_vnni {

constexpr const char* kName = "avx512_vnni";

struct F16 {
  __m512 v;
};
struct I16 {
  __m512i v;
};

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {  // bf16 -> fp32 is a 16-bit left shift
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const fp16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// 16 lanes rounded to bf16 as fp32_to_bf16_bits: nearest even, NaN -> 0x7FC0.
inline __m256i bf16x16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

inline F16 zero() { return {_mm512_setzero_ps()}; }
inline F16 set1(float x) { return {_mm512_set1_ps(x)}; }
template <typename T>
inline F16 load(const T* p) {
  return {load16(p)};
}
template <typename T>
inline F16 load_partial(const T* p, int n) {
  T tmp[16] = {};
  for (int i = 0; i < n; ++i) tmp[i] = p[i];
  return load(tmp);
}
inline F16 load_partial(const float* p, int n) { return {_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p)}; }
inline void store(float* p, const F16& a) { _mm512_storeu_ps(p, a.v); }
inline void store_partial(float* p, const F16& a, int n) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), a.v);
}
inline void store_bf16(bf16* p, const F16& a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16x16(a.v)); }

inline F16 add(const F16& a, const F16& b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F16 sub(const F16& a, const F16& b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline F16 mul(const F16& a, const F16& b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F16 div(const F16& a, const F16& b) { return {_mm512_div_ps(a.v, b.v)}; }
inline F16 min(const F16& a, const F16& b) { return {_mm512_min_ps(a.v, b.v)}; }
inline F16 max(const F16& a, const F16& b) { return {_mm512_max_ps(a.v, b.v)}; }
inline F16 fmadd(const F16& a, const F16& b, const F16& c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline F16 fnmadd(const F16& a, const F16& b, const F16& c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
inline F16 round_even(const F16& a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline F16 exp2i(const F16& n) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127)), 23))};
}

// See scalar.h: t_j = v_j + v_{j+8}, then ((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 + t7)).
inline float reduce_add(const F16& a) {
  const __m256 t = _mm256_add_ps(_mm512_castps512_ps256(a.v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1)));
  const __m256 p = _mm256_hadd_ps(t, t);
  const __m256 q = _mm256_hadd_ps(p, p);
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1)));
}
inline float reduce_max(const F16& a) { return _mm512_reduce_max_ps(a.v); }

inline F16 to_float(const I16& a) { return {_mm512_cvtepi32_ps(a.v)}; }
inline F16 load_fp16(const uint16_t* h) { return load(reinterpret_cast<const fp16*>(h)); }

// See scalar.h.
template <int64_t QT>
inline void block_values(const uint8_t* qs, F16& lo, F16& hi) {
  if (QT == Q8_0) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
    lo = {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)))};
    hi = {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)))};
    return;
  }
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  lo = {_mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0F)))};
  hi = {_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4))};
}

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

}  // namespace simd_avx512_vnni
}  // namespace llama2
