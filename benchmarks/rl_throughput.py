"""Env steps per second: cliprail vs Stable-Baselines3 PPO, same hyperparameters, one process.

Both run the PPO paper's MuJoCo setting (cliprail's `mujoco` preset: 1 env, horizon 2048,
10 epochs of minibatch 64 = 320 gradient steps per rollout, Adam 3e-4 annealed, gamma 0.99,
lambda 0.95, clip 0.2, grad clip 0.5, observation and reward normalisation; SB3 gets the same
values and VecNormalize). Each library runs with its own default torch thread setting
(cliprail: 1; SB3: torch's default) and the same number of rollouts, so the same number of
gradient steps. Raw env stepping with random actions is the ceiling. Measurements alternate
between the libraries and the medians are reported; the last line is the HalfCheetah ratio.

    python benchmarks/rl_throughput.py [--rollouts 3] [--repeats 3] [--compile]
    python benchmarks/rl_throughput.py --preset atari --envs ALE/Pong-v5 --rollouts 10

With ``--vector ale`` (Atari) cliprail steps its games in ale-py's C++ vector env; it is also
timed with the wrapper stack (``--vector sync``), alternating, for the backend's own gain.

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
THREADS = 2  # torch threads where the preset keeps torch's default (atari): the 2 cores


def raw_steps_per_s(env_id: str, steps: int = 20_000) -> float:
    if env_id.startswith("ALE/"):
        import ale_py

        gym.register_envs(ale_py)
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


def cliprail_steps_per_s(
    env_id: str,
    rollouts: int,
    seed: int,
    compile: bool = False,
    preset: str = "mujoco",
    vector: str = "sync",
) -> float:
    """Steps per second of one whole ``train()`` call: with ``compile``, the compilation at the
    first update is inside the timed span (amortised over ``rollouts``)."""
    base = preset_config(preset)
    torch.set_num_threads(max(base.torch_threads, 1) if base.torch_threads else THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = preset_config(preset, env_id=env_id,
                            total_steps=rollouts * base.num_envs * base.num_steps, seed=seed,
                            run_dir=Path(tmp) / "run", progress=False, tensorboard=False,
                            checkpoint_every=0, compile=compile, vector=vector)  # fmt: skip
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


def sb3_atari_steps_per_s(env_id: str, rollouts: int, seed: int, threads: int) -> float:
    """SB3's PPO with the `atari` preset's values (paper Table 5): 8 envs x 128 steps, 3 epochs
    of minibatch 256, lr 2.5e-4 and clip 0.1 annealed to 0, c1 1, c2 0.01, the Nature CNN, its
    Atari wrappers (noop 30, frame skip 4 with max-pool, episodic life, fire reset, 84x84 gray,
    reward clip) and 4 stacked frames."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack

    torch.set_num_threads(threads)
    # ALE/*-v5 skips 4 frames and repeats actions with p 0.25 by itself; the paper's setting
    # (cliprail's preset) is NoFrameskip-style: no env frame skip, no sticky actions
    env = VecFrameStack(
        make_atari_env(env_id, n_envs=8, seed=seed,
                       env_kwargs={"frameskip": 1, "repeat_action_probability": 0.0}),
        n_stack=4,
    )  # fmt: skip
    model = PPO(
        "CnnPolicy", env, n_steps=128, batch_size=256, n_epochs=3,
        learning_rate=lambda progress: 2.5e-4 * progress, gamma=0.99, gae_lambda=0.95,
        clip_range=lambda progress: 0.1 * progress, ent_coef=0.01, vf_coef=1.0,
        max_grad_norm=0.5, seed=seed, device="cpu", verbose=0,
    )  # fmt: skip
    t0 = time.perf_counter()
    model.learn(rollouts * 8 * 128)
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
        "--preset",
        choices=("mujoco", "atari"),
        default="mujoco",
        help="cliprail's preset and SB3's matching settings: mujoco (paper Table 3, 1 env x "
        "2048 steps) or atari (paper Table 5, 8 envs x 128 steps, Nature CNN; give --envs "
        "ALE/Pong-v5); a rollout is one preset horizon",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time cliprail with --compile (torch.compile of the minibatch loss), the "
        "compilation counted inside each timed run; the ratio lines then use the compiled runs. "
        "Give --rollouts 489 to time a full 1M-step training",
    )
    ap.add_argument(
        "--vector",
        choices=("sync", "ale"),
        default="sync",
        help="cliprail's vector env: sync (the wrapper stack) or ale (ale-py's C++ vector env, "
        "Atari only; sync is then timed too, for the backend's own gain)",
    )
    args = ap.parse_args()
    sb3_threads = torch.get_num_threads()
    base = preset_config(args.preset)
    print(f"torch {torch.__version__}, numpy {np.__version__}, preset {args.preset}: "
          f"{args.rollouts} x {base.num_envs} x {base.num_steps} steps x {args.repeats} repeats; "
          f"cliprail {base.torch_threads or THREADS} thread(s), SB3 {sb3_threads}")  # fmt: skip
    ratios = {}
    for env_id in args.envs:
        raw = raw_steps_per_s(env_id)
        ours, theirs, eager, wrapped = [], [], [], []
        for r in range(args.repeats):
            if args.vector == "ale":
                wrapped.append(
                    cliprail_steps_per_s(env_id, args.rollouts, r + 1, args.compile, args.preset)
                )
            if args.compile:  # eager too, for the compile's own gain
                eager.append(cliprail_steps_per_s(env_id, args.rollouts, r + 1, False, args.preset))
            ours.append(
                cliprail_steps_per_s(
                    env_id, args.rollouts, r + 1, args.compile, args.preset, args.vector
                )
            )
            sb3 = sb3_atari_steps_per_s if args.preset == "atari" else sb3_steps_per_s
            theirs.append(sb3(env_id, args.rollouts, seed=r + 1, threads=sb3_threads))
        m_ours, m_theirs = statistics.median(ours), statistics.median(theirs)
        if eager:
            m_eager = statistics.median(eager)
            print(
                f"{env_id:16s} cliprail eager {m_eager:7.0f} steps/s (runs "
                f"{', '.join(f'{x:.0f}' for x in eager)}); --compile {m_ours / m_eager:.2f}x that, "
                f"compilation included; eager/SB3 {m_eager / m_theirs:.2f}"
            )
        if wrapped:
            m_wrapped = statistics.median(wrapped)
            print(
                f"{env_id:16s} cliprail --vector sync {m_wrapped:7.0f} steps/s (runs "
                f"{', '.join(f'{x:.0f}' for x in wrapped)}); --vector ale "
                f"{m_ours / m_wrapped:.2f}x that; sync/SB3 {m_wrapped / m_theirs:.2f}"
            )
        ratios[env_id] = m_ours / m_theirs
        runs_ours = ", ".join(f"{x:.0f}" for x in ours)
        runs_theirs = ", ".join(f"{x:.0f}" for x in theirs)
        print(
            f"{env_id:16s} raw stepping {raw:9.0f} steps/s | cliprail"
            f"{' --compile' if args.compile else ''}"
            f"{' --vector ale' if args.vector == 'ale' else ''} {m_ours:7.0f} steps/s "
            f"(runs {runs_ours}) | SB3 {m_theirs:7.0f} steps/s (runs {runs_theirs}) "
            f"| ratio {ratios[env_id]:.2f}"
        )
    for env_id, ratio in ratios.items():
        flags = [f for f, on in (("--compile", args.compile), ("--vector ale",
                                 args.vector == "ale")) if on]  # fmt: skip
        tag = f" (cliprail {' '.join(flags)})" if flags else ""
        print(f"ratio cliprail/SB3 {env_id}{tag}: {ratio:.2f}")


if __name__ == "__main__":
    main()
