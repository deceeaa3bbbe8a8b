"""Pieces every RLHF stage shares: the run options of their configs, the held-out split of
preference pairs, resumable epoch shuffles, AdamW and the cost record (``stage.json``). Seeding
and run folders are the one resume layer's (:mod:`cliprail.resume`)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cliprail.checkpoint import atomic_write_json
from cliprail.errors import ConfigError
from cliprail.ppo.update import fused_or_plain


@dataclass(frozen=True, kw_only=True)
class StageOptions:
    """How an RLHF stage runs, whatever it trains: the base of the four stage configs."""

    checkpoint_every: int = 100
    """Save a resumable checkpoint every this many optimizer steps (0: only on SIGINT/SIGTERM);
    the newest two are kept under <run_dir>/checkpoints."""
    resume: bool = False
    """Continue the unfinished run in --run-dir from its latest checkpoint, bitwise as if it
    had never stopped (the other flags must match the saved config.json)."""
    fsdp: bool = False
    """Under torchrun: shard the trained models over the ranks with FSDP2 instead of
    replicating them under DDP: each rank holds 1/N of their weights, gradients and Adam state
    while training; generation, evaluations and saves gather them whole, and frozen models
    stay whole on every rank. No effect in one process."""
    device: str = "cpu"
    """Where the models run: cpu, or cuda (one GPU; under torchrun each rank uses GPU
    LOCAL_RANK and the ranks talk over NCCL instead of gloo)."""
    threads: int | None = None
    """Torch's CPU threads (default: torch's own, one per core). For small models 1 is fastest,
    and on a machine whose cores are busy with other work more threads than free cores can run
    tens of times slower (measured: an SFT of 282 steps took 275 s with 2 threads beside two
    other jobs on 2 cores, 9 s with 1). The number of threads changes float summation order,
    so runs with different values follow different trajectories."""

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")

    def apply_threads(self) -> None:
        """Set torch's CPU threads to ``--threads`` (no-op without it)."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)


class EpochShuffle:
    """Shuffled minibatches addressed by global step, so a resumed run can start mid-epoch.

    Each epoch draws one permutation from ``generator`` at its first step, as a loop of
    ``randperm`` per epoch would. ``state_dict`` keeps the generator state at the start of the
    current epoch: resumed mid-epoch, the permutation is redrawn from it, bitwise the same.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.steps_per_epoch = -(-n // batch_size)
        self.epoch_start = generator.get_state()
        self._epoch = -1
        self._order: list[int] = []

    def indices(self, step: int) -> tuple[int, list[int]]:
        """``(epoch, example indices)`` of global step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            if k == 0:
                self.epoch_start = self.generator.get_state()
            else:  # resumed mid-epoch: redraw this epoch's permutation from its start
                self.generator.set_state(self.epoch_start)
            self._order = torch.randperm(self.n, generator=self.generator).tolist()
            self._epoch = epoch
        return epoch, self._order[k * self.batch_size : (k + 1) * self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_generator": self.epoch_start.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch_start = torch.tensor(state["epoch_generator"], dtype=torch.uint8)


def adamw(params: Any, lr: float) -> torch.optim.Optimizer:
    """AdamW with eps 1e-5 (Huang et al. 2024) and no weight decay; the fused kernel (one
    kernel for all parameters) where this build and these parameters allow it."""
    return fused_or_plain(torch.optim.AdamW, params, lr=lr, eps=1e-5, weight_decay=0.0)


def split_pairs(
    pairs: list[dict[str, Any]], holdout: float, generator: torch.Generator
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, held_out)``: one permutation from ``generator``, the first ``holdout`` share held
    out. The reward model and DPO call it first with the same seed, so they hold out the same
    pairs and their held-out accuracies compare."""
    order = torch.randperm(len(pairs), generator=generator).tolist()
    n_hold = max(1, int(len(pairs) * holdout))
    return [pairs[i] for i in order[n_hold:]], [pairs[i] for i in order[:n_hold]]


@dataclass
class Cost:
    """What a stage spent: wall time, token positions through forward and backward passes
    (padding included: it is computed; evaluation passes are not counted), and the phase
    timestamps benchmarks read instead of timing the stage's functions from outside."""

    stage: str
    wall_s: float = 0.0
    tokens_forward: int = 0
    tokens_backward: int = 0
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds from ``started`` to named points of this process's run: ``loop_start`` (the
    first optimizer step is next), ``loop_end`` (the last one is done), and for DPO
    ``reference_start`` / ``reference_end`` (the frozen reference's pass over every pair)."""
    started: float = field(default_factory=time.perf_counter, repr=False, compare=False)
    """``time.perf_counter()`` at the stage's start."""

    def add(self, forward: int = 0, backward: int = 0) -> None:
        self.tokens_forward += int(forward)
        self.tokens_backward += int(backward)

    def mark(self, phase: str) -> None:
        """Record that ``phase`` is reached now."""
        self.phases[phase] = time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_forward": self.tokens_forward, "tokens_backward": self.tokens_backward}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens_forward = int(state["tokens_forward"])
        self.tokens_backward = int(state["tokens_backward"])

    def write(self, run_dir: Path, **extra: Any) -> None:
        """``<run_dir>/stage.json``: the stage's name, cost and phases, for ``rlhf compare``
        and the benchmarks, with the process's peak memory (:func:`peak_memory_mb`)."""
        record = {k: v for k, v in self.__dict__.items() if k != "started"}
        atomic_write_json(run_dir / "stage.json", {**record, **peak_memory_mb(), **extra})


def _mb(tensors: Iterable[Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def held_state_mb(
    trained: Iterable[torch.nn.Module],
    frozen: Iterable[torch.nn.Module],
    optimizer: torch.optim.Optimizer | None,
) -> dict[str, float]:
    """What a stage holds for its models, measured on the tensors themselves (MiB): the
    weights of every model, trained and frozen, the gradients and the optimizer's state (AdamW:
    two moments per trained parameter). Activations and the KV cache come on top; the peak of
    the whole process is :func:`peak_memory_mb`."""
    trained, frozen = list(trained), list(frozen)
    weights = _mb(p for m in [*trained, *frozen] for p in m.parameters())
    grads = _mb(p.grad for m in trained for p in m.parameters() if p.grad is not None)
    opt = 0.0
    if optimizer is not None:
        opt = _mb(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    return {
        "weights_mb": round(weights, 3),
        "grads_mb": round(grads, 3),
        "optimizer_mb": round(opt, 3),
        "held_mb": round(weights + grads + opt, 3),
    }


def peak_memory_mb() -> dict[str, float]:
    """The process's peak resident memory (MiB; on Linux ``ru_maxrss``, for the whole process: a
    stage run alone by the CLI, not one of several stages in one process such as the demo),
    and the peak CUDA memory allocated by torch where a GPU was used."""
    out: dict[str, float] = {}
    try:
        import resource

        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except (ImportError, OSError):  # not on this platform
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
