"""Demo (a): pretrain a tiny Llama 2 on generated stories and watch validation perplexity fall.

    python examples/training/pretrain_demo.py [--output-dir runs/pretrain-tiny]

Generates the corpus, runs `llama2 train pretrain examples/training/pretrain_tiny.yaml`
(rerunning resumes), plots the curves (`llama2 plot`), prints the validation perplexity
at every evaluation and a short greedy sample from the trained model (read back from
the Meta checkpoint it exported).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from stories import write_corpus  # noqa: E402

from llama2.cli import main as llama2  # noqa: E402
from llama2.train.metrics import METRICS_FILE, read_metrics  # noqa: E402


def run(output_dir: Path) -> None:
    train, val = write_corpus(output_dir.parent / "stories")
    code = llama2(
        [
            "train",
            "pretrain",
            str(HERE / "pretrain_tiny.yaml"),
            "--output-dir",
            str(output_dir),
            "--data",
            str(train),
            "--val-data",
            str(val),
        ]
    )
    if code:
        raise SystemExit(code)
    llama2(["plot", str(output_dir)])
    records = read_metrics(output_dir / METRICS_FILE)
    print("\nvalidation perplexity (held-out stories):")
    for record in records:
        if "val_ppl" in record:
            print(f"  step {record['step']:>4}: loss {record['val_loss']:.3f}  perplexity {record['val_ppl']:10.2f}")
    steps = [r for r in records if "tokens_per_s" in r]
    rate = sorted(r["tokens_per_s"] for r in steps)[len(steps) // 2]
    print(f"training: {steps[-1]['step']} steps, {steps[-1]['tokens']:,} tokens, median {rate:,.0f} tokens/s")

    from llama2.generation import Llama

    model = Llama.build(output_dir / "final", max_seq_len=128, device="cpu")
    prompt = "Mia had a small dog named"
    sample = model.text_completion([prompt], temperature=0, max_gen_len=40, echo=True)[0]["generation"]
    print(f"greedy sample: {sample}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/pretrain-tiny"))
    run(parser.parse_args().output_dir)
