"""Loss terms by hand, gradient blocking of the clip, KL estimators, masked reductions."""

from __future__ import annotations

import math

import pytest
import torch

from cliprail.ppo import (
    AdaptiveKLController,
    ZieglerKLController,
    clipped_surrogate,
    entropy_bonus,
    explained_variance,
    kl_estimate,
    kl_penalized_surrogate,
    masked_mean,
    masked_whiten,
    plain_surrogate,
    value_loss,
)


def test_clipped_surrogate_by_hand():
    eps = 0.2
    ratios = torch.tensor([0.5, 0.9, 1.1, 1.5, 0.5, 1.5])
    adv = torch.tensor([1.0, 1.0, -2.0, 2.0, -1.0, -1.0])
    logp = torch.log(ratios).requires_grad_()
    loss, stats = clipped_surrogate(logp, torch.zeros(6), adv, clip_range=eps)
    # min(r A, clip(r) A) per sample:
    #  r=.5,A=1: min(.5, .8)=.5 | r=.9,A=1: .9 | r=1.1,A=-2: min(-2.2,-2.2)=-2.2
    #  r=1.5,A=2: min(3, 2.4)=2.4 | r=.5,A=-1: min(-.5,-.8)=-.8 | r=1.5,A=-1: min(-1.5,-1.2)=-1.5
    expected = -(0.5 + 0.9 - 2.2 + 2.4 - 0.8 - 1.5) / 6
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(4 / 6)  # |r-1| > .2: .5, 1.5, .5, 1.5
    assert stats["ratio_min"].item() == pytest.approx(0.5)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    loss.backward()
    grad = logp.grad
    # d/dlogp of -(r A)/6 = -r A / 6 where unclipped is active, 0 where the clip binds.
    assert grad[0].item() == pytest.approx(-0.5 / 6)  # A>0, r below the range: still pushed up
    assert grad[3].item() == 0.0  # A>0, r > 1+eps: no incentive to go further
    assert grad[4].item() == 0.0  # A<0, r < 1-eps: no incentive to go further
    assert grad[5].item() == pytest.approx(1.5 / 6)  # A<0, r above the range: pulled back down


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_zero_gradient_exactly_where_clip_blocks(sign):
    eps = 0.1
    ratios = torch.linspace(0.5, 1.5, 101)
    logp = torch.log(ratios).requires_grad_()
    adv = torch.full((101,), sign)
    loss, _ = clipped_surrogate(logp, torch.zeros(101), adv, clip_range=eps)
    loss.backward()
    blocked = ratios > 1 + eps if sign > 0 else ratios < 1 - eps
    assert (logp.grad[blocked] == 0).all()
    assert (logp.grad[~blocked] != 0).all()


def test_ratio_one_gives_zero_clip_fraction_and_kl():
    logp = torch.randn(50)
    _, stats = clipped_surrogate(logp, logp.clone(), torch.randn(50), clip_range=0.2)
    assert stats["clip_fraction"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert stats["ratio_mean"].item() == 1.0


def test_masked_entries_ignored_even_if_nan():
    logp = torch.tensor([0.1, float("nan"), -0.2])
    adv = torch.tensor([1.0, float("inf"), -1.0])
    mask = torch.tensor([True, False, True])
    loss, stats = clipped_surrogate(logp, torch.zeros(3), adv, mask, clip_range=0.2)
    ref, ref_stats = clipped_surrogate(logp[mask], torch.zeros(2), adv[mask], clip_range=0.2)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref)
    for k in ref_stats:
        torch.testing.assert_close(stats[k], ref_stats[k])


def test_plain_and_kl_penalized_surrogates():
    logp = torch.log(torch.tensor([2.0, 0.5]))
    adv = torch.tensor([1.0, 1.0])
    loss, _ = plain_surrogate(logp, torch.zeros(2), adv)
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 2)
    loss_kl, _ = kl_penalized_surrogate(logp, torch.zeros(2), adv, beta=0.5)
    k3 = torch.tensor([(2 - 1) - math.log(2), (0.5 - 1) - math.log(0.5)])
    assert loss_kl.item() == pytest.approx(-(2.5 - 0.5 * k3.sum().item()) / 2)


def test_value_loss_unclipped_and_clipped():
    v = torch.tensor([1.0, 3.0])
    old = torch.tensor([0.0, 0.0])
    ret = torch.tensor([0.0, 4.0])
    loss, _ = value_loss(v, old, ret)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    # clip 0.5: v_clip = [0.5, 0.5]; errors max((1)^2,(0.5)^2)=1, max(1, 3.5^2)=12.25
    loss_c, stats = value_loss(v, old, ret, clip_range=0.5)
    assert loss_c.item() == pytest.approx(0.5 * (1.0 + 12.25) / 2)
    assert stats["value_clip_fraction"].item() == 1.0


def test_entropy_bonus_masked():
    ent, stats = entropy_bonus(torch.tensor([1.0, 2.0, 100.0]), torch.tensor([1, 1, 0]))
    assert ent.item() == pytest.approx(1.5)
    assert stats["entropy"].item() == pytest.approx(1.5)


def test_kl_estimators_against_closed_form():
    # KL(q || p) for two Gaussians, by Monte Carlo from q, against the closed form.
    g = torch.Generator().manual_seed(0)
    q = torch.distributions.Normal(0.0, 1.0)
    p = torch.distributions.Normal(0.3, 1.2)
    x = q.mean + q.stddev * torch.randn(400_000, generator=g, dtype=torch.float64)
    exact = torch.distributions.kl_divergence(q, p).item()
    lp, lq = p.log_prob(x), q.log_prob(x)
    k1 = kl_estimate(lp, lq, "k1").mean().item()
    k3 = kl_estimate(lp, lq, "k3")
    assert k1 == pytest.approx(exact, rel=0.03)
    assert k3.mean().item() == pytest.approx(exact, rel=0.03)
    assert (k3 >= 0).all()  # k3 never negative; k1 is, per sample
    assert (kl_estimate(lp, lq, "k1") < 0).any()
    # k2 is never negative but biased: further from the truth than k3 here
    k2 = kl_estimate(lp, lq, "k2")
    assert (k2 >= 0).all()
    assert abs(k2.mean().item() - exact) > 5 * abs(k3.mean().item() - exact)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(lp, lq, "k9")


def test_adaptive_kl_controller_rule():
    ctl = AdaptiveKLController(beta=1.0, target=0.01)
    assert ctl.update(0.001) == 0.5  # below d_targ / 1.5: halve
    assert ctl.update(0.01) == 0.5  # inside the band: keep
    assert ctl.update(0.1) == 1.0  # above 1.5 d_targ: double


def test_ziegler_controller():
    ctl = ZieglerKLController(beta=0.1, target=6.0, horizon=10_000)
    ctl.update(12.0, n_steps=100)  # error clipped to +0.2
    assert ctl.beta == pytest.approx(0.1 * (1 + 0.2 * 100 / 10_000))
    ctl2 = ZieglerKLController(beta=0.1, target=6.0, horizon=10_000)
    ctl2.update(5.4, n_steps=100)  # error -0.1
    assert ctl2.beta == pytest.approx(0.1 * (1 - 0.1 * 100 / 10_000))


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 3.0], [5.0, float("nan")]])
    m = torch.tensor([[1, 1], [1, 0]])
    assert masked_mean(x, m).item() == pytest.approx(3.0)
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0  # all masked: 0, not NaN
    w = masked_whiten(x, m)
    assert w[1, 1].item() == 0.0
    vals = w[m.bool()]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert vals.std().item() == pytest.approx(1.0, abs=1e-4)
    w2 = masked_whiten(torch.tensor([1.0, 2.0, 3.0]), shift_mean=False)
    assert w2.mean().item() == pytest.approx(2.0)


def test_explained_variance():
    ret = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(ret, ret).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), ret).item() == pytest.approx(0.0)
    assert math.isnan(explained_variance(ret, torch.ones(4)).item())
