"""Stopping a run on purpose (SIGINT, SIGTERM) and crashing it on purpose (tests).

:class:`StopRequest` turns SIGINT and SIGTERM into a request that a trainer honours at its next
safe point (the end of an update or optimizer step): it saves a checkpoint and raises
:class:`Interrupted`, which the CLI prints as one line and turns into exit code 128 + signal
(130 for SIGINT, 143 for SIGTERM: a stopped run is not a finished one, so ``a && b`` pipelines
and schedulers see it). A second SIGINT (Ctrl-C again) stops at once; repeated SIGTERMs
(a scheduler and torchrun both forwarding) are absorbed.

:func:`fault_point` lets the tests SIGKILL a run at an exact place (after update 7, halfway
through writing a checkpoint): ``CLIPRAIL_KILL_AT=<point>:<n>`` kills the process the ``n``-th
time :func:`fault_point` is reached with that point name. Unset, it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from cliprail.errors import CliprailError

KILL_ENV = "CLIPRAIL_KILL_AT"
_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process if ``$CLIPRAIL_KILL_AT`` is ``name:n`` and this is the n-th call."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    point, _, nth = spec.rpartition(":")
    if point != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)


class Interrupted(CliprailError):
    """A run stopped on SIGINT or SIGTERM after saving a checkpoint; ``--resume`` continues."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """A context manager that records SIGINT/SIGTERM instead of dying mid-update.

    ``with StopRequest() as stop: ... if stop.requested: save(); raise stop.interrupted(...)``.
    Outside the main thread (signal handlers cannot be set there) it records nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a second SIGINT (Ctrl-C pressed again) stops at once, saved or not. Any other
        # repeat is absorbed: schedulers (SLURM preemption, scancel) and torchrun may each send
        # SIGTERM to the same worker, and neither must cancel the save.
        if self.signum is not None and signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def interrupted(self, where: str, checkpoint: Any) -> Interrupted:
        """The exception to raise once the checkpoint is saved."""
        assert self.signum is not None
        name = signal.Signals(self.signum).name
        return Interrupted(
            f"stopped by {name} {where}; checkpoint saved to {checkpoint}; run the same command "
            "with --resume to continue",
            self.signum,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._restore()


__all__ = ["KILL_ENV", "Interrupted", "StopRequest", "fault_point"]
