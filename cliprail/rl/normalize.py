"""Running statistics for observation normalisation and reward scaling.

The statistics live in the trainer, not inside env wrappers, so they are saved with checkpoints,
restored at evaluation and merged across distributed ranks with one formula
(:class:`SyncedRunningMeanStd`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class RunningMeanStd:
    """Mean and variance over a stream of batches (Chan et al.'s parallel algorithm), float64."""

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4) -> None:
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = epsilon  # a tiny prior count, as baselines do, so var starts at 1

    def update(self, x: np.ndarray) -> None:
        """Fold in a batch ``x`` of shape ``(N, *shape)``."""
        if x.shape[0] == 1:  # one env, once per step: Welford's single-sample update, 5 ops
            delta = x[0] - self.mean
            total = self.count + 1.0
            self.mean = self.mean + delta / total
            self.var = (self.var + delta * delta / total) * (self.count / total)
            self.count = total
        else:
            self.merge(x.mean(axis=0), x.var(axis=0), x.shape[0])

    def merge(self, batch_mean: np.ndarray, batch_var: np.ndarray, batch_count: float) -> None:
        """Fold in another stream's moments (also how ranks' statistics combine)."""
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean = self.mean + delta * batch_count / total
        m2 = (
            self.var * self.count
            + batch_var * batch_count
            + delta**2 * self.count * batch_count / total
        )
        self.var = m2 / total
        self.count = total

    def state(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "var": self.var, "count": np.array(self.count, np.float64)}

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.mean = np.asarray(state["mean"], np.float64).copy()
        self.var = np.asarray(state["var"], np.float64).copy()
        self.count = float(state["count"])


class SyncedRunningMeanStd(RunningMeanStd):
    """Running statistics shared by data-parallel ranks.

    Between syncs each rank folds its own samples into the statistics it normalises with (as a
    single process does) and, separately, into ``pending``: the moments of this rank's samples
    since the last sync. :meth:`sync` (a collective: every rank calls it, once per rollout)
    restarts from the statistics agreed at the last sync and merges every rank's ``pending``
    into them in rank order with :meth:`RunningMeanStd.merge`, so afterwards all ranks hold the
    same statistics, bitwise, equal (to float rounding) to one stream over all ranks' samples.
    The prior count is counted once, not once per rank.
    """

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4) -> None:
        super().__init__(shape, epsilon)
        self.pending = RunningMeanStd(shape, epsilon=0.0)
        self._agreed = {k: np.copy(v) for k, v in self.state().items()}

    def update(self, x: np.ndarray) -> None:
        super().update(x)
        self.pending.update(x)

    def sync(self, gather: Callable[[np.ndarray], list[np.ndarray]]) -> None:
        """Merge every rank's pending moments; ``gather`` maps this rank's float64 vector to
        all ranks' vectors in rank order (:meth:`cliprail.distributed.Distributed.gather_arrays`).
        """
        size = self.mean.size
        packed = np.concatenate(
            [self.pending.mean.ravel(), self.pending.var.ravel(), [self.pending.count]]
        )
        self.load(self._agreed)
        for part in gather(packed):
            count = float(part[-1])
            if count > 0:
                shape = self.mean.shape
                self.merge(part[:size].reshape(shape), part[size : 2 * size].reshape(shape), count)
        self._agreed = {k: np.copy(v) for k, v in self.state().items()}

    def load(self, state: dict[str, np.ndarray]) -> None:
        super().load(state)
        self.pending = RunningMeanStd(self.mean.shape, epsilon=0.0)
        self._agreed = {k: np.copy(v) for k, v in self.state().items()}


class ObsNormalizer:
    """``clip((obs - mean) / sqrt(var + eps), -clip, clip)`` with running statistics
    (:class:`SyncedRunningMeanStd` when ``synced``: data-parallel ranks merge them)."""

    def __init__(
        self, shape: tuple[int, ...], clip: float, eps: float = 1e-8, synced: bool = False
    ) -> None:
        self.rms = SyncedRunningMeanStd(shape) if synced else RunningMeanStd(shape)
        self.clip, self.eps = clip, eps

    def __call__(self, obs: np.ndarray, update: bool = True) -> np.ndarray:
        if update:
            self.rms.update(obs)
        out = (obs - self.rms.mean) / np.sqrt(self.rms.var + self.eps)
        # np.minimum/np.maximum: the same as np.clip without its Python-level dispatch cost
        return np.minimum(np.maximum(out, -self.clip), self.clip).astype(np.float32)


class RewardScaler:
    """Divide rewards by the running std of the discounted return (not shifted by its mean), then
    clip; the return resets at each episode end (baselines' VecNormalize, Huang et al. 2022).
    With ``synced`` the return statistics are merged across ranks; ``returns`` stays per rank."""

    def __init__(
        self, num_envs: int, gamma: float, clip: float, eps: float = 1e-8, synced: bool = False
    ) -> None:
        self.rms = SyncedRunningMeanStd(()) if synced else RunningMeanStd(())
        self.returns = np.zeros(num_envs, np.float64)
        self.gamma, self.clip, self.eps = gamma, clip, eps

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        self.returns = self.returns * self.gamma + rewards
        self.rms.update(self.returns)
        scaled = rewards / np.sqrt(self.rms.var + self.eps)
        self.returns[dones] = 0.0
        return np.minimum(np.maximum(scaled, -self.clip), self.clip).astype(np.float32)
