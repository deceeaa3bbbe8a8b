"""Data-parallel scaling: env steps per second at 1 and 2 processes under torchrun.

Weak scaling: every process steps the same number of envs for the same number of updates
(``--num-envs`` per process, as in training), so 2 processes collect twice the steps of one. The
run is env-bound on purpose (one epoch of one minibatch per rollout: the update is a small part
of an update cycle), which is where data parallelism over envs pays. Each setting is launched
with ``torchrun --standalone --nproc_per_node=K -m cliprail rl train ...`` and its steps/s is
the one the trainer logs for the whole run (all ranks' env steps over the training loop's wall
time, process start-up excluded); the median over ``--repeats`` launches is reported, the
settings alternating. The last line is the efficiency: steps/s(2) / (2 x steps/s(1)), 1.0 being
perfect scaling. It needs 2 free cores to mean anything: on a shared machine it measures the
sharing too, so the machine's own ceiling is printed beside it: two independent 1-process runs
launched together, no communication at all (their summed steps/s over 2 x steps/s(1)).

    python benchmarks/scaling.py [--env-id CartPole-v1] [--num-envs 8] [--updates 10]
                                 [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

NUM_STEPS = 256  # rollout horizon per env


def command(nproc: int, args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The torchrun command line of one launch of ``nproc`` processes."""
    per_process = args.updates * args.num_envs * NUM_STEPS
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = (
        [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    )
    cmd = [
        *launcher, "--standalone", f"--nproc_per_node={nproc}", "-m", "cliprail", "rl", "train",
        "--env-id", args.env_id, "--preset", "classic", "--num-envs", str(args.num_envs),
        "--num-steps", str(NUM_STEPS), "--epochs", "1",
        "--minibatch-size", str(args.num_envs * NUM_STEPS),
        "--total-steps", str(nproc * per_process), "--checkpoint-every", "0",
        "--no-progress", "--no-tensorboard", "--run-dir", str(run_dir),
    ]  # fmt: skip
    return cmd


def launch(nproc: int, args: argparse.Namespace, run_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # cwd: the run's parent folder, so MuJoCo's MUJOCO_LOG.TXT does not land in the checkout
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        command(nproc, args, run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, cwd=run_dir.parent,
    )  # fmt: skip


def logged_steps_per_s(proc: subprocess.Popen[str], run_dir: Path) -> float:
    """Wait for a launch; the steps/s its trainer logged for the whole run (last line)."""
    _, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"scaling: {' '.join(map(str, proc.args))} failed:\n{err[-3000:]}")
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return float(last["steps_per_s"])


def steps_per_s(nproc: int, args: argparse.Namespace, run_dir: Path) -> float:
    """One torchrun launch of ``nproc`` processes."""
    return logged_steps_per_s(launch(nproc, args, run_dir), run_dir)


def independent_pair(args: argparse.Namespace, root: Path) -> float:
    """Two 1-process launches at once: the summed steps/s of runs that never communicate."""
    dirs = [root / "a", root / "b"]
    procs = [launch(1, args, d) for d in dirs]
    return sum(logged_steps_per_s(p, d) for p, d in zip(procs, dirs, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env-id", default="CartPole-v1")
    parser.add_argument("--num-envs", type=int, default=8, help="envs per process")
    parser.add_argument("--updates", type=int, default=10, help="updates per launch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{args.env_id}: {args.num_envs} envs x {NUM_STEPS} steps per process per update, "
        f"{args.updates} updates, 1 epoch of 1 minibatch; {os.cpu_count()} CPUs visible"
    )
    results: dict[int, list[float]] = {1: [], 2: []}
    pairs: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for nproc in (1, 2):
                sps = steps_per_s(nproc, args, Path(tmp) / f"r{rep}_n{nproc}")
                results[nproc].append(sps)
                print(f"  repeat {rep + 1}: {nproc} process(es): {sps:9.0f} steps/s")
            pairs.append(independent_pair(args, Path(tmp) / f"r{rep}_pair"))
            print(f"  repeat {rep + 1}: 2 independent 1-process runs: {pairs[-1]:9.0f} steps/s")
    median = {n: statistics.median(v) for n, v in results.items()}
    for n in (1, 2):
        print(f"{n} process(es): median {median[n]:9.0f} steps/s (all ranks' env steps)")
    ceiling = statistics.median(pairs) / (2 * median[1])
    print(f"machine ceiling (2 independent runs, no communication): {ceiling:.2f}")
    print(f"efficiency: {median[2] / (2 * median[1]):.2f} (steps/s at 2 / (2 x steps/s at 1))")


if __name__ == "__main__":
    main()
