// GGUF's K-quant super-blocks (Q2_K .. Q6_K: 256 values) and the 5-bit formats Q5_0 / Q5_1
// (32 values), and how their integers and scales are decoded (torch-free, scalar: every
// variant runs this same code, whose results are exact integers and exact fp32 products).
//
//   Q5_0: value j = d * (q_j - 16)           q_j = nibble j (as Q4_0) | bit j of qh << 4
//   Q5_1: value j = d * q_j + m
//   Q4_K: 8 sub-blocks of 32: value = (d * sc_s) * q - dmin * m_s, q 4 bits, sc/m 6 bits
//   Q5_K: Q4_K with a 5th bit per value (bit s of qh[l] for value 32 s + l)
//   Q6_K: 16 sub-blocks of 16: value = (d * sc_s) * (q - 32), q 6 bits, sc int8
//   Q2_K: 16 sub-blocks of 16: value = (d * (sc_s & 15)) * q - dmin * (sc_s >> 4), q 2 bits
//   Q3_K: 16 sub-blocks of 16: value = (d * (sc_s - 32)) * (q - 4 * !hbit), q 2 bits, sc 6 bits
//
// d * sc, dmin * m: an fp16 times an integer of at most 8 bits, exact in fp32, so a
// (d * sc) * q - dmin * m is rounded once, as gguf.quants computes it.
//
// Decoded for the dequantizer and the Q5_0 / Q5_1 matmul (kquant_gemv.h), a block's form is,
// per block of 32 values b:
//   q[32] int8        the integers with the format's offset applied (Q5_0: q - 16, Q6_K: q - 32)
//   slo, shi int32    integer scales of values 0..15 and 16..31 (Q6_K's sc; 1 elsewhere)
//   d32 float         scale of the block (exact: d * sc for Q4_K/Q5_K, d elsewhere)
//   m32 float         additive minimum (Q4_K/Q5_K: -(dmin * m), Q5_1: m, else 0)
// so that value j = fp32(d32 * s) * q_j (+ m32 for the types with a minimum).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "blocks.h"

#if defined(LLAMA2_ISA_AVX512_VNNI) || defined(LLAMA2_ISA_AVX_VNNI) || defined(LLAMA2_ISA_AVX2)
#include <immintrin.h>
#endif

namespace llama2 {
inline namespace LLAMA2_ISA_NS {

constexpr int QK_K = 256;  // values per K-quant super-block

// GGML type ids (gguf.GGMLQuantizationType).
enum KQType : int64_t { Q5_0 = 6, Q5_1 = 7, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

struct block_q5_0 {
  uint16_t d;
  uint8_t qh[4];       // bit j: the 5th bit of value j
  uint8_t qs[QK / 2];  // values j, j + 16 in the low, high nibble of qs[j]
};
struct block_q5_1 {
  uint16_t d, m;
  uint8_t qh[4];
  uint8_t qs[QK / 2];
};
struct block_q2_K {
  uint8_t scales[QK_K / 16];  // low nibble: scale, high nibble: minimum of 16 values
  uint8_t qs[QK_K / 4];       // value 128 h + 32 s + l: bits 2 s of qs[32 h + l]
  uint16_t d, dmin;
};
struct block_q3_K {
  uint8_t hmask[QK_K / 8];  // value 32 s + l: bit s of hmask[l] (clear: subtract 4)
  uint8_t qs[QK_K / 4];     // as Q2_K
  uint8_t scales[12];       // 16 6-bit scales (see decode_q3_k)
  uint16_t d;
};
struct block_q4_K {
  uint16_t d, dmin;
  uint8_t scales[12];     // 8 6-bit scales and 8 6-bit minimums (see scale_min_k4)
  uint8_t qs[QK_K / 2];   // value 64 c + 32 s + l: nibble s of qs[32 c + l]
};
struct block_q5_K {
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qh[QK_K / 8];   // value 32 s + l: bit s of qh[l]
  uint8_t qs[QK_K / 2];
};
struct block_q6_K {
  uint8_t ql[QK_K / 2];     // value 128 h + 64 s + l: nibble s of ql[64 h + l]
  uint8_t qh[QK_K / 4];     // value 128 h + 32 s + l: bits 2 s of qh[32 h + l]
  int8_t scales[QK_K / 16];
  uint16_t d;
};
static_assert(sizeof(block_q5_0) == 22, "Q5_0 blocks are 22 bytes");
static_assert(sizeof(block_q5_1) == 24, "Q5_1 blocks are 24 bytes");
static_assert(sizeof(block_q2_K) == 84, "Q2_K blocks are 84 bytes");
static_assert(sizeof(block_q3_K) == 110, "Q3_K blocks are 110 bytes");
static_assert(sizeof(block_q4_K) == 144, "Q4_K blocks are 144 bytes");
static_assert(sizeof(block_q5_K) == 176, "Q5_K blocks are 176 bytes");
static_assert(sizeof(block_q6_K) == 210, "Q6_K blocks are 210 bytes");

// The types of this file the matmul computes on (Q2_K / Q3_K are only dequantized).
constexpr bool kquant_matmul_type(int64_t qtype) {
  return qtype == Q5_0 || qtype == Q5_1 || qtype == Q4_K || qtype == Q5_K || qtype == Q6_K;
}
// The types superblock_gemv.h multiplies (against Q8_K-style activations).
constexpr bool superblock_type(int64_t qtype) { return qtype == Q4_K || qtype == Q5_K || qtype == Q6_K; }
constexpr bool kquant_type(int64_t qtype) { return kquant_matmul_type(qtype) || qtype == Q2_K || qtype == Q3_K; }
// Types whose values carry an additive minimum in the matmul (the m32 term).
constexpr bool kquant_has_min(int64_t qtype) { return qtype == Q5_1 || qtype == Q4_K || qtype == Q5_K; }

constexpr int64_t kquant_block_bytes(int64_t qtype) {
  return qtype == Q5_0   ? sizeof(block_q5_0)
         : qtype == Q5_1 ? sizeof(block_q5_1)
         : qtype == Q2_K ? sizeof(block_q2_K)
         : qtype == Q3_K ? sizeof(block_q3_K)
         : qtype == Q4_K ? sizeof(block_q4_K)
         : qtype == Q5_K ? sizeof(block_q5_K)
         : qtype == Q6_K ? sizeof(block_q6_K)
                         : 0;
}

// The blocks of 32 values as gemv.h's generic kernel reads them: Q4_0 / Q4_1 / Q8_0 and, in
// the AVX2 and AVX-VNNI variants, Q5_0 / Q5_1 (their qh is the 4 bytes before the nibbles).
constexpr int64_t block32_bytes(int64_t qtype) {
  return qtype == Q5_0 || qtype == Q5_1 ? kquant_block_bytes(qtype) : block_bytes(qtype);
}
constexpr int64_t block32_qs_offset(int64_t qtype) {
  return qtype == Q5_0 ? offsetof(block_q5_0, qs) : qtype == Q5_1 ? offsetof(block_q5_1, qs) : qs_offset(qtype);
}
// The integer the generic kernel takes off each unsigned weight value (times the block's sumq).
constexpr int32_t block32_offset(int64_t qtype) { return qtype == Q5_0 ? 16 : weight_offset(qtype); }
// Types with an additive minimum (the m * xs term).
constexpr bool block32_has_min(int64_t qtype) { return qtype == Q4_1 || qtype == Q5_1 || qtype == Q4_K; }

// Values per block of any type the kernels take (32 or 256; 0: not one of them).
constexpr int64_t values_per_block(int64_t qtype) {
  return kquant_type(qtype) ? (qtype == Q5_0 || qtype == Q5_1 ? QK : QK_K) : block_bytes(qtype) ? QK : 0;
}
// Bytes of one row of k values (k a multiple of values_per_block) of any type the kernels take.
constexpr int64_t row_bytes(int64_t qtype, int64_t k) {
  return values_per_block(qtype) == 0 ? 0
         : k / values_per_block(qtype) * (kquant_type(qtype) ? kquant_block_bytes(qtype) : block_bytes(qtype));
}
constexpr bool matmul_type(int64_t qtype) { return block_bytes(qtype) > 0 || kquant_matmul_type(qtype); }
constexpr bool dequantize_type(int64_t qtype) { return block_bytes(qtype) > 0 || kquant_type(qtype); }

// One block (QK_K or QK values) decoded for the matmul, see the top of this file: arrays of
// the block's values, and of its blocks of 32.
struct DecodedBlocks {
  int8_t* q;
  int32_t *slo, *shi;
  float *d32, *m32;
};

// The fp16 at p (F16C on x86: the same value, for every finite input).
inline float half_at(const uint8_t* p) {
#if defined(LLAMA2_ISA_AVX512_VNNI) || defined(LLAMA2_ISA_AVX_VNNI) || defined(LLAMA2_ISA_AVX2)
  return _cvtsh_ss(load_u16(p));
#else
  return fp16_to_fp32(load_u16(p));
#endif
}

// Q5_0 / Q5_1: 4 bits of qh spread to bit 4 of 4 bytes (little-endian), the 5th bits of 4 values.
// Bit k moves to bit 4 + 8 k: one product (shifts 4, 11, 18, 25: the partial products do not overlap).
constexpr uint32_t q5_high_bits(uint32_t bits) { return (bits * 0x02040810u) & 0x10101010u; }

// 8 bits spread to bit 4 of 8 bytes.
constexpr uint64_t q5_high_bits8(uint32_t bits) {
  return q5_high_bits(bits & 0x0F) | static_cast<uint64_t>(q5_high_bits(bits >> 4)) << 32;
}

// Q5_0 / Q5_1: the 32 values (nibble | 5th bit << 4) - OFFSET of 16 bytes of nibbles and qh.
template <int OFFSET>
inline void q5_values(const uint8_t* qs, uint32_t qh, int8_t* out) {
#if defined(LLAMA2_ISA_AVX512_VNNI) || defined(LLAMA2_ISA_AVX_VNNI) || defined(LLAMA2_ISA_AVX2)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), _mm256_set1_epi8(0x0F));
  // Byte j of the broadcast qh word j / 8, then its bit j % 8 alone: 0xFF where the 5th bit is set.
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(qh)),
                                             _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                               0x0101010101010101, 0x0000000000000000));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, _mm256_set1_epi64x(0x7FBFDFEFF7FBFDFE)),
                                        _mm256_set1_epi64x(-1));
  const __m256i values = _mm256_or_si256(nibbles, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_sub_epi8(values, _mm256_set1_epi8(OFFSET)));
#else
  for (int w = 0; w < 2; ++w) {  // values 8 w .. 8 w + 7 and 16 + 8 w ..: 8 bytes at a time
    uint64_t nibbles;
    std::memcpy(&nibbles, qs + 8 * w, 8);
    uint64_t low = (nibbles & 0x0F0F0F0F0F0F0F0Full) | q5_high_bits8((qh >> (8 * w)) & 0xFF);
    uint64_t high = ((nibbles >> 4) & 0x0F0F0F0F0F0F0F0Full) | q5_high_bits8((qh >> (16 + 8 * w)) & 0xFF);
    if (OFFSET) {  // - 16 in each byte: (v + 0x80 - 0x10) ^ 0x80, no borrow across bytes (v < 0x80)
      low = ((low | 0x8080808080808080ull) - 0x1010101010101010ull) ^ 0x8080808080808080ull;
      high = ((high | 0x8080808080808080ull) - 0x1010101010101010ull) ^ 0x8080808080808080ull;
    }
    std::memcpy(out + 8 * w, &low, 8);
    std::memcpy(out + 16 + 8 * w, &high, 8);
  }
#endif
}

// Q4_K / Q5_K: scale and minimum of sub-block j (ggml's get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* s, int32_t& sc, int32_t& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Q4_K / Q5_K: the 8 scales (bytes 0..7) and 8 minimums (bytes 8..15) of the 12 bytes at
// `scales`, scale_min_k4 of all 8 sub-blocks at once on 32-bit words.
inline void k4_scales_mins(const uint8_t* scales, uint8_t* out) {
  uint32_t u[4];
  std::memcpy(u, scales, 12);
  u[3] = ((u[2] >> 4) & 0x0F0F0F0Fu) | (((u[1] >> 6) & 0x03030303u) << 4);
  const uint32_t low_mins = u[1] & 0x3F3F3F3Fu;
  u[1] = (u[2] & 0x0F0F0F0Fu) | (((u[0] >> 6) & 0x03030303u) << 4);
  u[2] = low_mins;
  u[0] &= 0x3F3F3F3Fu;
  std::memcpy(out, u, 16);
}

template <int64_t QT>
inline void decode_block(const uint8_t* blk, const DecodedBlocks& out) {
  if constexpr (QT == Q5_0 || QT == Q5_1) {
    constexpr int64_t QH = QT == Q5_0 ? offsetof(block_q5_0, qh) : offsetof(block_q5_1, qh);
    constexpr int64_t QS = QT == Q5_0 ? offsetof(block_q5_0, qs) : offsetof(block_q5_1, qs);
    uint32_t qh;
    std::memcpy(&qh, blk + QH, 4);
    q5_values<QT == Q5_0 ? 16 : 0>(blk + QS, qh, out.q);
    out.slo[0] = out.shi[0] = 1;
    out.d32[0] = half_at(blk);
    out.m32[0] = QT == Q5_1 ? half_at(blk + 2) : 0.f;
  } else if constexpr (QT == Q4_K || QT == Q5_K) {
    constexpr int64_t QS = QT == Q4_K ? offsetof(block_q4_K, qs) : offsetof(block_q5_K, qs);
    const float d = half_at(blk), dmin = half_at(blk + 2);
    const uint8_t* qs = blk + QS;
    for (int c = 0; c < 4; ++c) {
      for (int l = 0; l < 32; ++l) {
        out.q[64 * c + l] = static_cast<int8_t>(qs[32 * c + l] & 0x0F);
        out.q[64 * c + 32 + l] = static_cast<int8_t>(qs[32 * c + l] >> 4);
      }
    }
    if constexpr (QT == Q5_K) {
      const uint8_t* qh = blk + offsetof(block_q5_K, qh);
      for (int s = 0; s < 8; ++s)
        for (int l = 0; l < 32; ++l) {
          out.q[32 * s + l] = static_cast<int8_t>(out.q[32 * s + l] | ((qh[l] >> s) & 1) << 4);
        }
    }
    const uint8_t* scales = blk + offsetof(block_q4_K, scales);
    for (int j = 0; j < 8; ++j) {
      int32_t sc, m;
      scale_min_k4(j, scales, sc, m);
      out.slo[j] = out.shi[j] = 1;
      out.d32[j] = d * static_cast<float>(sc);      // exact
      out.m32[j] = -(dmin * static_cast<float>(m));  // exact
    }
  } else {
    static_assert(QT == Q6_K, "decode_block: a matmul type");
    const uint8_t* ql = blk + offsetof(block_q6_K, ql);
    const uint8_t* qh = blk + offsetof(block_q6_K, qh);
    const int8_t* scales = reinterpret_cast<const int8_t*>(blk + offsetof(block_q6_K, scales));
    uint8_t q[QK_K];
    for (int h = 0; h < 2; ++h, ql += 64, qh += 32) {
      for (int l = 0; l < 32; ++l) {
        q[128 * h + l] = static_cast<uint8_t>((ql[l] & 0x0F) | ((qh[l] & 3) << 4));
        q[128 * h + 32 + l] = static_cast<uint8_t>((ql[32 + l] & 0x0F) | (((qh[l] >> 2) & 3) << 4));
        q[128 * h + 64 + l] = static_cast<uint8_t>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
        q[128 * h + 96 + l] = static_cast<uint8_t>((ql[32 + l] >> 4) | (((qh[l] >> 6) & 3) << 4));
      }
    }
    for (int j = 0; j < QK_K; ++j) out.q[j] = static_cast<int8_t>(static_cast<uint8_t>(q[j] - 32));
    const float d = half_at(blk + offsetof(block_q6_K, d));
    for (int j = 0; j < 8; ++j) {
      out.slo[j] = scales[2 * j];
      out.shi[j] = scales[2 * j + 1];
      out.d32[j] = d;
      out.m32[j] = 0.f;
    }
  }
}

// A Q4_K / Q5_K / Q6_K super-block's 256 values as superblock_gemv.h multiplies them
// (Q6_K: q - 32), decode_block's integers.
template <int64_t QT>
inline void superblock_values(const uint8_t* sb, int8_t* w) {
  int32_t slo[8], shi[8];
  float d32[8], m32[8];
  decode_block<QT>(sb, {w, slo, shi, d32, m32});
}

// The integer scale of value v of a super-block (scale_bytes as superblock_gemv.h's
// SuperScales holds them).
template <int64_t QT>
inline int32_t value_scale(const uint8_t* scale_bytes, int v) {
  return QT == Q6_K ? static_cast<int8_t>(scale_bytes[v / 16]) : scale_bytes[v / 32];
}

// Q2_K / Q3_K for the dequantizer: q[256] (offset applied), scale and additive minimum of
// each 16 values, value = scale * q + minimum (Q3_K: no minimum, value = scale * q).
inline void decode_q2_k(const uint8_t* blk, int8_t* q, float* scale, float* minimum) {
  const uint8_t* scales = blk + offsetof(block_q2_K, scales);
  const uint8_t* qs = blk + offsetof(block_q2_K, qs);
  const float d = half_at(blk + offsetof(block_q2_K, d));
  const float dmin = half_at(blk + offsetof(block_q2_K, dmin));
  for (int h = 0; h < 2; ++h)
    for (int s = 0; s < 4; ++s)
      for (int l = 0; l < 32; ++l) q[128 * h + 32 * s + l] = static_cast<int8_t>((qs[32 * h + l] >> (2 * s)) & 3);
  for (int i = 0; i < 16; ++i) {
    scale[i] = d * static_cast<float>(scales[i] & 0x0F);
    minimum[i] = -(dmin * static_cast<float>(scales[i] >> 4));
  }
}

inline void decode_q3_k(const uint8_t* blk, int8_t* q, float* scale) {
  const uint8_t* hmask = blk + offsetof(block_q3_K, hmask);
  const uint8_t* qs = blk + offsetof(block_q3_K, qs);
  const uint8_t* scales = blk + offsetof(block_q3_K, scales);
  const float d = half_at(blk + offsetof(block_q3_K, d));
  for (int h = 0; h < 2; ++h) {
    for (int s = 0; s < 4; ++s) {
      for (int l = 0; l < 32; ++l) {
        const int v = 128 * h + 32 * s + l, low = (qs[32 * h + l] >> (2 * s)) & 3;
        q[v] = static_cast<int8_t>(low - (((hmask[l] >> (v / 32)) & 1) ? 0 : 4));
      }
    }
  }
  for (int i = 0; i < 16; ++i) {
    const int low = (scales[i % 8] >> (4 * (i / 8))) & 0x0F, high = (scales[8 + i % 4] >> (2 * (i / 4))) & 3;
    scale[i] = d * static_cast<float>((low | (high << 4)) - 32);
  }
}

}  // namespace LLAMA2_ISA_NS
}  // namespace llama2
