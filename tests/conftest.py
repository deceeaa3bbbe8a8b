"""Shared fixtures: tiny custom envs registered once for the whole suite."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch


class CounterEnv(gym.Env):
    """Observation = [steps taken so far]; reward 1 per step; never terminates by itself, so
    the TimeLimit wrapper truncates it. Lets tests know every final observation exactly."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([float(self.t)], np.float32), 1.0, False, False, {}


class MultiBinaryEnv(CounterEnv):
    action_space = gym.spaces.MultiBinary(3)


class MultiDiscreteEnv(CounterEnv):
    action_space = gym.spaces.MultiDiscrete([3, 2])


def _register() -> None:
    if "cliprail-test/Counter-v0" not in gym.registry:
        gym.register("cliprail-test/Counter-v0", entry_point=CounterEnv, max_episode_steps=5)
        gym.register("cliprail-test/MultiBinary-v0", entry_point=MultiBinaryEnv,
                     max_episode_steps=5)  # fmt: skip
        gym.register("cliprail-test/MultiDiscrete-v0", entry_point=MultiDiscreteEnv,
                     max_episode_steps=7)  # fmt: skip


_register()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """A tiny RLHF world, SFT model and reward model, shared by the RLHF test modules."""
    from cliprail.cli import main

    root = tmp_path_factory.mktemp("pipe")
    data = root / "data"
    assert main(["rlhf", "world", "--out", str(data)]) == 0
    # shrink the world for speed: 96 demonstrations and preference pairs
    for name in ("demonstrations.jsonl", "preferences.jsonl"):
        lines = (data / name).read_text().splitlines()[:96]
        (data / name).write_text("\n".join(lines) + "\n")
    assert main(["rlhf", "sft", "--data", str(data / "demonstrations.jsonl"), "--run-dir",
                 str(root / "sft"), "--epochs", "3", "--n-embd", "32", "--n-head", "2",
                 "--vocab-size", "400", "--extra-tokens", str(data / "tokens.json"),
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["rlhf", "reward", "--data", str(data / "preferences.jsonl"), "--sft-model",
                 str(root / "sft" / "model"), "--run-dir", str(root / "rm"), "--epochs", "1",
                 "--demonstrations", str(data / "demonstrations.jsonl"),
                 "--no-progress"]) == 0  # fmt: skip
    return root
