// A Llama decoder stack run natively on the CPU, straight from GGUF Q4_0 / Q4_1 / Q8_0
// blocks: one call per forward instead of hundreds of framework ops.
//
// On a 135M-parameter model a decode step is ~600 small operations (30 layers of norms,
// projections, rotary, attention, SwiGLU, residuals); through PyTorch each costs a few
// microseconds of dispatch, more than the arithmetic. Here a forward of T tokens at
// positions pos .. pos + T - 1 runs every layer in one C++ call:
//
//   h = x
//   per layer:  xn = rmsnorm(h) * attention_norm
//               q, k, v = xn Wqkv^T           (gguf_matmul_f32, or bf16 GEMM for big T)
//               rotate q, k (Meta's adjacent-pair RoPE, the model's cos/sin tables)
//               k, v -> the layer's KV cache at the positions (the model's own buffers)
//               a = softmax(q k^T / sqrt(head_dim), causal) v   (grouped-query heads)
//               h = h + a Wo^T
//               xn = rmsnorm(h) * ffn_norm
//               h = h + (silu(xn W1^T) * xn W3^T) W2^T
//   out = rmsnorm(h) * norm   (all rows, or the last)
//
// Activations stay float32 throughout (llama.cpp's choice; the KV cache keeps the
// model's dtype). The projections are the kernels of gguf_gemv.cpp for few rows and, from
// `dense_min_rows` rows on weights of at most `dense_max_values` values, a bfloat16 GEMM
// on the blocks decoded by gguf_dequantize (the same split as llama2.quant.GGUFLinear).
// Attention for few query rows is a loop over the cached keys; longer chunks use two
// batched matmuls around a float32 softmax (llama2.model.matmul_attention's scheme).
// `forward_rows` runs one decode step of several sequences (each row its own cache slot
// and position) in one pass, on the batch-invariant kernels only, so every row comes out
// bitwise as `forward` gives it alone.
//
// Registered as the TorchScript class llama2_kernels.GGUFLlama (see llama2/native.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "gguf_kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define ENGINE_AVX512 1
#include <immintrin.h>
#else
#define ENGINE_AVX512 0
#endif

namespace {

// Query rows up to which attention is the key loop below (llama2.model.SMALL_QUERY_MAX).
constexpr int64_t kSmallQueryMax = 16;
// Multiply-adds per parallel task for the element-wise and attention loops (a fork/join
// costs about a microsecond).
constexpr int64_t kTaskWork = 1 << 15;

// ---------------------------------------------------------------------------------------
// Vector helpers on float32 rows (AVX-512 where built with it, plain loops otherwise).
// ---------------------------------------------------------------------------------------

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

#if ENGINE_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 -> fp32 is a 16-bit left shift
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// e^x: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two parts for an exact n ln2), e^r
// by its Taylor series to degree 6 (relative error ~1e-7), times 2^n by vscalefps.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

// sum_i a[i] * b[i]
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#if ENGINE_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(load16(a + i), load16(b + i), acc);
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) sum += a[i] * to_float(b[i]);
  return sum;
}

// y[i] += alpha * x[i]
template <typename T>
inline void axpy(float alpha, const T* x, float* y, int64_t n) {
  int64_t i = 0;
#if ENGINE_AVX512
  const __m512 va = _mm512_set1_ps(alpha);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, load16(x + i), load16(y + i)));
#endif
  for (; i < n; ++i) y[i] += alpha * to_float(x[i]);
}

// float32 copies of rows in the cache's dtype, and back (bf16 rounded to nearest even).
inline void load_row(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
inline void store_row(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
inline void load_row(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if ENGINE_AVX512
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
inline void store_row(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
#if ENGINE_AVX512
  for (; i + 16 <= n; i += 16) GGUF_NS::store_bf16x16(dst + i, _mm512_loadu_ps(src + i));
#endif
  for (; i < n; ++i) dst[i] = static_cast<c10::BFloat16>(src[i]);
}

#if ENGINE_AVX512
// o = sum_j p[j] * v[j], VECS * 16 values a row, the sums kept in registers.
template <int VECS, typename C>
inline void weighted_rows_avx512(const float* p, const C* v, int64_t keys, float* o) {
  __m512 acc[VECS];
  for (int i = 0; i < VECS; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < keys; ++j, v += VECS * 16) {
    const __m512 weight = _mm512_set1_ps(p[j]);
    for (int i = 0; i < VECS; ++i) acc[i] = _mm512_fmadd_ps(weight, load16(v + 16 * i), acc[i]);
  }
  for (int i = 0; i < VECS; ++i) _mm512_storeu_ps(o + 16 * i, acc[i]);
}
#endif

// o[0 .. n) = sum over j < keys of p[j] * v[j * n .. j * n + n)
template <typename C>
inline void weighted_rows(const float* p, const C* v, int64_t keys, int64_t n, float* o) {
#if ENGINE_AVX512
  switch (n) {
    case 64: return weighted_rows_avx512<4>(p, v, keys, o);
    case 128: return weighted_rows_avx512<8>(p, v, keys, o);
    default: break;
  }
#endif
  std::fill(o, o + n, 0.f);
  for (int64_t j = 0; j < keys; ++j) axpy(p[j], v + j * n, o, n);
}

// x[0 .. n) <- softmax(x[0 .. n))
inline void softmax_inplace(float* x, int64_t n) {
  float max = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) max = std::max(max, x[i]);
  int64_t i = 0;
  float sum = 0.f;
#if ENGINE_AVX512
  const __m512 vmax = _mm512_set1_ps(max);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), vmax));
    _mm512_storeu_ps(x + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  const float inv = 1.f / sum;
  for (int64_t j = 0; j < n; ++j) x[j] *= inv;
}

// out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + e^-gate[i]) * up[i]
inline void swiglu(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
#if ENGINE_AVX512
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(up + i)));
  }
#endif
  for (; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// out = x / sqrt(mean(x^2) + eps) * weight
inline void rms_norm(const float* x, const float* weight, int64_t n, float eps, float* out) {
  const float scale = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * weight[i];
}

// Adjacent channel pairs (2i, 2i + 1) of each head rotated by the angles cos[i], sin[i].
inline void rotate_heads(float* x, int64_t heads, int64_t head_dim, const float* cos, const float* sin) {
  for (int64_t h = 0; h < heads; ++h, x += head_dim) {
    for (int64_t i = 0; i < head_dim / 2; ++i) {
      const float even = x[2 * i], odd = x[2 * i + 1];
      x[2 * i] = even * cos[i] - odd * sin[i];
      x[2 * i + 1] = even * sin[i] + odd * cos[i];
    }
  }
}

// fn(row) for rows 0 .. rows-1, split across threads when the rows carry enough work.
template <typename Fn>
void for_rows(int64_t rows, int64_t work_per_row, const Fn& fn) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kTaskWork / std::max<int64_t>(1, work_per_row)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) fn(r);
                   });
}

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

struct BlockLinear {
  at::Tensor blocks;  // uint8 GGUF blocks of W [n, k]
  int64_t qtype, n, k;
};

// The projections of a layer, each a list of GGUF tensors whose outputs are concatenated
// (wq, wk, wv or one fused wqkv; w1, w3 or one fused w13).
enum Slot : int64_t { kQKV = 0, kOut = 1, kGateUp = 2, kDown = 3, kSlots = 4 };

// Where each row of a forward sits: its position and its KV-cache slot. One sequence
// (a prefill chunk or a decode step) has consecutive positions in one slot; a decode
// batch has one row per sequence, each computed exactly as it would be alone.
struct Rows {
  std::vector<int64_t> positions, slots;
  bool one_sequence;
};

struct Layer {
  at::Tensor attention_norm, ffn_norm;  // float32 [dim]
  at::Tensor k_cache, v_cache;          // [batch, n_kv_heads, max_seq_len, head_dim]
  std::vector<BlockLinear> projections[kSlots];
};

class GGUFLlama : public torch::CustomClassHolder {
 public:
  GGUFLlama(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t hidden_dim, double eps, at::Tensor rope_cos,
            at::Tensor rope_sin, at::Tensor norm, int64_t dense_min_rows, int64_t dense_max_values)
      : n_heads_(n_heads),
        n_kv_heads_(n_kv_heads),
        head_dim_(head_dim),
        hidden_dim_(hidden_dim),
        eps_(static_cast<float>(eps)),
        dense_min_rows_(dense_min_rows),
        dense_max_values_(dense_max_values) {
    TORCH_CHECK(n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0,
                "GGUFLlama: n_heads must be a positive multiple of n_kv_heads");
    TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0, "GGUFLlama: head_dim must be even");
    TORCH_CHECK(rope_cos.dim() == 2 && rope_cos.size(1) == head_dim / 2 && rope_sin.sizes() == rope_cos.sizes(),
                "GGUFLlama: rope tables must be [max_seq_len, head_dim / 2]");
    rope_cos_ = rope_cos.to(at::kFloat).contiguous();
    rope_sin_ = rope_sin.to(at::kFloat).contiguous();
    norm_ = norm.to(at::kFloat).contiguous();
    dim_ = norm_.numel();
  }

  void add_layer(at::Tensor attention_norm, at::Tensor ffn_norm, at::Tensor k_cache, at::Tensor v_cache) {
    TORCH_CHECK(attention_norm.numel() == dim_ && ffn_norm.numel() == dim_, "GGUFLlama: norm weights must have dim values");
    const int64_t max_seq_len = rope_cos_.size(0);
    for (const at::Tensor& cache : {k_cache, v_cache}) {
      TORCH_CHECK(cache.device().is_cpu() && cache.is_contiguous() && cache.dim() == 4 && cache.size(1) == n_kv_heads_ &&
                      cache.size(2) == max_seq_len && cache.size(3) == head_dim_,
                  "GGUFLlama: KV caches must be contiguous CPU [batch, n_kv_heads, max_seq_len, head_dim]");
      TORCH_CHECK(cache.scalar_type() == at::kFloat || cache.scalar_type() == at::kBFloat16,
                  "GGUFLlama: KV caches must be float32 or bfloat16");
    }
    layers_.push_back(Layer{attention_norm.to(at::kFloat).contiguous(), ffn_norm.to(at::kFloat).contiguous(), k_cache,
                            v_cache, {}});
    complete_ = false;
  }

  // Appends a GGUF tensor to projection `slot` of the last layer added.
  void add_linear(int64_t slot, at::Tensor blocks, int64_t qtype, int64_t n, int64_t k) {
    TORCH_CHECK(!layers_.empty(), "GGUFLlama: add_layer first");
    TORCH_CHECK(slot >= 0 && slot < kSlots, "GGUFLlama: slot must be 0..3");
    TORCH_CHECK(GGUF_NS::gguf_block_bytes(qtype) > 0, "GGUFLlama: unsupported block type ", qtype);
    TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.device().is_cpu() && blocks.is_contiguous(),
                "GGUFLlama: blocks must be contiguous uint8 on the CPU");
    TORCH_CHECK(k > 0 && k % 32 == 0 && n > 0 && blocks.numel() == n * (k / 32) * GGUF_NS::gguf_block_bytes(qtype),
                "GGUFLlama: blocks do not hold an [", n, ", ", k, "] weight of type ", qtype);
    const int64_t inputs[kSlots] = {dim_, n_heads_ * head_dim_, dim_, hidden_dim_};
    TORCH_CHECK(k == inputs[slot], "GGUFLlama: projection ", slot, " takes ", inputs[slot], " inputs, got ", k);
    layers_.back().projections[slot].push_back(BlockLinear{blocks, qtype, n, k});
    complete_ = false;
  }

  // hidden [T, dim] (the token embeddings) at positions pos .. pos + T - 1 -> the final
  // norm's output, [T, dim] or [1, dim] (last_only), float32. Writes row `slot` of the
  // KV caches and attends over it.
  at::Tensor forward(at::Tensor hidden, int64_t pos, bool last_only, int64_t slot) {
    const int64_t tokens = hidden.dim() == 2 ? hidden.size(0) : 0;
    Rows rows{std::vector<int64_t>(tokens), std::vector<int64_t>(tokens, slot), true};
    for (int64_t t = 0; t < tokens; ++t) rows.positions[t] = pos + t;
    return run(hidden, rows, last_only);
  }

  // One decode step of several sequences: row b of hidden [B, dim] is the token at
  // positions[b] of the sequence in cache slot slots[b]. Each row's result is bitwise
  // what `forward` gives for it alone (the block matmuls' rows do not depend on the batch).
  at::Tensor forward_rows(at::Tensor hidden, std::vector<int64_t> positions, std::vector<int64_t> slots) {
    TORCH_CHECK(hidden.dim() == 2 && static_cast<int64_t>(positions.size()) == hidden.size(0) &&
                    positions.size() == slots.size(),
                "GGUFLlama: forward_rows needs a position and a slot for each row of hidden");
    return run(hidden, Rows{std::move(positions), std::move(slots), false}, false);
  }

 private:
  at::Tensor run(const at::Tensor& hidden, const Rows& rows, bool last_only) {
    check_complete();
    TORCH_CHECK(hidden.dim() == 2 && hidden.size(1) == dim_ && hidden.size(0) > 0, "GGUFLlama: hidden must be [T, ",
                dim_, "]");
    const int64_t tokens = hidden.size(0), max_seq_len = rope_cos_.size(0), cache_rows = layers_.front().k_cache.size(0);
    for (int64_t t = 0; t < tokens; ++t) {
      TORCH_CHECK(rows.positions[t] >= 0 && rows.positions[t] < max_seq_len, "GGUFLlama: position ", rows.positions[t],
                  " exceeds the cache of ", max_seq_len);
      TORCH_CHECK(rows.slots[t] >= 0 && rows.slots[t] < cache_rows, "GGUFLlama: cache slot ", rows.slots[t],
                  " out of range (", cache_rows, " rows)");
    }
    const auto options = at::TensorOptions().dtype(at::kFloat);
    at::Tensor h = hidden.to(at::kFloat).contiguous().clone();
    at::Tensor normed = at::empty({tokens, dim_}, options);
    at::Tensor qkv = at::empty({tokens, qkv_width()}, options);
    at::Tensor attended = at::empty({tokens, n_heads_ * head_dim_}, options);
    at::Tensor gate_up = at::empty({tokens, 2 * hidden_dim_}, options);
    at::Tensor activated = at::empty({tokens, hidden_dim_}, options);
    at::Tensor update = at::empty({tokens, dim_}, options);
    const bool dense = rows.one_sequence;  // a decode batch keeps every row on the batch-invariant kernel
    for (const Layer& layer : layers_) {
      norm_rows(h, layer.attention_norm, normed);
      project(layer.projections[kQKV], normed, qkv, dense);
      rotate_and_cache(layer, qkv, rows);
      attend(layer, qkv, rows, attended);
      project(layer.projections[kOut], attended, update, dense);
      add_rows(h, update);
      norm_rows(h, layer.ffn_norm, normed);
      project(layer.projections[kGateUp], normed, gate_up, dense);
      const float* gu = gate_up.data_ptr<float>();
      float* act = activated.data_ptr<float>();
      for_rows(tokens, hidden_dim_, [&](int64_t t) {
        swiglu(gu + t * 2 * hidden_dim_, gu + t * 2 * hidden_dim_ + hidden_dim_, act + t * hidden_dim_, hidden_dim_);
      });
      project(layer.projections[kDown], activated, update, dense);
      add_rows(h, update);
    }
    at::Tensor kept = last_only ? h.narrow(0, tokens - 1, 1).contiguous() : h;
    at::Tensor out = at::empty_like(kept);
    norm_rows(kept, norm_, out);
    return out;
  }

  int64_t qkv_width() const { return (n_heads_ + 2 * n_kv_heads_) * head_dim_; }

  // Checks once, after the last layer or projection was added, that every layer is whole.
  void check_complete() {
    if (complete_) return;
    TORCH_CHECK(!layers_.empty(), "GGUFLlama: no layers");
    for (const Layer& layer : layers_) {
      const int64_t widths[kSlots] = {qkv_width(), dim_, 2 * hidden_dim_, dim_};
      for (int64_t slot = 0; slot < kSlots; ++slot) {
        int64_t width = 0;
        for (const BlockLinear& linear : layer.projections[slot]) width += linear.n;
        TORCH_CHECK(width == widths[slot], "GGUFLlama: projection ", slot, " has ", width, " outputs, expected ",
                    widths[slot]);
      }
    }
    complete_ = true;
  }

  // h += update, both [T, dim]
  void add_rows(at::Tensor& h, const at::Tensor& update) const {
    float* hp = h.data_ptr<float>();
    const float* up = update.data_ptr<float>();
    for_rows(h.size(0), dim_, [&](int64_t t) {
      for (int64_t i = 0; i < dim_; ++i) hp[t * dim_ + i] += up[t * dim_ + i];
    });
  }

  void norm_rows(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out) const {
    const float* xp = x.data_ptr<float>();
    const float* wp = weight.data_ptr<float>();
    float* op = out.data_ptr<float>();
    for_rows(x.size(0), dim_, [&](int64_t t) { rms_norm(xp + t * dim_, wp, dim_, eps_, op + t * dim_); });
  }

  // out [T, sum of n] = x [T, k] times each linear's W^T, side by side.
  void project(const std::vector<BlockLinear>& linears, const at::Tensor& x, at::Tensor& out, bool dense) const {
    const int64_t tokens = x.size(0), width = out.size(1);
    const float* xp = x.data_ptr<float>();
    float* column = out.data_ptr<float>();
    for (const BlockLinear& w : linears) {
      const uint8_t* blocks = w.blocks.data_ptr<uint8_t>();
      if (dense && tokens >= dense_min_rows_ && w.n * w.k <= dense_max_values_) {
        at::Tensor weight = GGUF_NS::gguf_dequantize(w.blocks, w.qtype, w.n, w.k);  // bf16 [n, k]
        at::from_blob(column, {tokens, w.n}, {width, 1}, x.options()).copy_(at::mm(x.to(at::kBFloat16), weight.t()));
      } else if (tokens == 1 || w.n == width) {  // the output rows are contiguous
        GGUF_NS::gguf_matmul_f32(xp, tokens, blocks, w.qtype, w.n, w.k, column);
      } else {
        at::Tensor part = at::empty({tokens, w.n}, x.options());
        GGUF_NS::gguf_matmul_f32(xp, tokens, blocks, w.qtype, w.n, w.k, part.data_ptr<float>());
        at::from_blob(column, {tokens, w.n}, {width, 1}, x.options()).copy_(part);
      }
      column += w.n;
    }
  }

  // Rotates q and k in place ([T, q | k | v] rows) and stores k, v in the layer's cache.
  void rotate_and_cache(const Layer& layer, at::Tensor& qkv, const Rows& rows) const {
    const int64_t tokens = qkv.size(0), width = qkv_width(), half = head_dim_ / 2;
    float* data = qkv.data_ptr<float>();
    const float* cos = rope_cos_.data_ptr<float>();
    const float* sin = rope_sin_.data_ptr<float>();
    for_rows(tokens, width, [&](int64_t t) {
      const int64_t pos = rows.positions[t];
      rotate_heads(data + t * width, n_heads_ + n_kv_heads_, head_dim_, cos + pos * half, sin + pos * half);
    });
    if (layer.k_cache.scalar_type() == at::kBFloat16) {
      store_kv<c10::BFloat16>(layer, data, tokens, rows);
    } else {
      store_kv<float>(layer, data, tokens, rows);
    }
  }

  // cache[slot, head, position, :] = row t's key (value) of that head, for both caches.
  template <typename C>
  void store_kv(const Layer& layer, const float* data, int64_t tokens, const Rows& rows) const {
    const int64_t width = qkv_width(), max_seq_len = layer.k_cache.size(2);
    const int64_t k_offset = n_heads_ * head_dim_, v_offset = k_offset + n_kv_heads_ * head_dim_;
    C* caches[2] = {layer.k_cache.data_ptr<C>(), layer.v_cache.data_ptr<C>()};
    const int64_t offsets[2] = {k_offset, v_offset};
    for_rows(tokens, 2 * n_kv_heads_ * head_dim_, [&](int64_t t) {
      const int64_t base = rows.slots[t] * n_kv_heads_ * max_seq_len;  // in cache rows of head_dim values
      for (int which = 0; which < 2; ++which) {
        for (int64_t head = 0; head < n_kv_heads_; ++head) {
          const float* src = data + t * width + offsets[which] + head * head_dim_;
          C* dst = caches[which] + (base + head * max_seq_len + rows.positions[t]) * head_dim_;
          for (int64_t i = 0; i < head_dim_; ++i) dst[i] = static_cast<C>(src[i]);
        }
      }
    });
  }

  void attend(const Layer& layer, const at::Tensor& qkv, const Rows& rows, at::Tensor& out) const {
    if (rows.one_sequence && qkv.size(0) > kSmallQueryMax) {
      return attend_matmul(layer, qkv, rows.positions[0], rows.slots[0], out);
    }
    if (layer.k_cache.scalar_type() == at::kBFloat16) {
      attend_loop<c10::BFloat16>(layer, qkv, rows, out);
    } else {
      attend_loop<float>(layer, qkv, rows, out);
    }
  }

  // Few query rows: per (row, head), scores over the row's visible keys (those of its own
  // slot up to its position), softmax, weighted values.
  template <typename C>
  void attend_loop(const Layer& layer, const at::Tensor& qkv, const Rows& rows, at::Tensor& out) const {
    const int64_t tokens = qkv.size(0), width = qkv_width(), group = n_heads_ / n_kv_heads_;
    const int64_t max_seq_len = layer.k_cache.size(2);
    const int64_t keys_max = *std::max_element(rows.positions.begin(), rows.positions.end()) + 1;
    const float scale = 1.f / std::sqrt(static_cast<float>(head_dim_));
    const float* q_rows = qkv.data_ptr<float>();
    const C* k_cache = layer.k_cache.data_ptr<C>();  // [slots, n_kv_heads, max_seq_len, head_dim]
    const C* v_cache = layer.v_cache.data_ptr<C>();
    float* out_rows = out.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, kTaskWork / (2 * keys_max * head_dim_));
    at::parallel_for(0, tokens * n_heads_, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(keys_max);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t t = task / n_heads_, head = task % n_heads_, keys = rows.positions[t] + 1;
        const int64_t cache_row = (rows.slots[t] * n_kv_heads_ + head / group) * max_seq_len * head_dim_;
        const float* q = q_rows + t * width + head * head_dim_;
        const C* k = k_cache + cache_row;
        const C* v = v_cache + cache_row;
        for (int64_t j = 0; j < keys; ++j) scores[j] = dot(q, k + j * head_dim_, head_dim_) * scale;
        softmax_inplace(scores.data(), keys);
        weighted_rows(scores.data(), v, keys, head_dim_, out_rows + t * n_heads_ * head_dim_ + head * head_dim_);
      }
    });
  }

  // Longer chunks: scores and weighted values as batched matmuls in the cache's dtype,
  // with the causal softmax in between done here (visible keys only).
  void attend_matmul(const Layer& layer, const at::Tensor& qkv, int64_t pos, int64_t slot, at::Tensor& out) const {
    const int64_t tokens = qkv.size(0), group = n_heads_ / n_kv_heads_, keys = pos + tokens;
    const auto dtype = layer.k_cache.scalar_type();
    at::Tensor q = at::empty({n_kv_heads_, group * tokens, head_dim_}, qkv.options().dtype(dtype));  // [KV, R*T, hd]
    q.view({n_heads_, tokens, head_dim_}).copy_(qkv.narrow(1, 0, n_heads_ * head_dim_).view({tokens, n_heads_, head_dim_}).transpose(0, 1));
    at::Tensor k = layer.k_cache[slot].narrow(1, 0, keys);  // [KV, S, hd]
    at::Tensor v = layer.v_cache[slot].narrow(1, 0, keys);
    at::Tensor scores = at::bmm(q, k.transpose(1, 2));  // [KV, R*T, S]: rows (head, query)
    if (dtype == at::kBFloat16) {
      causal_softmax<c10::BFloat16>(scores.data_ptr<c10::BFloat16>(), n_kv_heads_ * group, tokens, pos);
    } else {
      causal_softmax<float>(scores.data_ptr<float>(), n_kv_heads_ * group, tokens, pos);
    }
    at::Tensor attended = at::bmm(scores, v).view({n_heads_, tokens, head_dim_}).transpose(0, 1);  // [T, H, hd]
    out.view({tokens, n_heads_, head_dim_}).copy_(attended);
  }

  // Rows of raw scores q.k, [heads][T][pos + T], become attention weights in place: query
  // t sees keys 0 .. pos + t, weights softmax(scores / sqrt(head_dim)), 0 for later keys.
  template <typename C>
  void causal_softmax(C* scores, int64_t heads, int64_t tokens, int64_t pos) const {
    const int64_t keys = pos + tokens;
    const float scale = 1.f / std::sqrt(static_cast<float>(head_dim_));
    at::parallel_for(0, heads * tokens, std::max<int64_t>(1, kTaskWork / keys), [&](int64_t begin, int64_t end) {
      std::vector<float> row(keys);
      for (int64_t r = begin; r < end; ++r) {
        C* scores_row = scores + r * keys;
        const int64_t visible = pos + r % tokens + 1;
        load_row(scores_row, row.data(), visible);
        for (int64_t j = 0; j < visible; ++j) row[j] *= scale;
        softmax_inplace(row.data(), visible);
        store_row(row.data(), scores_row, visible);
        std::fill(scores_row + visible, scores_row + keys, C(0.f));
      }
    });
  }

  int64_t n_heads_, n_kv_heads_, head_dim_, hidden_dim_, dim_ = 0;
  float eps_;
  int64_t dense_min_rows_, dense_max_values_;
  at::Tensor rope_cos_, rope_sin_, norm_;
  std::vector<Layer> layers_;
  bool complete_ = false;  // check_complete passed since the last change
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(GGUF_NS, m) {
  m.class_<GGUFLlama>("GGUFLlama")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, double, at::Tensor, at::Tensor, at::Tensor, int64_t,
                       int64_t>())
      .def("add_layer", &GGUFLlama::add_layer)
      .def("add_linear", &GGUFLlama::add_linear)
      .def("forward", &GGUFLlama::forward)
      .def("forward_rows", &GGUFLlama::forward_rows);
}
