"""Continuous batching under concurrent streams: correctness and throughput of `llama2 serve`.

Starts the server on a model (default: the default model), then

1. sends each prompt alone, one after another (greedy, streamed): the single-request
   answers and the single-stream tokens/s;
2. runs N concurrent streaming clients (default 16), each sending `--rounds` requests
   back to back: every answer must equal its prompt's single-request answer; aggregate
   tokens/s = all completion tokens / wall time.

Prints both rates and their ratio (the issue's bar: >= 3x) and exits 1 on any mismatch.
The CPU may be shared: run on a quiet machine for stable figures.

    python benchmarks/serve_concurrency.py [--model M] [--clients 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import httpx

from llama2.serve.process import ServerProcess

TOPICS = [
    "llamas",
    "the moon",
    "bread",
    "rivers",
    "chess",
    "volcanoes",
    "owls",
    "tea",
    "bridges",
    "bees",
    "clouds",
    "trains",
    "maps",
    "glaciers",
    "violins",
    "deserts",
]
STYLES = [
    "Write two sentences about {}.",
    "Give me three facts about {}.",
    "Explain {} to a child.",
    "Why do people like {}?",
]


def dialogs(count: int) -> list[list[dict[str, str]]]:
    """`count` varied single-turn dialogs."""
    return [
        [{"role": "user", "content": STYLES[i % len(STYLES)].format(TOPICS[i % len(TOPICS)])}] for i in range(count)
    ]


async def stream_one(client: httpx.AsyncClient, dialog, max_tokens: int) -> tuple[str, int, float, float]:
    """(text, completion tokens, seconds to first token, total seconds) of one greedy streamed answer.

    A plain httpx client reading the server-sent events (the `openai` client's per-chunk
    parsing costs CPU the server shares on a small machine; tests/test_serve.py covers
    the `openai` client itself).
    """
    payload = {
        "model": "bench",
        "messages": dialog,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, pieces, tokens = None, [], 0
    async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    pieces.append(choice["delta"]["content"])
    end = time.perf_counter()
    return "".join(pieces), tokens, (first or end) - start, end - start


async def measure(base_url: str, prompts, max_tokens: int, rounds: int):
    """Each prompt alone, one after another; then one client per prompt, all at once.

    Client c sends `rounds` requests back to back (prompts c, c+1, ... in turn), so the
    batch stays full instead of draining after one answer each.

    Returns:
        (single results per prompt, concurrent results as (prompt index, result), wall seconds).
    """
    limits = httpx.Limits(max_connections=len(prompts) + 1)
    async with httpx.AsyncClient(base_url=base_url, timeout=1200, limits=limits) as client:
        await stream_one(client, prompts[0], 4)  # warm-up
        single = [await stream_one(client, d, max_tokens) for d in prompts]

        async def one_client(c: int):
            order = [(c + k) % len(prompts) for k in range(rounds)]
            return [(i, await stream_one(client, prompts[i], max_tokens)) for i in order]

        start = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(c) for c in range(len(prompts))))
        return single, [r for results in per_client for r in results], time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="requests per concurrent client")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `llama2 serve` option (repeatable)")
    args = parser.parse_args()

    prompts = dialogs(args.clients)
    serve_args = [
        "--model",
        args.model,
        "--max-batch-size",
        str(args.clients),
        "--max-seq-len",
        "1024",
        *args.server_arg,
    ]
    with ServerProcess(*serve_args, "--served-model-name", "bench") as server:
        single, together, wall = asyncio.run(measure(server.base_url, prompts, args.max_tokens, args.rounds))
    single_tokens = sum(r[1] for r in single)
    single_seconds = sum(r[3] for r in single)
    single_rate = single_tokens / single_seconds
    together_tokens = sum(r[1] for _, r in together)
    aggregate_rate = together_tokens / wall

    mismatches = [(i, r) for i, r in together if r[0] != single[i][0] or r[1] != single[i][1]]
    print(
        f"model {args.model}, {args.clients} prompts, greedy, max_tokens {args.max_tokens}, "
        f"{args.clients} clients x {args.rounds} requests"
    )
    print(
        f"single stream (one request at a time): {single_tokens} tokens in {single_seconds:.1f} s "
        f"= {single_rate:.1f} tok/s, "
        f"median time to first token {statistics.median(r[2] for r in single):.3f} s"
    )
    print(
        f"{args.clients} concurrent streams: {together_tokens} tokens in {wall:.1f} s = {aggregate_rate:.1f} tok/s, "
        f"median time to first token {statistics.median(r[2] for _, r in together):.3f} s"
    )
    print(f"answers equal to their single-request answer: {len(together) - len(mismatches)}/{len(together)}")
    print(f"ratio aggregate/single: {aggregate_rate / single_rate:.2f}x")
    for i, r in mismatches:
        print(f"MISMATCH prompt {i}: single {single[i][0]!r}\n    concurrent {r[0]!r}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
