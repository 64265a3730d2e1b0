"""Detokenization cost per token while streaming a long answer: constant, not growing with the answer.

Takes an answer of `--tokens` tokens: a greedy generation of the default model (or
`--model`, end tokens ignored), or with `--text FILE` that text in the model's tokens
(repeated as needed; for slow machines). Replays its ids through `TextStreamer` one push
per token, as `Llama.stream_tokens` and the server do, and prints the median time of a
push around token 100 and around the last token, next to what decoding the whole answer
so far costs at the same points (what a streamer that re-decodes everything pays per
token). Checks that the pieces join to the whole decode, that a stop string taken from
the answer's end cuts the streamed text exactly before it, and that a live
`Llama.stream_tokens` of `--live-tokens` tokens cuts at a stop string as the whole text does.

    python benchmarks/stream_detokenize.py [--model M] [--tokens 2000] [--text FILE] [--window 41]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

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
    parser.add_argument("--text", type=Path, help="take the answer from this text instead of generating it")
    parser.add_argument("--window", type=int, default=41, help="tokens per median")
    parser.add_argument("--live-tokens", type=int, default=48, help="tokens of the live stop-string check")
    args = parser.parse_args()

    llama = Llama.build(args.model, max_seq_len=args.tokens + 256)
    tokenizer = llama.tokenizer
    prompt = llama.chat_format.encode_dialog_prompt(PROMPT)
    ids = answer_ids(llama, prompt, args.tokens, args.text)

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
    options = dict(temperature=0, stop_ids=frozenset())
    live = llama.text_completion(["Once upon a time"], max_gen_len=args.live_tokens, **options)[0]["generation"]
    live_stop = live[len(live) // 2 : len(live) // 2 + 4]
    streamed = "".join(llama.stream_text("Once upon a time", max_gen_len=args.live_tokens, stop=[live_stop], **options))
    exact = cut == truncate_at_stop(text, [stop]) and streamed == truncate_at_stop(live, [live_stop])
    print(f"stop strings {stop!r} (replayed) and {live_stop!r} (live): streamed text cut exactly before them: {exact}")
    if not exact:
        raise SystemExit(1)


def answer_ids(llama: Llama, prompt: list[int], tokens: int, text: Path | None) -> list[int]:
    """A greedy answer of `tokens` tokens, or `text` in the model's tokens, repeated to that length."""
    if text is not None:
        once = llama.tokenizer.encode(text.read_text(encoding="utf-8"), bos=False, eos=False)
        ids = once * (tokens // len(once) + 1)
        print(f"answer: {text} in {len(once)} tokens, repeated to {tokens}")
        return ids[:tokens]
    start = time.perf_counter()
    (ids,), _ = llama.generate([prompt], tokens, temperature=0, stop_ids=frozenset())
    print(f"answer: {len(ids)} generated tokens in {time.perf_counter() - start:.1f} s")
    return ids


if __name__ == "__main__":
    main()
