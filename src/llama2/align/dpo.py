"""Direct preference optimization (`llama2 align dpo`; Rafailov et al. 2023), beyond the Llama 2 paper.

The same preference data and batches as reward modeling; the loss is
-log sigmoid(beta * ((log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r)))) on the
answers' summed token log-probabilities. With LoRA the reference is the same weights with
the adapters switched off (no second copy); a fully trained policy keeps a frozen copy.
The held-out metric is the preference accuracy of the implicit reward beta * (log pi - log pi_ref).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..train.model_setup import prepare_model
from ..train.trainer import Trainer
from .batching import PaddedBatch
from .config import DPOConfig
from .losses import dpo_loss, token_logprobs
from .ppo import adapters_disabled, answer_mask
from .rm import (
    ACCURACY_PLOTS,
    PairBatch,
    RewardTrainer,
    flat_metrics,
    preference_metrics,
)


def answer_logprobs(model: nn.Module, batch: PaddedBatch, answer_starts: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities of each row's answer tokens [B] (either padding side)."""
    logits = model(batch.tokens, batch.positions, document_ids=batch.document_ids)
    logprobs = token_logprobs(logits[:, :-1], batch.tokens[:, 1:])  # [B, T - 1]
    starts = (batch.offsets + answer_starts).tolist()
    ends = (batch.offsets + batch.lengths).tolist()
    return (logprobs * answer_mask(starts, ends, batch.tokens.shape[1]).to(logprobs.device)).sum(1)


class DPOTrainer(RewardTrainer):
    """DPO with the trainer's loop on `RewardTrainer`'s preference data (see the module docstring)."""

    config: DPOConfig

    def prepare_model(self) -> nn.Module:
        self.reference = None
        if self.lora is None:  # a full policy needs its own frozen reference
            self.reference = copy.deepcopy(self.loaded.model).requires_grad_(False).eval()
        return prepare_model(self.loaded.model, self.config, self.env, self.bf16)

    @torch.no_grad()
    def _reference_logprobs(self, batch: PairBatch) -> torch.Tensor:
        if self.reference is not None:
            return answer_logprobs(self.reference, batch.padded, batch.answer_starts)
        with adapters_disabled(self.model):
            return answer_logprobs(self.model, batch.padded, batch.answer_starts)

    def _policy_and_reference(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return answer_logprobs(self.model, batch.padded, batch.answer_starts), self._reference_logprobs(batch)

    def compute_loss(self, batch: PairBatch) -> torch.Tensor:
        policy, reference = self._policy_and_reference(batch)  # [2n] each: chosen rows, then rejected
        chosen, rejected = policy.chunk(2)
        ref_chosen, ref_rejected = reference.chunk(2)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.config.beta).sum()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out DPO loss and preference accuracy of the implicit reward, per rating."""
        from .rm import collate_pairs

        self.model.eval()
        pairs, micro = self.val_rows, self.plan.micro_batch
        rewards: list[float] = []
        loss_sum = 0.0
        for first in range(0, len(pairs), micro):
            batch = collate_pairs(pairs[first : first + micro], "none").to(self.env.device)
            policy, reference = self._policy_and_reference(batch)
            implicit = self.config.beta * (policy - reference)
            rewards_chosen, rewards_rejected = implicit.chunk(2)
            loss_sum += dpo_loss(*policy.chunk(2), *reference.chunk(2), self.config.beta).sum().item()
            rewards.extend(zip(rewards_chosen.tolist(), rewards_rejected.tolist()))
        self.model.train()
        chosen, rejected = [c for c, _ in rewards], [r for _, r in rewards]
        metrics = preference_metrics(pairs, chosen, rejected, unsafe_threshold=0.0)
        metrics.pop("unsafe_precision", None), metrics.pop("unsafe_recall", None)
        return {"step": self.state["step"], "val_loss": loss_sum / len(pairs), **flat_metrics(metrics, "val_")}

    export = Trainer.export


def run_dpo(config: DPOConfig) -> dict:
    """Train with DPO (`config` resolved); returns the last metrics. Plots go to the run folder."""
    from .plots import SFT_PLOTS, run_stage

    return run_stage(DPOTrainer, config, {**SFT_PLOTS, **ACCURACY_PLOTS})
