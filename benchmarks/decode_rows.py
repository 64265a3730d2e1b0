"""Batched decode rows: the GGUF block matmul over M activation rows against one row.

A decode step of M sequences (the server's continuous batching) multiplies M rows by every
weight of the model. When the kernel reads each weight block once for all rows, M rows cost
little more than one (a decode step is bound by the weight stream). This runs the matmuls
of one decode step of the default model's shapes (SmolLM2-135M: 30 layers of fused q/k/v
960 x 576, output 576 x 576, gate/up 3072 x 576, down 576 x 1536 in Q4_1, and the tied
49152 x 576 Q8_0 head; random blocks, ~97 MB, so the weights come from memory as in a real
step) for M = 1, 2, 4, 8, 16 rows, per kernel variant this CPU runs, rounds interleaved,
and prints the median time per step and the ratio time(M) / time(1).

    python benchmarks/decode_rows.py [--variants scalar,avx2,avx512_vnni] [--rows 1,2,4,8,16]
        [--threads 2] [--rounds 5] [--layers 30] [--weights all|layers|head]

`--weights layers` times the Q4_1 layers only, `--weights head` the Q8_0 head only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from llama2.kernels import cpu_capabilities, supported_isas, variant_ops

Q4_1, Q8_0 = 3, 8
BLOCK_BYTES = {Q4_1: 20, Q8_0: 34}
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (n, k): qkv, wo, w13, w2
HEAD_SHAPE = (49152, 576)


def random_blocks(qtype: int, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """Random GGUF blocks [n * k / 32 * block bytes] with small finite fp16 scales (and minimums)."""
    size = BLOCK_BYTES[qtype]
    raw = rng.integers(0, 256, size=(n, k // 32, size), dtype=np.uint8)
    fields = 4 if qtype == Q4_1 else 2  # d (and m): fp16 at the block's start
    scales = (rng.standard_normal((n, k // 32, fields // 2), dtype=np.float32) * 0.01).astype(np.float16)
    raw[..., :fields] = scales.view(np.uint8)
    return torch.from_numpy(raw.reshape(-1))


def step_weights(layers: int, which: str = "all") -> list[tuple[torch.Tensor, int, int, int]]:
    """(blocks, qtype, n, k) of every matmul of one decode step (`which`: all, the layers or the head)."""
    rng = np.random.default_rng(0)
    weights = [(random_blocks(Q4_1, n, k, rng), Q4_1, n, k) for _ in range(layers) for n, k in LAYER_SHAPES]
    head = [(random_blocks(Q8_0, *HEAD_SHAPE, rng), Q8_0, *HEAD_SHAPE)]
    return {"all": weights + head, "layers": weights, "head": head}[which]


def time_step(ops, weights, inputs: dict[int, torch.Tensor], repeats: int) -> float:
    """Median seconds of one decode step's matmuls (all weights once) over `repeats` steps."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for blocks, qtype, n, k in weights:
            ops.gguf_matmul(inputs[k], blocks, qtype, n, k)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(supported_isas(cpu_capabilities())))
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="steps timed per round (median)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--weights", choices=("all", "layers", "head"), default="all")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    row_counts = [int(m) for m in args.rows.split(",")]
    weights = step_weights(args.layers, args.weights)
    ops = {isa: variant_ops(isa) for isa in variants}
    rng = torch.Generator().manual_seed(0)
    inputs = {m: {k: torch.randn(m, k, generator=rng) for k in {576, 1536}} for m in row_counts}
    times: dict[tuple[str, int], list[float]] = {(isa, m): [] for isa in variants for m in row_counts}
    for isa in variants:  # warm-up
        time_step(ops[isa], weights, inputs[row_counts[0]], 1)
    for _ in range(args.rounds):
        for isa in variants:
            for m in row_counts:
                times[isa, m].append(time_step(ops[isa], weights, inputs[m], args.repeats))

    mb = sum(blocks.numel() for blocks, *_ in weights) / 1e6
    print(
        f"decode-step matmuls: {len(weights)} weights, {mb:.0f} MB, {args.threads} threads, "
        f"median of {args.rounds} rounds x {args.repeats} steps"
    )
    print(f"{'variant':<12}" + "".join(f"{f'M={m} ms':>11}" for m in row_counts) + "  ratios time(M)/time(1)")
    for isa in variants:
        medians = [statistics.median(times[isa, m]) for m in row_counts]
        base = medians[0]
        ratios = " ".join(f"{t / base:.2f}" for t in medians)
        print(f"{isa:<12}" + "".join(f"{t * 1e3:>11.2f}" for t in medians) + f"  {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
