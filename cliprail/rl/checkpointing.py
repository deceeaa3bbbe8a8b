"""What a Gymnasium run's checkpoint holds, on top of the one resume layer (:mod:`cliprail.resume`).

Shared by every rank: the weights, Adam's state, the normaliser statistics (merged over ranks),
the counters, the KL controller and the last 100 episodes. Per rank: the random streams (torch,
the shuffle generator, the NumPy acting generator, NumPy's and Python's globals), the reward
scaler's running returns, and the envs' own state with the observation to continue from
(:mod:`cliprail.rl.envstate`; never pickled). Envs are exact on every rank or on none: when one
rank's cannot be captured, none are saved, ``state.json`` says ``"envs_exact": false`` and why,
and a resumed run starts fresh episodes with one warning.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from cliprail.errors import CheckpointError
from cliprail.resume import Restored, Snapshot
from cliprail.rl.envstate import EnvSnapshot, SnapshotError, capture, restore
from cliprail.rl.normalize import ObsNormalizer, RewardScaler

ENV_SEED_STRIDE = 1_000_003  # env reset seeds: seed + rank * num_envs + stride * update index

if TYPE_CHECKING:
    from cliprail.rl.trainer import RLTrainer


def snapshot(tr: RLTrainer) -> Snapshot:
    """Everything the next update of ``tr`` depends on. A collective under torchrun (the ranks
    agree on whether their envs are exact)."""
    envs, meta, reason = _capture_envs(tr)
    reasons = tr.dist.gather_objects(reason)
    failed = [(r, why) for r, why in enumerate(reasons) if why is not None]
    first = None
    if failed:  # all ranks exact or none: a half-exact resume is not exact
        r, why = failed[0]
        first = why if r == 0 else f"rank {r}: {why}"
        envs, meta = {}, None
    rng_tensors, rng_state = tr.streams.capture()
    rank_tensors: dict[str, dict[str, Tensor]] = {"rng": rng_tensors}
    rank_state: dict[str, Any] = dict(rng_state)
    if envs:
        rank_tensors["envs"] = envs
        rank_state["envs"] = meta
    if tr.reward_scaler is not None:
        rank_tensors["returns"] = {"reward": torch.from_numpy(tr.reward_scaler.returns.copy())}
    norm: dict[str, Tensor] = {}
    for name, n in (("obs", tr.obs_norm), ("reward", tr.reward_scaler)):
        if n is not None:
            norm.update(
                {f"{name}.{k}": torch.from_numpy(np.asarray(v)) for k, v in n.rms.state().items()}
            )
    tensors = {"model": dict(tr.agent.state_dict())}
    if norm:
        tensors["normalizer"] = norm
    state = {
        "global_step": tr.global_step,
        "recent_returns": list(tr.recent_returns),
        "recent_lengths": list(tr.recent_lengths),
        "kl_controller": tr.kl_ctl.state_dict() if tr.kl_ctl else None,
        "envs_exact": first is None,
        "envs_reason": first,
    }
    return Snapshot(tensors, state, tr.optimizer.state_dict(), rank_tensors, rank_state)


def _capture_envs(tr: RLTrainer) -> tuple[dict[str, Tensor], dict[str, Any] | None, str | None]:
    if tr.obs is None:
        return {}, None, "saved outside train(), with no observation to continue from"
    try:
        tensors, meta = capture(tr.envs, tr.obs).to_checkpoint()
    except SnapshotError as exc:
        return {}, None, str(exc)
    return tensors, meta, None


def load(tr: RLTrainer, r: Restored) -> EnvSnapshot | str:
    """Put checkpoint ``r`` back into ``tr`` (everything but the random streams, which the
    trainer restores last, just before its first update); returns this rank's saved envs, or
    why there are none."""
    try:
        tr.agent.load_state_dict(r.tensors["model"])
        tr.optimizer.load_state_dict(r.optimizer)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{r.path}: does not fit this config's networks ({exc})") from None
    load_normalizers(r.tensors.get("normalizer", {}), tr.obs_norm, tr.reward_scaler)
    if tr.reward_scaler is not None:
        tr.reward_scaler.returns = r.own("returns")["reward"].numpy().copy()
    tr.global_step, tr.update_idx = int(r.state["global_step"]), r.step
    tr.recent_returns.extend(r.state.get("recent_returns", []))
    tr.recent_lengths.extend(r.state.get("recent_lengths", []))
    if tr.kl_ctl is not None and r.state.get("kl_controller"):
        tr.kl_ctl.load_state_dict(r.state["kl_controller"])
    meta = r.own_state.get("envs")
    if meta is None:
        why = r.state.get("envs_reason") or "the checkpoint holds no env state"
        return f"{r.path} holds no exact env state ({why})"
    try:
        return EnvSnapshot.from_checkpoint(r.own("envs"), meta)
    except SnapshotError as exc:
        return f"{r.path}: its env state is unreadable ({exc})"


def reset_envs(tr: RLTrainer, saved: EnvSnapshot | str | None) -> np.ndarray:
    """Reset ``tr``'s envs and, on resume, put their ``saved`` state back (from :func:`load`);
    returns the observation the first rollout starts from.

    The reset seeds rank r's env i with seed + r * num_envs + i (plus a stride per update
    on resume), as env r * num_envs + i of one process would be. When the checkpoint holds
    no exact env state (``saved`` is why) or it does not fit these envs, the resumed run
    continues from these fresh episodes, and rank 0 prints one warning line saying so.
    """
    cfg = tr.cfg
    seed = cfg.seed + tr.rank * cfg.num_envs + ENV_SEED_STRIDE * tr.update_idx
    obs, _ = tr.envs.reset(seed=seed)
    if not cfg.resume or saved is None:  # a fresh run, or a resume that starts over
        return obs
    reason = saved if isinstance(saved, str) else None
    if isinstance(saved, EnvSnapshot):
        try:
            obs = restore(tr.envs, saved)
        except SnapshotError as exc:
            reason = f"the saved env state does not fit these envs: {exc}"
            obs, _ = tr.envs.reset(seed=seed)  # nothing half-restored stays
    reasons = tr.dist.gather_objects(reason)
    failed = [(r, why) for r, why in enumerate(reasons) if why]
    if failed and tr.is_main:
        r, why = failed[0]
        print(
            f"cliprail: warning: {'' if r == 0 else f'rank {r}: '}{why}; the envs restart "
            "from fresh episodes, so this resumed run will not match a straight run bitwise",
            file=sys.stderr,
        )
    return obs


def load_normalizers(
    norm: dict[str, Tensor], obs_norm: ObsNormalizer | None, reward_scaler: RewardScaler | None
) -> None:
    """Put saved normalisation statistics back into the objects that use them."""
    if obs_norm is not None:
        obs_norm.rms.load({k: norm[f"obs.{k}"].numpy() for k in ("mean", "var", "count")})
    if reward_scaler is not None:
        reward_scaler.rms.load({k: norm[f"reward.{k}"].numpy() for k in ("mean", "var", "count")})
