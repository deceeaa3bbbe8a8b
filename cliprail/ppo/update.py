"""The reuse window: several epochs of shuffled minibatch updates over one rollout batch.

:func:`ppo_update` knows nothing about networks or data layout. The caller gives it a batch (a dict
of tensors sharing their first dimension) and a ``loss_fn`` that maps a minibatch of it to
``(loss, stats)``; the loop shuffles, slices, steps
the optimizer once per minibatch (TRL #5645 stepped once per epoch), clips the global gradient
norm, skips non-finite minibatches and stops early on approximate KL.

Data parallelism enters through one optional argument, ``sync`` (an :class:`UpdateSync`): the
gradient average after each backward (what DDP does) and a mean over workers of the two scalars
that decide the control flow (approx KL and "was my loss finite"), so every worker takes the same
branch at every minibatch. The callables come from :mod:`cliprail.distributed`; this module stays
free of any process-group code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cliprail.ppo.losses import Stats


@dataclass(frozen=True)
class UpdateSync:
    """How :func:`ppo_update` keeps data-parallel workers in lockstep (None: one worker).

    Each worker calls :func:`ppo_update` with its own shard of the batch, the same
    ``minibatch_size`` (per worker) and ``epochs``; both hooks are collectives, so every worker
    must reach them in the same order, which the agreed decisions below guarantee.
    """

    average_gradients: Callable[[list[Tensor]], None]
    """Replace each gradient tensor by its mean over the workers, in place (DDP's all-reduce).
    Called after ``backward`` and before the global-norm clip, so the clip, the finiteness check
    and the optimizer step see the same gradient on every worker."""
    mean: Callable[[Tensor], Tensor]
    """The mean over the workers of a small 1-D float tensor; the same values on every worker.
    Used once per minibatch for ``[approx_kl, loss_not_finite]``: the early stop reads the
    global minibatch's approx KL (equal shards: the mean of the shard means), and one worker's
    non-finite loss makes every worker skip the minibatch."""


class NonFiniteError(RuntimeError):
    """Too many minibatches in a row produced a non-finite loss or gradient."""


@dataclass
class UpdateResult:
    """What one call of :func:`ppo_update` did.

    ``stats`` holds the mean over the minibatches that stepped of every stat the loss returned,
    plus ``loss`` and ``grad_norm`` (before clipping). Empty when no minibatch stepped.
    """

    stats: dict[str, float] = field(default_factory=dict)
    optimizer_steps: int = 0
    epochs_completed: int = 0
    early_stopped: bool = False
    skipped_nonfinite: int = 0


def linear_anneal(start: float, progress: float, end: float = 0.0) -> float:
    """Linear schedule from ``start`` (progress 0) to ``end`` (progress 1); the PPO paper's
    Atari setting anneals the learning rate and the clip range this way (Table 5, alpha)."""
    progress = min(max(progress, 0.0), 1.0)
    return start + (end - start) * progress


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def _check_sizes(batch_size: int, minibatch_size: int) -> None:
    if minibatch_size <= 0 or batch_size % minibatch_size != 0:
        raise ValueError(
            f"minibatch_size {minibatch_size} must be positive and divide batch_size {batch_size}"
        )


def _batch_size(batch: Mapping[str, Tensor]) -> int:
    sizes = {k: v.shape[0] for k, v in batch.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise ValueError(f"ppo_update: batch tensors must share their first dimension, got {sizes}")
    return next(iter(sizes.values()))


def ppo_update(
    loss_fn: Callable[[dict[str, Tensor]], tuple[Tensor, Stats]],
    optimizer: torch.optim.Optimizer,
    params: Iterable[Tensor],
    batch: Mapping[str, Tensor],
    *,
    minibatch_size: int,
    epochs: int,
    max_grad_norm: float | None = 0.5,
    target_kl: float | None = None,
    generator: torch.Generator | None = None,
    max_nonfinite_in_row: int = 10,
    sync: UpdateSync | None = None,
    group_size: int = 1,
) -> UpdateResult:
    """Run ``epochs`` passes of shuffled minibatch updates over ``batch``.

    Args:
        loss_fn: maps a minibatch (the same keys as ``batch``, ``minibatch_size`` rows each) to
            ``(loss, stats)``. ``stats`` may hold ``approx_kl`` (a scalar tensor), which the
            early stop reads.
        optimizer: stepped exactly once per minibatch that is not skipped.
        params: the parameters the optimizer trains: their gradients are zeroed in place before
            each backward and their global norm is clipped (a flat parameter from
            :func:`cliprail.ppo.flat.flatten_parameters` makes each of these one op).
        batch: name -> tensor, all sharing the first dimension (samples: env steps, or
            sequences in RLHF). Each epoch permutes every tensor once, then minibatches are
            contiguous slices (views, no gather per minibatch).
        minibatch_size: rows per optimizer step; must divide the batch size.
        epochs: passes over the batch (the reuse window, the paper's K).
        max_grad_norm: clip the global L2 norm of the gradients to this; None disables.
        target_kl: when a minibatch's ``approx_kl`` exceeds this, stop the whole update before
            stepping on that minibatch (SB3 tests against 1.5 x its ``target_kl``; here the
            threshold is the number given). None disables.
        generator: the RNG of the shuffles, for determinism.
        max_nonfinite_in_row: raise :class:`NonFiniteError` after this many consecutive
            minibatches with a non-finite loss or gradient norm; such minibatches are skipped and
            never reach the weights.
        sync: data-parallel hooks (:class:`UpdateSync`); None, the default, is one worker and
            exactly the behaviour without it. With it, ``batch`` is this worker's shard, the
            gradients are averaged over workers before clipping, and the early stop and the
            non-finite skip are decided on values agreed by all workers. ``stats`` stay local
            (the caller averages them over workers for logging).
        group_size: rows ``i * G .. i * G + G - 1`` are one group (the G responses to one prompt
            of GRPO and RLOO) and stay together: the shuffle permutes whole groups, so every
            minibatch holds whole groups. Must divide ``minibatch_size``. 1 (the default)
            shuffles rows, with exactly the same draws as before groups existed.

    Returns:
        An :class:`UpdateResult`.
    """
    params = [p for p in params if p.requires_grad]
    batch_size = _batch_size(batch)
    _check_sizes(batch_size, minibatch_size)
    if group_size < 1 or minibatch_size % group_size:
        raise ValueError(
            f"group_size {group_size} must be positive and divide minibatch_size {minibatch_size}"
        )
    result = UpdateResult()
    logged: dict[str, list[Tensor]] = {}
    nonfinite_in_row = 0
    for _epoch in range(epochs):
        perm = torch.randperm(batch_size // group_size, generator=generator)
        if group_size > 1:  # whole groups: group k's rows k*G .. k*G+G-1, in order
            perm = (perm[:, None] * group_size + torch.arange(group_size)).flatten()
        shuffled = {k: v[perm.to(v.device)] for k, v in batch.items()}
        for start in range(0, batch_size, minibatch_size):
            minibatch = {k: v[start : start + minibatch_size] for k, v in shuffled.items()}
            loss, stats = loss_fn(minibatch)
            finite = bool(torch.isfinite(loss))
            if sync is None:
                approx_kl = float(stats.get("approx_kl", 0.0))
            else:  # one collective: the global approx KL and "any worker non-finite"
                approx_kl, finite = _agree(sync, stats, finite)
            if target_kl is not None and approx_kl > target_kl:
                result.early_stopped = True
                break
            zero_grads(params)
            if finite:
                loss.backward()
                if sync is not None:
                    sync.average_gradients([p.grad for p in params if p.grad is not None])
                grad_norm = clip_grad_norm(params, max_grad_norm)
                finite = bool(torch.isfinite(grad_norm))
            if not finite:
                zero_grads(params)
                result.skipped_nonfinite += 1
                nonfinite_in_row += 1
                if nonfinite_in_row >= max_nonfinite_in_row:
                    raise NonFiniteError(
                        f"{nonfinite_in_row} minibatches in a row had a non-finite loss or "
                        "gradient; the weights were left as they were before them"
                    )
                continue
            nonfinite_in_row = 0
            optimizer.step()
            result.optimizer_steps += 1
            # stats are detached by contract; only the loss carries a graph
            for name, value in (("loss", loss.detach()), ("grad_norm", grad_norm), *stats.items()):
                logged.setdefault(name, []).append(value)
        else:
            result.epochs_completed += 1
            continue
        break
    if logged:
        names = list(logged)
        means = torch.stack([torch.stack(logged[k]).float().mean().cpu() for k in names])
        result.stats = dict(zip(names, means.tolist(), strict=True))
    return result


def _agree(sync: UpdateSync, stats: Stats, finite: bool) -> tuple[float, bool]:
    """``(approx KL of the global minibatch, every worker's loss finite)``, the same on all
    workers. A NaN approx KL (a non-finite worker) never triggers the early stop; the skip does."""
    local = torch.tensor([float(stats.get("approx_kl", 0.0)), 0.0 if finite else 1.0])
    agreed = sync.mean(local).tolist()
    return agreed[0], agreed[1] == 0.0


def zero_grads(params: list[Tensor]) -> None:
    """Zero the gradients of ``params`` in place (one foreach op). In place, not set to None,
    so flat-buffer gradient views (:func:`cliprail.ppo.flat.flatten_parameters`) stay bound."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_zero_(grads)


def clip_grad_norm(params: list[Tensor], max_norm: float | None) -> Tensor:
    """Global L2 norm of the gradients of ``params`` (returned, before clipping); scales them
    to ``max_norm`` when above it (Huang et al. 2022, detail #11). ``None`` only measures."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if len(grads) == 1:
        total = torch.linalg.vector_norm(grads[0])
    else:
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_norm is not None:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    full = getattr(total, "full_tensor", None)  # FSDP's sharded gradients: a replicated DTensor
    return full() if full is not None else total


def fused_or_plain(
    cls: type[torch.optim.Optimizer], params: Iterable[Tensor], **kwargs: Any
) -> torch.optim.Optimizer:
    """``cls(params, fused=True, **kwargs)``: one kernel for all parameters instead of a dozen
    small ops per tensor; the plain implementation (the same maths) where this torch build or
    these parameters (their device or dtype) have no fused kernel."""
    params = list(params)
    try:
        return cls(params, fused=True, **kwargs)  # type: ignore[call-arg]
    except (RuntimeError, TypeError):
        return cls(params, **kwargs)
