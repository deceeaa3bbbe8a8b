"""DPO / IPO loss by hand and at its closed-form optimum; best-of-n's pick and its KL."""

from __future__ import annotations

import math

import pytest
import torch

from cliprail.ppo import best_of_n_kl, best_of_n_kl_estimate, dpo_loss
from cliprail.rlhf.bestofn import pick_best

T = torch.tensor


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_loss_by_hand_and_gradient_sign():
    pc = T([-1.0, -3.0], requires_grad=True)
    pr = T([-2.0, -1.0], requires_grad=True)
    rc, rr = T([-1.5, -2.0]), T([-1.0, -1.5])
    # h = (pc - rc) - (pr - rr): [0.5 - (-1.0), -1.0 - 0.5] = [1.5, -1.5]
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.1)
    expected = (-math.log(_sigmoid(0.15)) - math.log(_sigmoid(-0.15))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # dL/dpc_i = -beta * sigmoid(-beta h_i) / B < 0: descent raises the chosen log-prob ...
    g_expected = T([-0.1 * _sigmoid(-0.15) / 2, -0.1 * _sigmoid(0.15) / 2])
    torch.testing.assert_close(pc.grad, g_expected)
    torch.testing.assert_close(pr.grad, -g_expected)  # ... and lowers the rejected one
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    assert stats["reward_accuracy"].item() == 0.5  # implicit rewards: 0.1*[0.5, -1] vs 0.1*[-1, .5]
    assert stats["rewards_chosen"].item() == pytest.approx(0.1 * (0.5 - 1.0) / 2)
    assert stats["reward_margin"].item() == pytest.approx(0.0, abs=1e-7)


def test_ipo_and_label_smoothing_by_hand():
    pc, pr, rc, rr = T([-1.0]), T([-2.0]), T([-1.5]), T([-1.0])  # h = 1.5
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx((1.5 - 1 / 0.2) ** 2)  # (h - 1/(2 beta))^2 = 12.25
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=2.0, label_smoothing=0.2)
    assert loss.item() == pytest.approx(-0.8 * math.log(_sigmoid(3.0)) - 0.2 * math.log(
        _sigmoid(-3.0)), rel=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge")  # type: ignore[arg-type]


@pytest.mark.parametrize("beta", [0.01, 1.0, 1000.0])
def test_policy_equal_to_reference_gives_log2_and_zero_rewards(beta):
    lp = torch.randn(5, generator=torch.Generator().manual_seed(0))
    lr = torch.randn(5, generator=torch.Generator().manual_seed(1))
    loss, stats = dpo_loss(lp, lr, lp.clone(), lr.clone(), beta=beta)
    assert loss.item() == pytest.approx(math.log(2.0))
    assert stats["rewards_chosen"].item() == 0.0 and stats["reward_accuracy"].item() == 0.0


def _dpo_optimum(beta: float, ref_logits: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Minimise DPO over a categorical policy, on every pair (i, j) with Bradley-Terry soft
    labels P(i > j) = sigmoid(r_i - r_j) (label smoothing = the flip probability)."""
    logits = ref_logits.clone().requires_grad_(True)
    ref_logp = torch.log_softmax(ref_logits, 0)
    opt = torch.optim.LBFGS([logits], lr=1, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")  # fmt: skip
    K = len(r)
    pairs = [(i, j) for i in range(K) for j in range(i + 1, K)]

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(logits, 0)
        loss = sum(
            dpo_loss(logp[i : i + 1], logp[j : j + 1], ref_logp[i : i + 1], ref_logp[j : j + 1],
                     beta=beta, label_smoothing=1 - _sigmoid(float(r[i] - r[j])))[0]
            for i, j in pairs
        )  # fmt: skip
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(logits.detach(), 0)


@pytest.mark.parametrize("beta", [0.5, 2.0, 1000.0])
def test_dpo_optimum_is_reference_tilted_by_reward_over_beta(beta):
    # Rafailov et al. 2023, eq. 4: pi* = pi_ref exp(r / beta) / Z; beta -> large: pi* -> pi_ref
    g = torch.Generator().manual_seed(3)
    ref_logits = torch.randn(4, generator=g, dtype=torch.float64)
    r = T([0.3, -0.2, 0.1, 0.0], dtype=torch.float64)  # BT rewards, |r_i - r_j| < 1
    pi = _dpo_optimum(beta, ref_logits, r)
    ref = torch.softmax(ref_logits, 0)
    closed = ref * torch.exp(r / beta)
    torch.testing.assert_close(pi, closed / closed.sum(), atol=1e-6, rtol=1e-5)
    kl = float((pi * (pi / ref).log()).sum())
    assert kl < (1e-7 if beta == 1000.0 else 1.0)


def test_pick_best_is_the_argmax_first_on_ties():
    scores = T([[0.1, 0.9, 0.3, 2.0], [1.0, 1.0, 0.5, 0.2], [-1.0, -2.0, -0.5, -3.0]])
    assert pick_best(scores, 4).tolist() == [3, 0, 2]
    assert pick_best(scores, 2).tolist() == [1, 0, 0]  # only the first two candidates count
    assert pick_best(scores, 1).tolist() == [0, 0, 0]


def test_best_of_n_analytic_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_best_of_n_kl_estimate_continuous_and_with_ties():
    g = torch.Generator().manual_seed(0)
    P, M, n = 3000, 400, 4
    cand = torch.randn(P, n, generator=g)
    chosen = cand.max(1).values
    pool = torch.randn(P, M, generator=g)
    est = float(best_of_n_kl_estimate(chosen, pool, n))
    assert est == pytest.approx(best_of_n_kl(n), abs=0.04)  # continuous: the formula holds
    # rewards 0 or 1 with probability 1/2 each; best-of-2 picks 1 with probability 3/4:
    # exact KL = 3/4 log(3/2) + 1/4 log(1/2) = 0.1308, below the formula's 0.1931
    cand = torch.randint(0, 2, (P, 2), generator=g).float()
    pool = torch.randint(0, 2, (P, M), generator=g).float()
    est = float(best_of_n_kl_estimate(cand.max(1).values, pool, 2))
    exact = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert est == pytest.approx(exact, abs=0.02)
    assert est < best_of_n_kl(2) - 0.04
