"""``--vector ale``: ale-py's own C++ vector environment with the paper's Atari preprocessing.

``ale_py.vector_env.AtariVectorEnv`` steps every game in C++ threads and does the frame skip,
max-pool, grey-scale and 84x84 resize there, so no Python wrapper runs per env and step. Here it
stepped 8 Pong envs at 1.5-2x the speed of the wrapper stack of :func:`cliprail.rl.envs.make_env_fn`
(docs/results.md, "Atari"). This class adapts it to what the trainer reads from a vector env
(``AutoresetMode.SAME_STEP``, ``info["final_obs"]`` and ``info["final_info"]["episode"]``, the
layout of :mod:`cliprail.rl.vector`) and keeps the parts of the preprocessing whose details
decide learning in cliprail's hands, so they are the same as with the wrappers:

- frame stacking: ALE is asked for single frames and this class stacks them, padding a new game
  with copies of its first frame as Gymnasium's ``FrameStackObservation`` does (ALE pads with
  zeros);
- reward clipping: ALE returns the game's reward; the learner gets its sign (Mnih et al. 2015)
  and the episode statistics sum the real score;
- episode statistics: a game's return and length (in emulator frames, as
  ``RecordEpisodeStatistics`` inside the wrappers counts them) are reported when the game ends,
  not when a life is lost.

Where the two backends agree, and where they do not (tests/test_ale_vector.py checks both):
with no-ops and FIRE-on-reset off, the observations, rewards and terminations are equal step for
step, including resets. They differ in three places: after a lost life the wrappers take a
no-op step and restart the frame stack (baselines' ``EpisodicLifeEnv``), ALE continues the game
and the stack; ALE's FIRE-on-reset presses FIRE once, the wrappers press FIRE then action 2;
ALE draws its no-ops from its own generator. The emulator state lives in C++ and is not saved in
checkpoints: a resumed run starts fresh games (as with the wrappers, whose ALE state cliprail
does not load either; README, "Resume").
"""

from __future__ import annotations

import re
import time
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from cliprail.errors import EnvError

_ALE_ID = re.compile(r"^ALE/([A-Za-z0-9]+)-v5$")
FRAME_SKIP = 4
"""Agent steps repeat the action for 4 frames and max-pool the last two (the paper's setting)."""
MAX_FRAMES = 108_000
"""Frames per game before truncation: the ``-v5`` envs' limit (30 minutes of play)."""


def rom_name(env_id: str) -> str:
    """ALE's ROM name of a Gymnasium id: ``ALE/SpaceInvaders-v5`` -> ``space_invaders``."""
    m = _ALE_ID.match(env_id)
    if m is None:
        raise EnvError(f"--vector ale needs an ALE/<Game>-v5 environment id, got {env_id!r}")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", m.group(1)).lower()


class ALEVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` Atari games stepped by ale-py's C++ vector env (see the module docstring).

    ``frame_stack`` frames of 84x84 grey-scale per observation, ``uint8``; ``sticky_actions`` is
    ALE's repeat-action probability; ``noop_max`` random no-ops start each game; FIRE is pressed
    at the start of a game that needs it; a lost life ends the learner's episode and the game
    goes on."""

    def __init__(
        self,
        env_id: str,
        num_envs: int,
        *,
        frame_stack: int = 4,
        noop_max: int = 30,
        sticky_actions: float = 0.0,
        num_threads: int = 0,
        fire_reset: bool = True,
    ) -> None:
        game = rom_name(env_id)
        try:
            from ale_py import roms
            from ale_py.vector_env import AtariVectorEnv
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise EnvError(f"--vector ale needs ale-py >= 0.11: {exc}") from None
        if roms.get_rom_path(game) is None:
            raise EnvError(f"{env_id}: ale-py has no ROM named {game!r}")
        self.ale = AtariVectorEnv(
            game,
            num_envs,
            num_threads=num_threads,
            repeat_action_probability=sticky_actions,
            max_num_frames_per_episode=MAX_FRAMES,
            autoreset_mode=AutoresetMode.SAME_STEP,
            img_height=84,
            img_width=84,
            grayscale=True,
            stack_num=1,  # stacked here, padded as FrameStackObservation pads
            frameskip=FRAME_SKIP,
            maxpool=True,
            noop_max=noop_max,
            episodic_life=False,  # True would restart the whole game on every lost life
            life_loss_info=True,  # a lost life ends the episode, the game goes on
            reward_clipping=False,  # the sign is taken here; the score is kept for statistics
            use_fire_reset=fire_reset,
        )
        self.num_envs = num_envs
        self.frame_stack = frame_stack
        self.single_observation_space = gym.spaces.Box(
            0, 255, (frame_stack, 84, 84), dtype=np.uint8
        )
        self.single_action_space = self.ale.single_action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}
        self._stack = np.zeros((num_envs, frame_stack, 84, 84), np.uint8)  # (N, k, 84, 84)
        self._score = np.zeros(num_envs, np.float64)  # real score of the game so far
        self._lives = np.zeros(num_envs, np.int64)
        self._game_start = np.zeros(num_envs, np.int64)  # ALE's frame counter when it began
        self._start = np.zeros(num_envs, np.float64)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        frames, info = self.ale.reset(seed=seed, options=options)  # (N, 1, 84, 84)
        self._stack[:] = frames  # pad with the first frame
        self._score[:] = 0.0
        self._lives[:] = info["lives"]
        self._game_start[:] = info["frame_number"] - info["episode_frame_number"]
        self._start[:] = time.perf_counter()
        return self._stack.copy(), {}

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        frames, rewards, terminated, truncated, ale_info = self.ale.step(
            np.asarray(actions, dtype=np.int64)
        )
        lives = ale_info["lives"].astype(np.int64)
        self._score += rewards
        # a game ended (and ALE started the next one) unless the only end is a lost life
        game_over = truncated | (terminated & (lives >= self._lives))
        self._stack[:, :-1] = self._stack[:, 1:]
        self._stack[:, -1] = frames[:, 0]
        info: dict[str, Any] = {}
        if game_over.any():
            # (N,) ALE's frame counter when each env's current game began
            new_start = ale_info["frame_number"] - ale_info["episode_frame_number"]
            n = self.num_envs
            idx = np.flatnonzero(game_over)
            final_obs = np.full(n, None, dtype=object)
            for i in idx:  # the last frame of the game ended the old stack
                last = self._stack[i].copy()
                last[-1] = ale_info["final_obs"][i, 0]
                final_obs[i] = last
            now = time.perf_counter()
            episode = {
                "r": np.where(game_over, self._score, 0.0),
                "l": np.where(game_over, new_start - self._game_start, 0),
                "t": np.where(game_over, np.round(now - self._start, 6), 0.0),
            }
            info = {
                "final_obs": final_obs,
                "_final_obs": game_over.copy(),
                "final_info": {"episode": episode, "_episode": game_over.copy()},
            }
            self._stack[idx] = frames[idx]  # the new game's first frame, repeated
            self._score[idx] = 0.0
            self._start[idx] = now
            self._game_start[idx] = new_start[idx]
        self._lives = lives
        return self._stack.copy(), np.sign(rewards).astype(np.float64), terminated, truncated, info

    def close_extras(self, **kwargs: Any) -> None:
        self.ale.close()
