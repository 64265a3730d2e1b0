"""Demo (b): LoRA-SFT of the default model so that it answers in a fixed format.

    python examples/training/lora_format_demo.py [--output-dir runs/lora-format]

Generates the chat data, measures how often SmolLM2-135M-Instruct starts its greedy
answers to held-out questions with "Answer:", fine-tunes LoRA adapters with
`llama2 train sft examples/training/lora_format.yaml`, loads the saved adapters into
the base model, merges them and measures again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from answer_format import follows_format, write_data  # noqa: E402

from llama2.cli import main as llama2  # noqa: E402

BATCH = 8
MAX_NEW_TOKENS = 16


def replies(llama, prompts: list[str]) -> list[str]:
    """Greedy answers, `BATCH` prompts at a time."""
    out = []
    for i in range(0, len(prompts), BATCH):
        dialogs = [[{"role": "user", "content": p}] for p in prompts[i : i + BATCH]]
        results = llama.chat_completion(dialogs, temperature=0, max_gen_len=MAX_NEW_TOKENS)
        out += [r["generation"]["content"] for r in results]
    return out


def measure(llama, heldout: dict, label: str) -> dict[str, float]:
    rates = {}
    for kind, prompts in heldout.items():
        answers = replies(llama, prompts)
        rates[kind] = sum(map(follows_format, answers)) / len(answers)
        for prompt, answer in list(zip(prompts, answers))[:3]:
            print(f"  [{label}] {prompt!r} -> {answer.strip()!r}")
    return rates


def run(output_dir: Path) -> None:
    import torch

    from llama2.generation import Llama
    from llama2.train.lora import load_adapters, merge_lora

    train, heldout_path = write_data(output_dir.parent / "format-data")
    heldout = json.loads(heldout_path.read_text())
    llama = Llama.build(
        "smollm2-135m-instruct", max_seq_len=256, max_batch_size=BATCH, device="cpu", dtype=torch.float32, quant="none"
    )
    before = measure(llama, heldout, "before")

    code = llama2(
        ["train", "sft", str(HERE / "lora_format.yaml"), "--output-dir", str(output_dir), "--data", str(train)]
    )
    if code:
        raise SystemExit(code)
    load_adapters(llama.model, output_dir / "adapter")
    merge_lora(llama.model).eval()
    after = measure(llama, heldout, "after")

    print("\nshare of greedy answers starting with 'Answer:' (held-out prompts)")
    for kind in heldout:
        print(f"  {kind:<12} ({len(heldout[kind])} prompts): before {before[kind]:6.1%}  after {after[kind]:6.1%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/lora-format"))
    run(parser.parse_args().output_dir)
