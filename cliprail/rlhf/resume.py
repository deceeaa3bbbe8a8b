"""Mid-run checkpoints and exact ``--resume`` for the RLHF stages (SFT, reward, DPO, PPO).

A stage checkpoint (:func:`cliprail.checkpoint.save_checkpoint`: safetensors, a manifest, written
under a temporary name and renamed) holds everything the next optimizer step depends on: the
trained models' weights, the optimizer and learning-rate schedule, every RNG (Python's global and
the stage's own ``random.Random``, NumPy's, torch's global and the stage's ``torch.Generator``),
the counters, and a JSON ``state`` the stage adds (the KL controller, the fuse, evaluations, the
generator state at the start of the current epoch so its shuffle can be redrawn). Frozen models
(reference, reward) are not saved: they are re-read from their folders, bitwise the same.

The loop calls :meth:`StageCheckpointer.step_end` after every step: it saves every
``checkpoint_every`` steps, honours SIGINT/SIGTERM (:class:`cliprail.interrupt.StopRequest`: save,
then :class:`~cliprail.interrupt.Interrupted`), and is where the tests' ``CLIPRAIL_KILL_AT=
rlhf-step:n`` SIGKILLs the process.
"""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliprail.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from cliprail.configio import config_to_dict
from cliprail.errors import CheckpointError, ConfigError, RunDirError
from cliprail.interrupt import StopRequest, fault_point
from cliprail.rlhf.common import Cost, EpochShuffle, start_run
from cliprail.rlhf.parallel import DataParallel

# Config fields a --resume may change: they do not touch what is computed.
RESUMABLE_OVERRIDES = frozenset({"resume", "progress", "checkpoint_every"})
CHECKPOINTS = "checkpoints"


def py_rng_to_json(state: tuple[Any, ...]) -> list[Any]:
    """``random.getstate()`` as JSON (version, 625 ints, gauss_next)."""
    return [state[0], list(state[1]), state[2]]


def py_rng_from_json(s: list[Any]) -> tuple[Any, ...]:
    return (s[0], tuple(s[1]), s[2])


def begin_run(run_dir: Path, cfg: Any) -> None:
    """Start the run folder, or, with ``cfg.resume``, check that it holds an unfinished run made
    with the same config (up to :data:`RESUMABLE_OVERRIDES`)."""
    if not getattr(cfg, "resume", False):
        start_run(run_dir, cfg)
        return
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise RunDirError(f"{run_dir}: no run to resume (no config.json)")
    if (run_dir / "stage.json").is_file():
        raise RunDirError(f"{run_dir}: this run finished (stage.json, written last, is there); "
                          "nothing to resume")  # fmt: skip
    try:
        saved = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: unreadable ({exc})") from None
    given = json.loads(json.dumps(config_to_dict(cfg)))  # tuples -> lists, as saved
    # a field added after the run was saved (e.g. fsdp, device) had its default then
    for f in dataclasses.fields(cfg):
        if f.name not in saved and f.default is not dataclasses.MISSING:
            saved[f.name] = json.loads(json.dumps(f.default, default=str))
    diffs = [f"{k} (saved {saved.get(k)!r}, given {v!r})" for k, v in given.items()
             if k not in RESUMABLE_OVERRIDES and saved.get(k) != v]  # fmt: skip
    if diffs:
        raise ConfigError(f"--resume with a config that differs from {cfg_path}: "
                          f"{', '.join(diffs)}")  # fmt: skip


def resume_step(resume: bool, restored: Any, step: int) -> int | None:
    """The step ``metrics.jsonl`` is cut back to: the restored checkpoint's, -1 (everything)
    for a --resume that starts over, None (nothing) for a fresh run."""
    if not resume:
        return None
    return step if restored is not None else -1


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
        dp: the torchrun job, if any: :meth:`save` is then a collective that gathers every
            rank's RNG states to rank 0, which alone writes (rank r's under ``.rank{r}`` names
            and ``state["ranks"]``); :meth:`restore` reads on rank 0 and broadcasts, and needs
            the world size the checkpoint was written with.
        cost: the stage's token counters, saved and restored with it.
        shuffle: its epoch shuffle, saved and restored with it.
        started: ``time.perf_counter()`` when the stage started (default: now), for
            :meth:`wall_s`.
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
        self.root = run_dir / CHECKPOINTS
        self.every = every
        self.modules = modules
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.generators = generators or {}
        self.rngs = rngs or {}
        self.dp = dp or DataParallel(None)
        self.cost, self.shuffle = cost, shuffle
        self.started = time.perf_counter() if started is None else started
        self.elapsed = 0.0  # wall seconds of the earlier processes of a resumed run
        self.last_saved: int | None = None

    def _rng_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's RNG states: (tensors, JSON)."""
        tensors = {"torch": torch.get_rng_state(),
                   **{f"gen.{k}": g.get_state() for k, g in self.generators.items()}}  # fmt: skip
        if self.dp.device.type == "cuda":  # dropout in SFT and the reward model on a GPU
            tensors["cuda"] = torch.cuda.get_rng_state(self.dp.device)
        np_state: Any = np.random.get_state()
        return tensors, {
            "python_rng": py_rng_to_json(random.getstate()),
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "rngs": {k: py_rng_to_json(r.getstate()) for k, r in self.rngs.items()},
        }

    def save(self, step: int, state: dict[str, Any]) -> Path | None:
        """Checkpoint ``step`` with the stage's JSON ``state``; returns the folder (None on
        ranks other than 0). A collective under torchrun."""
        cost = self.cost.state_dict() if self.cost is not None else {}
        ranks = self.dp.gather((*self._rng_state(), cost))  # one gather: RNGs and token counts
        self.dp.check_same(list(self.modules.values()))
        optimizer = self.dp.optimizer_state(self.modules, self.optimizer)
        with self.dp.gathered(*self.modules.values()):  # --fsdp: whole weights, then write
            tensors: dict[str, dict[str, torch.Tensor]] = {
                name: dict(self.dp.module_state(m)) for name, m in self.modules.items()
            }
            return self._write(step, state, ranks, tensors, optimizer)

    def _write(self, step: int, state: dict[str, Any], ranks: list[Any],
               tensors: dict[str, dict[str, torch.Tensor]],
               optimizer: dict[str, Any]) -> Path | None:  # fmt: skip
        """Rank 0 writes the checkpoint (the others return None)."""
        self.last_saved = step
        if not self.dp.is_main:
            return None
        rng_tensors, rng_json, _ = ranks[0]
        full = {**state, "step": step, "world_size": self.dp.world, "wall_s": self.wall_s(),
                **rng_json}  # fmt: skip
        if self.cost is not None:  # every rank's tokens (restored to rank 0, 0 elsewhere)
            full["cost"] = _summed([c for _, _, c in ranks])
        if self.shuffle is not None:
            full["shuffle"] = self.shuffle.state_dict()
        for r, (t, j, _) in enumerate(ranks[1:], start=1):
            rng_tensors.update({f"{k}.rank{r}": v for k, v in t.items()})
            full.setdefault("ranks", {})[str(r)] = j
        tensors["rng"] = rng_tensors
        opt = {"optimizer": optimizer,
               "scheduler": self.scheduler.state_dict() if self.scheduler else None}  # fmt: skip
        return save_checkpoint(self.root, f"step_{step:08d}", tensors, full, opt, keep_last=2)

    def restore(self) -> tuple[Path, dict[str, Any]] | None:
        """Load the latest valid checkpoint into the modules, optimizer and RNGs; returns its
        folder and its state (``state["step"]`` is the step to continue after), or None when
        the run was stopped before its first checkpoint (it then starts over: the seed makes
        that the same run). Under torchrun rank 0 reads it and every rank restores its own RNG
        states from it."""

        def read() -> tuple[Path, Any] | None:
            if not self.root.is_dir() or not any(
                p.is_dir() and not p.name.startswith(".") for p in self.root.iterdir()
            ):
                return None
            path = latest_checkpoint(self.root)  # raises if every checkpoint is corrupt
            return path, load_checkpoint(path)

        found = self.dp.from_main(read)
        if found is None:
            return None
        path, (tensors, state, opt) = found
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dp.world:
            raise ConfigError(f"{path}: written by {saved_world} process(es), this run has "
                              f"{self.dp.world}; every rank's RNG state is saved, so resume "
                              f"with --nproc_per_node={saved_world} (or without torchrun "
                              "for 1)")  # fmt: skip
        sfx = f".rank{self.dp.rank}" if self.dp.rank else ""  # rank 0: the 1-process names
        own = state["ranks"][str(self.dp.rank)] if self.dp.rank else state
        try:
            for name, m in self.modules.items():
                self.dp.load_module_state(m, tensors[name])
            self.dp.load_optimizer_state(self.modules, self.optimizer, opt["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(opt["scheduler"])
            rng = tensors["rng"]
            torch.set_rng_state(rng[f"torch{sfx}"])
            if self.dp.device.type == "cuda":
                torch.cuda.set_rng_state(rng[f"cuda{sfx}"], self.dp.device)
            for k, g in self.generators.items():
                g.set_state(rng[f"gen.{k}{sfx}"])
            random.setstate(py_rng_from_json(own["python_rng"]))
            s = own["numpy_rng"]
            np.random.set_state((s[0], np.asarray(s[1], dtype=np.uint32), *s[2:]))
            for k, r in self.rngs.items():
                r.setstate(py_rng_from_json(own["rngs"][k]))
            if self.cost is not None:
                self.cost.load_state_dict(state["cost"] if self.dp.is_main else
                                          dict.fromkeys(state["cost"], 0))  # fmt: skip
            if self.shuffle is not None:
                self.shuffle.load_state_dict(state["shuffle"])
            self.elapsed = float(state["wall_s"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: does not fit this stage's models ({exc})") from None
        self.last_saved = int(state["step"])
        return path, state

    def total_cost(self) -> None:
        """At the end of the stage: on rank 0, the cost counters become every rank's tokens
        (for ``stage.json``). A collective; nothing to do for one process."""
        if self.cost is None or self.dp.world == 1:
            return
        costs = self.dp.gather(self.cost.state_dict())
        if self.dp.is_main:
            self.cost.load_state_dict(_summed(costs))

    def wall_s(self) -> float:
        """Wall seconds of the whole run so far, earlier (resumed-from) processes included."""
        return self.elapsed + time.perf_counter() - self.started

    def step_end(
        self, step: int, stop: StopRequest, state: Callable[[], dict[str, Any]], where: str
    ) -> None:
        """After step ``step``: save if it is due or a signal asked to stop (then raise
        :class:`~cliprail.interrupt.Interrupted`). Under torchrun a signal on any rank stops
        every rank (one small all-reduce a step)."""
        path = None
        if self.every and step % self.every == 0:
            path = self.save(step, state())
        if self.dp.any(stop.requested):
            if self.last_saved != step:
                path = self.save(step, state())
            if stop.signum is None:  # another rank got the signal
                stop.signum = signal.SIGTERM
            raise stop.interrupted(where, path or self.root)
        fault_point("rlhf-step")


__all__ = ["StageCheckpointer", "begin_run", "py_rng_from_json", "py_rng_to_json", "resume_step"]
