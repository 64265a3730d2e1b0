"""Options shared by the commands that load a model, and the `Llama` they describe."""

from __future__ import annotations

import argparse

from ..weights.registry import DEFAULT_MODEL


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Which model: --model, --tokenizer, --chat-format."""
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
    """`add_load_options` and the generation options `sampling_options` reads, plus --verbose."""
    add_load_options(parser)
    parser.add_argument("--max-tokens", "-n", type=int, default=512, help="most tokens to generate per answer")
    parser.add_argument("--temperature", "-t", type=float, default=0.6, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print timings to stderr")


def build_llama(args: argparse.Namespace, max_batch_size: int = 1):
    """The `Llama` that the options of `add_load_options` describe."""
    import torch

    from ..generation import Llama

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
    """The keyword arguments of `Llama.stream_*` that the options of `add_run_options` give."""
    return dict(
        max_gen_len=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
    )
