// A Llama decoder stack run natively on the CPU, straight from GGUF Q4_0 / Q4_1 / Q8_0
// (and Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K) blocks: one call per forward instead of hundreds of
// framework ops.
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

namespace {

// Query rows up to which attention is the key loop below (llama2.model.SMALL_QUERY_MAX).
constexpr int64_t kSmallQueryMax = 16;
// Multiply-adds per parallel task for the element-wise and attention loops (a fork/join
// costs about a microsecond).
constexpr int64_t kTaskWork = 1 << 15;

// The row math (rms_norm, rotate_heads, dot, softmax_inplace, weighted_rows, swiglu,
// load_row / store_row) is core/vec_math.h's, in this library's variant: bitwise the same
// in every variant. bf16 caches are passed as llama2::bf16 (c10::BFloat16's bits).
using GGUF_NS::K::dot;
using GGUF_NS::K::load_row;
using GGUF_NS::K::rms_norm;
using GGUF_NS::K::rotate_heads;
using GGUF_NS::K::softmax_inplace;
using GGUF_NS::K::store_row;
using GGUF_NS::K::swiglu;
using GGUF_NS::K::weighted_rows;

// A cache's element type as the core kernels take it.
template <typename C>
struct CoreType {
  using type = C;
};
template <>
struct CoreType<c10::BFloat16> {
  using type = llama2::bf16;
};
template <typename C>
const typename CoreType<C>::type* core_ptr(const C* p) {
  return reinterpret_cast<const typename CoreType<C>::type*>(p);
}
template <typename C>
typename CoreType<C>::type* core_ptr(C* p) {
  return reinterpret_cast<typename CoreType<C>::type*>(p);
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
    TORCH_CHECK(llama2::matmul_type(qtype), "GGUFLlama: unsupported block type ", qtype);
    TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.device().is_cpu() && blocks.is_contiguous(),
                "GGUFLlama: blocks must be contiguous uint8 on the CPU");
    TORCH_CHECK(k > 0 && k % llama2::values_per_block(qtype) == 0 && n > 0 &&
                    blocks.numel() == n * llama2::row_bytes(qtype, k),
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
        const auto* k = core_ptr(k_cache + cache_row);
        const auto* v = core_ptr(v_cache + cache_row);
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
        load_row(core_ptr(scores_row), row.data(), visible);
        for (int64_t j = 0; j < visible; ++j) row[j] *= scale;
        softmax_inplace(row.data(), visible);
        store_row(row.data(), core_ptr(scores_row), visible);
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
