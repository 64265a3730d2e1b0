"""The `llama2 eval` commands: perplexity counted as each tool counts, KL divergence, lm-eval, the built-in
suites, safety, comparisons of models and reports."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..commands.options import add_load_options, build_llama
from ..errors import Llama2Error

DEFAULT_CTX = 512


def add_eval_parser(commands) -> None:
    """Register `llama2 eval perplexity` and `llama2 eval kld` under the top-level subparsers."""
    group = commands.add_parser("eval", help="evaluate: perplexity as llama.cpp / HF / lm-eval count it, KL divergence")
    evals = group.add_subparsers(dest="eval_command", required=True, metavar="EVAL")

    ppl = evals.add_parser("perplexity", help="perplexity of text files, counted the way a chosen tool counts it")
    add_load_options(ppl)
    ppl.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files (each one a document)")
    ppl.add_argument(
        "--mode",
        choices=["llamacpp", "strided", "rolling"],
        default="llamacpp",
        help="llamacpp: llama-perplexity's chunks; strided: Hugging Face's guide loop; "
        "rolling: lm-evaluation-harness loglikelihood_rolling (default: llamacpp)",
    )
    ppl.add_argument("--ctx", type=int, help="tokens a window (default: 512; rolling: the model's context)")
    ppl.add_argument("--stride", type=int, help="strided mode: tokens between window starts (default: ctx/2)")
    ppl.add_argument("--batch-size", type=int, default=1, help="equal-length windows forwarded together")
    ppl.add_argument(
        "--arithmetic",
        choices=["native", "llamacpp"],
        default="native",
        help="native: our kernels; llamacpp: dequantized float32 weights with llama.cpp's 8-bit rounding of "
        "activations before each product, as its CPU backend computes quantized files (default: native)",
    )
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

    add_suite_parsers(evals)


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
    try:
        return build_llama(argparse.Namespace(**{**vars(args), "model": model, "max_seq_len": ctx}), args.batch_size)
    except Llama2Error as err:
        if ctx is not None and "exceeds the model's context" in str(err):
            raise Llama2Error(f"--ctx {ctx}: {err}") from None
        raise


def arithmetic_context(llama, arithmetic: str):
    """A context in which `llama` computes as `arithmetic` says ("native": unchanged)."""
    from contextlib import nullcontext

    from .llamacpp_arithmetic import llamacpp_activations

    return llamacpp_activations(llama.model) if arithmetic == "llamacpp" else nullcontext()


def cmd_eval_perplexity(args: argparse.Namespace) -> int:
    from .perplexity import evaluate_perplexity

    for name, value in (("--ctx", args.ctx), ("--stride", args.stride), ("--batch-size", args.batch_size)):
        check_positive(name, value)
    texts = [(path, read_text(path)) for path in args.files]
    ctx = args.ctx or (None if args.mode == "rolling" else DEFAULT_CTX)
    if args.arithmetic == "llamacpp":
        args.quant, args.dtype = "none", "float32"
    llama = load(args, args.model, ctx)
    with arithmetic_context(llama, args.arithmetic):
        result = evaluate_perplexity(llama, texts, args.mode, ctx or llama.max_seq_len, args.stride, args.batch_size)
    if args.json:
        print(json.dumps({"model": args.model, "arithmetic": args.arithmetic, **result.to_dict()}))
        return 0
    windowing = f"ctx {result.ctx}" + (f", stride {result.stride}" if result.stride else "")
    print(f"mode          {result.mode} ({windowing})")
    print(f"method        {result.method}")
    print(f"arithmetic    {args.arithmetic}")
    for f in result.files:
        print(f"file          {f['name']}: {f['tokens']} tokens, {f['windows']} windows, {f['tokens_scored']} scored")
    print(
        f"tokens scored {result.tokens_scored}"
        + (f" (averaged over {result.counted_tokens})" if result.counted_tokens != result.tokens_scored else "")
    )
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


# ---------------------------------------------------------------------------- suites, safety, compare, report

DEFAULT_SUITE_CTX = 512


def add_suite_options(parser: argparse.ArgumentParser, default_suite: str) -> None:
    """Options of the commands that run a suite."""
    parser.add_argument(
        "--suite",
        default=default_suite,
        help=f"built-in suite (basic, mc, safety) or a tasks.json path (default: {default_suite})",
    )
    parser.add_argument("--tasks", help="comma-separated tasks of the suite to run (default: all)")
    parser.add_argument("--limit", type=int, help="the first N items of each task")
    parser.add_argument("--batch-size", type=int, default=1, help="items forwarded together (results do not change)")
    parser.add_argument("--max-tokens", type=int, default=64, help="longest generated answer (default: 64)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--output-dir", help="write results.json, summary.md, charts/*.png and report.html there")
    parser.add_argument(
        "--judge",
        "--judge-url",
        dest="judge",
        default="rules",
        help="safety judge: rules (default), reward:MODULE:NAME or reward:FILE.py:NAME "
        "(a (dialog, answer) -> float callable, higher is safer), "
        "or an OpenAI-compatible base URL",
    )
    parser.add_argument("--judge-threshold", type=float, default=0.0, help="reward judge: unsafe below this score")
    parser.add_argument("--judge-model", default="judge", help="model name sent to a judge endpoint")


def add_suite_parsers(evals) -> None:
    """Register `llama2 eval suite`, `safety`, `compare` and `report`."""
    suite = evals.add_parser("suite", help="the built-in offline suite: multiple choice and short answers")
    add_load_options(suite)
    add_suite_options(suite, "basic")
    suite.set_defaults(handler=cmd_eval_suite)

    safety = evals.add_parser("safety", help="red-team and borderline prompts: violation, false refusal")
    add_load_options(safety)
    add_suite_options(safety, "safety")
    safety.set_defaults(handler=cmd_eval_suite)

    compare = evals.add_parser("compare", help="one suite over several models or quantizations, side by side")
    add_load_options(compare)
    compare.add_argument("models", nargs="+", metavar="MODEL", help="models to compare (the first is the baseline)")
    add_suite_options(compare, "basic")
    compare.set_defaults(handler=cmd_eval_compare, model=None)

    report = evals.add_parser("report", help="render a run folder: table, JSON, PNG charts and an HTML report")
    report.add_argument("run", metavar="RUN", help="a folder written by --output-dir")
    report.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    report.set_defaults(handler=cmd_eval_report)


def evaluate_models(args: argparse.Namespace, models: list[str]):
    """Run the chosen suite on each model in turn (one loaded at a time)."""
    from .datasets import load_suite
    from .judges import make_judge
    from .runs import ModelRun, Run
    from .suite import SuiteOptions, run_suite

    for name, value in (("--batch-size", args.batch_size), ("--max-tokens", args.max_tokens)):
        check_positive(name, value)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    suite, loaded = load_suite(args.suite, tasks, args.limit)
    judge = make_judge(args.judge, args.judge_threshold, args.judge_model, os.environ.get("LLAMA2_JUDGE_API_KEY"))
    options = SuiteOptions(args.batch_size, args.max_tokens, progress=True, judge=judge)
    settings = {"batch_size": args.batch_size, "max_tokens": args.max_tokens, "judge": judge.name}
    runs = []
    for model in models:
        llama = load(args, model, args.max_seq_len or DEFAULT_SUITE_CTX)
        start = time.perf_counter()
        results = run_suite(llama, loaded, options)
        runs.append(ModelRun(model, results, time.perf_counter() - start, settings))
        del llama
    return Run(suite, runs)


def summary_json(run) -> dict:
    """The run without its items: metrics per model and task, comparisons, safety breakdowns."""
    value = run.to_dict()
    for model in value["models"]:
        model["tasks"] = {t["task"]: {k: v for k, v in t.items() if k not in ("items", "task")} for t in model["tasks"]}
    return value


def print_examples(run, width: int = 160) -> None:
    """A few answers per model and task (wrong ones, violations, refusals), one line each."""
    from .report import examples

    for section in examples(run):
        print(f"\n{section['model']} / {section['task']}: {section['label']} ({section['count']})")
        for item in section["items"]:
            answer = " ".join(item.answer.split())
            print(f"  [{item.id}] {item.prompt[: width // 2]!r} -> {answer[:width]!r}")


def show_run(args: argparse.Namespace, run, folder: str | None) -> int:
    """Write the run folder when asked; print the summary (text or JSON)."""
    from .report import summary_text, write_report
    from .runs import write_run

    paths = {}
    if folder:
        paths = {"results": write_run(run, Path(folder)), **write_report(run, Path(folder))}
    if args.json:
        print(json.dumps({**summary_json(run), "files": {k: str(v) for k, v in paths.items()}}))
        return 0
    print(summary_text(run), end="")
    if any(t.kind in ("redteam", "borderline") for m in run.models for t in m.tasks):
        print_examples(run)
    for kind, path in paths.items():
        print(f"{kind:16} {path}", file=sys.stderr)
    return 0


def cmd_eval_suite(args: argparse.Namespace) -> int:
    return show_run(args, evaluate_models(args, [args.model]), args.output_dir)


def cmd_eval_compare(args: argparse.Namespace) -> int:
    if args.model is not None:
        raise Llama2Error("eval compare: give the models as arguments (llama2 eval compare A B ...), not --model")
    if len(args.models) < 2:
        raise Llama2Error("eval compare: give at least two models")
    folder = args.output_dir or f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    return show_run(args, evaluate_models(args, args.models), folder)


def cmd_eval_report(args: argparse.Namespace) -> int:
    from .runs import read_run

    return show_run(args, read_run(Path(args.run)), args.run)
