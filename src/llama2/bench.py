"""Measure prompt and decode speed, time to first token, load time and peak memory."""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass

import torch


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MB (None where the platform does not say)."""
    try:
        import resource  # POSIX only
    except ImportError:
        try:
            import psutil

            info = psutil.Process().memory_info()
            return getattr(info, "peak_wset", info.rss) / 2**20  # Windows reports the peak working set
        except ImportError:
            return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KB on Linux


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
        load_s, warmup_s, the median run's figures, every run, and peak RSS in MB.
    """
    start = time.perf_counter()
    llama = build_llama()
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    measure_generation(llama, prompt_len, 4)  # the measured shapes: compiles both graphs
    warmup_s = time.perf_counter() - start
    runs = [measure_generation(llama, prompt_len, gen_len, seed=i) for i in range(repeats)]
    median = sorted(runs, key=lambda r: r.decode_tokens_per_s)[len(runs) // 2]
    return {
        "load_s": load_s,
        "warmup_s": warmup_s,
        **median.to_dict(),
        "runs": [r.to_dict() for r in runs],
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }
