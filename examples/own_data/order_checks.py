"""The checks of the order task: what a careful reviewer would look at, outside the reward.

cliprail calls ``order_checks(prompts, responses, records)`` at every fuse evaluation and in
``rlhf eval``; each list holds one value in [0, 1] per response (1 is good), and ``score`` is
what the fuse keeps and halts on.
"""

from __future__ import annotations

import re
from typing import Any

REFUSAL = re.compile(r"\b(cannot|can't|unable)\b", re.IGNORECASE)


def order_checks(
    prompts: list[str], responses: list[str], records: list[dict[str, Any]]
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"right_order": [], "ship_day": [], "one_sentence": [],
                                   "no_refusal": [], "score": []}  # fmt: skip
    for text, rec in zip(responses, records, strict=True):
        codes = re.findall(r"\b[KMRTX]\d\d\b", text)
        right = 1.0 if codes and all(c == rec["order"] for c in codes) else 0.0
        day = 1.0 if rec["ships"] in text else 0.0
        one = 1.0 if len([s for s in re.split(r"[.!?]", text) if s.strip()]) == 1 else 0.0
        polite = 0.0 if REFUSAL.search(text) else 1.0
        out["right_order"].append(right)
        out["ship_day"].append(day)
        out["one_sentence"].append(one)
        out["no_refusal"].append(polite)
        out["score"].append(right * polite * (0.5 + 0.25 * day + 0.25 * one))
    return out
