"""Accuracy with its standard error, and paired comparison of two models on the same items."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import Llama2Error

BOOTSTRAP_SEED = 1234
BOOTSTRAP_RESAMPLES = 10_000


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error, sample standard deviation / sqrt(n) (lm-evaluation-harness's `mean_stderr`)."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def mcnemar_exact_p(b_only: int, a_only: int) -> float:
    """Two-sided exact McNemar test: P of a split of the discordant pairs at least this uneven under 50/50."""
    n = b_only + a_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b_only, a_only) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedComparison:
    """Two models' per-item outcomes (1 = the metric's event: correct, violation, refusal) on shared items.

    Attributes:
        items: items both were scored on.
        rate_a, rate_b: the metric (mean outcome) of each.
        difference: rate_b - rate_a.
        ci_low, ci_high: percentile bootstrap interval of the difference (items resampled in pairs).
        confidence: the interval's level.
        agreement: fraction of items with the same outcome.
        a_only: items whose outcome is 1 for A only (flips from A to B: 1 -> 0).
        b_only: items whose outcome is 1 for B only (flips 0 -> 1).
        mcnemar_p: exact McNemar p-value of the flips.
        seed, resamples: the bootstrap's.
    """

    items: int
    rate_a: float
    rate_b: float
    difference: float
    ci_low: float
    ci_high: float
    confidence: float
    agreement: float
    a_only: int
    b_only: int
    mcnemar_p: float
    seed: int
    resamples: int

    def to_dict(self) -> dict:
        return asdict(self)


def paired_comparison(
    a: Sequence[bool],
    b: Sequence[bool],
    seed: int = BOOTSTRAP_SEED,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = 0.95,
) -> PairedComparison:
    """Agreement, flips, McNemar's test and a paired bootstrap interval of mean(b) - mean(a).

    Each resample draws len(a) item indices with replacement (numpy's PCG64 seeded with
    `seed`) and takes the difference of the two means over them; the interval is that
    distribution's (1 - confidence) / 2 and (1 + confidence) / 2 percentiles.
    """
    if len(a) != len(b):
        raise Llama2Error(f"paired outcomes differ in length: {len(a)} and {len(b)}")
    if not a:
        raise Llama2Error("no shared items to compare")
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    index = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    differences = (y[index] - x[index]).mean(axis=1)
    low, high = np.percentile(differences, [50 * (1 - confidence), 50 * (1 + confidence)])
    a_only = int(((x == 1) & (y == 0)).sum())
    b_only = int(((x == 0) & (y == 1)).sum())
    return PairedComparison(
        items=len(x),
        rate_a=float(x.mean()),
        rate_b=float(y.mean()),
        difference=float(y.mean() - x.mean()),
        ci_low=float(low),
        ci_high=float(high),
        confidence=confidence,
        agreement=float((x == y).mean()),
        a_only=a_only,
        b_only=b_only,
        mcnemar_p=mcnemar_exact_p(b_only, a_only),
        seed=seed,
        resamples=resamples,
    )
