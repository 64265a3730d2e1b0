// Torch glue shared by the three source files of one kernel library (namespace GGUF_NS:
// llama2_kernels for the variant in use, llama2_kernels_<variant> for a test build). The
// arithmetic is in core/ (torch-free), on the primitives of simd/; the variant is chosen by
// the -DLLAMA2_ISA_<NAME> macro of the build (core/isa.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "core/blocks.h"
#include "core/dequant.h"
#include "core/gemv.h"
#include "core/vec_math.h"

#ifndef GGUF_NS
#define GGUF_NS llama2_kernels
#endif

namespace GGUF_NS {

namespace K = ::llama2::LLAMA2_ISA_NS;  // this variant's kernels

// GGML type ids (gguf.GGMLQuantizationType) of the block formats the kernels compute on.
constexpr int64_t kQ4_0 = llama2::Q4_0, kQ4_1 = llama2::Q4_1, kQ8_0 = llama2::Q8_0;

// Bytes of one block of 32 values (0: a type the kernels do not take).
constexpr int64_t gguf_block_bytes(int64_t qtype) { return llama2::block_bytes(qtype); }

// The core kernels' parallel_for, on PyTorch's intra-op thread pool, scheduled
// dynamically: the range is cut into chunks of at least `grain` (3 per thread: long
// sequential runs of weights still; 8 measured slower than a static split) that the threads
// take in turn from a shared counter, so a thread slowed down (a vCPU stalled by its host, a
// slower core) holds the others back by at most a chunk instead of half the work: the
// default model's engine step 0.84-0.92x the time of the static split on 2 vCPUs. Which
// thread computes a chunk does not change its results.
struct AtParallel {
  static constexpr int64_t kChunksPerThread = 3;

  template <class Fn>
  void operator()(int64_t begin, int64_t end, int64_t grain, const Fn& fn) const {
    const int64_t range = end - begin, threads = at::in_parallel_region() ? 1 : at::get_num_threads();
    if (range <= 0) return;
    const int64_t wanted = threads * kChunksPerThread;
    const int64_t chunk = std::max<int64_t>({grain, 1, (range + wanted - 1) / wanted});
    if (threads <= 1 || range <= chunk) return fn(begin, end);
    const int64_t chunks = (range + chunk - 1) / chunk;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(threads, chunks), 1, [&](int64_t, int64_t) {
      for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
        fn(begin + c * chunk, std::min(end, begin + (c + 1) * chunk));
      }
    });
  }
};

// y[m, n] = x[m, k] W^T for W [n, k] given as GGUF blocks `w` (row-major, k / 32 blocks a
// row); x and y are contiguous float32. The arithmetic of the op gguf_matmul.
inline void gguf_matmul_f32(const float* x, int64_t m, const uint8_t* w, int64_t qtype, int64_t n, int64_t k,
                            float* y) {
  K::matmul(x, m, w, qtype, n, k, y, AtParallel{});
}

// W [n, k] as bfloat16 from its blocks (the op gguf_dequantize).
at::Tensor gguf_dequantize(const at::Tensor& raw, int64_t qtype, int64_t n, int64_t k);

}  // namespace GGUF_NS
