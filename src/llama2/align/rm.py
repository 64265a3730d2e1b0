"""Reward model training (`llama2 align rm`) and evaluation (`llama2 align score`).

The trainer's loop, checkpoints, exact resume, FSDP2 and metrics are reused as they are:
`RewardTrainer` only changes what a row is (a tokenized preference pair), the model (a
`RewardModel` around the policy architecture), the loss (the margin ranking loss) and the
evaluation (held-out accuracy per rating, and precision/recall of "unsafe" on safety pairs).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..chat import resolve_chat_format
from ..errors import Llama2Error
from ..train.model_setup import prepare_model
from ..train.trainer import Trainer
from .batching import PaddedBatch, pad_sequences
from .config import RewardConfig
from .heads import ScalarHead, export_backbone, shard_wrapper
from .losses import centering_penalty, margin, ranking_loss
from .preferences import RATINGS, EncodedPair, encode_pairs, read_preference_files
from .reward_model import RewardModel, save_reward_head

ACCURACY_PLOTS = {"rm_accuracy": ("val_accuracy", *(f"val_accuracy_{r.replace(' ', '_')}" for r in RATINGS))}


@dataclass
class PairBatch:
    """Preference pairs as one padded batch: rows 0..n-1 chosen answers, n..2n-1 rejected ones."""

    padded: PaddedBatch
    margins: torch.Tensor  # [n]
    answer_starts: torch.Tensor  # [2n] where each row's answer starts (in its own sequence)
    num_tokens: int
    num_targets: int  # pairs

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(
            self.padded.to(device),
            self.margins.to(device),
            self.answer_starts.to(device),
            self.num_tokens,
            self.num_targets,
        )


def collate_pairs(pairs: Sequence[EncodedPair], margin_table: str, side: str = "right") -> PairBatch:
    answers = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    sequences = [a.ids for a in answers]
    margins = torch.tensor([margin(p.rating, margin_table) for p in pairs], dtype=torch.float32)
    starts = torch.tensor([a.answer_start for a in answers])
    return PairBatch(pad_sequences(sequences, side=side), margins, starts, sum(map(len, sequences)), len(pairs))


def split_pairs(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded shuffle, `fraction` of the pairs held out (at least one when > 0)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = math.ceil(fraction * len(pairs)) if fraction > 0 else 0
    return [pairs[i] for i in order[held:]], [pairs[i] for i in order[:held]]


@torch.no_grad()
def pair_scores(
    model: RewardModel, pairs: Sequence[EncodedPair], batch_size: int = 8
) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) of tokenized pairs."""
    chosen = model.score_ids([p.chosen.ids for p in pairs], batch_size)
    rejected = model.score_ids([p.rejected.ids for p in pairs], batch_size)
    return chosen, rejected


def preference_metrics(
    pairs: Sequence[EncodedPair], chosen: Sequence[float], rejected: Sequence[float], unsafe_threshold: float = 0.5
) -> dict:
    """Accuracy (chosen scored strictly higher) overall and per rating, and on safety pairs the
    precision and recall of "unsafe" (rejected answers are the unsafe ones; flagged when
    sigmoid(score) < threshold)."""
    correct = [c > r for c, r in zip(chosen, rejected)]
    metrics = {"accuracy": sum(correct) / len(correct), "pairs": len(correct)}
    per_rating = {}
    for rating in RATINGS:
        hits = [ok for ok, p in zip(correct, pairs) if p.rating == rating]
        if hits:
            per_rating[rating] = sum(hits) / len(hits)
    metrics["per_rating"] = per_rating
    safety = [k for k, p in enumerate(pairs) if p.safety]
    if safety:
        flagged = [
            (1 / (1 + math.exp(-s)) < unsafe_threshold, unsafe)
            for k in safety
            for s, unsafe in ((chosen[k], False), (rejected[k], True))
        ]
        true_positives = sum(f and u for f, u in flagged)
        metrics["unsafe_precision"] = true_positives / max(1, sum(f for f, _ in flagged))
        metrics["unsafe_recall"] = true_positives / max(1, sum(u for _, u in flagged))
    return metrics


def flat_metrics(metrics: dict, prefix: str) -> dict:
    """`preference_metrics` as flat scalar keys for metrics.jsonl (per-rating keys with underscores)."""
    flat = {f"{prefix}{k}": v for k, v in metrics.items() if k != "per_rating"}
    flat.update({f"{prefix}accuracy_{r.replace(' ', '_')}": v for r, v in metrics["per_rating"].items()})
    return flat


class RewardTrainer(Trainer):
    """Trains a reward model with the trainer's loop (see the module docstring)."""

    config: RewardConfig

    def _load_data(self) -> tuple[list[EncodedPair], list[EncodedPair] | None]:
        config = self.config
        self.chat_format = resolve_chat_format(self.loaded.tokenizer, self.loaded.chat_template, config.chat_format)
        train = self._encode(config.data)
        if config.val_data:
            val = self._encode(config.val_data)
        else:
            train, val = split_pairs(train, config.val_fraction, config.seed)
        if not train:
            raise Llama2Error("no training pairs left after holding out the validation share")
        config.with_schedule(len(train))
        return train, val or None

    def _encode(self, paths: Sequence[str]) -> list[EncodedPair]:
        pairs, dropped = encode_pairs(self.chat_format, read_preference_files(paths), self.seq_len)
        if dropped and self.env.is_main:
            print(f"left out {dropped} pairs longer than {self.seq_len} tokens")
        if not pairs:
            raise Llama2Error(f"{', '.join(paths)}: no pair fits in {self.seq_len} tokens: raise --seq-len")
        return pairs

    def prepare_model(self) -> nn.Module:
        backbone = prepare_model(self.loaded.model, self.config, self.env, self.bf16)
        model = RewardModel(backbone, ScalarHead(self.loaded.args.dim, self.env.device), self.chat_format)
        return shard_wrapper(model, self.env)

    def _batch(self, samples: range) -> PairBatch:
        pairs = [self.train_rows[self.sampler.row(k)] for k in samples]
        return collate_pairs(pairs, self.config.margin, self.config.padding_side)

    def compute_loss(self, batch: PairBatch) -> torch.Tensor:
        scores = self.model(batch.padded)  # [2n]
        chosen, rejected = scores.chunk(2)
        loss = ranking_loss(chosen, rejected, batch.margins).sum()
        if self.config.center_rewards:
            loss = loss + self.config.center_rewards * centering_penalty(chosen, rejected).sum()
        return loss

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss, accuracy per rating and unsafe precision/recall (every process scores all pairs)."""
        pairs = self.val_rows
        chosen, rejected = pair_scores(self.model, pairs, self.plan.micro_batch * 2)
        margins = torch.tensor([margin(p.rating, self.config.margin) for p in pairs])
        loss = ranking_loss(torch.tensor(chosen), torch.tensor(rejected), margins).mean().item()
        metrics = preference_metrics(pairs, chosen, rejected, self.config.unsafe_threshold)
        return {"step": self.state["step"], "val_loss": loss, **flat_metrics(metrics, "val_")}

    def export(self) -> Path | None:
        """Write final/ (and adapter/ with LoRA) like any run, plus the head and reward_model.json."""
        written, rest = export_backbone(self, self.output_dir / "final")
        if self.env.is_main:
            description = {
                "base_model": self.loaded.source,
                "lora": self.lora is not None,
                "chat_format": self.config.chat_format,
                "dim": self.loaded.args.dim,
            }
            save_reward_head(self.output_dir, {k.removeprefix("head."): v for k, v in rest.items()}, description)
        return written


def run_reward_training(config: RewardConfig) -> dict:
    """Train a reward model with `config` (resolved); returns the last metrics. Plots go to the run folder."""
    from .plots import SFT_PLOTS, run_stage

    return run_stage(RewardTrainer, config, {**SFT_PLOTS, **ACCURACY_PLOTS})


def score_pairs(model_path: str, data: Sequence[str], batch_size: int = 8, unsafe_threshold: float = 0.5) -> dict:
    """Accuracy of the reward model saved in `model_path` on preference files (`llama2 align score`)."""
    model = RewardModel.build(model_path)
    seq_len = model.backbone.args.max_seq_len
    pairs, _ = encode_pairs(model.chat_format, read_preference_files(data), seq_len)
    if not pairs:
        raise Llama2Error(f"{', '.join(data)}: no pair fits in the model's context of {seq_len} tokens")
    chosen, rejected = pair_scores(model, pairs, batch_size)
    return preference_metrics(pairs, chosen, rejected, unsafe_threshold)
