"""Write a Llama-2-7B-shaped Q4_K_M GGUF (random weights, the real Llama 2 vocabulary) for benchmarks.

    python benchmarks/make_7b_q4_k_m.py --work /tmp/llama7b [--mix q5_k_m]

Each tensor is generated (normal * 0.02, a trained model's scale; norms 1), quantized in
llama.cpp's Q4_K_M mix by llama2's own quantizer (`weights.kquants`, the same bytes as
llama.cpp's) and written before the next is made, so the script holds about one tensor.
The tokenizer is Meta's tokenizer.model (32000 tokens) that ships with llama2. The file is
written under a temporary name and renamed when complete. Then compare engines with

    python benchmarks/peers.py --model WORK/llama-2-7b-shape.Q4_K_M.gguf --engines ours,llamacpp ...
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from llama2.config import model_args_from_preset
from llama2.tokenizer import Tokenizer, llama2_tokenizer_path
from llama2.weights.checkpoint import LazyStateDict, TensorSpec, expected_shapes
from llama2.weights.gguf_writer import write_gguf
from llama2.weights.quant_mix import MIXES


def random_weights(seed: int = 0) -> tuple:
    """(Llama 2 7B's ModelArgs, a LazyStateDict that makes each random tensor when it is read)."""
    args = model_args_from_preset("llama2-7b")
    specs = {name: TensorSpec(shape, torch.float32) for name, shape in expected_shapes(args).items()}
    seeds = {name: seed + i for i, name in enumerate(specs)}
    started = time.perf_counter()

    def generate(name: str) -> torch.Tensor:
        print(f"  {time.perf_counter() - started:6.0f} s  {name}", flush=True)
        shape = specs[name].shape
        if len(shape) == 1:
            return torch.ones(shape)
        generator = torch.Generator().manual_seed(seeds[name])
        return torch.randn(shape, generator=generator) * 0.02

    return args, LazyStateDict(specs, generate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/llama7b"), help="the folder to write into")
    parser.add_argument("--mix", choices=sorted(MIXES), default="q4_k_m")
    options = parser.parse_args()
    options.work.mkdir(parents=True, exist_ok=True)
    path = options.work / f"llama-2-7b-shape.{options.mix.upper()}.gguf"
    args, tensors = random_weights()
    start = time.perf_counter()
    write_gguf(
        args,
        tensors,
        path,
        tensor_type=options.mix,
        tokenizer=Tokenizer.from_file(llama2_tokenizer_path()),
        name="llama-2-7b-shape (random weights)",
    )
    print(f"{path}: {path.stat().st_size / 1024**3:.2f} GiB in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
