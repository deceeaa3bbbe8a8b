"""Env steps per second: cliprail vs Stable-Baselines3 PPO, same hyperparameters, one process.

Both run the PPO paper's MuJoCo setting (cliprail's `mujoco` preset: 1 env, horizon 2048,
10 epochs of minibatch 64 = 320 gradient steps per rollout, Adam 3e-4 annealed, gamma 0.99,
lambda 0.95, clip 0.2, grad clip 0.5, observation and reward normalisation; SB3 gets the same
values and VecNormalize). Each library runs with its own default torch thread setting
(cliprail: 1; SB3: torch's default) and the same number of rollouts, so the same number of
gradient steps. Raw env stepping with random actions is the ceiling. Measurements alternate
between the libraries and the medians are reported; the last line is the HalfCheetah ratio.

    python benchmarks/rl_throughput.py [--rollouts 3] [--repeats 3] [--compile]

With ``--compile`` cliprail also runs with torch.compile of its minibatch loss, the compilation
timed inside each run (so a short run pays it on few steps: ``--rollouts 489`` times a whole
1M-step training).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from cliprail.rl.config import preset_config
from cliprail.rl.trainer import RLTrainer

ENVS = ["CartPole-v1", "HalfCheetah-v5"]
HORIZON = 2048


def raw_steps_per_s(env_id: str, steps: int = 20_000) -> float:
    env = gym.make(env_id)
    env.reset(seed=0)
    env.action_space.seed(0)
    actions = [env.action_space.sample() for _ in range(1000)]
    t0 = time.perf_counter()
    for i in range(steps):
        _, _, term, trunc, _ = env.step(actions[i % 1000])
        if term or trunc:
            env.reset()
    return steps / (time.perf_counter() - t0)


def cliprail_steps_per_s(env_id: str, rollouts: int, seed: int, compile: bool = False) -> float:
    """Steps per second of one whole ``train()`` call: with ``compile``, the compilation at the
    first update is inside the timed span (amortised over ``rollouts``)."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = preset_config("mujoco", env_id=env_id, total_steps=rollouts * HORIZON, seed=seed,
                            run_dir=Path(tmp) / "run", progress=False, tensorboard=False,
                            checkpoint_every=0, compile=compile)  # fmt: skip
        trainer = RLTrainer(cfg)
        t0 = time.perf_counter()
        trainer.train()
        return trainer.global_step / (time.perf_counter() - t0)


def sb3_steps_per_s(env_id: str, rollouts: int, seed: int, threads: int) -> float:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    torch.set_num_threads(threads)
    env = VecNormalize(make_vec_env(env_id, n_envs=1, seed=seed), gamma=0.99)
    model = PPO(
        "MlpPolicy", env, n_steps=HORIZON, batch_size=64, n_epochs=10,
        learning_rate=lambda progress: 3e-4 * progress, gamma=0.99, gae_lambda=0.95,
        clip_range=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, seed=seed,
        device="cpu", verbose=0,
    )  # fmt: skip
    t0 = time.perf_counter()
    model.learn(rollouts * HORIZON)
    steps = model.num_timesteps
    env.close()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--rollouts", type=int, default=3, help="rollouts of 2048 steps per measurement"
    )
    ap.add_argument("--repeats", type=int, default=3, help="alternating measurements per library")
    ap.add_argument("--envs", nargs="+", default=ENVS)
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time cliprail with --compile (torch.compile of the minibatch loss), the "
        "compilation counted inside each timed run; the ratio lines then use the compiled runs. "
        "Give --rollouts 489 to time a full 1M-step training",
    )
    args = ap.parse_args()
    sb3_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, numpy {np.__version__}, {args.rollouts} x {HORIZON} steps "
          f"x {args.repeats} repeats; cliprail 1 thread, SB3 {sb3_threads} threads")  # fmt: skip
    ratios = {}
    for env_id in args.envs:
        raw = raw_steps_per_s(env_id)
        ours, theirs, eager = [], [], []
        for r in range(args.repeats):
            if args.compile:  # eager too, for the compile's own gain
                eager.append(cliprail_steps_per_s(env_id, args.rollouts, seed=r + 1))
            ours.append(cliprail_steps_per_s(env_id, args.rollouts, r + 1, compile=args.compile))
            theirs.append(sb3_steps_per_s(env_id, args.rollouts, seed=r + 1, threads=sb3_threads))
        m_ours, m_theirs = statistics.median(ours), statistics.median(theirs)
        if eager:
            m_eager = statistics.median(eager)
            print(
                f"{env_id:16s} cliprail eager {m_eager:7.0f} steps/s (runs "
                f"{', '.join(f'{x:.0f}' for x in eager)}); --compile {m_ours / m_eager:.2f}x that, "
                f"compilation included; eager/SB3 {m_eager / m_theirs:.2f}"
            )
        ratios[env_id] = m_ours / m_theirs
        runs_ours = ", ".join(f"{x:.0f}" for x in ours)
        runs_theirs = ", ".join(f"{x:.0f}" for x in theirs)
        print(
            f"{env_id:16s} raw stepping {raw:9.0f} steps/s | cliprail"
            f"{' --compile' if args.compile else ''} {m_ours:7.0f} steps/s "
            f"(runs {runs_ours}) | SB3 {m_theirs:7.0f} steps/s (runs {runs_theirs}) "
            f"| ratio {ratios[env_id]:.2f}"
        )
    for env_id, ratio in ratios.items():
        tag = " (cliprail --compile)" if args.compile else ""
        print(f"ratio cliprail/SB3 {env_id}{tag}: {ratio:.2f}")


if __name__ == "__main__":
    main()
