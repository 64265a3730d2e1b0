"""DPO: log 2 at step 0 (the policy is its LoRA-disabled reference), learning the synthetic preferences,
and answer log-probabilities independent of the padding side."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from llama2.align.batching import pad_sequences
from llama2.align.config import DPOConfig
from llama2.align.dpo import DPOTrainer, answer_logprobs
from llama2.config import model_args_from_preset
from llama2.model import meta_transformer
from llama2.train.model_setup import init_weights

from train_helpers import one_thread  # noqa: F401 (one_thread: autouse fixture)

PAIRS = Path(__file__).parent / "fixtures" / "align" / "pairs.jsonl"


def test_answer_logprobs_do_not_depend_on_padding_side():
    torch.manual_seed(0)
    model = meta_transformer(model_args_from_preset("tiny"))
    model.to_empty(device="cpu")
    init_weights(model)
    sequences, starts = [[1, 5, 6, 7, 8], [1, 9, 10]], torch.tensor([2, 1])
    with torch.no_grad():
        logits = model(torch.tensor([sequences[1]]))
        by_hand = sum(torch.log_softmax(logits[0, p - 1], -1)[sequences[1][p]] for p in (1, 2))
        right = answer_logprobs(model, pad_sequences(sequences, side="right"), starts)
        left = answer_logprobs(model, pad_sequences(sequences, side="left"), starts)
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(right[1], by_hand, rtol=1e-5, atol=1e-5)


def test_dpo_starts_at_log_2_and_learns_the_preferences(tmp_path):
    config = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        data=[str(PAIRS)],
        model="tiny",
        batch_size=8,
        micro_batch_size=8,
        seq_len=96,
        lora_rank=8,
        lora_dropout=0.0,
        lr=3e-3,
        max_steps=8,
        save_every=100,
        export="none",
        peak_tflops=1.0,
        seed=3,
    ).resolved()
    last = DPOTrainer(config).train()
    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    step_one = next(r for r in records if r.get("step") == 1 and "loss" in r)
    assert abs(step_one["loss"] - math.log(2)) < 1e-6  # policy == reference: every pair -log sigmoid(0)
    assert records[0]["val_accuracy"] == 0.0  # ties are not preferences
    assert last["val_accuracy"] >= 0.75 and last["val_loss"] < math.log(2)
    assert (tmp_path / "dpo" / "adapter" / "adapter.safetensors").is_file()
