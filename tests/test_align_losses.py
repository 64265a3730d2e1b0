"""The alignment objectives against values computed by hand (or by a formula written out here)."""

from __future__ import annotations

import math

import pytest
import torch

from llama2.align.losses import (
    MARGIN_TABLES,
    combined_reward,
    dpo_loss,
    gae,
    kl_k1,
    kl_k3,
    logit,
    margin,
    ppo_policy_loss,
    ranking_loss,
    value_loss,
    whiten,
)


@pytest.mark.parametrize(("m", "expected"), [(0.0, 0.31326), (1.0, 0.69315), (3.0, 2.12693)])
def test_ranking_loss_by_hand(m, expected):
    loss = ranking_loss(torch.tensor(2.0), torch.tensor(1.0), m)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_margin_tables_are_the_papers():
    ratings = ("significantly better", "better", "slightly better", "negligibly better")
    assert [margin(r, "small") for r in ratings] == pytest.approx([1, 2 / 3, 1 / 3, 0])
    assert [margin(r, "large") for r in ratings] == [3, 2, 1, 0]
    assert [margin(r, "none") for r in ratings] == [0, 0, 0, 0]
    assert margin(None, "large") == 0 and set(MARGIN_TABLES) == {"small", "large", "none"}


def test_combined_reward_rule_and_strict_threshold():
    safety = torch.tensor([0.10, 0.15, 0.15, 0.90, 0.149999])
    helpful = torch.tensor([0.7, 0.7, 0.7, 0.2, 0.7])
    tagged = torch.tensor([False, False, True, True, False])
    # 0.10 < 0.15: safety; exactly 0.15 untagged: helpfulness (strict); tagged: safety whatever its value.
    assert combined_reward(safety, helpful, tagged).tolist() == pytest.approx([0.10, 0.7, 0.15, 0.90, 0.149999])


def test_logit_clamps_to_finite_values():
    p = torch.tensor([0.5, 0.75, 0.0, 1.0], dtype=torch.float64)
    expected = [0.0, math.log(3), math.log(1e-6 / (1 - 1e-6)), math.log((1 - 1e-6) / 1e-6)]
    assert logit(p, eps=1e-6).tolist() == pytest.approx(expected, rel=1e-5)


def test_whiten_uses_the_population_variance():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, population variance ((1.5^2 + 0.5^2) * 2) / 4 = 1.25
    expected = [(v - 2.5) / math.sqrt(1.25 + 1e-8) for v in (1, 2, 3, 4)]
    assert whiten(values).tolist() == pytest.approx(expected, rel=1e-6)
    masked = whiten(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([True, True, False]))
    assert masked.tolist() == pytest.approx([-1.0, 1.0, 0.0], rel=1e-6)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.25)]), torch.tensor([math.log(0.25), math.log(0.5)])
    assert kl_k1(logp, ref).tolist() == pytest.approx([math.log(2), -math.log(2)])
    # k3 = (r - 1) - log r, r = ref / p: r = 0.5 and r = 2
    assert kl_k3(logp, ref).tolist() == pytest.approx([-0.5 + math.log(2), 1 - math.log(2)])
    assert kl_k1(logp, logp).abs().max() == 0 and kl_k3(logp, logp).abs().max() == 0


def direct_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V after the end = 0."""
    n = len(rewards)
    nxt = values[1:] + [0.0]
    deltas = [rewards[t] + gamma * nxt[t] - values[t] for t in range(n)]
    return [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n)) for t in range(n)]


def test_gae_against_the_direct_sum():
    rewards, values = [0.0, 0.0, 1.0], [0.5, 0.6, 0.7]
    advantages, returns = gae(
        torch.tensor([rewards]), torch.tensor([values]), torch.ones(1, 3, dtype=torch.bool), 1.0, 0.95
    )
    assert advantages[0].tolist() == pytest.approx([0.46575, 0.385, 0.3])
    assert advantages[0].tolist() == pytest.approx(direct_gae(rewards, values, 1.0, 0.95))
    assert returns[0].tolist() == pytest.approx([a + v for a, v in zip(advantages[0].tolist(), values)])
    # A row whose answer is two tokens long: the episode ends after its second token.
    short, _ = gae(
        torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([values]), torch.tensor([[True, True, False]]), 0.9, 0.8
    )
    assert short[0].tolist() == pytest.approx(direct_gae([0.0, 1.0], values[:2], 0.9, 0.8) + [0.0])


@pytest.mark.parametrize(
    ("advantage", "ratio", "expected_loss", "clipped"),
    [
        (1.0, 1.5, -1.2, 1.0),  # A > 0, r > 1 + eps: the gain is capped at (1 + eps) A
        (1.0, 0.5, -0.5, 0.0),  # A > 0, r < 1 - eps: the unclipped (worse) term counts
        (-1.0, 1.5, 1.5, 0.0),  # A < 0, r > 1 + eps: the unclipped (worse) term counts
        (-1.0, 0.5, 0.8, 1.0),  # A < 0, r < 1 - eps: capped at (1 - eps) |A|
        (2.0, 1.1, -2.2, 0.0),  # inside the trust region: plain ratio * A
    ],
)
def test_clipped_ppo_loss(advantage, ratio, expected_loss, clipped):
    old = torch.zeros(1, 1)
    loss, fraction = ppo_policy_loss(old + math.log(ratio), old, torch.tensor([[advantage]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert fraction.item() == clipped


def test_value_loss_takes_the_worse_of_clipped_and_unclipped():
    # v = 1.0, old = 0.0, R = 1.0: unclipped error 0, clipped v' = 0.2 -> (0.8)^2; 0.5 * 0.64
    loss = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.32)


def test_dpo_loss_by_hand():
    # beta ((−1 − (−1.5)) − (−2 − (−1.5))) = 0.1 * 1.0; −log sigmoid(0.1) = 0.644397
    loss = dpo_loss(torch.tensor(-1.0), torch.tensor(-2.0), torch.tensor(-1.5), torch.tensor(-1.5), beta=0.1)
    assert loss.item() == pytest.approx(0.644397, abs=1e-6)
