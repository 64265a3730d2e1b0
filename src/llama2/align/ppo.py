"""PPO with Llama 2's reward (`llama2 align ppo`), section 3.2.3 of the paper.

One iteration (one trainer step):

1. rollout: `batch_size` prompts are answered by the policy through the batched engine
   (`Llama` around the training model: the answers come from exactly the weights trained);
2. reward: R_c (the safety RM where the prompt is safety-tagged or its probability is
   below 0.15, else the helpfulness RM), score = whiten(logit(R_c)) over the batch, minus
   `missing_eos_penalty` for answers cut at `max_gen_len`; per answer token the reward is
   -beta * k1 with k1 = log pi - log pi_ref, and the score is added on the last answer token;
3. advantages by GAE on a value head that shares the policy's trunk, whitened over the
   batch's answer tokens;
4. `ppo_epochs` optimizer steps on the clipped surrogate plus the clipped value loss.

With a LoRA policy the reference is the same weights with the adapters switched off (no
second copy); a fully trained policy keeps one frozen copy. The KL is exactly 0 at step 0.
Reported per iteration: reward (mean R_c), kl (k1 summed per answer, mean over answers),
kl_k3 (the never-negative estimator), entropy, clip_fraction, value_loss, response_length,
eos_rate, and with --val-data the mean R_c of greedy answers to the held-out prompts.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..chat import resolve_chat_format
from ..train.lora import LoRALinear
from ..train.model_setup import prepare_model
from ..train.trainer import Trainer
from .batching import PaddedBatch, pad_sequences
from .config import PPOConfig
from .heads import ScalarHead, export_backbone, forward_with_hidden, shard_wrapper
from .losses import (
    entropy,
    gae,
    kl_k1,
    kl_k3,
    logit,
    masked_mean,
    ppo_policy_loss,
    token_logprobs,
    value_loss,
    whiten,
)
from .preferences import Prompt, read_prompts
from .rewards import CombinedReward, load_reward
from .sampling import Answer, closing_id, policy_sampler, sample_answers

PPO_PLOTS = {
    "reward": ("reward", "val_reward"),
    "kl": ("kl", "kl_k3"),
    "ppo": ("clip_fraction", "entropy", "eos_rate"),
    "value_loss": ("value_loss",),
    "response_length": ("response_length",),
}


class PolicyWithValue(nn.Module):
    """The policy (`backbone`) and a value head on its final hidden states."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, batch: PaddedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, T, V], values [B, T])."""
        logits, hidden = forward_with_hidden(self.backbone, batch)
        return logits, self.head(hidden)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The model with every LoRA update scaled by 0 (exactly the frozen base) inside the block."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    scales = [layer.scale for layer in layers]
    for layer in layers:
        layer.scale = 0.0
    try:
        yield model
    finally:
        for layer, scale in zip(layers, scales):
            layer.scale = scale


def answer_mask(prompt_lengths: Sequence[int], lengths: Sequence[int], width: int) -> torch.Tensor:
    """[B, width - 1] True where position p - 1 predicts answer token p (prompt_len <= p < len)."""
    predicted = torch.arange(1, width).unsqueeze(0)  # [1, width - 1]: the token each position predicts
    starts = torch.tensor(prompt_lengths).unsqueeze(1)
    ends = torch.tensor(lengths).unsqueeze(1)
    return (predicted >= starts) & (predicted < ends)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per answer token -beta * kl, plus each answer's score on its last token: [B], [B, L] -> [B, L]."""
    rewards = -beta * kl * mask
    last = mask.long().cumsum(1).argmax(1)  # the index of each row's last True
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


@dataclass
class Rollout:
    """A batch of answered prompts with what PPO needs; tensors [B, T - 1] on the answer grid."""

    batch: PaddedBatch
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    stats: dict


class PPOTrainer(Trainer):
    """PPO with the trainer's loop, checkpoints and exact resume (see the module docstring).

    Args:
        config: a resolved `PPOConfig`.
        reward: the reward (default: loaded from `config.reward_model` / `safety_reward_model`).
    """

    config: PPOConfig

    def __init__(self, config: PPOConfig, env=None, callbacks=(), reward: CombinedReward | None = None):
        self.reward = reward
        self.reference = None
        super().__init__(config, env, callbacks)

    # ------------------------------------------------------------------ setup

    def _load_data(self) -> tuple[list[Prompt], list[Prompt] | None]:
        config = self.config
        self.chat_format = resolve_chat_format(self.loaded.tokenizer, self.loaded.chat_template, config.chat_format)
        self.closing_id = closing_id(self.chat_format)
        if self.reward is None:
            self.reward = load_reward(
                config.reward_model, config.safety_reward_model, config.safety_threshold, self.env.device
            )
        prompts = [p for path in config.data for p in read_prompts(path)]
        val = [p for path in config.val_data for p in read_prompts(path)]
        return prompts, val or None

    def prepare_model(self) -> nn.Module:
        if self.lora is None:  # a full policy needs its own frozen reference
            self.reference = copy.deepcopy(self.loaded.model).requires_grad_(False).eval()
        backbone = prepare_model(self.loaded.model, self.config, self.env, self.bf16)
        return shard_wrapper(PolicyWithValue(backbone, ScalarHead(self.loaded.args.dim, self.env.device)), self.env)

    # ------------------------------------------------------------------ rollout

    def _step_prompts(self) -> list[Prompt]:
        indices = [k for rows in self.plan.micro_batches(self.state["samples_seen"]) for k in rows]
        return [self.train_rows[self.sampler.row(k)] for k in indices]

    def _answers(self, prompts: Sequence[Prompt], temperature: float, seed: int) -> list[Answer]:
        config = self.config
        batch_rows = min(len(prompts), config.sample_batch_size)
        with (
            torch.no_grad(),
            policy_sampler(
                self.model.backbone, self.loaded.tokenizer, self.chat_format, self.seq_len, batch_rows, seed
            ) as llama,
        ):
            groups = sample_answers(
                llama, [p.dialog for p in prompts], 1, config.max_gen_len, temperature, config.top_p, seed
            )
        return [group[0] for group in groups]

    def _sequences(self, prompts: Sequence[Prompt], answers: Sequence[Answer]) -> tuple[list[list[int]], list[int]]:
        """Prompt + answer ids (closed by the format's end-of-turn token when the answer finished)."""
        prompt_ids = [self.chat_format.encode_dialog_prompt(p.dialog) for p in prompts]
        sequences = [p + a.ids + ([self.closing_id] if a.finished else []) for p, a in zip(prompt_ids, answers)]
        return sequences, [len(p) for p in prompt_ids]

    @torch.no_grad()
    def _logprobs_and_values(self, batch: PaddedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(policy log-probs, values, reference log-probs), [B, T - 1] each, in eval mode (no dropout)."""
        self.model.eval()
        with self._autocast():
            logits, values = self.model(batch)
            logprobs = token_logprobs(logits[:, :-1], batch.tokens[:, 1:])
            if self.reference is not None:
                ref_logits = self.reference(batch.tokens, batch.positions, document_ids=batch.document_ids)
            else:
                with adapters_disabled(self.model.backbone):
                    ref_logits, _ = self.model(batch)
            ref_logprobs = token_logprobs(ref_logits[:, :-1], batch.tokens[:, 1:])
        self.model.train()
        return logprobs, values[:, :-1].float(), ref_logprobs

    def rollout(self, prompts: Sequence[Prompt], step: int) -> Rollout:
        """Answer, score and evaluate `prompts` with the current policy (see the module docstring)."""
        config, device = self.config, self.env.device
        answers = self._answers(prompts, config.temperature, seed=config.seed + 7919 * step + self.env.rank)
        probabilities = self.reward(prompts, [a.text for a in answers]).to(device)
        finished = torch.tensor([a.finished for a in answers], device=device)
        scores = logit(probabilities)
        if config.whiten_scores:
            scores = whiten(scores)
        scores = scores - config.missing_eos_penalty * (~finished).float()

        sequences, prompt_lengths = self._sequences(prompts, answers)
        batch = pad_sequences(sequences).to(device)
        mask = answer_mask(prompt_lengths, [len(s) for s in sequences], batch.tokens.shape[1]).to(device)
        logprobs, values, ref_logprobs = self._logprobs_and_values(batch)
        k1 = kl_k1(logprobs, ref_logprobs) * mask
        k3 = kl_k3(logprobs, ref_logprobs) * mask
        rewards = token_rewards(scores, k1, mask, config.beta)
        advantages, returns = gae(rewards, values * mask, mask, config.gamma, config.lam)
        advantages = whiten(advantages, mask)
        stats = {
            "reward": probabilities.mean().item(),
            "score": scores.mean().item(),
            "kl": k1.sum(1).mean().item(),
            "kl_k3": k3.sum(1).mean().item(),
            "response_length": mask.sum(1).float().mean().item(),
            "eos_rate": finished.float().mean().item(),
        }
        return Rollout(batch, mask, logprobs, values, advantages, returns, stats)

    # ------------------------------------------------------------------ optimization

    def optimize(self, rollout: Rollout) -> dict:
        """One optimizer step on the rollout's answers (micro-batches of rows, token-weighted)."""
        config, micro = self.config, self.plan.micro_batch
        total = rollout.mask.sum().clamp(min=1)
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "entropy": 0.0}
        chunks = [slice(first, first + micro) for first in range(0, rollout.mask.shape[0], micro)]
        for i, rows in enumerate(chunks):
            self._sync_gradients(last=i == len(chunks) - 1)
            batch = PaddedBatch(
                *(
                    t[rows]
                    for t in (
                        rollout.batch.tokens,
                        rollout.batch.positions,
                        rollout.batch.document_ids,
                        rollout.batch.real,
                        rollout.batch.offsets,
                        rollout.batch.lengths,
                    )
                )
            )
            mask = rollout.mask[rows]
            with self._autocast():
                logits, values = self.model(batch)
                logprobs = token_logprobs(logits[:, :-1], batch.tokens[:, 1:])
                policy_loss, clipped = ppo_policy_loss(
                    logprobs, rollout.old_logprobs[rows], rollout.advantages[rows], mask, config.clip
                )
                v_loss = value_loss(
                    values[:, :-1].float(), rollout.old_values[rows], rollout.returns[rows], mask, config.clip
                )
            weight = mask.sum() / total
            ((policy_loss + config.value_coef * v_loss) * weight).backward()
            sums["policy_loss"] += (policy_loss * weight).item()
            sums["value_loss"] += (v_loss * weight).item()
            sums["clip_fraction"] += (clipped * weight).item()
            sums["entropy"] += (masked_mean(entropy(logits[:, :-1].detach()), mask) * weight).item()
        sums["grad_norm"] = self._clip_gradients()
        sums["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums

    def train_step(self, step: int) -> dict:
        """One PPO iteration: a rollout, then `ppo_epochs` optimizer steps on it."""
        start = time.perf_counter()
        rollout = self.rollout(self._step_prompts(), step)
        for _ in range(self.config.ppo_epochs):
            stats = self.optimize(rollout)
        seconds = time.perf_counter() - start
        tokens = int(rollout.batch.lengths.sum())
        self.state["step"] = step + 1
        self.state["samples_seen"] += self.config.batch_size
        self.state["tokens_seen"] += tokens
        self.state["elapsed_s"] += seconds
        return {
            "step": step + 1,
            **rollout.stats,
            **stats,
            "loss": stats["policy_loss"] + self.config.value_coef * stats["value_loss"],
            "tokens_per_s": tokens / seconds,
            "step_time_s": seconds,
            "elapsed_s": self.state["elapsed_s"],
        }

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean R_c and EOS rate of greedy answers to the held-out prompts."""
        prompts = self.val_rows
        answers = self._answers(prompts, temperature=0.0, seed=self.config.seed)
        rewards = self.reward(prompts, [a.text for a in answers])
        eos = sum(a.finished for a in answers) / len(answers)
        return {"step": self.state["step"], "val_reward": rewards.mean().item(), "val_eos_rate": eos}

    def export(self):
        """The policy (adapters merged; the value head left out) to final/, adapters to adapter/."""
        written, _ = export_backbone(self, self.output_dir / "final")
        return written


def run_ppo(config: PPOConfig, reward: CombinedReward | None = None) -> dict:
    """Run PPO with `config` (resolved); returns the last metrics. Plots go to the run folder."""
    from .plots import run_stage

    return run_stage(PPOTrainer, config, PPO_PLOTS, reward=reward)
