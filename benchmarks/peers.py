"""Ours against llama.cpp and transformers on the same GGUF file, same threads, interleaved.

Each engine runs in its own process per round (so load time and peak RSS are its own),
rounds interleave the engines, and the medians over rounds are compared, as well as the
median of the per-round ratios (each ratio between runs of the same round, steadier when
the host's speed drifts). Runs whose CPU time over wall time is near 1.0 on two threads (a
stalled vCPU) are discarded.

    python benchmarks/peers.py [--model M] [--prompt-len 512] [--gen-len 128] [--threads 2]
        [--rounds 3] [--llamacpp-python /path/to/python-with-llama-cpp]
        [--ours-args "--no-native"] [--engines ours,llamacpp,transformers]

llama.cpp comes from `llama-cpp-python` and transformers from `transformers`; neither is
a test dependency. Give `--llamacpp-python` when llama-cpp-python lives in another
environment.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

METRICS = ("prompt_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s", "load_s", "peak_rss_mb")
WORKER_FLAG = "--worker"


# ------------------------------------------------------------------------------- workers


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def _prompt(vocab_size: int, length: int) -> list[int]:
    import random

    rng = random.Random(0)
    return [rng.randrange(3, vocab_size) for _ in range(length)]


def context_len(prompt_len: int, gen_len: int) -> int:
    """The context (KV cache) every engine gets: the measured tokens and a little slack."""
    return prompt_len + gen_len + 16


def worker_llamacpp(model: str, prompt_len: int, gen_len: int, threads: int) -> dict:
    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=model,
        n_ctx=context_len(prompt_len, gen_len),
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        verbose=False,
    )
    load_s = time.perf_counter() - start
    prompt = _prompt(llm.n_vocab(), prompt_len)
    llm.eval(prompt[:8])  # warm-up
    llm.reset()

    def generate():
        times = []
        begin = time.perf_counter()
        for _token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter() - begin)
            if len(times) == gen_len:
                break
        return times

    times, wall, cpu = _timed(generate)
    decode_s = times[-1] - times[0]
    return {
        "load_s": load_s,
        "time_to_first_token_s": times[0],
        "prompt_tokens_per_s": prompt_len / times[0],
        "decode_tokens_per_s": (len(times) - 1) / decode_s,
        "cpu_over_wall": cpu / wall,
        "peak_rss_mb": _peak_rss_mb(),
    }


def worker_transformers(model: str, prompt_len: int, gen_len: int, threads: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    start = time.perf_counter()
    path = Path(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16)
    load_s = time.perf_counter() - start
    prompt = torch.tensor([_prompt(hf.config.vocab_size, prompt_len)])
    with torch.inference_mode():
        hf(prompt[:, :8])  # warm-up

        def prefill():
            return hf(prompt, use_cache=True)

        out, prefill_s, _ = _timed(prefill)

        def decode():
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(gen_len - 1):
                step = hf(token, past_key_values=past, use_cache=True)
                past, token = step.past_key_values, step.logits[:, -1:].argmax(-1)

        _, decode_s, cpu = _timed(decode)
    return {
        "load_s": load_s,
        "time_to_first_token_s": prefill_s,
        "prompt_tokens_per_s": prompt_len / prefill_s,
        "decode_tokens_per_s": (gen_len - 1) / decode_s,
        "cpu_over_wall": cpu / decode_s,
        "peak_rss_mb": _peak_rss_mb(),
    }


def worker_ours(model: str, prompt_len: int, gen_len: int, threads: int, extra: list[str]) -> dict:
    import contextlib
    import io

    from llama2.cli import main

    buffer = io.StringIO()
    argv = [
        "bench",
        "--model",
        model,
        "--prompt-len",
        str(prompt_len),
        "--gen-len",
        str(gen_len),
        "--threads",
        str(threads),
        "--repeats",
        "1",
        "--json",
        "--max-seq-len",
        str(context_len(prompt_len, gen_len)),
        *extra,
    ]
    with contextlib.redirect_stdout(buffer):
        main(argv)
    return json.loads(buffer.getvalue())


# ------------------------------------------------------------------------------- driver


def run_worker(python: str, engine: str, args: argparse.Namespace) -> dict | None:
    command = [
        python,
        __file__,
        WORKER_FLAG,
        engine,
        "--model",
        args.model,
        "--prompt-len",
        str(args.prompt_len),
        "--gen-len",
        str(args.gen_len),
        "--threads",
        str(args.threads),
        "--ours-args",
        args.ours_args,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"  {engine}: failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def stalled(run: dict, threads: int) -> bool:
    """A run whose CPU/wall stayed near 1.0 although it had two threads or more."""
    return threads >= 2 and run.get("cpu_over_wall", threads) < 1.15


def print_paired_ratios(ours: dict[int, dict], peer: dict[int, dict], name: str) -> None:
    """The median over rounds of ours / peer measured in the same round (and their range): on a
    host whose speed drifts between rounds, a steadier estimate than the ratio of the medians."""
    rounds = sorted(set(ours) & set(peer))
    if not rounds:
        return
    parts = []
    for metric, label in (("prompt_tokens_per_s", "prompt"), ("decode_tokens_per_s", "decode")):
        ratios = [ours[r][metric] / peer[r][metric] for r in rounds]
        parts.append(f"{label} x{statistics.median(ratios):.2f} ({min(ratios):.2f}..{max(ratios):.2f})")
    print(f"ours/{name:<12} paired by round over {len(rounds)} rounds: " + "  ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: the default model's)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", default="ours,llamacpp,transformers")
    parser.add_argument("--llamacpp-python", default=sys.executable)
    parser.add_argument("--ours-args", default="", help="extra flags for `llama2 bench` (default: its defaults)")
    parser.add_argument(WORKER_FLAG, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.model is None:
        from llama2.weights import registry

        args.model = str(registry.resolve(registry.DEFAULT_MODEL))
    if args.worker:
        workers = {
            "ours": lambda: worker_ours(
                args.model, args.prompt_len, args.gen_len, args.threads, shlex.split(args.ours_args)
            ),
            "llamacpp": lambda: worker_llamacpp(args.model, args.prompt_len, args.gen_len, args.threads),
            "transformers": lambda: worker_transformers(args.model, args.prompt_len, args.gen_len, args.threads),
        }
        print(json.dumps(workers[args.worker]()))
        return

    engines = args.engines.split(",")
    pythons = {engine: args.llamacpp_python if engine == "llamacpp" else sys.executable for engine in engines}
    runs: dict[str, dict[int, dict]] = {engine: {} for engine in engines}  # per engine: round -> run
    for round_index in range(args.rounds):
        for engine in engines:  # interleaved
            run = run_worker(pythons[engine], engine, args)
            if run is None:
                continue
            flag = " (stalled: discarded)" if stalled(run, args.threads) else ""
            print(
                f"round {round_index + 1} {engine:<12} prompt {run['prompt_tokens_per_s']:8.1f} tok/s  "
                f"decode {run['decode_tokens_per_s']:7.1f} tok/s  rss {run['peak_rss_mb']:6.0f} MB  "
                f"cpu/wall {run['cpu_over_wall']:.2f}{flag}",
                flush=True,
            )
            if not flag:
                runs[engine][round_index] = run

    medians = {e: {m: statistics.median(r[m] for r in rs.values()) for m in METRICS} for e, rs in runs.items() if rs}
    print(
        f"\nmodel {args.model}\nprompt {args.prompt_len} tokens, decode {args.gen_len} tokens, {args.threads} threads, "
        f"medians over {args.rounds} interleaved rounds"
    )
    for engine, m in medians.items():
        print(
            f"{engine:<12} prompt {m['prompt_tokens_per_s']:8.1f} tok/s  decode {m['decode_tokens_per_s']:7.1f} tok/s  "
            f"ttft {m['time_to_first_token_s'] * 1000:6.0f} ms  "
            f"load {m['load_s']:5.2f} s  rss {m['peak_rss_mb']:6.0f} MB"
        )
    if "ours" in medians:
        for peer in (e for e in medians if e != "ours"):
            o, p = medians["ours"], medians[peer]
            print(
                f"ours/{peer:<12} prompt x{o['prompt_tokens_per_s'] / p['prompt_tokens_per_s']:.2f}  "
                f"decode x{o['decode_tokens_per_s'] / p['decode_tokens_per_s']:.2f}  "
                f"peak RSS x{o['peak_rss_mb'] / p['peak_rss_mb']:.2f}"
            )
            print_paired_ratios(runs["ours"], runs[peer], peer)


if __name__ == "__main__":
    main()
