"""Metrics sinks (JSONL and TensorBoard) and progress bars.

Every run writes ``metrics.jsonl``: one JSON object per logged step, ``{"step": int, ...}``,
flushed line by line so a crash loses at most the line being written. On resume the file is
cut back to the checkpoint's step first, so each step appears exactly once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import TracebackType
from typing import Any

from cliprail.checkpoint import atomic_write_text


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def truncate_metrics(path: Path, max_step: int) -> None:
    """Keep only the records of ``path`` with ``step <= max_step`` (atomic rewrite). A torn
    last line (a crash mid-write) is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("step", math.inf) <= max_step:
            kept.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in kept))


class MetricsLogger:
    """Write scalars to ``<run>/metrics.jsonl`` and, optionally, TensorBoard events.

    ``enabled=False`` makes a logger that touches no file (data-parallel ranks other than 0:
    rank 0 alone writes, after the metrics are reduced across ranks)."""

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        resume_step: int | None = None,
        enabled: bool = True,
    ):
        self.path = run_dir / "metrics.jsonl"
        self._file: Any = None
        self._tb: Any = None
        if not enabled:
            return
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                str(run_dir / "tensorboard"),
                purge_step=resume_step + 1 if resume_step is not None else None,
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self._file is None:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Progress:
    """A rich progress bar with free-form fields; a no-op when disabled."""

    def __init__(self, total: int, description: str, enabled: bool = True, completed: int = 0):
        self.enabled = enabled
        self._bar: Any = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._bar.add_task(description, total=total, completed=completed, info="")
            self._bar.start()

    def update(self, completed: int, info: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, info=info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # also when a stop or an error leaves the loop: its line prints clean
