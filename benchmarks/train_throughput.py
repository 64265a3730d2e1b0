"""Training throughput: `llama2` vs transformers + TRL's SFTTrainer, same model, data and batch.

Both train the same Llama architecture (the "small" preset: dim 288, 6 layers, Llama 2's
32000-token vocabulary; the same initial weights, written once through our HF writer
and read by transformers) on the same pre-tokenized SFT rows (chat dialogs in the
Llama-2-Chat format, loss on the answers only, every row exactly --seq-len tokens so
neither side pads), with the same global batch, AdamW and clipping, in float32 on the
CPU, without activation checkpointing on either side (TRL turns it on by default). Each
measurement runs in a fresh process; runs of the two alternate (ours, TRL, ours, TRL, ...)
so machine noise hits both; the first --warmup steps of each run are
discarded and the rest timed end to end (step end to step end, data loading included).

    pip install -e '.[bench]'   # trl
    python benchmarks/train_throughput.py [--rounds 3] [--steps 12] [--batch-size 8] [--seq-len 256]

Prints tokens/s (median over runs of each run's median step), CPU-seconds per step, and
the ratio ours / TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKERS = ("ours", "trl")


# ---------------------------------------------------------------------------- shared inputs


def make_inputs(folder: Path, preset: str, rows: int, seq_len: int) -> None:
    """The initial model (Meta-layout state dict + HF folder) and the token rows, in `folder`."""
    import torch

    from llama2.chat import Llama2ChatFormat
    from llama2.config import model_args_from_preset
    from llama2.model import Transformer
    from llama2.tokenizer import Tokenizer, llama2_tokenizer_path
    from llama2.train.data import encode_chat_example, write_token_dataset
    from llama2.train.model_setup import init_weights
    from llama2.weights.hf import write_hf

    torch.manual_seed(0)
    args = model_args_from_preset(preset)
    model = Transformer(args)
    init_weights(model)
    torch.save(model.state_dict(), folder / "initial.pt")
    tokenizer = Tokenizer.from_file(llama2_tokenizer_path())
    write_hf(args, model.state_dict(), folder / "hf", tokenizer=tokenizer)

    fmt = Llama2ChatFormat(tokenizer)
    examples = []
    for i in range(rows):
        dialog = []
        for turn in range(12):
            a, b = (i * 7 + turn) % 97, (i * 13 + turn * 5) % 89
            dialog += [
                {"role": "user", "content": f"Question {turn}: what is {a} plus {b}? Explain briefly."},
                {
                    "role": "assistant",
                    "content": f"Answer: {a} plus {b} is {a + b}, because adding {b} to {a} gives {a + b}.",
                },
            ]
        ids, mask = encode_chat_example(fmt, dialog)
        if len(ids) <= seq_len:
            raise SystemExit("dialogs too short for --seq-len")
        examples.append((ids[: seq_len + 1], mask[: seq_len + 1]))
    write_token_dataset(folder / "ours", examples, tokenizer.n_words, with_mask=True)
    with (folder / "trl.jsonl").open("w") as file:  # the same seq_len forward tokens per row
        for ids, mask in examples:
            file.write(
                json.dumps({"input_ids": ids[:seq_len], "completion_mask": [int(m) for m in mask[:seq_len]]}) + "\n"
            )


# ---------------------------------------------------------------------------- workers


class StepClock:
    """Wall and CPU time between consecutive step ends."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._last = None

    def tick(self) -> None:
        now = (time.perf_counter(), time.process_time())
        if self._last is not None:
            self.wall.append(now[0] - self._last[0])
            self.cpu.append(now[1] - self._last[1])
        self._last = now


def run_ours(folder: Path, opts) -> StepClock:
    import torch

    from llama2.train.config import TrainConfig
    from llama2.train.trainer import Trainer

    config = TrainConfig(
        mode="sft",
        output_dir=str(folder / f"run-ours-{os.getpid()}"),
        data=[str(folder / "ours")],
        model=opts.preset,
        max_steps=opts.steps,
        batch_size=opts.batch_size,
        micro_batch_size=opts.batch_size,
        seq_len=opts.seq_len,
        lr=2e-5,
        warmup_steps=0,
        layout="pad",
        save_every=10**9,
        export="none",
        bf16=False,
        compile=False,
    ).resolved()
    trainer = Trainer(config)
    trainer.model.load_state_dict(torch.load(folder / "initial.pt", weights_only=True))
    clock = StepClock()
    clock.tick()
    for step in range(opts.steps):
        trainer.train_step(step)
        clock.tick()
    return clock


def run_trl(folder: Path, opts) -> StepClock:
    import datasets
    import transformers
    from trl import SFTConfig, SFTTrainer

    clock = StepClock()

    class Timer(transformers.TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            clock.tick()

        def on_step_end(self, *args, **kwargs):
            clock.tick()

    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf", dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "hf")
    dataset = datasets.load_dataset("json", data_files=str(folder / "trl.jsonl"), split="train")
    config = SFTConfig(
        output_dir=str(folder / f"run-trl-{os.getpid()}"),
        max_steps=opts.steps,
        per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=2e-5,
        lr_scheduler_type="cosine",
        weight_decay=0.1,
        adam_beta2=0.95,
        adam_epsilon=1e-5,
        max_grad_norm=1.0,
        max_length=opts.seq_len,
        packing=False,
        completion_only_loss=True,
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        bf16=False,
        seed=0,
        gradient_checkpointing=False,  # TRL's default is on; ours is off: compare like with like
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[Timer()]
    )
    trainer.train()
    return clock


def worker(name: str, folder: Path, opts) -> None:
    clock = {"ours": run_ours, "trl": run_trl}[name](folder, opts)
    timed = slice(opts.warmup, None)
    wall, cpu = clock.wall[timed], clock.cpu[timed]
    print(
        json.dumps(
            {"worker": name, "step_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "steps": len(wall)}
        )
    )


# ---------------------------------------------------------------------------- driver


def measure(name: str, folder: Path, opts) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--folder", str(folder), *opts.passthrough]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="steps per run (the first --warmup are not timed)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    opts.passthrough = [
        f"--preset={opts.preset}",
        f"--batch-size={opts.batch_size}",
        f"--seq-len={opts.seq_len}",
        f"--steps={opts.steps}",
        f"--warmup={opts.warmup}",
    ]
    if opts.worker:
        worker(opts.worker, Path(opts.folder), opts)
        return

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_inputs(folder, opts.preset, rows=opts.batch_size * opts.steps, seq_len=opts.seq_len)
        results = {name: [] for name in WORKERS}
        for round_ in range(opts.rounds):
            for name in WORKERS if round_ % 2 == 0 else WORKERS[::-1]:
                results[name].append(measure(name, folder, opts))
                print(f"round {round_ + 1} {name:>4}: {results[name][-1]['step_s']:.3f} s/step", file=sys.stderr)
    tokens_per_step = opts.batch_size * opts.seq_len
    print(
        f"model preset {opts.preset}, batch {opts.batch_size} x {opts.seq_len} tokens, float32, "
        f"{torch.get_num_threads()} threads, {opts.rounds} alternating runs of {opts.steps - opts.warmup} timed steps"
    )
    summary = {}
    for name in WORKERS:
        step_s = statistics.median(r["step_s"] for r in results[name])
        cpu_s = statistics.median(r["cpu_s"] for r in results[name])
        summary[name] = tokens_per_step / step_s
        print(f"{name:>5}: {summary[name]:8.0f} tokens/s  ({step_s:.3f} s/step wall, {cpu_s:.3f} CPU-s/step)")
    print(f"ratio ours / transformers+TRL: {summary['ours'] / summary['trl']:.2f}")


if __name__ == "__main__":
    main()
