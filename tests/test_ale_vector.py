"""``--vector ale`` (ale-py's C++ vector env) against the wrapper stack, step for step where the
two should agree, and apart where cliprail/rl/ale_vector.py says they differ (issue 17)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("ale_py")
pytest.importorskip("ale_py.vector_env")

import cliprail.rl.envs as envs_module
from cliprail.errors import EnvError
from cliprail.rl.ale_vector import ALEVectorEnv, rom_name
from cliprail.rl.config import preset_config
from cliprail.rl.envs import make_vector_env
from cliprail.rl.envstate import SnapshotError, capture
from cliprail.rl.evaluate import finished_episodes
from cliprail.rl.vector import SameStepSyncVectorEnv


def test_rom_names():
    assert rom_name("ALE/Pong-v5") == "pong"
    assert rom_name("ALE/SpaceInvaders-v5") == "space_invaders"
    assert rom_name("ALE/MontezumaRevenge-v5") == "montezuma_revenge"
    for bad in ("PongNoFrameskip-v4", "ALE/Pong-v4", "CartPole-v1"):
        with pytest.raises(EnvError, match="ALE/<Game>-v5"):
            rom_name(bad)


def _pair(monkeypatch, env_id: str, noop_max: int = 0):
    """The wrappers and the ALE vector env on the same game, no-ops and FIRE-on-reset off in
    both (the two places where they draw or press differently)."""
    monkeypatch.setattr(envs_module, "FireReset", lambda env: env)
    envs_module._register_ale()
    cfg = preset_config("atari", env_id=env_id, noop_max=noop_max)
    wrappers = SameStepSyncVectorEnv([envs_module.make_env_fn(cfg)])
    ale = ALEVectorEnv(env_id, 1, noop_max=noop_max, fire_reset=False, num_threads=1)
    return wrappers, ale


def test_pong_agrees_step_for_step_through_a_whole_game(monkeypatch):
    wrappers, ale = _pair(monkeypatch, "ALE/Pong-v5")
    o1, _ = wrappers.reset(seed=0)
    o2, _ = ale.reset(seed=0)
    np.testing.assert_array_equal(o1, o2)  # the stack padded with the first frame, like ours
    rng = np.random.default_rng(0)
    games = [[], []]
    for _ in range(1200):  # a random Pong game lasts ~900 agent steps
        a = rng.integers(0, 6, 1)
        s1, s2 = wrappers.step(a), ale.step(a)
        for x, y in zip(s1[:4], s2[:4], strict=True):  # obs, reward, terminated, truncated
            np.testing.assert_array_equal(x, y)
        for k, s in enumerate((s1, s2)):
            games[k] += finished_episodes(s[4])
            if s[4]:  # a game ended: the true last observation is kept for both
                np.testing.assert_array_equal(s1[4]["final_obs"][0], s2[4]["final_obs"][0])
        if games[0]:
            break
    assert games[0] and games[0] == games[1]  # same real score and length in frames
    assert games[0][0][1] < -15  # the unclipped score of a random player, not a clipped sum
    wrappers.close()
    ale.close()


def test_breakout_a_lost_life_ends_the_episode_not_the_game(monkeypatch):
    wrappers, ale = _pair(monkeypatch, "ALE/Breakout-v5")
    np.testing.assert_array_equal(wrappers.reset(seed=0)[0], ale.reset(seed=0)[0])
    lives = ale._lives.copy()
    rng = np.random.default_rng(0)
    for _ in range(2000):
        a = rng.integers(0, 4, 1)  # FIRE launches the ball; a random paddle soon misses it
        s1, s2 = wrappers.step(a), ale.step(a)
        np.testing.assert_array_equal(s1[2], s2[2])
        if s2[2][0]:
            break
        np.testing.assert_array_equal(s1[0], s2[0])  # equal until the first lost life
    assert s2[2][0] and not finished_episodes(s2[4]) and not finished_episodes(s1[4])
    assert ale._lives[0] == lives[0] - 1  # the same game goes on
    # the documented difference: the wrappers took a no-op step and restarted their stack
    assert (s1[0][0, 0] == s1[0][0, -1]).all() and not (s2[0][0, 0] == s2[0][0, -1]).all()
    wrappers.close()
    ale.close()


def test_learner_rewards_are_clipped_and_scores_are_not():
    ale = ALEVectorEnv("ALE/Pong-v5", 2, num_threads=1)
    ale.reset(seed=1)
    rng = np.random.default_rng(1)
    seen, games = set(), []
    for _ in range(1500):
        obs, r, _, _, info = ale.step(rng.integers(0, 6, 2))
        assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
        seen |= set(r.tolist())
        games += finished_episodes(info)
    assert seen <= {-1.0, 0.0, 1.0} and -1.0 in seen
    assert games and all(ret <= -15 for _, ret, _ in games)
    ale.close()


def test_the_flag_builds_it_and_refuses_other_envs():
    envs = make_vector_env(preset_config("atari", env_id="ALE/Pong-v5", num_envs=2, vector="ale"))
    assert isinstance(envs, ALEVectorEnv) and envs.single_observation_space.shape == (4, 84, 84)
    obs, _ = envs.reset(seed=0)
    with pytest.raises(SnapshotError, match="--vector ale"):  # a resumed run restarts games
        capture(envs, obs)
    envs.close()
    with pytest.raises(EnvError, match="Atari games only"):
        make_vector_env(preset_config("classic", env_id="CartPole-v1", vector="ale"))


def test_cli_trains_and_resumes_with_the_ale_backend(tmp_path, capsys):
    from cliprail.cli import main

    run = tmp_path / "pong"
    common = ["rl", "train", "--preset", "atari", "--env-id", "ALE/Pong-v5", "--vector", "ale",
              "--num-envs", "2", "--num-steps", "16", "--minibatch-size", "16",
              "--checkpoint-every", "1", "--run-dir", str(run), "--no-progress",
              "--no-tensorboard"]  # fmt: skip
    assert main([*common, "--total-steps", "32"]) == 0
    assert main([*common, "--total-steps", "64", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "--vector ale" in err  # the warning names why the games restart
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]
    assert steps == [32, 64]
