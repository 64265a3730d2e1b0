"""`llama2 train` and `llama2 plot` on the command line; the YAML config and its flag overrides."""

from __future__ import annotations

import pytest
import yaml

from llama2.cli import main
from llama2.train.config import load_config
from llama2.train.metrics import METRICS_FILE, read_metrics

from helpers import expect_error
from train_helpers import one_thread, write_text_corpus  # noqa: F401 (one_thread: autouse fixture)


@pytest.fixture
def config_file(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus.jsonl", documents=60)
    path = tmp_path / "run.yaml"
    values = {"model": "tiny", "data": str(corpus), "max_steps": 5, "batch-size": 2, "seq_len": 32, "export": "none"}
    path.write_text(yaml.safe_dump(values))
    return path


def test_train_then_plot(tmp_path, config_file, capsys):
    run_dir = tmp_path / "run"
    code = main(
        ["train", "pretrain", str(config_file), "--output-dir", str(run_dir), "--max-steps", "3", "--lr", "1e-3"]
    )
    assert code == 0
    records = [r for r in read_metrics(run_dir / METRICS_FILE) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]  # the flag beat the file's max_steps: 5
    assert {"step", "loss", "lr", "tokens_per_s", "mfu", "grad_norm"} <= records[0].keys()
    assert records[0]["tokens_per_s"] > 0 and 0 < records[0]["mfu"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (
        saved["lr"] == 1e-3 and saved["max_steps"] == 3 and saved["batch_size"] == 2 and saved["betas"] == [0.9, 0.95]
    )

    capsys.readouterr()
    assert main(["plot", str(run_dir)]) == 0
    for name in ("loss.png", "lr.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(run_dir / "loss.png") in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "pretrain", "--output-dir", "x"], "no training data"),
        (["train", "pretrain", "missing.yaml"], "no such config file"),
        (
            ["train", "sft", "--data", "nowhere.jsonl", "--output-dir", "{tmp}/o", "--model", "tiny"],
            "no such data file",
        ),
        (["train", "pretrain", "--data", "d", "--output-dir", "o", "--qlora", "nf4"], "--lora-rank"),
        (["plot", "{tmp}"], "metrics.jsonl"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llama2: error:") and "\n" not in err and message in err


def test_config_file_is_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: fast\n")
    expect_error(lambda: load_config(path), "lr must be of type float")
    path.write_text("learning_rate: 1\n")
    expect_error(lambda: load_config(path), "unknown setting 'learning_rate'")
    path.write_text("- a list\n")
    expect_error(lambda: load_config(path), "mapping")
    path.write_text("betas: [0.9, 0.99]\ndata: one.txt\nlora_targets: [wq, wv]\nbf16: true\nlr: 1\n")
    config = load_config(path, {"seed": 7})
    assert (config.betas, config.data, config.lora_targets, config.bf16, config.lr, config.seed) == (
        (0.9, 0.99),
        ["one.txt"],
        ["wq", "wv"],
        True,
        1.0,
        7,
    )
