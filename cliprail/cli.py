"""Command line: ``cliprail rl train``, ``cliprail rl eval``, ``cliprail demo``.

Each command parses a frozen dataclass with tyro, so ``--help`` shows every field's docstring.
Errors that users can cause (bad flags, unknown envs, missing or corrupt checkpoints, a run
folder in the way) print one line ``cliprail: error: ...`` and exit with code 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

USAGE = """usage: cliprail <command> [flags]   (add --help to any command)

commands:
  rl train    train PPO on a Gymnasium env (classic control, MuJoCo, Atari)
  rl eval     evaluate a trained run: mean and std of the episodic return
  rlhf world  write the healthcare world (prompts, demonstrations, preference pairs) as JSONL
  rlhf sft    supervised fine-tuning on demonstrations (a tiny GPT-2 or any local causal LM)
  rlhf reward train a Bradley-Terry reward model on preference pairs
  rlhf ppo    PPO against the reward model with a KL penalty and the safety fuse
  rlhf eval   SFT against a PPO run on held-out prompts (gold judge, rates, KL); report.html
  rlhf dpo    Direct Preference Optimization (or IPO) from the SFT model on the same pairs
  rlhf best-of-n
              sample n answers from the SFT model, keep the reward model's favourite
  rlhf compare RUN_DIR...
              SFT, PPO, DPO and best-of-n on the same held-out prompts: table and plot
  demo        the main job: RLHF on the healthcare world end to end (--world cartpole: PPO on
              CartPole-v1; --hacking: a biased panel and no KL penalty, for the fuse to catch)

global flags:
  --debug     show Python tracebacks instead of one-line errors
"""


LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022]\s|\d+[.)]\s)")
"""A docstring line that starts a list item: it keeps its line break in --help."""


def help_paragraphs(helptext: str) -> str:
    """A docstring as help text: each paragraph's lines joined into one, so the terminal wraps
    them; a blank line still separates paragraphs and a list item (``- x``, ``1. x``) still
    starts its own line. tyro 1.0 keeps a line break before every line that starts with
    anything but a letter, so docstrings wrapped at 100 columns printed "... (reviewer bias"
    and "6: they like ..." on separate lines, mid-sentence (issue 14)."""
    paragraphs: list[list[str]] = [[]]
    for raw in helptext.split("\n"):
        line = raw.strip()
        if not line:
            if paragraphs[-1]:
                paragraphs.append([])
        elif paragraphs[-1] and not LIST_ITEM.match(line):
            paragraphs[-1][-1] += " " + line
        else:
            paragraphs[-1].append(line)
    return "\n\n".join("\n".join(p) for p in paragraphs if p)


def parse_flags(cls: Any, **kwargs: Any) -> Any:
    """``tyro.cli(cls, **kwargs)`` with :func:`help_paragraphs` for every help text."""
    import tyro
    from tyro import _strings

    if hasattr(_strings, "remove_single_line_breaks"):  # the private hook tyro 1.0 calls
        _strings.remove_single_line_breaks = help_paragraphs
    return tyro.cli(cls, **kwargs)


@dataclass(frozen=True)
class EvalArgs:
    """Evaluate a trained run with its saved observation normalisation."""

    run_dir: Path
    """Run folder written by `cliprail rl train`."""
    episodes: int = 10
    """Episodes to run (spread over up to 8 envs, each finishing its share)."""
    stochastic: bool = False
    """Sample actions instead of taking the policy's mode."""
    seed: int | None = None
    """Seed of the evaluation envs (default: the run's seed + 10000)."""
    json: bool = False
    """Print one JSON object instead of a sentence."""


@dataclass(frozen=True)
class DemoArgs:
    """The main job: the whole RLHF pipeline on the embedded healthcare world (world ->
    tokenizer -> SFT -> reward model -> PPO with the safety fuse -> eval -> report.html), on a
    laptop CPU with no downloads. `--world cartpole` runs the Gymnasium demo instead."""

    run_dir: Path | None = None
    """Run folder (default: runs/demo/<world>-<timestamp>)."""
    world: Literal["healthcare", "cartpole"] = "healthcare"
    """healthcare: RLHF with PPO; cartpole: PPO on CartPole-v1 (classic preset), then eval."""
    hacking: bool = False
    """Show the failure the fuse exists for: a strongly biased reviewer panel (reviewer bias
    6: they like short, confident answers and often miss unsafe advice) and no KL penalty or
    budget, so the proxy reward can rise while the gold score falls."""
    compare: bool = False
    """Also run DPO and best-of-n (n = 1, 2, 4, 8, 16) on the same preferences and prompts, and
    GRPO and RLOO (PPO's clip without a critic: --group-size responses per prompt, the same
    episodes, learning rate and KL penalty), and add their comparison with PPO and SFT (table,
    gold against sqrt(KL) along each run) to the report."""
    group_size: int = 4
    """Responses per prompt of the GRPO and RLOO runs of --compare, and of the main run with a
    critic-free --advantage."""
    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    """The main run's advantage estimator: gae (PPO with the critic, the default) or a
    critic-free one with --group-size responses per prompt (docs/results.md compares them on
    this world)."""
    total_episodes: int | None = None
    """PPO episodes (healthcare): by default 4608, 72 updates of 64 prompts (docs/results.md:
    the runs that chose this and the learning rate, on seeds 0-4, and their check on fresh
    seeds); with --hacking 3072 (48 updates)."""
    kl_coef: float = 0.2
    """PPO's per-token KL penalty (healthcare; --hacking sets 0). Larger than `rlhf ppo`'s
    0.05 (Huang et al. 2024's value for a pretrained 1B model): the tiny demo model drifts off
    its slot-copying with less, where the reward model cannot see it (docs/results.md)."""
    ppo_learning_rate: float | None = None
    """PPO's AdamW learning rate (healthcare): by default 1e-4. The reward model cannot tell a
    wrong slot from the right one on about half the prompts (docs/results.md), so each step
    moves the slot copying by noise that only the KL penalty pulls back; smaller steps, more
    of them. With --hacking 2e-4, the unprotected run's larger step (at 1e-4 its gold fell too
    slowly past the peak for the fuse's 3 evaluations: docs/results.md)."""
    n_train: int | None = None
    """Training requests of the healthcare world, from which the SFT demonstrations, the
    preference pairs and the PPO prompts come (default: the world's own, see `cliprail rlhf
    world --help`)."""
    n_eval: int | None = None
    """Held-out requests of each of the two held-out splits: the safety fuse chooses and stops
    on the val split, the final evaluation tests on the eval split, which nothing chose on
    (default: the world's own)."""
    sft_epochs: int = 8
    """SFT epochs over the world's demonstrations (healthcare): 2,000 steps of 16 at the
    default world size, enough for the tiny model to book the slot asked for."""
    sft_learning_rate: float = 4e-3
    """SFT peak learning rate (healthcare), decayed linearly to 0."""
    total_steps: int = 100_000
    """Environment steps (cartpole)."""
    seed: int = 0
    """Seed of the whole pipeline."""
    progress: bool = True
    """Show progress bars."""
    json: bool = False
    """Print the run's summary.json as one JSON line on standard output, last (the progress
    lines go to standard error)."""
    threads: int = 1
    """Torch threads (healthcare). One gives the same numbers on every machine, those of
    docs/results.md; more threads sum floats in another order, and the run follows another
    trajectory (seed 0 with 2 threads kept another checkpoint: docs/results.md)."""


def _rl_train(argv: list[str]) -> int:
    from cliprail.rl.config import PRESETS, RLConfig, preset_config
    from cliprail.rl.trainer import RLTrainer

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="classic")
    known, _ = pre.parse_known_args(argv)
    if known.preset not in PRESETS:
        from cliprail.errors import ConfigError

        raise ConfigError(
            f"--preset: unknown preset {known.preset!r}; expected one of {sorted(PRESETS)}"
        )
    cfg = parse_flags(
        RLConfig,
        args=argv,
        default=preset_config(known.preset),
        prog="cliprail rl train",
        description="Train PPO on a Gymnasium environment. --preset applies the paper's "
        "hyperparameters first; every other flag overrides them.",
    )
    trainer = RLTrainer(cfg)
    if trainer.is_main:  # under torchrun, rank 0 speaks for all
        print(f"cliprail: run folder {trainer.run_dir}", file=sys.stderr)
    last = trainer.train()
    ret = last.get("return_last100")
    if not trainer.is_main:
        return 0
    print(
        f"cliprail: trained {trainer.global_step} steps; mean return of the last 100 episodes "
        f"{ret:.2f}"
        if ret is not None
        else f"cliprail: trained {trainer.global_step} steps",
        file=sys.stderr,
    )
    return 0


def _rl_eval(argv: list[str]) -> int:
    from cliprail.rl.evaluate import evaluate

    args = parse_flags(EvalArgs, args=argv, prog="cliprail rl eval")
    result = evaluate(args.run_dir, args.episodes, not args.stochastic, args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['env_id']}: mean return {result['mean_return']:.2f} +- "
            f"{result['std_return']:.2f} over {result['episodes']} episodes "
            f"({'deterministic' if result['deterministic'] else 'stochastic'} policy, "
            f"checkpoint {result['checkpoint']}, {result['global_step']} training steps)"
        )
    return 0


def _demo(argv: list[str]) -> int:
    args = parse_flags(DemoArgs, args=argv, prog="cliprail demo")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = args.run_dir or Path("runs/demo") / f"{args.world}-{stamp}"
    if args.world == "cartpole":
        return _demo_cartpole(args, run_dir)
    return _demo_rlhf(args, run_dir)


def _demo_cartpole(args: DemoArgs, run_dir: Path) -> int:
    from cliprail.rl.config import preset_config
    from cliprail.rl.evaluate import evaluate
    from cliprail.rl.trainer import RLTrainer

    cfg = preset_config(
        "classic",
        env_id="CartPole-v1",
        total_steps=args.total_steps,
        seed=args.seed + 1,
        run_dir=run_dir,
        progress=args.progress,
    )
    t0 = time.perf_counter()
    RLTrainer(cfg).train()
    train_s = time.perf_counter() - t0
    result = evaluate(run_dir, episodes=20)
    print(
        f"\ncliprail demo: CartPole-v1 trained for {result['global_step']} steps"
        f" in {train_s:.0f} s;"
        f"\n  evaluation over {result['episodes']} episodes: mean return "
        f"{result['mean_return']:.1f} +- {result['std_return']:.1f} (solved at >= 475)"
        f"\n  run folder: {run_dir} (metrics.jsonl, tensorboard/, checkpoints/)"
    )
    return 0


def _demo_rlhf(args: DemoArgs, run_dir: Path) -> int:
    import torch

    from cliprail.checkpoint import atomic_write_json
    from cliprail.rlhf.evaluate import EvalConfig, compare, table
    from cliprail.rlhf.ppo import train_ppo
    from cliprail.rlhf.report import write_report
    from cliprail.rlhf.reward import RewardConfig, train_reward
    from cliprail.rlhf.sft import SFTConfig, train_sft
    from cliprail.scenarios.healthcare import BuildConfig, build

    if args.threads < 1:
        from cliprail.errors import ConfigError

        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    say = _stderr if args.json else print  # --json: stdout carries the summary alone
    bias = 6.0 if args.hacking else 1.0
    say(f"cliprail demo: healthcare scheduling assistant, run folder {run_dir}")
    sizes = {
        k: v
        for k, v in (("n_train", args.n_train), ("n_val", args.n_eval), ("n_eval", args.n_eval))
        if v
    }
    world = BuildConfig(seed=args.seed, reviewer_bias=bias, **sizes)
    data = build(run_dir / "data", world)
    say(f"[1/5] world: {data['prompts'].parent} (reviewer bias {bias})")
    sft = train_sft(
        SFTConfig(
            data=data["demonstrations"],
            run_dir=run_dir / "sft",
            epochs=args.sft_epochs,
            learning_rate=args.sft_learning_rate,
            extra_tokens=data["tokens"],
            seed=args.seed,
            progress=args.progress,
        )
    )
    say(f"[2/5] SFT model: {sft}")
    rm = train_reward(
        RewardConfig(
            data=data["preferences"],
            sft_model=sft,
            run_dir=run_dir / "rm",
            demonstrations=data["demonstrations"],
            seed=args.seed,
            progress=args.progress,
        )
    )
    say(f"[3/5] reward model: held-out pairwise accuracy {rm['heldout_accuracy']:.3f}")
    family: dict[str, Any] = (
        {"advantage": args.advantage, "group_size": args.group_size}
        if args.advantage != "gae"
        else {}
    )
    fuse = train_ppo(demo_ppo_config(args, run_dir, data, sft, world.n_val, **family))
    state = "fuse halted: " + fuse["halted"] if fuse["halted"] else "fuse not tripped"
    say(
        f"[4/5] PPO: {state}; kept checkpoint update {fuse['best_update']} "
        f"(validation gold {fuse['best_gold']:.3f}; peak {fuse.get('peak_score', math.nan):.3f} "
        f"at update {fuse.get('peak_update')})"
    )
    result = compare(EvalConfig(run_dir=run_dir / "ppo", n_prompts=world.n_eval))
    extra = _demo_compare(args, run_dir, data, sft, world.n_val, say) if args.compare else None
    report = write_report(run_dir / "ppo", result, out=run_dir / "report.html", extra_html=extra)
    say(
        f"[5/5] evaluation on {result['n_prompts']} test prompts (split eval, unseen by the "
        f"fuse):\n{table(result)}"
    )
    summary = demo_summary(args.seed, time.perf_counter() - t0, result, fuse)
    atomic_write_json(run_dir / "summary.json", summary)
    say(
        f"\ncliprail demo finished in {summary['wall_s']:.0f} s. Report: {report}; "
        f"summary: {run_dir / 'summary.json'}"
    )
    if args.json:
        print(json.dumps(summary))
    return 0


def demo_ppo_config(
    args: DemoArgs,
    run_dir: Path,
    data: dict[str, Path],
    sft: Path,
    n_val: int,
    name: str = "ppo",
    **overrides: Any,
) -> Any:
    """The demo's PPO stage (and, with ``overrides``, its GRPO and RLOO runs under --compare:
    the same prompts, models, episodes, learning rate and KL penalty)."""
    from cliprail.rlhf.ppo import PPOConfig

    return PPOConfig(
        prompts=data["prompts"],
        sft_model=sft,
        reward_model=run_dir / "rm" / "model",
        run_dir=run_dir / name,
        total_episodes=(3072 if args.hacking else 4608)
        if args.total_episodes is None
        else args.total_episodes,
        seed=args.seed,
        kl_coef=0.0 if args.hacking else args.kl_coef,
        learning_rate=(2e-4 if args.hacking else 1e-4)
        if args.ppo_learning_rate is None
        else args.ppo_learning_rate,
        kl_budget=None if args.hacking else 20.0,
        eval_prompts=n_val,  # the fuse chooses on val; the summary tests on eval
        progress=args.progress,
        **overrides,
    )


def demo_summary(
    seed: int, wall_s: float, result: dict[str, Any], fuse: dict[str, Any]
) -> dict[str, Any]:
    """``summary.json``: the seed, the wall time, SFT's and the kept PPO policy's metrics on the
    held-out prompts (the keys of ``rlhf eval --json``; PPO's also wins, losses and ties against
    SFT, prompt by prompt) and the fuse's verdict, kept update and history."""
    from cliprail.rlhf.evaluate import COLUMNS

    history = [
        {
            "update": e["update"],
            "gold": e["gold"],
            "proxy": e["proxy_reward"],
            "kl": e["kl_ref"],
            **{k: v for k, v in e.items() if k not in ("update", "gold", "proxy_reward", "kl_ref")},
        }
        for e in fuse.get("evals", [])
    ]
    return {
        "seed": seed,
        "wall_s": round(wall_s, 1),
        "sft": {c: result["sft"][c] for c in COLUMNS},
        "ppo": {
            **{c: result["ppo"][c] for c in COLUMNS},
            **{k: result[k] for k in ("wins", "losses", "ties", "win_rate")},
        },
        "fuse": {
            "verdict": fuse.get("halted") or "not tripped",
            "kept_update": fuse.get("best_update"),
            "peak_update": fuse.get("peak_update", fuse.get("best_update")),
            "split": fuse.get("split", "eval"),
            "history": history,
        },
    }


def _stderr(*parts: object) -> None:
    print(*parts, file=sys.stderr)


def _demo_compare(
    args: DemoArgs,
    run_dir: Path,
    data: dict[str, Path],
    sft: Path,
    n_val: int,
    say: Callable[..., None] = print,
) -> str:
    """DPO, best-of-n, GRPO and RLOO beside PPO and SFT; returns the report's HTML section."""
    from cliprail.rlhf.bestofn import BestOfNConfig, kl_table, run_best_of_n
    from cliprail.rlhf.compare import CompareConfig, compare_runs, html_section, plot
    from cliprail.rlhf.compare import table as compare_table
    from cliprail.rlhf.dpo import DPOConfig, train_dpo
    from cliprail.rlhf.ppo import train_ppo

    rm = run_dir / "rm" / "model"
    dpo = train_dpo(
        DPOConfig(
            data=data["preferences"],
            sft_model=sft,
            run_dir=run_dir / "dpo",
            prompts=data["prompts"],
            reward_model=rm,
            seed=args.seed,
            progress=args.progress,
        )
    )
    say(f"[compare] DPO: held-out implicit-reward accuracy {dpo['heldout_implicit_accuracy']:.3f}")
    bon = run_best_of_n(
        BestOfNConfig(
            prompts=data["prompts"],
            sft_model=sft,
            reward_model=rm,
            run_dir=run_dir / "best-of-n",
            seed=args.seed,
            progress=args.progress,
        )
    )
    say(f"[compare] best-of-n, KL analytic and estimated:\n{kl_table(bon)}")
    critic_free = []
    for adv in ("grpo", "rloo"):  # PPO's clip without the critic (issue 16): same budget
        cfg = demo_ppo_config(
            args, run_dir, data, sft, n_val, name=adv, advantage=adv, group_size=args.group_size
        )
        fuse = train_ppo(cfg)
        say(
            f"[compare] {adv.upper()} (groups of {args.group_size}): kept update "
            f"{fuse['best_update']} (validation gold {fuse['best_gold']:.3f})"
        )
        critic_free.append(run_dir / adv)
    result = compare_runs(
        CompareConfig(
            runs=(
                run_dir / "sft",
                run_dir / "ppo",
                *critic_free,
                run_dir / "dpo",
                run_dir / "best-of-n",
            ),
            out=run_dir / "compare",
        )
    )
    say(f"[compare] on {result['n_prompts']} held-out prompts:\n{compare_table(result)}")
    return html_section(result, plot(result))


def _rlhf_eval(argv: list[str]) -> int:
    from cliprail.rlhf.evaluate import EvalConfig, compare, summary_json, table
    from cliprail.rlhf.report import write_report

    cfg = parse_flags(EvalConfig, args=argv, prog="cliprail rlhf eval")
    result = compare(cfg)
    print(summary_json(result) if cfg.json else table(result))
    path = write_report(cfg.run_dir, result)
    print(f"cliprail: report {path}", file=sys.stderr)
    return 0


def _rlhf_world(argv: list[str]) -> int:
    import dataclasses

    from cliprail.scenarios.healthcare import BuildConfig, build

    @dataclass(frozen=True, kw_only=True)
    class WorldArgs(BuildConfig):
        """Write the healthcare world's prompts, demonstrations, preference pairs and the
        tokenizer's extra tokens (tokens.json) as files; every rate and size is a flag."""

        out: Path
        """Folder for prompts.jsonl, demonstrations.jsonl, preferences.jsonl and tokens.json."""

        def __post_init__(self) -> None:
            """Checked below, as a BuildConfig, so that a bad value is one line and exit 2."""

    args = parse_flags(WorldArgs, args=argv, prog="cliprail rlhf world")
    try:
        names = [f.name for f in dataclasses.fields(BuildConfig)]
        cfg = BuildConfig(**{name: getattr(args, name) for name in names})
    except ValueError as exc:
        from cliprail.errors import ConfigError

        raise ConfigError(str(exc)) from None
    paths = build(args.out, cfg)
    for name, path in paths.items():
        count = f"{sum(1 for _ in path.open())} records" if path.suffix == ".jsonl" else "tokens"
        print(f"{name}: {path} ({count})")
    return 0


def _rank0() -> bool:
    """False on torchrun ranks other than 0, which print nothing (rank 0 reports)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _rlhf_sft(argv: list[str]) -> int:
    from cliprail.rlhf.sft import SFTConfig, train_sft

    cfg = parse_flags(SFTConfig, args=argv, prog="cliprail rlhf sft")
    out = train_sft(cfg)
    if _rank0():
        print(f"cliprail: SFT model written to {out}", file=sys.stderr)
    return 0


def _rlhf_reward(argv: list[str]) -> int:
    from cliprail.rlhf.reward import RewardConfig, train_reward

    cfg = parse_flags(RewardConfig, args=argv, prog="cliprail rlhf reward")
    metrics = train_reward(cfg)
    if not _rank0():
        return 0
    print(
        f"cliprail: reward model in {cfg.run_dir / 'model'}; held-out pairwise accuracy "
        f"{metrics['heldout_accuracy']:.3f}",
        file=sys.stderr,
    )
    return 0


def _rlhf_ppo(argv: list[str]) -> int:
    from cliprail.rlhf.ppo import PPOConfig, train_ppo

    cfg = parse_flags(PPOConfig, args=argv, prog="cliprail rlhf ppo")
    fuse = train_ppo(cfg)
    if not _rank0():
        return 0
    if fuse["halted"]:
        print(f"cliprail: the safety fuse halted the run: {fuse['halted']}", file=sys.stderr)
    print(f"cliprail: {fuse_line(fuse, cfg.run_dir / 'policy')}", file=sys.stderr)
    return 0


def fuse_line(fuse: dict[str, Any], last_policy: Path | str) -> str:
    """The last line of `rlhf ppo`: the checkpoint the fuse kept, or that it never evaluated."""
    if not fuse.get("best_checkpoint") or not fuse.get("evals"):
        return (
            f"no fuse evaluation ran (--eval-every 0), so no best checkpoint was kept; the "
            f"last policy is in {last_policy}"
        )
    key = fuse.get("score", "gold")
    # a fuse.json from before check sets (no "score" key) always followed gold
    scored = "score" not in fuse or any(key in e for e in fuse["evals"])
    why = f"eval {key} {fuse['best_gold']:.3f}" if scored else "the newest within the KL budget"
    return (
        f"best checkpoint {fuse['best_checkpoint']} (update {fuse['best_update']}, {why}); "
        f"last policy in {last_policy}"
    )


def _rlhf_dpo(argv: list[str]) -> int:
    from cliprail.rlhf.dpo import DPOConfig, train_dpo

    cfg = parse_flags(DPOConfig, args=argv, prog="cliprail rlhf dpo")
    metrics = train_dpo(cfg)
    if not _rank0():
        return 0
    print(
        f"cliprail: DPO policy in {cfg.run_dir / 'model'}; held-out implicit-reward accuracy "
        f"{metrics['heldout_implicit_accuracy']:.3f}",
        file=sys.stderr,
    )
    return 0


def _rlhf_best_of_n(argv: list[str]) -> int:
    from cliprail.rlhf.bestofn import BestOfNConfig, kl_table, run_best_of_n

    cfg = parse_flags(BestOfNConfig, args=argv, prog="cliprail rlhf best-of-n")
    print(kl_table(run_best_of_n(cfg)))
    print(f"cliprail: picks and metrics in {cfg.run_dir / 'bestofn.json'}", file=sys.stderr)
    return 0


def _rlhf_compare(argv: list[str]) -> int:
    from cliprail.rlhf.compare import CompareConfig, compare_runs, table

    cfg = parse_flags(CompareConfig, args=argv, prog="cliprail rlhf compare")
    result = compare_runs(cfg)
    if cfg.json:
        print(json.dumps({k: v for k, v in result.items() if k != "curves"}))
    else:
        print(table(result))
    print(f"cliprail: compare.html, compare.png, compare.json in {result['out']}", file=sys.stderr)
    return 0


COMMANDS: dict[tuple[str, ...], Callable[[list[str]], int]] = {
    ("rl", "train"): _rl_train,
    ("rl", "eval"): _rl_eval,
    ("rlhf", "world"): _rlhf_world,
    ("rlhf", "sft"): _rlhf_sft,
    ("rlhf", "reward"): _rlhf_reward,
    ("rlhf", "ppo"): _rlhf_ppo,
    ("rlhf", "eval"): _rlhf_eval,
    ("rlhf", "dpo"): _rlhf_dpo,
    ("rlhf", "best-of-n"): _rlhf_best_of_n,
    ("rlhf", "compare"): _rlhf_compare,
    ("demo",): _demo,
}


def _dispatch(argv: list[str]) -> tuple[Callable[[list[str]], int], list[str]] | None:
    for words, fn in COMMANDS.items():
        if tuple(argv[: len(words)]) == words:
            return fn, argv[len(words) :]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cliprail`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    found = _dispatch(args)
    if found is None:
        if not args or args[0] in ("-h", "--help"):
            print(USAGE)
            return 0
        print(USAGE, file=sys.stderr)
        print(f"cliprail: error: unknown command {' '.join(args[:2])!r}", file=sys.stderr)
        return 2
    fn, rest = found
    from cliprail.errors import CliprailError
    from cliprail.interrupt import Interrupted
    from cliprail.ppo import NonFiniteError

    if args[0] in ("rlhf", "demo"):  # our own progress bars only, not transformers' per file
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    try:
        return fn(rest)
    except Interrupted as exc:  # SIGINT/SIGTERM honoured: a checkpoint was saved
        if _rank0():  # under torchrun every rank stops; rank 0 says so
            print(f"cliprail: {exc}", file=sys.stderr)
        return exc.exit_code
    except (CliprailError, NonFiniteError) as exc:
        if debug:
            raise
        print(f"cliprail: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a folder that is not writable, a vanished file
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(
            f"cliprail: error: {where}{exc.strerror or exc} (what was written before is "
            "intact: every file is written to a temporary name, then renamed)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("cliprail: interrupted", file=sys.stderr)
        return 130


__all__ = ["DemoArgs", "EvalArgs", "main"]
