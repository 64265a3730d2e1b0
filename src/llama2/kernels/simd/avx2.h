// The primitive interface (see scalar.h) in AVX2 + FMA + F16C; with LLAMA2_AVX_VNNI the
// integer dot products use AVX-VNNI's vpdpbusd (the avx_vnni variant), otherwise
// vpmaddubsw + vpmaddwd. F16 is two ymm: lanes 0..7 and 8..15.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "../core/blocks.h"
#include "../core/kquant_blocks.h"

namespace llama2 {
#if defined(LLAMA2_AVX_VNNI)
namespace simd_avx_vnni {
constexpr const char* kName = "avx_vnni";
#else
namespace simd_avx2 {
constexpr const char* kName = "avx2";
#endif

struct F16 {
  __m256 lo, hi;
};
struct I16 {
  __m256i lo, hi;
};

inline F16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F16 set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {  // bf16 -> fp32 is a 16-bit left shift
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const fp16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

template <typename T>
inline F16 load(const T* p) {
  return {load8(p), load8(p + 8)};
}
template <typename T>
inline F16 load_partial(const T* p, int n) {  // through a zeroed copy: tails only
  T tmp[16] = {};
  for (int i = 0; i < n; ++i) tmp[i] = p[i];
  return load(tmp);
}
inline void store(float* p, const F16& a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline void store_partial(float* p, const F16& a, int n) {
  alignas(32) float tmp[16];
  store(tmp, a);
  for (int i = 0; i < n; ++i) p[i] = tmp[i];
}
// 8 lanes rounded to bf16 as fp32_to_bf16_bits: nearest even, NaN -> 0x7FC0.
inline __m128i bf16x8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)),
                                           _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
inline void store_bf16(bf16* p, const F16& a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16x8(a.lo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), bf16x8(a.hi));
}

inline F16 add(const F16& a, const F16& b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline F16 sub(const F16& a, const F16& b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline F16 mul(const F16& a, const F16& b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline F16 div(const F16& a, const F16& b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline F16 min(const F16& a, const F16& b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline F16 max(const F16& a, const F16& b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline F16 fmadd(const F16& a, const F16& b, const F16& c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline F16 fnmadd(const F16& a, const F16& b, const F16& c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline F16 round_even(const F16& a) {
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, mode), _mm256_round_ps(a.hi, mode)};
}
inline __m256 exp2i8(__m256 n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline F16 exp2i(const F16& n) { return {exp2i8(n.lo), exp2i8(n.hi)}; }

inline float reduce_add(const F16& a) {
  const __m256 t = _mm256_add_ps(a.lo, a.hi);  // t_j = v_j + v_{j+8}
  const __m256 p = _mm256_hadd_ps(t, t);      // [t0+t1, t2+t3, ., . | t4+t5, t6+t7, ., .]
  const __m256 q = _mm256_hadd_ps(p, p);      // [(t0+t1)+(t2+t3), ... | (t4+t5)+(t6+t7), ...]
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1)));
}
inline float reduce_max(const F16& a) {
  __m256 m = _mm256_max_ps(a.lo, a.hi);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}

inline F16 to_float(const I16& a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
inline F16 load_fp16(const uint16_t* h) { return load(reinterpret_cast<const fp16*>(h)); }

// See scalar.h.
template <int64_t QT>
inline void block_values(const uint8_t* qs, F16& lo, F16& hi) {
  auto cvt = [](__m128i bytes8) { return _mm256_cvtepi32_ps(QT == Q8_0 ? _mm256_cvtepi8_epi32(bytes8) : _mm256_cvtepu8_epi32(bytes8)); };
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  if (QT == Q8_0) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16));
    lo = {cvt(a), cvt(_mm_srli_si128(a, 8))};
    hi = {cvt(b), cvt(_mm_srli_si128(b, 8))};
    return;
  }
  const __m128i mask = _mm_set1_epi8(0x0F), low = _mm_and_si128(a, mask), high = _mm_and_si128(_mm_srli_epi16(a, 4), mask);
  lo = {cvt(low), cvt(_mm_srli_si128(low, 8))};
  hi = {cvt(high), cvt(_mm_srli_si128(high, 8))};
}

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// 32 unsigned bytes u times 32 signed bytes s -> 8 int32, each the sum of 4 products.
// vpmaddubsw adds product pairs into int16 with saturation; it cannot saturate here:
// |u| <= 128 and |s| <= 127 (activations are rounded from x / (amax / 127)) give
// |pair| <= 2 * 128 * 127 = 32512 < 32767.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(LLAMA2_AVX_VNNI)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// One block's weights (at qs) as the unsigned operand of dot_u8s8, and what the signed
// activations are multiplied by: Q4: the nibbles 0..15 (natural order: byte j = value j; the
// Q4_0 -8 is taken off afterwards with sumq); Q5: nibble | 5th bit << 4, 0..31 (Q5_0's -16
// likewise). Q8_0: signed weights, so the sign trick:
// |w| (unsigned) times x * sign(w) (signed).
template <int64_t QT>
inline __m256i block_weights(const uint8_t* qs, __m256i& sign) {
  if (QT == Q8_0) {
    sign = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
    return _mm256_sign_epi8(sign, sign);
  }
  // The 16 bytes in both halves (a load, no shuffle), the high half shifted by 4.
  const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  const __m256i nibbles =
      _mm256_and_si256(_mm256_srlv_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(0x0F));
  if (QT != Q5_0 && QT != Q5_1) return nibbles;
  // Q5: lane l (values 4l .. 4l + 3) takes bits 4l .. 4l + 3 of qh, each moved to bit 4 of
  // its byte by one product (kquant_blocks.h's q5_high_bits).
  uint32_t qh;
  std::memcpy(&qh, qs - 4, 4);
  const __m256i bits = _mm256_and_si256(
      _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(qh)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
      _mm256_set1_epi32(0x0F));
  const __m256i high = _mm256_and_si256(_mm256_mullo_epi32(bits, _mm256_set1_epi32(0x02040810)),
                                        _mm256_set1_epi32(0x10101010));
  return _mm256_or_si256(nibbles, high);
}

// [sum(p[0]), ..., sum(p[7])] of 8 vectors of 8 int32.
inline __m256i sum8x8(const __m256i* p) {
  const __m256i h01 = _mm256_hadd_epi32(p[0], p[1]), h23 = _mm256_hadd_epi32(p[2], p[3]);
  const __m256i h45 = _mm256_hadd_epi32(p[4], p[5]), h67 = _mm256_hadd_epi32(p[6], p[7]);
  const __m256i a = _mm256_hadd_epi32(h01, h23), b = _mm256_hadd_epi32(h45, h67);  // 128-bit halves' sums
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// The exact integer dot products of 8 blocks' weights w[i] (block_weights; Q8_0: with
// their signs) with the activation blocks at q (32 int8 a block), one block a lane, Q4_0's
// offset not yet taken off. Q4 with vpmaddubsw: each int16 is 2 products of a nibble
// (<= 15) and an int8 (|x| <= 127), so any 8 of them add up within int16 (8 * 3810 <=
// 32767): the 16 int16 of each 128-bit half of the 8 blocks are summed by 3 levels of
// vphaddw, and only the two halves' sums are widened. Q8_0 (products up to 2 * 128 * 127),
// Q5 (up to 2 * 31 * 127: 8 of them overflow int16) and AVX-VNNI (int32 from vpdpbusd)
// sum int32 lanes.
template <int64_t QT>
inline __m256i block_sums8(const __m256i* w, const __m256i* sign, const int8_t* q) {
  __m256i p[8];
#if !defined(LLAMA2_AVX_VNNI)
  if (QT == Q4_0 || QT == Q4_1) {
    for (int i = 0; i < 8; ++i) {
      p[i] = _mm256_maddubs_epi16(w[i], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * QK)));
    }
    const __m256i a = _mm256_hadd_epi16(p[0], p[1]), b = _mm256_hadd_epi16(p[2], p[3]);
    const __m256i c = _mm256_hadd_epi16(p[4], p[5]), d = _mm256_hadd_epi16(p[6], p[7]);
    const __m256i s = _mm256_hadd_epi16(_mm256_hadd_epi16(a, b), _mm256_hadd_epi16(c, d));  // half h of block i: 8h + i
    return _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(s)),
                            _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s, 1)));
  }
#endif
  for (int i = 0; i < 8; ++i) {
    __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * QK));
    if (QT == Q8_0) x = _mm256_sign_epi8(x, sign[i]);
    p[i] = dot_u8s8(w[i], x);
  }
  return sum8x8(p);
}

// Batched rows take the activations transposed (QuantActs::qT: per group of 16 blocks, for
// each 4-byte column c, the 16 blocks' column c), so that the weights, transposed the same
// way once per group, give each block's sum in its own lane without horizontal adds.
constexpr bool kTransposedActs = true;

// 8 rows of 8 dwords -> 8 columns: c[j] lane i = r[i] lane j.
inline void transpose8x8(const __m256i* r, __m256i* c) {
  __m256i t[8], u[8];
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = _mm256_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm256_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 2; ++k) {  // rows 4k..4k+3: u[4k + j] = dwords j, j + 4 of the 4 rows
    u[4 * k] = _mm256_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 1] = _mm256_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 2] = _mm256_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    u[4 * k + 3] = _mm256_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    c[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
    c[j + 4] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
  }
}

// A group's weights decoded and transposed once for several activation rows:
// col[h][c] lane i = column c (4 bytes) of block 8h + i as dot_u8s8's unsigned operand,
// sign[h][c] the signs it goes with (Q8_0).
template <int64_t QT>
struct GroupWeights {
  __m256i col[2][8];
  __m256i sign[QT == Q8_0 ? 2 : 1][8];
};

// The weights of half h of a group (blocks 8h .. 8h + 7, all in the row) as block_weights
// gives them.
template <int64_t QT>
GGUF_INLINE void whole_half_weights(const uint8_t* blk, int h, __m256i* w, __m256i* sign) {
  constexpr int64_t BS = block32_bytes(QT), OFF = block32_qs_offset(QT);
  for (int i = 0; i < 8; ++i) w[i] = block_weights<QT>(blk + (8 * h + i) * BS + OFF, sign[i]);
}

// block_weights of blocks 8h .. 8h + 7 of a group of cnt blocks. Blocks past cnt re-read
// block cnt - 1 (never past the row); their activation blocks are zero padding, so their
// lanes come out 0.
template <int64_t QT>
inline void half_group_weights(const uint8_t* blk, int cnt, int h, __m256i* w, __m256i* sign) {
  constexpr int64_t BS = block32_bytes(QT), OFF = block32_qs_offset(QT);
  for (int i = 0; i < 8; ++i) {
    const int b = 8 * h + i;
    w[i] = block_weights<QT>(blk + (b < cnt ? b : cnt - 1) * BS + OFF, sign[i]);
  }
}

template <int64_t QT>
inline void prepare_group(const uint8_t* blk, int cnt, GroupWeights<QT>& gw) {
  for (int h = 0; h < 2; ++h) {
    __m256i w[8], sign[8];
    half_group_weights<QT>(blk, cnt, h, w, sign);
    transpose8x8(w, gw.col[h]);
    if (QT == Q8_0) transpose8x8(sign, gw.sign[QT == Q8_0 ? h : 0]);
  }
}

// Q4_0: nibble = value + 8, so 8 * sumq comes off (Q5_0: 16 * sumq).
template <int64_t QT>
inline __m256i take_offset(__m256i sums, const int32_t* sumq) {
  if (QT != Q4_0 && QT != Q5_0) return sums;
  const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sumq));
  return _mm256_sub_epi32(sums, _mm256_slli_epi32(s, QT == Q4_0 ? 3 : 4));
}

// group_isums<QT, 1> of a prepared group for one activation row, from its transposed
// blocks qT (the group's 8 x 64 bytes). Q4 with vpmaddubsw: each int16 holds 2 products
// of a nibble (<= 15) and an int8 (|x| <= 127), so the 8 columns add up within int16
// (16 * 15 * 127 <= 32767) before one vpmaddwd; Q8_0's products (up to 2 * 128 * 127 a
// pair), Q5's (2 * 31 * 127) and AVX-VNNI's vpdpbusd add as int32.
template <int64_t QT>
inline I16 group_isums_prepared(const GroupWeights<QT>& gw, const int8_t*, const int8_t* qT, const int32_t* sumq) {
  __m256i sums[2];
  for (int h = 0; h < 2; ++h) {
    auto x = [&](int c) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(qT + c * 64 + h * 32)); };
#if !defined(LLAMA2_AVX_VNNI)
    if (QT == Q4_0 || QT == Q4_1) {
      __m256i acc = _mm256_maddubs_epi16(gw.col[h][0], x(0));
      for (int c = 1; c < 8; ++c) acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(gw.col[h][c], x(c)));
      sums[h] = take_offset<QT>(_mm256_madd_epi16(acc, _mm256_set1_epi16(1)), sumq + 8 * h);
      continue;
    }
#endif
    __m256i acc = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i xc = QT == Q8_0 ? _mm256_sign_epi8(x(c), gw.sign[QT == Q8_0 ? h : 0][c]) : x(c);
      acc = _mm256_add_epi32(acc, dot_u8s8(gw.col[h][c], xc));
    }
    sums[h] = take_offset<QT>(acc, sumq + 8 * h);
  }
  return {sums[0], sums[1]};
}

// block_sums8 of 4 blocks w[0..3] (their sums in lanes 0..3, 0 in lanes 4..7): a row's last
// group when it holds at most 4 blocks (K = 576: 18 blocks a row, the last group 2).
template <int64_t QT>
inline __m256i block_sums4(const __m256i* w, const __m256i* sign, const int8_t* q) {
  __m256i p[4];
#if !defined(LLAMA2_AVX_VNNI)
  if (QT == Q4_0 || QT == Q4_1) {
    for (int i = 0; i < 4; ++i) {
      p[i] = _mm256_maddubs_epi16(w[i], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * QK)));
    }
    const __m256i ab = _mm256_hadd_epi16(_mm256_hadd_epi16(p[0], p[1]), _mm256_hadd_epi16(p[2], p[3]));
    const __m256i s = _mm256_hadd_epi16(ab, _mm256_setzero_si256());  // half h of block i: word 8h + i, i < 4
    return _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(s)),
                            _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s, 1)));
  }
#endif
  for (int i = 0; i < 4; ++i) {
    __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * QK));
    if (QT == Q8_0) x = _mm256_sign_epi8(x, sign[i]);
    p[i] = dot_u8s8(w[i], x);
  }
  const __m256i zero = _mm256_setzero_si256();
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
  // a: [block 0..3 of lanes 0..3 | block 0..3 of lanes 4..7]
  return _mm256_permute2x128_si256(_mm256_add_epi32(a, _mm256_permute2x128_si256(a, a, 0x01)), zero, 0x20);
}

// See scalar.h. Halves past cnt are not computed (their sums are 0), nor blocks 4..7 of a
// half holding at most 4.
template <int64_t QT, int MD>
GGUF_INLINE void group_isums(const uint8_t* blk, const int8_t* const* q, const int32_t* const* sumq, int cnt,
                                     I16* out) {
  constexpr int64_t BS = block32_bytes(QT), OFF = block32_qs_offset(QT);
  for (int h = 0; h < 2; ++h) {
    const int in_half = cnt - 8 * h;
    if (in_half <= 0) {
      for (int md = 0; md < MD; ++md) out[md].hi = _mm256_setzero_si256();
      continue;
    }
    __m256i w[8], sign[8];
    if (in_half >= 8) {  // a whole half: fixed offsets
      whole_half_weights<QT>(blk, h, w, sign);
    } else if (in_half <= 4) {
      for (int i = 0; i < 4; ++i) w[i] = block_weights<QT>(blk + (8 * h + std::min(i, in_half - 1)) * BS + OFF, sign[i]);
    } else {
      half_group_weights<QT>(blk, cnt, h, w, sign);
    }
    for (int md = 0; md < MD; ++md) {
      const int8_t* x = q[md] + 8 * h * QK;
      const __m256i sums = take_offset<QT>(in_half <= 4 ? block_sums4<QT>(w, sign, x) : block_sums8<QT>(w, sign, x),
                                           sumq[md] + 8 * h);
      (h == 0 ? out[md].lo : out[md].hi) = sums;
    }
  }
}

// See scalar.h: d (and Q4_1's or Q5_1's m) of cnt blocks as fp32, 0 past cnt. One 32-bit load per
// block (d and m, or d and 2 bytes of the block's values) into its vector lane.
template <int64_t QT>
GGUF_INLINE void group_scales(const uint8_t* blk, int cnt, F16& dw, F16& mw) {
  constexpr int64_t BS = block32_bytes(QT);
  auto word = [&](int i) {
    int32_t v;
    std::memcpy(&v, blk + (i < cnt ? i : cnt - 1) * BS, 4);
    return v;
  };
  auto halves = [](__m256i v) {  // the low 16 bits of 8 lanes, as 8 fp32
    const __m256i low = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF));
    return _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(low), _mm256_extracti128_si256(low, 1)));
  };
  if (cnt == 16) {  // a whole group: broadcast loads blended into place, no shuffles
    auto words8 = [&](const uint8_t* p) {
      auto at = [&](int i) {
        int32_t v;
        std::memcpy(&v, p + i * BS, 4);
        return _mm256_set1_epi32(v);
      };
      __m256i v = at(0);
      v = _mm256_blend_epi32(v, at(1), 0x02);
      v = _mm256_blend_epi32(v, at(2), 0x04);
      v = _mm256_blend_epi32(v, at(3), 0x08);
      v = _mm256_blend_epi32(v, at(4), 0x10);
      v = _mm256_blend_epi32(v, at(5), 0x20);
      v = _mm256_blend_epi32(v, at(6), 0x40);
      return _mm256_blend_epi32(v, at(7), 0x80);
    };
    const __m256i v0 = words8(blk), v1 = words8(blk + 8 * BS);
    dw = {halves(v0), halves(v1)};
    mw = block32_has_min(QT) ? F16{halves(_mm256_srli_epi32(v0, 16)), halves(_mm256_srli_epi32(v1, 16))} : zero();
    return;
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i v0 = _mm256_and_si256(_mm256_setr_epi32(word(0), word(1), word(2), word(3), word(4), word(5),
                                                        word(6), word(7)),
                                      _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), lane));
  const __m256i v1 = _mm256_and_si256(_mm256_setr_epi32(word(8), word(9), word(10), word(11), word(12), word(13),
                                                        word(14), word(15)),
                                      _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt - 8), lane));
  dw = {halves(v0), halves(v1)};
  mw = block32_has_min(QT) ? F16{halves(_mm256_srli_epi32(v0, 16)), halves(_mm256_srli_epi32(v1, 16))} : zero();
}

}  // namespace simd_avx2 / simd_avx_vnni
}  // namespace llama2
