"""Measure prompt and decode speed, time to first token, load time and peak memory."""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .quant import GGUFLinear, Int4Linear, Int8Linear
from .rss import TORCH_IMPORT_PEAK_RSS_MB, peak_rss_mb


@dataclass
class BenchResult:
    """One measured generation."""

    prompt_tokens: int
    generated_tokens: int
    prompt_tokens_per_s: float
    decode_tokens_per_s: float
    time_to_first_token_s: float
    wall_s: float
    cpu_s: float

    @property
    def cpu_over_wall(self) -> float:
        """CPU time over wall time: near 1.0 on two threads means a stalled vCPU."""
        return self.cpu_s / self.wall_s if self.wall_s else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "cpu_over_wall": self.cpu_over_wall}


def random_prompt(vocab_size: int, length: int, seed: int = 0) -> list[int]:
    """A reproducible prompt of ordinary token ids (the speed does not depend on content)."""
    rng = random.Random(seed)
    return [rng.randrange(3, vocab_size) for _ in range(length)]


def measure_generation(llama, prompt_len: int, gen_len: int, seed: int = 0) -> BenchResult:
    """Greedy-generate `gen_len` tokens after a random `prompt_len`-token prompt, ignoring end tokens."""
    prompt = random_prompt(llama.model.args.vocab_size, prompt_len, seed)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    llama.generate([prompt], max_gen_len=gen_len, temperature=0, stop_ids=frozenset())
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    stats = llama.last_stats
    return BenchResult(
        prompt_tokens=prompt_len,
        generated_tokens=stats.generated_tokens,
        prompt_tokens_per_s=prompt_len / stats.prefill_s if stats.prefill_s else 0.0,
        decode_tokens_per_s=stats.decode_tokens_per_s,
        time_to_first_token_s=stats.prefill_s,
        wall_s=wall,
        cpu_s=cpu,
    )


def run_bench(build_llama, prompt_len: int, gen_len: int, repeats: int = 3) -> dict:
    """Load a model, warm it up (compiles when enabled), then measure `repeats` generations.

    Args:
        build_llama: a callable returning a ready `Llama` (timed as the load).

    Returns:
        backend (`backend_name`), load_s, warmup_s, the median run's figures (also as
        prompt_tps and decode_tps), every run, peak RSS in MB, and rss_above_torch_mb:
        the peak above the process's memory right after PyTorch's import (None where
        the platform does not report memory).
    """
    start = time.perf_counter()
    llama = build_llama()
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    measure_generation(llama, prompt_len, 4)  # the measured shapes: compiles both graphs
    warmup_s = time.perf_counter() - start
    runs = [measure_generation(llama, prompt_len, gen_len, seed=i) for i in range(repeats)]
    median = sorted(runs, key=lambda r: r.decode_tokens_per_s)[len(runs) // 2]
    peak = peak_rss_mb()
    return {
        "backend": backend_name(llama),
        "load_s": load_s,
        "warmup_s": warmup_s,
        **median.to_dict(),
        "prompt_tps": median.prompt_tokens_per_s,
        "decode_tps": median.decode_tokens_per_s,
        "runs": [r.to_dict() for r in runs],
        "peak_rss_mb": peak,
        "rss_above_torch_mb": peak - TORCH_IMPORT_PEAK_RSS_MB
        if peak is not None and TORCH_IMPORT_PEAK_RSS_MB
        else None,
        "torch_import_rss_mb": TORCH_IMPORT_PEAK_RSS_MB,
        "threads": torch.get_num_threads(),
    }


def backend_name(llama) -> str:
    """Which code computes a `Llama`'s steps.

    "native/<isa>" when llama2's C++ engine runs them (`native_isa`), else
    "modules/<kinds>": the kinds of the blocks' projections joined by "+" ("gguf" for a
    GGUF file's blocks on llama2's kernels, "int4" / "int8" for PyTorch's packed kernels,
    else the weights' dtype, e.g. "bf16"), with "+compiled" when torch.compile runs them.
    """
    if llama.steps.native is not None:
        return f"native/{native_isa()}"
    kinds = sorted({_layer_kind(layer) for block in llama.model.layers for layer in _projections(block)})
    compiled = "+compiled" if llama.steps.decode_step is not llama.model else ""
    return f"modules/{'+'.join(kinds)}{compiled}"


def native_isa() -> str:
    """The instruction set of llama2's native kernels (`llama2.kernels.selected_isa()` where it exists)."""
    from . import kernels

    selected_isa = getattr(kernels, "selected_isa", None)
    return selected_isa() if selected_isa is not None else "avx512_vnni"


LAYER_KINDS = {GGUFLinear: "gguf", Int4Linear: "int4", Int8Linear: "int8"}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _projections(block: nn.Module) -> list[nn.Module]:
    """A transformer block's linear projections (fused or not)."""
    return [layer for layer in block.modules() if type(layer) in LAYER_KINDS or isinstance(layer, nn.Linear)]


def _layer_kind(layer: nn.Module) -> str:
    if type(layer) in LAYER_KINDS:
        return LAYER_KINDS[type(layer)]
    return DTYPE_NAMES.get(layer.weight.dtype, str(layer.weight.dtype).removeprefix("torch."))
