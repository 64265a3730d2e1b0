// The native engine's float math on rows (torch-free), written once against the simd/
// primitives so that every variant computes bitwise the same values.
//
// Reduction order (the same as the matmul's, see simd/scalar.h): a sum over elements
// i = 0 .. n-1 keeps 16 fp32 partial sums, element i into partial i % 16 in increasing i
// (dot products as fused multiply-adds), then reduce_add's fixed tree. Tails shorter than
// 16 are read as zero lanes (a partial that starts at +0 is unchanged by +0 terms).
// Element-wise functions round each operation once, fused where written fmadd / fnmadd.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "blocks.h"
#include "isa.h"

namespace llama2 {
namespace LLAMA2_ISA_NS {

namespace V = ::llama2::LLAMA2_SIMD;

// e^x: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two parts for an exact n ln2), e^r
// by its Taylor series to degree 6 in Horner form (relative error ~1e-7), times 2^n.
// x is clamped to [-87, 88] so that 2^n stays a normal float.
inline V::F16 exp16(V::F16 x) {
  x = V::min(V::max(x, V::set1(-87.0f)), V::set1(88.0f));
  const V::F16 n = V::round_even(V::mul(x, V::set1(1.44269504088896341f)));
  V::F16 r = V::fnmadd(n, V::set1(0.693359375f), x);
  r = V::fnmadd(n, V::set1(-2.12194440e-4f), r);
  V::F16 p = V::set1(1.0f / 720);
  p = V::fmadd(p, r, V::set1(1.0f / 120));
  p = V::fmadd(p, r, V::set1(1.0f / 24));
  p = V::fmadd(p, r, V::set1(1.0f / 6));
  p = V::fmadd(p, r, V::set1(0.5f));
  p = V::fmadd(p, r, V::set1(1.0f));
  p = V::fmadd(p, r, V::set1(1.0f));
  return V::mul(p, V::exp2i(n));
}

// sum_i a[i] * b[i] (b float32 or bfloat16)
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  V::F16 acc = V::zero();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = V::fmadd(V::load(a + i), V::load(b + i), acc);
  if (i < n) {
    const int r = static_cast<int>(n - i);
    acc = V::fmadd(V::load_partial(a + i, r), V::load_partial(b + i, r), acc);
  }
  return V::reduce_add(acc);
}

// y[i] = fma(alpha, x[i], y[i])
template <typename T>
inline void axpy(float alpha, const T* x, float* y, int64_t n) {
  const V::F16 va = V::set1(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) V::store(y + i, V::fmadd(va, V::load(x + i), V::load(y + i)));
  if (i < n) {
    const int r = static_cast<int>(n - i);
    V::store_partial(y + i, V::fmadd(va, V::load_partial(x + i, r), V::load_partial(y + i, r)), r);
  }
}

// o = sum_j p[j] * v[j], VECS * 16 values a row, the sums kept in registers.
template <int VECS, typename C>
inline void weighted_rows_fixed(const float* p, const C* v, int64_t keys, float* o) {
  V::F16 acc[VECS];
  for (int i = 0; i < VECS; ++i) acc[i] = V::zero();
  for (int64_t j = 0; j < keys; ++j, v += VECS * 16) {
    const V::F16 weight = V::set1(p[j]);
    for (int i = 0; i < VECS; ++i) acc[i] = V::fmadd(weight, V::load(v + 16 * i), acc[i]);
  }
  for (int i = 0; i < VECS; ++i) V::store(o + 16 * i, acc[i]);
}

// o[0 .. n) = sum over j < keys (in order) of p[j] * v[j * n .. j * n + n), each term fused.
template <typename C>
inline void weighted_rows(const float* p, const C* v, int64_t keys, int64_t n, float* o) {
  switch (n) {
    case 64: return weighted_rows_fixed<4>(p, v, keys, o);
    case 128: return weighted_rows_fixed<8>(p, v, keys, o);
    default: break;
  }
  std::fill(o, o + n, 0.f);
  for (int64_t j = 0; j < keys; ++j) axpy(p[j], v + j * n, o, n);
}

// x[0 .. n) <- softmax(x[0 .. n)) (n >= 1)
inline void softmax_inplace(float* x, int64_t n) {
  float max = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) max = std::max(max, x[i]);
  const V::F16 vmax = V::set1(max);
  V::F16 acc = V::zero();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const V::F16 e = exp16(V::sub(V::load(x + i), vmax));
    V::store(x + i, e);
    acc = V::add(acc, e);
  }
  if (i < n) {
    const int r = static_cast<int>(n - i);
    V::store_partial(x + i, exp16(V::sub(V::load_partial(x + i, r), vmax)), r);
    acc = V::add(acc, V::load_partial(x + i, r));  // the tail's exps, zero lanes after it
  }
  const float inv = 1.f / V::reduce_add(acc);
  for (int64_t j = 0; j < n; ++j) x[j] *= inv;
}

// out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + e^-gate[i]) * up[i]
inline V::F16 swiglu16(const V::F16& g, const V::F16& up) {
  const V::F16 e = exp16(V::sub(V::zero(), g));
  return V::mul(V::div(g, V::add(V::set1(1.f), e)), up);
}
inline void swiglu(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) V::store(out + i, swiglu16(V::load(gate + i), V::load(up + i)));
  if (i < n) {
    const int r = static_cast<int>(n - i);
    V::store_partial(out + i, swiglu16(V::load_partial(gate + i, r), V::load_partial(up + i, r)), r);
  }
}

// out = x / sqrt(mean(x^2) + eps) * weight, each element (x * scale) * weight
inline void rms_norm(const float* x, const float* weight, int64_t n, float eps, float* out) {
  const float scale = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * weight[i];
}

// Adjacent channel pairs (2i, 2i + 1) of each head rotated by the angles cos[i], sin[i]
// (each product rounded, then the difference / sum: no fused operations).
inline void rotate_heads(float* x, int64_t heads, int64_t head_dim, const float* cos, const float* sin) {
  for (int64_t h = 0; h < heads; ++h, x += head_dim) {
    for (int64_t i = 0; i < head_dim / 2; ++i) {
      const float even = x[2 * i], odd = x[2 * i + 1];
      x[2 * i] = even * cos[i] - odd * sin[i];
      x[2 * i + 1] = even * sin[i] + odd * cos[i];
    }
  }
}

// float32 copies of rows in a cache's dtype, and back (bf16 rounded to nearest even).
inline void load_row(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
inline void store_row(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
inline void load_row(const bf16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) V::store(dst + i, V::load(src + i));
  for (; i < n; ++i) dst[i] = to_f32(src[i]);
}
inline void store_row(const float* src, bf16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) V::store_bf16(dst + i, V::load(src + i));
  for (; i < n; ++i) dst[i].bits = fp32_to_bf16_bits(src[i]);
}

}  // namespace LLAMA2_ISA_NS
}  // namespace llama2
