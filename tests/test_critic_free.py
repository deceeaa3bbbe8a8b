"""Critic-free advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++), loss aggregation and its length
bias, clip-higher, dual-clip, GSPO's sequence ratio, and the KL term in the loss: each against
hand computation and a loop reference (issue 16)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from cliprail.ppo import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    clipped_surrogate,
    group_relative_advantages,
    kl_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_variance_groups,
)

# --- group-relative advantages ------------------------------------------------------------


def _grpo_loop(scores, mask, scale, eps=1e-4):
    """Reference: a Python loop over groups with the statistics module."""
    n, g = scores.shape
    batch = [scores[i, j].item() for i in range(n) for j in range(g) if mask[i, j]]
    batch_std = statistics.stdev(batch) if len(batch) > 1 else 0.0
    out = torch.zeros(n, g, dtype=torch.float64)
    for i in range(n):
        vals = [scores[i, j].item() for j in range(g) if mask[i, j]]
        if len(vals) < 2:
            continue
        mean = sum(vals) / len(vals)
        std = statistics.stdev(vals)
        for j in range(g):
            if mask[i, j]:
                c = scores[i, j].item() - mean
                out[i, j] = {"group": c / (std + eps), "batch": c / (batch_std + eps), "none": c}[
                    scale
                ]
    return out


def test_grpo_by_hand():
    scores = torch.tensor([[1.0, 3.0, 5.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    adv = group_relative_advantages(scores, scale="group", eps=0.0)
    # group 0: mean 3, sample std 2 -> (-1, 0, 1); group 1: every score alike -> 0, not NaN
    assert adv.tolist() == [[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    assert group_relative_advantages(scores, scale="none").tolist() == [
        [-2.0, 0.0, 2.0],
        [0.0, 0.0, 0.0],
    ]
    # batch std: statistics.stdev of all six scores
    sd = statistics.stdev([1, 3, 5, 2, 2, 2])
    assert group_relative_advantages(scores, scale="batch", eps=0.0)[0, 0].item() == (
        pytest.approx(-2.0 / sd)
    )


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_matches_loop_with_masks(scale):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(7, 5, generator=g) > 0.25
    mask[0] = False  # an empty group
    mask[1] = torch.tensor([True, False, False, False, False])  # a group of one
    scores[~mask] = float("nan")  # what sits in a dropped response must never leak
    adv = group_relative_advantages(scores, mask, scale=scale)
    torch.testing.assert_close(adv, _grpo_loop(scores, mask, scale))
    assert (adv[~mask] == 0).all() and (adv[1] == 0).all()


def test_grpo_group_means_are_zero_and_std_one():
    scores = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    adv = group_relative_advantages(scores, eps=0.0)
    torch.testing.assert_close(adv.mean(1), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(adv.std(1), torch.ones(4, dtype=torch.float64))


def test_dr_grpo_keeps_the_scale_that_grpo_divides_out():
    """Dr. GRPO's point: dividing by the group std up-weights near-unanimous groups. A group
    whose scores barely differ gets advantages of size ~1 under GRPO, ~0 under Dr. GRPO."""
    scores = torch.tensor([[0.0, 1.0], [0.50, 0.51]], dtype=torch.float64)
    grpo = group_relative_advantages(scores, eps=0.0)
    dr = group_relative_advantages(scores, scale="none")
    assert grpo[1].abs().tolist() == pytest.approx(grpo[0].abs().tolist())  # same weight
    assert dr[1].abs().max() < 0.01 < dr[0].abs().max()


# --- RLOO ---------------------------------------------------------------------------------


def test_rloo_by_hand_and_against_the_leave_one_out_loop():
    scores = torch.tensor([[1.0, 2.0, 6.0]], dtype=torch.float64)
    # baselines: mean(2, 6) = 4, mean(1, 6) = 3.5, mean(1, 2) = 1.5
    assert rloo_advantages(scores).tolist() == [[-3.0, -1.5, 4.5]]
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(6, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 4, generator=g) > 0.3
    mask[2] = torch.tensor([False, True, False, False])
    ref = torch.zeros_like(scores)
    for i in range(6):
        idx = [j for j in range(4) if mask[i, j]]
        for j in idx:
            others = [scores[i, k].item() for k in idx if k != j]
            if others:
                ref[i, j] = scores[i, j] - sum(others) / len(others)
    torch.testing.assert_close(rloo_advantages(scores, mask), ref)


def test_rloo_is_grpo_without_std_rescaled_by_g_over_g_minus_one():
    scores = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(
        rloo_advantages(scores), 4 / 3 * group_relative_advantages(scores, scale="none")
    )


def test_rloo_baseline_is_unbiased():
    """E[A_i grad log p(y_i)] equals the true policy gradient for a leave-one-out baseline: with
    r fixed per sample, E[A_i] = E[r_i] - E[r_j] = 0 in every group, exactly, for any scores."""
    scores = torch.tensor([[3.0, -1.0, 0.5, 7.0]])
    assert rloo_advantages(scores).sum().item() == pytest.approx(0.0, abs=1e-6)


# --- REINFORCE++ --------------------------------------------------------------------------


def test_reinforce_pp_returns_match_a_loop_and_whiten_over_the_batch():
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(4, 6, generator=g, dtype=torch.float64)
    lengths = [6, 3, 1, 4]
    mask = torch.tensor([[t < n for t in range(6)] for n in lengths])
    rewards[~mask] = float("nan")
    gamma = 0.9
    adv, ret = reinforce_pp_advantages(rewards, mask, gamma=gamma)
    ref = torch.zeros(4, 6, dtype=torch.float64)
    for b, n in enumerate(lengths):
        for t in range(n):
            ref[b, t] = sum(gamma ** (s - t) * rewards[b, s].item() for s in range(t, n))
    torch.testing.assert_close(ret, ref)
    vals = [ref[b, t].item() for b, n in enumerate(lengths) for t in range(n)]
    mu, sd = statistics.mean(vals), statistics.stdev(vals)
    torch.testing.assert_close(adv[mask], (ref[mask] - mu) / sd, rtol=1e-6, atol=1e-6)
    assert (adv[~mask] == 0).all()


# --- zero-variance groups ------------------------------------------------------------------


def test_zero_variance_groups():
    scores = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [2.0, 5.0, 2.0]])
    mask = torch.tensor([[True, True, True], [True, True, True], [True, False, True]])
    assert zero_variance_groups(scores, mask).tolist() == [True, False, True]
    assert zero_variance_groups(scores, mask, atol=10.0).all()
    # their GRPO advantages are all 0: nothing to learn from them
    adv = group_relative_advantages(scores, mask)
    assert (adv[zero_variance_groups(scores, mask)] == 0).all()


# --- loss aggregation and its length bias -------------------------------------------------


def test_aggregate_loss_by_hand():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 9.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert aggregate_loss(x, m, "token_mean").item() == pytest.approx(8 / 5)
    assert aggregate_loss(x, m, "seq_mean_token_mean").item() == pytest.approx((1 + 4) / 2)
    assert aggregate_loss(x, m, "seq_mean_token_sum_norm").item() == pytest.approx((4 + 4) / 8)
    assert aggregate_loss(x, m, "seq_mean_token_sum_norm", normaliser=8).item() == (
        pytest.approx((4 + 4) / 16)
    )
    # a fully masked sequence does not count toward the sequence mean
    m2 = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    assert aggregate_loss(x, m2, "seq_mean_token_mean").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(x, m, "mean")


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregate_loss_without_mask_and_on_1d(mode):
    x = torch.arange(6.0).reshape(2, 3)
    full = torch.ones(2, 3)
    assert aggregate_loss(x, None, mode).item() == pytest.approx(aggregate_loss(x, full, mode))
    assert aggregate_loss(x.flatten(), None, mode).item() == pytest.approx(2.5)


def _per_token_grads(mode, advantage):
    """Gradient of the surrogate on each token of a 2-token and an 8-token response with the
    same advantage (ratio 1, the first minibatch)."""
    mask = torch.zeros(2, 8)
    mask[0, :2] = 1
    mask[1, :] = 1
    logp = torch.zeros(2, 8, requires_grad=True)
    adv = torch.full((2, 8), advantage)
    loss, _ = clipped_surrogate(logp, torch.zeros(2, 8), adv, mask, loss_agg=mode)
    loss.backward()
    return logp.grad[0, 0].item(), logp.grad[1, 0].item()


def test_length_bias_of_the_per_sequence_mean():
    """DAPO section 3.3 and Dr. GRPO section 3.1: with the per-sequence token mean, each token of
    a short response gets a larger gradient than one of a long response with the same
    advantage. A correct (A > 0) short answer is reinforced 4x harder per token than a long
    one, and a wrong (A < 0) long answer is penalised 4x more weakly per token than a short
    one, so wrong answers drift longer. The token mean and Dr. GRPO's constant weigh every
    token alike."""
    for advantage in (1.0, -1.0):
        short, long_ = _per_token_grads("seq_mean_token_mean", advantage)
        assert short == pytest.approx(4 * long_)  # 1/(2*2) against 1/(2*8)
        for mode in ("token_mean", "seq_mean_token_sum_norm"):
            short, long_ = _per_token_grads(mode, advantage)
            assert short == pytest.approx(long_)


# --- clip-higher, dual-clip, sequence ratio -------------------------------------------------


def test_default_surrogate_is_unchanged_by_the_new_options():
    g = torch.Generator().manual_seed(5)
    logp, old = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    adv, mask = torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g) > 0.3
    base, s0 = clipped_surrogate(logp, old, adv, mask, clip_range=0.2)
    same, s1 = clipped_surrogate(logp, old, adv, mask, clip_range=0.2, clip_range_high=0.2)
    r = torch.exp(logp - old)
    ref = -torch.minimum(r * adv, r.clamp(0.8, 1.2) * adv)[mask].mean()
    assert base.item() == pytest.approx(ref.item(), rel=1e-6)
    assert same.item() == base.item() and s0["clip_fraction"] == s1["clip_fraction"]


def test_clip_higher_lets_positive_advantages_grow_further():
    ratios = torch.tensor([1.1, 1.25, 1.35, 0.7])
    logp = torch.log(ratios).requires_grad_()
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0])
    loss, stats = clipped_surrogate(logp, torch.zeros(4), adv, clip_range=0.2, clip_range_high=0.28)
    # objective per sample: 1.1 | 1.25 (inside 1.28) | 1.28 (clipped) | min(-.7, -.8) = -.8
    assert loss.item() == pytest.approx(-(1.1 + 1.25 + 1.28 - 0.8) / 4)
    loss.backward()
    assert logp.grad[1].item() == pytest.approx(-1.25 / 4)  # eps 0.2 alone would block this
    assert logp.grad[2].item() == 0.0 and logp.grad[3].item() == 0.0
    assert stats["clip_fraction"].item() == pytest.approx(2 / 4)  # 1.35 and 0.7


def test_dual_clip_bounds_negative_advantages():
    ratios = torch.tensor([5.0, 2.0, 5.0, 0.5])
    logp = torch.log(ratios).requires_grad_()
    adv = torch.tensor([-1.0, -1.0, 1.0, -1.0])
    loss, stats = clipped_surrogate(logp, torch.zeros(4), adv, clip_range=0.2, dual_clip=3.0)
    # A<0, r=5: min(-5, -1.2) = -5, bounded below by 3 * -1 = -3 | A<0, r=2: -2 (> -3, as is)
    # A>0, r=5: min(5, 1.2) = 1.2 (dual-clip only touches A<0) | A<0, r=.5: min(-.5, -.8) = -.8
    assert loss.item() == pytest.approx(-(-3.0 - 2.0 + 1.2 - 0.8) / 4)
    loss.backward()
    assert logp.grad[0].item() == 0.0  # the bound holds: no gradient from the outlier
    assert logp.grad[1].item() == pytest.approx(2.0 / 4)
    assert stats["dual_clip_fraction"].item() == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        clipped_surrogate(logp, torch.zeros(4), adv, dual_clip=1.0)


def test_sequence_ratio_is_the_geometric_mean_of_token_ratios():
    log_ratio = torch.tensor([[0.1, 0.3, 9.0], [0.2, 0.2, 0.2]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    logp = log_ratio.clone().requires_grad_()
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    loss, stats = clipped_surrogate(
        logp, torch.zeros(2, 3), adv, mask, clip_range=0.5, ratio_level="sequence",
        loss_agg="seq_mean_token_mean",
    )  # fmt: skip
    s0, s1 = math.exp(0.2), math.exp(0.2)  # mean of (0.1, 0.3); the 9.0 is padding
    assert loss.item() == pytest.approx(-(s0 * 1.0 + s1 * -1.0) / 2)
    assert stats["ratio_max"].item() == pytest.approx(s0)
    loss.backward()
    # d/dlogp_t of -s A / 2 with s = exp(mean_t logp): -s A / (2 |y|) on each counted token
    assert logp.grad[0, 0].item() == pytest.approx(-s0 / 4)
    assert logp.grad[0, 2].item() == 0.0
    assert logp.grad[1, 0].item() == pytest.approx(s1 / 6)
    # when every token has the same ratio, the sequence ratio is the token ratio
    same = logp[1:].detach()
    flat, _ = clipped_surrogate(same, torch.zeros(1, 3), adv[1:])
    seq, _ = clipped_surrogate(same, torch.zeros(1, 3), adv[1:], ratio_level="sequence")
    assert flat.item() == pytest.approx(seq.item())
    with pytest.raises(ValueError, match=r"needs \(B, L\)"):
        clipped_surrogate(logp[0].detach(), torch.zeros(3), adv[0], ratio_level="sequence")


# --- the KL term in the loss: which gradient each estimator gives --------------------------


def _expected_kl_loss_gradient(estimator):
    """E_{x ~ pi}[grad_theta kl(x)] over a 4-way categorical, exactly (summing over x with pi's
    probabilities as constants: the samples come from pi, the gradient flows through log pi)."""
    theta = torch.tensor([0.3, -0.5, 1.0, 0.1], dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.4, -0.2, 0.5], dtype=torch.float64), 0)
    logp = torch.log_softmax(theta, 0)
    probs = logp.exp().detach()
    per_x = torch.stack(
        [kl_penalty(logp[i : i + 1], ref[i : i + 1], estimator=estimator)[0] for i in range(4)]
    )
    (grad,) = torch.autograd.grad((probs * per_x).sum(), theta)
    return theta, ref, grad


def _exact_kl_gradients(theta, ref):
    logp = torch.log_softmax(theta, 0)
    reverse = (logp.exp() * (logp - ref)).sum()  # KL(pi || ref)
    forward = (ref.exp() * (ref - logp)).sum()  # KL(ref || pi)
    return (
        torch.autograd.grad(reverse, theta, retain_graph=True)[0],
        torch.autograd.grad(forward, theta)[0],
    )


def test_kl_in_the_loss_gradients_tang_and_munos():
    theta, ref, g1 = _expected_kl_loss_gradient("k1")
    rev, fwd = _exact_kl_gradients(theta, ref)
    torch.testing.assert_close(g1, torch.zeros(4, dtype=torch.float64))  # k1: nothing
    _, _, g2 = _expected_kl_loss_gradient("k2")
    torch.testing.assert_close(g2, rev)  # k2: the reverse KL's gradient
    _, _, g3 = _expected_kl_loss_gradient("k3")
    torch.testing.assert_close(g3, fwd)  # k3: the forward KL's gradient
    assert not torch.allclose(g3, rev, atol=1e-3)  # ... which is not the reverse one


def test_kl_penalty_values_mask_and_clamp():
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.1]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.9]]))
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = kl_penalty(lp, ref, mask, estimator="k3")
    k3 = 0.5 - 1 + math.log(2)  # ref/pi = 0.5: (0.5 - 1) - log 0.5
    assert loss.item() == pytest.approx(k3 / 2)
    assert stats["kl_ref"].item() == pytest.approx(k3 / 2)
    # a token the policy made 1e30 times likelier than the reference: finite, no NaN gradient
    far = torch.tensor([0.0], requires_grad=True)
    out, _ = kl_penalty(far, torch.tensor([-100.0]), estimator="k3")
    out.backward()
    assert math.isfinite(out.item()) and torch.isfinite(far.grad).all()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(lp, ref, estimator="k4")  # type: ignore[arg-type]
