// y = x W^T straight from GGUF Q4_0 / Q4_1 / Q8_0 weight blocks: the arithmetic every
// variant shares, written against the primitives of simd/ (torch-free).
//
// The scheme is llama.cpp's: every activation row is quantized per block of 32 values to
// int8 with one fp32 scale (d_x = amax / 127, q = round-to-nearest-even(x / d_x)), the
// weight blocks are used as stored, and each (weight block b, activation block b) pair
// contributes
//
//     fp32(d_w * d_x) * isum_b                                     Q4_0, Q8_0
//     m_w * fp32(d_x * sumq_b), then fp32(d_w * d_x) * isum_b      Q4_1
//
// where isum_b is the EXACT integer dot product of the block's weight integers (Q4_0:
// nibble - 8, Q4_1: nibble, Q8_0: int8) with the activation's int8 values, and sumq_b the
// sum of those int8 values.
//
// The float order, identical in every variant (so all give bitwise the same y): 16 fp32
// partial sums, block b into partial b % 16, each term added with one fused multiply-add
// (Q4_1: acc = fma(m_w, xs_b, acc) first, then acc = fma(float(isum_b), d_w * d_x, acc)),
// blocks in increasing order; then the partials reduced by simd reduce_add's fixed tree
// (scalar.h). Blocks past the row's end are zero padding (d_x = 0) and add exactly 0.
// Rows do not depend on the batch M they are computed in.
//
// The generic kernel below gets each group of 16 blocks' exact sums from the ISA's
// group_isums (M <= 2: the sums in registers, each decoded group serving both rows) or,
// for a batch of rows (M >= BATCHED_MIN_M: a decode step of several sequences), decodes
// each group once (prepare_group; AVX2 also transposes it against transposed activations)
// and computes every row from it (group_isums_prepared). AVX-512 VNNI has its own kernels
// (simd/avx512_vnni_gemv.h) with the same arithmetic. On AVX2 / AVX-VNNI the generic kernel
// also takes Q5_0 / Q5_1 (unsigned values nibble | 5th bit << 4, Q5_0's 16 taken off with
// sumq, Q5_1's minimum as Q4_1's), which elsewhere go through kquant_gemv.h. Q4_K / Q5_K /
// Q6_K have their own kernel on super-blocks (superblock_gemv.h). A single activation row
// takes a tile's weight rows one after another: one sequential stream of weights, which the
// hardware prefetchers follow (the tile's rows side by side ran slower from memory).
// Included inside namespace llama2::LLAMA2_ISA_NS (see core/isa.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#include "blocks.h"
#include "isa.h"
#include "kquant_blocks.h"

namespace llama2 {
namespace LLAMA2_ISA_NS {

namespace V = ::llama2::LLAMA2_SIMD;

constexpr int GROUP = 16;  // blocks handled together: the 16 float partial sums
constexpr int ROWS = 4;    // weight rows per tile: each activation block serves 4 rows
// AVX-512: from this many activation rows a tile of weight rows is first unpacked for the
// prefill kernels; below, M = 1 and 2 read the GGUF bytes directly.
constexpr int64_t TRANSPOSED_MIN_M = 3;
constexpr int MB = 2;  // activation rows per pass in the AVX-512 prefill path
// Generic kernel: from this many activation rows each decoded weight group serves them all
// (dot_tile_batched); below, two activation rows per pass with the sums in registers.
constexpr int64_t BATCHED_MIN_M = 3;
// Q5_0 / Q5_1 through the generic kernel, decoded in registers, where the ISA's primitives
// take them (simd/avx2.h: AVX2, AVX-VNNI); elsewhere through kquant_gemv.h's decoded tiles.
// (Q4_K / Q5_K / Q6_K: superblock_gemv.h in every variant.)
#if defined(LLAMA2_ISA_AVX2) || defined(LLAMA2_ISA_AVX_VNNI)
constexpr bool kGenericKQuants = true;
#else
constexpr bool kGenericKQuants = false;
#endif
constexpr bool generic_kernel_type(int64_t qtype) {
  return !kquant_matmul_type(qtype) || (kGenericKQuants && (qtype == Q5_0 || qtype == Q5_1));
}
// Software prefetch distance of the weight stream, rounded up to whole tiles.
constexpr int64_t PREFETCH_BYTES = 8 << 10;
// Minimum weight bytes per parallel task: the matmuls of a 135M model are 70 KB..1 MB and
// the thread pool's fork/join costs about a microsecond.
constexpr int64_t TASK_MIN_BYTES = 32 << 10;

inline float fp16_at(const uint8_t* p) { return fp16_to_fp32(load_u16(p)); }

// A tile's results for one activation row: at most ROWS floats (a loop: std::copy would
// call memmove for each few bytes).
inline void store_tile_row(const float* out, int rows, float* y) {
  for (int r = 0; r < rows; ++r) y[r] = out[r];
}

// ---------------------------------------------------------------------------------------
// Scratch memory: per-thread, 64-byte aligned, reused across calls (no allocator traffic on
// the decode path). Requests above kScratchKeep are served by a temporary allocation.
// ---------------------------------------------------------------------------------------
constexpr size_t kScratchKeep = 32u << 20;

class Scratch {
 public:
  uint8_t* get(size_t bytes) {
    if (bytes > kScratchKeep) {
      big_.reset(new uint8_t[bytes + 64]);
      return align(big_.get());
    }
    big_.reset();
    if (bytes > cap_) {
      cap_ = std::max(bytes, cap_ * 2);
      mem_.reset(new uint8_t[cap_ + 64]);
    }
    return align(mem_.get());
  }

 private:
  static uint8_t* align(uint8_t* p) {
    return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + 63) / 64 * 64);
  }
  std::unique_ptr<uint8_t[]> mem_, big_;
  size_t cap_ = 0;
};

// ---------------------------------------------------------------------------------------
// Quantized activations.
//
// Blocks are padded to a multiple of GROUP per row with zero blocks (q = 0, d = 0, ...),
// which contribute exactly nothing. Per activation row:
//   q     [nbp][32]  int8   quantized values
//   d     [nbp]      float  block scale d_x
//   xs    [nbp]      float  fp32(d_x * sumq), for Q4_1's minimum
//   sumq  [nbp]      int32  sum of the block's values (Q4_0's offset in group_isums)
// and for the AVX-512 VNNI kernels only (simd/avx512_vnni_gemv.h):
//   qq    [nbp/4][2][64] int8  the decode path's layout: per quad of 4 blocks, values
//                           0..15 of the 4 blocks, then values 16..31 of the 4 blocks
//   noffq [nbp][4]   int32  -offset * (sum of values 4l..4l+3 and 16+4l..16+4l+3), l < 4:
//                           the decode path's initial vpdpbusd accumulator
//   qT    [nbp/16][8][16][4] int8  the prefill path's layout: per group of 16 blocks,
//                           for each 4-byte column c of a block, the 16 blocks' column c
//   noffT [nbp]      int32  -offset * sumq: the prefill path's initial accumulator
// (qT and noffT only when `transposed`; qT is also the AVX2 batched rows' layout.)
// ---------------------------------------------------------------------------------------
struct ActRow {
  const int8_t* q;
  const float* d;
  const float* xs;
  const int32_t* sumq;
  const int8_t* qq;
  const int32_t* noffq;
  const int8_t* qT;
  const int32_t* noffT;
};

struct QuantActs {
  int64_t nb = 0, nbp = 0;  // blocks per row, padded
  bool transposed = false;
  int64_t row_bytes = 0;    // bytes per row in the buffer
  uint8_t* base = nullptr;

  // nbp is a multiple of 16, so every array below starts 64-byte aligned.
  static int64_t bytes_per_row(int64_t nbp) { return nbp * (QK + 4 + 4 + 4 + QK + 16 + QK + 4); }

  QuantActs(int64_t nb_, bool transposed_, uint8_t* buffer)
      : nb(nb_), nbp((nb_ + GROUP - 1) / GROUP * GROUP), transposed(transposed_), base(buffer) {
    row_bytes = bytes_per_row(nbp);
  }
  int8_t* q(int64_t m) const { return reinterpret_cast<int8_t*>(base + m * row_bytes); }
  float* d(int64_t m) const { return reinterpret_cast<float*>(base + m * row_bytes + nbp * QK); }
  float* xs(int64_t m) const { return d(m) + nbp; }
  int32_t* sumq(int64_t m) const { return reinterpret_cast<int32_t*>(xs(m) + nbp); }
  int8_t* qq(int64_t m) const { return reinterpret_cast<int8_t*>(sumq(m) + nbp); }
  int32_t* noffq(int64_t m) const { return reinterpret_cast<int32_t*>(qq(m) + nbp * QK); }
  int8_t* qT(int64_t m) const { return reinterpret_cast<int8_t*>(noffq(m) + nbp * 4); }
  int32_t* noffT(int64_t m) const { return reinterpret_cast<int32_t*>(qT(m) + nbp * QK); }
  ActRow row(int64_t m) const { return {q(m), d(m), xs(m), sumq(m), qq(m), noffq(m), qT(m), noffT(m)}; }
};

// One block of 32 values -> int8 q, returns d; lane_sums[l] = q[4l] + ... + q[4l + 3].
// Every path shares this arithmetic: d = amax / 127, id = 1 / d (0 if d == 0),
// q = round_half_even(x * id), all in fp32.
template <typename T>
inline float quantize_block_scalar(const T* x, int8_t* q, int32_t* lane_sums) {
  float v[QK];
  float amax = 0.f;
  for (int j = 0; j < QK; ++j) {
    v[j] = to_f32(x[j]);
    amax = std::max(amax, std::fabs(v[j]));
  }
  const float d = amax / 127.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  for (int j = 0; j < QK; ++j) q[j] = static_cast<int8_t>(std::nearbyint(v[j] * id));  // ties to even
  for (int l = 0; l < 8; ++l) lane_sums[l] = q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3];
  return d;
}

#if LLAMA2_GEMV_AVX512
}  // namespace LLAMA2_ISA_NS
}  // namespace llama2
#include "../simd/avx512_vnni_gemv.h"
namespace llama2 {
namespace LLAMA2_ISA_NS {
#endif

// The row's blocks (and, for AVX-512 VNNI, their decode and prefill layouts).
template <typename T>
void quantize_row(const T* x, const QuantActs& a, int64_t m, int32_t offset) {
  int8_t* q = a.q(m);
  float* d = a.d(m);
  float* xs = a.xs(m);
  int32_t* sumq = a.sumq(m);
  int8_t* qq = a.qq(m);
  int32_t* noffq = a.noffq(m);
  const int64_t nb = a.nb, pad = a.nbp - a.nb;
  for (int64_t b = 0; b < nb; ++b) {
    int32_t lanes[8];
#if LLAMA2_GEMV_AVX512
    const float db = quantize_block_avx512(x + b * QK, q + b * QK, lanes);
#else
    const float db = quantize_block_scalar(x + b * QK, q + b * QK, lanes);
#endif
    int32_t s = 0;
    for (int l = 0; l < 8; ++l) s += lanes[l];
    d[b] = db;
    sumq[b] = s;
    xs[b] = db * static_cast<float>(s);
    if (LLAMA2_GEMV_AVX512) {
      for (int l = 0; l < 4; ++l) noffq[b * 4 + l] = -offset * (lanes[l] + lanes[l + 4]);
      int8_t* quad = qq + (b / 4) * 128 + (b % 4) * 16;
      std::memcpy(quad, q + b * QK, 16);
      std::memcpy(quad + 64, q + b * QK + 16, 16);
    }
  }
  std::memset(q + nb * QK, 0, pad * QK);
  std::memset(d + nb, 0, pad * 4);
  std::memset(xs + nb, 0, pad * 4);
  std::memset(sumq + nb, 0, pad * 4);
  if (LLAMA2_GEMV_AVX512) {
    std::memset(noffq + nb * 4, 0, pad * 16);
    for (int64_t b = nb; b < a.nbp; ++b) {
      int8_t* quad = qq + (b / 4) * 128 + (b % 4) * 16;
      std::memset(quad, 0, 16);
      std::memset(quad + 64, 0, 16);
    }
  }
  if (a.transposed) {
    // qT[g][c][i] = column c (4 bytes) of block 16 g + i.
    const uint32_t* src = reinterpret_cast<const uint32_t*>(q);
    uint32_t* dst = reinterpret_cast<uint32_t*>(a.qT(m));
    for (int64_t g = 0; g < a.nbp / GROUP; ++g) {
      for (int c = 0; c < 8; ++c) {
        for (int i = 0; i < GROUP; ++i) dst[(g * 8 + c) * GROUP + i] = src[(g * GROUP + i) * 8 + c];
      }
    }
    int32_t* noffT = a.noffT(m);
    for (int64_t b = 0; b < a.nbp; ++b) noffT[b] = -offset * sumq[b];
  }
}

#if !LLAMA2_GEMV_AVX512
// ---------------------------------------------------------------------------------------
// Generic kernel: R weight rows (row_bytes apart) against MD activation rows.
// Per group of 16 blocks: the ISA's exact block sums (V::group_isums), the blocks' scales
// (V::group_scales), and the float terms in the order above (the same for any R, MD: rows
// do not depend on M). Prefetches `pf` bytes ahead in the tile's byte stream (the R rows
// of a tile are contiguous).
// ---------------------------------------------------------------------------------------

// R weight rows against MD activation rows a[0..MD): out[md][r].
template <int64_t QT, int R, int MD>
void dot_tile(const uint8_t* w, int64_t row_bytes, int64_t nb, int64_t pf, const ActRow* a, float (*out)[ROWS]) {
  V::F16 acc[MD][R];
  for (int md = 0; md < MD; ++md)
    for (int r = 0; r < R; ++r) acc[md][r] = V::zero();
  for (int64_t g = 0; g < nb; g += GROUP) {
    const int cnt = static_cast<int>(std::min<int64_t>(GROUP, nb - g));
    if (pf > 0) {
      const uint8_t* p = w + pf + g * block32_bytes(QT) * R;
      for (int64_t i = 0; i < GROUP * block32_bytes(QT) * R; i += 64) V::prefetch(p + i);
    }
    const int8_t* q[MD];
    const int32_t* sumq[MD];
    for (int md = 0; md < MD; ++md) {
      q[md] = a[md].q + g * QK;
      sumq[md] = a[md].sumq + g;
    }
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * row_bytes + g * block32_bytes(QT);
      V::I16 isum[MD];
      V::group_isums<QT, MD>(blk, q, sumq, cnt, isum);
      V::F16 dw, mw;
      V::group_scales<QT>(blk, cnt, dw, mw);
      for (int md = 0; md < MD; ++md) {
        if (block32_has_min(QT)) acc[md][r] = V::fmadd(mw, V::load(a[md].xs + g), acc[md][r]);
        acc[md][r] = V::fmadd(V::to_float(isum[md]), V::mul(dw, V::load(a[md].d + g)), acc[md][r]);
      }
    }
  }
  for (int md = 0; md < MD; ++md)
    for (int r = 0; r < R; ++r) out[md][r] = V::reduce_add(acc[md][r]);
}

// A tile of `rows` weight rows against every activation row: two activation rows per pass
// (each decoded weight block serves both) with two weight rows at a time (the sums stay
// in registers), a last odd activation row with all the tile's rows.
template <int64_t QT>
void dot_tile_all(const uint8_t* w, int64_t row_bytes, int rows, int64_t pf, const QuantActs& acts, int64_t m_rows,
                  float (*out)[ROWS]) {
  const int64_t nb = acts.nb;
  int64_t m = 0;
  for (; m + 2 <= m_rows; m += 2) {
    const ActRow a[2] = {acts.row(m), acts.row(m + 1)};
    for (int r0 = 0; r0 < rows; r0 += 2) {
      float part[2][ROWS];
      if (rows - r0 >= 2) {
        dot_tile<QT, 2, 2>(w + r0 * row_bytes, row_bytes, nb, pf, a, part);
      } else {
        dot_tile<QT, 1, 2>(w + r0 * row_bytes, row_bytes, nb, pf, a, part);
      }
      for (int md = 0; md < 2; ++md)
        for (int r = 0; r < std::min(2, rows - r0); ++r) out[m + md][r0 + r] = part[md][r];
    }
  }
  if (m < m_rows) {
    const ActRow a[1] = {acts.row(m)};
    for (int r = 0; r < rows; ++r) {
      float part[1][ROWS];
      dot_tile<QT, 1, 1>(w + r * row_bytes, row_bytes, nb, pf, a, part);
      out[m][r] = part[0][0];
    }
  }
}

// Batched rows (M >= BATCHED_MIN_M, a decode step of several sequences): each group of a
// weight row is decoded once (V::prepare_group) and serves every activation row, whose 16
// float partial sums per weight row wait in acc [m_rows][ROWS] (scratch memory) meanwhile.
// Per row the same terms in the same order as dot_tile.
template <int64_t QT>
void dot_tile_batched(const uint8_t* w, int64_t row_bytes, int rows, const QuantActs& acts, int64_t m_rows,
                      V::F16* acc, float (*out)[ROWS]) {
  const int64_t nb = acts.nb;
  for (int64_t i = 0; i < m_rows * ROWS; ++i) acc[i] = V::zero();
  for (int r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < nb; g += GROUP) {
      const int cnt = static_cast<int>(std::min<int64_t>(GROUP, nb - g));
      const uint8_t* blk = w + r * row_bytes + g * block32_bytes(QT);
      V::GroupWeights<QT> gw;
      V::prepare_group<QT>(blk, cnt, gw);
      V::F16 dw, mw;
      V::group_scales<QT>(blk, cnt, dw, mw);
      for (int64_t m = 0; m < m_rows; ++m) {
        const int8_t* qT = V::kTransposedActs ? acts.qT(m) + g * QK : nullptr;
        const V::I16 isum = V::group_isums_prepared<QT>(gw, acts.q(m) + g * QK, qT, acts.sumq(m) + g);
        V::F16& sum = acc[m * ROWS + r];
        if (block32_has_min(QT)) sum = V::fmadd(mw, V::load(acts.xs(m) + g), sum);
        sum = V::fmadd(V::to_float(isum), V::mul(dw, V::load(acts.d(m) + g)), sum);
      }
    }
  }
  for (int64_t m = 0; m < m_rows; ++m)
    for (int r = 0; r < rows; ++r) out[m][r] = V::reduce_add(acc[m * ROWS + r]);
}

template <int64_t QT, class ParallelFor>
void run_tiles(const uint8_t* w, const QuantActs& acts, int64_t m_rows, int64_t n, float* y, int64_t grain,
               const ParallelFor& parallel_for) {
  const int64_t nb = acts.nb, row_bytes = nb * block32_bytes(QT), tiles = (n + ROWS - 1) / ROWS;
  const int64_t tile_bytes = ROWS * row_bytes;
  const int64_t pf = m_rows <= 2 ? (PREFETCH_BYTES + tile_bytes - 1) / tile_bytes * tile_bytes : 0;
  const bool batched = m_rows >= BATCHED_MIN_M;
  parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    static thread_local Scratch out_scratch, acc_scratch;
    auto* out = reinterpret_cast<float(*)[ROWS]>(out_scratch.get(m_rows * ROWS * sizeof(float)));
    auto* acc = batched ? reinterpret_cast<V::F16*>(acc_scratch.get(m_rows * ROWS * sizeof(V::F16))) : nullptr;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * ROWS;
      const int rows = static_cast<int>(std::min<int64_t>(ROWS, n - r0));
      if (batched) {
        dot_tile_batched<QT>(w + r0 * row_bytes, row_bytes, rows, acts, m_rows, acc, out);
      } else {
        dot_tile_all<QT>(w + r0 * row_bytes, row_bytes, rows, pf, acts, m_rows, out);
      }
      for (int64_t m = 0; m < m_rows; ++m) store_tile_row(out[m], rows, y + m * n + r0);
    }
  });
}
#endif  // !LLAMA2_GEMV_AVX512

// Quantizes the M x K activations into the calling thread's scratch buffer.
template <typename T, class ParallelFor>
QuantActs quantize_acts(const T* xp, int64_t m_rows, int64_t k, int32_t offset, const ParallelFor& parallel_for) {
  static thread_local Scratch act_scratch;
  const int64_t nb = k / QK;
  const int64_t nbp = (nb + GROUP - 1) / GROUP * GROUP;
#if LLAMA2_GEMV_AVX512
  const bool transposed = m_rows >= TRANSPOSED_MIN_M;
#else
  const bool transposed = V::kTransposedActs && m_rows >= BATCHED_MIN_M;
#endif
  QuantActs acts(nb, transposed, act_scratch.get(m_rows * QuantActs::bytes_per_row(nbp)));
  parallel_for(0, m_rows, std::max<int64_t>(1, 65536 / k), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_row(xp + m * k, acts, m, offset);
  });
  return acts;
}

// The integer offset folded into the VNNI kernels' accumulators (0 for the generic kernel,
// whose group_isums subtracts Q4_0's 8 itself).
constexpr int32_t acts_offset(int64_t qtype) {
  return LLAMA2_GEMV_AVX512 ? (qtype == Q4_0 ? 8 : qtype == Q8_0 ? 128 : 0) : 0;
}

// Q5_0 / Q5_1 on the variants without kGenericKQuants: kquant_gemv.h; Q4_K / Q5_K / Q6_K:
// superblock_gemv.h (both included at the end of this file).
template <typename T, class ParallelFor>
void matmul_kquant(const T* x, int64_t m_rows, const uint8_t* w, int64_t qtype, int64_t n, int64_t k, float* y,
                   const ParallelFor& parallel_for);
template <typename T, class ParallelFor>
void matmul_superblocks(const T* x, int64_t m_rows, const uint8_t* w, int64_t qtype, int64_t n, int64_t k, float* y,
                        const ParallelFor& parallel_for);

// y [m, n] (float32, contiguous) = x [m, k] (float, bf16 or fp16, contiguous) W^T for W
// [n, k] given as GGUF blocks (row-major, k / 32 blocks a row; qtype checked by the caller).
// parallel_for(begin, end, grain, fn(b, e)) splits work (at::parallel_for in the torch glue).
template <typename T, class ParallelFor>
void matmul(const T* x, int64_t m_rows, const uint8_t* w, int64_t qtype, int64_t n, int64_t k, float* y,
            const ParallelFor& parallel_for) {
  if (m_rows == 0 || n == 0) return;
  if (superblock_type(qtype)) return matmul_superblocks(x, m_rows, w, qtype, n, k, y, parallel_for);
  if (!generic_kernel_type(qtype)) return matmul_kquant(x, m_rows, w, qtype, n, k, y, parallel_for);
  const QuantActs acts = quantize_acts(x, m_rows, k, acts_offset(qtype), parallel_for);
  const int64_t tile_bytes = ROWS * k / QK * block32_bytes(qtype);
  const int64_t grain = std::max<int64_t>(1, TASK_MIN_BYTES / (tile_bytes * std::min<int64_t>(m_rows, 4)));
  switch (qtype) {
    case Q4_0: run_tiles<Q4_0>(w, acts, m_rows, n, y, grain, parallel_for); break;
    case Q4_1: run_tiles<Q4_1>(w, acts, m_rows, n, y, grain, parallel_for); break;
    case Q5_0:
      if constexpr (kGenericKQuants) run_tiles<Q5_0>(w, acts, m_rows, n, y, grain, parallel_for);
      break;
    case Q5_1:
      if constexpr (kGenericKQuants) run_tiles<Q5_1>(w, acts, m_rows, n, y, grain, parallel_for);
      break;
    default: run_tiles<Q8_0>(w, acts, m_rows, n, y, grain, parallel_for); break;
  }
}

}  // namespace LLAMA2_ISA_NS
}  // namespace llama2

#include "kquant_gemv.h"
#include "superblock_gemv.h"
