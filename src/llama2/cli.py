"""The `llama2` command: chat, generate, tokenize, info, models, conversion, speed, serving, training."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import Llama2Error
from .weights.registry import DEFAULT_MODEL

# ---------------------------------------------------------------------------- arguments


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        "-m",
        default=DEFAULT_MODEL,
        help=f"model name, GGUF file, HF or Meta folder (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--tokenizer", help="tokenizer file to use instead of the model's own")
    parser.add_argument(
        "--chat-format", help="override the chat format: llama-2, chatml, raw, or a Jinja template file"
    )


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """Where and how the model computes: device, dtype, quantization, threads."""
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weight/activation dtype")
    parser.add_argument(
        "--quant",
        choices=["auto", "none", "int8", "int4"],
        default="auto",
        help="auto: on the CPU, compute a GGUF file's Q4_0/Q4_1/Q8_0 layers on its blocks as stored "
        "(llama2's kernels, int8 activations as llama.cpp; else repacked for PyTorch's int4/int8 kernels), "
        "other checkpoints as they are; none: dequantize; int8/int4: quantize after loading",
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument(
        "--no-native",
        dest="native",
        action="store_false",
        help="run GGUF block models through PyTorch modules instead of llama2's C++ CPU engine",
    )


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """Everything `build_llama` reads."""
    add_model_options(parser)
    add_runtime_options(parser)
    parser.add_argument("--max-seq-len", type=int, help="context to allocate (default: the model's, at most 4096)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (slow first start, cached "
        "after; not needed where the native engine runs the model)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the sampling generator")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    add_load_options(parser)
    parser.add_argument("--max-tokens", "-n", type=int, default=512, help="most tokens to generate per answer")
    parser.add_argument("--temperature", "-t", type=float, default=0.6, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print timings to stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama2", description="Run Llama 2 and Llama-architecture models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = commands.add_parser("chat", help="chat with a model (interactive in a terminal)")
    add_run_options(chat)
    chat.add_argument("--system", "-s", help="system prompt")
    chat.add_argument("-p", "--prompt", help="one message: print the answer and exit")
    chat.set_defaults(handler=cmd_chat)

    generate = commands.add_parser("generate", help="complete a text prompt")
    add_run_options(generate)
    generate.add_argument("prompt", nargs="?", help="prompt text (default: standard input)")
    generate.set_defaults(handler=cmd_generate)

    tokenize = commands.add_parser("tokenize", help="print the token ids of a text or a chat dialog")
    add_model_options(tokenize)
    tokenize.add_argument("text", nargs="?", help="text to tokenize")
    tokenize.add_argument("--dialog", help="JSON file with a list of {role, content} messages")
    tokenize.add_argument(
        "--bos", action=argparse.BooleanOptionalAction, default=None, help="prepend BOS (default: as the model does)"
    )
    tokenize.set_defaults(handler=cmd_tokenize)

    info = commands.add_parser("info", help="describe a model or a preset architecture")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="preset name, model name or path")
    info.add_argument("--tokenizer", help="tokenizer file to use instead of the model's own")
    info.set_defaults(handler=cmd_info)

    pull = commands.add_parser("pull", help="download a named model or a Hugging Face repo (ORG/NAME) into the cache")
    pull.add_argument(
        "name", help="a model name (llama2 list) or a Hugging Face repo id, e.g. meta-llama/Llama-2-7b-chat-hf"
    )
    pull.add_argument("--revision", help="Hub branch, tag or commit")
    pull.add_argument("--file", help="download this one file of the Hub repo (e.g. a .gguf)")
    pull.set_defaults(handler=cmd_pull)

    convert = commands.add_parser("convert", help="convert weights between Meta, Hugging Face and GGUF formats")
    convert.add_argument("source", help="model name, GGUF file, HF or Meta folder")
    convert.add_argument("dest", help="output folder (meta, hf) or file (gguf)")
    convert.add_argument("--to", required=True, choices=["meta", "hf", "gguf"], help="output format")
    convert.add_argument("--shards", type=int, help="meta: model-parallel shards (1, 2, 8 as Llama 2 7B/13B/70B)")
    convert.add_argument("--type", help="gguf: auto, f32, f16, bf16, q8_0, q4_0, q4_1 (default: auto, as stored)")
    convert.add_argument("--max-shard-size", type=float, help="hf: safetensors shard size limit in GB (default: 5)")
    convert.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"], help="meta, hf: cast weights"
    )
    convert.add_argument("--tokenizer", help="tokenizer to ship instead of the source's own")
    convert.add_argument("--force", action="store_true", help="replace an existing destination")
    convert.set_defaults(handler=cmd_convert)

    list_ = commands.add_parser("list", help="list named models and whether they are downloaded")
    list_.set_defaults(handler=cmd_list)

    quantize = commands.add_parser(
        "quantize", help="write a quantized GGUF (int8 = Q8_0, int4 = Q4_0, Q4_K_M, Q5_K_M) of any checkpoint"
    )
    quantize.add_argument("source", help="model name, GGUF file, HF or Meta folder")
    quantize.add_argument("dest", help="output .gguf file")
    quantize.add_argument("--type", required=True, choices=sorted(QUANTIZE_TYPES), help="int8, int4 or a K-quant mix")
    quantize.add_argument("--force", action="store_true", help="replace an existing destination")
    quantize.set_defaults(handler=cmd_quantize)

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

    from .eval.cli import add_eval_parser  # no torch import: the parser stays fast

    add_eval_parser(commands)

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

    from .train.config import add_train_arguments  # no torch import: the parser stays fast

    train = commands.add_parser("train", help="pretrain or fine-tune (full, LoRA, QLoRA); rerun to resume")
    add_train_arguments(train)
    train.set_defaults(handler=cmd_train)

    plot = commands.add_parser("plot", help="plot a training run's loss and learning rate as PNG")
    plot.add_argument("run_dir", help="the run's --output-dir")
    plot.add_argument("--output", "-o", help="folder for the PNG files (default: RUN_DIR)")
    plot.set_defaults(handler=cmd_plot)
    from .align.cli import add_align_parser  # no torch import: the parser stays fast

    add_align_parser(commands)
    return parser


# ---------------------------------------------------------------------------- helpers


def build_llama(args: argparse.Namespace, max_batch_size: int = 1):
    import torch

    from .generation import Llama

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.threads:
        torch.set_num_threads(args.threads)
    return Llama.build(
        args.model,
        tokenizer_path=args.tokenizer,
        max_seq_len=args.max_seq_len,
        max_batch_size=max_batch_size,
        seed=args.seed,
        device=args.device,
        dtype=dtype,
        chat_format=args.chat_format,
        compile=args.compile,
        quant=args.quant,
        native=args.native,
    )


def sampling_options(args: argparse.Namespace) -> dict:
    return dict(
        max_gen_len=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
    )


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


# ---------------------------------------------------------------------------- commands


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


def read_dialog(path: str) -> list:
    try:
        dialog = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Llama2Error(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Llama2Error(f"{path}: not a readable JSON dialog ({err})") from None
    if isinstance(dialog, dict) and "messages" in dialog:
        dialog = dialog["messages"]
    valid = isinstance(dialog, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in dialog
    )
    if not valid or not dialog:
        raise Llama2Error(f'{path}: a dialog must be a non-empty JSON list of {{"role": ..., "content": ...}} objects')
    return dialog


def cmd_tokenize(args: argparse.Namespace) -> int:
    from .chat import resolve_chat_format
    from .weights.inspect import load_tokenizer

    if (args.text is None) == (args.dialog is None):
        raise Llama2Error("give either TEXT or --dialog FILE.json")
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    if args.dialog is not None:
        fmt = resolve_chat_format(tokenizer, tokenizer.chat_template, args.chat_format)
        ids = fmt.encode_dialog_prompt(read_dialog(args.dialog))
    else:
        bos = tokenizer.add_bos if args.bos is None else args.bos
        ids = tokenizer.encode(args.text, bos=bos, eos=False)
        for i in ids:
            print(f"{i:>6} {tokenizer.id_to_piece(i)!r}")
    print(json.dumps(ids))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .config import PRESETS, describe_args, model_args_from_preset
    from .weights.inspect import describe

    if args.model in PRESETS:
        lines = {"preset": args.model, **describe_args(model_args_from_preset(args.model))}
    else:
        lines = describe(args.model, args.tokenizer)
    width = max(len(k) for k in lines)
    for key, value in lines.items():
        print(f"{key:<{width}}  {value}")
    return 0


QUANTIZE_TYPES = {"int8": "q8_0", "int4": "q4_0", "q4_k_m": "q4_k_m", "q5_k_m": "q5_k_m"}


def cmd_quantize(args: argparse.Namespace) -> int:
    from .weights.convert import convert

    path = convert(
        args.source,
        args.dest,
        "gguf",
        tensor_type=QUANTIZE_TYPES[args.type],
        overwrite=args.force,
        progress=sys.stderr.isatty(),
    )
    print(path)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

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
    from .serve.server import serve_command

    return serve_command(args)


def cmd_pull(args: argparse.Namespace) -> int:
    from .weights import hub, registry

    if args.name in registry.MODELS and args.revision is None and args.file is None:
        path = registry.pull(args.name)
    elif hub.is_repo_id(args.name):
        path = hub.pull(args.name, revision=args.revision, filename=args.file)
    else:
        raise Llama2Error(
            f"{args.name}: not a model name ({', '.join(registry.model_names())}) or a Hugging Face repo id ORG/NAME"
        )
    print(path)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import signal
    import warnings

    from .errors import Llama2Warning
    from .weights.convert import convert

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"llama2: warning: {message}", file=sys.stderr)

    def terminate(signum, frame) -> None:
        raise SystemExit(128 + signum)  # unwinds, so the half-written output is removed

    max_shard_bytes = None if args.max_shard_size is None else int(args.max_shard_size * 1024**3)
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", Llama2Warning)
            warnings.showwarning = show
            path = convert(
                args.source,
                args.dest,
                args.to,
                num_shards=args.shards,
                tensor_type=args.type,
                max_shard_bytes=max_shard_bytes,
                dtype=args.dtype,
                tokenizer_path=args.tokenizer,
                overwrite=args.force,
                progress=sys.stderr.isatty(),
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .weights import registry

    for entry in registry.list_models():
        where = str(entry.path) if entry.path else "(not downloaded)"
        print(f"{entry.name:<28} {entry.description}  {where}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train.config import config_from_args
    from .train.trainer import run_training

    run_training(config_from_args(args))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .train.plot import plot_run

    for path in plot_run(args.run_dir, args.output):
        print(path)
    return 0


# ---------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run the command line; bad input prints one line on stderr and exits non-zero."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except Llama2Error as err:
        print(f"llama2: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except MemoryError:
        print(
            "llama2: error: out of memory; try a smaller model, --dtype bfloat16 or a shorter --max-seq-len",
            file=sys.stderr,
        )
        return 1
    except OSError as err:
        print(f"llama2: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
