"""The learning curve of an Atari run (the PPO paper's `atari` preset), as a table and a PNG.

Train in the background (a run checkpoints every --checkpoint-every updates; the same command
with --resume continues it, in this session or the next):

    cliprail rl train --preset atari --env-id ALE/Pong-v5 --total-steps 10000000 \\
        --checkpoint-every 25 --run-dir runs/pong
    python benchmarks/atari_curve.py --run-dir runs/pong --png docs/figures/pong_curve.png

The total of 10M agent steps (40M frames) keeps the paper's annealing schedule, so the curve at
any step count is the one a full run passes through; CleanRL's `ppo_atari.py` reports 20.36
+- 0.20 on Pong at 10M steps (3 seeds), the paper's Table 6 20.7 at 40M frames.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run-dir", type=Path, required=True, help="an `rl train` run folder")
    ap.add_argument("--png", type=Path, default=None, help="write the curve to this PNG")
    ap.add_argument("--every", type=int, default=250_000, help="table rows every N steps")
    args = ap.parse_args()
    rows = [json.loads(x) for x in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
    pts = [(r["step"], r["return_last100"]) for r in rows if "return_last100" in r]
    if not pts:
        raise SystemExit(f"{args.run_dir}: no finished episodes yet")
    config = json.loads((args.run_dir / "config.json").read_text())
    print(f"{config['env_id']}, preset values, {pts[-1][0]:,} steps so far")
    print("| agent steps | mean return, last 100 episodes |\n|---|---|")
    mark = args.every
    for step, ret in pts:
        if step >= mark:
            print(f"| {step:,} | {ret:.1f} |")
            mark += args.every
    print(f"| {pts[-1][0]:,} (last) | {pts[-1][1]:.1f} |")
    if args.png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.plot([s for s, _ in pts], [r for _, r in pts], label="cliprail, seed 1")
        ax.axhline(20.36, ls=":", color="gray", label="CleanRL ppo_atari at 10M steps")
        ax.set_xlabel("agent steps (x4 frames)")
        ax.set_ylabel("mean return, last 100 episodes")
        ax.set_title(f"{config['env_id']}, the PPO paper's Atari settings")
        ax.legend(fontsize=7)
        args.png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=90, bbox_inches="tight")
        print(f"curve: {args.png}")


if __name__ == "__main__":
    main()
