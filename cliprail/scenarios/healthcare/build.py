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
from cliprail.scenarios.healthcare.world import Request, domain_tokens, make_requests


@dataclass(frozen=True)
class BuildConfig:
    """Sizes and knobs of the generated world."""

    seed: int = 0
    """Seed of the clinic, the requests, the cards and the reviewers."""
    n_train: int = 4000
    """Training requests (SFT demonstrations, preference pairs, PPO prompts). The demo's tiny
    model learns to copy slots and to tell an open slot from a closed one from this many
    different requests; 800 left it booking a wrong slot a third of the time (issue 13)."""
    n_val: int = 120
    """Validation requests (split val): what the safety fuse evaluates to choose the checkpoint
    it keeps and to decide when to stop."""
    n_eval: int = 120
    """Test requests (split eval): what the reports measure, never used to choose anything.
    Before issue 14's review the fuse chose on these same prompts, and the kept checkpoint's
    reported gold was the best of a dozen noisy evaluations of the test set."""
    n_redteam: int = 60
    """Red-team requests: red flags, medical questions, slots that are not open."""
    pairs_per_prompt: int = 1
    """Preference pairs per training request."""
    p_medical: float = 0.35
    """Share of training and held-out requests with a medication or symptom question."""
    p_red_flag: float = 0.25
    """Share of training and held-out requests with a red-flag symptom. At 0.15 PPO saw a red
    flag on a request for a closed slot once or twice a batch and the demo's kept policy still
    missed one such emergency per seed (docs/results.md)."""
    p_unsafe_advice_demo: float = 0.45
    """Demonstrations (historical support replies) for a request with a medical question that
    answer it confidently instead of referring it: the habit PPO is there to remove."""
    p_missed_emergency_demo: float = 0.45
    """Demonstrations for a request with a red flag that do not send the patient to emergency
    services or the crisis line."""
    p_invented_slot_demo: float = 0.1
    """Demonstrations for a slot that is not open that confirm it anyway (invented
    availability)."""
    p_no_uncertainty_demo: float = 0.2
    """Demonstrations that refer a medical question without saying they cannot judge it."""
    p_style_demo: float = 0.15
    """Demonstrations with a stylistic flaw (padding or flattery)."""
    reviewer_bias: float = 1.0
    """Scale of the panel's bias (0 unbiased, 1 default, 3 strongly biased)."""

    def __post_init__(self) -> None:
        for name in ("p_medical", "p_red_flag", "p_unsafe_advice_demo", "p_missed_emergency_demo",
                     "p_invented_slot_demo", "p_no_uncertainty_demo", "p_style_demo"):  # fmt: skip
            if not 0.0 <= getattr(self, name) <= 1.0:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be in [0, 1], got {getattr(self, name)}")
        if self.p_medical + self.p_red_flag > 1.0:
            raise ValueError("--p-medical + --p-red-flag must be at most 1")
        if self.reviewer_bias < 0:
            raise ValueError(f"--reviewer-bias must be >= 0, got {self.reviewer_bias}")


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def demo_behaviours(r: Request, cfg: BuildConfig, rng: random.Random) -> list[str]:
    """A historical support reply for ``r``: the good card with each of the world's habits at
    its rate (docs/healthcare.md)."""
    b = good_behaviours(r)
    if r.medical and rng.random() < cfg.p_unsafe_advice_demo:
        b = [x for x in b if x not in ("uncertain", "refer")] + ["unsafe_advice"]
    elif r.medical and rng.random() < cfg.p_no_uncertainty_demo:
        b = [x for x in b if x != "uncertain"]
    if r.red_flag and rng.random() < cfg.p_missed_emergency_demo:
        b = [x for x in b if x != "emergency"]
    if not r.requested_open and rng.random() < cfg.p_invented_slot_demo:
        b = [x if x != "not_open" else "invented_slot" for x in b]
    if rng.random() < cfg.p_style_demo:
        b = [*b, rng.choice(["padding", "flattery"])]
    return b


def build(out_dir: Path, cfg: BuildConfig = BuildConfig()) -> dict[str, Path]:
    """Generate the world into ``out_dir``; returns the paths written."""
    rng = random.Random(cfg.seed)
    train = make_requests(cfg.n_train, cfg.seed, "train", cfg.p_medical, cfg.p_red_flag)
    vals = make_requests(cfg.n_val, cfg.seed, "val", cfg.p_medical, cfg.p_red_flag)
    evals = make_requests(cfg.n_eval, cfg.seed, "eval", cfg.p_medical, cfg.p_red_flag)
    redteam = make_requests(cfg.n_redteam, cfg.seed, "redteam", p_medical=0.45,
                            p_red_flag=0.45, p_not_open=0.7)  # fmt: skip
    demos = []
    for r in train:
        behaviours = demo_behaviours(r, cfg, rng)
        demos.append({"id": r.id, "prompt": r.prompt, "response": render_card(r, behaviours, rng)})
    panel = default_panel(cfg.reviewer_bias)
    prefs = []
    for r in train:
        for _ in range(cfg.pairs_per_prompt):
            b_behaviours = variant_behaviours(r, rng)
            # a card that is the good one plus padding or flattery is always shown beside the
            # good one: against another flawed card it would mostly win, and a reward model
            # would learn to like the flattery itself (found in issue 13's runs)
            style_only = set(b_behaviours) - set(good_behaviours(r)) <= {"flattery", "padding"}
            a = good_card(r, rng) if style_only or rng.random() < 0.5 else render_card(
                r, variant_behaviours(r, rng), rng)  # fmt: skip
            b = render_card(r, b_behaviours, rng)
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
        "tokens": out_dir / "tokens.json",
    }
    requests: list[Request] = [*train, *vals, *evals, *redteam]
    atomic_write_text(paths["prompts"], _jsonl([r.to_json() for r in requests]))
    atomic_write_text(paths["demonstrations"], _jsonl(demos))
    atomic_write_text(paths["preferences"], _jsonl(prefs))
    atomic_write_text(paths["tokens"], json.dumps(domain_tokens(), indent=0) + "\n")
    return paths
