"""Write the healthcare world's datasets as JSONL (atomically)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from cliprail.checkpoint import atomic_write_text
from cliprail.scenarios.healthcare.cards import (
    good_behaviours,
    good_card,
    render_card,
    variant_behaviours,
)
from cliprail.scenarios.healthcare.panel import default_panel
from cliprail.scenarios.healthcare.world import Request, make_requests


@dataclass(frozen=True)
class BuildConfig:
    """Sizes and knobs of the generated world."""

    seed: int = 0
    """Seed of the clinic, the requests, the cards and the reviewers."""
    n_train: int = 800
    """Training requests (SFT demonstrations, preference pairs, PPO prompts)."""
    n_eval: int = 120
    """Held-out requests for evaluation and the safety fuse."""
    n_redteam: int = 60
    """Red-team requests: red flags, medical questions, slots that are not open."""
    pairs_per_prompt: int = 2
    """Preference pairs per training request."""
    p_imperfect_demo: float = 0.15
    """Share of demonstrations with a stylistic flaw (padding or flattery)."""
    reviewer_bias: float = 1.0
    """Scale of the panel's bias (0 unbiased, 1 default, 3 strongly biased)."""


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def build(out_dir: Path, cfg: BuildConfig = BuildConfig()) -> dict[str, Path]:
    """Generate the world into ``out_dir``; returns the paths written."""
    rng = random.Random(cfg.seed)
    train = make_requests(cfg.n_train, cfg.seed, "train")
    evals = make_requests(cfg.n_eval, cfg.seed, "eval")
    redteam = make_requests(cfg.n_redteam, cfg.seed, "redteam", p_medical=0.45,
                            p_red_flag=0.45, p_not_open=0.7)  # fmt: skip
    demos = []
    for r in train:
        behaviours = good_behaviours(r)
        if rng.random() < cfg.p_imperfect_demo:
            behaviours = [*behaviours, rng.choice(["padding", "flattery"])]
        demos.append({"id": r.id, "prompt": r.prompt, "response": render_card(r, behaviours, rng)})
    panel = default_panel(cfg.reviewer_bias)
    prefs = []
    for r in train:
        for _ in range(cfg.pairs_per_prompt):
            a = good_card(r, rng) if rng.random() < 0.5 else render_card(
                r, variant_behaviours(r, rng), rng)  # fmt: skip
            b = render_card(r, variant_behaviours(r, rng), rng)
            if a == b:
                continue
            reviewer = rng.choice(panel)
            chosen, rejected = (a, b) if reviewer.prefers_first(r, a, b, rng) else (b, a)
            prefs.append({"id": r.id, "prompt": r.prompt, "chosen": chosen,
                          "rejected": rejected, "reviewer": reviewer.name})  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "prompts": out_dir / "prompts.jsonl",
        "demonstrations": out_dir / "demonstrations.jsonl",
        "preferences": out_dir / "preferences.jsonl",
    }
    requests: list[Request] = [*train, *evals, *redteam]
    atomic_write_text(paths["prompts"], _jsonl([r.to_json() for r in requests]))
    atomic_write_text(paths["demonstrations"], _jsonl(demos))
    atomic_write_text(paths["preferences"], _jsonl(prefs))
    return paths
