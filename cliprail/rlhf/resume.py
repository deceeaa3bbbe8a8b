"""Mid-run checkpoints and exact ``--resume`` for the RLHF stages (SFT, reward, DPO, PPO): the
pieces the four stages share, on top of the one resume layer (:mod:`cliprail.resume`).

A stage checkpoint holds everything the next optimizer step depends on: the trained models'
weights, the optimizer and learning-rate schedule, every random stream (Python's global and the
stage's own ``random.Random``, NumPy's, torch's global and the stage's ``torch.Generator``), the
token counters, the epoch shuffle, and a JSON ``state`` the stage adds (the KL controller, the
fuse, evaluations). Frozen models (reference, reward) are not saved: they are re-read from
their folders, bitwise the same. Under ``--fsdp`` the weights and the optimizer state are
gathered whole first, so the files are those of a 1-process run.

The loop calls :meth:`StageCheckpointer.step_end` after every step (the tests'
``CLIPRAIL_KILL_AT=rlhf-step:n`` SIGKILLs the process there).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from cliprail.errors import CheckpointError
from cliprail.interrupt import StopRequest
from cliprail.monitor import MetricsLogger, Progress
from cliprail.resume import (
    RUN_OPTIONS,
    Checkpointer,
    RandomStreams,
    Restored,
    Snapshot,
    open_run,
    resume_step,
)
from cliprail.rlhf.common import Cost, EpochShuffle
from cliprail.rlhf.parallel import DataParallel

FINISHED = "stage.json"
"""Written last by every stage: a run folder that has it finished (nothing to resume)."""


def begin_run(run_dir: Path, cfg: Any) -> None:
    """Start the stage's run folder, or check it for ``--resume``
    (:func:`cliprail.resume.open_run`; only the run options may change)."""
    open_run(run_dir, cfg, RUN_OPTIONS, finished=FINISHED)


def _summed(costs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every rank's :class:`~cliprail.rlhf.common.Cost` counters, added up."""
    return {k: sum(c[k] for c in costs) for k in costs[0]}


class StageCheckpointer:
    """Save and restore one stage's trained state; see the module docstring.

    Args:
        run_dir: the stage's run folder (checkpoints go to ``<run_dir>/checkpoints``).
        every: save every this many steps (0: only when stopped by a signal).
        modules: name -> trained module (its ``state_dict`` is saved as ``<name>.safetensors``).
        optimizer: the optimizer stepping them.
        scheduler: its learning-rate schedule, if any.
        generators: name -> ``torch.Generator`` the stage draws from.
        rngs: name -> ``random.Random`` the stage draws from.
        dp: the process group (saves and restores are collectives under torchrun).
        cost: the stage's token counters, saved and restored with it.
        shuffle: its epoch shuffle, saved and restored with it.
        started: ``time.perf_counter()`` when the stage started (default: now).
    """

    def __init__(
        self,
        run_dir: Path,
        every: int,
        modules: dict[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        generators: dict[str, torch.Generator] | None = None,
        rngs: dict[str, random.Random] | None = None,
        dp: DataParallel | None = None,
        cost: Cost | None = None,
        shuffle: EpochShuffle | None = None,
        started: float | None = None,
    ) -> None:
        self.dp = dp or DataParallel.single()
        self.ckpt = Checkpointer(
            run_dir,
            self.dp,
            every,
            prefix="step",
            width=8,
            keep_last=2,
            fault="rlhf-step",
            started=started,
        )
        self.modules, self.optimizer, self.scheduler = modules, optimizer, scheduler
        cuda = self.dp.device if self.dp.device.type == "cuda" else None  # dropout on a GPU
        self.streams = RandomStreams(generators or {}, rngs or {}, cuda=cuda)
        self.cost, self.shuffle = cost, shuffle

    def save(self, step: int, state: dict[str, Any]) -> Path | None:
        """Checkpoint ``step`` with the stage's JSON ``state``; returns the folder (None on
        ranks other than 0). A collective under torchrun."""
        rng_tensors, rng_json = self.streams.capture()
        cost = self.cost.state_dict() if self.cost is not None else {}
        self.dp.check_same(list(self.modules.values()))
        optimizer = self.dp.optimizer_state(self.modules, self.optimizer)
        with self.dp.gathered(*self.modules.values()):  # --fsdp: whole weights, then write
            tensors = {name: dict(self.dp.module_state(m)) for name, m in self.modules.items()}
            full = dict(state)
            if self.shuffle is not None:
                full["shuffle"] = self.shuffle.state_dict()
            snap = Snapshot(
                tensors,
                full,
                {
                    "optimizer": optimizer,
                    "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                },
                rank_tensors={"rng": rng_tensors},
                rank_state={**rng_json, "cost": cost},
            )
            return self.ckpt.save(step, snap)

    def restore(self) -> tuple[Path, dict[str, Any]] | None:
        """Load the latest valid checkpoint into the modules, optimizer and random streams;
        returns its folder and its state (``state["step"]`` is the step to continue after),
        or None when the run was stopped before its first checkpoint (it then starts over)."""
        restored = self.ckpt.restore()
        if restored is None:
            return None
        try:
            self._load(restored)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"{restored.path}: does not fit this stage's models ({exc})"
            ) from None
        return restored.path, restored.state

    def _load(self, r: Restored) -> None:
        for name, m in self.modules.items():
            self.dp.load_module_state(m, r.tensors[name])
        self.dp.load_optimizer_state(self.modules, self.optimizer, r.optimizer["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(r.optimizer["scheduler"])
        self.streams.restore(r.own("rng"), r.own_state)
        if self.cost is not None:  # every rank's tokens: restored to rank 0, 0 elsewhere
            costs = [r.state["cost"], *(v["cost"] for v in r.state.get("ranks", {}).values())]
            total = _summed(costs)
            self.cost.load_state_dict(total if self.dp.is_main else dict.fromkeys(total, 0))
        if self.shuffle is not None:
            self.shuffle.load_state_dict(r.state["shuffle"])

    def total_cost(self) -> None:
        """At the end of the stage: on rank 0, the cost counters become every rank's tokens
        (for ``stage.json``). A collective; nothing to do for one process."""
        if self.cost is None or not self.dp.distributed:
            return
        costs = self.dp.gather_objects(self.cost.state_dict())
        if self.dp.is_main:
            self.cost.load_state_dict(_summed(costs))

    def wall_s(self) -> float:
        """Wall seconds of the whole run so far, earlier (resumed-from) processes included."""
        return self.ckpt.wall_s()

    @contextlib.contextmanager
    def session(
        self,
        cfg: Any,
        title: str,
        total: int,
        start: int,
        restored: object | None,
        tensorboard: bool,
        metrics_step: int | None = None,
    ) -> Iterator[tuple[Progress, StopRequest, MetricsLogger]]:
        """The stage loop's progress bar (``total`` steps, ``start`` done), signal handler and
        metrics log (cut back to the restored step, ``metrics_step`` when it counts something
        else than steps), on rank 0 only where it writes; each closed on the way out."""
        cut = resume_step(cfg.resume, restored, start if metrics_step is None else metrics_step)
        with (
            Progress(total, title, cfg.progress and self.dp.is_main, completed=start) as bar,
            StopRequest() as stop,
            MetricsLogger(cfg.run_dir, tensorboard, cut, enabled=self.dp.is_main) as log,
        ):
            yield bar, stop, log

    def step_end(
        self, step: int, stop: StopRequest, state: Callable[[], dict[str, Any]], where: str
    ) -> None:
        """After step ``step``: save if it is due or a signal asked to stop (then raise
        :class:`~cliprail.interrupt.Interrupted` on every rank)."""
        self.ckpt.step_end(step, stop, lambda: self.save(step, state()), where)


__all__ = ["StageCheckpointer", "begin_run", "resume_step"]
