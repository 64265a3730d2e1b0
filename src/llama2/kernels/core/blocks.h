// GGUF block formats and the scalar number conversions every kernel variant shares.
// Torch-free: included by the torch glue and by the standalone self-test driver.
//
// A GGUF Q4_0 / Q4_1 / Q8_0 tensor [n, k] is n rows of k / 32 blocks, each block 32 values:
//   Q4_0: value j = d * (nibble_j - 8)        d fp16; nibble j < 16: low 4 bits of qs[j],
//   Q4_1: value j = d * nibble_j + m          j >= 16: high 4 bits of qs[j - 16]
//   Q8_0: value j = d * qs[j]                 qs int8
// Rows are byte arrays (blocks are 18 / 20 / 34 bytes, so fields are read with memcpy, never
// through a misaligned struct pointer); the structs below give the sizes and field offsets.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "isa_name.h"

// Forced inlining for the kernels' hot helpers (GCC, clang; MSVC decides alone).
#if defined(__GNUC__)
#define GGUF_INLINE inline __attribute__((always_inline))
#define GGUF_LAMBDA_INLINE __attribute__((always_inline))
#else
#define GGUF_INLINE inline
#define GGUF_LAMBDA_INLINE
#endif

namespace llama2 {
inline namespace LLAMA2_ISA_NS {  // per variant: see isa_name.h

constexpr int QK = 32;  // values per block, all three formats

// GGML type ids (gguf.GGMLQuantizationType).
enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };

struct block_q4_0 {
  uint16_t d;         // fp16 scale
  uint8_t qs[QK / 2]; // values j, j + 16 in the low, high nibble of qs[j]
};
struct block_q4_1 {
  uint16_t d, m;      // fp16 scale and minimum
  uint8_t qs[QK / 2];
};
struct block_q8_0 {
  uint16_t d;
  int8_t qs[QK];
};
static_assert(sizeof(block_q4_0) == 18, "Q4_0 blocks are 18 bytes");
static_assert(sizeof(block_q4_1) == 20, "Q4_1 blocks are 20 bytes");
static_assert(sizeof(block_q8_0) == 34, "Q8_0 blocks are 34 bytes");

// Bytes of one block of type qtype (0 for a type the kernels do not take).
constexpr int64_t block_bytes(int64_t qtype) {
  return qtype == Q4_0 ? sizeof(block_q4_0) : qtype == Q4_1 ? sizeof(block_q4_1) : qtype == Q8_0 ? sizeof(block_q8_0) : 0;
}
// Offset of the quantized values in a block.
constexpr int64_t qs_offset(int64_t qtype) {
  return qtype == Q4_0 ? offsetof(block_q4_0, qs) : qtype == Q4_1 ? offsetof(block_q4_1, qs) : offsetof(block_q8_0, qs);
}
// Stored value -> integer used in the dot product: Q4_0's nibbles are value + 8.
constexpr int32_t weight_offset(int64_t qtype) { return qtype == Q4_0 ? 8 : 0; }

// 16-bit floating point storage types (the bit patterns torch's c10::Half / c10::BFloat16 hold).
struct fp16 {
  uint16_t bits;
};
struct bf16 {
  uint16_t bits;
};

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// The scales of `cnt` (1..16) consecutive blocks from blk, the portable way: d (and Q4_1's
// m) of block i gathered into lane i, 0 from cnt on, then made vectors by load_fp16 (16
// fp16 bit patterns -> the ISA's 16 float lanes).
template <int64_t QT, typename F16, typename LoadFp16>
inline void gather_scales(const uint8_t* blk, int cnt, F16& dw, F16& mw, const LoadFp16& load_fp16) {
  uint16_t d[16], m[16];
  for (int i = 0; i < 16; ++i) {
    d[i] = i < cnt ? load_u16(blk + i * block_bytes(QT)) : 0;
    m[i] = QT == Q4_1 && i < cnt ? load_u16(blk + i * block_bytes(QT) + 2) : 0;
  }
  dw = load_fp16(d);
  mw = load_fp16(m);
}

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

// IEEE half -> float (exact for every input, so every implementation agrees).
inline float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (man << 13));  // inf, nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
  const float v = static_cast<float>(man) * 5.9604644775390625e-8f;  // subnormal: man * 2^-24, exact
  return sign ? -v : v;
}

inline float to_f32(float x) { return x; }
inline float to_f32(bf16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }
inline float to_f32(fp16 x) { return fp16_to_fp32(x.bits); }

// float -> bfloat16, round to nearest even; NaN -> the quiet NaN 0x7FC0 (what c10::BFloat16
// does). Every variant's vector store computes exactly this.
inline uint16_t fp32_to_bf16_bits(float f) {
  const uint32_t bits = float_to_bits(f);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

}  // namespace LLAMA2_ISA_NS
}  // namespace llama2
