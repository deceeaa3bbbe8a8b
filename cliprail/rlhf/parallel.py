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

With ``--fsdp`` the trained models are sharded instead of replicated (FSDP2,
:func:`torch.distributed.fsdp.fully_shard`): :meth:`DataParallel.prepare` shards every
transformer block the model declares (its ``_no_split_modules``, e.g. ``GPT2Block``) and then
the rest of the model (embeddings, final norm, heads), so each rank holds ``1/W`` of the
parameters, gradients and Adam state; a block's parameters are all-gathered just before its
forward and backward and the gradients reduce-scattered after. The data sharding and the loss
scaling above are unchanged (FSDP averages gradients over ranks as DDP does). What changes:

* the optimizer is built over the sharded parameters, after :meth:`DataParallel.prepare`;
* passes that are not in lockstep on every rank (generation, whose length depends on the
  prompts; rank 0's evaluations and saves) run inside :meth:`DataParallel.gathered`, which
  unshards the whole model once on every rank and keeps it whole until the block ends, so they
  need no collective;
* checkpoints hold full (unsharded) weights and the optimizer state keyed by parameter name
  (:meth:`DataParallel.module_state`, :meth:`DataParallel.optimizer_state`), so a checkpoint
  or a saved model folder is the same files a 1-process run writes.

:class:`DataParallel` is :class:`cliprail.distributed.Distributed` (the one process-group
layer: ranks, collectives, agreement, rank 0's view of the run folder) plus what only the RLHF
stages need: DDP wrapping, FSDP sharding and gathering, data sharding and loss scaling. With one
process every method is the identity: the single-process path is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Self, TypeVar

import torch
from torch import Tensor

from cliprail.distributed import Distributed
from cliprail.errors import ConfigError
from cliprail.ppo import UpdateSync

T = TypeVar("T")
M = TypeVar("M", bound=torch.nn.Module)


def transformer_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules of ``module`` whose class a Hugging Face model names in its
    ``_no_split_modules`` (its transformer blocks): FSDP's unit of sharding."""
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in module.modules() if m is not module and type(m).__name__ in names]


class DataParallel(Distributed):
    """This process's place in an RLHF job: :class:`Distributed`, plus DDP and FSDP."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        local_rank: int,
        device: torch.device,
        owns_group: bool,
        fsdp: bool = False,
    ) -> None:
        super().__init__(rank, world_size, local_rank, device, owns_group)
        self.fsdp = fsdp
        """Shard the trained models with FSDP2 instead of replicating them under DDP (only with
        more than one rank: one process holds the whole model either way)."""

    @classmethod
    def from_env(cls, device: str = "cpu", fsdp: bool = False) -> Self:
        """Join the job torchrun started (gloo on CPU, NCCL on CUDA), or a single process on
        ``device`` (see :meth:`Distributed.from_env`). Not a collective."""
        dp = super().from_env(device)
        dp.fsdp = fsdp and dp.distributed
        return dp

    # --- models and data --------------------------------------------------------------------
    def prepare(self, module: M) -> M:
        """Under ``--fsdp``: ``module`` sharded in place over the ranks (rank 0's weights, so
        every rank starts equal); build its optimizer after this. Otherwise ``module`` as it is.
        A collective."""
        if not self.fsdp:
            return module
        from torch.distributed.fsdp import fully_shard

        blocks = transformer_blocks(module)
        if not blocks:
            raise ConfigError(
                f"--fsdp: {type(module).__name__} declares no transformer block "
                "class (_no_split_modules) to shard by"
            )
        self.broadcast_([*module.parameters(), *module.buffers()])
        for block in blocks:
            fully_shard(block)
        fully_shard(module)  # the root: embeddings, final norm, heads (tied weights together)
        return module

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module the training passes call: ``module`` under DDP (which broadcasts rank 0's
        parameters and buffers on entry, so every rank starts equal); ``module`` itself for one
        process or under ``--fsdp`` (already sharded by :meth:`prepare`)."""
        if not self.distributed or self.fsdp:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module)

    @contextlib.contextmanager
    def gathered(self, *modules: torch.nn.Module) -> Iterator[None]:
        """Under ``--fsdp``: ``modules`` whole on every rank until the block ends (one
        all-gather per block on entry, none inside), so a pass that is not in lockstep on every
        rank (generation, rank 0's evaluation or save) needs no collective. Gradients must not
        flow inside. A collective on entry; a no-op without FSDP."""
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        fsdp = [m for root in modules for m in root.modules() if isinstance(m, FSDPModule)]
        for m in fsdp:
            m.set_reshard_after_forward(False)
            m.unshard()
        try:
            yield
        finally:
            for m in fsdp:  # back to fully_shard's defaults: a root keeps its parameters
                m.reshard()  # after forward (backward needs them at once), blocks free theirs
                m.set_reshard_after_forward(not any(m is root for root in modules), recurse=False)

    def module_state(self, module: torch.nn.Module) -> dict[str, Tensor]:
        """``module``'s full state dict as plain tensors. Under ``--fsdp`` call it inside
        :meth:`gathered`: it reads the whole parameters every rank holds there (not through
        ``state_dict()``, whose FSDP hook hands back the shards); not a collective."""
        if not self.fsdp:
            return module.state_dict()
        state: dict[str, Tensor] = {}
        for name, sub in module.named_modules(remove_duplicate=False):
            prefix = f"{name}." if name else ""
            for k, p in sub._parameters.items():
                if p is not None:
                    state[prefix + k] = p.detach()
            for k, b in sub._buffers.items():
                if b is not None and k not in sub._non_persistent_buffers_set:
                    state[prefix + k] = b
        return state

    def pretrained_state(self, module: torch.nn.Module) -> dict[str, Any]:
        """Keyword arguments for ``module.save_pretrained`` (inside :meth:`gathered`): the full
        ``state_dict`` under ``--fsdp``, nothing otherwise."""
        return {"state_dict": self.module_state(module)} if self.fsdp else {}

    def load_module_state(self, module: torch.nn.Module, state: dict[str, Tensor]) -> None:
        """Load a full state dict (the same on every rank) into ``module``, sharded or not."""
        if not self.fsdp:
            module.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(
            module, dict[str, Any](state), options=StateDictOptions(full_state_dict=True)
        )

    def optimizer_state(
        self, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        """``optimizer.state_dict()``; under ``--fsdp`` the full state keyed by parameter name
        (``<module name>.<parameter>``), on rank 0 (empty elsewhere). A collective with FSDP."""
        if not self.fsdp or not optimizer.state:  # no step yet: nothing sharded to gather
            return optimizer.state_dict()  # (the gather would run a phantom lr-0 step first)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return dict(get_optimizer_state_dict(torch.nn.ModuleDict(modules), optimizer, options=opts))

    def load_optimizer_state(
        self,
        modules: dict[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
    ) -> None:
        """Load what :meth:`optimizer_state` returned on rank 0 (given on every rank)."""
        if not self.fsdp or not state["state"]:  # saved before any step: as built
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            torch.nn.ModuleDict(modules),
            optimizer,
            state,
            options=StateDictOptions(full_state_dict=True),
        )

    def shard(self, global_idx: list[T]) -> tuple[list[T], bool]:
        """This rank's rows of a global batch: ``global_idx[rank::W]``, and whether they are
        real. A rank left without rows (a last batch smaller than W) gets the batch's first row
        with ``False``: it still runs forward and backward, which DDP needs on every rank, and
        :meth:`loss_scale` of 0 makes that row weigh nothing."""
        mine = global_idx[self.rank :: self.world_size]
        return (mine, True) if mine else (global_idx[:1], False)

    def loss_scale(self, local_count: float) -> float:
        """``W x local_count / global_count``: the factor that turns this rank's mean loss over
        its ``local_count`` tokens (or pairs) into its share of the global mean, once DDP has
        averaged the gradients over ranks. 1.0 for one process. A collective."""
        if not self.distributed:
            return 1.0
        total = float(self.mean(torch.tensor([float(local_count)], dtype=torch.float64)))
        total *= self.world_size
        return self.world_size * float(local_count) / total if total > 0 else 0.0

    def map_rows(self, fn: Callable[[list[Any]], Tensor], rows: list[Any]) -> Tensor:
        """``fn(rows)`` with the rows shared out: rank r computes ``fn(rows[r::W])`` and the
        results are gathered back into row order (a frozen model's pass over a dataset, split
        W ways). A collective."""
        if not self.distributed:
            return fn(rows)
        parts = self.gather_objects(fn(rows[self.rank :: self.world_size]))
        out = torch.empty((len(rows), *parts[0].shape[1:]), dtype=parts[0].dtype)
        for r, part in enumerate(parts):
            out[r :: self.world_size] = part
        return out

    # --- agreement --------------------------------------------------------------------------
    def update_sync(self) -> UpdateSync | None:
        """The :func:`cliprail.ppo.ppo_update` hooks: the early stop and non-finite skip agreed
        over ranks; no gradient averaging, which DDP's (or FSDP's) backward already did."""
        if not self.distributed:
            return None
        return UpdateSync(average_gradients=lambda grads: None, mean=self.mean)

    def check_same(self, modules: Sequence[torch.nn.Module]) -> None:
        """:meth:`Distributed.check_same`, except under ``--fsdp`` (each rank holds its own
        shard, so there is nothing to compare)."""
        if not self.fsdp:
            super().check_same(modules)


__all__ = ["DataParallel", "transformer_blocks"]
