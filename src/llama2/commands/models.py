"""Commands about model files: tokenize, info, pull, list, convert, quantize."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import Llama2Error
from ..weights.registry import DEFAULT_MODEL
from .options import add_model_options


def add_model_file_parsers(commands) -> None:
    """Register tokenize, info, pull, convert, list and quantize on `commands` (argparse subparsers)."""
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
    from ..chat import resolve_chat_format
    from ..weights.inspect import load_tokenizer

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
    from ..config import PRESETS, describe_args, model_args_from_preset
    from ..weights.inspect import describe

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
    from ..weights.convert import convert

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


def cmd_pull(args: argparse.Namespace) -> int:
    from ..weights import hub, registry

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

    from ..errors import Llama2Warning
    from ..weights.convert import convert

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
    from ..weights import registry

    for entry in registry.list_models():
        where = str(entry.path) if entry.path else "(not downloaded)"
        print(f"{entry.name:<28} {entry.description}  {where}")
    return 0
