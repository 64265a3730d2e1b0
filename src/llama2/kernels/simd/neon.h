// The primitive interface (see scalar.h) in aarch64 Advanced SIMD; with LLAMA2_NEON_DOT
// (the neon_dot variant, built for armv8.2-a+dotprod) the block dot products use sdot,
// otherwise widening multiplies (smull / smlal) and pairwise adds. F16 is four q
// registers: lanes 0..3, 4..7, 8..11, 12..15.
#pragma once

#include <arm_neon.h>

#include <cstdint>

#include "../core/blocks.h"

namespace llama2 {
#if defined(LLAMA2_NEON_DOT)
namespace simd_neon_dot {
constexpr const char* kName = "neon_dot";
#else
namespace simd_neon {
constexpr const char* kName = "neon";
#endif

struct F16 {
  float32x4_t v[4];
};
struct I16 {
  int32x4_t v[4];
};

template <typename Fn>
inline F16 map4(const Fn& fn) {
  return {{fn(0), fn(1), fn(2), fn(3)}};
}

inline float32x4_t load4(const float* p) { return vld1q_f32(p); }
inline float32x4_t load4(const bf16* p) {  // bf16 -> fp32 is a 16-bit left shift
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
}
inline float32x4_t load4(const fp16* p) {
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p))));
}

inline F16 zero() { return map4([](int) { return vdupq_n_f32(0.f); }); }
inline F16 set1(float x) { return map4([x](int) { return vdupq_n_f32(x); }); }
template <typename T>
inline F16 load(const T* p) {
  return map4([p](int i) { return load4(p + 4 * i); });
}
template <typename T>
inline F16 load_partial(const T* p, int n) {  // through a zeroed copy: tails only
  T tmp[16] = {};
  for (int i = 0; i < n; ++i) tmp[i] = p[i];
  return load(tmp);
}
inline void store(float* p, const F16& a) {
  for (int i = 0; i < 4; ++i) vst1q_f32(p + 4 * i, a.v[i]);
}
inline void store_partial(float* p, const F16& a, int n) {
  float tmp[16];
  store(tmp, a);
  for (int i = 0; i < n; ++i) p[i] = tmp[i];
}
// 4 lanes rounded to bf16 as fp32_to_bf16_bits: nearest even, NaN -> 0x7FC0.
inline uint16x4_t bf16x4(float32x4_t v) {
  const uint32x4_t bits = vreinterpretq_u32_f32(v);
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(bits, 16), vdupq_n_u32(1));
  const uint32x4_t r = vshrq_n_u32(vaddq_u32(bits, vaddq_u32(lsb, vdupq_n_u32(0x7FFF))), 16);
  return vmovn_u32(vbslq_u32(vceqq_f32(v, v), r, vdupq_n_u32(0x7FC0)));
}
inline void store_bf16(bf16* p, const F16& a) {
  for (int i = 0; i < 4; ++i) vst1_u16(reinterpret_cast<uint16_t*>(p + 4 * i), bf16x4(a.v[i]));
}

#define LLAMA2_NEON_LANEWISE(name, expr)                                   \
  inline F16 name(const F16& a, const F16& b) {                            \
    return map4([&](int i) { const float32x4_t x = a.v[i], y = b.v[i]; return expr; }); \
  }
LLAMA2_NEON_LANEWISE(add, vaddq_f32(x, y))
LLAMA2_NEON_LANEWISE(sub, vsubq_f32(x, y))
LLAMA2_NEON_LANEWISE(mul, vmulq_f32(x, y))
LLAMA2_NEON_LANEWISE(div, vdivq_f32(x, y))
// x86 / scalar.h semantics (a < b ? a : b), not fmin's: the same choice for signed zeros.
LLAMA2_NEON_LANEWISE(min, vbslq_f32(vcltq_f32(x, y), x, y))
LLAMA2_NEON_LANEWISE(max, vbslq_f32(vcgtq_f32(x, y), x, y))
#undef LLAMA2_NEON_LANEWISE

inline F16 fmadd(const F16& a, const F16& b, const F16& c) {
  return map4([&](int i) { return vfmaq_f32(c.v[i], a.v[i], b.v[i]); });
}
inline F16 fnmadd(const F16& a, const F16& b, const F16& c) {
  return map4([&](int i) { return vfmsq_f32(c.v[i], a.v[i], b.v[i]); });
}
inline F16 round_even(const F16& a) { return map4([&](int i) { return vrndnq_f32(a.v[i]); }); }
inline F16 exp2i(const F16& n) {
  return map4([&](int i) {
    return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n.v[i]), vdupq_n_s32(127)), 23));
  });
}

// See scalar.h: t_j = v_j + v_{j+8}, then ((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 + t7)).
inline float reduce_add(const F16& a) {
  const float32x4_t t0 = vaddq_f32(a.v[0], a.v[2]), t1 = vaddq_f32(a.v[1], a.v[3]);  // t0..3, t4..7
  const float32x4_t p = vpaddq_f32(t0, t1);  // [t0+t1, t2+t3, t4+t5, t6+t7]
  const float32x4_t q = vpaddq_f32(p, p);    // [(t0+t1)+(t2+t3), (t4+t5)+(t6+t7), ...]
  return vgetq_lane_f32(q, 0) + vgetq_lane_f32(q, 1);
}
inline float reduce_max(const F16& a) {
  return vmaxvq_f32(vmaxq_f32(vmaxq_f32(a.v[0], a.v[1]), vmaxq_f32(a.v[2], a.v[3])));
}

inline F16 to_float(const I16& a) { return map4([&](int i) { return vcvtq_f32_s32(a.v[i]); }); }
inline F16 load_fp16(const uint16_t* h) { return load(reinterpret_cast<const fp16*>(h)); }

// See scalar.h.
inline F16 bytes_to_float(int16x8_t a, int16x8_t b) {
  return {{vcvtq_f32_s32(vmovl_s16(vget_low_s16(a))), vcvtq_f32_s32(vmovl_s16(vget_high_s16(a))),
           vcvtq_f32_s32(vmovl_s16(vget_low_s16(b))), vcvtq_f32_s32(vmovl_s16(vget_high_s16(b)))}};
}
template <int64_t QT>
inline void block_values(const uint8_t* qs, F16& lo, F16& hi) {
  if (QT == Q8_0) {
    const int8x16_t a = vld1q_s8(reinterpret_cast<const int8_t*>(qs)), b = vld1q_s8(reinterpret_cast<const int8_t*>(qs + 16));
    lo = bytes_to_float(vmovl_s8(vget_low_s8(a)), vmovl_s8(vget_high_s8(a)));
    hi = bytes_to_float(vmovl_s8(vget_low_s8(b)), vmovl_s8(vget_high_s8(b)));
    return;
  }
  const uint8x16_t v = vld1q_u8(qs), low = vandq_u8(v, vdupq_n_u8(0x0F)), high = vshrq_n_u8(v, 4);
  auto widen = [](uint8x8_t x) { return vreinterpretq_s16_u16(vmovl_u8(x)); };
  lo = bytes_to_float(widen(vget_low_u8(low)), widen(vget_high_u8(low)));
  hi = bytes_to_float(widen(vget_low_u8(high)), widen(vget_high_u8(high)));
}

inline void prefetch(const void* p) { __builtin_prefetch(p); }

// 16 signed weights times 16 signed activations, added into 4 int32 lanes.
inline int32x4_t dot16(int32x4_t acc, int8x16_t w, int8x16_t x) {
#if defined(LLAMA2_NEON_DOT)
  return vdotq_s32(acc, w, x);
#else
  // |w| <= 128 and |x| <= 127: a pair of products fits int16 (<= 32512).
  const int16x8_t lo = vmlal_s8(vmull_s8(vget_low_s8(w), vget_low_s8(x)), vget_high_s8(w), vget_high_s8(x));
  return vpadalq_s16(acc, lo);
#endif
}

// The block's 32 weight integers as signed bytes: values 0..15, 16..31.
template <int64_t QT>
inline void block_weights(const uint8_t* qs, int8x16_t& lo, int8x16_t& hi) {
  if (QT == Q8_0) {
    lo = vld1q_s8(reinterpret_cast<const int8_t*>(qs));
    hi = vld1q_s8(reinterpret_cast<const int8_t*>(qs + 16));
    return;
  }
  const uint8x16_t b = vld1q_u8(qs);
  lo = vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(0x0F)));
  hi = vreinterpretq_s8_u8(vshrq_n_u8(b, 4));
  if (QT == Q4_0) {  // nibble - 8
    lo = vsubq_s8(lo, vdupq_n_s8(8));
    hi = vsubq_s8(hi, vdupq_n_s8(8));
  }
}

constexpr bool kTransposedActs = false;  // see scalar.h

// A group's weights decoded once for several activation rows (see scalar.h).
template <int64_t QT>
struct GroupWeights {
  int8x16_t lo[16], hi[16];
  int cnt;
};
template <int64_t QT>
inline void prepare_group(const uint8_t* blk, int cnt, GroupWeights<QT>& gw) {
  constexpr int64_t BS = block_bytes(QT), OFF = qs_offset(QT);
  for (int i = 0; i < cnt; ++i) block_weights<QT>(blk + i * BS + OFF, gw.lo[i], gw.hi[i]);
  gw.cnt = cnt;
}
// The weights are used as signed bytes, so sumq is not needed.
template <int64_t QT>
inline I16 group_isums_prepared(const GroupWeights<QT>& gw, const int8_t* q, const int8_t*, const int32_t*) {
  int32_t sums[16] = {};
  for (int i = 0; i < gw.cnt; ++i) {
    const int8_t* x = q + i * QK;
    sums[i] = vaddvq_s32(dot16(dot16(vdupq_n_s32(0), gw.lo[i], vld1q_s8(x)), gw.hi[i], vld1q_s8(x + 16)));
  }
  return {{vld1q_s32(sums), vld1q_s32(sums + 4), vld1q_s32(sums + 8), vld1q_s32(sums + 12)}};
}

// See scalar.h.
template <int64_t QT, int MD>
inline void group_isums(const uint8_t* blk, const int8_t* const* q, const int32_t* const* sumq, int cnt, I16* out) {
  GroupWeights<QT> gw;
  prepare_group<QT>(blk, cnt, gw);
  for (int md = 0; md < MD; ++md) out[md] = group_isums_prepared<QT>(gw, q[md], nullptr, sumq[md]);
}

// See scalar.h.
template <int64_t QT>
inline void group_scales(const uint8_t* blk, int cnt, F16& dw, F16& mw) {
  gather_scales<QT>(blk, cnt, dw, mw, [](const uint16_t* h) { return load_fp16(h); });
}

}  // namespace simd_neon / simd_neon_dot
}  // namespace llama2
