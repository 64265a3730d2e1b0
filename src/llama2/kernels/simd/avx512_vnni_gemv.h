// The AVX-512 VNNI matmul kernels (the avx512_vnni variant of core/gemv.h's matmul):
// the same exact block sums and the same float accumulation as the generic kernel, with
// zmm-specific layouts. Included by core/gemv.h inside namespace llama2::LLAMA2_ISA_NS.
//
// Output rows are processed in tiles of ROWS = 4 weight rows (the rows of a tile share
// every activation load; a single activation row takes them one after another, one
// sequential stream of weights); the caller's parallel_for splits the tiles. Both paths end a
// GROUP of 16 blocks with the 16 exact block sums in one zmm (lane i = block i), then
// acc += float(isum) * fp32(d_w * d_x) (after Q4_1's acc += m_w * xs): block b into partial
// b % 16. store_sums reduces each row's partials with reduce_add's tree (simd/scalar.h).
//
// The integer dot products use vpdpbusd (unsigned bytes x signed bytes, 4 products added
// into each int32 lane). The weight side is the unsigned operand:
//   Q4_0: nibbles 0..15; the -8 is folded in as -8 * sumq.
//   Q4_1: nibbles 0..15, nothing to fold; the minimum is the float term.
//   Q8_0: w ^ 0x80 = w + 128 in 0..255; the +128 is removed with -128 * sumq.
// The integer corrections are precomputed per activation block (QuantActs' noffq, noffT),
// split over the int32 lanes that hold the block, and used as vpdpbusd's initial
// accumulator: they are free in the weight loop and isum stays exact.
//
// Decode, M < TRANSPOSED_MIN_M (dot_rows_direct): straight from the GGUF bytes, 4 blocks
// at a time (expand_quad), block sums by shuffles and adds (quad_sums_to_blocks). Scales
// come from plain loads of the group's bytes (load_scales).
//
// Prefill, M >= TRANSPOSED_MIN_M (dot_tile_unpacked): a tile is unpacked once into a
// transposed layout in which each int32 lane accumulates one whole block, then used for
// all activation rows.
#pragma once

#include <immintrin.h>

namespace llama2 {
namespace LLAMA2_ISA_NS {

// Same arithmetic as quantize_block_scalar (vcvtps2dq rounds to nearest even under the
// default MXCSR).
template <typename T>
GGUF_INLINE float quantize_block_avx512(const T* x, int8_t* q, int32_t* lane_sums) {
  const __m512 x0 = V::load16(x), x1 = V::load16(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
  const float d = amax / 127.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  const __m512 vid = _mm512_set1_ps(id);
  const __m128i q0 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(x0, vid)));
  const __m128i q1 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(x1, vid)));
  const __m256i qv = _mm256_inserti128_si256(_mm256_castsi128_si256(q0), q1, 1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), qv);
  // Lane sums: vpdpbusd with unsigned ones adds each group of 4 values.
  const __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(1), qv);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lane_sums), s);
  return d;
}

// Two blocks' weights (pa, pb) as 64 unsigned bytes in the natural activation layout
// (block A in bytes 0..31, B in 32..63; byte j of a block = value j): the prefill unpacking.
template <int64_t QT>
GGUF_INLINE __m512i expand_pair(const uint8_t* pa, const uint8_t* pb) {
  if (QT == Q8_0) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pa + 2));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + 2));
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
    return _mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80)));  // s8 -> u8 (+128)
  } else {
    constexpr int OFF = QT == Q4_0 ? 2 : 4;
    // [A.qs, A.qs, B.qs, B.qs]; 128-bit lanes 1 and 3 shifted right by 4 give the high nibbles.
    const __m256i a = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pa + OFF)));
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pb + OFF)));
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
    const __m512i shifts = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
    return _mm512_and_si512(_mm512_srlv_epi64(v, shifts), _mm512_set1_epi8(0x0F));
  }
}

// ---- Block scales without gathers ----
// vpgatherdd is slow on this hardware (~25 cycles for 16 elements, as much as the dot
// products of those 16 blocks). The fp16 scales of a GROUP of blocks are instead picked out
// of plain loads of the group's bytes: every block size is even, so each d (and Q4_1's m)
// is a 16-bit word at a fixed word index from the group's start (d of block b at word
// b * BS / 2). The group is read in windows of 64 words (two zmm); per window one vpermt2w
// moves that window's scales to their output lanes: lanes 0..15 = d of blocks 0..15,
// lanes 16..31 = m (Q4_1). Masked loads stop at the group's last byte.
template <int64_t QT>
struct ScaleWindows {
  static constexpr int64_t BS = block_bytes(QT);
  static constexpr int64_t WORDS = GROUP * BS / 2;    // 16-bit words in a full group
  static constexpr int NW = (WORDS + 63) / 64;        // windows: 3, 3, 5 for Q4_0, Q4_1, Q8_0
  alignas(64) int16_t idx[NW][32];                    // vpermt2w indices (0..63) per window
  uint32_t lanes[NW];                                 // output lanes each window provides

  constexpr ScaleWindows() : idx{}, lanes{} {
    for (int w = 0; w < NW; ++w) {
      for (int i = 0; i < 32; ++i) {
        const bool is_m = i >= 16;
        if (is_m && QT != Q4_1) continue;
        const int64_t word = (i % 16) * BS / 2 + (is_m ? 1 : 0) - 64 * w;
        if (word >= 0 && word < 64) {
          idx[w][i] = static_cast<int16_t>(word);
          lanes[w] |= 1u << i;
        }
      }
    }
  }
};
template <int64_t QT>
constexpr ScaleWindows<QT> kScaleWindows{};

// Mask of the first `words` (clamped to 0..32) 16-bit lanes.
GGUF_INLINE __mmask32 first_words(int64_t words) {
  return words >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu)
                     : words <= 0 ? 0 : static_cast<__mmask32>((1u << words) - 1);
}

// d (and m) of the blocks of a group starting at blk, as fp32; FULL: 16 blocks, otherwise
// cnt blocks (lanes from cnt on are 0).
template <int64_t QT, bool FULL>
GGUF_INLINE void load_scales(const uint8_t* blk, int64_t cnt, __m512& dw, __m512& mw) {
  using SW = ScaleWindows<QT>;
  const SW& tab = kScaleWindows<QT>;
  const int64_t words = (FULL ? GROUP : cnt) * SW::BS / 2;
  __m512i res = _mm512_setzero_si512();
  for (int w = 0; w < SW::NW; ++w) {
    const int64_t valid = words - 64 * w;  // words of this window inside the group
    if (valid <= 0) break;
    const uint8_t* p = blk + 128 * w;
    const __m512i lo = valid >= 32 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(first_words(valid), p);
    const __m512i hi = valid >= 64 ? _mm512_loadu_si512(p + 64)
                                   : _mm512_maskz_loadu_epi16(first_words(valid - 32), p + 64);
    const __m512i picked = _mm512_permutex2var_epi16(lo, _mm512_load_si512(tab.idx[w]), hi);
    res = _mm512_mask_blend_epi16(static_cast<__mmask32>(tab.lanes[w]), res, picked);
  }
  dw = _mm512_cvtph_ps(_mm512_castsi512_si256(res));
  if (QT == Q4_1) mw = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(res, 1));
}

// Horizontal sums of 4 vectors: [sum(a), sum(b), sum(c), sum(d)].
GGUF_INLINE __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  auto fold = [](__m512 v) {  // 16 -> 8 lanes
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  };
  const __m256 ab = _mm256_hadd_ps(fold(a), fold(b));  // [a01 a23 b01 b23 | a45 a67 b45 b67]
  const __m256 cd = _mm256_hadd_ps(fold(c), fold(d));
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // [a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7]
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// Sums of R <= 4 accumulators into out[0..R).
template <int R>
GGUF_INLINE void store_sums(const __m512* acc, float* out) {
  const __m512 z = _mm512_setzero_ps();
  alignas(16) float sums[4];
  _mm_store_ps(sums, hsum4(acc[0], R > 1 ? acc[1] : z, R > 2 ? acc[2] : z, R > 3 ? acc[3] : z));
  for (int r = 0; r < R; ++r) out[r] = sums[r];
}

// ---- Decode path (M <= 2): dot products straight from the GGUF blocks ----
//
// Blocks are taken 4 at a time (a quad). Two zmm hold the quad's weights in the
// activation's qq layout: `lo` = values 0..15 of the 4 blocks, `hi` = values 16..31, so
// after vpdpbusd(lo) and vpdpbusd(hi) into one accumulator the 4 int32 lanes of 128-bit
// lane b hold block b's 32 products. Every 4 quads (a GROUP) shuffles and adds leave each
// block's exact integer dot product in its own lane (lane i = block i), and one conversion
// and one FMA with d_w * d_x finish the group: the same float arithmetic as the prefill
// path. (Scaling each lane's partial sum of 4 products instead, as llama.cpp does, needs
// no reduction but rounds differently from the prefill path; measured no faster on a
// whole decode token, which is memory bound.)

// The weights of 4 consecutive blocks (blk, blk + BS, ...; `last` clamps the block index
// for a partial quad at the row's end) as the unsigned bytes lo, hi.
template <int64_t QT>
GGUF_INLINE void expand_quad(const uint8_t* blk, int64_t last, __m512i& lo, __m512i& hi) {
  constexpr int64_t BS = block_bytes(QT);
  auto at = [&](int64_t i) GGUF_LAMBDA_INLINE { return blk + std::min<int64_t>(i, last) * BS; };
  if (QT == Q8_0) {
    // [A.qs | B.qs] and [C.qs | D.qs] as 32-byte halves, then 128-bit lanes regrouped.
    auto qs = [&](int64_t i) GGUF_LAMBDA_INLINE {
      return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at(i) + 2));
    };
    const __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512(qs(0)), qs(1), 1);
    const __m512i cd = _mm512_inserti64x4(_mm512_castsi256_si512(qs(2)), qs(3), 1);
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // s8 -> u8 (+128)
    lo = _mm512_xor_si512(_mm512_shuffle_i32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)), flip);
    hi = _mm512_xor_si512(_mm512_shuffle_i32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)), flip);
  } else {
    constexpr int OFF = QT == Q4_0 ? 2 : 4;
    auto qs = [&](int64_t i) GGUF_LAMBDA_INLINE {
      return _mm_loadu_si128(reinterpret_cast<const __m128i*>(at(i) + OFF));
    };
    __m512i v = _mm512_castsi128_si512(qs(0));
    v = _mm512_inserti32x4(v, qs(1), 1);
    v = _mm512_inserti32x4(v, qs(2), 2);
    v = _mm512_inserti32x4(v, qs(3), 3);
    const __m512i mask = _mm512_set1_epi8(0x0F);
    lo = _mm512_and_si512(v, mask);
    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
  }
}

// Block sums of a single quad accumulator (a group of at most 4 blocks): lane i = block i
// for i < 4; the other lanes hold copies (their scales are 0).
GGUF_INLINE __m512i quad_sums_one(__m512i q0) {
  __m512i t = _mm512_add_epi32(q0, _mm512_shuffle_epi32(q0, _MM_PERM_BADC));
  t = _mm512_add_epi32(t, _mm512_shuffle_epi32(t, _MM_PERM_CDAB));  // every dword of 128-bit lane b: block b
  return _mm512_permutexvar_epi32(_mm512_set_epi32(12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0), t);
}

// Reduces a group's 4 quad accumulators (128-bit lane b of quad k: block 4k + b, 4 partial
// sums) to the 16 blocks' sums, lane i = block i.
GGUF_INLINE __m512i quad_sums_to_blocks(__m512i q0, __m512i q1, __m512i q2, __m512i q3) {
  // 128-bit lane b: [block b x 2, block 4+b x 2] and [block 8+b x 2, block 12+b x 2].
  const __m512i f0 = _mm512_add_epi32(_mm512_unpacklo_epi64(q0, q1), _mm512_unpackhi_epi64(q0, q1));
  const __m512i f1 = _mm512_add_epi32(_mm512_unpacklo_epi64(q2, q3), _mm512_unpackhi_epi64(q2, q3));
  // Pairwise sums: [b b 4+b 4+b], [8+b 8+b 12+b 12+b]; blended: [b, 8+b, 4+b, 12+b].
  const __m512i t0 = _mm512_add_epi32(f0, _mm512_shuffle_epi32(f0, _MM_PERM_CDAB));
  const __m512i t1 = _mm512_add_epi32(f1, _mm512_shuffle_epi32(f1, _MM_PERM_CDAB));
  const __m512i mixed = _mm512_mask_blend_epi32(0xAAAA, t0, t1);
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 13, 9, 5, 1, 14, 10, 6, 2, 12, 8, 4, 0);
  return _mm512_permutexvar_epi32(order, mixed);
}

// One group of up to 16 blocks (from block g; FULL: 16 of them) of R consecutive weight
// rows (row_bytes apart, starting at w) against MD activation rows a[0..MD), added to
// acc[md][r]: acc += m_w * fp32(d_x * sumq) (Q4_1), then acc += float(isum) * (d_w * d_x),
// lane i = block g + i. With MD = 2 each expanded quad serves both activation rows.
// PF: software prefetch pf bytes ahead. Scales come from load_scales, or when `scales` is
// given (the prefill path's last group), from scales[r][16] (d) and scales[ROWS + r][16] (m).
template <int64_t QT, int R, int MD, bool FULL, bool PF>
GGUF_INLINE void direct_group(const uint8_t* w, int64_t row_bytes, int64_t nb, int64_t g, int64_t pf,
                              const ActRow* a, __m512 (&acc)[MD][R], const float* scales = nullptr) {
  constexpr int64_t BS = block_bytes(QT);
  const int64_t cnt = FULL ? GROUP : nb - g;
  const int64_t nquads = FULL ? 4 : (cnt + 3) / 4;
  __m512i quad[MD][R][4];
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    if (!FULL && k >= nquads) {  // past the row's end
      for (int md = 0; md < MD; ++md)
        for (int r = 0; r < R; ++r) quad[md][r][k] = _mm512_setzero_si512();
      continue;
    }
    const int64_t b = g + 4 * k;
    if (PF) {
      // Prefetch pf bytes ahead in address order: the R rows of a tile are contiguous, so
      // R * 4 blocks of bytes per quad make one sequential stream (DRAM pages stay open;
      // per-row streams that hardware prefetchers would follow are short and interleaved).
      constexpr int64_t step = R * 4 * BS;
      const uint8_t* p = w + pf + (b / 4) * step;
      for (int64_t i = 0; i < step; i += 64) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
    }
    __m512i xlo[MD], xhi[MD], init[MD];
    for (int md = 0; md < MD; ++md) {
      xlo[md] = _mm512_load_si512(a[md].qq + b * QK);
      xhi[md] = _mm512_load_si512(a[md].qq + b * QK + 64);
      init[md] = QT == Q4_1 ? _mm512_setzero_si512() : _mm512_load_si512(a[md].noffq + b * 4);
    }
    for (int r = 0; r < R; ++r) {
      // Blocks past the row's end re-read its last block; their activation blocks are
      // zero padding (no correction either), so they add exactly 0.
      __m512i lo, hi;
      expand_quad<QT>(w + r * row_bytes + b * BS, FULL ? 3 : nb - 1 - b, lo, hi);
      for (int md = 0; md < MD; ++md) {
        quad[md][r][k] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(init[md], lo, xlo[md]), hi, xhi[md]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    __m512 dw, mw;
    if (scales) {
      dw = _mm512_load_ps(scales + r * GROUP);
      mw = _mm512_load_ps(scales + (ROWS + r) * GROUP);
    } else {
      load_scales<QT, FULL>(w + r * row_bytes + g * BS, cnt, dw, mw);
    }
    for (int md = 0; md < MD; ++md) {
      if (QT == Q4_1) acc[md][r] = _mm512_fmadd_ps(mw, _mm512_load_ps(a[md].xs + g), acc[md][r]);
      const __m512i isum = !FULL && nquads == 1
                               ? quad_sums_one(quad[md][r][0])
                               : quad_sums_to_blocks(quad[md][r][0], quad[md][r][1], quad[md][r][2], quad[md][r][3]);
      const __m512 s = _mm512_mul_ps(dw, _mm512_load_ps(a[md].d + g));
      acc[md][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, acc[md][r]);
    }
  }
}

// Dot products of R weight rows with MD activation rows: out[md][r].
template <int64_t QT, int R, int MD>
GGUF_INLINE void dot_rows_direct(const uint8_t* w, int64_t row_bytes, int64_t nb, int64_t pf, const ActRow* a,
                                 float (*out)[ROWS]) {
  __m512 acc[MD][R];
  for (int md = 0; md < MD; ++md)
    for (int r = 0; r < R; ++r) acc[md][r] = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + GROUP <= nb; g += GROUP) direct_group<QT, R, MD, true, true>(w, row_bytes, nb, g, pf, a, acc);
  if (g < nb) direct_group<QT, R, MD, false, true>(w, row_bytes, nb, g, pf, a, acc);
  for (int md = 0; md < MD; ++md) store_sums<R>(acc[md], out[md]);
}

template <int64_t QT, int R>
void dot_tile_direct_all(const uint8_t* w, int64_t row_bytes, int64_t nb, int64_t pf, const QuantActs& acts,
                         int64_t m_rows, float (*out)[ROWS]) {
  int64_t m = 0;
  for (; m + 2 <= m_rows; m += 2) {
    // Two activation rows share each expanded weight quad; 2 weight rows at a time keep the
    // quads' sums in registers.
    const ActRow a[2] = {acts.row(m), acts.row(m + 1)};
    float part[2][ROWS];
    for (int r0 = 0; r0 < R; r0 += 2) {
      if (R - r0 >= 2) {
        dot_rows_direct<QT, 2, 2>(w + r0 * row_bytes, row_bytes, nb, pf, a, part);
      } else {
        dot_rows_direct<QT, 1, 2>(w + r0 * row_bytes, row_bytes, nb, pf, a, part);
      }
      for (int md = 0; md < 2; ++md)
        for (int r = 0; r < std::min(2, R - r0); ++r) out[m + md][r0 + r] = part[md][r];
    }
  }
  if (m < m_rows) {
    const ActRow a[1] = {acts.row(m)};
    for (int r = 0; r < R; ++r) {
      float part[1][ROWS];
      dot_rows_direct<QT, 1, 1>(w + r * row_bytes, row_bytes, nb, pf, a, part);
      out[m][r] = part[0][0];
    }
  }
}

// ---- Prefill path (M >= TRANSPOSED_MIN_M): unpacked, transposed weight tiles ----
//
// A tile row is unpacked once into vpdpbusd-ready bytes laid out like the activations' qT:
// per group of 16 blocks, 8 zmm, zmm c holding the 4-byte column c of each of the 16
// blocks. Then 8 vpdpbusd (c = 0..7) leave each block's complete integer dot product in its
// own int32 lane, and one conversion and one FMA with the 16 blocks' d_w * d_x finish the
// group: ~4x fewer instructions per block than the decode path, which pays off once the
// unpacking (expansion + a 24-vpermt2d transpose per group) is shared by 3 activation rows.

// vpermt2d index tables of the 16 x 8 -> 8 x 16 dword transpose in transpose_pairs.
struct TransposeIdx {
  alignas(64) int32_t l1[2][16];
  alignas(64) int32_t l2[2][16];
  alignas(64) int32_t l3[2][16];
  constexpr TransposeIdx() : l1{}, l2{}, l3{} {
    for (int h = 0; h < 2; ++h) {
      for (int lane = 0; lane < 16; ++lane) {
        // Level 1: (P_2k, P_2k+1) = blocks 4k..4k+3 as [block][8 columns] -> columns
        // 4h..4h+3 as [column][block]: lane 4c + b <- element 8b + 4h + c.
        l1[h][lane] = (lane % 4) * 8 + 4 * h + lane / 4;
        // Level 2: (X, Y) = blocks 0..3 / 4..7 as [4 columns][4 blocks] -> columns
        // 2h, 2h + 1 as [column][8 blocks]: lane 8c + b <- X[4(2h + c) + b] or Y[...].
        const int c2 = 2 * h + lane / 8, b2 = lane % 8;
        l2[h][lane] = (b2 < 4 ? 0 : 16) + 4 * c2 + b2 % 4;
        // Level 3: (X, Y) = blocks 0..7 / 8..15 as [2 columns][8 blocks] -> column h as
        // [16 blocks]: lane b <- X[8h + b] or Y[8h + b - 8].
        l3[h][lane] = (lane < 8 ? 0 : 16) + 8 * h + lane % 8;
      }
    }
  }
};
constexpr TransposeIdx kTransposeIdx{};

// p[j] (j < 8) holds blocks 2j, 2j + 1 as 2 x 8 dwords; writes t[c] = dword c of the 16 blocks.
GGUF_INLINE void transpose_pairs(const __m512i* p, __m512i* t) {
  const TransposeIdx& ix = kTransposeIdx;
  const __m512i i1a = _mm512_load_si512(ix.l1[0]), i1b = _mm512_load_si512(ix.l1[1]);
  const __m512i i2a = _mm512_load_si512(ix.l2[0]), i2b = _mm512_load_si512(ix.l2[1]);
  const __m512i i3a = _mm512_load_si512(ix.l3[0]), i3b = _mm512_load_si512(ix.l3[1]);
  __m512i u[8];  // u[2k + h]: blocks 4k..4k+3, columns 4h..4h+3
  for (int k = 0; k < 4; ++k) {
    u[2 * k] = _mm512_permutex2var_epi32(p[2 * k], i1a, p[2 * k + 1]);
    u[2 * k + 1] = _mm512_permutex2var_epi32(p[2 * k], i1b, p[2 * k + 1]);
  }
  __m512i v[8];  // v[4 half + 2 h + q]: blocks 8 half.., columns 4 h + 2 q, +1
  for (int half = 0; half < 2; ++half) {
    for (int h = 0; h < 2; ++h) {
      const __m512i x = u[4 * half + h], y = u[4 * half + 2 + h];
      v[4 * half + 2 * h] = _mm512_permutex2var_epi32(x, i2a, y);
      v[4 * half + 2 * h + 1] = _mm512_permutex2var_epi32(x, i2b, y);
    }
  }
  for (int cp = 0; cp < 4; ++cp) {  // column pair 2 cp, 2 cp + 1
    t[2 * cp] = _mm512_permutex2var_epi32(v[cp], i3a, v[4 + cp]);
    t[2 * cp + 1] = _mm512_permutex2var_epi32(v[cp], i3b, v[4 + cp]);
  }
}

// Unpacks the full groups of `rows` GGUF rows (row_bytes apart) into wt [rows][ngroups][8]
// zmm and fp32 scales dw, mw [rows][ngroups * 16]; the scales of a last partial group go to
// tail [2][ROWS][16] (d, m). Prefetches the next tile (the rows after these) meanwhile.
template <int64_t QT>
void unpack_tile(const uint8_t* w, int64_t row_bytes, int rows, int64_t nb, __m512i* wt, float* dw, float* mw,
                 float* tail) {
  constexpr int64_t BS = block_bytes(QT);
  const int64_t ngroups = nb / GROUP;
  for (int r = 0; r < rows; ++r) {
    const uint8_t* row = w + r * row_bytes;
    const uint8_t* next = row + ROWS * row_bytes;
    for (int64_t i = 0; i < row_bytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(next + i), _MM_HINT_T0);
    if (ngroups * GROUP < nb) {
      __m512 d, m = _mm512_setzero_ps();
      load_scales<QT, false>(row + ngroups * GROUP * BS, nb - ngroups * GROUP, d, m);
      _mm512_store_ps(tail + r * GROUP, d);
      _mm512_store_ps(tail + (ROWS + r) * GROUP, m);
    }
    for (int64_t g = 0; g < ngroups; ++g) {
      const uint8_t* blk = row + g * GROUP * BS;
      __m512i p[8];
      for (int j = 0; j < 8; ++j) p[j] = expand_pair<QT>(blk + 2 * j * BS, blk + (2 * j + 1) * BS);
      transpose_pairs(p, wt + (r * ngroups + g) * 8);
      __m512 d, m;
      load_scales<QT, true>(blk, GROUP, d, m);
      _mm512_store_ps(dw + (r * ngroups + g) * GROUP, d);
      if (QT == Q4_1) _mm512_store_ps(mw + (r * ngroups + g) * GROUP, m);
    }
  }
}

// Dot products of a tile of R rows with activation rows a[0..M_): out[mb][r]. The full
// groups come from the unpacked tile (wt, dw, mw); a last partial group is done like the
// M = 1 path, from the GGUF bytes (w, row_bytes; in cache after the unpacking).
template <int64_t QT, int R, int M_>
GGUF_INLINE void dot_tile_unpacked(const __m512i* wt, const float* dw, const float* mw, const float* tail,
                                   const uint8_t* w, int64_t row_bytes, int64_t nb, const ActRow* a,
                                   float (*out)[ROWS]) {
  const int64_t ngroups = nb / GROUP;
  __m512 acc[M_][R];
  for (int mb = 0; mb < M_; ++mb)
    for (int r = 0; r < R; ++r) acc[mb][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t b0 = g * GROUP;
    __m512i isum[M_][R];
    for (int mb = 0; mb < M_; ++mb) {
      const __m512i init = _mm512_load_si512(a[mb].noffT + b0);
      for (int r = 0; r < R; ++r) isum[mb][r] = init;
    }
    for (int c = 0; c < 8; ++c) {
      __m512i q[M_];
      for (int mb = 0; mb < M_; ++mb) q[mb] = _mm512_load_si512(a[mb].qT + (b0 * 8 + c * GROUP) * 4);
      for (int r = 0; r < R; ++r) {
        const __m512i wv = _mm512_load_si512(wt + (r * ngroups + g) * 8 + c);
        for (int mb = 0; mb < M_; ++mb) isum[mb][r] = _mm512_dpbusd_epi32(isum[mb][r], wv, q[mb]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t sc = (r * ngroups + g) * GROUP;
      const __m512 d = _mm512_load_ps(dw + sc);
      for (int mb = 0; mb < M_; ++mb) {  // same order of operations as direct_group
        if (QT == Q4_1) {
          acc[mb][r] = _mm512_fmadd_ps(_mm512_load_ps(mw + sc), _mm512_load_ps(a[mb].xs + b0), acc[mb][r]);
        }
        const __m512 s = _mm512_mul_ps(d, _mm512_load_ps(a[mb].d + b0));
        acc[mb][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[mb][r]), s, acc[mb][r]);
      }
    }
  }
  if (ngroups * GROUP < nb) {
    direct_group<QT, R, M_, false, false>(w, row_bytes, nb, ngroups * GROUP, 0, a, acc, tail);
  }
  for (int mb = 0; mb < M_; ++mb) store_sums<R>(acc[mb], out[mb]);
}

template <int64_t QT, int R>
void dot_tile_unpacked_all(const __m512i* wt, const float* dw, const float* mw, const float* tail, const uint8_t* w,
                           int64_t row_bytes, const QuantActs& acts, int64_t m_rows, float (*out)[ROWS]) {
  int64_t m = 0;
  for (; m + MB <= m_rows; m += MB) {
    const ActRow a[MB] = {acts.row(m), acts.row(m + 1)};
    dot_tile_unpacked<QT, R, MB>(wt, dw, mw, tail, w, row_bytes, acts.nb, a, out + m);
  }
  for (; m < m_rows; ++m) {
    const ActRow a[1] = {acts.row(m)};
    dot_tile_unpacked<QT, R, 1>(wt, dw, mw, tail, w, row_bytes, acts.nb, a, out + m);
  }
}

template <int64_t QT, class ParallelFor>
void run_tiles(const uint8_t* w, const QuantActs& acts, int64_t m_rows, int64_t n, float* y, int64_t grain,
               const ParallelFor& parallel_for) {
  const int64_t nb = acts.nb;
  const int64_t row_bytes = nb * block_bytes(QT);
  const int64_t tile_bytes = ROWS * row_bytes;
  const int64_t tiles = (n + ROWS - 1) / ROWS;
  if (!acts.transposed) {
    const int64_t pf = (PREFETCH_BYTES + tile_bytes - 1) / tile_bytes * tile_bytes;
    parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
      float out[TRANSPOSED_MIN_M][ROWS];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * ROWS;
        const int rows = static_cast<int>(std::min<int64_t>(ROWS, n - r0));
        const uint8_t* wr = w + r0 * row_bytes;
        switch (rows) {
          case 4: dot_tile_direct_all<QT, 4>(wr, row_bytes, nb, pf, acts, m_rows, out); break;
          case 3: dot_tile_direct_all<QT, 3>(wr, row_bytes, nb, pf, acts, m_rows, out); break;
          case 2: dot_tile_direct_all<QT, 2>(wr, row_bytes, nb, pf, acts, m_rows, out); break;
          default: dot_tile_direct_all<QT, 1>(wr, row_bytes, nb, pf, acts, m_rows, out); break;
        }
        for (int64_t m = 0; m < m_rows; ++m) store_tile_row(out[m], rows, y + m * n + r0);
      }
    });
    return;
  }
  const int64_t ngroups = nb / GROUP;
  parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    static thread_local Scratch tile_scratch, out_scratch;
    const int64_t nfull = ngroups * GROUP;  // blocks in the unpacked tile, per row
    __m512i* wt = reinterpret_cast<__m512i*>(tile_scratch.get(ROWS * nfull * (QK + 8) + 2 * ROWS * GROUP * 4));
    float* dw = reinterpret_cast<float*>(wt + ROWS * nfull / 2);
    float* mw = dw + ROWS * nfull;
    float* tail = mw + ROWS * nfull;
    auto* out = reinterpret_cast<float(*)[ROWS]>(out_scratch.get(m_rows * ROWS * sizeof(float)));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * ROWS;
      const int rows = static_cast<int>(std::min<int64_t>(ROWS, n - r0));
      const uint8_t* wr = w + r0 * row_bytes;
      unpack_tile<QT>(wr, row_bytes, rows, nb, wt, dw, mw, tail);
      switch (rows) {
        case 4: dot_tile_unpacked_all<QT, 4>(wt, dw, mw, tail, wr, row_bytes, acts, m_rows, out); break;
        case 3: dot_tile_unpacked_all<QT, 3>(wt, dw, mw, tail, wr, row_bytes, acts, m_rows, out); break;
        case 2: dot_tile_unpacked_all<QT, 2>(wt, dw, mw, tail, wr, row_bytes, acts, m_rows, out); break;
        default: dot_tile_unpacked_all<QT, 1>(wt, dw, mw, tail, wr, row_bytes, acts, m_rows, out); break;
      }
      for (int64_t m = 0; m < m_rows; ++m) store_tile_row(out[m], rows, y + m * n + r0);
    }
  });
}

}  // namespace LLAMA2_ISA_NS
}  // namespace llama2
