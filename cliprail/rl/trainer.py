"""The Gymnasium PPO trainer: rollout -> GAE -> epochs x minibatches -> log -> checkpoint.

It composes the pure maths of :mod:`cliprail.ppo`; nothing here re-derives a loss. Reading order:
``RLTrainer.__init__`` (build), ``collect`` (one rollout), ``update`` (one PPO update), ``train``
and ``_loop`` (the loop). What a checkpoint holds is :mod:`cliprail.rl.checkpointing`, saved and
restored through the one resume layer (:mod:`cliprail.resume`); ``cliprail rl eval`` is
:mod:`cliprail.rl.evaluate`.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs this same loop on its own envs and seed
(``seed + rank``); :class:`cliprail.distributed.Distributed` supplies what they must agree on
(gradients, early stop and skips, whitening, normalisation statistics, logged metrics, stops),
and rank 0 alone writes the run folder. With one process the same object has world size 1 and
each of those calls is the single-process computation.
"""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cliprail.distributed import Distributed
from cliprail.errors import CheckpointError
from cliprail.interrupt import StopRequest
from cliprail.monitor import MetricsLogger, Progress
from cliprail.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_surrogate,
    entropy_bonus,
    flatten_parameters,
    fused_or_plain,
    gae,
    kl_penalized_surrogate,
    linear_anneal,
    plain_surrogate,
    ppo_update,
    set_learning_rate,
    value_loss,
)
from cliprail.resume import (
    Checkpointer,
    RandomStreams,
    Restored,
    check_run,
    resume_step,
    seed_everything,
    write_config,
)
from cliprail.rl import checkpointing
from cliprail.rl.agent import ActorCritic, NumpyPolicy
from cliprail.rl.config import RESUMABLE, RLConfig, derived, validate
from cliprail.rl.envs import EnvActions, SpaceSpec, make_vector_env, space_spec
from cliprail.rl.evaluate import finished_episodes
from cliprail.rl.normalize import ObsNormalizer, RewardScaler, SyncedRunningMeanStd

EVAL_CHUNK = 1024  # rows per batched no-grad pass over a rollout


def default_run_dir(cfg: RLConfig) -> Path:
    return Path("runs") / f"{cfg.env_id.replace('/', '_')}__{cfg.preset}__s{cfg.seed}"


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
        # Launched by torchrun: join the process group (gloo on CPU, NCCL on CUDA); else one
        # process, whose collectives are the identity.
        self.dist = Distributed.from_env(cfg.device)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.sizes = derived(cfg, self.world_size)
        self.run_dir = cfg.run_dir if cfg.run_dir is not None else default_run_dir(cfg)
        # rank 0 alone reads and writes the run folder; its verdict (or error) reaches every rank
        self.dist.from_main(lambda: check_run(self.run_dir, cfg, RESUMABLE))
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        seed_everything(cfg.seed + self.rank)
        self.device = self.dist.device
        self.envs = make_vector_env(cfg)
        self.spec: SpaceSpec = space_spec(
            self.envs.single_observation_space, self.envs.single_action_space, cfg.env_id
        )
        self.agent = ActorCritic(self.spec, cfg).to(self.device)
        # One flat buffer for all parameters: Adam, grad clip and zeroing become one op each.
        self.flat_params = flatten_parameters(self.agent)
        self.dist.broadcast_([self.flat_params.data, *self.agent.buffers()])  # rank 0's start
        self.optimizer = fused_or_plain(
            torch.optim.Adam, [self.flat_params], lr=cfg.learning_rate, eps=cfg.adam_eps
        )
        self.shuffle_rng = torch.Generator().manual_seed(cfg.seed + self.rank)
        self.np_rng = np.random.default_rng(cfg.seed + self.rank)  # the NumPy acting samples
        self.streams = RandomStreams(
            generators={"shuffle": self.shuffle_rng},
            np_generators={"acting": self.np_rng},
            cuda=self.device if self.device.type == "cuda" else None,
        )
        synced = self.dist.distributed  # statistics merged across ranks after each rollout
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
        # The raw observation the next rollout starts from (set by the loop; saved with the
        # envs' state so a resumed run continues the same episodes).
        self.obs: np.ndarray | None = None
        self.ckpt = Checkpointer(
            self.run_dir,
            self.dist,
            cfg.checkpoint_every,
            prefix="update",
            width=7,
            keep_last=3,
            fault="rl-update",
        )
        self._alloc_buffers()
        self._env_actions = EnvActions(self.spec)
        self._compiled: Callable[..., tuple[Tensor, dict[str, Tensor]]] | None = (
            torch.compile(self._loss_terms, dynamic=False) if cfg.compile else None
        )

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that writes the run folder (and with one process)."""
        return self.dist.is_main

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
                episodes += [(ret, length) for _, ret, length in finished_episodes(info)]
                cut = np.flatnonzero(truncated & ~terminated)
                if cut.size:  # bootstrap from the true last observation (SB3 #633)
                    final = np.stack([info["final_obs"][i] for i in cut])
                    finals.append((t, cut, self._normalize(final, update_stats=False)))
            obs_n = self._normalize(obs, update_stats=True)
        self.global_step += self.sizes.global_batch_size  # every rank's env steps
        rollout = self._finish_rollout(obs_n, finals)
        if self.dist.distributed:  # all ranks normalise the next rollout with the same stats
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
            obs,
            actions,
            logprobs,
            values,
            torch.from_numpy(self.np_rewards).to(dev),
            torch.from_numpy(self.np_terminated).to(dev),
            truncated,
            next_values,
        )

    # --- learning ----------------------------------------------------------------------------
    def _objective(self, clip: float | Tensor) -> Callable[..., tuple[Tensor, dict[str, Tensor]]]:
        cfg = self.cfg
        if cfg.objective == "clip":
            # clip-higher's upper epsilon annealed in proportion with the lower one
            high = (
                None if cfg.clip_range_high is None else cfg.clip_range_high * clip / cfg.clip_range
            )
            return partial(
                clipped_surrogate, clip_range=clip, clip_range_high=high, dual_clip=cfg.dual_clip
            )
        if cfg.objective == "none":
            return partial(plain_surrogate, clip_range=clip)
        assert self.kl_ctl is not None
        return partial(kl_penalized_surrogate, beta=self.kl_ctl.beta, clip_range=clip)

    def _loss_terms(
        self,
        clip: float | Tensor,
        obs: Tensor,
        actions: Tensor,
        old_logprobs: Tensor,
        old_values: Tensor,
        returns: Tensor,
        advantages: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One minibatch's loss (PPO paper eq. 9) and its statistics: the networks' forward and
        the PPO terms, the part ``--compile`` compiles."""
        cfg = self.cfg
        logprobs, entropy, values = self.agent.evaluate(obs, actions)
        pg_loss, stats = self._objective(clip)(logprobs, old_logprobs, advantages)
        v_loss, v_stats = value_loss(values, old_values, returns, clip_range=cfg.clip_range_vf)
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

    def _minibatch_loss(
        self, clip: float | Tensor, *tensors: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`_loss_terms`, compiled under ``--compile``; eager where compiling failed (said
        once on standard error, then eager for the rest of the run)."""
        if self._compiled is None:
            return self._loss_terms(clip, *tensors)
        try:
            return self._compiled(clip, *tensors)
        except Exception as exc:  # torch.compile fails at the first call, in many ways
            if self.is_main:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                print(
                    f"cliprail: --compile: torch.compile failed ({type(exc).__name__}: "
                    f"{first[:200]}); training continues eagerly",
                    file=sys.stderr,
                )
            self._compiled = None
            return self._loss_terms(float(clip), *tensors)

    def update(self, ro: Rollout, clip: float) -> dict[str, float]:
        """One PPO update over ``ro``: GAE, then epochs x minibatches."""
        cfg = self.cfg
        advantages, returns = gae(
            ro.rewards,
            ro.values,
            ro.next_values,
            ro.terminated,
            ro.truncated,
            gamma=cfg.gamma,
            lam=cfg.gae_lambda,
        )
        # Flatten (T, N, ...) -> (T*N, ...)
        batch = {
            "obs": ro.obs.reshape(-1, *self.spec.obs_shape),
            "actions": ro.actions.reshape(-1, ro.actions.shape[-1]),
            "logprobs": ro.logprobs.reshape(-1),
            "values": ro.values.reshape(-1),
            "advantages": advantages.reshape(-1),
            "returns": returns.reshape(-1),
        }
        # --compile: the clip range as a tensor input, so annealing it does not recompile
        clip_arg: float | Tensor = (
            torch.tensor(clip, dtype=torch.float64) if self._compiled else clip
        )  # float64: float(clip_arg) is the clip itself, for the eager fallback
        # Whiten over the global minibatch: this rank's rows and the other ranks' rows of the
        # same step (with one process, masked_whiten itself); outside the compiled loss, as it
        # is a collective under torchrun.
        whiten = self.dist.whiten

        def loss_fn(mb: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            adv = mb["advantages"]
            if cfg.normalize_advantages:
                adv = whiten(adv)
            return self._minibatch_loss(clip_arg, mb["obs"], mb["actions"], mb["logprobs"],
                                        mb["values"], mb["returns"], adv)  # fmt: skip

        result = ppo_update(
            loss_fn,
            self.optimizer,
            [self.flat_params],
            batch,
            minibatch_size=cfg.minibatch_size,
            epochs=cfg.epochs,
            max_grad_norm=cfg.max_grad_norm,
            target_kl=cfg.target_kl,
            generator=self.shuffle_rng,
            sync=self.dist.update_sync(),
        )
        # means (extremes for *_min / *_max) over ranks; the counters below are agreed
        stats = self.dist.reduce_stats(dict(result.stats))
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
            if self.is_main:  # nothing is written before the envs and networks were built
                write_config(self.run_dir, cfg)
            restored = self.ckpt.restore() if cfg.resume else None
            saved_envs = checkpointing.load(self, restored) if restored is not None else None
            obs = checkpointing.reset_envs(self, saved_envs)
            total = sizes.num_updates * sizes.global_batch_size
            bar = Progress(
                total,
                cfg.env_id,
                enabled=cfg.progress and self.is_main,
                completed=self.global_step,
            )
            try:
                with MetricsLogger(
                    self.run_dir,
                    cfg.tensorboard,
                    resume_step(cfg.resume, restored, self.global_step),
                    enabled=self.is_main,
                ) as logger:
                    if restored is not None:  # exactly as saved, whatever set-up drew
                        self.restore_streams(restored)
                    return self._loop(obs, logger, bar, stop)
            finally:
                bar.close()
                self.envs.close()
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
            # every rank's finished episodes, in rank order
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
            self.ckpt.step_end(
                self.update_idx,
                stop,
                self.save,
                f"after update {self.update_idx} of {sizes.num_updates}",
                last=self.update_idx == sizes.num_updates,  # a finished run just finishes
            )
        return last

    # --- checkpoints -------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Checkpoint everything the next update depends on (:mod:`cliprail.rl.checkpointing`).
        A collective under torchrun: every rank hands its own state to rank 0, which alone
        writes; returns the folder on rank 0, None elsewhere."""
        self.dist.check_same([self.agent])  # cheap guard, once per save
        return self.ckpt.save(self.update_idx, checkpointing.snapshot(self))

    def load(self, path: Path) -> None:
        """Restore the checkpoint folder ``path`` (weights, optimizer, statistics, counters and
        random streams; the envs restart fresh)."""
        restored = self.ckpt.restore(path)
        assert restored is not None
        checkpointing.load(self, restored)
        self.restore_streams(restored)

    def restore_streams(self, restored: Restored) -> None:
        """Put this rank's random streams back as ``restored`` holds them."""
        try:
            self.streams.restore(restored.own("rng"), restored.own_state)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"{restored.path}: its random streams are unreadable ({exc})"
            ) from None


def _bar_info(m: dict[str, Any]) -> str:
    ret = m.get("return_last100")
    ret_s = f"return {ret:8.1f}" if ret is not None else "return      n/a"
    return f"{m['steps_per_s']:7.0f} steps/s  {ret_s}"


__all__ = ["RLTrainer", "Rollout", "default_run_dir"]
