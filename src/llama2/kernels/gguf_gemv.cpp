// y = x @ W^T computed straight from GGUF-quantized weight blocks (Q4_0, Q4_1, Q8_0).
//
// The scheme is llama.cpp's: every activation row is quantized per block of 32 values to
// int8 with one fp32 scale (d_x = amax / 127, q = round-to-nearest-even(x / d_x)), the
// weight blocks are used as they are stored in the file, and each (weight block,
// activation block) pair contributes
//
//     fp32(d_w * d_x) * isum                                      Q4_0, Q8_0
//     fp32(d_w * d_x) * isum + m_w * fp32(d_x * sumq)             Q4_1
//
// where isum is the exact integer dot product of the block's stored weight values (Q4_0:
// nibble - 8, Q4_1: nibble, Q8_0: int8) with the activation's int8 values, and sumq the sum
// of those int8 values. Everything after isum is fp32: per block one product and one FMA
// into a per-block-lane accumulator, in the same order whatever the number of rows M, so a
// row of the result does not depend on the batch it was computed in.
//
// The integer dot products use AVX-512 VNNI (vpdpbusd: unsigned bytes x signed bytes, 4
// products added into each int32 lane). The weight side is the unsigned operand:
//   Q4_0: nibbles 0..15; the -8 is folded in as -8 * sumq.
//   Q4_1: nibbles 0..15, nothing to fold; the minimum is the float term above.
//   Q8_0: w ^ 0x80 = w + 128 in 0..255; the +128 is removed with -128 * sumq.
// The integer corrections are precomputed per activation block, split over the int32
// lanes that hold the block, and used as vpdpbusd's initial accumulator: they are free in
// the weight loop and isum stays exact.
//
// Without AVX-512 VNNI (+F16C, FMA) at compile time a scalar path with the same
// arithmetic (sequential sums) is built instead.
//
// Registered as the torch op llama2_kernels::gguf_matmul(Tensor x, Tensor raw, int qtype,
// int n, int k) -> Tensor (namespace overridable with -DGGUF_NS=... for test builds).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "gguf_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__F16C__) && defined(__FMA__)
#define GGUF_GEMV_AVX512 1
#include <immintrin.h>
#else
#define GGUF_GEMV_AVX512 0
#endif

// The hot helpers must be inlined into the row loops (GCC's heuristics otherwise keep
// some out of line, passing zmm values through memory).
#if defined(__GNUC__)
#define GGUF_INLINE inline __attribute__((always_inline))
#else
#define GGUF_INLINE inline
#endif

#if defined(__GNUC__)
#define GGUF_LAMBDA_INLINE __attribute__((always_inline))
#else
#define GGUF_LAMBDA_INLINE
#endif

namespace {

// ---------------------------------------------------------------------------------------
// Formats and tuning constants
// ---------------------------------------------------------------------------------------

constexpr int QK = 32;  // values per block, all three formats

// GGML type ids (gguf.GGMLQuantizationType).
enum QType : int64_t { Q4_0 = GGUF_NS::kQ4_0, Q4_1 = GGUF_NS::kQ4_1, Q8_0 = GGUF_NS::kQ8_0 };

constexpr int64_t block_bytes(int64_t qtype) { return GGUF_NS::gguf_block_bytes(qtype); }

// Integer correction per activation value sum: isum = dot(stored_u8, q) - offset * sumq.
constexpr int32_t weight_offset(int64_t qtype) { return qtype == Q4_0 ? 8 : qtype == Q8_0 ? 128 : 0; }

constexpr int GROUP = 16;  // blocks handled together: 16 fp32 scales fill one zmm
constexpr int ROWS = 4;    // weight rows per tile: each activation load serves 4 rows
// From this many activation rows, a tile of weight rows is first unpacked (vpdpbusd-ready
// bytes, transposed so that one int32 lane accumulates a whole block; fp32 scales) and
// the unpacked tile serves every activation row (the "prefill" path). Below, M = 1 and 2
// read the GGUF bytes directly (2 rows share each expanded weight quad).
constexpr int64_t TRANSPOSED_MIN_M = 3;
constexpr int MB = 2;  // activation rows per pass in the prefill path (register blocking)
static_assert(MB == 2, "dot_tile_unpacked_all passes MB = 2 rows explicitly");
// Software prefetch distance on the M = 1 path, rounded up to whole tiles.
constexpr int64_t PREFETCH_BYTES = 8 << 10;
// Minimum weight bytes per parallel task: the matmuls of a 135M model are 70 KB..1 MB and
// the thread pool's fork/join costs about a microsecond.
constexpr int64_t TASK_MIN_BYTES = 32 << 10;

inline float fp16_to_fp32(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
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
//   sumq  [nbp]      int32  sum of the block's values (scalar path)
//   qq    [nbp/4][2][64] int8  the decode path's layout: per quad of 4 blocks, values
//                           0..15 of the 4 blocks, then values 16..31 of the 4 blocks
//   noffq [nbp][4]   int32  -offset * (sum of values 4l..4l+3 and 16+4l..16+4l+3), l < 4:
//                           the decode path's initial vpdpbusd accumulator
//   qT    [nbp/16][8][16][4] int8  the prefill path's layout: per group of 16 blocks,
//                           for each 4-byte column c of a block, the 16 blocks' column c
//   noffT [nbp]      int32  -offset * sumq: the prefill path's initial accumulator
// (qT and noffT only when `transposed`.)
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
    v[j] = static_cast<float>(x[j]);
    amax = std::max(amax, std::fabs(v[j]));
  }
  const float d = amax / 127.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  for (int j = 0; j < QK; ++j) q[j] = static_cast<int8_t>(std::nearbyint(v[j] * id));  // ties to even
  for (int l = 0; l < 8; ++l) lane_sums[l] = q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3];
  return d;
}

#if GGUF_GEMV_AVX512
GGUF_INLINE __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
GGUF_INLINE __m512 load16(const c10::BFloat16* x) {  // bf16 -> fp32 is a 16-bit left shift
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
GGUF_INLINE __m512 load16(const c10::Half* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

// Same arithmetic as quantize_block_scalar (vcvtps2dq rounds to nearest even under the
// default MXCSR).
template <typename T>
GGUF_INLINE float quantize_block_avx512(const T* x, int8_t* q, int32_t* lane_sums) {
  const __m512 x0 = load16(x), x1 = load16(x + 16);
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
#endif

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
#if GGUF_GEMV_AVX512
    const float db = quantize_block_avx512(x + b * QK, q + b * QK, lanes);
#else
    const float db = quantize_block_scalar(x + b * QK, q + b * QK, lanes);
#endif
    int32_t s = 0;
    for (int l = 0; l < 8; ++l) s += lanes[l];
    for (int l = 0; l < 4; ++l) noffq[b * 4 + l] = -offset * (lanes[l] + lanes[l + 4]);
    d[b] = db;
    sumq[b] = s;
    xs[b] = db * static_cast<float>(s);
    int8_t* quad = qq + (b / 4) * 128 + (b % 4) * 16;
    std::memcpy(quad, q + b * QK, 16);
    std::memcpy(quad + 64, q + b * QK + 16, 16);
  }
  std::memset(q + nb * QK, 0, pad * QK);
  std::memset(d + nb, 0, pad * 4);
  std::memset(xs + nb, 0, pad * 4);
  std::memset(sumq + nb, 0, pad * 4);
  std::memset(noffq + nb * 4, 0, pad * 16);
  for (int64_t b = nb; b < a.nbp; ++b) {
    int8_t* quad = qq + (b / 4) * 128 + (b % 4) * 16;
    std::memset(quad, 0, 16);
    std::memset(quad + 64, 0, 16);
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

// ---------------------------------------------------------------------------------------
// Scalar path (the fallback without AVX-512 VNNI; same arithmetic, sequential fp32 sums).
// ---------------------------------------------------------------------------------------
template <int64_t QT>
float dot_row_scalar(const uint8_t* w, const ActRow& a, int64_t nb) {
  constexpr int64_t BS = block_bytes(QT);
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * BS;
    const int8_t* q = a.q + b * QK;
    int32_t isum = 0;
    if (QT == Q8_0) {
      const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 2);
      for (int j = 0; j < QK; ++j) isum += qs[j] * q[j];
    } else {
      const uint8_t* qs = blk + (QT == Q4_0 ? 2 : 4);
      for (int j = 0; j < 16; ++j) isum += (qs[j] & 0xF) * q[j] + (qs[j] >> 4) * q[j + 16];
      isum -= weight_offset(QT) * a.sumq[b];
    }
    const float s = fp16_to_fp32(blk) * a.d[b];
    acc = std::fma(s, static_cast<float>(isum), acc);
    if (QT == Q4_1) acc = std::fma(fp16_to_fp32(blk + 2), a.xs[b], acc);
  }
  return acc;
}

#if GGUF_GEMV_AVX512
// ---------------------------------------------------------------------------------------
// AVX-512 VNNI path. Output rows are processed in tiles of ROWS = 4 weight rows (the
// rows of a tile share every activation load); at::parallel_for splits the tiles.
//
// Both paths end a GROUP of 16 blocks with the 16 exact block sums in one vector (lane
// i = block i), then acc += float(isum) * fp32(d_w * d_x); the fp32 accumulators are
// summed horizontally once per row.
//
// Decode, M < TRANSPOSED_MIN_M (dot_rows_direct): straight from the GGUF bytes, 4 blocks
// at a time (expand_quad), block sums by shuffles and adds (quad_sums_to_blocks). Scales
// come from plain loads of the group's bytes (load_scales).
//
// Prefill, M >= TRANSPOSED_MIN_M (dot_tile_unpacked): a tile is unpacked once into a
// transposed layout in which each int32 lane accumulates one whole block, then used for
// all activation rows.
// ---------------------------------------------------------------------------------------

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
    dot_rows_direct<QT, R, 1>(w, row_bytes, nb, pf, a, out + m);
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
#endif  // GGUF_GEMV_AVX512

template <typename OutT>
inline void store_rows(OutT* y, const float* out, int rows) {
  for (int r = 0; r < rows; ++r) y[r] = static_cast<OutT>(out[r]);
}

template <int64_t QT, typename OutT>
void run_matmul(const uint8_t* w, const QuantActs& acts, int64_t m_rows, int64_t n, OutT* y) {
  const int64_t nb = acts.nb;
  const int64_t row_bytes = nb * block_bytes(QT);
  const int64_t tile_bytes = ROWS * row_bytes;
  const int64_t tiles = (n + ROWS - 1) / ROWS;
  const int64_t grain = std::max<int64_t>(1, TASK_MIN_BYTES / (tile_bytes * std::min<int64_t>(m_rows, 4)));

#if GGUF_GEMV_AVX512
  if (!acts.transposed) {
    const int64_t pf = (PREFETCH_BYTES + tile_bytes - 1) / tile_bytes * tile_bytes;
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
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
        for (int64_t m = 0; m < m_rows; ++m) store_rows(y + m * n + r0, out[m], rows);
      }
    });
    return;
  }
  const int64_t ngroups = nb / GROUP;
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
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
      for (int64_t m = 0; m < m_rows; ++m) store_rows(y + m * n + r0, out[m], rows);
    }
  });
#else
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * ROWS;
      const int rows = static_cast<int>(std::min<int64_t>(ROWS, n - r0));
      for (int64_t m = 0; m < m_rows; ++m) {
        float out[ROWS];
        for (int r = 0; r < rows; ++r) out[r] = dot_row_scalar<QT>(w + (r0 + r) * row_bytes, acts.row(m), nb);
        store_rows(y + m * n + r0, out, rows);
      }
    }
  });
#endif
}

// Quantizes the M x K activations into the calling thread's scratch buffer.
template <typename T>
QuantActs quantize_acts(const T* xp, int64_t m_rows, int64_t k, int32_t offset) {
  static thread_local Scratch act_scratch;
  const int64_t nb = k / QK;
  const int64_t nbp = (nb + GROUP - 1) / GROUP * GROUP;
#if GGUF_GEMV_AVX512
  const bool transposed = m_rows >= TRANSPOSED_MIN_M;
#else
  const bool transposed = false;
#endif
  QuantActs acts(nb, transposed, act_scratch.get(m_rows * QuantActs::bytes_per_row(nbp)));
  at::parallel_for(0, m_rows, std::max<int64_t>(1, 65536 / k), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_row(xp + m * k, acts, m, offset);
  });
  return acts;
}

QuantActs quantize_acts(const at::Tensor& x, int64_t m_rows, int64_t k, int32_t offset) {
  switch (x.scalar_type()) {
    case at::kFloat: return quantize_acts(x.data_ptr<float>(), m_rows, k, offset);
    case at::kBFloat16: return quantize_acts(x.data_ptr<c10::BFloat16>(), m_rows, k, offset);
    case at::kHalf: return quantize_acts(x.data_ptr<c10::Half>(), m_rows, k, offset);
    default: TORCH_CHECK(false, "gguf_matmul: x must be float32, bfloat16 or float16");
  }
}

template <typename OutT>
void dispatch_matmul(const uint8_t* wp, const QuantActs& acts, int64_t qtype, int64_t m_rows, int64_t n, OutT* yp) {
  switch (qtype) {
    case Q4_0: run_matmul<Q4_0>(wp, acts, m_rows, n, yp); break;
    case Q4_1: run_matmul<Q4_1>(wp, acts, m_rows, n, yp); break;
    default: run_matmul<Q8_0>(wp, acts, m_rows, n, yp); break;
  }
}

}  // namespace

namespace GGUF_NS {

void gguf_matmul_f32(const float* x, int64_t m, const uint8_t* w, int64_t qtype, int64_t n, int64_t k, float* y) {
  if (m == 0 || n == 0) return;
  const QuantActs acts = quantize_acts(x, m, k, weight_offset(qtype));
  dispatch_matmul(w, acts, qtype, m, n, y);
}

at::Tensor gguf_matmul(const at::Tensor& x_in, const at::Tensor& raw_in, int64_t qtype, int64_t n, int64_t k) {
  TORCH_CHECK(x_in.device().is_cpu() && raw_in.device().is_cpu(), "gguf_matmul: CPU tensors only");
  TORCH_CHECK(qtype == Q4_0 || qtype == Q4_1 || qtype == Q8_0, "gguf_matmul: unsupported qtype ", qtype,
              " (Q4_0 = 2, Q4_1 = 3, Q8_0 = 8)");
  TORCH_CHECK(k > 0 && k % QK == 0, "gguf_matmul: k must be a positive multiple of 32, got ", k);
  TORCH_CHECK(n >= 0, "gguf_matmul: n must be >= 0");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == k, "gguf_matmul: x's last dimension must be k = ", k);
  TORCH_CHECK(raw_in.scalar_type() == at::kByte, "gguf_matmul: raw must be uint8");
  const int64_t nb = k / QK;
  TORCH_CHECK(raw_in.numel() == n * nb * block_bytes(qtype), "gguf_matmul: raw has ", raw_in.numel(),
              " bytes, expected n * k / 32 * ", block_bytes(qtype), " = ", n * nb * block_bytes(qtype));
  const at::Tensor x = x_in.contiguous();
  const at::Tensor raw = raw_in.contiguous();

  at::DimVector out_shape(x.sizes());  // no heap allocation
  out_shape.back() = n;
  at::Tensor y = at::empty(out_shape, x.options());
  const int64_t m_rows = x.numel() / k;
  if (m_rows == 0 || n == 0) return y;

  const QuantActs acts = quantize_acts(x, m_rows, k, weight_offset(qtype));
  const uint8_t* wp = raw.data_ptr<uint8_t>();
  switch (x.scalar_type()) {
    case at::kFloat: dispatch_matmul(wp, acts, qtype, m_rows, n, y.data_ptr<float>()); break;
    case at::kBFloat16: dispatch_matmul(wp, acts, qtype, m_rows, n, y.data_ptr<c10::BFloat16>()); break;
    default: dispatch_matmul(wp, acts, qtype, m_rows, n, y.data_ptr<c10::Half>()); break;
  }
  return y;
}

}  // namespace GGUF_NS

namespace {

bool has_avx512_path() { return GGUF_GEMV_AVX512; }

// The activation quantization alone (for tests): x [M, K] -> (int8 q [M, K], fp32 d [M, K / 32]).
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) > 0 && x_in.size(1) % QK == 0,
              "gguf_quantize_rows: x must be [M, K] with K % 32 == 0");
  const at::Tensor x = x_in.contiguous();
  const int64_t m_rows = x.size(0), k = x.size(1), nb = k / QK;
  const QuantActs acts = quantize_acts(x, m_rows, k, 0);
  at::Tensor q = at::empty({m_rows, k}, at::kChar), d = at::empty({m_rows, nb}, at::kFloat);
  for (int64_t m = 0; m < m_rows; ++m) {
    std::memcpy(q.data_ptr<int8_t>() + m * k, acts.q(m), k);
    std::memcpy(d.data_ptr<float>() + m * nb, acts.d(m), nb * 4);
  }
  return {q, d};
}

}  // namespace

// TORCH_LIBRARY pastes its namespace argument, so GGUF_NS is expanded through one more macro.
#define GGUF_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define GGUF_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

GGUF_LIBRARY(GGUF_NS, m) {
  m.def("gguf_matmul(Tensor x, Tensor raw, int qtype, int n, int k) -> Tensor");
  m.def("gguf_has_avx512() -> bool", &has_avx512_path);
  m.def("gguf_quantize_rows(Tensor x) -> (Tensor, Tensor)", &quantize_rows);
}

GGUF_LIBRARY_IMPL(GGUF_NS, CPU, m) { m.impl("gguf_matmul", &GGUF_NS::gguf_matmul); }
