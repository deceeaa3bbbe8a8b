"""Configuration of the Gymnasium trainer: one frozen dataclass, presets from the papers.

Every field carries a docstring; ``cliprail rl train --help`` prints them. Derived sizes
(batch size, number of updates) come from :func:`derived`, never written back onto the config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cliprail.errors import ConfigError
from cliprail.resume import RUN_OPTIONS

Objective = Literal["clip", "kl_fixed", "kl_adaptive", "none"]


@dataclass(frozen=True)
class RLConfig:
    """PPO on a Gymnasium environment. ``--preset`` sets the paper's values; any flag overrides."""

    env_id: str = "CartPole-v1"
    """Gymnasium environment id, e.g. CartPole-v1, HalfCheetah-v5, ALE/Pong-v5."""
    preset: Literal["classic", "mujoco", "atari"] = "classic"
    """Hyperparameter preset applied before the other flags: classic (CartPole-like tasks,
    RL-Zoo's tuned values; also the defaults of every flag), mujoco (PPO paper Table 3), atari
    (PPO paper Table 5)."""
    total_steps: int = 100_000
    """Environment steps to train for, summed over all parallel envs and, under torchrun, over
    all processes (rounded up to whole rollouts)."""
    seed: int = 1
    """Seed of every RNG: torch, numpy, python, the envs, the minibatch shuffles (under
    torchrun, rank r uses seed + r; the parameters start from rank 0's)."""
    run_dir: Path | None = None
    """Run folder for config.json, metrics.jsonl, TensorBoard events and checkpoints.
    Default: runs/<env>__<preset>__s<seed>."""
    resume: bool = False
    """Continue the run in --run-dir from its latest valid checkpoint."""

    # --- Rollouts ---------------------------------------------------------------------------
    num_envs: int = 8
    """Parallel environments stepped together (a Gymnasium vector env); under torchrun, per
    process: the global batch is world_size x num_envs x num_steps."""
    vector: Literal["sync", "async", "ale"] = "sync"
    """sync steps the envs in this process; async runs one subprocess per env; ale (Atari
    only) steps them in ale-py's C++ vector env, in threads, with the same preprocessing
    (1.5-2x the wrappers' env steps/s here; cliprail/rl/ale_vector.py says where it differs)."""
    num_steps: int = 32
    """Rollout horizon per env: the batch holds num_envs x num_steps steps (paper's T)."""
    gamma: float = 0.98
    """Discount factor."""
    gae_lambda: float = 0.8
    """GAE lambda (bias-variance trade-off of the advantage estimator)."""

    # --- The update (reuse window) ----------------------------------------------------------
    epochs: int = 20
    """Passes over each rollout batch (paper's K)."""
    minibatch_size: int = 256
    """Samples per optimizer step; must divide num_envs x num_steps. Under torchrun, per
    process: each step averages the gradients of world_size x minibatch_size samples."""
    learning_rate: float = 1e-3
    """Adam learning rate (the start value when annealed)."""
    anneal_lr: bool = True
    """Anneal the learning rate linearly to 0 over training."""
    adam_eps: float = 1e-5
    """Adam epsilon (baselines' 1e-5, not PyTorch's 1e-8)."""
    max_grad_norm: float | None = 0.5
    """Clip the global gradient norm to this; None disables."""
    target_kl: float | None = None
    """Stop an update early when a minibatch's approx KL (k3) to the old policy exceeds this."""
    normalize_advantages: bool = True
    """Whiten advantages per minibatch (zero mean, unit std)."""

    # --- The objective ----------------------------------------------------------------------
    objective: Objective = "clip"
    """Policy objective: clip (paper eq. 7), kl_fixed or kl_adaptive (eq. 8), none (plain r*A;
    the 'no clipping or penalty' row of Table 1)."""
    clip_range: float = 0.2
    """Clip epsilon of the surrogate."""
    anneal_clip: bool = True
    """Anneal the clip epsilon linearly to 0 over training (paper's Atari setting)."""
    clip_range_high: float | None = None
    """Upper clip epsilon, when it should differ from --clip-range (DAPO's clip-higher, Yu et al.
    2025); annealed in proportion with --clip-range. None: symmetric, the paper's."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 of the clip objective: a negative advantage's objective is
    bounded below by c * A (Ye et al. 2020). None: off, the paper's."""
    kl_beta: float = 1.0
    """KL coefficient of the kl_fixed objective, start value of kl_adaptive."""
    kl_target: float = 0.01
    """d_targ of the kl_adaptive objective: beta halves below d_targ/1.5, doubles above 1.5x."""
    clip_range_vf: float | None = None
    """Clip the value prediction to old value +- this in the value loss; None disables."""
    vf_coef: float = 0.5
    """Weight c1 of the value loss."""
    ent_coef: float = 0.0
    """Weight c2 of the entropy bonus."""

    # --- Normalisation ----------------------------------------------------------------------
    normalize_obs: bool = False
    """Normalise observations by running mean and std (saved with checkpoints, used at eval)."""
    clip_obs: float = 10.0
    """Clip normalised observations to +- this."""
    normalize_reward: bool = False
    """Scale rewards by the running std of the discounted return (not its mean)."""
    clip_reward: float = 10.0
    """Clip scaled rewards to +- this."""

    # --- Networks ---------------------------------------------------------------------------
    network: Literal["mlp", "cnn"] = "mlp"
    """mlp: separate actor and critic MLPs; cnn: Nature CNN trunk shared by both heads."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layer widths of each MLP."""
    activation: Literal["tanh", "relu"] = "tanh"
    """Hidden activation of the MLPs."""
    log_std_init: float = 0.0
    """Initial state-independent log std of Gaussian policies."""

    # --- Atari ------------------------------------------------------------------------------
    atari: bool = False
    """Apply the Atari preprocessing (noop reset, frame skip with max-pool, episodic life, fire
    reset, 84x84 grayscale, reward clipping, frame stack)."""
    frame_stack: int = 4
    """Frames stacked into one Atari observation."""
    noop_max: int = 30
    """At most this many no-op actions at an Atari reset."""
    sticky_actions: float = 0.0
    """ALE repeat_action_probability (0 reproduces the paper's NoFrameskip-v4 setting)."""

    # --- Run --------------------------------------------------------------------------------
    checkpoint_every: int = 50
    """Save a checkpoint every this many updates (and always at the end); 0: only at the end."""
    device: str = "cpu"
    """Torch device for the networks: cpu, cuda, cuda:1..."""
    torch_threads: int = 1
    """Intra-op threads of torch; 1 is fastest for small MLPs, 0 keeps torch's default."""
    compile: bool = False
    """Compile each minibatch's loss (the networks' forward and the PPO terms, and their
    backward) with torch.compile: one fused graph instead of dozens of small ops (1.7x on the
    MuJoCo preset's minibatch on 2 CPU cores, after a compile of 10-40 s at the first update).
    The same maths, summed in another order: results agree with the eager path to float
    rounding, not bitwise. Where compilation fails (no C++ compiler, an unsupported op) the run
    says so once and continues eagerly."""
    progress: bool = True
    """Show a progress bar (steps, steps/s, recent return)."""
    tensorboard: bool = True
    """Write TensorBoard events beside metrics.jsonl."""


PRESETS: dict[str, dict[str, Any]] = {
    # RL-Baselines3-Zoo's tuned CartPole-v1 values: solves it within 1e5 steps.
    "classic": {},
    # PPO paper Table 3 (MuJoCo, 1M steps) + the continuous-control details of Huang et al. 2022
    # (obs normalisation and reward scaling with clip 10, grad clip 0.5, lr annealing).
    "mujoco": {
        "num_envs": 1,
        "num_steps": 2048,
        "epochs": 10,
        "minibatch_size": 64,
        "learning_rate": 3e-4,
        "anneal_lr": True,
        "gamma": 0.99,
        "gae_lambda": 0.95,
        "clip_range": 0.2,
        "anneal_clip": False,
        "ent_coef": 0.0,
        "vf_coef": 0.5,
        "normalize_obs": True,
        "normalize_reward": True,
        "hidden_sizes": (64, 64),
        "activation": "tanh",
        "total_steps": 1_000_000,
    },
    # PPO paper Table 5 (Atari): 8 actors x 128 steps, 3 epochs, minibatch 32 x 8, Adam 2.5e-4
    # and clip 0.1, both annealed by alpha: 1 -> 0; c1 = 1, c2 = 0.01; Nature CNN.
    "atari": {
        "num_envs": 8,
        "num_steps": 128,
        "epochs": 3,
        "minibatch_size": 256,
        "learning_rate": 2.5e-4,
        "anneal_lr": True,
        "gamma": 0.99,
        "gae_lambda": 0.95,
        "clip_range": 0.1,
        "anneal_clip": True,
        "vf_coef": 1.0,
        "ent_coef": 0.01,
        "network": "cnn",
        "atari": True,
        "torch_threads": 0,
        "total_steps": 10_000_000,
    },
}


def preset_config(name: str, **overrides: Any) -> RLConfig:
    """The config of a preset, with ``overrides`` applied on top."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return dataclasses.replace(RLConfig(), **{"preset": name, **PRESETS[name], **overrides})


RESUMABLE = RUN_OPTIONS | {"total_steps", "torch_threads", "vector"}
"""Fields a ``--resume`` may change: the run options, a longer ``total_steps`` (extend a run),
the CPU threads, and the vector env (``async`` and ``ale`` cannot save env state: the resumed
run then starts fresh episodes, with a warning). Not ``device`` (see
:data:`cliprail.resume.RUN_OPTIONS`)."""


@dataclass(frozen=True)
class Derived:
    """Sizes that follow from a config (and the number of data-parallel processes)."""

    batch_size: int
    """Env steps per rollout of one process: num_envs x num_steps."""
    num_updates: int
    """Updates to reach total_steps, counting every process's env steps."""
    world_size: int = 1
    """Processes (torchrun ranks) that each collect ``batch_size`` steps per update."""

    @property
    def global_batch_size(self) -> int:
        """Env steps per update over all processes: world_size x num_envs x num_steps."""
        return self.world_size * self.batch_size


def derived(cfg: RLConfig, world_size: int = 1) -> Derived:
    """Batch size and number of updates of ``cfg`` run on
    ``world_size`` data-parallel processes (``num_envs`` and ``minibatch_size`` are per
    process; ``total_steps`` counts all of them)."""
    batch = cfg.num_envs * cfg.num_steps
    return Derived(
        batch_size=batch,
        num_updates=max(1, math.ceil(cfg.total_steps / (batch * world_size))),
        world_size=world_size,
    )


def validate(cfg: RLConfig) -> None:
    """Raise :class:`ConfigError` naming the first field that is out of range or inconsistent."""
    positive_ints = ("total_steps", "num_envs", "num_steps", "epochs", "minibatch_size")
    for name in positive_ints:
        if getattr(cfg, name) <= 0:
            raise ConfigError(
                f"--{_flag(name)} must be a positive integer, got {getattr(cfg, name)}"
            )
    checks: list[tuple[bool, str]] = [
        (cfg.clip_range > 0, f"--clip-range must be > 0, got {cfg.clip_range}"),
        (0.0 < cfg.gamma <= 1.0, f"--gamma must be in (0, 1], got {cfg.gamma}"),
        (0.0 <= cfg.gae_lambda <= 1.0, f"--gae-lambda must be in [0, 1], got {cfg.gae_lambda}"),
        (cfg.learning_rate > 0, f"--learning-rate must be > 0, got {cfg.learning_rate}"),
        (cfg.adam_eps > 0, f"--adam-eps must be > 0, got {cfg.adam_eps}"),
        (cfg.vf_coef >= 0, f"--vf-coef must be >= 0, got {cfg.vf_coef}"),
        (cfg.ent_coef >= 0, f"--ent-coef must be >= 0, got {cfg.ent_coef}"),
        (cfg.kl_beta >= 0, f"--kl-beta must be >= 0, got {cfg.kl_beta}"),
        (cfg.kl_target > 0, f"--kl-target must be > 0, got {cfg.kl_target}"),
        (cfg.clip_obs > 0, f"--clip-obs must be > 0, got {cfg.clip_obs}"),
        (cfg.clip_reward > 0, f"--clip-reward must be > 0, got {cfg.clip_reward}"),
        (cfg.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {cfg.checkpoint_every}"),
        (cfg.torch_threads >= 0, f"--torch-threads must be >= 0, got {cfg.torch_threads}"),
        (cfg.frame_stack >= 1, f"--frame-stack must be >= 1, got {cfg.frame_stack}"),
        (cfg.noop_max >= 0, f"--noop-max must be >= 0, got {cfg.noop_max}"),
        (0.0 <= cfg.sticky_actions <= 1.0, "--sticky-actions must be in [0, 1]"),
        (
            len(cfg.hidden_sizes) > 0 and all(h > 0 for h in cfg.hidden_sizes),
            f"--hidden-sizes must be positive widths, got {cfg.hidden_sizes}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        raise ConfigError(f"--max-grad-norm must be > 0 or None, got {cfg.max_grad_norm}")
    if cfg.target_kl is not None and cfg.target_kl <= 0:
        raise ConfigError(f"--target-kl must be > 0 or None, got {cfg.target_kl}")
    if cfg.clip_range_high is not None and not cfg.clip_range_high > 0:
        raise ConfigError(f"--clip-range-high must be > 0 or None, got {cfg.clip_range_high}")
    if cfg.dual_clip is not None and not cfg.dual_clip > 1:
        raise ConfigError(f"--dual-clip must be > 1 or None, got {cfg.dual_clip}")
    if (cfg.clip_range_high is not None or cfg.dual_clip is not None) and cfg.objective != "clip":
        raise ConfigError(
            f"--clip-range-high and --dual-clip shape the clip objective; --objective is "
            f"{cfg.objective}"
        )
    if cfg.clip_range_vf is not None and cfg.clip_range_vf <= 0:
        raise ConfigError(f"--clip-range-vf must be > 0 or None, got {cfg.clip_range_vf}")
    batch = cfg.num_envs * cfg.num_steps
    if batch % cfg.minibatch_size != 0:
        raise ConfigError(
            f"--minibatch-size {cfg.minibatch_size} must divide the batch size "
            f"num_envs x num_steps = {cfg.num_envs} x {cfg.num_steps} = {batch}"
        )
    if cfg.network == "cnn" and not cfg.atari:
        raise ConfigError("--network cnn expects image observations: use it with --atari")


def _flag(name: str) -> str:
    return name.replace("_", "-")
