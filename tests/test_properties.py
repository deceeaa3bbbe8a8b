"""Property-based tests (hypothesis) of the PPO maths in ``cliprail.ppo``.

Each test states a mathematical relationship that must hold for *every* input in a bounded
domain: GAE's linearity, episode boundaries and masks; the clipped surrogate's bounds and its
zero gradient where the clip binds; masked reductions that ignore padding whatever it holds; the
KL estimators' signs and exact expectations; the value loss; the update-loop helpers.

Runs are deterministic (``derandomize=True``, no example database) so CI never flakes.
"""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from cliprail.ppo import (
    AdaptiveKLController,
    FixedKLController,
    NonFiniteError,
    ZieglerKLController,
    clip_grad_norm,
    clipped_surrogate,
    explained_variance,
    gae,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalized_surrogate,
    linear_anneal,
    masked_count,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    plain_surrogate,
    ppo_update,
    value_loss,
)

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FEW = settings(SETTINGS, max_examples=12)

TOL = {"rtol": 1e-9, "atol": 1e-9}  # float64 throughout

finite = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False)
unit = st.floats(0.0, 1.0)
garbage = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300]),
    st.floats(-1e6, 1e6),
)


def t64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def tbool(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=bool))


def farr(shape, elements=finite):
    return hnp.arrays(np.float64, shape, elements=elements)


def barr(shape):
    return hnp.arrays(np.bool_, shape)


@st.composite
def gae_case(draw, with_mask=False, max_t=6, max_b=3):
    shape = (draw(st.integers(1, max_t)), draw(st.integers(1, max_b)))
    case = {
        "rewards": draw(farr(shape)),
        "values": draw(farr(shape)),
        "next_values": draw(farr(shape)),
        "terminated": draw(barr(shape)),
        "truncated": draw(barr(shape)),
        "gamma": draw(unit),
        "lam": draw(unit),
    }
    if with_mask:
        case["mask"] = draw(barr(shape))
    return case


def run_gae(case, **overrides):
    c = {**case, **overrides}
    return gae(
        t64(c["rewards"]),
        t64(c["values"]),
        t64(c["next_values"]),
        tbool(c["terminated"]),
        None if c.get("truncated") is None else tbool(c["truncated"]),
        gamma=c["gamma"],
        lam=c["lam"],
        mask=None if c.get("mask") is None else tbool(c["mask"]),
        time_dim=c.get("time_dim", 0),
    )


def gae_reference(r, v, nv, term, trunc, gamma, lam, mask=None):
    """Straight from the definition, one scalar at a time, in numpy."""
    T, B = r.shape
    adv = np.zeros((T, B))
    for b in range(B):
        running = 0.0
        for t in reversed(range(T)):
            if mask is not None and not mask[t, b]:
                running = 0.0
                continue
            boot = 0.0 if term[t, b] else nv[t, b]
            delta = r[t, b] + gamma * boot - v[t, b]
            running = delta + (0.0 if (term[t, b] or trunc[t, b]) else gamma * lam * running)
            adv[t, b] = running
    ret = adv + v
    if mask is not None:
        ret = np.where(mask, ret, 0.0)
    return adv, ret


# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(gae_case(with_mask=True), st.booleans())
def test_gae_matches_scalar_reference(case, use_mask):
    if not use_mask:
        case["mask"] = None
    adv, ret = run_gae(case)
    ref_adv, ref_ret = gae_reference(
        case["rewards"], case["values"], case["next_values"], case["terminated"],
        case["truncated"], case["gamma"], case["lam"], case["mask"],
    )  # fmt: skip
    torch.testing.assert_close(adv, t64(ref_adv), **TOL)
    torch.testing.assert_close(ret, t64(ref_ret), **TOL)


@SETTINGS
@given(st.data(), gae_case(with_mask=True), finite, finite)
def test_gae_is_linear_in_rewards_values_and_bootstraps(data, case, a, b):
    """For fixed dones, mask, gamma and lambda, (r, V, V') -> (A, R) is linear."""
    shape = case["rewards"].shape
    other = {k: data.draw(farr(shape)) for k in ("rewards", "values", "next_values")}
    combo = {k: a * case[k] + b * other[k] for k in other}
    adv1, ret1 = run_gae(case)
    adv2, ret2 = run_gae(case, **other)
    adv, ret = run_gae(case, **combo)
    torch.testing.assert_close(adv, a * adv1 + b * adv2, rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(ret, a * ret1 + b * ret2, rtol=1e-9, atol=1e-8)


@SETTINGS
@given(st.data(), gae_case())
def test_gae_advantage_is_affine_in_rewards(data, case):
    """gae(r1 + r2, v) - gae(r2, v) == gae(r1, values=0, next_values=0)."""
    r1 = data.draw(farr(case["rewards"].shape))
    zeros = np.zeros_like(r1)
    adv_sum, _ = run_gae(case, rewards=r1 + case["rewards"])
    adv_base, _ = run_gae(case)
    adv_r1, ret_r1 = run_gae(case, rewards=r1, values=zeros, next_values=zeros)
    torch.testing.assert_close(adv_sum - adv_base, adv_r1, rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(ret_r1, adv_r1, **TOL)  # zero values: returns == advantages


@SETTINGS
@given(gae_case(with_mask=True))
def test_gae_returns_are_advantages_plus_values(case):
    adv, ret = run_gae(case)
    m = tbool(case["mask"])
    torch.testing.assert_close(ret[m], (adv + t64(case["values"]))[m], **TOL)
    assert (adv[~m] == 0).all()
    assert (ret[~m] == 0).all()
    adv_nomask, ret_nomask = run_gae(case, mask=None)
    torch.testing.assert_close(ret_nomask, adv_nomask + t64(case["values"]), **TOL)


@SETTINGS
@given(gae_case())
def test_gae_lambda_one_no_dones_is_discounted_return_to_go(case):
    """lam = 1 inside one episode: A_t = sum_k gamma^(k-t) r_k + gamma^(T-t) V(s_T) - V(s_t)."""
    r, v = case["rewards"], case["values"]
    T = r.shape[0]
    nv = np.concatenate([v[1:], case["next_values"][-1:]])  # consistent next values
    no = np.zeros_like(r, dtype=bool)
    g = case["gamma"]
    adv, ret = run_gae(case, next_values=nv, terminated=no, truncated=no, lam=1.0)
    expected = np.zeros_like(r)
    for t in range(T):
        disc = np.array([g ** (k - t) for k in range(t, T)])[:, None]
        expected[t] = (disc * r[t:]).sum(0) + g ** (T - t) * nv[-1] - v[t]
    torch.testing.assert_close(adv, t64(expected), rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(ret, t64(expected + v), rtol=1e-9, atol=1e-8)


@SETTINGS
@given(gae_case())
def test_gae_lambda_zero_is_one_step_td_error(case):
    adv, _ = run_gae(case, lam=0.0)
    boot = np.where(case["terminated"], 0.0, case["next_values"])
    delta = case["rewards"] + case["gamma"] * boot - case["values"]
    torch.testing.assert_close(adv, t64(delta), **TOL)


@SETTINGS
@given(gae_case())
def test_gae_gamma_zero_is_reward_minus_value(case):
    adv, ret = run_gae(case, gamma=0.0)
    torch.testing.assert_close(adv, t64(case["rewards"] - case["values"]), **TOL)
    torch.testing.assert_close(ret, t64(case["rewards"]), **TOL)


@SETTINGS
@given(st.data(), gae_case(with_mask=True))
def test_gae_terminated_steps_never_bootstrap(data, case):
    """next_values at a terminated step is multiplied by zero, whatever it holds."""
    term = case["terminated"]
    junk = data.draw(farr(term.shape, garbage))
    nv = np.where(term, junk, case["next_values"])
    adv, ret = run_gae(case)
    adv2, ret2 = run_gae(case, next_values=nv)
    torch.testing.assert_close(adv2, adv, **TOL)
    torch.testing.assert_close(ret2, ret, **TOL)


@SETTINGS
@given(st.data(), gae_case())
def test_gae_never_crosses_an_episode_end(data, case):
    """With every env done at row d, rows 0..d do not see anything after d."""
    T = case["rewards"].shape[0]
    d = data.draw(st.integers(0, T - 1))
    use_term = data.draw(st.booleans())
    key = "terminated" if use_term else "truncated"
    flags = case[key].copy()
    flags[d] = True
    case = {**case, key: flags}
    adv, ret = run_gae(case)
    prefix = {k: (v[: d + 1] if isinstance(v, np.ndarray) else v) for k, v in case.items()}
    adv_p, ret_p = run_gae(prefix)
    torch.testing.assert_close(adv[: d + 1], adv_p, **TOL)
    torch.testing.assert_close(ret[: d + 1], ret_p, **TOL)
    # and changing everything after the end changes nothing before it
    later = {k: data.draw(farr(case[k].shape)) for k in ("rewards", "values", "next_values")}
    changed = {k: np.concatenate([case[k][: d + 1], later[k][d + 1 :]]) for k in later}
    adv_c, _ = run_gae(case, **changed)
    torch.testing.assert_close(adv_c[: d + 1], adv[: d + 1], **TOL)


@SETTINGS
@given(gae_case(with_mask=True), st.booleans())
def test_gae_time_dim_one_is_the_transpose(case, use_mask):
    if not use_mask:
        case["mask"] = None
    adv, ret = run_gae(case)
    transposed = {k: (v.T if isinstance(v, np.ndarray) else v) for k, v in case.items()}
    adv_t, ret_t = run_gae(transposed, time_dim=1)
    torch.testing.assert_close(adv_t, adv.T, **TOL)
    torch.testing.assert_close(ret_t, ret.T, **TOL)


@SETTINGS
@given(st.data(), gae_case(with_mask=True))
def test_gae_masked_steps_do_not_influence_anything(data, case):
    """Padding may hold NaN/inf/huge values and any done flags: valid steps do not change."""
    m = case["mask"]
    shape = m.shape
    dirty = {
        k: np.where(m, case[k], data.draw(farr(shape, garbage)))
        for k in ("rewards", "values", "next_values")
    }
    for k in ("terminated", "truncated"):
        dirty[k] = np.where(m, case[k], data.draw(barr(shape)))
    adv, ret = run_gae(case)
    adv2, ret2 = run_gae(case, **dirty)
    assert torch.isfinite(adv2).all() and torch.isfinite(ret2).all()
    torch.testing.assert_close(adv2, adv, **TOL)
    torch.testing.assert_close(ret2, ret, **TOL)


@SETTINGS
@given(gae_case(with_mask=True))
def test_gae_mask_equals_zeroed_terminal_padding(case):
    """A masked step behaves like a zero-reward, zero-value terminal step: it passes nothing
    back to earlier steps (and its own advantage and return are 0)."""
    m = case["mask"]
    adv, ret = run_gae(case)
    zeroed = {k: np.where(m, case[k], 0.0) for k in ("rewards", "values", "next_values")}
    adv_z, ret_z = run_gae(case, mask=None, terminated=case["terminated"] | ~m, **zeroed)
    torch.testing.assert_close(adv, adv_z, **TOL)
    torch.testing.assert_close(ret, ret_z, **TOL)


@SETTINGS
@given(gae_case(with_mask=True))
def test_gae_accepts_integer_flags_and_mask(case):
    adv, ret = run_gae(case)
    adv_i, ret_i = gae(
        t64(case["rewards"]), t64(case["values"]), t64(case["next_values"]),
        torch.as_tensor(case["terminated"].astype(np.int64)),
        torch.as_tensor(case["truncated"].astype(np.float64)),
        gamma=case["gamma"], lam=case["lam"], mask=torch.as_tensor(case["mask"].astype(np.int64)),
    )  # fmt: skip
    torch.testing.assert_close(adv_i, adv, **TOL)
    torch.testing.assert_close(ret_i, ret, **TOL)


@SETTINGS
@given(gae_case())
def test_gae_positive_td_errors_give_positive_advantages(case):
    """A is a nonnegative combination of TD errors: all deltas >= 0 implies A >= 0."""
    boot = np.where(case["terminated"], 0.0, case["next_values"])
    # choose rewards so that every delta equals |reward|
    delta = np.abs(case["rewards"])
    rewards = delta - case["gamma"] * boot + case["values"]
    adv, _ = run_gae(case, rewards=rewards)
    assert (adv >= -1e-9).all()
    assert (adv >= t64(delta) - 1e-9).all()  # each A_t includes its own delta_t


# --------------------------------------------------------------------------------------------
# Clipped surrogate and friends
# --------------------------------------------------------------------------------------------

clip_eps = st.floats(0.01, 0.5)


@st.composite
def surrogate_case(draw, max_n=8):
    n = draw(st.integers(1, max_n))
    old = draw(farr((n,), st.floats(-5.0, 0.0)))
    log_ratio = draw(farr((n,), st.floats(-1.0, 1.0)))
    adv = draw(farr((n,)))
    mask = draw(barr((n,)))
    return {"logp": old + log_ratio, "old": old, "adv": adv, "mask": mask}


def ratio_of(case) -> np.ndarray:
    return torch.exp(t64(case["logp"]) - t64(case["old"])).numpy()


@SETTINGS
@given(surrogate_case(), clip_eps)
def test_clipped_surrogate_per_sample_bounds(case, eps):
    """min(rA, clip(r)A) <= rA, <= clip(r)A, and <= (1+eps)A for A>0, (1-eps)A for A<0."""
    r, a = ratio_of(case), case["adv"]
    for i in range(len(a)):
        loss, _ = clipped_surrogate(
            t64(case["logp"][i : i + 1]), t64(case["old"][i : i + 1]), t64(a[i : i + 1]),
            clip_range=eps,
        )  # fmt: skip
        obj = -loss.item()
        slack = 1e-12 * (1 + abs(a[i]))
        assert obj <= r[i] * a[i] + slack
        assert obj <= np.clip(r[i], 1 - eps, 1 + eps) * a[i] + slack
        bound = (1 + eps) * a[i] if a[i] > 0 else (1 - eps) * a[i]
        assert obj <= bound + slack
        assert obj == pytest.approx(min(r[i] * a[i], np.clip(r[i], 1 - eps, 1 + eps) * a[i]))


@SETTINGS
@given(surrogate_case(), clip_eps, st.booleans())
def test_clipped_surrogate_is_a_pessimistic_bound_of_the_plain_one(case, eps, use_mask):
    args = (t64(case["logp"]), t64(case["old"]), t64(case["adv"]))
    mask = tbool(case["mask"]) if use_mask else None
    clipped, _ = clipped_surrogate(*args, mask, clip_range=eps)
    plain, _ = plain_surrogate(*args, mask, clip_range=eps)
    assert clipped.item() >= plain.item() - 1e-12
    # and the whole loss is bounded below by -E[(1 + eps) A+ + (1 - eps) A-]
    a = case["adv"]
    bound = np.where(a > 0, (1 + eps) * a, (1 - eps) * a)
    m = case["mask"] if use_mask else np.ones_like(a, dtype=bool)
    if m.any():
        assert clipped.item() >= -bound[m].mean() - 1e-12
    else:
        assert clipped.item() == 0.0  # all masked: masked_mean returns 0


@SETTINGS
@given(surrogate_case(), clip_eps, st.booleans())
def test_clipped_surrogate_gradient_is_zero_exactly_where_the_clip_binds(case, eps, use_mask):
    """d loss / d logp_i = -r_i A_i / n while unclipped, and exactly 0 when r > 1 + eps with
    A > 0 or r < 1 - eps with A < 0 (and on masked samples)."""
    logp = t64(case["logp"]).requires_grad_()
    mask = case["mask"] if use_mask else np.ones(len(case["adv"]), dtype=bool)
    loss, _ = clipped_surrogate(
        logp, t64(case["old"]), t64(case["adv"]), tbool(mask) if use_mask else None,
        clip_range=eps,
    )  # fmt: skip
    loss.backward()
    grad = logp.grad.numpy()
    r, a = ratio_of(case), case["adv"]
    n = max(int(mask.sum()), 1)
    margin = 1e-9
    binds = ((r > (1 + eps) * (1 + margin)) & (a > 0)) | ((r < (1 - eps) * (1 - margin)) & (a < 0))
    free = ((r > (1 - eps) * (1 + margin)) & (r < (1 + eps) * (1 - margin))) | (
        ((r > (1 + eps) * (1 + margin)) & (a < 0)) | ((r < (1 - eps) * (1 - margin)) & (a > 0))
    )
    assert (grad[binds & mask] == 0.0).all()
    assert (grad[~mask] == 0.0).all()
    sel = free & mask
    np.testing.assert_allclose(grad[sel], -r[sel] * a[sel] / n, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(surrogate_case(), clip_eps, st.booleans())
def test_surrogate_stats_are_consistent(case, eps, use_mask):
    mask = case["mask"] if use_mask else np.ones(len(case["adv"]), dtype=bool)
    lp, old = t64(case["logp"]), t64(case["old"])
    _, stats = clipped_surrogate(
        lp, old, t64(case["adv"]), tbool(mask) if use_mask else None, clip_range=eps
    )
    r = ratio_of(case)
    cf = stats["clip_fraction"].item()
    assert 0.0 <= cf <= 1.0
    if mask.any():
        assert cf == pytest.approx(np.mean(np.abs(r[mask] - 1) > eps))
        assert stats["ratio_min"].item() == pytest.approx(r[mask].min())
        assert stats["ratio_max"].item() == pytest.approx(r[mask].max())
        assert stats["ratio_min"] <= stats["ratio_mean"] * (1 + 1e-12)
        assert stats["ratio_mean"] <= stats["ratio_max"] * (1 + 1e-12)
        # the stats' KLs are the k3 and k1 estimators of KL(pi_old || pi_theta)
        m = tbool(mask)
        torch.testing.assert_close(stats["approx_kl"], kl_k3(lp, old)[m].mean(), **TOL)
        torch.testing.assert_close(stats["approx_kl_k1"], kl_k1(lp, old)[m].mean(), **TOL)
        assert stats["approx_kl"].item() >= 0.0
    for v in stats.values():
        assert not v.requires_grad


@SETTINGS
@given(surrogate_case(), clip_eps)
def test_clipped_surrogate_at_ratio_one(case, eps):
    """At r = 1 the loss is -mean(A) over valid samples, nothing is clipped and KL is 0."""
    mask = case["mask"]
    loss, stats = clipped_surrogate(
        t64(case["old"]), t64(case["old"]), t64(case["adv"]), tbool(mask), clip_range=eps
    )
    expected = -case["adv"][mask].mean() if mask.any() else 0.0
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert stats["clip_fraction"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert stats["approx_kl_k1"].item() == 0.0


@SETTINGS
@given(surrogate_case(), clip_eps, st.floats(-5.0, 5.0), st.floats(0.01, 10.0))
def test_clipped_surrogate_invariances(case, eps, shift, k):
    """Only the ratio matters (shift both logprobs), and the loss is positively homogeneous in
    the advantages: L(k A) = k L(A) for k > 0."""
    lp, old, a, m = t64(case["logp"]), t64(case["old"]), t64(case["adv"]), tbool(case["mask"])
    base, _ = clipped_surrogate(lp, old, a, m, clip_range=eps)
    shifted, _ = clipped_surrogate(lp + shift, old + shift, a, m, clip_range=eps)
    scaled, _ = clipped_surrogate(lp, old, k * a, m, clip_range=eps)
    assert shifted.item() == pytest.approx(base.item(), rel=1e-9, abs=1e-9)
    assert scaled.item() == pytest.approx(k * base.item(), rel=1e-9, abs=1e-9)


@SETTINGS
@given(st.data(), surrogate_case(), clip_eps)
def test_surrogates_ignore_masked_samples_whatever_they_hold(data, case, eps):
    m = case["mask"]
    assume(m.any())
    n = len(m)
    dirty = {
        k: np.where(m, case[k], data.draw(farr((n,), garbage))) for k in ("logp", "old", "adv")
    }
    for fn, kw in (
        (clipped_surrogate, {"clip_range": eps}),
        (plain_surrogate, {"clip_range": eps}),
        (kl_penalized_surrogate, {"clip_range": eps, "beta": 0.3}),
    ):
        loss, stats = fn(t64(dirty["logp"]), t64(dirty["old"]), t64(dirty["adv"]), tbool(m), **kw)
        ref, ref_stats = fn(
            t64(case["logp"][m]), t64(case["old"][m]), t64(case["adv"][m]), None, **kw
        )
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss, ref, **TOL)
        for key, value in ref_stats.items():
            torch.testing.assert_close(stats[key], value, **TOL)


@SETTINGS
@given(surrogate_case(), st.floats(0.0, 5.0), st.floats(0.0, 5.0))
def test_kl_penalized_surrogate_adds_beta_times_mean_k3(case, beta1, beta2):
    lp, old, a, m = t64(case["logp"]), t64(case["old"]), t64(case["adv"]), tbool(case["mask"])
    plain, _ = plain_surrogate(lp, old, a, m)
    pen1, _ = kl_penalized_surrogate(lp, old, a, m, beta=beta1)
    pen2, _ = kl_penalized_surrogate(lp, old, a, m, beta=beta2)
    k3 = masked_mean(kl_k3(lp, old), m)
    torch.testing.assert_close(pen1, plain + beta1 * k3, **TOL)
    # the penalty is nonnegative, so the loss grows with beta
    if beta1 <= beta2:
        assert pen1.item() <= pen2.item() + 1e-12
    zero, _ = kl_penalized_surrogate(lp, old, a, m, beta=0.0)
    torch.testing.assert_close(zero, plain, **TOL)


@SETTINGS
@given(surrogate_case())
def test_plain_surrogate_gradient_is_minus_ratio_times_advantage(case):
    logp = t64(case["logp"]).requires_grad_()
    loss, _ = plain_surrogate(logp, t64(case["old"]), t64(case["adv"]))
    loss.backward()
    r = ratio_of(case)
    np.testing.assert_allclose(logp.grad.numpy(), -r * case["adv"] / len(r), rtol=1e-9, atol=0)


# --------------------------------------------------------------------------------------------
# Value loss
# --------------------------------------------------------------------------------------------


@st.composite
def value_case(draw, max_n=8):
    n = draw(st.integers(1, max_n))
    return {
        "v": draw(farr((n,))),
        "old": draw(farr((n,))),
        "ret": draw(farr((n,))),
        "mask": draw(barr((n,))),
        "clip": draw(st.floats(0.01, 5.0)),
    }


@SETTINGS
@given(value_case(), st.booleans())
def test_value_loss_unclipped_is_half_mean_squared_error(case, use_mask):
    m = case["mask"] if use_mask else np.ones(len(case["v"]), dtype=bool)
    loss, stats = value_loss(
        t64(case["v"]), t64(case["old"]), t64(case["ret"]), tbool(m) if use_mask else None
    )
    err = (case["v"] - case["ret"]) ** 2
    expected = 0.5 * err[m].mean() if m.any() else 0.0
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert stats["value_clip_fraction"].item() == 0.0


@SETTINGS
@given(value_case())
def test_clipped_value_loss_dominates_unclipped_per_sample(case):
    v, old, ret, c = case["v"], case["old"], case["ret"], case["clip"]
    for i in range(len(v)):
        s = slice(i, i + 1)
        plain, _ = value_loss(t64(v[s]), t64(old[s]), t64(ret[s]))
        clipped, stats = value_loss(t64(v[s]), t64(old[s]), t64(ret[s]), clip_range=c)
        assert clipped.item() >= plain.item()
        v_clip = old[i] + np.clip(v[i] - old[i], -c, c)
        expected = 0.5 * max((v[i] - ret[i]) ** 2, (v_clip - ret[i]) ** 2)
        assert clipped.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert stats["value_clip_fraction"].item() == float(abs(v[i] - old[i]) > c)


@SETTINGS
@given(value_case())
def test_clipped_value_loss_equals_unclipped_inside_the_trust_region(case):
    v, ret, m = t64(case["v"]), t64(case["ret"]), tbool(case["mask"])
    # old values within the clip range of the new ones: nothing is clipped
    old = v + t64(np.clip(case["old"], -1, 1) * case["clip"] * 0.99)
    plain, _ = value_loss(v, old, ret, m)
    clipped, stats = value_loss(v, old, ret, m, clip_range=case["clip"])
    torch.testing.assert_close(clipped, plain, rtol=1e-9, atol=1e-9)
    assert stats["value_clip_fraction"].item() == 0.0
    # and a clip range beyond every |V - V_old| changes nothing either
    huge = float(np.abs(case["v"] - case["old"]).max()) + 1.0
    plain2, _ = value_loss(v, t64(case["old"]), ret, m)
    clipped2, _ = value_loss(v, t64(case["old"]), ret, m, clip_range=huge)
    torch.testing.assert_close(clipped2, plain2, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(value_case())
def test_clipped_value_loss_gradient(case):
    """Where the clipped error strictly dominates, V is outside the range and gets no gradient;
    where the unclipped error strictly dominates, the gradient is (V - R) / n."""
    v = t64(case["v"]).requires_grad_()
    old, ret, c = case["old"], case["ret"], case["clip"]
    loss, _ = value_loss(v, t64(old), t64(ret), clip_range=c)
    loss.backward()
    x = case["v"]
    n = len(x)
    e = (x - ret) ** 2
    v_clip = old + np.clip(x - old, -c, c)
    e_clip = (v_clip - ret) ** 2
    margin = 1e-9 * (1 + e)
    clip_wins = e_clip > e + margin
    plain_wins = e > e_clip + margin
    grad = v.grad.numpy()
    assert (grad[clip_wins] == 0.0).all()
    np.testing.assert_allclose(grad[plain_wins], (x - ret)[plain_wins] / n, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------


@st.composite
def masked_case(draw, max_side=5):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=max_side))
    x = draw(farr(shape))
    mask = draw(barr(shape))
    dirty = np.where(mask, x, draw(farr(shape, garbage)))
    return x, mask, dirty


@SETTINGS
@given(masked_case(), st.sampled_from([torch.bool, torch.int64, torch.float64]))
def test_masked_sum_mean_var_ignore_masked_entries(case, mask_dtype):
    x, mask, dirty = case
    valid = x[mask]
    m = tbool(mask).to(mask_dtype)
    xt = t64(dirty)
    assert masked_sum(xt, m).item() == pytest.approx(valid.sum(), rel=1e-12, abs=1e-12)
    assert masked_count(xt, m).item() == mask.sum()
    mean = masked_mean(xt, m).item()
    assert mean == pytest.approx(valid.mean() if valid.size else 0.0, rel=1e-12, abs=1e-12)
    for unbiased, ddof in ((True, 1), (False, 0)):
        var = masked_var(xt, m, unbiased=unbiased).item()
        expected = np.var(valid, ddof=ddof) if valid.size > ddof else 0.0
        assert var == pytest.approx(expected, rel=1e-9, abs=1e-9)
        assert var >= 0.0


@SETTINGS
@given(masked_case(), st.booleans())
def test_masked_reductions_along_a_dim(case, use_mask):
    x, mask, dirty = case
    assume(x.ndim == 2)
    if not use_mask:
        mask, dirty = np.ones_like(mask), x
    m = tbool(mask) if use_mask else None
    for dim in (0, 1):
        s = masked_sum(t64(dirty), m, dim=dim).numpy()
        cnt = mask.sum(dim)
        np.testing.assert_allclose(s, np.where(mask, x, 0).sum(dim), rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(masked_count(t64(dirty), m, dim=dim).numpy(), cnt)
        mean = masked_mean(t64(dirty), m, dim=dim).numpy()
        expected = np.where(cnt > 0, np.where(mask, x, 0).sum(dim) / np.maximum(cnt, 1), 0.0)
        np.testing.assert_allclose(mean, expected, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(masked_case())
def test_masked_mean_and_sum_gradients_ignore_nonfinite_padding(case):
    _, mask, dirty = case
    for fn in (masked_sum, masked_mean):
        xt = t64(dirty).requires_grad_()
        fn(xt, tbool(mask)).backward()
        grad = xt.grad.numpy()
        assert np.isfinite(grad).all()
        assert (grad[~mask] == 0).all()
        expected = 1.0 if fn is masked_sum else 1.0 / max(mask.sum(), 1)
        np.testing.assert_allclose(grad[mask], expected, rtol=1e-12)


@st.composite
def spread_case(draw):
    """Values with a non-negligible spread over at least two valid entries."""
    x, mask, dirty = draw(masked_case())
    assume(mask.sum() >= 2)
    assume(np.var(x[mask], ddof=1) > 1e-2)
    return x, mask, dirty


@SETTINGS
@given(spread_case())
def test_masked_whiten_standardises_valid_entries(case):
    x, mask, dirty = case
    w = masked_whiten(t64(dirty), tbool(mask), eps=0.0).numpy()
    assert (w[~mask] == 0).all()
    valid = w[mask]
    assert abs(valid.mean()) <= 1e-9
    assert np.var(valid, ddof=1) == pytest.approx(1.0, rel=1e-9)
    # it is the textbook z-score of the valid entries
    z = (x[mask] - x[mask].mean()) / x[mask].std(ddof=1)
    np.testing.assert_allclose(valid, z, rtol=1e-9, atol=1e-9)
    # default eps: the variance is var / (var + eps)
    wd = masked_whiten(t64(dirty), tbool(mask)).numpy()[mask]
    v = np.var(x[mask], ddof=1)
    assert np.var(wd, ddof=1) == pytest.approx(v / (v + 1e-8), rel=1e-9)


@SETTINGS
@given(spread_case(), st.floats(0.1, 10.0), st.floats(-10.0, 10.0))
def test_masked_whiten_is_invariant_to_affine_maps(case, a, b):
    _, mask, dirty = case
    m = tbool(mask)
    w = masked_whiten(t64(dirty), m, eps=0.0)
    w_pos = masked_whiten(t64(a * dirty + b), m, eps=0.0)
    w_neg = masked_whiten(t64(-a * dirty + b), m, eps=0.0)
    torch.testing.assert_close(w_pos[m], w[m], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(w_neg[m], -w[m], rtol=1e-7, atol=1e-7)
    # default eps: invariant up to eps / var
    w_eps = masked_whiten(t64(dirty), m)
    w_pos_eps = masked_whiten(t64(a * dirty + b), m)
    torch.testing.assert_close(w_pos_eps[m], w_eps[m], rtol=1e-4, atol=1e-5)


@SETTINGS
@given(masked_case())
def test_masked_whiten_without_mean_shift_keeps_the_mean(case):
    x, mask, dirty = case
    assume(mask.any())
    m = tbool(mask)
    w = masked_whiten(t64(dirty), m, shift_mean=False)
    assert (w.numpy()[~mask] == 0).all()
    assert masked_mean(w, m).item() == pytest.approx(x[mask].mean(), rel=1e-9, abs=1e-9)
    shifted = masked_whiten(t64(dirty), m)
    torch.testing.assert_close(w[m], shifted[m] + x[mask].mean(), rtol=1e-9, atol=1e-9)


@SETTINGS
@given(masked_case(), st.booleans())
def test_masked_whiten_fast_path_agrees_with_all_true_mask(case, shift_mean):
    x, _, _ = case
    xt = t64(x)
    fast = masked_whiten(xt, shift_mean=shift_mean)
    full = masked_whiten(xt, torch.ones_like(xt, dtype=torch.bool), shift_mean=shift_mean)
    torch.testing.assert_close(fast, full, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(masked_var(xt), masked_var(xt, torch.ones_like(xt)), **TOL)


@FEW
@given(st.data(), spread_case(), st.sampled_from([math.nan, math.inf]))
def test_masked_var_and_whiten_gradients_ignore_nonfinite_padding(data, case, bad):
    # Bug fixed: (x - mean)**2 was formed before masking, so 0 * NaN leaked into every gradient.
    x, mask, _ = case
    assume(not mask.all())
    dirty = np.where(mask, x, bad)
    fn = data.draw(st.sampled_from([masked_var, masked_whiten]))
    xt = t64(dirty).requires_grad_()
    out = fn(xt, tbool(mask))
    out.sum().backward()
    assert torch.isfinite(xt.grad).all()
    assert (xt.grad.numpy()[~mask] == 0).all()


@SETTINGS
@given(masked_case(), finite)
def test_explained_variance_properties(case, c):
    x, mask, _ = case
    assume(mask.sum() >= 2 and np.var(x[mask], ddof=1) > 1e-2)
    ret, m = t64(x), tbool(mask)
    # a perfect critic explains everything; a constant one explains nothing
    assert explained_variance(ret, ret, m).item() == pytest.approx(1.0)
    const = torch.full_like(ret, c)
    assert explained_variance(const, ret, m).item() == pytest.approx(0.0, abs=1e-9)
    # never above 1, and a constant offset of the critic does not matter
    values = t64(np.roll(x, 1))
    ev = explained_variance(values, ret, m).item()
    assert ev <= 1.0 + 1e-12
    assert explained_variance(values + c, ret, m).item() == pytest.approx(ev, abs=1e-9)


@FEW
@example(c=0.1, n=7, dtype=torch.float32)  # the bug: variance 6.5e-17, not 0 -> -2e15, not NaN
@given(st.floats(-10, 10), st.integers(2, 64), st.sampled_from([torch.float32, torch.float64]))
def test_explained_variance_of_constant_returns_is_nan(c, n, dtype):
    returns = torch.full((n,), c, dtype=dtype)
    values = torch.linspace(0.0, 1.0, n, dtype=dtype)
    assert math.isnan(explained_variance(values, returns).item())


# --------------------------------------------------------------------------------------------
# KL estimators and controllers
# --------------------------------------------------------------------------------------------

logps = st.floats(-30.0, 0.0)


@SETTINGS
@given(st.data(), st.integers(1, 16))
def test_kl_estimators_signs_and_zero(data, n):
    lp = t64(data.draw(farr((n,), logps)))
    lq = t64(data.draw(farr((n,), logps)))
    k1, k2, k3 = kl_k1(lp, lq), kl_k2(lp, lq), kl_k3(lp, lq)
    assert (k2 >= 0).all() and (k3 >= 0).all()
    for fn in (kl_k1, kl_k2, kl_k3):
        assert (fn(lp, lp) == 0).all()
    torch.testing.assert_close(kl_k1(lq, lp), -k1, **TOL)  # k1 is antisymmetric
    # exp(x) - 1 - x - x^2/2 has the sign of x: k3 >= k2 iff log(p/q) >= 0
    logr = lp - lq
    slack = 1e-9 * (1 + k3.abs())
    assert (k3[logr >= 0] >= k2[logr >= 0] - slack[logr >= 0]).all()
    assert (k3[logr <= 0] <= k2[logr <= 0] + slack[logr <= 0]).all()
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        torch.testing.assert_close(kl_estimate(lp, lq, name), fn(lp, lq), rtol=0, atol=0)
    np.testing.assert_allclose(k1.numpy(), (lq - lp).numpy(), rtol=0, atol=0)


@SETTINGS
@given(st.data(), st.integers(2, 8))
def test_k1_and_k3_are_unbiased_on_an_enumerated_categorical(data, k):
    """E_q[k1] = E_q[k3] = KL(q || p), computed exactly by weighting each outcome by q."""
    logits_q = t64(data.draw(farr((k,), st.floats(-5, 5))))
    logits_p = t64(data.draw(farr((k,), st.floats(-5, 5))))
    q, p = (
        torch.distributions.Categorical(logits=logits_q),
        torch.distributions.Categorical(logits=logits_p),
    )
    exact = torch.distributions.kl_divergence(q, p)
    lq, lp = q.logits, p.logits  # normalised log-probabilities
    w = q.probs
    torch.testing.assert_close((w * kl_k1(lp, lq)).sum(), exact, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close((w * kl_k3(lp, lq)).sum(), exact, rtol=1e-9, atol=1e-12)
    # k2 is biased but its expectation is never negative
    assert (w * kl_k2(lp, lq)).sum().item() >= 0.0
    # swapping the roles (samples from p) estimates the other direction, KL(p || q)
    reverse = torch.distributions.kl_divergence(p, q)
    torch.testing.assert_close((p.probs * kl_k3(lq, lp)).sum(), reverse, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(st.text(min_size=0, max_size=4))
def test_kl_estimate_rejects_unknown_names(name):
    assume(name not in ("k1", "k2", "k3"))
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(torch.zeros(1), torch.zeros(1), name)


@SETTINGS
@given(st.floats(1e-3, 10.0), st.floats(1e-3, 1.0), st.lists(st.floats(0.0, 5.0), max_size=10))
def test_kl_controllers_move_beta_in_the_right_direction(beta, target, kls):
    adaptive = AdaptiveKLController(beta=beta, target=target)
    fixed = FixedKLController(beta=beta)
    for kl in kls:
        before = adaptive.beta
        after = adaptive.update(kl)
        if kl < target / 1.5:
            assert after == before / 2
        elif kl > target * 1.5:
            assert after == before * 2
        else:
            assert after == before
        assert fixed.update(kl) == beta
    before = adaptive.beta
    assert adaptive.update(math.nan) == before
    assert adaptive.update(math.inf) == before


@SETTINGS
@given(
    st.floats(1e-3, 10.0),
    st.floats(1e-2, 10.0),
    st.floats(100.0, 1e4),
    st.floats(0.0, 50.0),
    st.integers(1, 100),
)
def test_ziegler_controller_is_a_bounded_proportional_step(beta, target, horizon, kl, n_steps):
    ctl = ZieglerKLController(beta=beta, target=target, horizon=horizon)
    new = ctl.update(kl, n_steps)
    assert new > 0
    factor = new / beta
    assert 1 - 0.2 * n_steps / horizon - 1e-12 <= factor <= 1 + 0.2 * n_steps / horizon + 1e-12
    if kl > target:
        assert new >= beta
    elif kl < target:
        assert new <= beta
    ctl2 = ZieglerKLController(beta=1.0, target=1.0, horizon=1.0)
    ctl2.load_state_dict(ctl.state_dict())
    assert ctl2 == ctl
    assert ctl.update(math.nan, n_steps) == new


# --------------------------------------------------------------------------------------------
# Update-loop helpers
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(finite, finite, st.floats(-1.0, 2.0), st.floats(-1.0, 2.0))
def test_linear_anneal_is_a_clamped_monotone_interpolation(start, end, p1, p2):
    assert linear_anneal(start, 0.0, end) == start
    assert linear_anneal(start, 1.0, end) == pytest.approx(end, abs=1e-12)
    lo, hi = min(start, end), max(start, end)
    v1, v2 = linear_anneal(start, p1, end), linear_anneal(start, p2, end)
    assert lo - 1e-12 <= v1 <= hi + 1e-12
    if p1 <= p2:  # monotone towards end
        assert (v2 - v1) * (end - start) >= -1e-12
    assert linear_anneal(start, min(p1, 0.0), end) == start


@SETTINGS
@given(st.integers(1, 12), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_ppo_update_minibatches_partition_the_batch(n_minibatches, minibatch_size, seed):
    """Each epoch hands the loss every row exactly once, in minibatches of the given size."""
    n = n_minibatches * minibatch_size
    w = torch.zeros(1, requires_grad=True)
    seen: list[list[int]] = []

    def loss_fn(mb):
        seen.append(mb["row"].tolist())
        return (w * 0).sum(), {}

    batch = {"row": torch.arange(n)}
    opt = torch.optim.SGD([w], lr=0.1)
    g = torch.Generator().manual_seed(seed)
    ppo_update(loss_fn, opt, [w], batch, minibatch_size=minibatch_size, epochs=2, generator=g)
    assert len(seen) == 2 * n_minibatches and all(len(p) == minibatch_size for p in seen)
    for epoch in (seen[:n_minibatches], seen[n_minibatches:]):
        assert sorted(r for p in epoch for r in p) == list(range(n))
    if minibatch_size > 1:
        with pytest.raises(ValueError):
            ppo_update(loss_fn, opt, [w], {"row": torch.arange(n + 1)},
                       minibatch_size=minibatch_size, epochs=1)  # fmt: skip


@SETTINGS
@given(st.data(), st.lists(st.integers(1, 5), min_size=1, max_size=4), st.floats(0.01, 10.0))
def test_clip_grad_norm_returns_the_norm_and_rescales_uniformly(data, sizes, max_norm):
    params = []
    for s in sizes:
        p = torch.zeros(s, dtype=torch.float64, requires_grad=True)
        p.grad = t64(data.draw(farr((s,), st.floats(-2.0, 2.0))))
        params.append(p)
    before = torch.cat([p.grad.clone() for p in params])
    total = clip_grad_norm(params, max_norm)
    assert total.item() == pytest.approx(float(np.linalg.norm(before.numpy())), rel=1e-12)
    after = torch.cat([p.grad for p in params])
    assert torch.linalg.vector_norm(after).item() <= max_norm * (1 + 1e-12)
    # same direction: after = s * before with one s in [0, 1]
    s = min(1.0, max_norm / (total.item() + 1e-6))
    torch.testing.assert_close(after, s * before, rtol=1e-12, atol=1e-12)
    # None only measures
    again = clip_grad_norm(params, None)
    torch.testing.assert_close(torch.cat([p.grad for p in params]), after, rtol=0, atol=0)
    assert again.item() == pytest.approx(torch.linalg.vector_norm(after).item(), rel=1e-12)


@FEW
@given(
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(0, 2**31 - 1),
)
def test_ppo_update_visits_every_sample_once_per_epoch(n_mb, mb_size, epochs, seed):
    n = n_mb * mb_size
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.0)
    seen: list[list[int]] = []

    def loss_fn(mb):
        seen.append(mb["idx"].tolist())
        return (w * mb["x"]).sum(), {"approx_kl": torch.tensor(0.0)}

    batch = {
        "idx": torch.arange(n),
        "x": torch.randn(n, generator=torch.Generator().manual_seed(1)),
    }
    g = torch.Generator().manual_seed(seed)
    res = ppo_update(loss_fn, opt, [w], batch, minibatch_size=mb_size, epochs=epochs, generator=g)
    assert res.optimizer_steps == epochs * n_mb
    assert res.epochs_completed == epochs
    assert not res.early_stopped and res.skipped_nonfinite == 0
    assert all(len(s) == mb_size for s in seen)
    for e in range(epochs):
        epoch = [i for s in seen[e * n_mb : (e + 1) * n_mb] for i in s]
        assert sorted(epoch) == list(range(n))


@FEW
@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.data(),
    st.integers(1, 4),
    st.integers(0, 2**31 - 1),
)
def test_ppo_update_skips_nonfinite_and_stops_on_kl(n_mb, epochs, data, max_in_row, seed):
    """Non-finite minibatches never touch the weights; a run of max_in_row of them raises;
    the first minibatch whose approx_kl exceeds target_kl stops everything before its step."""
    calls = n_mb * epochs
    bad = data.draw(st.lists(st.booleans(), min_size=calls, max_size=calls))
    kls = data.draw(st.lists(st.floats(0.0, 1.0), min_size=calls, max_size=calls))
    target = data.draw(st.one_of(st.none(), st.floats(0.0, 1.0)))
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=1.0)
    x = t64(np.arange(1, 2 * n_mb + 1, dtype=np.float64))
    stepped_sum = [0.0]
    k = [0]

    def loss_fn(mb):
        i = k[0]
        k[0] += 1
        loss = (w * mb["x"]).sum()
        if bad[i]:
            loss = loss * math.nan
        elif target is None or kls[i] <= target:
            stepped_sum[0] += mb["x"].sum().item()
        return loss, {"approx_kl": torch.tensor(kls[i], dtype=torch.float64)}

    # the expected outcome, simulated call by call
    stop, run, raises, steps, skipped = None, 0, False, 0, 0
    for i in range(calls):
        if target is not None and kls[i] > target:
            stop = i
            break
        if bad[i]:
            skipped += 1
            run += 1
            if run >= max_in_row:
                raises = True
                break
        else:
            run = 0
            steps += 1
    kwargs = {
        "minibatch_size": 2,
        "epochs": epochs,
        "max_grad_norm": None,
        "target_kl": target,
        "generator": torch.Generator().manual_seed(seed),
        "max_nonfinite_in_row": max_in_row,
    }
    if raises:
        with pytest.raises(NonFiniteError):
            ppo_update(loss_fn, opt, [w], {"x": x}, **kwargs)
        assert torch.isfinite(w).all()
        return
    res = ppo_update(loss_fn, opt, [w], {"x": x}, **kwargs)
    assert res.optimizer_steps == steps
    assert res.skipped_nonfinite == skipped
    assert res.early_stopped == (stop is not None)
    assert res.epochs_completed == (epochs if stop is None else stop // n_mb)
    assert torch.isfinite(w).all()
    # SGD(lr=1) on sum(w * x): each stepped minibatch moves w by -sum(x_mb)
    assert w.item() == pytest.approx(-stepped_sum[0], rel=1e-12, abs=1e-12)
