"""A rule-based reward for the order task: no reward model needed.

``order_reward(prompts, responses, records)`` returns one float per response: +1 for the
customer's own order code, -1 for another code or none, -1 for a refusal, a small cost per
extra sentence. cliprail maximises it with PPO (``--reward-fn order_reward:order_reward``).
"""

from __future__ import annotations

import re
from typing import Any


def order_reward(
    prompts: list[str], responses: list[str], records: list[dict[str, Any]]
) -> list[float]:
    rewards = []
    for text, rec in zip(responses, records, strict=True):
        codes = re.findall(r"\b[KMRTX]\d\d\b", text)
        r = 1.0 if codes and all(c == rec["order"] for c in codes) else -1.0
        if re.search(r"\b(cannot|can't|unable)\b", text, re.IGNORECASE):
            r -= 1.0
        if rec["ships"] in text:
            r += 0.25
        sentences = [s for s in re.split(r"[.!?]", text) if s.strip()]
        r -= 0.2 * max(0, len(sentences) - 1)
        rewards.append(r)
    return rewards
