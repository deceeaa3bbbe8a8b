"""Atari preprocessing as in the paper (ROMs ship inside the ale-py wheel)."""

from __future__ import annotations

import numpy as np
import pytest

from cliprail.rl.config import preset_config
from cliprail.rl.envs import EpisodicLife, FireReset, make_env_fn, make_vector_env
from cliprail.rl.trainer import RLTrainer

pytest.importorskip("ale_py")


def test_wrapper_stack_and_observation():
    cfg = preset_config("atari", env_id="ALE/Breakout-v5")
    env = make_env_fn(cfg)()
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    wrappers = []
    e = env
    while hasattr(e, "env"):
        wrappers.append(type(e).__name__)
        e = e.env
    assert {"FrameStackObservation", "TransformReward", "FireReset", "EpisodicLife",
            "AtariPreprocessing", "RecordEpisodeStatistics"} <= set(wrappers)  # fmt: skip
    # Reward clipping: every reward the learner sees is in {-1, 0, 1}.
    rewards = set()
    for _ in range(300):
        obs, r, term, trunc, _ = env.step(env.action_space.sample())
        rewards.add(r)
        if term or trunc:
            env.reset()
    assert rewards <= {-1.0, 0.0, 1.0}
    env.close()


def test_episodic_life_ends_learner_episode_but_not_game():
    cfg = preset_config("atari", env_id="ALE/Breakout-v5")
    env = make_env_fn(cfg)()
    env.reset(seed=0)
    life = env
    while not isinstance(life, EpisodicLife):
        life = life.env
    assert isinstance(env.env.env, FireReset) or any(
        isinstance(w, FireReset) for w in [env.env, env.env.env]
    )
    lives_start = life.lives
    for _ in range(5000):
        _, _, term, _, _ = env.step(0)  # NOOP until the ball is lost
        if term:
            break
    assert term and not life.game_over  # a life was lost, the game goes on
    env.reset()
    assert life.lives == lives_start - 1  # reset continued the same game
    env.close()


def test_unclipped_scores_reach_the_episode_statistics(tmp_path):
    cfg = preset_config("atari", env_id="ALE/Pong-v5", num_envs=2, num_steps=16,
                        minibatch_size=16, total_steps=32, run_dir=tmp_path / "pong",
                        progress=False, tensorboard=False)  # fmt: skip
    tr = RLTrainer(cfg)
    last = tr.train()
    assert tr.global_step == 32 and np.isfinite(last["loss"])
    assert tr.np_obs.dtype == np.uint8


def test_atari_env_needs_the_preset():
    from cliprail.errors import EnvError

    with pytest.raises(EnvError, match="use --preset atari"):
        make_vector_env(preset_config("classic", env_id="ALE/Pong-v5"))
