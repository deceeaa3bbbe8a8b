"""The Gymnasium PPO trainer: rollout -> GAE -> epochs x minibatches -> log -> checkpoint.

It composes the pure maths of :mod:`cliprail.ppo`; nothing here re-derives a loss. Reading order:
``RLTrainer.__init__`` (build), ``collect`` (one rollout), ``update`` (one PPO update), ``train``
(the loop), then :func:`evaluate`.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs this same loop on its own envs and seed
(``seed + rank``); :mod:`cliprail.distributed` supplies what they must agree on (gradients,
early stop and skips, whitening, normalisation statistics, logged metrics), and rank 0 alone
writes the run folder. With one process ``self.dist`` is None and none of that code runs.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

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
from cliprail.distributed import Distributed
from cliprail.errors import CheckpointError, ConfigError, RunDirError
from cliprail.interrupt import StopRequest, fault_point
from cliprail.monitor import MetricsLogger, Progress
from cliprail.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_surrogate,
    entropy_bonus,
    explained_variance,
    flatten_parameters,
    fused_or_plain,
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
from cliprail.rl.envstate import EnvSnapshot, SnapshotError, capture, restore
from cliprail.rl.normalize import ObsNormalizer, RewardScaler, SyncedRunningMeanStd

EVAL_CHUNK = 1024  # rows per batched no-grad pass over a rollout
ENV_SEED_STRIDE = 1_000_003  # env reset seeds: seed + rank * num_envs + stride * update index
R = TypeVar("R")

# Fields that may differ between the original command and its --resume.
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
        # Launched by torchrun: join the process group (gloo on CPU, NCCL on CUDA); else None.
        self.dist = Distributed.from_env(cfg.device)
        self.rank = self.dist.rank if self.dist is not None else 0
        self.world_size = self.dist.world_size if self.dist is not None else 1
        self.sizes = derived(cfg, self.world_size)
        self.run_dir = cfg.run_dir if cfg.run_dir is not None else default_run_dir(cfg)
        self._on_main(self._check_run_dir)
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        seed_everything(cfg.seed + self.rank)
        self.device = self.dist.device if self.dist is not None else torch.device(cfg.device)
        self.envs = make_vector_env(cfg)
        self.spec: SpaceSpec = space_spec(
            self.envs.single_observation_space, self.envs.single_action_space, cfg.env_id
        )
        self.agent = ActorCritic(self.spec, cfg).to(self.device)
        # One flat buffer for all parameters: Adam, grad clip and zeroing become one op each.
        self.flat_params = flatten_parameters(self.agent)
        if self.dist is not None:  # every rank starts from rank 0's parameters
            self.dist.broadcast_([self.flat_params.data, *self.agent.buffers()])
        self.optimizer = make_adam([self.flat_params], cfg.learning_rate, cfg.adam_eps)
        self.shuffle_rng = torch.Generator().manual_seed(cfg.seed + self.rank)
        self.np_rng = np.random.default_rng(cfg.seed + self.rank)  # the NumPy acting samples
        synced = self.dist is not None  # statistics merged across ranks after each rollout
        self.obs_norm = (
            ObsNormalizer(self.spec.obs_shape, cfg.clip_obs, synced=synced)
            if cfg.normalize_obs
            else None
        )
        self.reward_scaler = (
            RewardScaler(cfg.num_envs, cfg.gamma, cfg.clip_reward, synced=synced)
            if cfg.normalize_reward
            else None
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
        # The raw observation the next rollout starts from (set by train(); saved with the envs'
        # state so a resumed run continues the same episodes).
        self.obs: np.ndarray | None = None
        # Set by _restore: the saved env state to put back (or why there is none), and the
        # global RNG states to set again just before the first update.
        self._saved_envs: EnvSnapshot | str | None = None
        self._global_rngs: Callable[[], None] | None = None
        self._alloc_buffers()
        self._env_actions = EnvActions(self.spec)

    # --- setup -------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that writes the run folder (and with one process)."""
        return self.rank == 0

    def _on_main(self, fn: Callable[[], R]) -> R:
        """``fn()`` on rank 0 alone, its result (or its :class:`CliprailError`) on every rank:
        only rank 0 reads or writes the run folder, so no shared filesystem is needed."""
        return fn() if self.dist is None else self.dist.from_main(fn)

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
        self.global_step += self.sizes.global_batch_size  # every rank's env steps
        rollout = self._finish_rollout(obs_n, finals)
        if self.dist is not None:  # all ranks normalise the next rollout with the same stats
            for norm in (self.obs_norm, self.reward_scaler):
                if norm is not None and isinstance(norm.rms, SyncedRunningMeanStd):
                    norm.rms.sync(self.dist.gather_arrays)
        return rollout, obs, episodes

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
        # Whiten over the global minibatch: this rank's rows and the other ranks' rows of the
        # same step (with one process, masked_whiten itself).
        whiten = masked_whiten if self.dist is None else self.dist.whiten

        def loss_fn(mb: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            logprobs, entropy, values = self.agent.evaluate(mb["obs"], mb["actions"])
            adv = mb["advantages"]
            if cfg.normalize_advantages:
                adv = whiten(adv)
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
            sync=self.dist.update_sync() if self.dist is not None else None,
        )  # fmt: skip
        stats = dict(result.stats)
        if self.dist is None:
            ev = float(explained_variance(batch["values"], batch["returns"]))
        else:  # means (extremes for *_min / *_max) over ranks; the counters below are agreed
            stats = self.dist.reduce_stats(stats)
            ev = self.dist.explained_variance(batch["values"], batch["returns"])
        stats.update(
            explained_variance=ev,
            epochs_completed=result.epochs_completed,
            optimizer_steps=result.optimizer_steps,
            early_stopped=int(result.early_stopped),
            skipped_nonfinite=result.skipped_nonfinite,
        )
        if self.kl_ctl is not None:  # the loss logged the beta it used (kl_beta)
            self.kl_ctl.update(stats.get("approx_kl", float("nan")))
        return stats

    def train(self) -> dict[str, float]:
        """Train to ``total_steps``; returns the last logged metrics.

        SIGINT and SIGTERM stop the run at the end of the current update: it saves a checkpoint
        and raises :class:`cliprail.interrupt.Interrupted` (under torchrun, as soon as any rank
        has the signal, all ranks stop after the same update).
        """
        cfg, sizes = self.cfg, self.sizes
        with StopRequest() as stop:
            resume_step = None
            if cfg.resume:  # rank 0 reads the checkpoint; every rank restores from it
                path, ckpt = self._on_main(lambda: _read_latest(self.run_dir / "checkpoints"))
                self._restore(path, *ckpt)
                resume_step = self.global_step
            elif self.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.is_main:
                atomic_write_json(self.run_dir / "config.json", config_to_dict(cfg))
            obs = self._start_envs()
            total = sizes.num_updates * sizes.global_batch_size
            bar = Progress(
                total, cfg.env_id, enabled=cfg.progress and self.is_main,
                completed=self.global_step,
            )  # fmt: skip
            try:
                with MetricsLogger(
                    self.run_dir, cfg.tensorboard, resume_step, enabled=self.is_main
                ) as logger:
                    if self._global_rngs is not None:  # exactly as saved, whatever set-up drew
                        self._global_rngs()
                        self._global_rngs = None
                    return self._loop(obs, logger, bar, stop)
            finally:
                bar.close()
                self.envs.close()
                if self.dist is not None:
                    self.dist.close()  # the process group, if this trainer created it

    def _loop(
        self, obs: np.ndarray, logger: MetricsLogger, bar: Progress, stop: StopRequest
    ) -> dict[str, float]:
        """Updates until ``num_updates``: rollout, update, log, checkpoint, honour a stop."""
        cfg, sizes = self.cfg, self.sizes
        last: dict[str, float] = {}
        t0, step0 = time.perf_counter(), self.global_step
        while self.update_idx < sizes.num_updates:
            # Annealed from the update index alone, so a resumed run computes the same values.
            frac = self.update_idx / sizes.num_updates
            lr = linear_anneal(cfg.learning_rate, frac) if cfg.anneal_lr else cfg.learning_rate
            clip = linear_anneal(cfg.clip_range, frac) if cfg.anneal_clip else cfg.clip_range
            set_learning_rate(self.optimizer, lr)
            rollout, obs, episodes = self.collect(obs)
            self.obs = obs
            stats = self.update(rollout, max(clip, 1e-8))
            self.update_idx += 1
            if self.dist is not None:  # every rank's finished episodes, rank order
                episodes = [e for part in self.dist.gather_objects(episodes) for e in part]
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
            saved = done or bool(
                cfg.checkpoint_every and self.update_idx % cfg.checkpoint_every == 0
            )
            if saved:
                self.save()
            if not done and self._stop_agreed(stop):  # a finished run just finishes
                if not saved:
                    self.save()
                where = f"after update {self.update_idx} of {sizes.num_updates}"
                raise stop.interrupted(where, self._checkpoint_path())
            fault_point("rl-update")  # tests: SIGKILL here after the n-th update
        return last

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether any rank was asked to stop (one small all-gather per update under
        torchrun, so every rank saves and stops after the same update)."""
        if self.dist is None:
            return stop.requested
        signums = self.dist.gather_arrays(np.array([float(stop.signum or 0)]))
        agreed = int(max(float(s[0]) for s in signums))
        if agreed and stop.signum is None:  # another rank's signal: stop the same way
            stop.signum = agreed
        return agreed != 0

    def _start_envs(self) -> np.ndarray:
        """Reset the envs and, on resume, put their saved state back; returns the observation
        the first rollout starts from.

        The reset seeds rank r's env i with seed + r * num_envs + i (plus a stride per update
        on resume), as env r * num_envs + i of one process would be. When the checkpoint holds
        no exact env state (or it does not fit these envs) the resumed run continues from
        these fresh episodes, and rank 0 prints one warning line saying so.
        """
        cfg = self.cfg
        seed = cfg.seed + self.rank * cfg.num_envs + ENV_SEED_STRIDE * self.update_idx
        obs, _ = self.envs.reset(seed=seed)
        saved, self._saved_envs = self._saved_envs, None
        if not cfg.resume:
            return obs
        reason = saved if isinstance(saved, str) else None
        if isinstance(saved, EnvSnapshot):
            try:
                obs = restore(self.envs, saved)
            except SnapshotError as exc:
                reason = f"the saved env state does not fit these envs: {exc}"
                obs, _ = self.envs.reset(seed=seed)  # nothing half-restored stays
        elif reason is None:
            reason = "the checkpoint holds no env state"
        reasons = [reason] if self.dist is None else self.dist.gather_objects(reason)
        failed = [(r, why) for r, why in enumerate(reasons) if why]
        if failed and self.is_main:
            r, why = failed[0]
            print(
                f"cliprail: warning: {'' if r == 0 else f'rank {r}: '}{why}; the envs restart "
                "from fresh episodes, so this resumed run will not match a straight run bitwise",
                file=sys.stderr,
            )
        return obs

    # --- checkpoints -------------------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        """This rank's RNGs and env-side state: what differs between ranks."""
        np_state: Any = np.random.get_state()
        envs: EnvSnapshot | None = None
        if self.obs is None:
            reason = "saved outside train(), with no observation to continue from"
        else:
            try:
                envs, reason = capture(self.envs, self.obs), None
            except SnapshotError as exc:
                reason = str(exc)
        return {
            "envs": envs,
            "envs_reason": reason,
            "torch": torch.get_rng_state(),
            "shuffle": self.shuffle_rng.get_state(),
            "reward_returns": (
                self.reward_scaler.returns.copy() if self.reward_scaler is not None else None
            ),
            "python_rng": _py_rng_to_json(random.getstate()),
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "acting_rng": self.np_rng.bit_generator.state,
        }

    def _checkpoint_path(self) -> Path:
        """The folder :meth:`save` writes for the current update (the same on every rank)."""
        return self.run_dir / "checkpoints" / f"update_{self.update_idx:07d}"

    def save(self) -> Path | None:
        """Checkpoint everything the next update depends on: weights, Adam state, normaliser
        statistics, every RNG, counters, the KL controller, episode statistics, and the envs'
        state with the observation to continue from (:mod:`cliprail.rl.envstate`), or
        ``"envs_exact": false`` and the reason in ``state.json`` when it cannot be captured.

        A collective under torchrun: every rank hands its RNG and env states to rank 0, which
        alone writes (rank 0's under the single-process names, rank r's under ``.rank{r}``
        names and ``state["ranks"]``); returns the folder on rank 0, None elsewhere.
        """
        ranks = [self._rank_state()]
        if self.dist is not None:
            ranks = self.dist.gather_objects(ranks[0])
            if not self.dist.all_same(self.flat_params.data):  # cheap guard, once per save
                raise RuntimeError("the ranks' parameters differ: data-parallel state diverged")
        if not self.is_main:
            return None
        own = ranks[0]
        rng = {"torch": own["torch"], "shuffle": own["shuffle"]}
        tensors: dict[str, dict[str, Tensor]] = {"model": dict(self.agent.state_dict()), "rng": rng}
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
            norm["reward.returns"] = torch.from_numpy(own["reward_returns"])
        per_rank: dict[str, Any] = {}
        for r, rs in enumerate(ranks[1:], start=1):
            rng[f"torch.rank{r}"], rng[f"shuffle.rank{r}"] = rs["torch"], rs["shuffle"]
            if rs["reward_returns"] is not None:
                norm[f"reward.returns.rank{r}"] = torch.from_numpy(rs["reward_returns"])
            per_rank[str(r)] = {k: rs[k] for k in ("python_rng", "numpy_rng", "acting_rng")}
        if norm:
            tensors["normalizer"] = norm
        env_tensors, env_meta, env_reason = _env_checkpoint(ranks)
        if env_tensors:
            tensors["envs"] = env_tensors
        for r, meta in env_meta.items():
            if r:
                per_rank[str(r)]["envs"] = meta
        state = {
            "global_step": self.global_step,
            "update": self.update_idx,
            "world_size": self.world_size,
            "recent_returns": list(self.recent_returns),
            "recent_lengths": list(self.recent_lengths),
            "kl_controller": self.kl_ctl.state_dict() if self.kl_ctl else None,
            "python_rng": own["python_rng"],
            "numpy_rng": own["numpy_rng"],
            "acting_rng": own["acting_rng"],
            "envs_exact": env_reason is None,
            "envs_reason": env_reason,
        }
        if 0 in env_meta:
            state["envs"] = env_meta[0]
        if per_rank:
            state["ranks"] = per_rank
        return save_checkpoint(
            self.run_dir / "checkpoints", f"update_{self.update_idx:07d}", tensors, state,
            self.optimizer.state_dict(),
        )  # fmt: skip

    def load(self, path: Path) -> None:
        """Restore the state saved by :meth:`save` from checkpoint folder ``path``."""
        self._restore(path, *load_checkpoint(path))

    def _restore(
        self, path: Path, tensors: dict[str, dict[str, Tensor]], state: dict[str, Any], opt: Any
    ) -> None:
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world_size:
            how = (
                f"torchrun with {saved_world} processes in all "
                f"(e.g. --nproc_per_node={saved_world})"
                if saved_world > 1
                else "one process, without torchrun"
            )
            raise ConfigError(
                f"{path}: written by {_processes(saved_world)}, this run has "
                f"{_processes(self.world_size)}; each rank's RNG and env state is saved per rank, "
                f"so resume with the same world size: {how}"
            )
        try:
            self.agent.load_state_dict(tensors["model"])
            if opt is not None:
                self.optimizer.load_state_dict(opt)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path}: does not fit this config's networks ({exc})") from None
        norm = tensors.get("normalizer", {})
        load_normalizers(norm, self.obs_norm, self.reward_scaler)
        sfx = f".rank{self.rank}" if self.rank else ""  # rank 0 keeps the single-process names
        if self.reward_scaler is not None and sfx:
            self.reward_scaler.returns = norm[f"reward.returns{sfx}"].numpy().copy()
        rng = tensors.get("rng", {})
        if f"shuffle{sfx}" in rng:
            self.shuffle_rng.set_state(rng[f"shuffle{sfx}"])
        self.global_step, self.update_idx = int(state["global_step"]), int(state["update"])
        self.recent_returns.extend(state.get("recent_returns", []))
        self.recent_lengths.extend(state.get("recent_lengths", []))
        if self.kl_ctl is not None and state.get("kl_controller"):
            self.kl_ctl.load_state_dict(state["kl_controller"])
        own = state["ranks"][str(self.rank)] if self.rank else state
        if own.get("acting_rng"):
            self.np_rng.bit_generator.state = own["acting_rng"]
        torch_rng = rng.get(f"torch{sfx}")

        def set_global_rngs() -> None:
            if torch_rng is not None:
                torch.set_rng_state(torch_rng)
            if own.get("python_rng"):
                random.setstate(_py_rng_from_json(own["python_rng"]))
            if own.get("numpy_rng"):
                s = own["numpy_rng"]
                np.random.set_state((s[0], np.asarray(s[1], dtype=np.uint32), *s[2:]))

        set_global_rngs()
        self._global_rngs = set_global_rngs  # train() sets them again before the first update
        self._saved_envs = _saved_envs(path, state, own, tensors.get("envs", {}), sfx)


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def _env_checkpoint(
    ranks: list[dict[str, Any]],
) -> tuple[dict[str, Tensor], dict[int, dict[str, Any]], str | None]:
    """Every rank's env snapshot as one tensor group (rank r's names end in ``.rank{r}``),
    each rank's JSON meta, and the first reason a rank's envs could not be captured."""
    tensors: dict[str, Tensor] = {}
    metas: dict[int, dict[str, Any]] = {}
    reason = None
    for r, rs in enumerate(ranks):
        snap, why = rs["envs"], rs["envs_reason"]
        if snap is not None:
            try:
                part, metas[r] = snap.to_checkpoint(f".rank{r}" if r else "")
                tensors.update(part)
            except SnapshotError as exc:
                why = str(exc)
        if why is not None and reason is None:
            reason = why if r == 0 else f"rank {r}: {why}"
    if reason is not None:  # all ranks exact or none: a half-exact resume is not exact
        return {}, {}, reason
    return tensors, metas, None


def _saved_envs(
    path: Path, state: dict[str, Any], own: dict[str, Any], tensors: dict[str, Tensor], sfx: str
) -> EnvSnapshot | str:
    """This rank's env snapshot in checkpoint ``path``, or why there is none."""
    meta = own.get("envs")
    if meta is None:
        why = state.get("envs_reason") or "written before cliprail saved env state"
        return f"{path} holds no exact env state ({why})"
    try:
        return EnvSnapshot.from_checkpoint(tensors, meta, sfx)
    except SnapshotError as exc:
        return f"{path}: its env state is unreadable ({exc})"


def _read_latest(
    ckpt_root: Path,
) -> tuple[Path, tuple[dict[str, dict[str, Tensor]], dict[str, Any], Any]]:
    """The newest valid checkpoint under ``ckpt_root`` and its contents."""
    path = latest_checkpoint(ckpt_root)
    return path, load_checkpoint(path)


def make_adam(params: Any, lr: float, eps: float) -> torch.optim.Optimizer:
    """Adam, with the fused kernel where this torch build has it (CPU and CUDA)."""
    return fused_or_plain(torch.optim.Adam, params, lr=lr, eps=eps)


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
