"""PPO: the reward per token, the LoRA-disabled reference, and at miniature scale the reward going up
with the KL exactly 0 at step 0 and bounded after; a killed run resumes exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from llama2.align.config import PPOConfig
from llama2.align.ppo import PPOTrainer, adapters_disabled, answer_mask, token_rewards
from llama2.align.rewards import CombinedReward
from llama2.config import model_args_from_preset
from llama2.model import meta_transformer
from llama2.tokenizer import Tokenizer, llama2_tokenizer_path
from llama2.train.lora import LoRAConfig, apply_lora
from llama2.train.model_setup import init_weights

from train_helpers import one_thread  # noqa: F401 (one_thread: autouse fixture)

PROMPTS = Path(__file__).parent / "fixtures" / "align" / "prompts.jsonl"
LOW_HALF = 16000  # the synthetic reward: the share of answer tokens with ids below this


def test_answer_mask_and_token_rewards_by_hand():
    # Two rows of width 6: prompt 2 tokens + answer 3; prompt 3 + answer 1 (then a pad).
    mask = answer_mask([2, 3], [5, 4], 6)
    assert mask.int().tolist() == [[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]]
    kl = torch.tensor([[9.0, 0.5, -0.2, 0.1, 9.0], [9.0, 9.0, 0.3, 9.0, 9.0]])
    rewards = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, beta=0.1)
    expected = [[0, -0.05, 0.02, -0.01 + 2.0, 0], [0, 0, -0.03 - 1.0, 0, 0]]
    torch.testing.assert_close(rewards, torch.tensor(expected))


def test_adapters_disabled_is_exactly_the_base_model():
    torch.manual_seed(0)
    model = meta_transformer(model_args_from_preset("tiny"))
    model.to_empty(device="cpu")
    init_weights(model)
    base = copy.deepcopy(model).eval()
    apply_lora(model, LoRAConfig(rank=4, targets=["wq", "wv", "w2"]))
    for name, param in model.named_parameters():
        if name.endswith("lora_b"):
            torch.nn.init.normal_(param)  # a trained adapter
    tokens = torch.randint(0, 32000, (2, 9))
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(tokens), base(tokens))
        with adapters_disabled(model):
            assert torch.equal(model(tokens), base(tokens))
        assert not torch.equal(model(tokens), base(tokens))  # the adapters are back


def low_half_reward():
    tokenizer = Tokenizer.from_file(llama2_tokenizer_path())

    def score(dialogs, answers):
        shares = []
        for answer in answers:
            ids = tokenizer.encode(answer, bos=False, eos=False) or [LOW_HALF]
            shares.append(8 * (sum(i < LOW_HALF for i in ids) / len(ids) - 0.5))  # raw score; sigmoid -> (0, 1)
        return shares

    return CombinedReward(score)


def ppo_config(tmp_path: Path, name: str, **overrides) -> PPOConfig:
    values = dict(
        output_dir=str(tmp_path / name),
        data=[str(PROMPTS)],
        model="tiny",
        batch_size=24,
        micro_batch_size=24,
        seq_len=96,
        max_gen_len=4,
        lora_rank=8,
        lora_targets=["wq", "wv", "w2", "output"],
        lora_dropout=0.0,
        lr=3e-3,
        max_steps=5,
        ppo_epochs=2,
        save_every=100,
        export="none",
        peak_tflops=1.0,
        reward_model="synthetic",
    )
    values.update(overrides)
    return PPOConfig(**values).resolved()


def peaked(trainer: PPOTrainer) -> PPOTrainer:
    """Sharpen the random policy (output weights x40) so a few steps can move it; the reference,
    the same weights with adapters off, is sharpened alike."""
    with torch.no_grad():
        trainer.model.backbone.output.base.weight.mul_(40)
    return trainer


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ppo_raises_the_reward_with_kl_zero_at_step_zero_and_bounded(tmp_path):
    peaked(PPOTrainer(ppo_config(tmp_path, "run"), reward=low_half_reward())).train()
    history = records(tmp_path / "run")
    assert [r["step"] for r in history] == list(range(1, 6))
    first, last = history[0], history[-1]
    assert first["kl"] == 0.0 and first["kl_k3"] == 0.0  # LoRA B starts at 0: the policy is the reference
    assert last["reward"] > first["reward"] + 0.2
    assert all(0 <= r["kl_k3"] < 4.0 for r in history)  # 4 answer tokens: under 1 nat per token
    assert {"entropy", "clip_fraction", "value_loss", "response_length", "eos_rate"} <= last.keys()


class Crash(Exception):
    pass


def test_killed_ppo_run_resumes_exactly(tmp_path):
    overrides = dict(max_steps=3, save_every=1, batch_size=4, micro_batch_size=2, max_gen_len=3)
    peaked(PPOTrainer(ppo_config(tmp_path, "straight", **overrides), reward=low_half_reward())).train()

    def crash(step: int, record: dict) -> None:
        if step == 2:
            raise Crash

    with pytest.raises(Crash):
        trainer = PPOTrainer(ppo_config(tmp_path, "killed", **overrides), callbacks=[crash], reward=low_half_reward())
        peaked(trainer).train()
    peaked(PPOTrainer(ppo_config(tmp_path, "killed", **overrides), reward=low_half_reward())).train()
    keys = ("reward", "kl", "loss", "value_loss")
    straight = torch.tensor([[r[k] for k in keys] for r in records(tmp_path / "straight")])
    killed = torch.tensor([[r[k] for k in keys] for r in records(tmp_path / "killed")])
    torch.testing.assert_close(killed, straight, rtol=1e-5, atol=1e-7)
