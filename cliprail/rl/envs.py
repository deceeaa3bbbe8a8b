"""Environment construction: Gymnasium vector envs, the Atari preprocessing, space checks.

Vector envs run with ``AutoresetMode.SAME_STEP``: a finished env is reset inside the same
``step()`` and its true last observation is kept in ``info["final_obs"]``, which truncation
bootstrapping needs. (The default ``NEXT_STEP`` mode returns a dummy transition after each done
that must not be trained on.) Episode statistics come from a per-env
``RecordEpisodeStatistics`` placed *inside* the Atari wrappers, so returns are real game scores
(unclipped, over all lives).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

from cliprail.errors import EnvError
from cliprail.rl.config import RLConfig
from cliprail.rl.vector import SameStepSyncVectorEnv


class EpisodicLife(gym.Wrapper):
    """Signal ``terminated`` on the loss of a life, but reset the game only when it is over
    (Mnih et al. 2015; "37 implementation details" Atari #3). The learner sees each life as an
    episode; the score counters inside still see whole games."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.lives = 0
        self.game_over = True

    def step(self, action: Any) -> Any:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.game_over = terminated or truncated
        lives = self.env.unwrapped.ale.lives()  # type: ignore[attr-defined]
        if 0 < lives < self.lives:
            terminated = True
        self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, **kwargs: Any) -> Any:
        if self.game_over:
            obs, info = self.env.reset(**kwargs)
        else:  # a life was lost: continue the same game with a no-op step
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                obs, info = self.env.reset(**kwargs)
        self.lives = self.env.unwrapped.ale.lives()  # type: ignore[attr-defined]
        return obs, info


class FireReset(gym.Wrapper):
    """Press FIRE after a reset, for games that wait for it (baselines' FireResetEnv)."""

    def reset(self, **kwargs: Any) -> Any:
        self.env.reset(**kwargs)
        for action in (1, 2):
            obs, _, terminated, truncated, info = self.env.step(action)
            if terminated or truncated:
                self.env.reset(**kwargs)
        return obs, info


def _sign(reward: Any) -> float:
    return float(np.sign(float(reward)))


def _register_ale() -> None:
    try:
        import ale_py
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise EnvError("Atari envs need ale-py: pip install 'cliprail[atari]'") from exc
    gym.register_envs(ale_py)


def make_env_fn(cfg: RLConfig, render_mode: str | None = None) -> Callable[[], gym.Env]:
    """A thunk that builds one env with the wrappers ``cfg`` asks for."""

    def thunk() -> gym.Env:
        if cfg.atari:
            env = gym.make(
                cfg.env_id,
                frameskip=1,  # AtariPreprocessing skips frames itself, with a max-pool
                repeat_action_probability=cfg.sticky_actions,
                full_action_space=False,
                render_mode=render_mode,
            )
            env = gym.wrappers.RecordEpisodeStatistics(env)  # real scores: inside the wrappers
            env = gym.wrappers.AtariPreprocessing(
                env,
                noop_max=cfg.noop_max,
                frame_skip=4,
                screen_size=84,
                terminal_on_life_loss=False,
                grayscale_obs=True,
                scale_obs=False,  # uint8 in the buffer; the network divides by 255
            )
            env = EpisodicLife(env)
            if "FIRE" in env.unwrapped.get_action_meanings():  # type: ignore[attr-defined]
                env = FireReset(env)
            env = gym.wrappers.TransformReward(env, _sign)  # reward clip
            env = gym.wrappers.FrameStackObservation(env, cfg.frame_stack)
            return env
        kwargs: dict[str, Any] = {} if render_mode is None else {"render_mode": render_mode}
        env = gym.make(cfg.env_id, **kwargs)
        return gym.wrappers.RecordEpisodeStatistics(env)

    return thunk


@dataclass(frozen=True)
class SpaceSpec:
    """What the networks need to know about an env's spaces."""

    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    kind: str  # "discrete" | "multidiscrete" | "continuous"
    action_dim: int  # number of logits (discrete kinds) or of action components (continuous)
    nvec: tuple[int, ...] = ()  # categories per component (discrete kinds)
    action_start: tuple[int, ...] = ()  # Discrete(start=...) offsets
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()


class EnvActions:
    """Turn the policy's actions into what the env takes: Gaussian samples clipped to the Box
    (the buffer keeps the raw sample; "37 implementation details", continuous #4), category
    indices shifted by the space's ``start``. One mapping for training and evaluation."""

    def __init__(self, spec: SpaceSpec) -> None:
        self.kind = spec.kind
        self.low = np.asarray(spec.low, np.float32)
        self.high = np.asarray(spec.high, np.float32)
        self.starts = np.asarray(spec.action_start, np.int64)

    def __call__(self, actions: np.ndarray) -> np.ndarray:
        if self.kind == "continuous":
            # np.minimum/np.maximum: np.clip without its Python-level dispatch (a hot path)
            return np.minimum(np.maximum(actions, self.low), self.high)
        if self.kind == "discrete":
            return actions[:, 0] + self.starts[0]
        return actions + self.starts


def space_spec(obs_space: gym.Space, action_space: gym.Space, env_id: str) -> SpaceSpec:
    """Check that cliprail supports the spaces and describe them; :class:`EnvError` if not."""
    if not isinstance(obs_space, gym.spaces.Box):
        raise EnvError(
            f"{env_id}: observation space {obs_space} is not supported; cliprail expects a Box "
            "(flatten or one-hot it with a Gymnasium wrapper)"
        )
    obs = (tuple(obs_space.shape), np.dtype(obs_space.dtype))
    if isinstance(action_space, gym.spaces.Discrete):
        n = int(action_space.n)
        return SpaceSpec(*obs, "discrete", n, (n,), (int(action_space.start),))
    if isinstance(action_space, gym.spaces.MultiDiscrete):
        if action_space.nvec.ndim != 1:
            raise EnvError(f"{env_id}: MultiDiscrete action spaces must be 1-D, got {action_space}")
        nvec = tuple(int(n) for n in action_space.nvec)
        starts = tuple(int(s) for s in action_space.start)
        return SpaceSpec(*obs, "multidiscrete", sum(nvec), nvec, starts)
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        return SpaceSpec(
            *obs,
            "continuous",
            int(action_space.shape[0]),
            low=tuple(float(x) for x in action_space.low),
            high=tuple(float(x) for x in action_space.high),
        )
    raise EnvError(
        f"{env_id}: action space {action_space} is not supported; cliprail supports Discrete, "
        "MultiDiscrete and 1-D Box actions"
    )


def _ale_vector_env(cfg: RLConfig, n: int) -> gym.vector.VectorEnv:
    if not cfg.atari:
        raise EnvError("--vector ale steps Atari games only: use it with --preset atari")
    from cliprail.rl.ale_vector import ALEVectorEnv

    return ALEVectorEnv(
        cfg.env_id,
        n,
        frame_stack=cfg.frame_stack,
        noop_max=cfg.noop_max,
        sticky_actions=cfg.sticky_actions,
        num_threads=min(n, os.cpu_count() or 1),
    )


def make_vector_env(cfg: RLConfig, num_envs: int | None = None) -> gym.vector.VectorEnv:
    """Build the vector env of ``cfg`` (``num_envs`` overrides ``cfg.num_envs``).

    Raises :class:`EnvError` with one clear line for an unknown id or unsupported spaces.
    """
    n = cfg.num_envs if num_envs is None else num_envs
    if cfg.env_id.startswith("ALE/") or cfg.atari:
        _register_ale()
        if not cfg.atari:
            raise EnvError(f"{cfg.env_id} is an Atari env: use --preset atari (or --atari)")
    try:
        gym.spec(cfg.env_id)
    except gym.error.Error as exc:
        raise EnvError(f"unknown environment id {cfg.env_id!r}: {exc}") from None
    if cfg.vector == "ale":
        return _ale_vector_env(cfg, n)
    fns = [make_env_fn(cfg) for _ in range(n)]
    kwargs: dict[str, Any] = {"autoreset_mode": AutoresetMode.SAME_STEP}
    try:
        if cfg.vector == "async":
            envs: gym.vector.VectorEnv = gym.vector.AsyncVectorEnv(fns, **kwargs)
        else:
            envs = SameStepSyncVectorEnv(fns)
    except (gym.error.DependencyNotInstalled, ImportError) as exc:
        raise EnvError(f"{cfg.env_id}: a dependency is missing: {exc}") from None
    try:
        space_spec(envs.single_observation_space, envs.single_action_space, cfg.env_id)
    except EnvError:
        envs.close()
        raise
    return envs
