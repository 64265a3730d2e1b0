"""Next-token selection: greedy, temperature, top-k, top-p (nucleus), repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import Llama2Error


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    Attributes:
        temperature: softmax temperature; 0 means greedy (argmax).
        top_p: keep the smallest set of tokens whose probability adds up to top_p.
        top_k: keep the k most likely tokens (0 keeps all).
        repetition_penalty: CTRL-style penalty (>1 discourages tokens already in the
            context: positive logits are divided by it, negative ones multiplied).
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise Llama2Error(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise Llama2Error(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise Llama2Error(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise Llama2Error(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise every token id that occurs in `context` ([B, T], negative ids ignored)."""
    if penalty == 1.0 or context.numel() == 0:
        return logits
    valid = (context >= 0).to(torch.int32)
    counts = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device)
    counts.scatter_add_(1, context.clamp(min=0), valid)  # padding adds 0
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Nucleus sampling as in Meta's reference code: probs [B, V] -> token ids [B]."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort = probs_sort.masked_fill(probs_sum - probs_sort > p, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, choice).squeeze(-1)


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    context: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick the next token of each row.

    Args:
        logits: [B, V] logits of the last position.
        params: sampling settings.
        generator: random generator (seeded for reproducible sampling).
        context: [B, T] ids seen so far, for the repetition penalty (-1 = padding).

    Returns:
        [B] token ids.
    """
    logits = logits.float()
    if context is not None:
        logits = apply_repetition_penalty(logits, context, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = top_k_filter(logits / params.temperature, params.top_k)
    probs = torch.softmax(logits, dim=-1)
    return sample_top_p(probs, params.top_p, generator)
