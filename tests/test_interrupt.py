"""StopRequest: signals become a request honoured at the next safe point; stale temporary
checkpoint folders of a killed save are cleaned by the next save."""

from __future__ import annotations

import signal

import pytest
import torch

from cliprail.checkpoint import latest_checkpoint, save_checkpoint
from cliprail.interrupt import StopRequest


def test_signal_is_recorded_not_raised_and_handlers_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        exc = stop.interrupted("after update 3 of 9", "ckpt/update_3")
        assert exc.exit_code == 143 and "SIGTERM after update 3 of 9" in str(exc)
        assert "--resume" in str(exc)
    assert signal.getsignal(signal.SIGTERM) is before


def test_repeated_sigterm_is_absorbed_second_ctrl_c_stops_now():
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGTERM)  # the scheduler signals the job step...
        signal.raise_signal(signal.SIGTERM)  # ...and torchrun forwards it: still saving
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C: the user insists
            signal.raise_signal(signal.SIGINT)
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C pressed twice
            signal.raise_signal(signal.SIGINT)


def test_next_save_removes_a_half_written_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, "update_01", {"m": {"w": torch.zeros(2)}}, {"step": 1})
    stale = root / ".update_02.abc.tmp"  # what a SIGKILL mid-save leaves
    stale.mkdir()
    (stale / "m.safetensors").write_bytes(b"half")
    assert latest_checkpoint(root).name == "update_01"
    save_checkpoint(root, "update_03", {"m": {"w": torch.ones(2)}}, {"step": 3})
    assert not stale.exists() and latest_checkpoint(root).name == "update_03"


def test_progress_bar_closes_when_a_stop_leaves_the_loop():
    """The stages hold their bar in the ``with`` of the loop: a stop or an error stops the live
    display before the one-line message prints (else the message lands inside the bar)."""
    from cliprail.monitor import Progress

    with pytest.raises(RuntimeError), Progress(3, "x", enabled=True) as bar:
        bar.update(1)
        assert bar._bar is not None and bar._bar.live.is_started
        raise RuntimeError("stop")
    assert bar._bar is None
