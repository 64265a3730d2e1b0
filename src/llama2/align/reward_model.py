"""Reward models: the policy architecture with a scalar head read at the answer's last real token.

A reward model run folder (written by `llama2 align rm`) holds, besides the trainer's
checkpoints and metrics:

    reward_model.json       what the head sits on: {"base_model", "lora", "chat_format", "dim"}
    reward_head.safetensors the head's weight [1, dim] and bias [1]
    final/                  the backbone with adapters merged (unless --export none)
    adapter/                the LoRA adapters alone (LoRA runs)

`RewardModel.build(run_dir).score(dialogs, answers)` loads one for scoring.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..chat import ChatFormat, resolve_chat_format
from ..errors import Llama2Error
from .batching import PaddedBatch, gather_rows, pad_sequences
from .heads import ScalarHead, forward_with_hidden
from .preferences import encode_answer

REWARD_CONFIG = "reward_model.json"
REWARD_HEAD = "reward_head.safetensors"


class RewardModel(nn.Module):
    """A `Transformer` backbone and a scalar head: one score per sequence, at its last real token.

    Args:
        backbone: the policy architecture (its logits are not used).
        head: the scalar head (default: a new `ScalarHead`).
        chat_format: the format answers are encoded in (needed by `score` only).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None, chat_format: ChatFormat | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else ScalarHead(backbone.args.dim, backbone.norm.weight.device)
        self.chat_format = chat_format

    def forward(self, batch: PaddedBatch) -> torch.Tensor:
        """Scores [B] of a padded batch of prompt + answer sequences (either padding side)."""
        _, hidden = forward_with_hidden(self.backbone, batch)  # [B, T, dim]
        return self.head(gather_rows(hidden, batch.last_index))

    @torch.no_grad()
    def score(self, dialogs: Sequence[list[dict]], answers: Sequence[str], batch_size: int = 8) -> list[float]:
        """The reward of each answer to its dialog (dialogs end with a user turn)."""
        if self.chat_format is None:
            raise Llama2Error("this reward model has no chat format to encode answers with")
        if len(dialogs) != len(answers):
            raise Llama2Error(f"{len(dialogs)} dialogs but {len(answers)} answers")
        sequences = [encode_answer(self.chat_format, d, a).ids for d, a in zip(dialogs, answers)]
        return self.score_ids(sequences, batch_size)

    @torch.no_grad()
    def score_ids(self, sequences: Sequence[Sequence[int]], batch_size: int = 8) -> list[float]:
        """The reward of each tokenized prompt + answer, `batch_size` sequences per forward."""
        was_training = self.training
        self.eval()
        device = self.head.weight.device
        scores: list[float] = []
        for first in range(0, len(sequences), batch_size):
            batch = pad_sequences(sequences[first : first + batch_size]).to(device)
            scores.extend(self(batch).tolist())
        self.train(was_training)
        return scores

    @staticmethod
    def build(path: str | os.PathLike, device: str | torch.device | None = None) -> RewardModel:
        """Load a reward model saved by `llama2 align rm` (its run folder) for scoring.

        Raises:
            Llama2Error: not a reward model folder, or files that do not fit together.
        """
        from ..train.config import TrainConfig
        from ..train.lora import load_adapters
        from ..train.model_setup import load_training_model

        folder = Path(path)
        described = read_reward_config(folder)
        device = torch.device(device or "cpu")
        if (folder / "final").exists():
            loaded = load_training_model(TrainConfig(model=str(folder / "final")), device)
        elif described["lora"] and (folder / "adapter").is_dir():
            loaded = load_training_model(TrainConfig(model=described["base_model"]), device)
            load_adapters(loaded.model, folder / "adapter")
        else:
            raise Llama2Error(f"{folder}: no final/ model or adapter/ folder to build the reward model from")
        chat_format = resolve_chat_format(loaded.tokenizer, loaded.chat_template, described.get("chat_format"))
        head = ScalarHead(loaded.args.dim, device)
        head.load_state_dict(_read_head(folder, loaded.args.dim))
        model = RewardModel(loaded.model, head, chat_format)
        model.eval()
        return model


def read_reward_config(folder: Path) -> dict:
    path = folder / REWARD_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Llama2Error(
            f"{folder}: not a reward model (no {REWARD_CONFIG}; train one with `llama2 align rm`)"
        ) from None
    except (OSError, json.JSONDecodeError) as error:
        raise Llama2Error(f"{path}: unreadable ({error})") from None


def _read_head(folder: Path, dim: int) -> dict[str, torch.Tensor]:
    path = folder / REWARD_HEAD
    if not path.is_file():
        raise Llama2Error(f"{path}: no such reward head file")
    tensors = load_file(str(path))
    if tensors.keys() != {"weight", "bias"} or tuple(tensors["weight"].shape) != (1, dim):
        raise Llama2Error(f"{path}: not a reward head for a model of dimension {dim}")
    return tensors


def save_reward_head(folder: Path, head: dict[str, torch.Tensor], description: dict) -> None:
    """Write the head and `reward_model.json` into a run folder, each file atomically."""
    from ..weights.common import atomic_output

    with atomic_output(folder / REWARD_HEAD) as temp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in head.items()}, str(temp))
    with atomic_output(folder / REWARD_CONFIG) as temp:
        temp.write_text(json.dumps(description, indent=1), encoding="utf-8")
