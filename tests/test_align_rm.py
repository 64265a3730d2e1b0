"""Reward models: the score sits at the last real token on either padding side, training learns the
synthetic preferences, the saved model scores the same after loading, and a killed run resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama2.align.batching import pad_sequences
from llama2.align.config import RewardConfig
from llama2.align.heads import forward_with_hidden
from llama2.align.preferences import encode_pairs, read_preferences
from llama2.align.reward_model import RewardModel
from llama2.align.rm import RewardTrainer, pair_scores
from llama2.cli import main
from llama2.config import model_args_from_preset
from llama2.model import meta_transformer
from llama2.train.model_setup import init_weights

from train_helpers import losses, one_thread  # noqa: F401 (one_thread: autouse fixture)

FIXTURES = Path(__file__).parent / "fixtures" / "align"
PAIRS = FIXTURES / "pairs.jsonl"


def tiny_reward_model(seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    backbone = meta_transformer(model_args_from_preset("tiny-gqa"))
    backbone.to_empty(device="cpu")
    init_weights(backbone)
    return RewardModel(backbone).eval()


def test_score_is_read_at_the_last_real_token_on_either_padding_side():
    model = tiny_reward_model()
    sequences = [[1, 10, 20, 30, 40, 50, 60], [1, 11, 21], [1, 12, 22, 32, 42]]
    with torch.no_grad():
        right = model(pad_sequences(sequences, side="right"))
        left = model(pad_sequences(sequences, side="left"))
        alone = torch.cat([model(pad_sequences([s])) for s in sequences])
        # Reading the last column instead (the common bug) gives a pad token's score.
        _, hidden = forward_with_hidden(model.backbone, pad_sequences(sequences, side="right"))
        at_last_column = model.head(hidden[:, -1])
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(at_last_column[1:], right[1:], atol=1e-3)


def rm_config(tmp_path: Path, name: str, **overrides) -> RewardConfig:
    values = dict(
        output_dir=str(tmp_path / name),
        data=[str(PAIRS)],
        model="tiny",
        batch_size=8,
        micro_batch_size=8,
        seq_len=96,
        lr=1e-3,
        max_steps=30,
        save_every=10,
        export="meta",
        peak_tflops=1.0,
        seed=3,
    )
    values.update(overrides)
    return RewardConfig(**values).resolved()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("rm")
    torch.set_num_threads(1)
    trainer = RewardTrainer(rm_config(tmp_path, "run"))
    last = trainer.train()
    return tmp_path / "run", trainer, last


def test_reward_model_learns_the_synthetic_preferences(trained_run):
    run, _, last = trained_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first_eval = next(r for r in records if "val_accuracy" in r)
    assert last["val_pairs"] == 16
    assert last["val_accuracy"] >= 0.8 > first_eval["val_accuracy"]


def test_saved_reward_model_scores_like_the_trained_one(trained_run):
    run, trainer, _ = trained_run
    loaded = RewardModel.build(run)
    pairs = read_preferences(PAIRS)[:6]
    scores = loaded.score([p.prompt.dialog for p in pairs], [p.chosen for p in pairs])
    encoded, _ = encode_pairs(trainer.chat_format, pairs, 96)
    expected, _ = pair_scores(trainer.model, encoded)
    assert scores == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_score_cli_prints_json_and_bad_input_is_one_line(trained_run, tmp_path, capsys):
    run, _, _ = trained_run
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:40]))
    assert main(["align", "score", "--model", str(run), "--data", str(subset), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"accuracy", "pairs", "per_rating"} <= metrics.keys() and metrics["pairs"] == 40
    assert metrics["accuracy"] > 0.75 and "unsafe_recall" in metrics
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": [{"role": "user", "content": "q"}], "chosen": "a"}\n')
    assert main(["align", "score", "--model", str(run), "--data", str(bad)]) == 1
    assert capsys.readouterr().err.strip() == f"llama2: error: {bad}:1: missing field 'rejected'"


class Crash(Exception):
    pass


def test_killed_lora_run_resumes_exactly(tmp_path):
    overrides = dict(lora_rank=4, max_steps=6, save_every=3, batch_size=4, micro_batch_size=2, export="none")
    RewardTrainer(rm_config(tmp_path, "straight", **overrides)).train()

    def crash(step: int, record: dict) -> None:
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        RewardTrainer(rm_config(tmp_path, "killed", **overrides), callbacks=[crash]).train()
    RewardTrainer(rm_config(tmp_path, "killed", **overrides)).train()
    assert losses(tmp_path / "killed") == pytest.approx(losses(tmp_path / "straight"), rel=1e-6)
    assert (tmp_path / "killed" / "adapter" / "adapter.safetensors").is_file()
    assert (tmp_path / "killed" / "reward_head.safetensors").is_file()


def test_plots_of_the_accuracy_per_rating(trained_run):
    from llama2.align.plots import SFT_PLOTS, plot_stage
    from llama2.align.rm import ACCURACY_PLOTS

    run, _, _ = trained_run
    written = plot_stage(run, {**SFT_PLOTS, **ACCURACY_PLOTS, "absent": ("no_such_metric",)})
    assert sorted(p.name for p in written) == ["loss.png", "lr.png", "rm_accuracy.png"]
    assert all(p.stat().st_size > 1000 for p in written)
