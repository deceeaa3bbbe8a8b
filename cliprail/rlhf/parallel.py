"""The RLHF stages under ``torchrun``: data parallelism with DistributedDataParallel.

``torchrun --nproc_per_node=N -m cliprail rlhf {sft,reward,dpo,ppo} ...`` starts N copies of the
stage. Each rank reads the same input files and model folders (on every node), and:

* **shards the data**: every rank draws the same *global* batch (the same shuffle of the
  examples or pairs, the same sample of PPO prompts, from the same seed) and keeps the rows
  ``rank, rank + W, ...`` of it, so ``--batch-size`` is per rank and the global batch is
  ``W x --batch-size``;
* **trains under DDP**: the trained models (policy, value, reward model) are wrapped in
  :class:`torch.nn.parallel.DistributedDataParallel` for their training forward passes, which
  averages the gradients during backward (its buckets overlap the all-reduce with backward on
  GPUs). Generation, evaluation and saving use the unwrapped module;
* **normalises losses globally**: DDP averages per-rank gradients, so a per-rank mean loss would
  weigh a rank's tokens by ``1 / its token count``. Each rank scales its loss by
  ``W x local_count / global_count`` (:meth:`DataParallel.loss_scale`), which makes the average
  exactly the mean over the global batch's tokens (or pairs): a W-rank step with B per rank
  equals a 1-process step with W x B;
* keeps the **frozen reference and reward models** on every rank, in inference mode;
* computes PPO's advantage whitening over the global batch
  (:meth:`cliprail.distributed.Distributed.whiten`), agrees on early stops and skipped
  minibatches (:class:`cliprail.ppo.UpdateSync`), and reduces the logged metrics over ranks;
* lets **rank 0 alone write** the run folder (config, metrics, checkpoints, models) and run the
  held-out evaluations (PPO's fuse, DPO's per-epoch evaluations), whose decisions it broadcasts.

With one process :meth:`DataParallel.from_env` returns a :class:`DataParallel` with
``dist=None``, and every method is the identity: the single-process path is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from cliprail.distributed import Distributed
from cliprail.ppo import UpdateSync, masked_whiten

T = TypeVar("T")


@dataclass
class DataParallel:
    """This process's place in an RLHF job (``dist`` is None for a single process)."""

    dist: Distributed | None

    @classmethod
    def from_env(cls) -> DataParallel:
        """Join the job torchrun started (gloo: the RLHF stages run on CPU), or a single
        process. Not a collective."""
        return cls(Distributed.from_env("cpu"))

    @property
    def rank(self) -> int:
        return self.dist.rank if self.dist is not None else 0

    @property
    def world(self) -> int:
        return self.dist.world_size if self.dist is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.dist is not None:
            self.dist.close()

    # --- models and data --------------------------------------------------------------------
    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under DDP (which broadcasts rank 0's parameters and buffers on entry, so
        every rank starts equal); ``module`` itself for one process."""
        if self.dist is None:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module)

    def shard(self, global_idx: list[T]) -> tuple[list[T], bool]:
        """This rank's rows of a global batch: ``global_idx[rank::W]``, and whether they are
        real. A rank left without rows (a last batch smaller than W) gets the batch's first row
        with ``False``: it still runs forward and backward, which DDP needs on every rank, and
        :meth:`loss_scale` of 0 makes that row weigh nothing."""
        mine = global_idx[self.rank :: self.world]
        return (mine, True) if mine else (global_idx[:1], False)

    def loss_scale(self, local_count: float) -> float:
        """``W x local_count / global_count``: the factor that turns this rank's mean loss over
        its ``local_count`` tokens (or pairs) into its share of the global mean, once DDP has
        averaged the gradients over ranks. 1.0 for one process. A collective."""
        if self.dist is None:
            return 1.0
        total = float(self.dist.mean(torch.tensor([float(local_count)], dtype=torch.float64)))
        total *= self.world
        return self.world * float(local_count) / total if total > 0 else 0.0

    def map_rows(self, fn: Callable[[list[Any]], Tensor], rows: list[Any]) -> Tensor:
        """``fn(rows)`` with the rows shared out: rank r computes ``fn(rows[r::W])`` and the
        results are gathered back into row order (a frozen model's pass over a dataset, split
        W ways). A collective."""
        if self.dist is None:
            return fn(rows)
        parts = self.gather(fn(rows[self.rank :: self.world]))
        out = torch.empty((len(rows), *parts[0].shape[1:]), dtype=parts[0].dtype)
        for r, part in enumerate(parts):
            out[r :: self.world] = part
        return out

    # --- agreement --------------------------------------------------------------------------
    def mean_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Logged statistics averaged over ranks (``*_min``/``*_max``: extremes). Collective."""
        return stats if self.dist is None else self.dist.reduce_stats(stats)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank. A collective."""
        if self.dist is None:
            return flag
        return float(self.dist.mean(torch.tensor([1.0 if flag else 0.0]))) > 0.0

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 alone, its result on every rank (see
        :meth:`cliprail.distributed.Distributed.from_main`)."""
        return fn() if self.dist is None else self.dist.from_main(fn)

    def whiten(self, x: Tensor, mask: Tensor) -> Tensor:
        """Masked whitening over the global batch (every rank's entries)."""
        return masked_whiten(x, mask) if self.dist is None else self.dist.whiten(x, mask)

    def update_sync(self) -> UpdateSync | None:
        """The :func:`cliprail.ppo.ppo_update` hooks under DDP: the early stop and non-finite
        skip agreed over ranks; gradients are already averaged by DDP's backward."""
        if self.dist is None:
            return None
        return UpdateSync(average_gradients=lambda grads: None, mean=self.dist.mean)

    def check_same(self, modules: list[torch.nn.Module]) -> None:
        """Raise unless the parameters of ``modules`` are bitwise equal on every rank (a guard
        at each checkpoint: data-parallel replicas must never drift). A collective."""
        if self.dist is None:
            return
        flat = torch.cat([p.detach().reshape(-1).float() for m in modules
                          for p in m.parameters()])  # fmt: skip
        if not self.dist.all_same(flat):
            raise RuntimeError("the ranks' parameters differ: data-parallel state diverged")

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's small picklable ``obj`` in rank order (``[obj]`` for one process)."""
        return [obj] if self.dist is None else self.dist.gather_objects(obj)


__all__ = ["DataParallel"]
