"""GAE: hand-computed values, the loop reference, layouts, masks, terminated vs truncated."""

from __future__ import annotations

import itertools

import pytest
import torch

from cliprail.ppo import gae


def gae_loop(rewards, values, next_values, terminated, truncated, gamma, lam, mask=None):
    """Scalar reference: one env at a time, one step at a time, straight from the definition."""
    T, B = rewards.shape
    adv = torch.zeros(T, B, dtype=torch.float64)
    for b in range(B):
        running = 0.0
        for t in reversed(range(T)):
            if mask is not None and not mask[t, b]:
                adv[t, b] = 0.0
                running = 0.0
                continue
            bootstrap = 0.0 if terminated[t, b] else float(next_values[t, b])
            delta = float(rewards[t, b]) + gamma * bootstrap - float(values[t, b])
            ended = bool(terminated[t, b]) or bool(truncated[t, b])
            running = delta + (0.0 if ended else gamma * lam * running)
            adv[t, b] = running
    ret = adv + values.double()
    if mask is not None:
        ret = torch.where(mask, ret, torch.zeros_like(ret))
    return adv, ret


def test_hand_computed_termination_and_truncation():
    # One env, 5 steps: steps 0-1 form an episode that is *truncated* at t=1 (time limit),
    # steps 2-3 an episode that *terminates* at t=3, step 4 starts a third episode.
    gamma, lam = 0.5, 0.5
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])[:, None]
    v = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])[:, None]
    # next value: inside episodes the next row; at t=1 V(final obs) = 7 (not V(reset obs) = 30);
    # at t=3 anything (terminal); at t=4 the bootstrap V(s_5) = 60.
    nv = torch.tensor([20.0, 7.0, 40.0, 999.0, 60.0])[:, None]
    term = torch.tensor([0, 0, 0, 1, 0], dtype=torch.bool)[:, None]
    trunc = torch.tensor([0, 1, 0, 0, 0], dtype=torch.bool)[:, None]
    adv, ret = gae(r, v, nv, term, trunc, gamma=gamma, lam=lam)
    # deltas: t4: 5 + .5*60 - 50 = -15; t3: 4 + 0 - 40 = -36; t2: 3 + .5*40 - 30 = -7;
    #         t1: 2 + .5*7 - 20 = -14.5 (bootstrapped from the final obs); t0: 1 + .5*20 - 10 = 1
    # advantages: A4 = -15; A3 = -36 (episode end, nothing carried from t4);
    #             A2 = -7 + .25*(-36) = -16; A1 = -14.5 (truncation: nothing carried);
    #             A0 = 1 + .25*(-14.5) = -2.625
    expected = torch.tensor([-2.625, -14.5, -16.0, -36.0, -15.0])[:, None]
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + v)


def test_truncation_differs_from_termination():
    r = torch.tensor([[1.0]])
    v = torch.tensor([[0.0]])
    nv = torch.tensor([[5.0]])
    a_trunc, _ = gae(r, v, nv, torch.tensor([[False]]), torch.tensor([[True]]), gamma=0.9, lam=1)
    a_term, _ = gae(r, v, nv, torch.tensor([[True]]), torch.tensor([[False]]), gamma=0.9, lam=1)
    assert a_trunc.item() == pytest.approx(1.0 + 0.9 * 5.0)
    assert a_term.item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("gamma", "lam"), list(itertools.product([0.0, 0.5, 0.9, 0.99, 1.0], [0.0, 0.8, 0.95, 1.0]))
)
def test_vectorized_equals_loop(gamma, lam):
    g = torch.Generator().manual_seed(int(gamma * 1000 + lam * 100))
    T, B = 37, 5
    r = torch.randn(T, B, generator=g, dtype=torch.float64)
    v = torch.randn(T, B, generator=g, dtype=torch.float64)
    nv = torch.randn(T, B, generator=g, dtype=torch.float64)
    term = torch.rand(T, B, generator=g) < 0.1
    trunc = (torch.rand(T, B, generator=g) < 0.1) & ~term
    adv, ret = gae(r, v, nv, term, trunc, gamma=gamma, lam=lam)
    ref_adv, ref_ret = gae_loop(r, v, nv, term, trunc, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    # The (B, L) token layout gives the transpose.
    adv_t, ret_t = gae(r.T, v.T, nv.T, term.T, trunc.T, gamma=gamma, lam=lam, time_dim=1)
    torch.testing.assert_close(adv_t, ref_adv.T)
    torch.testing.assert_close(ret_t, ref_ret.T)


def test_mask_right_padding_tokens():
    # (B, L) responses of lengths 3 and 1; padding holds garbage that must not matter.
    r = torch.tensor([[0.0, 0.0, 1.0, 7.0], [2.0, 9.0, 9.0, 9.0]])
    v = torch.tensor([[0.1, 0.2, 0.3, 5.0], [0.5, 3.0, 3.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    nv = torch.cat([v[:, 1:], torch.zeros(2, 1)], dim=1)
    term = torch.tensor([[0, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)  # last real token ends
    adv, ret = gae(r, v, nv, term, None, gamma=1.0, lam=0.95, mask=mask, time_dim=1)
    ref_adv, ref_ret = gae_loop(r.T.double(), v.T.double(), nv.T, term.T, torch.zeros_like(term.T),
                                1.0, 0.95, mask.T)  # fmt: skip
    torch.testing.assert_close(adv, ref_adv.T.float())
    torch.testing.assert_close(ret, ref_ret.T.float())
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    # Garbage (even NaN) in padded positions changes nothing.
    r2, v2 = r.clone(), v.clone()
    r2[~mask] = float("nan")
    v2[~mask] = float("inf")
    nv2 = torch.where(mask, nv, torch.tensor(float("nan")))
    adv2, ret2 = gae(r2, v2, nv2, term, None, gamma=1.0, lam=0.95, mask=mask, time_dim=1)
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)


def test_shape_errors():
    with pytest.raises(ValueError, match="share one shape"):
        gae(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 1), torch.zeros(3, 2),
            gamma=0.9, lam=0.9)  # fmt: skip
