"""The `llama2 eval` commands: perplexity counted as each tool counts, and KL divergence."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import Llama2Error

DEFAULT_CTX = 512


def add_eval_parser(commands) -> None:
    """Register `llama2 eval perplexity` and `llama2 eval kld` under the top-level subparsers."""
    from ..cli import add_load_options

    group = commands.add_parser("eval", help="evaluate: perplexity as llama.cpp / HF / lm-eval count it, KL divergence")
    evals = group.add_subparsers(dest="eval_command", required=True, metavar="EVAL")

    ppl = evals.add_parser("perplexity", help="perplexity of text files, counted the way a chosen tool counts it")
    add_load_options(ppl)
    ppl.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files (each one a document)")
    ppl.add_argument("--mode", choices=["llamacpp", "strided", "rolling"], default="llamacpp",
                     help="llamacpp: llama-perplexity's chunks; strided: Hugging Face's guide loop; "
                     "rolling: lm-evaluation-harness loglikelihood_rolling (default: llamacpp)")  # fmt: skip
    ppl.add_argument("--ctx", type=int, help="tokens a window (default: 512; rolling: the model's context)")
    ppl.add_argument("--stride", type=int, help="strided mode: tokens between window starts (default: ctx/2)")
    ppl.add_argument("--batch-size", type=int, default=1, help="equal-length windows forwarded together")
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    ppl.set_defaults(handler=cmd_eval_perplexity)

    kld = evals.add_parser("kld", help="KL divergence of a model (e.g. a quantization) from a reference, as llama.cpp")
    add_load_options(kld)
    kld.add_argument("--reference", "-r", required=True, help="reference model (name, GGUF file, HF or Meta folder)")
    kld.add_argument("file", metavar="FILE", help="UTF-8 text file")
    kld.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"llama.cpp's n_ctx (default: {DEFAULT_CTX})")
    kld.add_argument("--batch-size", type=int, default=1, help="chunks forwarded together")
    kld.add_argument("--json", action="store_true", help="print one JSON object")
    kld.set_defaults(handler=cmd_eval_kld)

    harness = evals.add_parser("lm-eval", help="run lm-evaluation-harness tasks on the model (needs llama2[eval])")
    add_load_options(harness)
    harness.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. wikitext,hellaswag")
    harness.add_argument("--num-fewshot", type=int, help="few-shot examples per task (default: the task's)")
    harness.add_argument("--limit", type=float, help="documents per task (a fraction if below 1)")
    harness.add_argument("--batch-size", type=int, default=1, help="equal-length windows forwarded together")
    harness.add_argument("--json", action="store_true", help="print the results as one JSON object")
    harness.set_defaults(handler=cmd_eval_lm_eval)


def read_text(path: str) -> str:
    """A file's UTF-8 text; one-line errors for a missing, unreadable or empty file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Llama2Error(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise Llama2Error(f"{path}: cannot read the text: {err}") from None
    if not text.strip():
        raise Llama2Error(f"{path}: the text is empty")
    return text


def check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise Llama2Error(f"{name} must be at least 1, got {value}")


def load(args: argparse.Namespace, model: str, ctx: int | None):
    """Build a `Llama` for `model` with the command's load options, context `ctx` and batch size."""
    from ..cli import build_llama

    try:
        return build_llama(argparse.Namespace(**{**vars(args), "model": model, "max_seq_len": ctx}), args.batch_size)
    except Llama2Error as err:
        if ctx is not None and "exceeds the model's context" in str(err):
            raise Llama2Error(f"--ctx {ctx}: {err}") from None
        raise


def cmd_eval_perplexity(args: argparse.Namespace) -> int:
    from .perplexity import evaluate_perplexity

    for name, value in (("--ctx", args.ctx), ("--stride", args.stride), ("--batch-size", args.batch_size)):
        check_positive(name, value)
    texts = [(path, read_text(path)) for path in args.files]
    ctx = args.ctx or (None if args.mode == "rolling" else DEFAULT_CTX)
    llama = load(args, args.model, ctx)
    result = evaluate_perplexity(llama, texts, args.mode, ctx or llama.max_seq_len, args.stride, args.batch_size)
    if args.json:
        print(json.dumps({"model": args.model, **result.to_dict()}))
        return 0
    windowing = f"ctx {result.ctx}" + (f", stride {result.stride}" if result.stride else "")
    print(f"mode          {result.mode} ({windowing})")
    print(f"method        {result.method}")
    for f in result.files:
        print(f"file          {f['name']}: {f['tokens']} tokens, {f['windows']} windows, {f['tokens_scored']} scored")
    print(f"tokens scored {result.tokens_scored}" + (f" (averaged over {result.counted_tokens})" if result.counted_tokens != result.tokens_scored else ""))
    print(f"perplexity    {result.ppl:.4f} +/- {result.ppl_error:.5f}")
    if result.word_perplexity is not None:
        print(f"word ppl      {result.word_perplexity:.4f}")
        print(f"bits per byte {result.bits_per_byte:.5f}")
    print(f"time          {result.seconds:.2f} s")
    return 0


def cmd_eval_kld(args: argparse.Namespace) -> int:
    from .kld import kl_divergence

    check_positive("--ctx", args.ctx)
    check_positive("--batch-size", args.batch_size)
    text = read_text(args.file)
    model = load(args, args.model, args.ctx)
    reference = load(args, args.reference, args.ctx)
    r = kl_divergence(model, reference, text, args.ctx, args.batch_size)
    if args.json:
        print(json.dumps({"model": args.model, "reference": args.reference, **r.to_dict()}))
        return 0
    print(f"chunks {r.chunks} of {r.ctx} tokens, {r.tokens_scored} tokens scored (KL(reference || model) per token)")
    print(f"Mean PPL(Q)               : {r.ppl:10.6f} +/- {r.ppl_error:10.6f}")
    print(f"Mean PPL(base)            : {r.ppl_base:10.6f} +/- {r.ppl_base_error:10.6f}")
    print(f"Mean ln(PPL(Q)/PPL(base)) : {r.ln_ppl_ratio:10.6f} +/- {r.ln_ppl_ratio_error:10.6f}")
    print(f"Mean    KLD               : {r.kld:10.6f} +/- {r.kld_error:10.6f}")
    print(f"Maximum KLD               : {r.kld_max:10.6f}")
    print(f"RMS delta p               : {100 * r.rms_dp:6.3f} +/- {100 * r.rms_dp_error:5.3f} %")
    print(f"Same top p                : {100 * r.same_top:6.3f} +/- {100 * r.same_top_error:5.3f} %")
    print(f"time                      : {r.seconds:.2f} s", file=sys.stderr)
    return 0


def cmd_eval_lm_eval(args: argparse.Namespace) -> int:
    from .harness import register

    check_positive("--batch-size", args.batch_size)
    harness_class = register()  # a clear error when lm_eval is missing, before the model loads
    import lm_eval
    from lm_eval.utils import make_table

    model = harness_class(load(args, args.model, args.max_seq_len), batch_size=args.batch_size)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit)
    if args.json:
        print(json.dumps({"model": args.model, "results": results["results"]}, default=str))
    else:
        print(make_table(results))
    return 0
