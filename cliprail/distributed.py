"""Data parallelism with torch.distributed: one process per rank, launched by ``torchrun``.

``torchrun --nproc_per_node=N -m cliprail rl train ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment.
:meth:`Distributed.from_env` turns that into a process group (gloo on CPU, NCCL on CUDA, one GPU
per local rank). An ordinary single-process run gets a :class:`Distributed` of world size 1,
whose every method is the identity (or the single-process function it generalises, e.g.
:func:`cliprail.ppo.masked_whiten`) without touching torch.distributed: trainers never branch on
whether they are distributed. The RLHF stages' DDP/FSDP wrapping is a layer on top
(:class:`cliprail.rlhf.parallel.DataParallel`).

Everything a trainer must agree on across ranks goes through here:

* the gradient average after each backward (:meth:`Distributed.update_sync`, one all-reduce of
  the flat gradient buffer: what DDP does with its buckets);
* the scalars that steer :func:`cliprail.ppo.ppo_update` (approx-KL early stop, non-finite
  skip), also in :meth:`Distributed.update_sync`;
* statistics over the *global* batch: advantage whitening (:meth:`Distributed.whiten`) and the
  explained variance, from per-rank moments merged with Chan et al.'s formula
  (:func:`local_moments`, :func:`merge_moments`), under the masked convention of
  :mod:`cliprail.ppo.masked`;
* objects: episode returns gathered for logging, per-rank RNG states gathered for checkpoints,
  and rank 0's view of the run folder broadcast to the others (:meth:`Distributed.from_main`).

The moment maths are pure functions of tensors, tested without a process group.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Self, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from cliprail.errors import CliprailError, ConfigError, RunDirError
from cliprail.interrupt import StopRequest
from cliprail.ppo.masked import (
    explained_variance,
    masked_count,
    masked_mean,
    masked_sum,
    masked_whiten,
)
from cliprail.ppo.update import UpdateSync

T = TypeVar("T")


def init_process_group(backend: str, **kwargs: Any) -> None:
    """:func:`torch.distributed.init_process_group`, after importing ``torch._dynamo``.

    ``torch.optim`` imports ``torch._dynamo`` lazily, at the first optimizer; imported after the
    group exists, it keeps a reference to the group, so ``destroy_process_group`` cannot free it,
    gloo's threads outlive the interpreter and the process aborts at exit ("terminate called
    without an active exception", about one run in ten here, torch 2.13). Imported first, it
    does not.
    """
    import torch._dynamo  # noqa: F401

    dist.init_process_group(backend, **kwargs)


def backend_for(device: torch.device) -> str:
    """The collective backend for ``device``: NCCL on CUDA, gloo elsewhere (CPU)."""
    return "nccl" if device.type == "cuda" else "gloo"


# --- moments over the global batch (pure functions) -----------------------------------------
def local_moments(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """``(3,)`` float64 ``[count, mean, m2]`` of the counted entries of ``x`` on this rank.

    ``m2`` is the sum of squared deviations from the *local* mean (computed in two passes, so no
    cancellation); masked-out entries are excluded with ``torch.where`` before squaring, as in
    :func:`cliprail.ppo.masked.masked_var`. An empty rank gives ``[0, 0, 0]``.
    """
    x = x.detach().double()
    count = masked_count(x, mask)
    mean = masked_mean(x, mask)
    centered = x - mean
    if mask is not None:
        keep = (mask if mask.dtype == torch.bool else mask != 0).expand_as(x)
        centered = torch.where(keep, centered, torch.zeros((), dtype=x.dtype, device=x.device))
    m2 = masked_sum(centered * centered, mask)
    return torch.stack([count, mean, m2])


def merge_moments(parts: Tensor) -> Tensor:
    """Merge per-rank ``[count, mean, m2]`` rows ``(W, 3)`` into the global ``(3,)`` (Chan et
    al. 1979): ``mean = sum(n_i m_i) / n``, ``m2 = sum(m2_i + n_i (m_i - mean)^2)``.

    >>> a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])
    >>> merge_moments(torch.stack([local_moments(a), local_moments(b)])).tolist()
    [5.0, 3.0, 10.0]
    """
    counts, means, m2s = parts[:, 0], parts[:, 1], parts[:, 2]
    n = counts.sum()
    mean = (counts * means).sum() / n.clamp_min(1.0)
    m2 = (m2s + counts * (means - mean) ** 2).sum()
    return torch.stack([n, mean, m2])


def moments_mean_var(moments: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, unbiased variance)`` of merged ``[count, mean, m2]``; the variance's denominator
    is clamped to 1 as in :func:`cliprail.ppo.masked.masked_var` (one sample: variance 0)."""
    return moments[1], moments[2] / (moments[0] - 1.0).clamp_min(1.0)


def whiten_with(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    mask: Tensor | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with given statistics, the masked convention of
    :func:`cliprail.ppo.masked.masked_whiten` (masked-out entries come back as 0)."""
    keep = None if mask is None else (mask if mask.dtype == torch.bool else mask != 0).expand_as(x)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if keep is not None:
        x = torch.where(keep, x, zero)
    mean, var = mean.to(x.dtype), var.to(x.dtype)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    if keep is not None:
        out = torch.where(keep, out, zero)
    return out


# --- one rank of a data-parallel job --------------------------------------------------------
class Distributed:
    """This process's place in a data-parallel job, and the collectives the trainers use.

    Build it with :meth:`from_env` (or :meth:`single`). Every method is a collective unless its
    docstring says otherwise: all ranks must call it, in the same order. With world size 1
    nothing touches torch.distributed.
    """

    def __init__(
        self, rank: int, world_size: int, local_rank: int, device: torch.device, owns_group: bool
    ) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device  # where this rank's models live (NCCL: this rank's GPU)
        self.owns_group = owns_group  # destroy the group in close() (we initialised it)

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> Self:
        """One process on ``device``, no process group. Not a collective."""
        return cls(0, 1, 0, torch.device(device), owns_group=False)

    @classmethod
    def from_env(cls, device: str = "cpu") -> Self:
        """Join the job ``torchrun`` started (``WORLD_SIZE`` > 1 in the environment), or an
        already initialised process group; one process (:meth:`single`) otherwise.

        ``device`` is the configured device: CPU runs use gloo; CUDA runs use NCCL on GPU
        ``LOCAL_RANK`` of this node, whatever index ``device`` names (one GPU per rank); a single
        process uses ``device`` as given (``cuda:N`` becomes the current device). Not a
        collective (it creates the group). Raises :class:`ConfigError` for a device this machine
        lacks or a job this torch build cannot run.
        """
        dev = check_device(device)
        initialised = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            if dev.type == "cuda" and dev.index is not None:
                torch.cuda.set_device(dev)
            return cls.single(dev)
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(
                    f"--device {device}: local rank {local_rank} needs GPU {local_rank}, but "
                    f"{torch.cuda.device_count()} are visible"
                )
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not initialised:
            backend = backend_for(dev)
            if backend == "gloo" and not dist.is_gloo_available():
                raise ConfigError("this torch build has no gloo backend for CPU runs")
            # env:// rendezvous: what torchrun sets up. NCCL's watchdog would abort after 10
            # minutes while rank 0 alone evaluates or writes a large model; gloo waits 30
            kw = {"timeout": timedelta(minutes=60)} if backend == "nccl" else {}
            init_process_group(backend, **kw)
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, dev, not initialised)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files and shows progress. Not a collective."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process. Not a collective."""
        return self.world_size > 1

    def close(self) -> None:
        """Destroy the process group if :meth:`from_env` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    # --- tensors ----------------------------------------------------------------------------
    def mean(self, x: Tensor) -> Tensor:
        """Elementwise mean over ranks of ``x`` (returned on ``x``'s device; ``x`` untouched).
        Sum then divide: gloo has no AVG reduction."""
        if not self.distributed:
            return x.detach().clone()
        y = x.detach().to(self.device, copy=True)
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.div_(self.world_size).to(x.device)

    def average_gradients(self, grads: list[Tensor]) -> None:
        """Average ``grads`` over ranks in place: one all-reduce per tensor (one in all for the
        flat gradient buffer of :func:`cliprail.ppo.flatten_parameters`)."""
        if not self.distributed:
            return
        for g in grads:
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
            g.div_(self.world_size)

    def update_sync(self) -> UpdateSync | None:
        """The hooks :func:`cliprail.ppo.ppo_update` takes to stay in lockstep (None for one
        process: the loop's own single-worker path). Not a collective itself."""
        if not self.distributed:
            return None
        return UpdateSync(average_gradients=self.average_gradients, mean=self.mean)

    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values (parameters at start-up)."""
        if not self.distributed:
            return
        for t in tensors:
            if t.device == self.device:
                dist.broadcast(t, src=0)
            else:
                buf = t.detach().to(self.device)
                dist.broadcast(buf, src=0)
                t.copy_(buf)

    def all_same(self, x: Tensor) -> bool:
        """True when ``x`` is bitwise identical on every rank (a guard at checkpoints)."""
        if not self.distributed:
            return True
        ref = x.detach().to(self.device, copy=True)
        dist.broadcast(ref, src=0)
        differs = torch.tensor(
            [0.0 if torch.equal(ref, x.detach().to(self.device)) else 1.0], device=self.device
        )
        dist.all_reduce(differs, op=dist.ReduceOp.SUM)
        return differs.item() == 0.0

    def check_same(self, modules: Sequence[torch.nn.Module]) -> None:
        """Raise unless the parameters of ``modules`` are bitwise equal on every rank: the
        guard at each checkpoint (data-parallel replicas must never drift)."""
        if not self.distributed:
            return
        flat = torch.cat([p.detach().reshape(-1).float() for m in modules for p in m.parameters()])
        if not self.all_same(flat):
            raise RuntimeError("the ranks' parameters differ: data-parallel state diverged")

    def gather_moments(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Global ``[count, mean, m2]`` (float64, ``(3,)``) of ``x`` over all ranks' entries."""
        local = local_moments(x, mask)
        if not self.distributed:
            return local
        local = local.to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return merge_moments(torch.stack(parts)).to(x.device)

    def whiten(
        self, x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8
    ) -> Tensor:
        """:func:`cliprail.ppo.masked.masked_whiten` over the union of every rank's ``x``: each
        rank's entries are whitened with the global mean and (unbiased) variance, so a minibatch
        of B per rank on W ranks is whitened as one minibatch of W x B would be."""
        if not self.distributed:
            return masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
        mean, var = moments_mean_var(self.gather_moments(x, mask))
        return whiten_with(x, mean, var, mask, shift_mean, eps)

    def explained_variance(
        self, values: Tensor, returns: Tensor, mask: Tensor | None = None
    ) -> float:
        """:func:`cliprail.ppo.masked.explained_variance` over every rank's samples (NaN when
        the global returns have no variance)."""
        if not self.distributed:
            return float(explained_variance(values, returns, mask))
        r = self.gather_moments(returns, mask)
        d = self.gather_moments(returns - values, mask)
        _, var_r = moments_mean_var(r)
        _, var_d = moments_mean_var(d)
        n = r[0].clamp_min(1.0)
        scale = (r[2] + r[0] * r[1] ** 2) / n  # mean of returns^2, from the same moments
        if var_r.item() <= 1e3 * torch.finfo(returns.dtype).eps * max(scale.item(), 1e-30):
            return float("nan")
        return float(1.0 - var_d / var_r)

    def reduce_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Logged statistics over ranks: the minimum of ``*_min`` keys, the maximum of ``*_max``
        keys, the mean of every other (two all-reduces, float64). Every rank must hold the same
        keys; they are reduced in sorted order."""
        if not stats or not self.distributed:
            return stats
        keys = sorted(stats)
        extreme = [k for k in keys if k.endswith(("_min", "_max"))]
        mean_keys = [k for k in keys if k not in extreme]
        out = dict(
            zip(
                mean_keys,
                self.mean(torch.tensor([stats[k] for k in mean_keys], dtype=torch.float64)),
                strict=True,
            )
        )
        if extreme:  # min(x) = -max(-x): one MAX reduction for both kinds
            sign = torch.tensor([-1.0 if k.endswith("_min") else 1.0 for k in extreme])
            signed = (sign * torch.tensor([stats[k] for k in extreme])).double()
            buf = signed.to(self.device)
            dist.all_reduce(buf, op=dist.ReduceOp.MAX)
            out.update(zip(extreme, buf.cpu() * sign.double(), strict=True))
        return {k: float(out[k]) for k in stats}

    def gather_arrays(self, x: np.ndarray) -> list[np.ndarray]:
        """Every rank's float64 array ``x`` (same shape on all ranks), in rank order."""
        local = np.ascontiguousarray(x, dtype=np.float64)
        if not self.distributed:
            return [local]
        t = torch.as_tensor(local).to(self.device)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return [p.cpu().numpy() for p in parts]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank."""
        if not self.distributed:
            return flag
        return float(self.mean(torch.tensor([1.0 if flag else 0.0]))) > 0.0

    def stop_agreed(self, stop: StopRequest) -> bool:
        """Whether any rank was asked to stop (one small all-reduce), so every rank saves and
        stops after the same step; a rank without a signal adopts the signalling rank's number,
        so every rank exits with the same code (128 + signal)."""
        if not self.distributed:
            return stop.requested
        signum = torch.tensor([float(stop.signum or 0)], dtype=torch.float64, device=self.device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        agreed = int(signum.item())
        if agreed and stop.signum is None:
            stop.signum = agreed
        return agreed != 0

    # --- objects ----------------------------------------------------------------------------
    def gather_objects(self, obj: T) -> list[T]:
        """Every rank's picklable ``obj``, in rank order (small things: episode lists, RNG
        states)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank; a
        :class:`CliprailError` it raises is raised on every rank with the same message, so all
        ranks stop together instead of waiting for each other. Used for what only rank 0 may
        touch: the run folder check and reading a checkpoint (no shared filesystem needed)."""
        if not self.distributed:
            return fn()
        box: list[Any] = [None, None]
        if self.is_main:
            try:
                box[0] = fn()
            except CliprailError as exc:
                box[1] = (type(exc), str(exc))
            except OSError as exc:  # a full disk, an unwritable folder: every rank stops
                where = f"{exc.filename}: " if exc.filename else ""
                box[1] = (RunDirError, f"{where}{exc.strerror or exc}")
        dist.broadcast_object_list(box, src=0)
        if box[1] is not None:
            cls, message = box[1]
            raise cls(message)
        result: T = box[0]
        return result


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device, or :class:`ConfigError` when it is not cpu or cuda, or this
    machine lacks it. Not a collective."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device}: not a device (cpu, cuda, cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: cliprail runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {device}: this machine has no CUDA GPU (or this torch build has no "
            "CUDA); use --device cpu"
        )
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev
