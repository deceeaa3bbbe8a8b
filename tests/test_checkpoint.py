"""Checkpoints: atomic, verified, safe to load; a failed save leaves the previous one intact."""

from __future__ import annotations

import json

import pytest
import torch

from cliprail.checkpoint import (
    atomic_write_text,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from cliprail.errors import CheckpointError
from cliprail.monitor import truncate_metrics


def _save(root, name, value):
    return save_checkpoint(root, name, {"model": {"w": torch.full((3,), float(value))}},
                           {"step": value}, {"state": {}, "param_groups": []})  # fmt: skip


def test_round_trip_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, "update_0000001", 1)
    _save(root, "update_0000002", 2)
    path = latest_checkpoint(root)
    assert path.name == "update_0000002"
    tensors, state, opt = load_checkpoint(path)
    assert torch.equal(tensors["model"]["w"], torch.full((3,), 2.0))
    assert state == {"step": 2} and opt == {"state": {}, "param_groups": []}


def test_corrupt_newest_falls_back_to_previous(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, "update_0000001", 1)
    newest = _save(root, "update_0000002", 2)
    (newest / "model.safetensors").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(root).name == "update_0000001"
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(newest)


def test_failed_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, "update_0000001", 1)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)  # the optimizer state fails mid-save
    with pytest.raises(OSError, match="disk full"):
        _save(root, "update_0000002", 2)
    assert latest_checkpoint(root).name == "update_0000001"
    assert not (root / "update_0000002").exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temp litter


def test_keep_last_prunes_old_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for i in range(1, 6):
        save_checkpoint(root, f"update_{i:07d}", {"m": {"w": torch.zeros(1)}}, {}, keep_last=2)
    assert sorted(p.name for p in root.glob("update_*")) == ["update_0000004", "update_0000005"]


def test_missing_checkpoints_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints folder"):
        latest_checkpoint(tmp_path / "nothing")


def test_truncate_metrics_drops_later_steps_and_torn_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "x": s}) for s in (1, 2, 3)]
    atomic_write_text(p, "\n".join(lines) + '\n{"step": 4, "x"')  # a torn last line
    truncate_metrics(p, 2)
    assert [json.loads(line)["step"] for line in p.read_text().splitlines()] == [1, 2]
