// y = x W^T straight from GGUF Q5_0 / Q5_1 blocks (torch-free) on the variants whose
// generic kernel does not take them (kGenericKQuants: all but AVX2 / AVX-VNNI): the
// arithmetic of gemv.h's Q4_0 / Q4_1, with the weights' integers and scales first decoded
// per weight row (kquant_blocks.h's decode_block: int8 values, exact fp32 scales).
//
// Activations are gemv.h's blocks of 32 (int8 q, d_x, xs = fp32(d_x * sumq)). Each (weight
// block b, activation block b) pair contributes
//
//     m32_b * xs_b, then fp32(d32_b * d_x) * isum_b        (m32 only for Q5_1)
//
// isum_b the exact integer dot product. The float order is gemv.h's: 16 fp32 partial sums,
// block b into partial b % 16, each term one fused multiply-add (m32 first), blocks in
// increasing order, then reduce_add. Zero padding past the row's end adds exactly 0. The
// integer sums come from the ISA's `unpacked_isums` (simd/*_kquant.h), everything else is
// written once here, so every variant gives bitwise the same y. Rows do not depend on M.
// (Q4_K / Q5_K / Q6_K: superblock_gemv.h.)
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "gemv.h"
#include "kquant_blocks.h"

// This variant's unpacked_isums (after gemv.h, which brought in its primitives).
#if defined(LLAMA2_ISA_AVX512_VNNI) || defined(LLAMA2_ISA_AVX_VNNI) || defined(LLAMA2_ISA_AVX2)
#include "../simd/x86_kquant.h"
#elif defined(LLAMA2_ISA_NEON_DOT) || defined(LLAMA2_ISA_NEON)
#include "../simd/neon_kquant.h"
#else
#include "../simd/scalar_kquant.h"
#endif

namespace llama2 {
namespace LLAMA2_ISA_NS {

// A tile's weight rows decoded: per row, nbp blocks of 32 (zero past the row's end).
class DecodedTile {
 public:
  DecodedTile(int64_t nbp, uint8_t* buffer) : nbp_(nbp), base_(buffer) {}
  // Bytes for `rows` rows of nbp blocks (nbp a multiple of 16: every array stays 64-byte aligned).
  static int64_t bytes(int64_t rows, int64_t nbp) { return rows * nbp * (QK + 4 * 4); }

  DecodedBlocks row(int64_t r, int64_t b = 0) const {
    uint8_t* p = base_ + r * bytes(1, nbp_);
    auto* slo = reinterpret_cast<int32_t*>(p + nbp_ * QK);
    float* d32 = reinterpret_cast<float*>(slo + 2 * nbp_);
    return {reinterpret_cast<int8_t*>(p) + b * QK, slo + b, slo + nbp_ + b, d32 + b, d32 + nbp_ + b};
  }

 private:
  int64_t nbp_;
  uint8_t* base_;
};

// Decodes one weight row of nb blocks of 32 into `out` (nbp blocks, the rest zero).
template <int64_t QT>
void decode_row(const uint8_t* row, int64_t nb, int64_t nbp, const DecodedTile& tile, int64_t r) {
  constexpr int64_t per = values_per_block(QT) / QK, bytes = kquant_block_bytes(QT);
  DecodedBlocks at = tile.row(r);
  for (int64_t b = 0; b < nb; b += per, row += bytes) {
    decode_block<QT>(row, at);
    at = {at.q + per * QK, at.slo + per, at.shi + per, at.d32 + per, at.m32 + per};
  }
  const DecodedBlocks pad = at;
  const int64_t rest = nbp - nb;
  std::memset(pad.q, 0, rest * QK);
  std::memset(pad.slo, 0, rest * 4);
  std::memset(pad.shi, 0, rest * 4);
  std::memset(pad.d32, 0, rest * 4);
  std::memset(pad.m32, 0, rest * 4);
}

// One decoded weight row against one activation row (the float order above).
template <int64_t QT>
float decoded_row_dot(const DecodedBlocks& w, const ActRow& a, int64_t nb, int64_t nbp) {
  V::F16 acc = V::zero();
  for (int64_t g = 0; g < nbp; g += GROUP) {
    const int cnt = static_cast<int>(std::min<int64_t>(GROUP, nb - g));
    const V::I16 isum = V::unpacked_isums(w.q + g * QK, a.q + g * QK, cnt);
    if (kquant_has_min(QT)) acc = V::fmadd(V::load(w.m32 + g), V::load(a.xs + g), acc);
    acc = V::fmadd(V::to_float(isum), V::mul(V::load(w.d32 + g), V::load(a.d + g)), acc);
  }
  return V::reduce_add(acc);
}

template <int64_t QT, class ParallelFor>
void kquant_tiles(const uint8_t* w, const QuantActs& acts, int64_t m_rows, int64_t n, int64_t k, float* y,
                  const ParallelFor& parallel_for) {
  const int64_t nb = acts.nb, nbp = acts.nbp, bytes = row_bytes(QT, k), tiles = (n + ROWS - 1) / ROWS;
  const int64_t grain = std::max<int64_t>(1, TASK_MIN_BYTES / (ROWS * bytes * std::min<int64_t>(m_rows, 4)));
  parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    static thread_local Scratch decoded_scratch;
    // One weight row decoded at a time, used by every activation row while it is in L1 (a
    // tile of 4 rows of 11008 values decoded is 66 KB).
    const DecodedTile decoded(nbp, decoded_scratch.get(DecodedTile::bytes(1, nbp)));
    for (int64_t row = t0 * ROWS; row < std::min(n, t1 * ROWS); ++row) {
      decode_row<QT>(w + row * bytes, nb, nbp, decoded, 0);
      for (int64_t m = 0; m < m_rows; ++m) y[m * n + row] = decoded_row_dot<QT>(decoded.row(0), acts.row(m), nb, nbp);
    }
  });
}

// gemv.h's matmul for Q5_0 / Q5_1 (qtype and k checked by the caller).
template <typename T, class ParallelFor>
void matmul_kquant(const T* x, int64_t m_rows, const uint8_t* w, int64_t qtype, int64_t n, int64_t k, float* y,
                   const ParallelFor& parallel_for) {
  const QuantActs acts = quantize_acts(x, m_rows, k, 0, parallel_for);
  if (qtype == Q5_0) return kquant_tiles<Q5_0>(w, acts, m_rows, n, k, y, parallel_for);
  kquant_tiles<Q5_1>(w, acts, m_rows, n, k, y, parallel_for);
}

}  // namespace LLAMA2_ISA_NS
}  // namespace llama2
