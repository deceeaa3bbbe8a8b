"""The lean sync vector env behaves step for step like Gymnasium's SAME_STEP SyncVectorEnv."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from cliprail.rl.vector import SameStepSyncVectorEnv


def _fns(env_id, n):
    return [lambda: gym.wrappers.RecordEpisodeStatistics(gym.make(env_id)) for _ in range(n)]


@pytest.mark.parametrize(("env_id", "n"), [("CartPole-v1", 3), ("Pendulum-v1", 2),
                                            ("cliprail-test/Counter-v0", 2)])  # fmt: skip
def test_matches_gymnasium_sync_vector_env(env_id, n):
    ours = SameStepSyncVectorEnv(_fns(env_id, n))
    ref = gym.vector.SyncVectorEnv(_fns(env_id, n), autoreset_mode=AutoresetMode.SAME_STEP)
    assert ours.single_observation_space == ref.single_observation_space
    assert ours.action_space == ref.action_space
    o1, _ = ours.reset(seed=3)
    o2, _ = ref.reset(seed=3)
    np.testing.assert_array_equal(o1, o2)
    rng = np.random.default_rng(0)
    ended = 0
    for _ in range(600):
        a = np.stack([ref.single_action_space.sample() for _ in range(n)])
        if isinstance(ref.single_action_space, gym.spaces.Discrete):
            a = rng.integers(0, ref.single_action_space.n, n)
        s1, s2 = ours.step(a), ref.step(a)
        for x, y in zip(s1[:4], s2[:4], strict=True):
            np.testing.assert_array_equal(x, y)
        i1, i2 = s1[4], s2[4]
        done = s2[2] | s2[3]
        if done.any():
            ended += int(done.sum())
            for i in np.flatnonzero(done):
                np.testing.assert_array_equal(i1["final_obs"][i], i2["final_obs"][i])
                assert i1["final_info"]["_episode"][i]
                assert i1["final_info"]["episode"]["r"][i] == i2["final_info"]["episode"]["r"][i]
                assert i1["final_info"]["episode"]["l"][i] == i2["final_info"]["episode"]["l"][i]
        else:
            assert "final_obs" not in i1
    assert ended > 0
    ours.close()
    ref.close()
