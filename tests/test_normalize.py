"""Running statistics: streaming updates equal NumPy's moments; ranks' statistics merge."""

from __future__ import annotations

import numpy as np

from cliprail.rl.normalize import ObsNormalizer, RewardScaler, RunningMeanStd


def test_single_row_and_batched_updates_match_numpy():
    xs = np.random.default_rng(0).standard_normal((600, 4)) * 3 + 1
    one, batched = RunningMeanStd((4,)), RunningMeanStd((4,))
    for x in xs:
        one.update(x[None])
    for chunk in np.split(xs, 6):
        batched.update(chunk)
    for rms in (one, batched):
        np.testing.assert_allclose(rms.mean, xs.mean(0), rtol=1e-5)
        np.testing.assert_allclose(rms.var, xs.var(0), rtol=1e-5)


def test_merge_of_two_streams_equals_one_stream():
    xs = np.random.default_rng(1).standard_normal((100, 2))
    a, b, whole = RunningMeanStd((2,)), RunningMeanStd((2,)), RunningMeanStd((2,))
    a.update(xs[:30])
    b.update(xs[30:])
    whole.update(xs)
    a.merge(b.mean, b.var, b.count)
    # equal up to the tiny prior count (1e-4) each stream starts with
    np.testing.assert_allclose(a.mean, whole.mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a.var, whole.var, rtol=1e-4)


def test_obs_normalizer_clips_and_reward_scaler_uses_return_std():
    norm = ObsNormalizer((1,), clip=2.0)
    for v in np.random.default_rng(2).standard_normal(1000):
        norm(np.array([[v]]))
    out = norm(np.array([[100.0]]), update=False)
    assert out.dtype == np.float32 and out[0, 0] == 2.0
    scaler = RewardScaler(num_envs=1, gamma=0.0, clip=10.0)  # gamma 0: return == reward
    rewards = np.random.default_rng(3).standard_normal(2000) * 5 + 3
    scaled = [scaler(np.array([r]), np.array([False]))[0] for r in rewards]
    # divided by the std of the return, never shifted by its mean
    assert np.std(scaled[1000:]) < 1.5 and np.mean(scaled[1000:]) > 0.4
