"""The healthcare scheduling assistant: cliprail's embedded RLHF world.

``build(out_dir, seed)`` writes ``prompts.jsonl``, ``demonstrations.jsonl`` and
``preferences.jsonl`` (schemas in docs/healthcare.md), deterministically for a seed, with no
downloads. ``judge(request, text)`` grades any response.
"""

from cliprail.scenarios.healthcare.build import BuildConfig, build
from cliprail.scenarios.healthcare.judge import Verdict, judge
from cliprail.scenarios.healthcare.world import Request, make_requests, render_prompt

__all__ = ["BuildConfig", "Request", "Verdict", "build", "judge", "make_requests", "render_prompt"]
