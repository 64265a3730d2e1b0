"""Batch-1 decode of a Llama-2-7B-shaped random-weight model on a CUDA GPU, against the HBM bound.

Runs the engine's own generation loop (`Llama.generate`, greedy) for each variant:
bf16 eager, bf16 compiled (CUDA graphs), int8 and int4 compiled (a "-cublas" suffix keeps
one-row matrix products on cuBLAS instead of Inductor's Triton reductions, "-triton" runs
them on llama2's kernels, `llama2.kernels.cuda_matmul.use_for_decode`; mode "nographs" compiles
without CUDA graphs, for `--profile`'s per-kernel view). The bound is the GPU's
memory bandwidth over the bytes one token must read (weights, plus the KV cache it
attends over). Prints one JSON line per variant, and a table.

Usage: python benchmarks/gpu_decode.py [--preset llama2-7b] [--bandwidth-gbs 4800]
       [--variants bf16-eager,bf16-compiled,int8-compiled,int4-compiled] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from llama2.bench import measure_generation
from llama2.config import model_args_from_preset
from llama2.fuse import fuse_projections
from llama2.generation import Llama, compile_model
from llama2.kernels import cuda_matmul
from llama2.model import Transformer
from llama2.quant import quantize_model
from llama2.tokenizer import Tokenizer, llama2_tokenizer_path

BANDWIDTH_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


def random_model(preset: str, device: str) -> Transformer:
    """A bf16 model of the preset's shape on `device`, random weights, built in place."""
    with torch.device("meta"):
        model = Transformer(model_args_from_preset(preset))
    model = model.to_empty(device=device).to(torch.bfloat16).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.02, generator=generator)
    return model


def model_bytes(model: Transformer) -> int:
    """Bytes of weights (parameters and packed buffers) of a model without KV caches."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}  # tied tables once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run_variant(name: str, args, tokenizer: Tokenizer) -> dict:
    precision, mode, *matmuls = name.split("-")  # "-cublas": no Triton reductions; "-triton": llama2's kernels
    torch._dynamo.reset()  # a compiled graph would otherwise be reused by the next variant's model
    model = random_model(args.preset, args.device)
    if precision in ("int8", "int4"):
        model = quantize_model(model, precision)
    model = fuse_projections(model)  # as `Llama.build` loads a checkpoint
    if matmuls == ["triton"]:
        cuda_matmul.use_for_decode(model)
    weights = model_bytes(model)
    start = time.perf_counter()
    llama = Llama(model, tokenizer, None, args.prompt_len + args.gen_len, max_batch_size=1, compile=mode == "compiled")
    if mode in ("compiled", "nographs") and (matmuls == ["cublas"] or mode == "nographs"):
        llama.steps.decode_step = compile_model(
            model, matvec_as_reduction=matmuls != ["cublas"], cuda_graphs=mode == "compiled"
        )
    measure_generation(llama, args.prompt_len, args.gen_len)  # compiles and records every CUDA graph the runs use
    warmup_s = time.perf_counter() - start
    runs = [measure_generation(llama, args.prompt_len, args.gen_len, seed=i) for i in range(args.repeats)]
    if args.profile:
        print_kernel_profile(llama, args.prompt_len, PROFILED_STEPS)
    decode = sorted(r.decode_tokens_per_s for r in runs)[len(runs) // 2]
    prompt = sorted(r.prompt_tokens_per_s for r in runs)[len(runs) // 2]
    args_ = model.args
    kv_bytes = 2 * args_.n_layers * args_.n_kv_heads * args_.head_dim * 2 * (args.prompt_len + args.gen_len // 2)
    bound = args.bandwidth_gbs * 1e9 / (weights + kv_bytes)
    result = {
        "variant": name,
        "decode_tok_s": round(decode, 1),
        "prompt_tok_s": round(prompt, 1),
        "weights_gb": round(weights / 1e9, 3),
        "bound_tok_s": round(bound, 1),
        "fraction_of_bound": round(decode / bound, 3),
        "effective_gbs": round(decode * (weights + kv_bytes) / 1e9, 1),
        "warmup_s": round(warmup_s, 1),
        "runs": [round(r.decode_tokens_per_s, 1) for r in runs],
        "max_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if args.device == "cuda" else None,
    }
    del llama, model
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


PROFILED_STEPS = 32


def print_kernel_profile(llama: Llama, prompt_len: int, steps: int) -> None:
    """The GPU kernels of one generation (a `prompt_len` prompt, then `steps` decode steps), by device time.

    Kernels inside CUDA graph replays may not be listed: profile the "nographs" mode
    (the same compiled kernels, launched one by one) for a per-kernel view.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        measure_generation(llama, prompt_len, steps)  # waits for the device before it returns
    events = prof.key_averages()
    total_us = sum(e.self_device_time_total for e in events)
    print(f"profile: {total_us / 1e3:.1f} ms of kernels over a {prompt_len}-token prefill and {steps} steps")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]:
        if e.self_device_time_total:
            print(f"  {e.self_device_time_total / 1e3:9.2f} ms {e.count:7d} calls  {e.key[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--bandwidth-gbs", type=float, help="HBM bandwidth (default: from the GPU's name)")
    parser.add_argument("--variants", default="bf16-eager,bf16-compiled,int8-compiled,int4-compiled")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the results here as JSON")
    parser.add_argument("--matmul-configs", help="tile settings measured by gpu_gemv.py --tuned-out")
    parser.add_argument("--profile", action="store_true", help="also print each variant's GPU kernels by time")
    parser.add_argument("--device", default="cuda", help="cuda (or cpu with --bandwidth-gbs, to try the script)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    if args.bandwidth_gbs is None:
        args.bandwidth_gbs = next((bw for key, bw in BANDWIDTH_GBS.items() if key in device_name), None)
        if args.bandwidth_gbs is None:
            raise SystemExit(f"unknown GPU {device_name!r}: give --bandwidth-gbs")
    print(
        f"device {device_name}, torch {torch.__version__}, preset {args.preset}, bound at {args.bandwidth_gbs:.0f} GB/s"
    )
    if args.matmul_configs:
        with open(args.matmul_configs) as f:
            cuda_matmul.TUNED_CONFIGS.update({(kind, n, k): config for kind, n, k, config in json.load(f)})
    tokenizer = Tokenizer.from_file(llama2_tokenizer_path())
    results = []
    for name in args.variants.split(","):
        results.append(run_variant(name, args, tokenizer))
        print(json.dumps(results[-1]), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": device_name, "torch": torch.__version__, "results": results}, f, indent=1)
    print(f"{'variant':<16}{'decode tok/s':>14}{'bound':>8}{'of bound':>10}{'GB/s':>8}{'prompt tok/s':>14}")
    for r in results:
        print(
            f"{r['variant']:<16}{r['decode_tok_s']:>14.1f}{r['bound_tok_s']:>8.0f}{r['fraction_of_bound']:>10.2f}"
            f"{r['effective_gbs']:>8.0f}{r['prompt_tok_s']:>14.0f}"
        )


if __name__ == "__main__":
    main()
