"""llama.cpp's `--kl-divergence` statistics of a model against a reference, computed in lockstep.

Both models forward the same llama.cpp chunk (see `llamacpp_windows`), one chunk after
the other, so no logits file is written. Per scored token (the second half of each chunk)
with reference probabilities P and model probabilities Q:

- KL(P || Q) = sum_v P(v) (ln P(v) - ln Q(v)) over the whole vocabulary,
- ln PPL(Q) - ln PPL(P) from the two per-token NLLs and their covariance,
- same top-1: argmax Q == argmax P (first index on ties, as llama.cpp),
- delta p = Q(token) - P(token); RMS delta p.

Uncertainties are llama.cpp's (`mean_and_uncertainty` with its 11-value minimum and
`covariance`). Unlike llama.cpp, whose logits file stores the reference log-probs as
16-bit codes and drops terms with ln P < -16, the reference log-probs here are exact
float64, so a model against itself gives a KL divergence of exactly 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..errors import Llama2Error
from .scoring import Moments, mean_and_uncertainty, target_nll, window_log_probs
from .windows import llamacpp_windows

MIN_COUNT = 11  # llama.cpp's mean_and_uncertainty gives no error below this many values


@dataclass
class KLDSums:
    """Running sums over scored tokens, as llama.cpp's kl_divergence_result keeps them."""

    nll: Moments = field(default_factory=Moments)
    nll_base: Moments = field(default_factory=Moments)
    nll_cross: float = 0.0
    kld: Moments = field(default_factory=Moments)
    p_diff: Moments = field(default_factory=Moments)
    p_diff_sq: Moments = field(default_factory=Moments)
    same_top: int = 0
    max_kld: float = 0.0

    def add(self, log_q: torch.Tensor, log_p: torch.Tensor, targets: list[int]) -> None:
        """Accumulate one chunk: model log-probs `log_q`, reference `log_p`, both [n, vocab] float64."""
        nll_q, nll_p = target_nll(log_q, targets), target_nll(log_p, targets)
        kld = (log_p.exp() * (log_p - log_q)).sum(dim=1)
        p_diff = torch.exp(-nll_q) - torch.exp(-nll_p)
        self.nll.add(nll_q)
        self.nll_base.add(nll_p)
        self.nll_cross += (nll_q * nll_p).sum().item()
        self.kld.add(kld)
        self.p_diff.add(p_diff)
        self.p_diff_sq.add(p_diff * p_diff)
        self.same_top += (log_q.argmax(dim=1) == log_p.argmax(dim=1)).sum().item()
        self.max_kld = max(self.max_kld, kld.max().item())


@dataclass
class KLDResult:
    """llama.cpp's KL-divergence report (values, then their +- standard errors)."""

    ctx: int
    chunks: int
    tokens_scored: int
    ppl: float
    ppl_error: float
    ppl_base: float
    ppl_base_error: float
    ln_ppl_ratio: float
    ln_ppl_ratio_error: float
    kld: float
    kld_error: float
    kld_max: float
    same_top: float
    same_top_error: float
    rms_dp: float
    rms_dp_error: float
    mean_dp: float
    mean_dp_error: float
    seconds: float

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def covariance(sum_a: float, sum_b: float, sum_ab: float, count: int) -> float:
    """llama.cpp's covariance of two means (0 below 10 values)."""
    if count < 10:
        return 0.0
    return (sum_ab / count - (sum_a / count) * (sum_b / count)) / (count - 1)


def summarize(sums: KLDSums, ctx: int, chunks: int, seconds: float) -> KLDResult:
    """The statistics llama.cpp prints from the running sums."""
    count = sums.nll.count
    log_ppl, log_ppl_err = sums.nll.mean_and_error(MIN_COUNT)
    log_base, log_base_err = sums.nll_base.mean_and_error(MIN_COUNT)
    cov = covariance(sums.nll.total, sums.nll_base.total, sums.nll_cross, count)
    ratio_err = math.sqrt(max(log_ppl_err**2 + log_base_err**2 - 2 * cov, 0.0))
    kld, kld_err = sums.kld.mean_and_error(MIN_COUNT)
    mse, mse_err = mean_and_uncertainty(sums.p_diff_sq.total, sums.p_diff_sq.total_sq, count, MIN_COUNT)
    rms = math.sqrt(mse)
    same = sums.same_top / count
    same_err = math.sqrt(same * (1 - same) / (count - 1)) if count > 1 else 0.0
    mean_dp, mean_dp_err = sums.p_diff.mean_and_error(MIN_COUNT)
    return KLDResult(
        ctx,
        chunks,
        count,
        math.exp(log_ppl),
        math.exp(log_ppl) * log_ppl_err,
        math.exp(log_base),
        math.exp(log_base) * log_base_err,
        log_ppl - log_base,
        ratio_err,
        kld,
        kld_err,
        sums.max_kld,
        same,
        same_err,
        rms,
        0.5 / rms * mse_err if rms > 0 else 0.0,
        mean_dp,
        mean_dp_err,
        seconds,
    )


def kl_divergence(model, reference, text: str, ctx: int = 512, batch_size: int = 1) -> KLDResult:
    """KL divergence of `model` from `reference` (both `Llama`) over llama.cpp's chunks of `text`.

    The text is tokenized by the reference's tokenizer (llama.cpp stores the base model's
    tokens in its logits file); both models must share the vocabulary.
    """
    if model.model.args.vocab_size != reference.model.args.vocab_size:
        raise Llama2Error(
            f"the models have different vocabularies ({model.model.args.vocab_size} and "
            f"{reference.model.args.vocab_size} tokens); KL divergence needs the same one"
        )
    if not text.strip():
        raise Llama2Error("the text is empty")
    tok = reference.tokenizer
    tokens = tok.encode(text, bos=tok.add_bos, eos=False)
    windows = llamacpp_windows(tokens, ctx, tok.bos_id if tok.add_bos and tok.bos_id >= 0 else None)
    sums = KLDSums()
    start = time.perf_counter()
    for i in range(0, len(windows), batch_size):  # lockstep: at most batch_size chunks of logits held
        group = windows[i : i + batch_size]
        for (window, log_q), (_, log_p) in zip(
            window_log_probs(model, group, batch_size), window_log_probs(reference, group, batch_size)
        ):
            sums.add(log_q, log_p, window.targets)
    return summarize(sums, ctx, len(windows), time.perf_counter() - start)
