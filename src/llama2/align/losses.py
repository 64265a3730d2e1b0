"""The objectives and estimators of the alignment stages, as small pure functions on tensors.

Conventions (stated once, used everywhere):

- reward-model scores are raw scalars; a score's probability is sigmoid(score), and the
  safety rule compares that probability with its threshold (0.15 in the paper);
- `whiten` uses the population variance (divide by n) and adds 1e-8 under the root;
- KL(policy || reference) per token: k1 = log pi - log pi_ref (unbiased, may be negative
  for one sample; it enters the reward), k3 = (r - 1) - log r with r = pi_ref / pi
  (unbiased and never negative; reported) (Schulman, "Approximating KL divergence");
- masked means average over the tokens where the mask is True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Llama 2's margin m(rating) for the ranking loss (Table 28 of the paper), by rating.
MARGIN_TABLES: dict[str, dict[str, float]] = {
    "small": {"significantly better": 1.0, "better": 2 / 3, "slightly better": 1 / 3, "negligibly better": 0.0},
    "large": {"significantly better": 3.0, "better": 2.0, "slightly better": 1.0, "negligibly better": 0.0},
    "none": {},
}
SAFETY_THRESHOLD = 0.15
LOGIT_EPS = 1e-6
WHITEN_EPS = 1e-8


def margin(rating: str | None, table: str) -> float:
    """m(rating) in a margin table ("small", "large", "none"); unrated pairs get 0."""
    return MARGIN_TABLES[table].get(rating, 0.0) if rating is not None else 0.0


def ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, margins: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per-pair binary ranking loss -log sigmoid(r_c - r_r - m) (Llama 2, eq. 2)."""
    return -F.logsigmoid(chosen - rejected - margins)


def centering_penalty(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair (r_c + r_r)^2: a small multiple of it keeps scores centered on 0 (Eisenstein et al. 2023)."""
    return (chosen + rejected) ** 2


def combined_reward(
    safety: torch.Tensor, helpfulness: torch.Tensor, safety_tagged: torch.Tensor, threshold: float = SAFETY_THRESHOLD
) -> torch.Tensor:
    """Llama 2's R_c: the safety RM's probability where the prompt is safety-tagged or it is
    strictly below `threshold`, else the helpfulness RM's (all probabilities, [B])."""
    use_safety = safety_tagged.bool() | (safety < threshold)
    return torch.where(use_safety, safety, helpfulness)


def logit(p: torch.Tensor, eps: float = LOGIT_EPS) -> torch.Tensor:
    """log(p / (1 - p)) with p clamped to [eps, 1 - eps] (finite for p = 0 or 1)."""
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def whiten(values: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries, population variance.

    With `shift_mean` False the mean is added back (the scale changes, not the center).
    """
    mask = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(variance + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is True (0 when nothing is)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimator of KL(policy || reference): log pi - log pi_ref."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator: (r - 1) - log r with r = pi_ref / pi; never negative."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position: [B, T, V] and [B, T] -> [B, T]."""
    return -F.cross_entropy(logits.transpose(1, 2).float(), tokens, reduction="none")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: [B, T, V] -> [B, T]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over answer tokens (Schulman et al. 2016).

    Args:
        rewards, values: [B, L] per answer token.
        mask: [B, L] True on answer tokens (a prefix of each row); the value after the
            last one is 0 (the episode ends there).

    Returns:
        (advantages, returns = advantages + values), zero where the mask is False.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t] * mask[:, t]
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, max(-A r, -A clip(r, 1 - eps, 1 + eps)), masked mean.

    Returns:
        (loss, fraction of tokens where the clipped term was chosen).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> torch.Tensor:
    """Clipped value loss, 0.5 max((v - R)^2, (clip(v, v_old +- eps) - R)^2), masked mean."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def dpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-pair DPO loss -log sigmoid(beta * ((c - c_ref) - (r - r_ref))) on summed answer log-probs."""
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))
