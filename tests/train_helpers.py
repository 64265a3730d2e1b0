"""Helpers for the training tests: small corpora, tiny configs, reading a run's metrics."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from llama2.train.config import TrainConfig
from llama2.train.metrics import METRICS_FILE, read_metrics


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one CPU thread: tiny models gain nothing from more, and on a busy
    machine thread synchronization would dominate their run time. Import into a test module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WORDS = "the cat dog bird sat ran flew on under mat log tree big small red blue and then".split()


def write_text_corpus(path: Path, documents: int = 120, seed: int = 0) -> Path:
    """A JSONL pretraining corpus of random short sentences from a fixed vocabulary."""
    rng = random.Random(seed)
    with path.open("w") as file:
        for _ in range(documents):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60)))
            file.write(json.dumps({"text": text}) + "\n")
    return path


def write_chat_corpus(path: Path, dialogs: int = 40, seed: int = 0) -> Path:
    """A JSONL chat corpus: questions about numbers answered in a fixed format."""
    rng = random.Random(seed)
    with path.open("w") as file:
        for _ in range(dialogs):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            messages = [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"Answer: {a + b}."},
            ]
            file.write(json.dumps({"messages": messages}) + "\n")
    return path


def tiny_config(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    """A resolved pretraining config of the "tiny" preset on a small corpus in `tmp_path`."""
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        write_text_corpus(corpus)
    values = dict(
        mode="pretrain",
        output_dir=str(tmp_path / name),
        data=[str(corpus)],
        model="tiny",
        max_steps=8,
        batch_size=4,
        micro_batch_size=2,
        seq_len=64,
        lr=1e-3,
        warmup_steps=2,
        save_every=3,
        export="none",
        peak_tflops=1.0,  # skip measuring the CPU's matmul rate for the MFU estimate
    )
    values.update(overrides)
    return TrainConfig(**values).resolved()


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> training loss from a run's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / METRICS_FILE) if "loss" in r}
