"""Training on one CUDA GPU: throughput, MFU and memory of the paper's recipes.

    python benchmarks/train_cuda.py [--out results.jsonl] [--skip-7b]

1. Pretraining the "small" preset (dim 288, 6 layers, Llama 2 vocabulary) on the
   generated stories corpus, bf16 autocast (the CUDA default), with torch.compile off
   and on: tokens/s (median after warmup), MFU, loss and validation perplexity.
2. QLoRA (NF4 base, rank 16 adapters on every linear layer) of a Llama-2-7B-shaped model
   (random weights: this measures speed and memory, not quality), bf16, activation
   checkpointing: tokens/s, MFU, peak GPU memory.

Each run goes through `llama2.train.trainer.Trainer`, the code `llama2 train` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "training"))

from stories import write_corpus  # noqa: E402

from llama2.train.config import TrainConfig  # noqa: E402
from llama2.train.distributed import DistributedEnv  # noqa: E402
from llama2.train.metrics import METRICS_FILE, read_metrics  # noqa: E402
from llama2.train.trainer import Trainer  # noqa: E402


def run(name: str, config: TrainConfig, warmup: int) -> dict:
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer = Trainer(config, DistributedEnv(device=torch.device("cuda")))
    setup_s = time.perf_counter() - start
    last = trainer.train()
    records = read_metrics(Path(config.output_dir) / METRICS_FILE)
    steps = [r for r in records if "tokens_per_s" in r][warmup:]
    evals = [r for r in records if "val_ppl" in r]
    result = {
        "run": name,
        "setup_s": round(setup_s, 1),
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in steps)),
        "mfu": round(statistics.median(r["mfu"] for r in steps), 4),
        "first_loss": round(next(r["loss"] for r in records if "loss" in r), 3),
        "last_loss": round(last["loss"], 3),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "val_ppl": [round(r["val_ppl"], 2) for r in evals],
    }
    print(json.dumps(result), flush=True)
    del trainer
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skip-7b", action="store_true")
    options = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, val = write_corpus(tmp / "stories")
        common = dict(data=[str(train)], val_data=[str(val)], export="none", save_every=10**9, eval_batches=8)
        for compiled in (False, True):
            config = TrainConfig(
                mode="pretrain",
                output_dir=str(tmp / f"small-{compiled}"),
                model="small",
                max_steps=60,
                batch_size=64,
                micro_batch_size=64,
                seq_len=512,
                lr=3e-3,
                warmup_steps=6,
                eval_every=60,
                compile=compiled,
                **common,
            ).resolved()
            results.append(run(f"pretrain small, compile={compiled}", config, warmup=10))
        if not options.skip_7b:
            config = TrainConfig(
                mode="pretrain",
                output_dir=str(tmp / "qlora-7b"),
                model="llama2-7b",
                max_steps=8,
                batch_size=8,
                micro_batch_size=4,
                seq_len=1024,
                lora_rank=16,
                qlora="nf4",
                lora_dropout=0.0,
                activation_checkpointing=True,
                compile=False,
                **common,
            ).resolved()
            config.val_data = []
            results.append(run("QLoRA NF4 llama2-7b shape (random weights)", config, warmup=3))
    if options.out:
        options.out.write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
