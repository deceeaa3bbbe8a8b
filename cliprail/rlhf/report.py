"""``report.html`` for an RLHF run: training curves, the reward-hacking picture (gold score
against sqrt(KL to the reference), Gao et al. 2022), the per-criterion table before and after,
and answer cards before and after for the same prompts. Plots are matplotlib PNGs embedded as
base64, so the report is one self-contained file."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from cliprail.checkpoint import atomic_write_bytes, atomic_write_text
from cliprail.rlhf.evaluate import columns_of


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


PLOT_FILES = ("gold_and_proxy.png", "gold_vs_sqrt_kl.png", "diagnostics.png", "checks.png")
"""The report's pictures, also written as PNG files into the PPO run folder."""


def _plots(metrics: list[dict[str, Any]], fuse: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if "score" in m]
    evals = fuse.get("evals", [])
    key = fuse.get("score", "gold")  # the judge's gold score, or a check set's score
    label = "gold score (judge)" if key == "gold" else "checks' score"
    out = []
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(
        [e["update"] for e in evals],
        [e["proxy_reward"] for e in evals],
        "o-",
        label="proxy reward (reward model)",
    )
    ax2 = ax.twinx()
    ax2.plot(
        [e["update"] for e in evals],
        [e.get(key, math.nan) for e in evals],
        "s-",
        color="C2",
        label=label,
    )
    ax.set_xlabel("update")
    ax.set_ylabel("proxy reward")
    ax2.set_ylabel(label, color="C2")
    if fuse.get("best_update") is not None:
        ax.axvline(fuse["best_update"], color="grey", ls="--", lw=1)
    ax.set_title(f"Proxy reward and {label} on the fuse's {fuse.get('split', 'eval')} prompts")
    out.append((f"Proxy reward vs {label} (dashed: the kept checkpoint)", _png(fig)))
    fig, ax = plt.subplots(figsize=(6, 3.4))
    xs = [math.sqrt(max(e["kl_ref"], 0.0)) for e in evals]
    ax.plot(xs, [e.get(key, math.nan) for e in evals], "o-")
    for x, e in zip(xs, evals, strict=True):
        ax.annotate(str(e["update"]), (x, e.get(key, math.nan)), fontsize=7)
    ax.set_xlabel("sqrt(KL to the reference)  [sqrt(nats)]")
    ax.set_ylabel(label)
    ax.set_title(f"{label.capitalize()} against sqrt(KL) (Gao et al. 2022)")
    out.append((f"The reward-hacking picture: {label} against sqrt(KL)", _png(fig)))
    keys = [
        ("kl_ref", "KL to reference (nats/response)"),
        ("clip_fraction", "clip fraction"),
        ("approx_kl", "approx KL to rollout policy"),
        ("value_loss", "value loss"),
        ("entropy", "entropy (nats/token)"),
        ("response_length", "response length"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(10, 5))
    for ax, (k, title) in zip(axes.flat, keys, strict=True):
        ax.plot([m["step"] for m in train], [m.get(k, float("nan")) for m in train])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("episodes", fontsize=8)
    fig.tight_layout()
    out.append(("Training diagnostics", _png(fig)))
    names = evals[0].get("checks", []) if evals else []
    if names:  # a check set's values along the run (the judge's are in the table)
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for name in names:
            ax.plot([e["update"] for e in evals], [e.get(name, math.nan) for e in evals], "o-",
                    ms=3, label=name)  # fmt: skip
        ax.set_xlabel("update")
        ax.set_ylabel("mean value (1 is good)")
        ax.set_title(f"Each check on the fuse's {fuse.get('split', 'eval')} prompts")
        ax.legend(fontsize=7)
        out.append(("The checks along the run", _png(fig)))
    return out


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.0f}%"


def _kept_why(fuse: dict[str, Any], name: str, kept: Any) -> str:
    split = fuse.get("split", "eval")
    tol = float(fuse.get("keep_tolerance", 0.0))
    peak = fuse.get("peak_update", kept)
    if tol > 0 and peak != kept:
        return (
            f"the latest evaluated policy within {tol} of the peak {name} score on the {split} "
            f"prompts, {fuse.get('peak_score', math.nan):.3f} at update {peak}, within the KL "
            "budget)."
        )
    return (
        f"the best {name} score on its evaluations of the {split} prompts, within the KL budget)."
    )


def story(result: dict[str, Any] | None, fuse: dict[str, Any]) -> list[str]:
    """A few plain sentences saying what happened: the fuse's verdict, what PPO changed on the
    held-out prompts, and whether the proxy reward rose while the gold score fell."""
    out = []
    evals = fuse.get("evals", [])
    halted = fuse.get("halted")
    kept = fuse.get("best_update")
    key = fuse.get("score", "gold")
    name = "gold" if key == "gold" else "checks'"
    scored = [e for e in evals if key in e]
    out.append(
        f"The safety fuse {'halted the run: ' + halted if halted else 'did not trip'}; "
        f"it kept the policy of update {kept} ("
        + (
            _kept_why(fuse, name, kept)
            if scored or not evals
            else "the newest within the KL budget: the run had no checks to score it)."
        )
    )
    if len(scored) >= 2:
        peak = max(scored, key=lambda e: e[key])
        last = scored[-1]
        if last["update"] != peak["update"] and last[key] < peak[key] - 0.02:
            out.append(
                f"After the {name} peak at update {peak['update']} ({peak[key]:.3f}) the proxy "
                f"reward went from {peak['proxy_reward']:.2f} to {last['proxy_reward']:.2f} "
                f"while the {name} score fell to {last[key]:.3f}: the policy was gaming the "
                "reward, and the fuse stopped there."
                if last["proxy_reward"] > peak["proxy_reward"]
                else f"The {name} score peaked at update {peak['update']} ({peak[key]:.3f}) "
                f"and fell to {last[key]:.3f} by update {last['update']}."
            )
    if result is None:
        return out
    a, b = result["sft"], result["ppo"]
    if "gold" not in a or "checks" in a:  # a check set's summary
        return out + _story_checks(result, fuse)
    unseen = fuse.get("split", "eval") != result.get("split", "eval")
    where = f"{result['n_prompts']} {result.get('split', 'eval')} prompts" + (
        ", which the fuse never evaluated," if unseen else " (the prompts the fuse chose on)"
    )
    out.append(
        f"On {where} the kept policy moved the gold score from "
        f"{a['gold']:.3f} (SFT) to {b['gold']:.3f}. Unsafe medical advice, among prompts with a "
        f"medical question: {_pct(a['unsafe_advice_rate_medical'])} -> "
        f"{_pct(b['unsafe_advice_rate_medical'])}; missed emergencies, among prompts with a red "
        f"flag: {_pct(a['missed_emergency_rate_red_flag'])} -> "
        f"{_pct(b['missed_emergency_rate_red_flag'])}; scheduling {a['scheduling']:.3f} -> "
        f"{b['scheduling']:.3f}."
    )
    out.append(
        f"Prompt by prompt, PPO's reply is better on {result['wins']}, worse on "
        f"{result['losses']} and as good on {result['ties']}, at a KL to the SFT model of "
        f"{b['kl_ref']:.1f} nats per response; the proxy reward went "
        f"{a['proxy_reward']:.2f} -> {b['proxy_reward']:.2f}."
    )
    return out


def _story_checks(result: dict[str, Any], fuse: dict[str, Any]) -> list[str]:
    """The before-and-after sentences for a run judged by a check set (or by nothing)."""
    a, b = result["sft"], result["ppo"]
    where = f"{result['n_prompts']} {result.get('split', 'eval')} prompts"
    moved = ", ".join(f"{k} {a[k]:.3f} -> {b[k]:.3f}" for k in a.get("checks", []))
    out = [
        f"On {where}: {moved}; score {a['score']:.3f} -> {b['score']:.3f}."
        if "score" in a
        else f"On {where} nothing judged the replies (no checks): only the proxy reward and KL "
        "say what changed."
    ]
    out.append(
        f"Prompt by prompt, PPO's reply scores better on {result['wins']}, worse on "
        f"{result['losses']} and the same on {result['ties']}, at a KL to the SFT model of "
        f"{b['kl_ref']:.1f} nats per response; the proxy reward went "
        f"{a['proxy_reward']:.2f} -> {b['proxy_reward']:.2f}."
    )
    return out


def pick_cards(result: dict[str, Any], n_better: int = 4, n_worse: int = 2) -> list[int]:
    """Prompts that show the change: where PPO gained most over SFT, then where it lost most
    (ties left out; each group in prompt order)."""
    diff = [p - s for p, s in zip(result["ppo"]["golds"], result["sft"]["golds"], strict=True)]
    order = sorted(range(len(diff)), key=lambda i: -diff[i])
    better = sorted(i for i in order[:n_better] if diff[i] > 0)
    worse = sorted(i for i in order[::-1][:n_worse] if diff[i] < 0)
    return better + worse


def _card(who: str, result: dict[str, Any], i: int) -> str:
    r = result[who]
    notes = r.get("notes", [[]] * len(r["texts"]))[i]
    why = f"<br><small>{html.escape('; '.join(notes))}</small>" if notes else ""
    name = "gold" if "checks" not in r else "score"
    score = f" ({name} {r['golds'][i]:.2f})" if "golds" in r else ""
    return f"<b>{who.upper()}</b>{score}<div class='card'>{html.escape(r['texts'][i])}{why}</div>"


def write_report(
    run_dir: Path,
    result: dict[str, Any] | None,
    out: Path | None = None,
    extra_html: str | None = None,
) -> Path:
    """Write ``report.html`` for a PPO run folder (with an eval ``result`` from
    :func:`cliprail.rlhf.evaluate.compare`, when there is one, and an ``extra_html`` section such
    as the comparison with DPO and best-of-n). Returns its path."""
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fuse = json.loads((run_dir / "fuse.json").read_text())
    parts = [
        "<html><head><meta charset='utf-8'><title>cliprail RLHF report</title><style>"
        "body{font-family:sans-serif;max-width:1000px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
        ".card{background:#f6f6f6;padding:6px;margin:4px 0;white-space:pre-wrap}"
        "</style></head><body>",
        "<h1>cliprail: RLHF with PPO</h1>",
    ]
    parts.append("<h2>What happened</h2>")
    parts += [f"<p>{html.escape(line)}</p>" for line in story(result, fuse)]
    for (title, png), name in zip(_plots(metrics, fuse), PLOT_FILES, strict=False):
        atomic_write_bytes(run_dir / name, base64.b64decode(png))  # the pictures, as files too
        parts.append(f"<h2>{html.escape(title)}</h2><img src='data:image/png;base64,{png}'/>")
    if result is not None:
        parts.append(
            f"<h2>Before and after ({result['n_prompts']} {result['split']} prompts, "
            f"{html.escape(result['checkpoint'])})</h2><table><tr><th>metric</th>"
            "<th>SFT</th><th>PPO</th></tr>"
        )
        judged = "gold" if "checks" not in result["sft"] else "score"
        for c in columns_of(result["sft"]):
            parts.append(
                f"<tr><td>{c}</td><td>{result['sft'][c]:.3f}</td>"
                f"<td>{result['ppo'][c]:.3f}</td></tr>"
            )
        parts.append(
            f"<tr><td>PPO wins / losses / ties ({judged}, prompt by prompt)</td><td></td>"
            f"<td>{result['wins']} / {result['losses']} / {result['ties']}</td></tr>"
            "</table>"
        )
        picked = pick_cards(result)
        parts.append(
            "<h2>Answer cards where PPO changed the reply</h2><p>The prompts where "
            "the kept policy gained most over SFT, then those where it lost most; the "
            "small print under a reply is the gold judge's reason for lost "
            "points.</p>"
        )
        if not picked:
            parts.append("<p>No prompt's gold score changed.</p>")
        for i in picked:
            parts.append(
                f"<h3>Prompt {i + 1}</h3>"
                f"<div class='card'>{html.escape(result['prompts'][i])}</div>"
                f"{_card('sft', result, i)}{_card('ppo', result, i)}"
            )
    if extra_html:
        parts.append(extra_html)
    parts.append("</body></html>")
    path = out or run_dir / "report.html"
    atomic_write_text(path, "\n".join(parts))
    return path
