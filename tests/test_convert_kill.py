"""A conversion killed midway leaves no output that looks finished.

The source is a 1B-parameter Hugging Face folder whose safetensors file is sparse (all
zeros, no disk used), so converting it takes seconds while creating it takes none.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llama2.config import ModelArgs
from llama2.weights.checkpoint import TensorSpec, expected_shapes
from llama2.weights.hf import hf_config, hf_name
from llama2.weights.safetensors_file import data_size, header_bytes

ARGS = ModelArgs(dim=2048, n_layers=16, n_heads=16, vocab_size=32000, hidden_dim=5632, max_seq_len=2048)


@pytest.fixture(scope="module")
def sparse_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kill") / "source"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config(ARGS, "bfloat16")))
    specs = {hf_name(name): TensorSpec(shape, torch.bfloat16) for name, shape in expected_shapes(ARGS).items()}
    header = header_bytes(specs, {"format": "pt"})
    with (folder / "model.safetensors").open("wb") as file:
        file.write(header)
        file.truncate(len(header) + data_size(specs))
    return folder


def start(source: Path, dest: Path, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "llama2.cli", "convert", str(source), str(dest), *options]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def temp_outputs(dest: Path) -> list[Path]:
    return [path for path in dest.parent.iterdir() if path.name.startswith(f".{dest.name}.")]


def kill_midway(process: subprocess.Popen, dest: Path, stop) -> int:
    """Wait until the output is being written, then `stop` the process; return its exit status."""
    deadline = time.monotonic() + 120
    while not temp_outputs(dest):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.02)
    time.sleep(0.5)
    assert process.poll() is None, "the conversion finished before it could be interrupted"
    stop(process)
    process.communicate(timeout=60)
    return process.returncode


@pytest.mark.parametrize(("to", "name"), [("gguf", "out.gguf"), ("hf", "out-hf")])
def test_sigkill_leaves_only_a_temporary_name(sparse_model, tmp_path, to, name):
    dest = tmp_path / name
    options = ["--type", "q8_0"] if to == "gguf" else []

    kill_midway(start(sparse_model, dest, "--to", to, *options), dest, subprocess.Popen.kill)

    assert not dest.exists()
    leftovers = temp_outputs(dest)
    assert all(path.name.endswith(".tmp") for path in leftovers)  # hidden, and named as unfinished
    for path in leftovers:  # the partial output can be large
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is TerminateProcess on Windows")
def test_sigterm_cleans_up(sparse_model, tmp_path):
    dest = tmp_path / "out"

    status = kill_midway(start(sparse_model, dest, "--to", "meta"), dest, subprocess.Popen.terminate)

    assert status == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
