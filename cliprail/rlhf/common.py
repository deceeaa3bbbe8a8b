"""Pieces every RLHF stage shares: seeding, run folders, minibatch iteration, AdamW."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliprail.checkpoint import atomic_write_json
from cliprail.configio import config_to_dict
from cliprail.errors import RunDirError


def seed_all(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def start_run(run_dir: Path, cfg: Any, overwrite: bool = False) -> None:
    """Create ``run_dir`` and write ``config.json``; refuse to reuse a folder holding a run."""
    if (run_dir / "config.json").exists() and not overwrite:
        raise RunDirError(f"{run_dir} already holds a run; choose another --run-dir "
                          "(nothing was overwritten)")  # fmt: skip
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"{run_dir}: cannot create the run folder ({exc.strerror})") from None
    atomic_write_json(run_dir / "config.json", config_to_dict(cfg))


def batches(
    n: int, size: int, generator: torch.Generator, shuffle: bool = True
) -> Iterator[list[int]]:
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    for i in range(0, n, size):
        yield order[i : i + size]


def adamw(params: Any, lr: float) -> torch.optim.Optimizer:
    """AdamW with eps 1e-5 (Huang et al. 2024) and no weight decay."""
    return torch.optim.AdamW(params, lr=lr, eps=1e-5, weight_decay=0.0)
