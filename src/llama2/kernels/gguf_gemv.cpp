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
// of those int8 values. Everything after isum is fp32 (FMA accumulation).
//
// The integer dot products use AVX-512 VNNI (vpdpbusd: unsigned bytes x signed bytes, 4
// products added into each int32 lane). The weight side is the unsigned operand:
//   Q4_0: nibbles 0..15; the -8 is folded in as -8 * sumq.
//   Q4_1: nibbles 0..15, nothing to fold; the minimum is the float term above.
//   Q8_0: w ^ 0x80 = w + 128 in 0..255; the +128 is removed with -128 * sumq.
// The integer corrections are precomputed per activation block, split over the 8 int32
// lanes that hold the block, and used as vpdpbusd's initial accumulator: they are free in
// the weight loop and isum stays exact.
//
// Without AVX-512 VNNI (+F16C, FMA) at compile time a scalar path with the same
// arithmetic is built instead.
//
// Registered as the torch op llama2_kernels::gguf_matmul(Tensor x, Tensor raw, int qtype,
// int n, int k) -> Tensor (namespace overridable with -DGGUF_NS=... for test builds).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

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

#ifndef GGUF_NS
#define GGUF_NS llama2_kernels
#endif

namespace {

// ---------------------------------------------------------------------------------------
// Formats and tuning constants
// ---------------------------------------------------------------------------------------

constexpr int QK = 32;  // values per block, all three formats

// GGML type ids (gguf.GGMLQuantizationType).
enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };

constexpr int64_t block_bytes(int64_t qtype) {
  return qtype == Q4_0 ? 18    // fp16 d, 16 bytes of nibbles
         : qtype == Q4_1 ? 20  // fp16 d, fp16 m, 16 bytes of nibbles
         : qtype == Q8_0 ? 34  // fp16 d, 32 int8
                         : 0;
}

// Integer correction per activation value sum: isum = dot(stored_u8, q) - offset * sumq.
constexpr int32_t weight_offset(int64_t qtype) { return qtype == Q4_0 ? 8 : qtype == Q8_0 ? 128 : 0; }

constexpr int GROUP = 16;  // blocks whose weight scales are converted at once (one zmm of floats)
#ifndef EXP_PF_MIN
#define EXP_PF_MIN 8192
#endif
#ifndef EXP_HINT
#define EXP_HINT _MM_HINT_T0
#endif
#ifndef EXP_ROWS
#define EXP_ROWS 4
#endif
constexpr int ROWS = EXP_ROWS;    // weight rows per tile: each activation load serves 4 rows
// From this many activation rows, a tile of weight rows is first unpacked into an aligned
// buffer (bytes ready for vpdpbusd, fp32 scales) and then used for every activation row.
constexpr int64_t UNPACK_MIN_M = 3;
// Minimum weight bytes per parallel task: the matmuls of a 135M model are 70 KB..1 MB and
// the thread pool's fork/join costs about a microsecond.
constexpr int64_t TASK_MIN_BYTES = 24 << 10;

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

inline int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

// ---------------------------------------------------------------------------------------
// Quantized activations.
//
// Blocks are padded to a multiple of GROUP per row with zero blocks (q = 0, d = 0, ...),
// which contribute exactly nothing. Per activation row:
//   q     [nbp][32] int8   quantized values
//   d     [nbp]     float  block scale d_x
//   xs    [nbp]     float  fp32(d_x * sumq), for Q4_1's minimum
//   sumq  [nbp]     int32  sum of the block's values (scalar path)
//   noff  [nbp][8]  int32  -offset * (sum of the 4 values of each int32 lane): the initial
//                          vpdpbusd accumulator
// ---------------------------------------------------------------------------------------
struct ActRow {
  const int8_t* q;
  const float* d;
  const float* xs;
  const int32_t* sumq;
  const int32_t* noff;
};

struct QuantActs {
  int64_t nb = 0, nbp = 0;  // blocks per row, padded
  int64_t row_bytes = 0;    // bytes per row in the buffer
  uint8_t* base = nullptr;

  static int64_t bytes_per_row(int64_t nbp) { return nbp * QK + 3 * align64(nbp * 4) + nbp * 32; }

  QuantActs(int64_t nb_, uint8_t* buffer) : nb(nb_), nbp((nb_ + GROUP - 1) / GROUP * GROUP), base(buffer) {
    row_bytes = bytes_per_row(nbp);
  }
  int8_t* q(int64_t m) const { return reinterpret_cast<int8_t*>(base + m * row_bytes); }
  float* d(int64_t m) const { return reinterpret_cast<float*>(base + m * row_bytes + nbp * QK); }
  float* xs(int64_t m) const { return d(m) + align64(nbp * 4) / 4; }
  int32_t* sumq(int64_t m) const { return reinterpret_cast<int32_t*>(xs(m) + align64(nbp * 4) / 4); }
  int32_t* noff(int64_t m) const { return sumq(m) + align64(nbp * 4) / 4; }
  ActRow row(int64_t m) const { return {q(m), d(m), xs(m), sumq(m), noff(m)}; }
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
  int32_t* noff = a.noff(m);
  for (int64_t b = 0; b < a.nb; ++b) {
    int32_t lanes[8];
#if GGUF_GEMV_AVX512
    const float db = quantize_block_avx512(x + b * QK, q + b * QK, lanes);
#else
    const float db = quantize_block_scalar(x + b * QK, q + b * QK, lanes);
#endif
    int32_t s = 0;
    for (int l = 0; l < 8; ++l) {
      s += lanes[l];
      noff[b * 8 + l] = -offset * lanes[l];
    }
    d[b] = db;
    sumq[b] = s;
    xs[b] = db * static_cast<float>(s);
  }
  const int64_t nb = a.nb, pad = a.nbp - a.nb;
  std::memset(q + nb * QK, 0, pad * QK);
  std::memset(d + nb, 0, pad * 4);
  std::memset(xs + nb, 0, pad * 4);
  std::memset(sumq + nb, 0, pad * 4);
  std::memset(noff + nb * 8, 0, pad * 32);
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
// AVX-512 VNNI path.
//
// A zmm holds two consecutive blocks, A in int32 lanes 0..7 and B in lanes 8..15, each as
// 32 bytes in the activation's order (byte j = value j). The vpdpbusd lanes are converted
// to float and multiplied lane by lane with their block's d_w * d_x (the 16 scales of a
// GROUP are spread over the lanes with one vpermps per pair), so the only horizontal sum
// is at the end of a row.
//
// Weight rows come from one of two sources with the same interface:
//   GgufRows:     the GGUF blocks themselves (M = 1, 2: every byte is used once or twice);
//                 scales are picked 16 blocks at a time out of the group's bytes
//                 (load_scales), nibbles expanded per pair.
//   UnpackedRows: a tile already expanded into vpdpbusd-ready bytes and fp32 scales
//                 (M >= UNPACK_MIN_M: the expansion is paid once per tile, not per row of x).
// ---------------------------------------------------------------------------------------

// Two blocks' weights (pa, pb) as 64 unsigned bytes in the activation layout.
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
#ifdef EXP_Q8_GATHER
  if (QT == Q8_0) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(static_cast<int>(block_bytes(QT))));
    const __mmask16 mask = FULL ? 0xFFFF : static_cast<__mmask16>((1u << cnt) - 1);
    const __m512i raw = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, idx, blk, 1);
    dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(raw));
    return;
  }
#endif
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

template <int64_t QT>
struct GgufRows {
  const uint8_t* w;   // first row of the tile
  int64_t row_bytes;  // GGUF bytes per row
  int64_t nb;         // blocks per row
  int64_t pf;         // software prefetch distance in bytes (a whole number of tiles)

  template <bool FULL>
  GGUF_INLINE void scales(int r, int64_t g, __m512& dw, __m512& mw) const {
    load_scales<QT, FULL>(w + r * row_bytes + g * block_bytes(QT), nb - g, dw, mw);
  }
  // Blocks b and b + 1 of row r; when b + 1 is past the row's end (odd nb), block b is read
  // twice: the activation's padding block (q = 0) and the zero scale cancel it.
  template <bool TAIL>
  GGUF_INLINE __m512i pair(int r, int64_t b) const {
    const uint8_t* pa = w + r * row_bytes + b * block_bytes(QT);
    // Software prefetch of the same position a few tiles ahead: hardware prefetchers lose
    // track of ROWS short interleaved streams when the weight comes from DRAM.
#ifndef EXP_NOPF
    _mm_prefetch(reinterpret_cast<const char*>(pa + pf), EXP_HINT);
#endif
    return expand_pair<QT>(pa, (TAIL && b + 1 >= nb) ? pa : pa + block_bytes(QT));
  }
};

struct UnpackedRows {
  const uint8_t* w;  // [ROWS][nbp * 32] bytes ready for vpdpbusd (padding: 0)
  const float* dw;   // [ROWS][nbp] (padding: 0)
  const float* mw;   // [ROWS][nbp] (Q4_1)
  int64_t nbp;

  template <bool FULL>
  GGUF_INLINE void scales(int r, int64_t g, __m512& d, __m512& m) const {
    d = _mm512_load_ps(dw + r * nbp + g);
    m = _mm512_load_ps(mw + r * nbp + g);
  }
  template <bool TAIL>
  GGUF_INLINE __m512i pair(int r, int64_t b) const {
    return _mm512_load_si512(w + (r * nbp + b) * QK);
  }
};

// Expands `rows` GGUF rows into an UnpackedRows buffer laid out for nbp blocks.
template <int64_t QT>
void unpack_tile(const uint8_t* w, int64_t row_bytes, int rows, int64_t nb, int64_t nbp, uint8_t* wq, float* dw,
                 float* mw) {
  const GgufRows<QT> src{w, row_bytes, nb, ROWS * row_bytes};
  for (int r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < nb; b += 2) {
      _mm512_store_si512(wq + (r * nbp + b) * QK, src.template pair<true>(r, b));
    }
    for (int64_t g = 0; g < nbp; g += GROUP) {
      __m512 d = _mm512_setzero_ps(), m = _mm512_setzero_ps();
      if (g + GROUP <= nb) {
        load_scales<QT, true>(w + r * row_bytes + g * block_bytes(QT), GROUP, d, m);
      } else if (g < nb) {
        load_scales<QT, false>(w + r * row_bytes + g * block_bytes(QT), nb - g, d, m);
      }
      _mm512_store_ps(dw + r * nbp + g, d);
      _mm512_store_ps(mw + r * nbp + g, QT == Q4_1 ? m : _mm512_setzero_ps());
    }
    // Padding bytes (pairs from round_up(nb, 2)); a padding block within the last pair
    // was written by pair<true> with block b's bytes, which the zero scale cancels.
    const int64_t done = (nb + 1) / 2 * 2;
    std::memset(wq + (r * nbp + done) * QK, 0, (nbp - done) * QK);
  }
}

// vpermps index vectors: pair j of a group -> lanes [2j x 8, 2j + 1 x 8].
alignas(64) const int32_t kPairIdx[8][16] = {
#define GGUF_IDX(j) {2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, \
                     2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1}
    GGUF_IDX(0), GGUF_IDX(1), GGUF_IDX(2), GGUF_IDX(3), GGUF_IDX(4), GGUF_IDX(5), GGUF_IDX(6), GGUF_IDX(7)
#undef GGUF_IDX
};

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

// Dot products of R weight rows with one activation row: out[r] for r < R.
template <int64_t QT, int R, typename Src>
GGUF_INLINE void dot_rows(const Src& src, const ActRow& a, int64_t nb, float* out) {
  __m512 acc[R], macc[R];
  for (int r = 0; r < R; ++r) acc[r] = macc[r] = _mm512_setzero_ps();

  // One group of up to 16 blocks starting at block g; FULL: all 16 present.
  auto group = [&](int64_t g, auto full_tag) GGUF_LAMBDA_INLINE {
    constexpr bool FULL = decltype(full_tag)::value;
    const int64_t cnt = FULL ? GROUP : nb - g;
    const __m512 dx = _mm512_load_ps(a.d + g);
    __m512 s[R];
    for (int r = 0; r < R; ++r) {
      __m512 dw, mw;
      src.template scales<FULL>(r, g, dw, mw);
      s[r] = _mm512_mul_ps(dw, dx);
      if (QT == Q4_1) macc[r] = _mm512_fmadd_ps(mw, _mm512_load_ps(a.xs + g), macc[r]);
    }
    const int64_t npairs = FULL ? GROUP / 2 : (cnt + 1) / 2;
    for (int64_t j = 0; j < npairs; ++j) {
      const int64_t b = g + 2 * j;
      const __m512i qx = _mm512_load_si512(a.q + b * QK);
      const __m512i init = QT == Q4_1 ? _mm512_setzero_si512() : _mm512_load_si512(a.noff + b * 8);
      const __m512i idx = _mm512_load_si512(kPairIdx[j]);
      for (int r = 0; r < R; ++r) {
        const __m512i dot = _mm512_dpbusd_epi32(init, src.template pair<!FULL>(r, b), qx);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx, s[r]), acc[r]);
      }
    }
  };
  int64_t g = 0;
  for (; g + GROUP <= nb; g += GROUP) group(g, std::true_type{});
  if (g < nb) group(g, std::false_type{});

  __m512 v[4];
  for (int r = 0; r < 4; ++r) {
    v[r] = r >= R ? _mm512_setzero_ps() : QT == Q4_1 ? _mm512_add_ps(acc[r], macc[r]) : acc[r];
  }
  alignas(16) float sums[4];
  _mm_store_ps(sums, hsum4(v[0], v[1], v[2], v[3]));
  for (int r = 0; r < R; ++r) out[r] = sums[r];
}

template <int64_t QT, typename Src>
GGUF_INLINE void dot_tile(const Src& src, int rows, const ActRow& a, int64_t nb, float* out) {
  switch (rows) {
    case 4: dot_rows<QT, 4>(src, a, nb, out); break;
    case 3: dot_rows<QT, 3>(src, a, nb, out); break;
    case 2: dot_rows<QT, 2>(src, a, nb, out); break;
    default: dot_rows<QT, 1>(src, a, nb, out); break;
  }
}
#endif  // GGUF_GEMV_AVX512

template <typename OutT>
inline void store_tile(OutT* y, const float* out, int rows) {
  for (int r = 0; r < rows; ++r) y[r] = static_cast<OutT>(out[r]);
}

template <int64_t QT, typename OutT>
void run_matmul(const uint8_t* w, const QuantActs& acts, int64_t m_rows, int64_t n, OutT* y) {
  const int64_t nb = acts.nb;
  const int64_t row_bytes = nb * block_bytes(QT);
  const int64_t tiles = (n + ROWS - 1) / ROWS;
  const int64_t grain = std::max<int64_t>(1, TASK_MIN_BYTES / (row_bytes * ROWS * std::min<int64_t>(m_rows, 4)));

#if GGUF_GEMV_AVX512
  if (m_rows < UNPACK_MIN_M) {
    const int64_t tile_bytes = ROWS * row_bytes;
    const int64_t pf_tiles = (EXP_PF_MIN + tile_bytes - 1) / tile_bytes;
    const int64_t pf = pf_tiles * tile_bytes;
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
#ifdef EXP_PF_START
      // The loop's prefetches start pf bytes ahead: prefetch the chunk's first pf bytes now.
      const uint8_t* c0 = w + t0 * tile_bytes;
      const uint8_t* c1 = w + std::min(t1 * tile_bytes, std::min(t0 * tile_bytes + pf, n * row_bytes));
      for (const uint8_t* p = c0; p < c1; p += 64) _mm_prefetch(reinterpret_cast<const char*>(p), EXP_HINT);
#endif
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * ROWS;
        const int rows = static_cast<int>(std::min<int64_t>(ROWS, n - r0));
        const GgufRows<QT> src{w + r0 * row_bytes, row_bytes, nb, pf};
        for (int64_t m = 0; m < m_rows; ++m) {  // second row of x: the tile is in L1
          float out[ROWS];
          dot_tile<QT>(src, rows, acts.row(m), nb, out);
          store_tile(y + m * n + r0, out, rows);
        }
      }
    });
    return;
  }
  const int64_t nbp = acts.nbp;
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    static thread_local Scratch tile_scratch;
    uint8_t* buf = tile_scratch.get(ROWS * nbp * (QK + 8));
    float* dw = reinterpret_cast<float*>(buf + ROWS * nbp * QK);
    float* mw = dw + ROWS * nbp;
    const UnpackedRows src{buf, dw, mw, nbp};
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * ROWS;
      const int rows = static_cast<int>(std::min<int64_t>(ROWS, n - r0));
      unpack_tile<QT>(w + r0 * row_bytes, row_bytes, rows, nb, nbp, buf, dw, mw);
      for (int64_t m = 0; m < m_rows; ++m) {
        float out[ROWS];
        dot_tile<QT>(src, rows, acts.row(m), nbp, out);
        store_tile(y + m * n + r0, out, rows);
      }
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
        store_tile(y + m * n + r0, out, rows);
      }
    }
  });
#endif
}

// Quantizes the M x K activations into the calling thread's scratch buffer.
QuantActs quantize_acts(const at::Tensor& x, int64_t m_rows, int64_t k, int32_t offset) {
  static thread_local Scratch act_scratch;
  const int64_t nb = k / QK;
  const int64_t nbp = (nb + GROUP - 1) / GROUP * GROUP;
  QuantActs acts(nb, act_scratch.get(m_rows * QuantActs::bytes_per_row(nbp)));
  auto run = [&](auto* xp) {
    at::parallel_for(0, m_rows, std::max<int64_t>(1, 65536 / k), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) quantize_row(xp + m * k, acts, m, offset);
    });
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(x.data_ptr<float>()); break;
    case at::kBFloat16: run(x.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: run(x.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "gguf_matmul: x must be float32, bfloat16 or float16");
  }
  return acts;
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

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor y = at::empty(out_shape, x.options());
  const int64_t m_rows = x.numel() / k;
  if (m_rows == 0 || n == 0) return y;

  const QuantActs acts = quantize_acts(x, m_rows, k, weight_offset(qtype));
  const uint8_t* wp = raw.data_ptr<uint8_t>();
  auto dispatch = [&](auto* yp) {
    switch (qtype) {
      case Q4_0: run_matmul<Q4_0>(wp, acts, m_rows, n, yp); break;
      case Q4_1: run_matmul<Q4_1>(wp, acts, m_rows, n, yp); break;
      default: run_matmul<Q8_0>(wp, acts, m_rows, n, yp); break;
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat: dispatch(y.data_ptr<float>()); break;
    case at::kBFloat16: dispatch(y.data_ptr<c10::BFloat16>()); break;
    default: dispatch(y.data_ptr<c10::Half>()); break;
  }
  return y;
}

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

GGUF_LIBRARY_IMPL(GGUF_NS, CPU, m) { m.impl("gguf_matmul", &gguf_matmul); }
