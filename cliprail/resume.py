"""The one resume layer: run folders, checkpoints of every rank's state, exact ``--resume``.

Both trainers (the Gymnasium one, :mod:`cliprail.rl.trainer`, and the RLHF stages, through
:class:`cliprail.rlhf.resume.StageCheckpointer`) checkpoint through :class:`Checkpointer` and
open their run folders with :func:`open_run`. A trainer supplies only its own pieces (a
:class:`Snapshot`: shared tensors, JSON state, optimizer state, and what differs between ranks);
this module owns the rest:

* **run folders** (:func:`check_run`, :func:`write_config`, both in :func:`open_run`): a fresh
  run refuses a folder that holds one; ``--resume``
  needs a ``config.json`` made with the same config, up to the fields the trainer declares
  resumable (:data:`RUN_OPTIONS` and its own), and refuses a finished run;
* **random streams** (:class:`RandomStreams`): Python's, NumPy's and torch's global generators
  (and the GPU's), plus the trainer's own named ``torch.Generator``, ``random.Random`` and NumPy
  ``Generator`` objects, captured and restored together;
* **ranks**: :meth:`Checkpointer.save` is a collective that gathers every rank's pieces to rank
  0, which alone writes (rank r's tensors under ``<name>.rank{r}``, its JSON under
  ``state["ranks"]["r"]``; rank 0 keeps the single-process names, so a 1-process checkpoint is
  the same files); :meth:`Checkpointer.restore` reads on rank 0, hands the contents to every
  rank, and refuses another world size; the :class:`Restored` value it returns is what the
  trainer passes on to put its pieces back (nothing is left behind on an object);
* **signals**: :meth:`Checkpointer.step_end` saves when due, and when any rank got SIGINT or
  SIGTERM saves (once) and raises :class:`~cliprail.interrupt.Interrupted` with the signalling
  rank's number on every rank; it is also where ``CLIPRAIL_KILL_AT=<point>:<n>`` SIGKILLs the
  process for the resume tests.

Checkpoints are :func:`cliprail.checkpoint.save_checkpoint` folders: safetensors and JSON under
a temporary name, then renamed, with a manifest of sizes and SHA-256; never pickle.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cliprail.checkpoint import (
    atomic_write_json,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from cliprail.configio import config_to_dict
from cliprail.distributed import Distributed
from cliprail.errors import CheckpointError, ConfigError, RunDirError
from cliprail.interrupt import StopRequest, fault_point

RUN_OPTIONS = frozenset({"resume", "progress", "tensorboard", "checkpoint_every", "run_dir"})
"""Config fields a ``--resume`` may change in every trainer: how the run is shown, saved and
where its folder is, never what it computes. ``device`` is not one: the random streams differ
per device, so a run resumed elsewhere would not be the run that stopped."""

CHECKPOINTS = "checkpoints"


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's, NumPy's and torch's global generators; returns a fresh
    ``torch.Generator`` seeded the same, for a trainer's own draws."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def py_rng_to_json(state: tuple[Any, ...]) -> list[Any]:
    """``random.getstate()`` as JSON (version, 625 ints, gauss_next)."""
    return [state[0], list(state[1]), state[2]]


def py_rng_from_json(s: list[Any]) -> tuple[Any, ...]:
    return (s[0], tuple(s[1]), s[2])


# --- run folders -----------------------------------------------------------------------------
def open_run(
    run_dir: Path,
    cfg: Any,
    resumable: frozenset[str] = RUN_OPTIONS,
    finished: str | None = None,
) -> None:
    """:func:`check_run` then :func:`write_config`: start the run folder, or check it for
    ``--resume``, and write ``config.json``."""
    check_run(run_dir, cfg, resumable, finished)
    write_config(run_dir, cfg)


def check_run(
    run_dir: Path,
    cfg: Any,
    resumable: frozenset[str] = RUN_OPTIONS,
    finished: str | None = None,
) -> None:
    """The run-folder policy; writes nothing. A fresh run (``cfg.resume`` false) refuses a
    folder that already holds a run (a ``config.json`` or checkpoints): nothing is overwritten.
    ``--resume`` needs the folder's ``config.json`` and refuses a run that finished
    (``finished``, a file the trainer writes last, is there) or one made with a config that
    differs outside ``resumable``; a field added to the config after the run was saved counts
    as its default then."""
    cfg_path = run_dir / "config.json"
    if not getattr(cfg, "resume", False):
        if cfg_path.exists() or (run_dir / CHECKPOINTS).exists():
            raise RunDirError(
                f"{run_dir} already holds a run; pass --resume to continue it or choose another "
                "--run-dir (nothing was overwritten)"
            )
        return
    if not cfg_path.is_file():
        raise RunDirError(f"{run_dir}: no run to resume (no config.json)")
    if finished is not None and (run_dir / finished).is_file():
        raise RunDirError(
            f"{run_dir}: this run finished ({finished}, written last, is there); nothing to resume"
        )
    _check_same_config(cfg_path, cfg, resumable)


def write_config(run_dir: Path, cfg: Any) -> None:
    """Create ``run_dir`` and write ``config.json`` (on resume too, so the next ``--resume``
    compares with this one: e.g. a larger ``total_steps``)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", config_to_dict(cfg))
    except OSError as exc:
        raise RunDirError(f"{run_dir}: cannot write the run folder ({exc.strerror})") from None


def _check_same_config(cfg_path: Path, cfg: Any, resumable: frozenset[str]) -> None:
    try:
        saved = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: unreadable ({exc})") from None
    given = json.loads(json.dumps(config_to_dict(cfg)))  # tuples -> lists, as saved
    for f in dataclasses.fields(cfg):  # added after the run was saved: its default then
        if f.name not in saved and f.default is not dataclasses.MISSING:
            saved[f.name] = json.loads(json.dumps(f.default, default=str))
    diffs = [
        f"{k} (saved {saved.get(k)!r}, given {v!r})"
        for k, v in given.items()
        if k not in resumable and saved.get(k) != v
    ]
    if diffs:
        raise ConfigError(
            f"--resume with a config that differs from {cfg_path}: {', '.join(diffs)}"
        )


def resume_step(resume: bool, restored: object | None, step: int) -> int | None:
    """The step ``metrics.jsonl`` (and TensorBoard) is cut back to: the restored checkpoint's,
    -1 (everything) for a ``--resume`` that starts over, None (nothing) for a fresh run."""
    if not resume:
        return None
    return step if restored is not None else -1


# --- random streams --------------------------------------------------------------------------
@dataclass
class RandomStreams:
    """Every random stream a trainer draws from: the global ones (Python's, NumPy's, torch's
    CPU generator and, on a GPU, the device's) and the trainer's own, by name."""

    generators: dict[str, torch.Generator] = field(default_factory=dict)
    """torch generators (shuffles, sampling), saved as tensors ``gen.<name>``."""
    py_rngs: dict[str, random.Random] = field(default_factory=dict)
    """Python ``random.Random`` objects (prompt sampling), saved in JSON ``rngs``."""
    np_generators: dict[str, np.random.Generator] = field(default_factory=dict)
    """NumPy generators (the acting samples), saved in JSON ``np_rngs``."""
    cuda: torch.device | None = None
    """The GPU whose generator is saved too (dropout, sampling on the device), if any."""

    def capture(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """This process's states: ``(tensors, JSON)``."""
        tensors = {"torch": torch.get_rng_state()}
        tensors.update({f"gen.{k}": g.get_state() for k, g in self.generators.items()})
        if self.cuda is not None:
            tensors["cuda"] = torch.cuda.get_rng_state(self.cuda)
        np_state: Any = np.random.get_state()
        return tensors, {
            "python_rng": py_rng_to_json(random.getstate()),
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "rngs": {k: py_rng_to_json(r.getstate()) for k, r in self.py_rngs.items()},
            "np_rngs": {k: npg.bit_generator.state for k, npg in self.np_generators.items()},
        }

    def restore(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Put back what :meth:`capture` returned (KeyError when a stream is missing)."""
        torch.set_rng_state(tensors["torch"])
        for k, g in self.generators.items():
            g.set_state(tensors[f"gen.{k}"])
        if self.cuda is not None:
            torch.cuda.set_rng_state(tensors["cuda"], self.cuda)
        random.setstate(py_rng_from_json(state["python_rng"]))
        s = state["numpy_rng"]
        np.random.set_state((s[0], np.asarray(s[1], dtype=np.uint32), *s[2:]))
        for k, r in self.py_rngs.items():
            r.setstate(py_rng_from_json(state["rngs"][k]))
        for k, npg in self.np_generators.items():
            npg.bit_generator.state = state["np_rngs"][k]


# --- checkpoints -----------------------------------------------------------------------------
@dataclass
class Snapshot:
    """What a trainer hands :meth:`Checkpointer.save`."""

    tensors: dict[str, dict[str, Tensor]]
    """Tensor groups the same on every rank (weights, normaliser statistics), from rank 0."""
    state: dict[str, Any]
    """JSON state the same on every rank (counters, controllers, the fuse)."""
    optimizer: Any
    """The optimizer's (and schedule's) state dict, from rank 0."""
    rank_tensors: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    """This rank's own tensor groups (its random streams, env state...)."""
    rank_state: dict[str, Any] = field(default_factory=dict)
    """This rank's own JSON state."""


@dataclass(frozen=True)
class Restored:
    """A checkpoint as read back, seen from one rank; the trainer passes it on explicitly."""

    path: Path
    tensors: dict[str, dict[str, Tensor]]
    """Every tensor group as saved (rank r's entries under ``<name>.rank{r}``)."""
    state: dict[str, Any]
    optimizer: Any
    rank: int

    @property
    def step(self) -> int:
        """The step (update) the checkpoint was written after."""
        return int(self.state["step"])

    def own(self, group: str) -> dict[str, Tensor]:
        """This rank's entries of a per-rank tensor group, under their unsuffixed names."""
        items = self.tensors.get(group, {})
        if self.rank == 0:
            return {k: v for k, v in items.items() if ".rank" not in k}
        sfx = f".rank{self.rank}"
        return {k[: -len(sfx)]: v for k, v in items.items() if k.endswith(sfx)}

    @property
    def own_state(self) -> dict[str, Any]:
        """This rank's JSON state (rank 0's is the top level)."""
        return self.state if self.rank == 0 else self.state["ranks"][str(self.rank)]


class Checkpointer:
    """Save and restore a trainer's :class:`Snapshot` under ``<run_dir>/checkpoints``.

    Args:
        run_dir: the run folder.
        group: the process group (:meth:`Distributed.single` for one process).
        every: :meth:`step_end` saves every this many steps (0: only when stopped by a signal).
        prefix: checkpoint folders are ``<prefix>_<step>``, ``width`` digits.
        keep_last: how many checkpoints to keep.
        fault: the ``CLIPRAIL_KILL_AT`` point of :meth:`step_end` (tests).
        started: ``time.perf_counter()`` when the run started (default: now), for
            :meth:`wall_s`.
    """

    def __init__(
        self,
        run_dir: Path,
        group: Distributed,
        every: int,
        prefix: str = "step",
        width: int = 8,
        keep_last: int = 2,
        fault: str = "step",
        started: float | None = None,
    ) -> None:
        self.root = run_dir / CHECKPOINTS
        self.group, self.every = group, every
        self.prefix, self.width, self.keep_last, self.fault = prefix, width, keep_last, fault
        self.started = time.perf_counter() if started is None else started
        self.elapsed = 0.0  # wall seconds of the earlier processes of a resumed run
        self.last_saved: int | None = None

    def path(self, step: int) -> Path:
        """The folder :meth:`save` writes for ``step``."""
        return self.root / f"{self.prefix}_{step:0{self.width}d}"

    def wall_s(self) -> float:
        """Wall seconds of the whole run so far, earlier (resumed-from) processes included."""
        return self.elapsed + time.perf_counter() - self.started

    def save(self, step: int, snap: Snapshot) -> Path | None:
        """Checkpoint ``step``; returns the folder on rank 0, None elsewhere. A collective:
        every rank's own pieces are gathered to rank 0, which writes."""
        ranks = self.group.gather_objects((snap.rank_tensors, snap.rank_state))
        self.last_saved = step
        if not self.group.is_main:
            return None
        tensors = {g: dict(t) for g, t in snap.tensors.items()}
        state = {
            **snap.state,
            "step": step,
            "world_size": self.group.world_size,
            "wall_s": self.wall_s(),
        }
        for r, (rank_tensors, rank_state) in enumerate(ranks):
            sfx = f".rank{r}" if r else ""
            for g, t in rank_tensors.items():
                tensors.setdefault(g, {}).update({f"{k}{sfx}": v for k, v in t.items()})
            if r == 0:
                state.update(rank_state)
            else:
                state.setdefault("ranks", {})[str(r)] = rank_state
        tensors = {g: t for g, t in tensors.items() if t}
        path = self.path(step)
        return save_checkpoint(
            self.root, path.name, tensors, state, snap.optimizer, keep_last=self.keep_last
        )

    def restore(self, path: Path | None = None) -> Restored | None:
        """Checkpoint ``path`` (default: the latest valid one), read on rank 0 and handed to
        every rank; None when there is none (the run stopped before its first: it starts over,
        and the seed makes that the same run). Raises :class:`ConfigError` for a checkpoint
        written by another number of processes (each rank's random streams are saved, so they
        must match)."""

        def read() -> tuple[Path, Any] | None:
            if path is not None:
                return path, load_checkpoint(path)
            if not self.root.is_dir() or not any(
                p.is_dir() and not p.name.startswith(".") for p in self.root.iterdir()
            ):
                return None
            latest = latest_checkpoint(self.root)  # raises if every checkpoint is corrupt
            return latest, load_checkpoint(latest)

        found = self.group.from_main(read)
        if found is None:
            return None
        where, (tensors, state, optimizer) = found
        saved_world, world = int(state.get("world_size", 1)), self.group.world_size
        if saved_world != world:
            how = (
                f"torchrun with {saved_world} processes in all (e.g. "
                f"--nproc_per_node={saved_world})"
                if saved_world > 1
                else "one process, without torchrun"
            )
            raise ConfigError(
                f"{where}: written by {_processes(saved_world)}, this run has {_processes(world)};"
                f" each rank's random streams are saved per rank, so resume with the same number"
                f" of processes: {how}"
            )
        self.elapsed = float(state.get("wall_s", 0.0))
        self.last_saved = int(state["step"])
        return Restored(where, tensors, state, optimizer, self.group.rank)

    def step_end(
        self,
        step: int,
        stop: StopRequest,
        save: Callable[[], Path | None],
        where: str,
        last: bool = False,
    ) -> None:
        """After step ``step``: ``save()`` when a checkpoint is due (every ``every`` steps, or
        ``last``), and when any rank got a signal, save (unless just saved) and raise
        :class:`~cliprail.interrupt.Interrupted` on every rank. A finished run (``last``) just
        finishes. Under torchrun one small all-reduce a step."""
        if last or (self.every and step % self.every == 0):
            save()
        if not last and self.group.stop_agreed(stop):
            if self.last_saved != step:
                save()
            raise stop.interrupted(where, self.path(step) if self.last_saved == step else self.root)
        fault_point(self.fault)


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


__all__ = [
    "RUN_OPTIONS",
    "Checkpointer",
    "RandomStreams",
    "Restored",
    "Snapshot",
    "check_run",
    "open_run",
    "py_rng_from_json",
    "py_rng_to_json",
    "resume_step",
    "seed_everything",
    "write_config",
]
