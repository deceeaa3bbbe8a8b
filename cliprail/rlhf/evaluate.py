"""``cliprail rlhf eval``: the SFT model against a PPO policy (or any checkpoint) on held-out
prompts, judged by the gold rubric, the reward model and the KL to the reference."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cliprail.configio import load_config_json
from cliprail.errors import RunDirError
from cliprail.rlhf.models import load_causal_lm
from cliprail.rlhf.ppo import PPOConfig, evaluate_policy, load_models, load_prompts_of
from cliprail.rlhf.sampling import win_rate, wins_losses_ties

COLUMNS = ["gold", "scheduling", "safety", "honesty", "helpfulness", "concision",
           "unsafe_advice_rate", "unsafe_advice_rate_medical", "missed_emergency_rate",
           "missed_emergency_rate_red_flag", "wrong_or_invented_slot_rate", "wrong_action_rate",
           "no_answer_rate", "degenerate_rate", "over_refusal_rate", "proxy_reward", "kl_ref",
           "mean_length"]  # fmt: skip
"""The keys of ``rlhf eval --json``'s "sft" and "ppo" objects, in the table's order, for the
healthcare judge; with other checks, :func:`columns_of`."""
GENERIC = ["score", "proxy_reward", "kl_ref", "mean_length", "no_eos_rate"]


def columns_of(summary: dict[str, Any]) -> list[str]:
    """The table's rows for one evaluation summary: the healthcare judge's columns, or each
    check's mean followed by the score, proxy reward, KL, length and no-EOS rate."""
    if "gold" in summary and "checks" not in summary:
        return COLUMNS
    names = summary.get("checks", [])
    return [*names, *(k for k in GENERIC if k in summary and k not in names)]


@dataclass(frozen=True)
class EvalConfig:
    """Compare the SFT model with a PPO run's policy on held-out prompts."""

    run_dir: Path
    """A `cliprail rlhf ppo` run folder (its config names the data, SFT and reward models)."""
    checkpoint: str = "best"
    """Which policy of the run: best (by eval gold), policy (the last), or a folder path."""
    split: str = "eval"
    """Prompts to use: eval (held out), val or redteam."""
    n_prompts: int = 120
    """At most this many prompts of the split."""
    json: bool = False
    """Print one JSON object instead of a table."""


def compare(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate SFT and the chosen policy; returns {"sft": {...}, "ppo": {...}, "win_rate"}."""
    cfg_path = cfg.run_dir / "config.json"
    if not cfg_path.is_file():
        raise RunDirError(f"{cfg.run_dir}: not a PPO run folder (no config.json)")
    ppo_cfg = load_config_json(PPOConfig, cfg_path)
    ppo_cfg = dataclasses.replace(ppo_cfg, progress=False)
    path = Path(cfg.checkpoint)
    if cfg.checkpoint in ("best", "policy"):
        path = cfg.run_dir / cfg.checkpoint
    if cfg.checkpoint == "best" and not path.exists() and not ppo_cfg.eval_every:
        raise RunDirError(
            f"{cfg.run_dir}: this run has no best/ checkpoint: it ran with "
            "--eval-every 0, so the fuse never evaluated; pass --checkpoint "
            "policy for its last policy"
        )
    requests = [r for r in load_prompts_of(ppo_cfg) if r.split == cfg.split][: cfg.n_prompts]
    if not requests:
        raise RunDirError(f"{ppo_cfg.prompts}: no prompts with split {cfg.split!r}")
    models = load_models(ppo_cfg)
    policy = load_causal_lm(path, ppo_cfg.trust_remote_code).eval()
    sft = evaluate_policy(models, ppo_cfg, requests, policy=models.ref)
    ppo = evaluate_policy(models, ppo_cfg, requests, policy=policy)
    return {
        "sft": sft,
        "ppo": ppo,
        "win_rate": win_rate(ppo["golds"], sft["golds"]),
        **wins_losses_ties(ppo["golds"], sft["golds"]),
        "checkpoint": str(path),
        "split": cfg.split,
        "n_prompts": len(requests),
        "prompts": [r.prompt for r in requests],
    }


def table(result: dict[str, Any]) -> str:
    """A plain-text before/after table."""
    lines = [f"{'metric':30s} {'SFT':>9s} {'PPO':>9s}"]
    for c in columns_of(result["sft"]):
        lines.append(f"{c:30s} {result['sft'][c]:9.3f} {result['ppo'][c]:9.3f}")
    judge = "gold" if columns_of(result["sft"]) is COLUMNS else "score"
    lines.append(f"{judge + '-judged win rate of PPO':30s} {'':>9s} {result['win_rate']:9.3f}")
    lines.append(
        f"{'PPO wins / losses / ties':30s} {'':>9s} "
        f"{result['wins']} / {result['losses']} / {result['ties']}"
    )
    return "\n".join(lines)


def summary_json(result: dict[str, Any]) -> str:
    slim = {
        k: ({c: v[c] for c in columns_of(v)} if k in ("sft", "ppo") else v)
        for k, v in result.items()
        if k != "prompts"
    }
    return json.dumps(slim)
