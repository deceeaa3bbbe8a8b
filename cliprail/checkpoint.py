"""Atomic writes and checkpoints: weights in safetensors, nothing pickled.

A checkpoint is a folder ``<run>/checkpoints/<name>/`` holding safetensors files (one per group
of tensors), ``optimizer.pt`` (loaded with ``torch.load(weights_only=True)``), ``state.json`` and
``manifest.json`` (size and SHA-256 of every file). It is written under a temporary name, fsynced,
and renamed into place, so a crash mid-save leaves the previous checkpoints intact;
``<run>/checkpoints/latest`` names the newest complete one and is itself replaced atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from cliprail.errors import CheckpointError
from cliprail.interrupt import fault_point

MANIFEST = "manifest.json"
LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 ``text`` to ``path``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    ckpt_root: Path,
    name: str,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    keep_last: int | None = 3,
) -> Path:
    """Write checkpoint ``name`` under ``ckpt_root`` atomically and point ``latest`` at it.

    Args:
        ckpt_root: the run's ``checkpoints/`` folder.
        name: folder name, e.g. ``update_000050``.
        tensors: group name -> flat dict of tensors; each group becomes ``<group>.safetensors``.
        state: JSON-serialisable counters, RNG states, controller states...
        optimizer_state: an optimizer's ``state_dict()``, saved as ``optimizer.pt``.
        keep_last: delete older checkpoints (by name: ``update_*``, ``step_*``) beyond this
            many (None keeps all).

    Returns:
        The checkpoint folder.
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_root.glob(".*.tmp"):  # left by a process killed mid-save (one writer)
        shutil.rmtree(stale, ignore_errors=True)
    final = ckpt_root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=ckpt_root))
    try:
        files: dict[str, bytes] = {
            f"{group}.safetensors": save(
                # clone: parameters may be views of one flat buffer, and safetensors refuses
                # tensors that share memory
                {k: v.detach().cpu().clone() for k, v in group_tensors.items()}
            )
            for group, group_tensors in tensors.items()
        }
        files["state.json"] = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()
        if optimizer_state is not None:
            buf = io.BytesIO()
            torch.save(optimizer_state, buf)
            files["optimizer.pt"] = buf.getvalue()
        manifest = {}
        for fname, data in files.items():
            with open(tmp / fname, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            manifest[fname] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            fault_point("checkpoint-file")  # tests: SIGKILL with the checkpoint half written
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same name (e.g. the final checkpoint): swap safely
            old = ckpt_root / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(ckpt_root / LATEST, name + "\n")
    if keep_last is not None:
        _prune(ckpt_root, keep_last, protect=name)
    return final


def _prune(ckpt_root: Path, keep_last: int, protect: str) -> None:
    olds = sorted(
        p
        for p in ckpt_root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name != protect
    )
    for p in olds[: max(0, len(olds) - (keep_last - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` unless every file in the manifest is present and intact."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{manifest_path}: corrupt manifest ({exc})") from None
    for fname, meta in manifest.items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from checkpoint")
        if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: corrupt (size or SHA-256 differs from the manifest)")


def latest_checkpoint(ckpt_root: Path) -> Path:
    """The newest valid checkpoint: the one ``latest`` names if intact, else the newest intact
    folder. Raises :class:`CheckpointError` when there is none."""
    if not ckpt_root.is_dir():
        raise CheckpointError(f"{ckpt_root}: no checkpoints folder (was the run started?)")
    candidates: list[Path] = []
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        candidates.append(ckpt_root / pointer.read_text().strip())
    candidates += sorted(
        (p for p in ckpt_root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    errors = []
    for cand in candidates:
        try:
            verify_checkpoint(cand)
            return cand
        except CheckpointError as exc:
            errors.append(str(exc))
    detail = f" ({'; '.join(errors[:3])})" if errors else ""
    raise CheckpointError(f"{ckpt_root}: no valid checkpoint{detail}")


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], Any]:
    """Load a checkpoint folder: ``(tensor groups, state, optimizer_state or None)``.

    Verifies the manifest first; the optimizer state is read with ``weights_only=True``.
    """
    verify_checkpoint(path)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            tensors[f.stem] = load_file(f)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{f}: unreadable safetensors file ({exc})") from None
    state = json.loads((path / "state.json").read_text())
    opt_path = path / "optimizer.pt"
    optimizer_state = None
    if opt_path.is_file():
        try:
            optimizer_state = torch.load(opt_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{opt_path}: cannot be loaded safely ({exc})") from None
    return tensors, state, optimizer_state


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Write a whole folder atomically: yields a temporary folder beside ``path``; when the block
    ends without an error it replaces ``path`` (the old one is renamed away first, then
    deleted), otherwise it is removed and ``path`` is untouched. For ``save_pretrained``, which
    writes several files that must belong together.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # put the previous folder back
                os.replace(old, path)
            raise
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
