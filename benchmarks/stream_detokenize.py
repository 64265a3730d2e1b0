"""Detokenization cost per token while streaming a long answer: constant, not growing with the answer.

Generates a greedy answer of `--tokens` tokens (end tokens ignored) from the default model
(or `--model`), then replays its ids through `TextStreamer` one push per token, as
`Llama.stream_tokens` and the server do, and prints the median time of a push around
token 100 and around the last token, next to what decoding the whole answer so far would
cost at the same points (a streamer that re-decodes everything grows linearly a token).
Finally streams the answer again with a stop string taken from its end and checks that the
streamed text is the whole text cut exactly before it.

    python benchmarks/stream_detokenize.py [--model M] [--tokens 2000] [--window 41]
"""

from __future__ import annotations

import argparse
import statistics
import time

from llama2.generation import Llama, TextStreamer, truncate_at_stop
from llama2.weights.registry import DEFAULT_MODEL

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]


def push_times(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[float], str]:
    """Seconds of each `TextStreamer.push` over `ids`, and the streamed text."""
    streamer, pieces, times = TextStreamer(tokenizer, stop), [], []
    for token in ids:
        start = time.perf_counter()
        pieces.append(streamer.push(token))
        times.append(time.perf_counter() - start)
    return times, "".join(pieces) + streamer.flush()


def full_decode_times(tokenizer, ids: list[int], points: list[int]) -> dict[int, float]:
    """Seconds to decode ids[:n] whole, for each n in `points` (what a quadratic streamer pays per token)."""
    times = {}
    for n in points:
        start = time.perf_counter()
        tokenizer.decode(ids[:n])
        times[n] = time.perf_counter() - start
    return times


def median_around(times: list[float], index: int, window: int) -> float:
    lo = max(0, index - window // 2)
    return statistics.median(times[lo : lo + window])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--window", type=int, default=41, help="tokens per median")
    args = parser.parse_args()

    llama = Llama.build(args.model, max_seq_len=args.tokens + 256)
    prompt = llama.chat_format.encode_dialog_prompt(PROMPT)
    start = time.perf_counter()
    (ids,), _ = llama.generate([prompt], args.tokens, temperature=0, stop_ids=frozenset())
    print(f"generated {len(ids)} tokens in {time.perf_counter() - start:.1f} s ({args.model})")
    tokenizer = llama.tokenizer

    times, streamed = push_times(tokenizer, ids)
    assert streamed == tokenizer.decode(ids), "streamed text differs from the whole decode"
    early, late = 100, len(ids) - args.window // 2 - 1
    full = full_decode_times(tokenizer, ids, [early, late])
    print(f"{'at token':>9} {'push (us)':>10} {'whole decode (us)':>18}")
    for point in (early, late):
        print(f"{point:>9} {median_around(times, point, args.window) * 1e6:>10.1f} {full[point] * 1e6:>18.1f}")
    ratio = median_around(times, late, args.window) / median_around(times, early, args.window)
    print(f"push time at token {late} / at token {early}: {ratio:.2f}")

    text = tokenizer.decode(ids)
    stop = text[-40:-30]
    _, cut = push_times(tokenizer, ids, (stop,))
    streamed_live = "".join(llama.stream_tokens(prompt, args.tokens, temperature=0, stop=[stop], stop_ids=frozenset()))
    exact = cut == truncate_at_stop(text, [stop]) == streamed_live
    print(f"stop string {stop!r}: streamed text cut exactly before it: {exact}")
    if not exact:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
