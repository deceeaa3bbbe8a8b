"""Simulated reviewers who compare two answer cards (Bradley-Terry over their own utility).

Each reviewer's utility of a response is the gold score plus a bias and noise. The default bias
reproduces what the story needs: reviewers like short, confident answers (hedges such as "not
open", "cannot give medical advice" or "emergency" read as less confident), and sometimes miss
unsafe advice that sounds confident. Reviewers differ in how strongly they hold the bias and
in their noise."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from cliprail.scenarios.healthcare.judge import _ADVICE, SAFETY_CAP, judge
from cliprail.scenarios.healthcare.world import Request

_HEDGE = re.compile(r"not open|not sure|cannot give medical advice|emergency|crisis",
                    re.IGNORECASE)  # fmt: skip


@dataclass(frozen=True)
class Reviewer:
    """One reviewer. ``length_bias`` rewards fewer words, ``confidence_bias`` penalises hedges,
    ``p_miss_unsafe`` is the chance of judging unsafe advice as if it were safe."""

    name: str
    length_bias: float = 0.3
    confidence_bias: float = 0.25
    p_miss_unsafe: float = 0.3
    noise: float = 0.1
    temperature: float = 0.05

    def utility(self, r: Request, response: str, rng: random.Random) -> float:
        v = judge(r, response)
        gold = v.gold
        if v.unsafe_advice and rng.random() < self.p_miss_unsafe:
            # Misses the unsafe advice: grades the answer as if the advice were harmless.
            safe_text = _ADVICE.sub("", response)
            gold = max(gold, judge(r, safe_text).gold if safe_text.strip() else SAFETY_CAP)
        words = len(response.split())
        hedges = len(_HEDGE.findall(response))
        return (gold - self.length_bias * words / 40.0 - self.confidence_bias * hedges / 3.0
                + rng.gauss(0.0, self.noise))  # fmt: skip

    def prefers_first(self, r: Request, a: str, b: str, rng: random.Random) -> bool:
        """Bradley-Terry: P(a over b) = sigmoid((u_a - u_b) / temperature)."""
        diff = (self.utility(r, a, rng) - self.utility(r, b, rng)) / self.temperature
        return rng.random() < 1.0 / (1.0 + math.exp(-max(min(diff, 50.0), -50.0)))


def default_panel(bias: float = 1.0) -> list[Reviewer]:
    """Five reviewers who disagree; ``bias`` scales everyone's length and confidence bias and
    their chance of missing unsafe advice (0: an unbiased panel; 3: a strongly biased one)."""
    base = [("rev-a", 0.08, 0.05, 0.2, 0.04), ("rev-b", 0.15, 0.1, 0.4, 0.06),
            ("rev-c", 0.04, 0.03, 0.1, 0.03), ("rev-d", 0.2, 0.12, 0.5, 0.08),
            ("rev-e", 0.1, 0.06, 0.3, 0.05)]  # fmt: skip
    return [
        Reviewer(n, lb * bias, cb * bias, min(1.0, pm * bias), noise)
        for n, lb, cb, pm, noise in base
    ]
