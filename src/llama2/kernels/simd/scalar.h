// The primitive interface every kernel is written against, in portable C++: the reference
// that each ISA header (avx2.h, avx512.h, neon.h) implements with bitwise the same results.
//
//   F16  16 float lanes        I16  16 int32 lanes
//   zero, set1, load, load_partial (lanes >= n read as 0), store, store_partial,
//   add, sub, mul, div, min, max,
//   fmadd(a, b, c) = a * b + c and fnmadd(a, b, c) = c - a * b, each rounded ONCE (fused),
//   round_even (to an integral value, ties to even), exp2i (2^n for integral n in [-126, 127]),
//   reduce_add (THE float reduction order, below), reduce_max,
//   to_float (I16 -> F16), load_fp16 (16 IEEE halves), block_values (a block's 32 integers),
//   store_bf16 (rounded as fp32_to_bf16_bits), prefetch,
//   group_isums<QT>: the exact integer dot products of up to 16 weight blocks with the
//   activation blocks (block i in lane i), see below.
//
// reduce_add, the one horizontal float sum used everywhere: with t_j = v_j + v_{j+8}
// (j < 8), the result is ((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 + t7)).
// Everything else is lane-wise, so a variant equals this file as long as it rounds each
// lane operation once, as written here.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../core/blocks.h"

namespace llama2 {
namespace simd_scalar {

constexpr const char* kName = "scalar";

struct F16 {
  float v[16];
};
struct I16 {
  int32_t v[16];
};

template <typename Fn>
inline F16 map(const Fn& fn) {
  F16 r;
  for (int i = 0; i < 16; ++i) r.v[i] = fn(i);
  return r;
}

inline F16 zero() { return map([](int) { return 0.f; }); }
inline F16 set1(float x) { return map([x](int) { return x; }); }
template <typename T>
inline F16 load(const T* p) {
  return map([p](int i) { return to_f32(p[i]); });
}
template <typename T>
inline F16 load_partial(const T* p, int n) {
  return map([p, n](int i) { return i < n ? to_f32(p[i]) : 0.f; });
}
inline void store(float* p, const F16& a) {
  for (int i = 0; i < 16; ++i) p[i] = a.v[i];
}
inline void store_partial(float* p, const F16& a, int n) {
  for (int i = 0; i < n; ++i) p[i] = a.v[i];
}
inline void store_bf16(bf16* p, const F16& a) {
  for (int i = 0; i < 16; ++i) p[i].bits = fp32_to_bf16_bits(a.v[i]);
}

inline F16 add(const F16& a, const F16& b) { return map([&](int i) { return a.v[i] + b.v[i]; }); }
inline F16 sub(const F16& a, const F16& b) { return map([&](int i) { return a.v[i] - b.v[i]; }); }
inline F16 mul(const F16& a, const F16& b) { return map([&](int i) { return a.v[i] * b.v[i]; }); }
inline F16 div(const F16& a, const F16& b) { return map([&](int i) { return a.v[i] / b.v[i]; }); }
// x86 minps/maxps semantics (second operand when unordered); inputs here are never NaN.
inline F16 min(const F16& a, const F16& b) { return map([&](int i) { return a.v[i] < b.v[i] ? a.v[i] : b.v[i]; }); }
inline F16 max(const F16& a, const F16& b) { return map([&](int i) { return a.v[i] > b.v[i] ? a.v[i] : b.v[i]; }); }
inline F16 fmadd(const F16& a, const F16& b, const F16& c) {
  return map([&](int i) { return std::fma(a.v[i], b.v[i], c.v[i]); });
}
inline F16 fnmadd(const F16& a, const F16& b, const F16& c) {
  return map([&](int i) { return std::fma(-a.v[i], b.v[i], c.v[i]); });
}
inline F16 round_even(const F16& a) { return map([&](int i) { return std::nearbyint(a.v[i]); }); }
inline F16 exp2i(const F16& n) {
  return map([&](int i) { return bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n.v[i]) + 127) << 23); });
}

inline float reduce_add(const F16& a) {
  float t[8];
  for (int j = 0; j < 8; ++j) t[j] = a.v[j] + a.v[j + 8];
  return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}
inline float reduce_max(const F16& a) {
  float m = a.v[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, a.v[i]);
  return m;
}

inline F16 to_float(const I16& a) { return map([&](int i) { return static_cast<float>(a.v[i]); }); }
inline F16 load_fp16(const uint16_t* h) { return map([h](int i) { return fp16_to_fp32(h[i]); }); }

// A block's 32 stored integers as floats: lo = values 0..15, hi = values 16..31 (Q4: the
// nibbles 0..15, Q8_0: the int8 values); qs points at the block's quantized values.
template <int64_t QT>
inline void block_values(const uint8_t* qs, F16& lo, F16& hi) {
  for (int j = 0; j < 16; ++j) {
    lo.v[j] = QT == Q8_0 ? static_cast<float>(static_cast<int8_t>(qs[j])) : static_cast<float>(qs[j] & 0x0F);
    hi.v[j] = QT == Q8_0 ? static_cast<float>(static_cast<int8_t>(qs[j + 16])) : static_cast<float>(qs[j] >> 4);
  }
}

inline void prefetch(const void*) {}

// Exact integer dot products of `cnt` (1..16) consecutive weight blocks starting at blk with
// the activation blocks of MD activation rows (q[md]: 32 int8 a block): out[md] lane i =
// sum_j w_ij * q[md]_ij, where w is the block's integer (Q4_0: nibble - 8, Q4_1: nibble,
// Q8_0: int8); lanes >= cnt are 0. sumq[md][i] is the sum of activation block i's values
// (for the Q4_0 offset). With MD = 2 the weights are decoded once for both rows.
template <int64_t QT, int MD>
inline void group_isums(const uint8_t* blk, const int8_t* const* q, const int32_t* const* sumq, int cnt, I16* out) {
  constexpr int64_t BS = block_bytes(QT), OFF = qs_offset(QT);
  for (int md = 0; md < MD; ++md) {
    for (int i = 0; i < 16; ++i) {
      int32_t isum = 0;
      if (i < cnt) {
        const uint8_t* qs = blk + i * BS + OFF;
        const int8_t* x = q[md] + i * QK;
        if (QT == Q8_0) {
          for (int j = 0; j < QK; ++j) isum += static_cast<int8_t>(qs[j]) * x[j];
        } else {
          for (int j = 0; j < QK / 2; ++j) isum += (qs[j] & 0xF) * x[j] + (qs[j] >> 4) * x[j + 16];
          isum -= weight_offset(QT) * sumq[md][i];
        }
      }
      out[md].v[i] = isum;
    }
  }
}

// A group's weights made ready once for several activation rows: group_isums_prepared(gw,
// q, qT, sumq) equals group_isums<QT, 1> of the group for one activation row (here it is
// that). qT: the row's blocks transposed (QuantActs::qT), given where kTransposedActs.
constexpr bool kTransposedActs = false;
template <int64_t QT>
struct GroupWeights {
  const uint8_t* blk;
  int cnt;
};
template <int64_t QT>
inline void prepare_group(const uint8_t* blk, int cnt, GroupWeights<QT>& gw) {
  gw = {blk, cnt};
}
template <int64_t QT>
inline I16 group_isums_prepared(const GroupWeights<QT>& gw, const int8_t* q, const int8_t*, const int32_t* sumq) {
  I16 out;
  group_isums<QT, 1>(gw.blk, &q, &sumq, gw.cnt, &out);
  return out;
}

// The scales of `cnt` (1..16) consecutive blocks from blk as fp32: dw lane i = block i's d,
// mw lane i = its m (Q4_1; otherwise 0); lanes >= cnt are 0.
template <int64_t QT>
inline void group_scales(const uint8_t* blk, int cnt, F16& dw, F16& mw) {
  gather_scales<QT>(blk, cnt, dw, mw, [](const uint16_t* h) { return load_fp16(h); });
}

}  // namespace simd_scalar
}  // namespace llama2
