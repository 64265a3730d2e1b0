"""The `llama2 train` command under torchrun (2 processes, gloo, FSDP2) and after a SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llama2.train.checkpoint import completed_checkpoints

from train_helpers import losses, write_text_corpus

TRAIN = ["-m", "llama2.cli", "train", "pretrain"]


def train_args(config: Path, output_dir: Path) -> list[str]:
    """`llama2 train pretrain CONFIG` on the CPU (gloo, also where a GPU exists) into `output_dir`."""
    return [*TRAIN, str(config), "--device", "cpu", "--output-dir", str(output_dir)]


def run_config(tmp_path: Path, **overrides) -> Path:
    """A YAML config for a tiny pretraining run (flags on the command line override it)."""
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        write_text_corpus(corpus, documents=200)
    values = dict(
        data=[str(corpus)],
        model="tiny",
        batch_size=4,
        micro_batch_size=2,
        seq_len=64,
        lr=1e-3,
        warmup_steps=2,
        save_every=3,
        max_steps=6,
        export="none",
    )
    values.update(overrides)
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def command(*args: str) -> list[str]:
    return [sys.executable, *args]


def run(cmd: list[str], timeout: int = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_process_fsdp_matches_one_process_and_reshards_on_resume(tmp_path):
    config = run_config(tmp_path)
    run(command(*train_args(config, tmp_path / "one")))
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run(command(*torchrun, *train_args(config, tmp_path / "two")))

    single, sharded = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(single) == list(range(1, 7))
    assert sharded == pytest.approx(single, rel=1e-5)
    assert single[6] < single[1]
    # Each process wrote its own shard of the FSDP state.
    assert len(list((tmp_path / "two" / "checkpoints" / "step_00000006").glob("*.distcp"))) == 2

    # Lose everything after step 3 of the 2-process run, then resume it in one process:
    # torch.distributed.checkpoint reshards the state, and the curve goes on unchanged.
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step_00000006")
    run(command(*train_args(config, tmp_path / "two")))
    assert losses(tmp_path / "two") == pytest.approx(single, rel=1e-5)


def test_sigkill_then_same_command_resumes_exactly(tmp_path):
    config = run_config(tmp_path, max_steps=40, save_every=5, batch_size=8, seq_len=128)
    killed_dir, reference_dir = tmp_path / "killed", tmp_path / "reference"
    cmd = command(*train_args(config, killed_dir))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            done = losses(killed_dir) if (killed_dir / "metrics.jsonl").exists() else {}
            if max(done, default=0) >= 12:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    finally:
        if process.poll() is None:
            process.kill()
    checkpoints = [p.name for p in completed_checkpoints(killed_dir)]
    assert checkpoints and checkpoints[-1] >= "step_00000010" and max(losses(killed_dir)) < 40

    run(cmd)  # the same command again
    run(command(*train_args(config, reference_dir)))
    expected = losses(reference_dir)
    assert sorted(expected) == list(range(1, 41))
    assert losses(killed_dir) == pytest.approx(expected, rel=1e-6)
