"""``cliprail rl eval``: the episodic return of a trained run, with its saved normalisation."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliprail.checkpoint import latest_checkpoint, load_checkpoint
from cliprail.configio import load_config_json
from cliprail.errors import CheckpointError, ConfigError, RunDirError
from cliprail.rl.agent import ActorCritic
from cliprail.rl.checkpointing import load_normalizers
from cliprail.rl.config import RLConfig
from cliprail.rl.envs import EnvActions, make_vector_env, space_spec
from cliprail.rl.normalize import ObsNormalizer


def finished_episodes(info: dict[str, Any]) -> list[tuple[int, float, int]]:
    """``(env index, return, length)`` of the episodes RecordEpisodeStatistics closed in this
    step. With SAME_STEP autoreset the finished step's info sits in ``info["final_info"]``; its
    ``_episode`` mask, when a vector env leaves it out, means every env."""
    final = info.get("final_info")
    if not final or "episode" not in final:
        return []
    ep = final["episode"]
    mask = final.get("_episode", np.ones_like(ep["r"], dtype=bool))
    return [(int(i), float(ep["r"][i]), int(ep["l"][i])) for i in np.flatnonzero(mask)]


def evaluate(
    run_dir: Path,
    episodes: int = 10,
    deterministic: bool = True,
    seed: int | None = None,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """Mean and std of the episodic return of a trained run, with its saved normalisation.

    Episodes are spread evenly over up to 8 envs and each env runs its share to the end, so
    short episodes are not over-counted.
    """
    if episodes <= 0:
        raise ConfigError(f"--episodes must be a positive integer, got {episodes}")
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise RunDirError(f"{run_dir}: not a run folder (no config.json)")
    cfg = load_config_json(RLConfig, cfg_path)
    ckpt = checkpoint if checkpoint is not None else latest_checkpoint(run_dir / "checkpoints")
    tensors, state, _ = load_checkpoint(ckpt)
    n_envs = min(episodes, 8)
    cfg = dataclasses.replace(cfg, num_envs=n_envs, vector="sync")
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    envs = make_vector_env(cfg)
    spec = space_spec(envs.single_observation_space, envs.single_action_space, cfg.env_id)
    agent = ActorCritic(spec, cfg)
    try:
        agent.load_state_dict(tensors["model"])
    except (KeyError, RuntimeError) as exc:
        envs.close()
        raise CheckpointError(f"{ckpt}: does not fit the run's networks ({exc})") from None
    agent.eval()
    obs_norm = ObsNormalizer(spec.obs_shape, cfg.clip_obs) if cfg.normalize_obs else None
    load_normalizers(tensors.get("normalizer", {}), obs_norm, None)
    quota = np.array([episodes // n_envs + (i < episodes % n_envs) for i in range(n_envs)])
    returns: list[float] = []
    lengths: list[int] = []
    env_actions = EnvActions(spec)
    torch.manual_seed(cfg.seed if seed is None else seed)
    obs, _ = envs.reset(seed=(cfg.seed + 10_000) if seed is None else seed)
    try:
        with torch.inference_mode():
            while (quota > 0).any():
                x = obs_norm(obs, update=False) if obs_norm is not None else obs
                x_t = torch.as_tensor(np.asarray(x, dtype=np.uint8 if cfg.atari else np.float32))
                actions, _, _ = agent.act(x_t, deterministic=deterministic)
                obs, _, terminated, truncated, info = envs.step(env_actions(actions.numpy()))
                if (terminated | truncated).any():
                    for i, ret, length in finished_episodes(info):
                        if quota[i] > 0:
                            quota[i] -= 1
                            returns.append(ret)
                            lengths.append(length)
    finally:
        envs.close()
    return {
        "env_id": cfg.env_id,
        "checkpoint": str(ckpt),
        "global_step": int(state["global_step"]),
        "episodes": len(returns),
        "deterministic": deterministic,
        "mean_return": float(np.mean(returns)),
        "std_return": float(np.std(returns)),
        "min_return": float(np.min(returns)),
        "max_return": float(np.max(returns)),
        "mean_length": float(np.mean(lengths)),
    }
