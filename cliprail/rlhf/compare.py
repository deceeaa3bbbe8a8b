"""``cliprail rlhf compare RUN_DIR...``: SFT, PPO (and its critic-free forms: GRPO, RLOO,
REINFORCE++, named by each run's ``--advantage``), DPO and best-of-n on the same held-out prompts,
in one table and one plot.

Every policy run (SFT, PPO, DPO) is sampled here with the same settings and seed and judged by
the same gold judge, reward model and reference (:mod:`cliprail.rlhf.sampling`); a best-of-n run
brings its own picks, made on the same prompts (checked by id). Costs come from each run's
``stage.json``: wall time and token positions through forward and backward passes of that stage
alone (PPO and best-of-n also need the reward model; SFT is every method's start).

The plot is gold score against sqrt(KL to the reference), one curve per method, as Gao et al.
(2022) compare best-of-n and RL: a PPO-stage run's points (PPO, GRPO, RLOO) are its fuse
evaluations along the run, DPO's its per-epoch evaluations, best-of-n's one per n (estimated
KL), SFT sits at 0. Large markers are the table's numbers.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tyro

from cliprail.checkpoint import atomic_write_json, atomic_write_text
from cliprail.errors import RunDirError
from cliprail.rlhf.bestofn import load_result
from cliprail.rlhf.models import ScalarHeadModel, load_causal_lm, load_tokenizer
from cliprail.rlhf.sampling import (
    CONDITIONAL_RATES,
    CRITERIA,
    RATES,
    Sampling,
    evaluate_policy,
    load_requests,
)

TABLE = [
    ("gold", "gold"),
    ("scheduling", "sched"),
    ("safety", "safety"),
    ("honesty", "honest"),
    ("helpfulness", "helpful"),
    ("concision", "concise"),
    ("unsafe_advice_rate", "unsafe"),
    ("unsafe_advice_rate_medical", "unsafe|m"),
    ("missed_emergency_rate", "missed"),
    ("missed_emergency_rate_red_flag", "missed|rf"),
    ("wrong_or_invented_slot_rate", "badslot"),
    ("over_refusal_rate", "overref"),
    ("proxy_reward", "proxy"),
    ("kl_ref", "KL"),
    ("wall_s", "wall s"),
    ("tokens_forward", "tok fwd"),
    ("tokens_backward", "tok bwd"),
    ("held_mb", "held MB"),
]
COSTS = (
    "wall_s",
    "tokens_forward",
    "tokens_backward",
    "weights_mb",
    "grads_mb",
    "optimizer_mb",
    "held_mb",
    "peak_rss_mb",
)
"""From each run's stage.json: wall time, token positions through forward and backward passes,
the weights, gradients and optimizer state the stage held (MiB), the process's peak RSS."""
METHODS = {"gae": "PPO", "grpo": "GRPO", "rloo": "RLOO", "reinforce_pp": "REINFORCE++"}
"""The name of a PPO-stage run by its advantage estimator (issue 16)."""


@dataclass(frozen=True)
class CompareConfig:
    """Compare RLHF runs on the same held-out prompts."""

    runs: tyro.conf.Positional[tuple[Path, ...]]
    """Run folders of `cliprail rlhf sft`, `ppo`, `dpo` and `best-of-n` (any mix, any order)."""
    out: Path | None = None
    """Folder for compare.json, compare.png and compare.html (default: <first run>/../compare)."""
    prompts: Path | None = None
    """prompts.jsonl (default: from a PPO or best-of-n run's config)."""
    reward_model: Path | None = None
    """Reward model for the proxy reward (default: from a PPO, best-of-n or DPO run's config)."""
    sft_model: Path | None = None
    """The reference (default: from a run's config, or an SFT run's model)."""
    n_prompts: int = 120
    """Held-out prompts (the first of split 'eval'); a best-of-n run must have used as many."""
    checkpoint: str = "best"
    """Which policy of a PPO run: best (by fuse gold) or policy (the last)."""
    checks: str | None = None
    """What judges the replies (see `rlhf ppo --checks`); default: a PPO run's own --checks,
    else auto (the healthcare judge for healthcare prompts, else the generic checks)."""
    json: bool = False
    """Print one JSON object instead of the table."""


def _stage(run: Path) -> dict[str, Any]:
    f = run / "stage.json"
    if not f.is_file():
        raise RunDirError(f"{run}: not a finished cliprail RLHF run folder (no stage.json)")
    rec = dict(json.loads(f.read_text()))
    if rec.get("stage") not in ("sft", "ppo", "dpo", "best-of-n"):
        raise RunDirError(
            f"{run}: stage {rec.get('stage')!r} is not a policy; compare takes "
            "sft, ppo, dpo and best-of-n runs (pass a reward model with "
            "--reward-model)"
        )
    return rec


def _config(run: Path) -> dict[str, Any]:
    f = run / "config.json"
    return dict(json.loads(f.read_text())) if f.is_file() else {}


def _resolve(cfg: CompareConfig, stages: list[dict[str, Any]]) -> tuple[Path, Path | None, Path]:
    prompts, reward, sft = cfg.prompts, cfg.reward_model, cfg.sft_model
    for run, st in zip(cfg.runs, stages, strict=True):
        c = _config(run)
        prompts = prompts or (Path(c["prompts"]) if c.get("prompts") else None)
        reward = reward or (Path(c["reward_model"]) if c.get("reward_model") else None)
        sft = sft or (Path(c["sft_model"]) if c.get("sft_model") else None)
        if st["stage"] == "sft":
            sft = sft or run / "model"
    if prompts is None:
        raise RunDirError("no prompts.jsonl: pass --prompts or include a PPO or best-of-n run")
    if sft is None:
        raise RunDirError("no reference model: pass --sft-model or include an SFT run")
    return prompts, reward, sft


def _policy_path(run: Path, st: dict[str, Any], checkpoint: str) -> Path:
    if st["stage"] == "ppo":
        return run / checkpoint
    return Path(st["policy"]) if st.get("policy") else run / "model"


def _checks(cfg: CompareConfig, stages: list[dict[str, Any]], prompts: Path, sft: Path) -> Any:
    """``--checks``, or the first PPO run's own, resolved as `rlhf ppo` resolves it."""
    from cliprail.rlhf.ppo import PPOConfig, resolve_checks

    spec = cfg.checks
    blocklist = None
    if spec is None:
        for run, st in zip(cfg.runs, stages, strict=True):
            c = _config(run)
            if st["stage"] == "ppo" and c.get("checks"):
                spec, blocklist = c["checks"], c.get("blocklist")
                break
    if spec in (None, "auto") and blocklist is None:
        return "auto"
    stub = PPOConfig(prompts=prompts, sft_model=sft, run_dir=Path("."),
                     reward_model=Path("."), checks=spec or "auto",
                     blocklist=Path(blocklist) if blocklist else None)  # fmt: skip
    return resolve_checks(stub)


def _score(summary: dict[str, Any]) -> float:
    """The gold score, or a check set's score for prompts judged by one."""
    if "gold" in summary and not summary.get("checks"):
        return float(summary["gold"])
    return float(summary.get("score", math.nan))


def _curve(run: Path, st: dict[str, Any], final: dict[str, Any]) -> list[tuple[float, float]]:
    """(KL, gold) points of the method's own evaluations during training."""
    if st["stage"] == "ppo" and (run / "fuse.json").is_file():
        evals = json.loads((run / "fuse.json").read_text()).get("evals", [])
        return [(e["kl_ref"], _score(e)) for e in evals]
    if st["stage"] == "dpo" and (run / "dpo_metrics.json").is_file():
        evals = json.loads((run / "dpo_metrics.json").read_text()).get("evals", [])
        return [(e["kl_ref"], _score(e)) for e in evals]
    return [(final["kl_ref"], _score(final))]


def compare_runs(cfg: CompareConfig) -> dict[str, Any]:
    """Evaluate every run; returns {"rows": [...], "curves": {...}, ...}, written as
    compare.json, compare.png and compare.html in the output folder."""
    if not cfg.runs:
        raise RunDirError("name at least one run folder to compare")
    stages = [_stage(r) for r in cfg.runs]
    prompts_path, reward_path, sft_path = _resolve(cfg, stages)
    requests = [r for r in load_requests(prompts_path) if r.split == "eval"][: cfg.n_prompts]
    if not requests:
        raise RunDirError(f"{prompts_path}: no requests with split 'eval'")
    tok = load_tokenizer(sft_path)
    ref = load_causal_lm(sft_path).eval()
    reward, shift = None, 0.0
    if reward_path is not None:
        reward = ScalarHeadModel.load(reward_path).eval()
        shift = float(reward.meta(reward_path).get("shift", 0.0))
    sampling = Sampling()
    judge = _checks(cfg, stages, prompts_path, sft_path)
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[tuple[float, float]]] = {}
    for run, st in zip(cfg.runs, stages, strict=True):
        cost = {k: st.get(k, float("nan")) for k in COSTS}
        if st["stage"] == "best-of-n":
            res = load_result(run)
            if res["prompt_ids"] != [r.id for r in requests]:
                raise RunDirError(
                    f"{run}: its best-of-n picks were made on other prompts than "
                    f"the first {len(requests)} 'eval' prompts of {prompts_path}; "
                    "rerun it with --eval-prompts equal to --n-prompts"
                )
            label = "best-of-n"
            for p in res["points"]:
                rows.append(
                    {
                        "method": f"best-of-{p['n']}",
                        "run": str(run),
                        **cost,
                        **{k: p[k] for k in (*p.get("checks", []), "checks") if k in p},
                        **{
                            k: p.get(k, float("nan"))
                            for k in (
                                *CRITERIA,
                                *[f"{r}_rate" for r in RATES],
                                *CONDITIONAL_RATES,
                                "proxy_reward",
                                "kl_ref",
                                "mean_length",
                            )
                        },
                        "kl_analytic": p["kl_analytic"],
                    }
                )
            curves[f"{label} ({run.name})"] = [(p["kl_ref"], _score(p)) for p in res["points"]]
            continue
        policy = load_causal_lm(_policy_path(run, st, cfg.checkpoint)).eval()
        ev = evaluate_policy(policy, ref, tok, requests, sampling, reward, shift, checks=judge)
        label = (
            METHODS.get(st.get("advantage", "gae"), "PPO")
            if st["stage"] == "ppo"
            else st["stage"].upper()
        )
        row = {
            "method": label,
            "run": str(run),
            **cost,
            **{k: v for k, v in ev.items() if not isinstance(v, list)},
            **({"checks": ev["checks"]} if ev.get("checks") else {}),
        }
        rows.append(row)
        curves[f"{label} ({run.name})"] = _curve(run, st, ev)
    result = {
        "rows": rows,
        "curves": curves,
        "n_prompts": len(requests),
        "prompts": str(prompts_path),
        "reward_model": str(reward_path),
        "reference": str(sft_path),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = cfg.out or cfg.runs[0].resolve().parent / "compare"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "compare.json", result)
    png = plot(result)
    (out / "compare.png").write_bytes(png)
    atomic_write_text(out / "compare.html", html_section(result, png, standalone=True))
    result["out"] = str(out)
    return result


def columns(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The table's columns: the healthcare judge's (:data:`TABLE`), or, for prompts judged by a
    check set, each check, the score and the costs."""
    checks = sorted({c for r in result["rows"] for c in r.get("checks", [])})
    if not checks:
        return TABLE
    costs = [(k, short) for k, short in TABLE if k in ("proxy_reward", "kl_ref") or k in COSTS]
    named = [(c, c[:8]) for c in checks if c != "score"]
    return [("score", "score"), *named, ("no_eos_rate", "no EOS"), *costs]


def table(result: dict[str, Any]) -> str:
    """Plain-text table, one row per method (per n for best-of-n)."""
    cols = columns(result)
    head = f"{'method':12s}" + "".join(f"{short:>9s}" for _, short in cols)
    lines = [head]
    for r in result["rows"]:
        cells = []
        for key, _ in cols:
            v = r.get(key, float("nan"))
            cells.append(
                f"{v:9.3g}"
                if key.startswith("tokens") or key == "held_mb"
                else f"{v:9.3f}"
                if abs(v) < 1000
                else f"{v:9.0f}"
            )
        lines.append(f"{r['method']:12s}" + "".join(cells))
    return "\n".join(lines)


def plot(result: dict[str, Any]) -> bytes:
    """Gold score against sqrt(KL to the reference), one curve per method; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (label, pts) in enumerate(result["curves"].items()):
        xs = [math.sqrt(max(k, 0.0)) for k, _ in pts]
        ax.plot(xs, [gd for _, gd in pts], "o-", color=f"C{i}", ms=4, label=label)
    for r in result["rows"]:
        ax.plot(math.sqrt(max(r["kl_ref"], 0.0)), _score(r), "*", color="black", ms=10)
        ax.annotate(
            r["method"],
            (math.sqrt(max(r["kl_ref"], 0.0)), _score(r)),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("sqrt(KL to the reference)  [sqrt(nats per response)]")
    judged = "score" if any(r.get("checks") for r in result["rows"]) else "gold"
    ax.set_ylabel(f"{judged} score (held-out prompts)")
    ax.set_title("Gold score against sqrt(KL), each method along its run")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def html_section(result: dict[str, Any], png: bytes, standalone: bool = False) -> str:
    """The table and the plot as HTML (a whole page when ``standalone``)."""
    table_cols = columns(result)
    cols = "".join(f"<th>{html.escape(short)}</th>" for _, short in table_cols)
    body = [
        f"<h2>The methods side by side on {result['n_prompts']} held-out prompts</h2>",
        f"<table><tr><th>method</th>{cols}</tr>",
    ]
    for r in result["rows"]:
        cells = "".join(
            f"<td>{r.get(k, float('nan')):.3f}</td>"
            if not k.startswith("tokens") and k != "held_mb"
            else f"<td>{r.get(k, 0):.3g}</td>"
            for k, _ in table_cols
        )
        body.append(f"<tr><td>{html.escape(r['method'])}</td>{cells}</tr>")
    body.append(
        "</table><p>Rates are shares of prompts; proxy is the reward model's score; KL "
        "is nats per response (best-of-n: estimated from a reference pool); wall time, "
        "token positions and held MB (weights of every model the stage held, gradients and "
        "optimizer state) are each stage's own (PPO, GRPO, RLOO and best-of-n also need the "
        "reward model).</p>"
    )
    body.append(f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}'/>")
    if not standalone:
        return "\n".join(body)
    return (
        "<html><head><meta charset='utf-8'><title>cliprail compare</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:"
        "collapse}td,th{border:1px solid #ccc;padding:3px 6px}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )
