"""Commands that run a model: chat, generate, bench, perplexity, serve."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from ..errors import Llama2Error
from .options import (
    add_load_options,
    add_model_options,
    add_run_options,
    add_runtime_options,
    build_llama,
    sampling_options,
)


def add_run_parsers(commands) -> None:
    """Register chat, generate, bench, perplexity and serve on `commands` (argparse subparsers)."""
    chat = commands.add_parser("chat", help="chat with a model (interactive in a terminal)")
    add_run_options(chat)
    chat.add_argument("--system", "-s", help="system prompt")
    chat.add_argument("-p", "--prompt", help="one message: print the answer and exit")
    chat.set_defaults(handler=cmd_chat)

    generate = commands.add_parser("generate", help="complete a text prompt")
    add_run_options(generate)
    generate.add_argument("prompt", nargs="?", help="prompt text (default: standard input)")
    generate.set_defaults(handler=cmd_generate)

    bench = commands.add_parser("bench", help="measure prompt and decode speed, load time and peak memory")
    add_run_options(bench)
    bench.add_argument("--prompt-len", type=int, default=128)
    bench.add_argument("--gen-len", type=int, default=128)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    bench.set_defaults(handler=cmd_bench)

    perplexity = commands.add_parser("perplexity", help="perplexity of a model on a text file (compare quantizations)")
    add_load_options(perplexity)
    perplexity.add_argument("text_file", help="UTF-8 text to score")
    perplexity.add_argument("--window", type=int, default=512, help="tokens per independently scored window")
    perplexity.set_defaults(handler=cmd_perplexity)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching) with a chat page")
    add_model_options(serve)
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    serve.add_argument("--port", type=int, default=8000, help="TCP port (0 picks a free one; default: 8000)")
    serve.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1 and /metrics (default: $LLAMA2_API_KEY)"
    )
    serve.add_argument(
        "--max-batch-size", type=int, default=16, help="KV-cache slots: most requests generated together"
    )
    serve.add_argument("--max-seq-len", type=int, help="context of each slot (default: the model's, at most 2048)")
    serve.add_argument("--max-queue", type=int, default=64, help="most requests waiting for a slot before 429s")
    serve.add_argument("--served-model-name", help="the model name clients send (default: --model)")
    add_runtime_options(serve)
    serve.set_defaults(handler=cmd_serve)


def write_stream(pieces: Iterable[str], out=None) -> str:
    """Print text pieces as they come; return the whole text."""
    out = out or sys.stdout
    text = []
    for piece in pieces:
        out.write(piece)
        out.flush()
        text.append(piece)
    return "".join(text)


def print_stats(llama) -> None:
    s = llama.last_stats
    prefill_rate = s.prompt_tokens / s.prefill_s if s.prefill_s else 0.0
    print(
        f"[prompt {s.prompt_tokens} tokens, {prefill_rate:.1f} tok/s; "
        f"generated {s.generated_tokens} tokens, {s.decode_tokens_per_s:.1f} tok/s]",
        file=sys.stderr,
    )


def cmd_chat(args: argparse.Namespace) -> int:
    llama = build_llama(args)
    dialog = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None or not sys.stdin.isatty():
        message = args.prompt if args.prompt is not None else sys.stdin.read()
        if not message.strip():
            raise Llama2Error("empty message: give one with -p or on standard input")
        dialog.append({"role": "user", "content": message})
        write_stream(llama.stream_chat(dialog, **sampling_options(args)))
        sys.stdout.write("\n")
        if args.verbose:
            print_stats(llama)
        return 0
    return interactive_chat(llama, dialog, args)


def interactive_chat(llama, dialog: list, args: argparse.Namespace) -> int:
    print("Chatting with the model. Ctrl-D or /exit to quit, /reset to start over.", file=sys.stderr)
    system = dialog[:1]
    while True:
        try:
            message = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if message.strip() in ("/exit", "/quit"):
            return 0
        if message.strip() == "/reset":
            dialog = list(system)
            continue
        if not message.strip():
            continue
        dialog.append({"role": "user", "content": message})
        try:
            answer = write_stream(llama.stream_chat(dialog, **sampling_options(args)))
        except Llama2Error as err:
            print(f"error: {err}", file=sys.stderr)
            dialog = list(system)
            print("(conversation reset)", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            answer = ""
            print(" [interrupted]", file=sys.stderr)
        print()
        if args.verbose:
            print_stats(llama)
        dialog.append({"role": "assistant", "content": answer})


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    llama = build_llama(args)
    sys.stdout.write(prompt)
    write_stream(llama.stream_text(prompt, **sampling_options(args)))
    sys.stdout.write("\n")
    if args.verbose:
        print_stats(llama)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import run_bench

    if args.max_seq_len is None:
        args.max_seq_len = args.prompt_len + args.gen_len + 8
    result = run_bench(lambda: build_llama(args), args.prompt_len, args.gen_len, args.repeats)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model            {args.model}  ({result['threads']} threads, median of {args.repeats})")
    print(f"backend          {result['backend']}")
    print(f"load             {result['load_s']:.2f} s (+ warm-up {result['warmup_s']:.2f} s)")
    print(f"prompt           {result['prompt_tokens_per_s']:.1f} tok/s ({args.prompt_len} tokens)")
    print(f"time to 1st tok  {result['time_to_first_token_s'] * 1000:.0f} ms")
    print(f"decode           {result['decode_tokens_per_s']:.1f} tok/s ({args.gen_len} tokens)")
    print(f"peak RSS         {describe_rss(result['peak_rss_mb'], result['rss_above_torch_mb'])}")
    return 0


def describe_rss(peak_mb: float | None, above_torch_mb: float | None) -> str:
    """ "396 MB (177 MB above importing PyTorch)", or what the platform does not say."""
    if peak_mb is None:
        return "unknown on this platform"
    if above_torch_mb is None:
        return f"{peak_mb:.0f} MB"
    return f"{peak_mb:.0f} MB ({above_torch_mb:.0f} MB above importing PyTorch)"


def cmd_perplexity(args: argparse.Namespace) -> int:
    try:
        text = Path(args.text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise Llama2Error(f"{args.text_file}: cannot read the text: {err}") from None
    if args.max_seq_len is None:
        args.max_seq_len = args.window
    llama = build_llama(args)
    tokens = llama.tokenizer.encode(text, bos=False, eos=False)
    print(
        f"perplexity {llama.perplexity(tokens, args.window):.4f} over {len(tokens)} tokens (windows of {args.window})"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve.server import serve_command

    return serve_command(args)
