"""Settings of the alignment stages: `TrainConfig` plus each stage's own, with the Llama 2 paper's defaults.

Every stage reads the same YAML keys and flags as `llama2 train` (model, data, output
folder, steps, batch, LoRA, seed, checkpoints, device ...) and adds its own. This
module imports no torch, so building the command line stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from ..errors import Llama2Error
from ..train.config import (
    TrainConfig,
    _check_choice,
    add_override_flags,
    load_config,
    overrides_from_args,
)

MARGIN_CHOICES = ("small", "large", "none")
RM_LR = 1e-5  # Llama 2, section 3.2.2 (7B/13B; 5e-6 for 70B)
RM_LORA_LR = 1e-4  # adapters learn at a higher rate (no paper default for LoRA reward models)
RM_WARMUP_FRACTION = 0.03
PPO_LR = 1e-6  # Llama 2, section 3.2.3 (constant)
PPO_LORA_LR = 1e-5
DPO_LR = 1e-6  # Rafailov et al. 2023 (full fine-tuning)
DPO_LORA_LR = 5e-5


@dataclass
class RewardConfig(TrainConfig):
    """A reward model run (Llama 2, section 3.2.2).

    Attributes (besides `TrainConfig`'s; `batch_size` counts pairs, `data` holds preference JSONL):
        max_steps: optimizer steps; default: `epochs` epochs of the training pairs.
        epochs: passes over the training pairs when `max_steps` is not given (paper: 1).
        margin: margin table of the ranking loss: "small" (1, 2/3, 1/3, 0), "large" (3, 2, 1, 0) or "none".
        center_rewards: weight of the (r_c + r_r)^2 penalty that keeps scores centered (0: off).
        val_fraction: share of the pairs held out for accuracy when no --val-data is given.
        unsafe_threshold: a safety RM flags an answer "unsafe" when sigmoid(score) is below this.
        padding_side: how batches are padded ("right" or "left"; scores do not depend on it).
    """

    mode: str = "sft"
    max_steps: int | None = None
    epochs: float = 1.0
    margin: str = "small"
    center_rewards: float = 0.0
    val_fraction: float = 0.1
    unsafe_threshold: float = 0.5
    padding_side: str = "right"

    def resolved(self) -> RewardConfig:
        lr = self.lr or (RM_LORA_LR if self.lora_rank else RM_LR)
        warmup = self.warmup_steps
        c = TrainConfig.resolved(dataclasses.replace(self, mode="sft", lr=lr))
        c.warmup_steps = warmup  # 3% of max_steps once the data sets it (`with_schedule`)
        _check_choice("margin", c.margin, MARGIN_CHOICES)
        _check_choice("padding side", c.padding_side, ("right", "left"))
        if not 0 <= c.val_fraction < 1 or c.epochs <= 0 or c.center_rewards < 0:
            raise Llama2Error("val_fraction must be in [0, 1), epochs positive and center_rewards not negative")
        return c

    def with_schedule(self, train_examples: int) -> None:
        """Fill max_steps (whole epochs of `train_examples`) and warmup (3% of the steps) if unset."""
        if self.max_steps is None:
            self.max_steps = max(1, round(self.epochs * train_examples / self.batch_size))
        if self.warmup_steps is None:
            self.warmup_steps = round(RM_WARMUP_FRACTION * self.max_steps)


@dataclass
class DPOConfig(RewardConfig):
    """DPO on preference pairs (Rafailov et al. 2023): `RewardConfig`'s data, split and schedule.

    Attributes:
        beta: strength of the implicit KL constraint (paper: 0.1).
    """

    beta: float = 0.1

    def resolved(self) -> DPOConfig:
        lr = self.lr or (DPO_LORA_LR if self.lora_rank else DPO_LR)
        c = RewardConfig.resolved(dataclasses.replace(self, lr=lr))
        if c.beta <= 0:
            raise Llama2Error(f"beta must be positive, got {c.beta}")
        return c


class SFTStage:
    """A stage that ends with the trainer's SFT on data it made (rejection sampling, GAtt, distillation)."""

    def sft_config(self, data: list[str]) -> TrainConfig:
        """The trainer's SFT config on `data`, in the same run folder."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{**values, "data": data}).resolved()


@dataclass
class SamplingSettings:
    """How answers are sampled from a policy and judged (rejection sampling and PPO).

    Attributes:
        reward_model: helpfulness reward model run folder (`llama2 align rm`).
        safety_reward_model: safety reward model run folder; with it the reward is Llama 2's R_c.
        safety_threshold: safety probabilities strictly below it take precedence (paper: 0.15).
        samples: answers sampled per prompt.
        temperature, top_p: sampling settings.
        max_gen_len: most answer tokens.
        sample_batch_size: rows generated together.
    """

    reward_model: str | None = None
    safety_reward_model: str | None = None
    safety_threshold: float = 0.15
    samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_gen_len: int = 64
    sample_batch_size: int = 16

    def check_sampling(self) -> None:
        if not self.reward_model:
            raise Llama2Error("no reward model: give --reward-model (a `llama2 align rm` output folder)")
        for name in ("samples", "max_gen_len", "sample_batch_size"):
            if getattr(self, name) <= 0:
                raise Llama2Error(f"{name} must be positive, got {getattr(self, name)}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise Llama2Error("temperature must not be negative and top_p must be in (0, 1]")


@dataclass
class RejectionConfig(TrainConfig, SamplingSettings, SFTStage):
    """Rejection sampling fine-tuning (Llama 2, section 3.2.3): `data` holds prompt JSONL; the best of
    `samples` answers per prompt (pooled with the best answers in `pool`, earlier iterations'
    samples/best.jsonl) is fine-tuned on with the trainer's SFT.
    """

    mode: str = "sft"
    pool: list[str] = dataclasses.field(default_factory=list)

    def resolved(self) -> RejectionConfig:
        c = TrainConfig.resolved(dataclasses.replace(self, mode="sft"))
        c.check_sampling()
        return c


@dataclass
class PPOConfig(TrainConfig, SamplingSettings):
    """PPO on the reward of Llama 2 (section 3.2.3): `data` holds prompt JSONL, `batch_size` prompts
    are answered per iteration (one answer each), and `max_steps` counts iterations.

    Attributes (besides `TrainConfig`'s and `SamplingSettings`'s):
        beta: weight of the KL penalty in the reward (paper: 0.01; 0.005 for 34B/70B).
        clip: PPO clipping of the probability ratio (paper: 0.2), also used for the value.
        ppo_epochs: optimizer steps on each batch of rollouts.
        gamma, lam: discount and GAE parameter.
        value_coef: weight of the value loss.
        missing_eos_penalty: subtracted from the score of answers cut at max_gen_len.
        whiten_scores: whiten logit(R_c) over the batch (paper: yes).
    """

    mode: str = "sft"
    batch_size: int | None = 16
    min_lr_ratio: float = 1.0  # the paper's constant learning rate
    samples: int = 1
    beta: float = 0.01
    clip: float = 0.2
    ppo_epochs: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    value_coef: float = 0.1
    missing_eos_penalty: float = 1.0
    whiten_scores: bool = True

    def resolved(self) -> PPOConfig:
        lr = self.lr or (PPO_LORA_LR if self.lora_rank else PPO_LR)
        c = TrainConfig.resolved(dataclasses.replace(self, mode="sft", lr=lr))
        c.check_sampling()
        if c.beta < 0 or not 0 < c.clip < 1 or c.ppo_epochs <= 0 or not 0 <= c.lam <= 1 or not 0 < c.gamma <= 1:
            raise Llama2Error("need beta >= 0, clip in (0, 1), ppo_epochs > 0, lam in [0, 1] and gamma in (0, 1]")
        if c.batch_size < 2 and c.whiten_scores:
            raise Llama2Error("whitening the scores needs a batch of at least 2 prompts")
        return c


@dataclass
class DistillConfig(TrainConfig, SFTStage):
    """Safety context distillation (Llama 2, section 4.2.4): `data` holds adversarial prompt JSONL
    (optionally with a "category" for its answer template).

    Attributes:
        safety_reward_model: the safety RM that decides which preprompted answers are kept.
        preprompt: the safety preprompt (a system message).
        max_gen_len, temperature, sample_batch_size: answer sampling.
    """

    mode: str = "sft"
    safety_reward_model: str | None = None
    preprompt: str = "You are a safe and responsible assistant."
    max_gen_len: int = 64
    temperature: float = 0.0
    sample_batch_size: int = 16

    def resolved(self) -> DistillConfig:
        c = TrainConfig.resolved(dataclasses.replace(self, mode="sft"))
        if not c.safety_reward_model:
            raise Llama2Error("no safety reward model: give --safety-reward-model (a `llama2 align rm` folder)")
        return c


@dataclass
class GattConfig(TrainConfig, SFTStage):
    """Ghost Attention (Llama 2, section 3.3): `llama2 align gatt` samples `dialogs` synthetic dialogs of
    `turns` user turns with instruction number `instruction` (of `gatt.INSTRUCTIONS`) on every
    turn, fine-tunes on them with the instruction in turn 1 only and the loss on the last answer,
    and measures adherence per turn (up to `adherence_turns`) before and after. `data` is unused.
    """

    mode: str = "sft"
    data: list[str] = dataclasses.field(default_factory=lambda: ["synthetic"])
    instruction: int = 0
    dialogs: int = 16
    turns: int = 4
    max_gen_len: int = 32
    temperature: float = 0.7
    adherence_turns: int = 20
    adherence_dialogs: int = 4
    adherence_seq_len: int = 2048

    def resolved(self) -> GattConfig:
        c = TrainConfig.resolved(dataclasses.replace(self, mode="sft"))
        if c.export == "none":
            raise Llama2Error("gatt measures the trained model: give an --export format (meta, hf, gguf)")
        return c


SAMPLING_FLAGS: tuple[tuple[str, str, dict], ...] = (
    ("--reward-model", "reward_model", dict(help="helpfulness reward model (llama2 align rm output folder)")),
    ("--safety-reward-model", "safety_reward_model", dict(help="safety reward model: reward is Llama 2's R_c")),
    ("--safety-threshold", "safety_threshold", dict(type=float, help="R_c takes the safety RM below it (0.15)")),
    ("--samples", "samples", dict(type=int, help="answers sampled per prompt")),
    ("--temperature", "temperature", dict(type=float)),
    ("--top-p", "top_p", dict(type=float)),
    ("--max-gen-len", "max_gen_len", dict(type=int, help="most answer tokens")),
    ("--sample-batch-size", "sample_batch_size", dict(type=int, help="rows generated together")),
)
REJECTION_FLAGS = SAMPLING_FLAGS + (
    ("--pool", "pool", dict(nargs="+", help="earlier iterations' samples/best.jsonl to pool with")),
)


# (flag, field, argparse options) of the stages' own settings.
REWARD_FLAGS: tuple[tuple[str, str, dict], ...] = (
    ("--epochs", "epochs", dict(type=float, help="passes over the pairs when --max-steps is not given (default 1)")),
    ("--margin", "margin", dict(choices=MARGIN_CHOICES, help="margin table of the ranking loss (default small)")),
    ("--center-rewards", "center_rewards", dict(type=float, help="weight of the (r_c + r_r)^2 centering term")),
    ("--val-fraction", "val_fraction", dict(type=float, help="share of pairs held out when no --val-data")),
    ("--unsafe-threshold", "unsafe_threshold", dict(type=float, help="sigmoid(score) below it flags unsafe")),
    ("--padding-side", "padding_side", dict(choices=("right", "left"))),
)


def add_stage_arguments(parser: argparse.ArgumentParser, flags: tuple[tuple[str, str, dict], ...]) -> None:
    """The YAML config positional, `llama2 train`'s override flags, and a stage's own flags."""
    parser.add_argument("config", nargs="?", help="YAML file of settings (the flags override it)")
    add_override_flags(parser)
    add_override_flags(parser, flags)


def config_from_stage_args(args: argparse.Namespace, cls: type):
    """A stage's resolved config: the YAML file, then the flags given, then its defaults."""
    return load_config(args.config, overrides_from_args(args), cls=cls).resolved()


PPO_FLAGS = SAMPLING_FLAGS + (
    ("--beta", "beta", dict(type=float, help="KL penalty weight in the reward (0.01)")),
    ("--clip", "clip", dict(type=float, help="PPO ratio clipping (0.2)")),
    ("--ppo-epochs", "ppo_epochs", dict(type=int, help="optimizer steps per batch of rollouts")),
    ("--gamma", "gamma", dict(type=float)),
    ("--lam", "lam", dict(type=float, help="GAE lambda")),
    ("--value-coef", "value_coef", dict(type=float)),
    ("--missing-eos-penalty", "missing_eos_penalty", dict(type=float, help="score penalty for answers without EOS")),
    ("--whiten-scores", "whiten_scores", dict(action=argparse.BooleanOptionalAction)),
)
GATT_FLAGS: tuple[tuple[str, str, dict], ...] = (
    (
        "--instruction",
        "instruction",
        dict(type=int, help="which built-in instruction (0: Ahoy, 1: Over and out, 2: caps)"),
    ),
    ("--dialogs", "dialogs", dict(type=int, help="synthetic dialogs to sample")),
    ("--turns", "turns", dict(type=int, help="user turns per sampled dialog")),
    ("--max-gen-len", "max_gen_len", dict(type=int)),
    ("--temperature", "temperature", dict(type=float)),
    ("--adherence-turns", "adherence_turns", dict(type=int, help="turns of the adherence measure (20)")),
    ("--adherence-dialogs", "adherence_dialogs", dict(type=int)),
)
DPO_FLAGS = REWARD_FLAGS[:1] + REWARD_FLAGS[3:] + (("--beta", "beta", dict(type=float, help="DPO beta (0.1)")),)
DISTILL_FLAGS: tuple[tuple[str, str, dict], ...] = (
    ("--safety-reward-model", "safety_reward_model", dict(help="safety RM (llama2 align rm output folder)")),
    ("--preprompt", "preprompt", dict(help="safety preprompt (a system message)")),
    ("--max-gen-len", "max_gen_len", dict(type=int)),
    ("--temperature", "temperature", dict(type=float, help="0: greedy (default)")),
    ("--sample-batch-size", "sample_batch_size", dict(type=int)),
)
