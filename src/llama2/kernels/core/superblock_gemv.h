// y = x W^T straight from GGUF Q4_K / Q5_K / Q6_K super-blocks against Q8_K-style
// activations (torch-free): llama.cpp's scheme for the K-quants, one float term per
// super-block instead of one per block of 32.
//
// Activations: every row quantized per super-block of 256 values to int8 with one fp32
// scale exactly as llama.cpp's Q8_K (quantize_q8_k), plus the exact sums of each 32 of them
// (sum32). A weight super-block's values w (Q4_K: the nibble,
// Q5_K: nibble | 5th bit << 4, Q6_K: q - 32) times its integer scales sc (Q4_K / Q5_K: 8
// of 6 bits, one per 32 values; Q6_K: 16 int8, one per 16 values) give, with the super-block
// cut into 4 chunks of 64 values c and each chunk into halves h of 32,
//
//     S[8 h + l] = sum over c of sc(value) * (w . x over values 64 c + 32 h + 4 l .. + 3)
//
// 16 exact int32 lanes (|S| <= 4 * 127 * 4 * 32 * 127 < 2^24: exact in fp32), and for the
// types with a minimum (Q4_K / Q5_K, value = d sc q - dmin m)
//
//     M[s] = m_s * sum32_s (s < 8),  M[8 ..] = 0.
//
// The float order, identical in every variant (so all give bitwise the same y): 16 fp32
// partial sums; per super-block in increasing order acc = fma(float(S), fp32(d * d_x), acc),
// then acc = fnmadd(float(M), fp32(dmin * d_x), acc); y = reduce_add(acc). The integer
// lanes come from the ISA's superblock_isums / mins_products (simd/*_kquant.h); everything
// else is written once here. Rows do not depend on M. Included at the end of gemv.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "gemv.h"
#include "kquant_blocks.h"
#include "kquant_gemv.h"  // the variant's superblock_isums, mins_products

namespace llama2 {
namespace LLAMA2_ISA_NS {

// Q8_K-style activation rows: per super-block s, q[256 s ..] int8, d[s] fp32, sum32[8 s ..].
struct SuperActs {
  int64_t nsb = 0, row_bytes = 0;  // super-blocks per row, bytes per row in the buffer
  uint8_t* base = nullptr;

  static int64_t bytes_per_row(int64_t nsb) { return (nsb * (QK_K + 4 + 8 * 4) + 63) / 64 * 64; }
  SuperActs(int64_t nsb_, uint8_t* buffer) : nsb(nsb_), row_bytes(bytes_per_row(nsb_)), base(buffer) {}
  int8_t* q(int64_t m) const { return reinterpret_cast<int8_t*>(base + m * row_bytes); }
  float* d(int64_t m) const { return reinterpret_cast<float*>(q(m) + nsb * QK_K); }
  int32_t* sum32(int64_t m) const { return reinterpret_cast<int32_t*>(d(m) + nsb); }
};

// 256 values -> int8 q, returns their scale d: llama.cpp's Q8_K exactly (quantize_row_q8_K_ref):
// `peak` the first value of the largest magnitude, iscale = -127 / peak, q = min(127,
// round-half-even(iscale * x)), d = 1 / iscale (all 0 for an all-zero block).
template <typename T>
inline float quantize_q8_k(const T* x, int8_t* q) {
  float v[QK_K];
  float amax = 0.f, peak = 0.f;
  for (int j = 0; j < QK_K; ++j) {
    v[j] = to_f32(x[j]);
    if (std::fabs(v[j]) > amax) {
      amax = std::fabs(v[j]);
      peak = v[j];
    }
  }
  if (amax == 0.f) {
    std::memset(q, 0, QK_K);
    return 0.f;
  }
  const float iscale = -127.f / peak;
  for (int j = 0; j < QK_K; ++j) q[j] = static_cast<int8_t>(std::min(127.f, std::nearbyint(iscale * v[j])));
  return 1.f / iscale;
}

template <typename T>
void quantize_super_row(const T* x, const SuperActs& acts, int64_t m) {
  int8_t* q = acts.q(m);
  int32_t* sum32 = acts.sum32(m);
  for (int64_t s = 0; s < acts.nsb; ++s) {
    acts.d(m)[s] = quantize_q8_k(x + s * QK_K, q + s * QK_K);
    for (int b = 0; b < QK_K / QK; ++b) {
      int32_t sum = 0;
      for (int j = 0; j < QK; ++j) sum += q[s * QK_K + b * QK + j];
      sum32[s * 8 + b] = sum;
    }
  }
}

// A super-block's integer scales as superblock_isums takes them (Q4_K / Q5_K: 8 scales
// then 8 minimums, k4_scales_mins; Q6_K: its 16 int8 scales) and its fp16 d, dmin as fp32.
template <int64_t QT>
struct SuperScales {
  alignas(16) uint8_t bytes[16];
  float d, dmin;

  explicit SuperScales(const uint8_t* sb) {
    if constexpr (QT == Q6_K) {
      std::memcpy(bytes, sb + offsetof(block_q6_K, scales), 16);
      d = half_at(sb + offsetof(block_q6_K, d));
      dmin = 0.f;
    } else {
      k4_scales_mins(sb + offsetof(block_q4_K, scales), bytes);
      d = half_at(sb);
      dmin = half_at(sb + 2);
    }
  }
};

// One weight row against MD activation rows m0 .. m0 + MD - 1: out[md]. One row at a time
// (not a tile of rows side by side): the weights stream from memory in one sequential run,
// which the hardware prefetchers follow at full bandwidth (4 rows at a time ran at half).
template <int64_t QT, int MD>
void superblock_row(const uint8_t* w, const SuperActs& acts, int64_t m0, float* out) {
  constexpr int64_t BYTES = kquant_block_bytes(QT);
  V::F16 acc[MD];
  for (int md = 0; md < MD; ++md) acc[md] = V::zero();
  for (int64_t s = 0; s < acts.nsb; ++s) {
    const uint8_t* sb = w + s * BYTES;
    const SuperScales<QT> scales(sb);
    const int8_t* x[MD];
    for (int md = 0; md < MD; ++md) x[md] = acts.q(m0 + md) + s * QK_K;
    V::I16 isum[MD];
    V::superblock_isums<QT, MD>(sb, scales.bytes, x, isum);
    for (int md = 0; md < MD; ++md) {
      const float dx = acts.d(m0 + md)[s];
      acc[md] = V::fmadd(V::to_float(isum[md]), V::set1(scales.d * dx), acc[md]);
      if constexpr (QT != Q6_K) {
        const V::I16 mins = V::mins_products(scales.bytes + 8, acts.sum32(m0 + md) + 8 * s);
        acc[md] = V::fnmadd(V::to_float(mins), V::set1(scales.dmin * dx), acc[md]);
      }
    }
  }
  for (int md = 0; md < MD; ++md) out[md] = V::reduce_add(acc[md]);
}

template <int64_t QT, class ParallelFor>
void superblock_rows(const uint8_t* w, const SuperActs& acts, int64_t m_rows, int64_t n, float* y,
                     const ParallelFor& parallel_for) {
  const int64_t row_bytes = acts.nsb * kquant_block_bytes(QT);
  const int64_t grain = std::max<int64_t>(1, TASK_MIN_BYTES / (row_bytes * std::min<int64_t>(m_rows, 4)));
  parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = w + r * row_bytes;
      float out[4];
      int64_t m = 0;
      for (; m + 4 <= m_rows; m += 4) {  // each decoded super-block serves four activation rows
        superblock_row<QT, 4>(row, acts, m, out);
        for (int md = 0; md < 4; ++md) y[(m + md) * n + r] = out[md];
      }
      for (; m + 2 <= m_rows; m += 2) {
        superblock_row<QT, 2>(row, acts, m, out);
        for (int md = 0; md < 2; ++md) y[(m + md) * n + r] = out[md];
      }
      if (m < m_rows) {
        superblock_row<QT, 1>(row, acts, m, out);
        y[m * n + r] = out[0];
      }
    }
  });
}

// gemv.h's matmul for Q4_K / Q5_K / Q6_K (qtype and k, a multiple of 256, checked by the caller).
template <typename T, class ParallelFor>
void matmul_superblocks(const T* x, int64_t m_rows, const uint8_t* w, int64_t qtype, int64_t n, int64_t k, float* y,
                        const ParallelFor& parallel_for) {
  static thread_local Scratch act_scratch;
  const SuperActs acts(k / QK_K, act_scratch.get(m_rows * SuperActs::bytes_per_row(k / QK_K)));
  parallel_for(0, m_rows, std::max<int64_t>(1, 65536 / k), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_super_row(x + m * k, acts, m);
  });
  switch (qtype) {
    case Q4_K: superblock_rows<Q4_K>(w, acts, m_rows, n, y, parallel_for); break;
    case Q5_K: superblock_rows<Q5_K>(w, acts, m_rows, n, y, parallel_for); break;
    default: superblock_rows<Q6_K>(w, acts, m_rows, n, y, parallel_for); break;
  }
}

}  // namespace LLAMA2_ISA_NS
}  // namespace llama2
