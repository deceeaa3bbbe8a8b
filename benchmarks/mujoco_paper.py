"""The PPO paper's seven MuJoCo tasks (v5 ids) with the `mujoco` preset (paper Table 3).

Trains each task for ``--steps`` (1M in the paper) over ``--seeds``, then prints a Markdown table
of the mean return of the last 100 training episodes beside the paper's Figure 3 values (read
off the curves at 1M steps) and CleanRL's published v4 results.

    python benchmarks/mujoco_paper.py --envs HalfCheetah-v5 Hopper-v5 --seeds 1 --jobs 2

Runs go to ``--out/<env>__s<seed>``; a finished run is read, not retrained.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TASKS = [
    "HalfCheetah-v5",
    "Hopper-v5",
    "Walker2d-v5",
    "Swimmer-v5",
    "Reacher-v5",
    "InvertedPendulum-v5",
    "InvertedDoublePendulum-v5",
]
PAPER_FIG3 = {  # PPO (clip) at 1M steps, read off Figure 3 of Schulman et al. 2017
    "HalfCheetah-v5": 1800,
    "Hopper-v5": 2330,
    "Walker2d-v5": 3460,
    "Swimmer-v5": 108,
    "Reacher-v5": -7,
    "InvertedPendulum-v5": 1000,
    "InvertedDoublePendulum-v5": 8000,
}
CLEANRL_V4 = {  # ppo_continuous_action.py, MuJoCo v4, 1M steps, 3 seeds (CleanRL docs)
    "HalfCheetah-v5": "1442.6 +- 46.0",
    "Hopper-v5": "2382.9 +- 271.7",
    "Walker2d-v5": "2288.0 +- 571.8",
    "InvertedPendulum-v5": "963.1 +- 22.2",
}


def run_one(env_id: str, seed: int, steps: int, out: Path) -> tuple[float, float]:
    """Train (unless already finished) and return (last-100 mean return, wall seconds)."""
    run_dir = out / f"{env_id}__s{seed}"
    metrics = run_dir / "metrics.jsonl"
    done_marker = run_dir / "wall_seconds.txt"
    if not done_marker.is_file():
        t0 = time.perf_counter()
        cmd = [
            sys.executable, "-m", "cliprail", "rl", "train", "--preset", "mujoco",
            "--env-id", env_id, "--seed", str(seed), "--total-steps", str(steps),
            "--run-dir", str(run_dir), "--no-progress",
        ]  # fmt: skip
        if run_dir.exists():
            cmd.append("--resume")
        subprocess.run(cmd, check=True)
        done_marker.write_text(f"{time.perf_counter() - t0:.1f}\n")
    last = [json.loads(line) for line in metrics.read_text().splitlines()][-1]
    return float(last["return_last100"]), float(done_marker.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--envs", nargs="+", default=TASKS, help="env ids (default: all seven)")
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds, 1..N")
    ap.add_argument("--steps", type=int, default=1_000_000, help="env steps per run")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (one core each)")
    ap.add_argument("--out", type=Path, default=Path("runs/mujoco_paper"), help="runs folder")
    args = ap.parse_args()
    # seed-major: every task gets its first seed before any task gets its second
    jobs = [(e, s) for s in range(1, args.seeds + 1) for e in args.envs]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: run_one(j[0], j[1], args.steps, args.out), jobs))
    by_env: dict[str, list[tuple[float, float]]] = {}
    for (env_id, _), res in zip(jobs, results, strict=True):
        by_env.setdefault(env_id, []).append(res)
    print(f"\n| task | cliprail, {args.steps:,} steps, {args.seeds} seed(s) | wall s/run "
          "| PPO paper Fig. 3 | CleanRL v4 |")  # fmt: skip
    print("|---|---|---|---|---|")
    for env_id, res in by_env.items():
        rets = [r for r, _ in res]
        sd = f" +- {statistics.stdev(rets):.1f}" if len(rets) > 1 else ""
        wall = statistics.median(w for _, w in res)
        print(
            f"| {env_id} | {statistics.mean(rets):.1f}{sd} | {wall:.0f} "
            f"| ~{PAPER_FIG3.get(env_id, 'n/a')} | {CLEANRL_V4.get(env_id, 'n/a')} |"
        )


if __name__ == "__main__":
    main()
