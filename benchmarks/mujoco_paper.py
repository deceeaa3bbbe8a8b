"""The PPO paper's seven MuJoCo tasks (v5 ids) with the `mujoco` preset (paper Table 3).

Trains each task for ``--steps`` (1M in the paper) over ``--seeds``, then prints a Markdown table
of the mean return of the last 100 training episodes beside the paper's Figure 3 values (read
off the curves at 1M steps) and CleanRL's published v4 results.

    python benchmarks/mujoco_paper.py --envs HalfCheetah-v5 Hopper-v5 --seeds 1 --jobs 2
    python benchmarks/mujoco_paper.py --envs HalfCheetah-v5 Hopper-v5 Walker2d-v5 --seeds 3 \
        --sb3-seeds 1 --plot docs/figures/mujoco_curves.png

``--sb3-seeds N`` also trains Stable-Baselines3's PPO with the same hyperparameters (the column
beside cliprail's); ``--plot`` draws the learning curves (mean and range over seeds).

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
from typing import Any

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


def sb3_run(env_id: str, seed: int, steps: int, out: Path) -> tuple[float, float]:
    """Stable-Baselines3's PPO with the same hyperparameters (paper Table 3, the `mujoco`
    preset: VecNormalize for observations and rewards, lr annealed, grad clip 0.5), 1 torch
    thread; every finished episode's (step, return) goes to ``episodes.jsonl``. A finished run
    is read, not retrained (SB3 cannot resume exactly: a cut-off run starts again). Returns
    (last-100 mean return, wall seconds)."""
    run_dir = out / f"{env_id}__sb3_s{seed}"
    done = run_dir / "wall_seconds.txt"
    episodes = run_dir / "episodes.jsonl"
    if not done.is_file():
        import torch
        from stable_baselines3 import PPO
        from stable_baselines3.common.callbacks import BaseCallback
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.vec_env import VecNormalize

        class Episodes(BaseCallback):
            def __init__(self, f: Any) -> None:
                super().__init__()
                self.f = f

            def _on_step(self) -> bool:
                for info in self.locals["infos"]:
                    if "episode" in info:  # Monitor's record of the unnormalised return
                        rec = {"step": self.num_timesteps, "return": float(info["episode"]["r"])}
                        self.f.write(json.dumps(rec) + "\n")
                return True

        torch.set_num_threads(1)
        run_dir.mkdir(parents=True, exist_ok=True)
        env = VecNormalize(make_vec_env(env_id, n_envs=1, seed=seed), gamma=0.99)
        model = PPO(
            "MlpPolicy", env, n_steps=2048, batch_size=64, n_epochs=10,
            learning_rate=lambda progress: 3e-4 * progress, gamma=0.99, gae_lambda=0.95,
            clip_range=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, seed=seed,
            device="cpu", verbose=0,
            policy_kwargs={"net_arch": {"pi": [64, 64], "vf": [64, 64]}},
        )  # fmt: skip
        t0 = time.perf_counter()
        with episodes.open("w") as f:
            model.learn(steps, callback=Episodes(f))
        env.close()
        done.write_text(f"{time.perf_counter() - t0:.1f}\n")
    rets = [json.loads(x)["return"] for x in episodes.read_text().splitlines()][-100:]
    return statistics.mean(rets), float(done.read_text())


def curves(out: Path, envs: list[str], seeds: int, png: Path) -> None:
    """Learning curves, one panel per task: cliprail's mean over seeds of the last-100 return
    (shaded: the range over seeds), SB3's seeds dashed, the paper's Figure 3 value dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(envs), figsize=(4.2 * len(envs), 3.4), squeeze=False)
    for ax, env_id in zip(axes[0], envs, strict=True):
        runs = []
        for s in range(1, seeds + 1):
            f = out / f"{env_id}__s{s}" / "metrics.jsonl"
            if f.is_file():
                rows = [json.loads(x) for x in f.read_text().splitlines()]
                runs.append(
                    [(r["step"], r["return_last100"]) for r in rows if "return_last100" in r]
                )
        if runs:
            n = min(len(r) for r in runs)
            steps = np.array([x for x, _ in runs[0][:n]])
            vals = np.array([[y for _, y in r[:n]] for r in runs])
            ax.plot(steps, vals.mean(0), color="C0", label=f"cliprail, {len(runs)} seed(s)")
            ax.fill_between(steps, vals.min(0), vals.max(0), color="C0", alpha=0.25)
        for f in sorted(out.glob(f"{env_id}__sb3_s*/episodes.jsonl")):
            eps = [json.loads(x) for x in f.read_text().splitlines()]
            rets = np.array([e["return"] for e in eps])
            last100 = [rets[max(0, i - 99) : i + 1].mean() for i in range(len(rets))]
            ax.plot([e["step"] for e in eps], last100, "--", color="C1",
                    label=f"SB3 2.9, seed {f.parent.name.rsplit('s', 1)[-1]}")  # fmt: skip
        if env_id in PAPER_FIG3:
            ax.axhline(PAPER_FIG3[env_id], ls=":", color="gray", label="PPO paper Fig. 3")
        ax.set_title(env_id)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("mean return, last 100 episodes")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--envs", nargs="+", default=TASKS, help="env ids (default: all seven)")
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds, 1..N")
    ap.add_argument("--steps", type=int, default=1_000_000, help="env steps per run")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (one core each)")
    ap.add_argument("--out", type=Path, default=Path("runs/mujoco_paper"), help="runs folder")
    ap.add_argument(
        "--sb3-seeds",
        type=int,
        default=0,
        help="also train Stable-Baselines3's PPO with the same hyperparameters for seeds 1..N "
        "(pip install -e '.[bench]'); its column is the mean of those seeds",
    )
    ap.add_argument("--plot", type=Path, default=None, help="write the learning curves to this PNG")
    args = ap.parse_args()
    # seed-major: every task gets its first seed before any task gets its second
    jobs = [(e, s) for s in range(1, args.seeds + 1) for e in args.envs]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: run_one(j[0], j[1], args.steps, args.out), jobs))
    sb3_jobs = [(e, s) for s in range(1, args.sb3_seeds + 1) for e in args.envs]
    with ThreadPoolExecutor(args.jobs) as pool:
        sb3 = list(pool.map(lambda j: sb3_run(j[0], j[1], args.steps, args.out), sb3_jobs))
    by_env: dict[str, list[tuple[float, float]]] = {}
    for (env_id, _), res in zip(jobs, results, strict=True):
        by_env.setdefault(env_id, []).append(res)
    sb3_by_env: dict[str, list[float]] = {}
    for (env_id, _), (ret, _) in zip(sb3_jobs, sb3, strict=True):
        sb3_by_env.setdefault(env_id, []).append(ret)
    print(f"\n| task | cliprail, {args.steps:,} steps, {args.seeds} seed(s): mean +- std "
          f"(each seed) | wall s/run | SB3 2.9, same hyperparameters, {args.sb3_seeds} seed(s) "
          "| PPO paper Fig. 3 | CleanRL v4, 3 seeds |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for env_id, res in by_env.items():
        rets = [r for r, _ in res]
        sd = f" +- {statistics.stdev(rets):.1f}" if len(rets) > 1 else ""
        each = ", ".join(f"{r:.0f}" for r in rets)
        wall = statistics.median(w for _, w in res)
        theirs = sb3_by_env.get(env_id)
        sb3_cell = ", ".join(f"{r:.1f}" for r in theirs) if theirs else "n/a"
        print(
            f"| {env_id} | {statistics.mean(rets):.1f}{sd} ({each}) | {wall:.0f} | {sb3_cell} "
            f"| ~{PAPER_FIG3.get(env_id, 'n/a')} | {CLEANRL_V4.get(env_id, 'n/a')} |"
        )
    if args.plot is not None:
        curves(args.out, args.envs, args.seeds, args.plot)
        print(f"\nlearning curves: {args.plot}")


if __name__ == "__main__":
    main()
