"""Accuracy's standard error and the paired comparison of two models, against textbook formulas."""

import math
import statistics

import pytest

from llama2.errors import Llama2Error
from llama2.eval.stats import mcnemar_exact_p, mean_and_stderr, paired_comparison


def test_mean_and_stderr_is_the_sample_standard_error():
    values = [1, 0, 1, 1, 0, 1, 1, 1]
    mean, stderr = mean_and_stderr(values)
    assert mean == pytest.approx(statistics.fmean(values))
    assert stderr == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert mean_and_stderr([1]) == (1.0, 0.0)
    assert mean_and_stderr([]) == (0.0, 0.0)


def test_mcnemar_exact_p_is_the_two_sided_binomial_tail():
    # 5 discordant pairs all one way: 2 * 0.5**5; 1 of 6 the other way: 2 * (1 + 6) / 64.
    assert mcnemar_exact_p(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_exact_p(1, 5) == pytest.approx(2 * 7 / 64)
    assert mcnemar_exact_p(3, 3) == 1.0
    assert mcnemar_exact_p(0, 0) == 1.0


def test_paired_comparison_counts_agreement_and_flips():
    a = [1, 1, 1, 0, 0, 1, 0, 1, 1, 0]
    b = [1, 0, 1, 1, 1, 1, 0, 1, 0, 0]
    c = paired_comparison(a, b)
    # by hand: items 1 and 8 flip 1 -> 0, items 3 and 4 flip 0 -> 1; 6 of 10 agree
    assert (c.items, c.a_only, c.b_only, c.agreement) == (10, 2, 2, 0.6)
    assert (c.rate_a, c.rate_b, c.difference) == (0.6, 0.6, 0.0)
    assert c.ci_low <= 0.0 <= c.ci_high
    assert c.mcnemar_p == 1.0


def test_paired_bootstrap_is_seeded_and_close_to_the_normal_interval():
    """With many items, the percentile interval approaches mean(d) +- 1.96 sd(d) / sqrt(n) of the paired d = b - a."""
    a = [(k * 7) % 10 < 6 for k in range(2000)]  # 60%
    b = [(k * 7) % 10 < 7 for k in range(1000)] + [(k * 3) % 10 < 6 for k in range(1000)]
    first, again = paired_comparison(a, b), paired_comparison(a, b)
    assert first == again
    assert paired_comparison(a, b, seed=7) != first
    d = [float(y) - float(x) for x, y in zip(a, b)]
    half = 1.96 * statistics.stdev(d) / math.sqrt(len(d))
    assert first.difference == pytest.approx(statistics.fmean(d))
    assert first.ci_low == pytest.approx(first.difference - half, abs=0.003)
    assert first.ci_high == pytest.approx(first.difference + half, abs=0.003)


def test_paired_comparison_needs_paired_items():
    with pytest.raises(Llama2Error, match="differ in length"):
        paired_comparison([1, 0], [1])
    with pytest.raises(Llama2Error, match="no shared items"):
        paired_comparison([], [])
