"""The Gymnasium PPO trainer: rollout -> GAE -> epochs x minibatches -> log -> checkpoint.

It composes the pure maths of :mod:`cliprail.ppo`; nothing here re-derives a loss. Reading order:
``RLTrainer.__init__`` (build), ``collect`` (one rollout), ``update`` (one PPO update), ``train``
(the loop), then :func:`evaluate`.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cliprail.checkpoint import (
    atomic_write_json,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from cliprail.configio import config_to_dict, load_config_json
from cliprail.errors import CheckpointError, ConfigError, RunDirError
from cliprail.monitor import MetricsLogger, Progress
from cliprail.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_surrogate,
    entropy_bonus,
    explained_variance,
    flatten_parameters,
    gae,
    kl_penalized_surrogate,
    linear_anneal,
    masked_whiten,
    plain_surrogate,
    ppo_update,
    set_learning_rate,
    value_loss,
)
from cliprail.rl.agent import ActorCritic, NumpyPolicy
from cliprail.rl.config import RLConfig, derived, validate
from cliprail.rl.envs import EnvActions, SpaceSpec, make_vector_env, space_spec
from cliprail.rl.normalize import ObsNormalizer, RewardScaler

# Fields that may differ between the original command and its --resume.
EVAL_CHUNK = 1024  # rows per batched no-grad pass over a rollout

RESUMABLE_OVERRIDES = {
    "total_steps",
    "resume",
    "progress",
    "tensorboard",
    "checkpoint_every",
    "device",
    "torch_threads",
    "run_dir",
    "vector",
}


def default_run_dir(cfg: RLConfig) -> Path:
    return Path("runs") / f"{cfg.env_id.replace('/', '_')}__{cfg.preset}__s{cfg.seed}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Rollout:
    """One rollout batch, ``(T, N, ...)`` tensors on the training device."""

    obs: Tensor  # (T, N, *obs_shape)
    actions: Tensor  # (T, N, k) int64 or (T, N, A) float32
    logprobs: Tensor  # (T, N)
    values: Tensor  # (T, N)
    rewards: Tensor  # (T, N), after reward scaling
    terminated: Tensor  # (T, N) bool
    truncated: Tensor  # (T, N) bool
    next_values: Tensor  # (T, N) V(true next state); V(final obs) where truncated


class RLTrainer:
    """PPO on a Gymnasium vector env, configured by an :class:`RLConfig`."""

    def __init__(self, cfg: RLConfig) -> None:
        validate(cfg)
        self.cfg = cfg
        self.sizes = derived(cfg)
        self.run_dir = cfg.run_dir if cfg.run_dir is not None else default_run_dir(cfg)
        self._check_run_dir()
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        seed_everything(cfg.seed)
        self.device = torch.device(cfg.device)
        self.envs = make_vector_env(cfg)
        self.spec: SpaceSpec = space_spec(
            self.envs.single_observation_space, self.envs.single_action_space, cfg.env_id
        )
        self.agent = ActorCritic(self.spec, cfg).to(self.device)
        # One flat buffer for all parameters: Adam, grad clip and zeroing become one op each.
        self.flat_params = flatten_parameters(self.agent)
        self.optimizer = make_adam([self.flat_params], cfg.learning_rate, cfg.adam_eps)
        self.shuffle_rng = torch.Generator().manual_seed(cfg.seed)
        self.np_rng = np.random.default_rng(cfg.seed)  # the NumPy acting path's samples
        self.obs_norm = (
            ObsNormalizer(self.spec.obs_shape, cfg.clip_obs) if cfg.normalize_obs else None
        )
        self.reward_scaler = (
            RewardScaler(cfg.num_envs, cfg.gamma, cfg.clip_reward) if cfg.normalize_reward else None
        )
        self.kl_ctl: FixedKLController | AdaptiveKLController | None = None
        if cfg.objective == "kl_fixed":
            self.kl_ctl = FixedKLController(cfg.kl_beta)
        elif cfg.objective == "kl_adaptive":
            self.kl_ctl = AdaptiveKLController(cfg.kl_beta, cfg.kl_target)
        self.global_step = 0
        self.update_idx = 0
        self.recent_returns: collections.deque[float] = collections.deque(maxlen=100)
        self.recent_lengths: collections.deque[int] = collections.deque(maxlen=100)
        self._alloc_buffers()
        self._env_actions = EnvActions(self.spec)

    # --- setup -------------------------------------------------------------------------------
    def _check_run_dir(self) -> None:
        cfg_path = self.run_dir / "config.json"
        if self.cfg.resume:
            if not cfg_path.is_file():
                raise RunDirError(f"{self.run_dir}: no run to resume (no config.json)")
            saved = load_config_json(RLConfig, cfg_path)
            diffs = [
                f"{f.name} (saved {getattr(saved, f.name)!r}, given {getattr(self.cfg, f.name)!r})"
                for f in dataclasses.fields(RLConfig)
                if f.name not in RESUMABLE_OVERRIDES
                and getattr(saved, f.name) != getattr(self.cfg, f.name)
            ]
            if diffs:
                raise ConfigError(
                    f"--resume with a config that differs from {cfg_path}: {', '.join(diffs)}"
                )
        elif cfg_path.exists() or (self.run_dir / "checkpoints").exists():
            raise RunDirError(
                f"{self.run_dir} already holds a run; pass --resume to continue it or choose "
                "another --run-dir (nothing was overwritten)"
            )

    def _alloc_buffers(self) -> None:
        # Rollout storage in NumPy: the acting loop writes rows without torch dispatch; one
        # torch.from_numpy (no copy) per rollout hands the batch to the learner.
        T, N = self.cfg.num_steps, self.cfg.num_envs
        obs_dtype = np.uint8 if self.cfg.atari else np.float32
        self.np_obs = np.zeros((T, N, *self.spec.obs_shape), dtype=obs_dtype)
        if self.agent.continuous:
            self.np_actions = np.zeros((T, N, self.spec.action_dim), dtype=np.float32)
        else:
            self.np_actions = np.zeros((T, N, len(self.spec.nvec)), dtype=np.int64)
        self.np_rewards = np.zeros((T, N), dtype=np.float32)
        self.np_terminated = np.zeros((T, N), dtype=bool)
        self.np_truncated = np.zeros((T, N), dtype=bool)

    # --- acting ------------------------------------------------------------------------------
    def _normalize(self, obs: np.ndarray, update_stats: bool) -> np.ndarray:
        if self.obs_norm is not None:
            return self.obs_norm(obs, update=update_stats)
        if self.cfg.atari:
            return obs
        return obs.astype(np.float32, copy=False)

    def _actor(self) -> Callable[[np.ndarray], np.ndarray]:
        if NumpyPolicy.supports(self.agent):
            return NumpyPolicy(self.agent, self.np_rng).act

        def torch_act(obs: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                actions, _, _ = self.agent.act(torch.as_tensor(obs, device=self.device))
            return actions.cpu().numpy()

        return torch_act

    def collect(self, obs: np.ndarray) -> tuple[Rollout, np.ndarray, list[tuple[float, int]]]:
        """Step the envs ``num_steps`` times from ``obs``.

        Returns the rollout, the observation to continue from, and the ``(return, length)`` of
        every episode that ended.
        """
        act = self._actor()
        episodes: list[tuple[float, int]] = []
        finals: list[tuple[int, np.ndarray, np.ndarray]] = []  # (t, env indices, final obs)
        obs_n = self._normalize(obs, update_stats=True)
        for t in range(self.cfg.num_steps):
            self.np_obs[t] = obs_n
            actions = act(obs_n)
            self.np_actions[t] = actions
            obs, rewards, terminated, truncated, info = self.envs.step(self._env_actions(actions))
            dones = terminated | truncated
            if self.reward_scaler is not None:
                rewards = self.reward_scaler(rewards, dones)
            self.np_rewards[t] = rewards
            self.np_terminated[t] = terminated
            self.np_truncated[t] = truncated
            if dones.any():
                episodes += _finished_episodes(info)
                cut = np.flatnonzero(truncated & ~terminated)
                if cut.size:  # bootstrap from the true last observation (SB3 #633)
                    final = np.stack([info["final_obs"][i] for i in cut])
                    finals.append((t, cut, self._normalize(final, update_stats=False)))
            obs_n = self._normalize(obs, update_stats=True)
        self.global_step += self.sizes.batch_size
        return self._finish_rollout(obs_n, finals), obs, episodes

    def _finish_rollout(
        self, last_obs: np.ndarray, finals: list[tuple[int, np.ndarray, np.ndarray]]
    ) -> Rollout:
        """Log-probs and values of the whole rollout in batched passes of the training
        computation (:meth:`ActorCritic.evaluate`), and the bootstrap values."""
        T, N, dev = self.cfg.num_steps, self.cfg.num_envs, self.device
        # On CPU these tensors alias the NumPy buffers (no copy): the next collect() overwrites
        # them, so a Rollout is valid until then, which is all the update needs.
        obs = torch.from_numpy(self.np_obs).to(dev)  # (T, N, *obs_shape)
        actions = torch.from_numpy(self.np_actions).to(dev)  # (T, N, k | A)
        flat_obs, flat_actions = (
            obs.reshape(T * N, *self.spec.obs_shape),
            actions.reshape(T * N, -1),
        )
        with torch.no_grad():
            parts = [
                self.agent.evaluate(o, a)
                for o, a in zip(
                    flat_obs.split(EVAL_CHUNK), flat_actions.split(EVAL_CHUNK), strict=True
                )
            ]
            logprobs = torch.cat([p[0] for p in parts]).view(T, N)
            values = torch.cat([p[2] for p in parts]).view(T, N)
            last_values = self.agent.value(torch.as_tensor(last_obs, device=dev))  # (N,)
            final_values = torch.zeros((T, N), device=dev)
            if finals:
                v = self.agent.value(
                    torch.as_tensor(np.concatenate([f[2] for f in finals]), device=dev)
                )
                rows = torch.as_tensor(np.concatenate([np.full(len(f[1]), f[0]) for f in finals]))
                cols = torch.as_tensor(np.concatenate([f[1] for f in finals]))
                final_values[rows.to(dev), cols.to(dev)] = v
        truncated = torch.from_numpy(self.np_truncated).to(dev)
        next_values = torch.cat([values[1:], last_values[None]])  # V(s_{t+1}) inside episodes
        next_values = torch.where(truncated, final_values, next_values)
        return Rollout(
            obs, actions, logprobs, values, torch.from_numpy(self.np_rewards).to(dev),
            torch.from_numpy(self.np_terminated).to(dev), truncated, next_values,
        )  # fmt: skip

    # --- learning ----------------------------------------------------------------------------
    def _objective(self, clip: float) -> Callable[..., tuple[Tensor, dict[str, Tensor]]]:
        if self.cfg.objective == "clip":
            return partial(clipped_surrogate, clip_range=clip)
        if self.cfg.objective == "none":
            return partial(plain_surrogate, clip_range=clip)
        assert self.kl_ctl is not None
        return partial(kl_penalized_surrogate, beta=self.kl_ctl.beta, clip_range=clip)

    def update(self, ro: Rollout, clip: float) -> dict[str, float]:
        """One PPO update over ``ro``: GAE, then epochs x minibatches."""
        cfg = self.cfg
        advantages, returns = gae(
            ro.rewards, ro.values, ro.next_values, ro.terminated, ro.truncated,
            gamma=cfg.gamma, lam=cfg.gae_lambda,
        )  # fmt: skip
        # Flatten (T, N, ...) -> (T*N, ...)
        batch = {
            "obs": ro.obs.reshape(-1, *self.spec.obs_shape),
            "actions": ro.actions.reshape(-1, ro.actions.shape[-1]),
            "logprobs": ro.logprobs.reshape(-1),
            "values": ro.values.reshape(-1),
            "advantages": advantages.reshape(-1),
            "returns": returns.reshape(-1),
        }
        objective = self._objective(clip)

        def loss_fn(mb: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            logprobs, entropy, values = self.agent.evaluate(mb["obs"], mb["actions"])
            adv = mb["advantages"]
            if cfg.normalize_advantages:
                adv = masked_whiten(adv)
            pg_loss, stats = objective(logprobs, mb["logprobs"], adv)
            v_loss, v_stats = value_loss(
                values, mb["values"], mb["returns"], clip_range=cfg.clip_range_vf
            )
            loss = pg_loss + cfg.vf_coef * v_loss  # PPO paper eq. 9
            if cfg.ent_coef:
                ent, e_stats = entropy_bonus(entropy)
                loss = loss - cfg.ent_coef * ent
            else:  # no bonus: keep the diagnostic, spare the graph
                ent, e_stats = entropy_bonus(entropy.detach())
            stats.update(v_stats)
            stats.update(e_stats)
            stats["policy_loss"] = pg_loss.detach()
            stats["value_loss"] = v_loss.detach()
            return loss, stats

        result = ppo_update(
            loss_fn, self.optimizer, [self.flat_params], batch,
            minibatch_size=cfg.minibatch_size, epochs=cfg.epochs,
            max_grad_norm=cfg.max_grad_norm, target_kl=cfg.target_kl, generator=self.shuffle_rng,
        )  # fmt: skip
        stats = dict(result.stats)
        stats.update(
            explained_variance=float(explained_variance(batch["values"], batch["returns"])),
            epochs_completed=result.epochs_completed,
            optimizer_steps=result.optimizer_steps,
            early_stopped=int(result.early_stopped),
            skipped_nonfinite=result.skipped_nonfinite,
        )
        if self.kl_ctl is not None:
            stats["kl_beta"] = self.kl_ctl.beta
            self.kl_ctl.update(stats.get("approx_kl", float("nan")))
        return stats

    def train(self) -> dict[str, float]:
        """Train to ``total_steps``; returns the last logged metrics."""
        cfg, sizes = self.cfg, self.sizes
        resume_step = None
        if cfg.resume:
            self.load(latest_checkpoint(self.run_dir / "checkpoints"))
            resume_step = self.global_step
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run_dir / "config.json", config_to_dict(cfg))
        # On resume the envs restart from fresh episodes, seeded from the update index.
        obs, _ = self.envs.reset(seed=cfg.seed + 1_000_003 * self.update_idx)
        total = sizes.num_updates * sizes.batch_size
        bar = Progress(total, cfg.env_id, enabled=cfg.progress, completed=self.global_step)
        last: dict[str, float] = {}
        t0, step0 = time.perf_counter(), self.global_step
        try:
            with MetricsLogger(self.run_dir, cfg.tensorboard, resume_step) as logger:
                while self.update_idx < sizes.num_updates:
                    frac = self.update_idx / sizes.num_updates
                    lr = (
                        linear_anneal(cfg.learning_rate, frac)
                        if cfg.anneal_lr
                        else cfg.learning_rate
                    )
                    clip = (
                        linear_anneal(cfg.clip_range, frac) if cfg.anneal_clip else cfg.clip_range
                    )
                    set_learning_rate(self.optimizer, lr)
                    rollout, obs, episodes = self.collect(obs)
                    stats = self.update(rollout, max(clip, 1e-8))
                    self.update_idx += 1
                    for ret, length in episodes:
                        self.recent_returns.append(ret)
                        self.recent_lengths.append(length)
                    elapsed = time.perf_counter() - t0
                    last = {
                        "update": self.update_idx,
                        "steps_per_s": (self.global_step - step0) / max(elapsed, 1e-9),
                        "learning_rate": lr,
                        "clip_range": clip,
                        "episodes": len(episodes),
                        **stats,
                    }
                    if episodes:
                        last["episodic_return"] = float(np.mean([e[0] for e in episodes]))
                        last["episodic_length"] = float(np.mean([e[1] for e in episodes]))
                    if self.recent_returns:
                        last["return_last100"] = float(np.mean(self.recent_returns))
                    logger.log(self.global_step, last)
                    bar.update(self.global_step, _bar_info(last))
                    done = self.update_idx == sizes.num_updates
                    if done or (
                        cfg.checkpoint_every and self.update_idx % cfg.checkpoint_every == 0
                    ):
                        self.save()
        finally:
            bar.close()
            self.envs.close()
        return last

    # --- checkpoints -------------------------------------------------------------------------
    def save(self) -> Path:
        """Checkpoint everything the next update depends on (envs restart on resume)."""
        tensors: dict[str, dict[str, Tensor]] = {
            "model": dict(self.agent.state_dict()),
            "rng": {"torch": torch.get_rng_state(), "shuffle": self.shuffle_rng.get_state()},
        }
        norm: dict[str, Tensor] = {}
        if self.obs_norm is not None:
            norm.update(
                {
                    f"obs.{k}": torch.from_numpy(np.asarray(v))
                    for k, v in self.obs_norm.rms.state().items()
                }
            )
        if self.reward_scaler is not None:
            norm.update(
                {
                    f"reward.{k}": torch.from_numpy(np.asarray(v))
                    for k, v in self.reward_scaler.rms.state().items()
                }
            )
            norm["reward.returns"] = torch.from_numpy(self.reward_scaler.returns.copy())
        if norm:
            tensors["normalizer"] = norm
        np_state: Any = np.random.get_state()
        state = {
            "global_step": self.global_step,
            "update": self.update_idx,
            "recent_returns": list(self.recent_returns),
            "recent_lengths": list(self.recent_lengths),
            "kl_controller": self.kl_ctl.state_dict() if self.kl_ctl else None,
            "python_rng": _py_rng_to_json(random.getstate()),
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "acting_rng": self.np_rng.bit_generator.state,
        }
        return save_checkpoint(
            self.run_dir / "checkpoints", f"update_{self.update_idx:07d}", tensors, state,
            self.optimizer.state_dict(),
        )  # fmt: skip

    def load(self, path: Path) -> None:
        """Restore the state saved by :meth:`save` from checkpoint folder ``path``."""
        tensors, state, opt_state = load_checkpoint(path)
        try:
            self.agent.load_state_dict(tensors["model"])
            if opt_state is not None:
                self.optimizer.load_state_dict(opt_state)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path}: does not fit this config's networks ({exc})") from None
        load_normalizers(tensors.get("normalizer", {}), self.obs_norm, self.reward_scaler)
        rng = tensors.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "shuffle" in rng:
            self.shuffle_rng.set_state(rng["shuffle"])
        self.global_step, self.update_idx = int(state["global_step"]), int(state["update"])
        self.recent_returns.extend(state.get("recent_returns", []))
        self.recent_lengths.extend(state.get("recent_lengths", []))
        if self.kl_ctl is not None and state.get("kl_controller"):
            self.kl_ctl.load_state_dict(state["kl_controller"])
        if state.get("python_rng"):
            random.setstate(_py_rng_from_json(state["python_rng"]))
        if state.get("acting_rng"):
            self.np_rng.bit_generator.state = state["acting_rng"]
        if state.get("numpy_rng"):
            s = state["numpy_rng"]
            np.random.set_state((s[0], np.asarray(s[1], dtype=np.uint32), *s[2:]))


def make_adam(params: Any, lr: float, eps: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel where this torch build has it (CPU and CUDA): one kernel
    for all parameters instead of a dozen small ops per tensor."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    except (RuntimeError, TypeError):  # pragma: no cover - older builds or other devices
        return torch.optim.Adam(params, lr=lr, eps=eps)


def load_normalizers(
    norm: dict[str, Tensor], obs_norm: ObsNormalizer | None, reward_scaler: RewardScaler | None
) -> None:
    """Put saved normalisation statistics back into the objects that use them."""
    if obs_norm is not None:
        obs_norm.rms.load({k: norm[f"obs.{k}"].numpy() for k in ("mean", "var", "count")})
    if reward_scaler is not None:
        reward_scaler.rms.load({k: norm[f"reward.{k}"].numpy() for k in ("mean", "var", "count")})
        reward_scaler.returns = norm["reward.returns"].numpy().copy()


def _py_rng_to_json(state: tuple[Any, ...]) -> list[Any]:
    return [state[0], list(state[1]), state[2]]


def _py_rng_from_json(s: list[Any]) -> tuple[Any, ...]:
    return (s[0], tuple(s[1]), s[2])


def _finished_episodes(info: dict[str, Any]) -> list[tuple[float, int]]:
    """``(return, length)`` of the episodes RecordEpisodeStatistics closed in this step.

    With SAME_STEP autoreset the finished step's info sits in ``info["final_info"]``."""
    final = info.get("final_info")
    if not final or "episode" not in final:
        return []
    mask = final.get("_episode", np.ones_like(final["episode"]["r"], dtype=bool))
    ep = final["episode"]
    return [(float(ep["r"][i]), int(ep["l"][i])) for i in np.flatnonzero(mask)]


def _bar_info(m: dict[str, Any]) -> str:
    ret = m.get("return_last100")
    ret_s = f"return {ret:8.1f}" if ret is not None else "return      n/a"
    return f"{m['steps_per_s']:7.0f} steps/s  {ret_s}"


# --- evaluation ----------------------------------------------------------------------------
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
                    final = info.get("final_info") or {}
                    if "episode" in final:
                        for i in np.flatnonzero(final["_episode"]):
                            if quota[i] > 0:
                                quota[i] -= 1
                                returns.append(float(final["episode"]["r"][i]))
                                lengths.append(int(final["episode"]["l"][i]))
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
