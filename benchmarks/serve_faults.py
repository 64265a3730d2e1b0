"""Load and fault test of `llama2 serve`: valid traffic mixed with bad input and rude clients.

Starts the server on 127.0.0.1 (a free port, API key on), warms it up with the same mix,
records its resident memory, then for `--seconds` runs `--workers` concurrent clients,
each picking a random action: valid chat / completion requests (streamed or not, greedy
or seeded sampling, logprobs, n), malformed and deeply nested JSON, fields of the wrong
type, absurd max_tokens, prompts longer than the context, oversize bodies, unknown
models, wrong or missing API keys, unknown paths, clients that disconnect mid-stream or
give up before a non-streamed answer. Afterwards it waits for the server to go idle and
records its memory again.

Prints the count of every (action, status) pair, the number of 5xx answers and client
errors, whether the server is alive and healthy, and memory before/after. Exits 1 on any
5xx, a dead server or memory more than 10% (and 64 MB) above the baseline.

    python benchmarks/serve_faults.py [--model M] [--seconds 180] [--workers 12]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import time
from pathlib import Path

import httpx

from llama2.serve.process import ServerProcess

KEY = "fault-test-key"
CONTEXT = 1024


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (psutil when installed, else /proc)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read the server's memory: install psutil")


def chat_body(rng: random.Random, **extra) -> dict:
    topic = rng.choice(["llamas", "rain", "prime numbers", "bread", "the sea", "🦙 émojis", "tea\u0000time"])
    body = {
        "model": "faults",
        "messages": [{"role": "user", "content": f"Tell me about {topic}."}],
        "max_tokens": rng.randint(1, 24),
    }
    if rng.random() < 0.5:
        body.update(temperature=0.8, seed=rng.randint(0, 1000), top_p=0.9)
    else:
        body.update(temperature=0)
    return {**body, **extra}


# Each action sends one request and returns its HTTP status (or a label for client-side ends).


async def valid_chat(c: httpx.AsyncClient, rng: random.Random) -> str:
    body = chat_body(rng, logprobs=rng.random() < 0.3)
    return str((await c.post("/v1/chat/completions", json=body)).status_code)


async def valid_stream(c: httpx.AsyncClient, rng: random.Random) -> str:
    async with c.stream("POST", "/v1/chat/completions", json=chat_body(rng, stream=True)) as r:
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        if r.status_code == 200 and lines[-1] != "data: [DONE]":
            return "200-unterminated"
        return str(r.status_code)


async def valid_completion(c: httpx.AsyncClient, rng: random.Random) -> str:
    body = {
        "model": "faults",
        "prompt": "Once upon a time",
        "max_tokens": rng.randint(1, 16),
        "n": rng.randint(1, 2),
        "logprobs": rng.choice([None, 0, 3]),
        "temperature": 0.7,
        "seed": rng.randint(0, 99),
    }
    return str((await c.post("/v1/completions", json=body)).status_code)


async def malformed_json(c: httpx.AsyncClient, rng: random.Random) -> str:
    raw = rng.choice([b'{"messages": [', b"not json", b"\xff\xfe\x00garbage", b'{"model": "faults",}', b"", b"null"])
    return str(
        (await c.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})).status_code
    )


async def deep_json(c: httpx.AsyncClient, rng: random.Random) -> str:
    raw = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return str(
        (await c.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})).status_code
    )


async def wrong_types(c: httpx.AsyncClient, rng: random.Random) -> str:
    field, value = rng.choice(
        [
            ("max_tokens", "12"),
            ("temperature", "hot"),
            ("messages", "hi"),
            ("stream", "yes"),
            ("n", 1.5),
            ("stop", 7),
            ("seed", "x"),
            ("logprobs", "many"),
            ("messages", [{"role": "user", "content": 5}]),
        ]
    )
    return str((await c.post("/v1/chat/completions", json=chat_body(rng, **{field: value}))).status_code)


async def absurd_max_tokens(c: httpx.AsyncClient, rng: random.Random) -> str:
    value = rng.choice([10**9, -1, 0, 10**30, 2**63])
    return str((await c.post("/v1/chat/completions", json=chat_body(rng, max_tokens=value))).status_code)


async def oversize_prompt(c: httpx.AsyncClient, rng: random.Random) -> str:
    body = {"model": "faults", "prompt": "word " * rng.randint(CONTEXT + 10, 4 * CONTEXT), "max_tokens": 4}
    return str((await c.post("/v1/completions", json=body)).status_code)


async def huge_body(c: httpx.AsyncClient, rng: random.Random) -> str:
    raw = b'{"prompt": "' + b"a" * (5 << 20) + b'"}'
    return str((await c.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})).status_code)


async def unknown_model(c: httpx.AsyncClient, rng: random.Random) -> str:
    return str((await c.post("/v1/chat/completions", json=chat_body(rng, model="gpt-5"))).status_code)


async def bad_key(c: httpx.AsyncClient, rng: random.Random) -> str:
    headers = rng.choice([{"Authorization": "Bearer wrong"}, {"Authorization": ""}, {"Authorization": "Basic abc"}])
    return str((await c.post("/v1/chat/completions", json=chat_body(rng), headers=headers)).status_code)


async def bad_path(c: httpx.AsyncClient, rng: random.Random) -> str:
    method, path = rng.choice(
        [
            ("GET", "/v1/completions"),
            ("POST", "/v1/nothing"),
            ("DELETE", "/v1/models"),
            ("GET", "/v1/models/gpt-5"),
            ("PUT", "/health"),
        ]
    )
    return str((await c.request(method, path)).status_code)


async def midstream_disconnect(c: httpx.AsyncClient, rng: random.Random) -> str:
    async with c.stream("POST", "/v1/chat/completions", json=chat_body(rng, stream=True, max_tokens=200)) as r:
        if r.status_code != 200:
            return str(r.status_code)
        count = 0
        async for _ in r.aiter_lines():
            count += 1
            if count >= rng.randint(1, 6):
                break
    return "left-mid-stream"


async def impatient_client(c: httpx.AsyncClient, rng: random.Random) -> str:
    try:
        r = await c.post("/v1/chat/completions", json=chat_body(rng, max_tokens=200), timeout=rng.uniform(0.05, 0.5))
        return str(r.status_code)
    except httpx.TimeoutException:
        return "gave-up"


ACTIONS = {
    valid_chat: 6,
    valid_stream: 6,
    valid_completion: 4,
    malformed_json: 2,
    deep_json: 1,
    wrong_types: 2,
    absurd_max_tokens: 2,
    oversize_prompt: 2,
    huge_body: 1,
    unknown_model: 1,
    bad_key: 2,
    bad_path: 1,
    midstream_disconnect: 4,
    impatient_client: 3,
}


async def worker(base_url: str, seed: int, deadline: float, counts: collections.Counter, errors: list) -> None:
    rng = random.Random(seed)
    actions, weights = list(ACTIONS), list(ACTIONS.values())
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=300) as client:
        while time.monotonic() < deadline:
            action = rng.choices(actions, weights)[0]
            try:
                outcome = await action(client, rng)
            except httpx.HTTPError as err:  # the server dropped a connection it should have answered
                outcome = f"client-error {type(err).__name__}"
                errors.append(f"{action.__name__}: {err!r}")
            counts[(action.__name__, outcome)] += 1


async def run_mix(base_url: str, seconds: float, workers: int, seed: int) -> tuple[collections.Counter, list]:
    counts: collections.Counter = collections.Counter()
    errors: list = []
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(worker(base_url, seed + i, deadline, counts, errors) for i in range(workers)))
    return counts, errors


def wait_idle(base_url: str, timeout: float = 120) -> None:
    """Until no sequence runs or waits (from /metrics)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(base_url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
        if values.get("llama2_running_sequences") == 0 and values.get("llama2_queue_depth") == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("the server did not go idle")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--warmup-seconds", type=float, default=30)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    serve_args = [
        "--model",
        args.model,
        "--api-key",
        KEY,
        "--served-model-name",
        "faults",
        "--max-batch-size",
        "8",
        "--max-queue",
        "8",
        "--max-seq-len",
        str(CONTEXT),
    ]
    with ServerProcess(*serve_args) as server:
        started = rss_bytes(server.pid)
        asyncio.run(run_mix(server.base_url, args.warmup_seconds, args.workers, args.seed + 1000))
        wait_idle(server.base_url)
        baseline = rss_bytes(server.pid)
        start = time.monotonic()
        counts, errors = asyncio.run(run_mix(server.base_url, args.seconds, args.workers, args.seed))
        elapsed = time.monotonic() - start
        wait_idle(server.base_url)
        after = rss_bytes(server.pid)
        alive = server.process.poll() is None
        healthy = httpx.get(server.base_url + "/health").status_code == 200
        log = server.log()
        exit_code = server.stop()

    total = sum(counts.values())
    server_errors = sum(n for (_, outcome), n in counts.items() if outcome.startswith("5"))
    print(f"{total} requests in {elapsed:.0f} s from {args.workers} clients (model {args.model})")
    for (action, outcome), n in sorted(counts.items()):
        print(f"  {action:<22} {outcome:<24} {n}")
    by_status = collections.Counter()
    for (_, outcome), n in counts.items():
        by_status[outcome[0] + "xx" if outcome[0].isdigit() else outcome] += n
    print("by outcome: " + ", ".join(f"{k} {v}" for k, v in sorted(by_status.items())))
    print(f"5xx answers: {server_errors}; client-side errors: {len(errors)}")
    for error in errors[:10]:
        print(f"  {error}")
    mib = 1 << 20
    print(
        f"server RSS: {started / mib:.0f} MiB after start, {baseline / mib:.0f} MiB after warm-up (baseline), "
        f"{after / mib:.0f} MiB after the run ({(after - baseline) / mib:+.0f} MiB)"
    )
    print(f"server alive: {alive}, healthy: {healthy}, exit status after SIGINT: {exit_code}")
    if "Traceback" in log:
        print("server log has a traceback:\n" + log[-3000:])
    grown = after > baseline * 1.10 and after - baseline > 64 * mib
    failed = server_errors or errors or not alive or not healthy or grown or "Traceback" in log
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
