"""What the TRL benchmarks (``dpo_vs_trl.py``, ``rlhf_vs_trl.py``) share: the flags every run
takes, the work folder, the untimed setup (world and SFT model, reused when already there), the
alternating repeats, and the stage's own phase timestamps (``stage.json``), read instead of
wrapping the stage's functions from outside (a call moved inside the stage would otherwise
change a benchmark's numbers without an error)."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

THREADS = 2  # torch threads of both libraries: the 2 cores of these machines
R = TypeVar("R")


def add_run_args(ap: argparse.ArgumentParser, work: str) -> None:
    """``--repeats``, ``--seed``, ``--sft-epochs`` and ``--out`` (``work`` names what the
    work folder holds)."""
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs per library, alternating cliprail and the peer; medians are reported; default 1",
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of the world, the setup and both runs; default 0"
    )
    ap.add_argument(
        "--sft-epochs",
        type=int,
        default=3,
        help="SFT epochs of the shared policy (untimed setup); default 3",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"work folder ({work}); what an earlier run trained there is reused; default a "
        "temporary folder, removed at the end",
    )


def work_folder(stack: contextlib.ExitStack, args: argparse.Namespace, prefix: str) -> Path:
    """``args.out``, created, or a temporary folder removed when ``stack`` closes."""
    if args.out is None:
        args.out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS)
    return args.out


def world_and_sft(out: Path, args: argparse.Namespace) -> tuple[dict[str, Path], Path]:
    """The healthcare world and an SFT model trained on it with cliprail's own code (untimed;
    reused if ``out`` already has one). Returns the world's paths and the model folder."""
    from cliprail.rlhf.sft import SFTConfig, train_sft
    from cliprail.scenarios.healthcare import BuildConfig, build

    data = build(out / "data", BuildConfig(seed=args.seed))
    sft = out / "sft" / "model"
    if not (sft / "config.json").is_file():
        shutil.rmtree(out / "sft", ignore_errors=True)
        t0 = time.perf_counter()
        sft = train_sft(
            SFTConfig(
                data=data["demonstrations"],
                run_dir=out / "sft",
                epochs=args.sft_epochs,
                seed=args.seed,
                progress=False,
            )
        )
        print(f"setup: SFT model trained in {time.perf_counter() - t0:.0f} s (untimed)", flush=True)
    return data, sft


def alternate(
    repeats: int,
    ours: Callable[[int], R],
    theirs: Callable[[int], R],
    line: Callable[[R, R], str],
) -> tuple[list[R], list[R]]:
    """``repeats`` runs of each library, cliprail first in every pair (so neither always runs
    on a warmer machine); with more than one, ``line(ours, theirs)`` is printed per pair."""
    a: list[R] = []
    b: list[R] = []
    for rep in range(repeats):
        a.append(ours(rep))
        b.append(theirs(rep))
        if repeats > 1:
            print(f"run {rep + 1}/{repeats}: {line(a[-1], b[-1])}", flush=True)
    return a, b


def stage_record(run_dir: Path) -> dict[str, Any]:
    """The stage's ``stage.json``: cost, ``wall_s`` and ``phases`` (seconds from the stage's
    start to ``loop_start``, ``loop_end`` and, for DPO, ``reference_start``/``reference_end``)."""
    record: dict[str, Any] = json.loads((run_dir / "stage.json").read_text())
    return record
