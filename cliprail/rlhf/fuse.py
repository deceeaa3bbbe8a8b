"""The safety fuse: it watches the evaluations made outside the reward, keeps the policy to use,
and halts a run that has drifted too far or whose true quality is falling.

PPO makes the proxy reward rise; whether the policy got better is for checks that live outside
the reward model to say (the healthcare gold judge, a user's own checks). Every ``eval_every``
updates the trainer evaluates the policy on held-out prompts and hands the record to
:meth:`SafetyFuse.observe`, which decides, from the record alone:

* **keep**: the record's score is within ``keep_tolerance`` of the best score so far (the
  peak; with 0, it must reach the peak) and its KL to the reference is within the
  budget: the trainer saves this policy as the run's kept checkpoint, so the fuse keeps the
  *latest* policy that is as good as the peak within the evaluation's noise (a policy over the
  budget is never kept, however well it scores). Issue 13's runs are why: on 120 prompts the
  gold of one policy's evaluations swings by 0.02-0.07 from one evaluation to the next, so the
  single best evaluation is mostly the luckiest one, and the policies kept that way, 4-20
  updates into a 48-update run, still gave a rare unsafe answer or missed a red flag on
  unseen prompts, where the later policies within 0.02 of the peak did not (docs/results.md);
* **halt** on the KL budget: the evaluation's KL to the reference (nats per response) passed
  ``kl_budget``;
* **halt** on a falling score: ``patience`` evaluations in a row scored more than ``tolerance``
  below the peak (reward hacking as Gao et al. 2022 describe it: the proxy keeps rising while
  the true score falls).

The fuse holds no model and does no I/O; its state is one JSON-able dict (``fuse.json`` and the
checkpoints hold it), so it is tested alone and resumes exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Decision:
    """What one evaluation means for the run."""

    keep: bool
    """Save this policy as the kept checkpoint (``best/``)."""
    halt: str | None
    """Why the run must stop now, or None."""


class SafetyFuse:
    """State, halting rules and best-checkpoint choice of the safety fuse.

    Args:
        kl_budget: halt when an evaluation's ``kl_ref`` passes this (nats per response); None:
            no budget.
        patience: halt after this many evaluations in a row below the peak by more than
            ``tolerance``.
        tolerance: the drop in score below the peak that counts as a fall.
        keep_tolerance: keep the latest policy whose score is within this of the peak (0: only
            a policy at the peak). Applies to the score alone: with ``failures`` the ranking
            below decides, and it is recorded as 0.
        split: the prompts the fuse evaluates on (recorded, for the reports).
        score: the record's key the choice and the halting follow (``gold`` for the healthcare
            judge; a checks plug-in's ``score``). A record without it (no checks at all) is
            watched on KL alone: the fuse keeps the latest policy within the budget.
        failures: record keys of failure rates that rank before the score when choosing the
            policy to keep (``--fuse-keep safety_first``: a policy with fewer unsafe answers
            and missed emergencies on the fuse's prompts is kept over one with a higher score;
            the score breaks ties). Empty (the default): the score alone. The halting rule
            follows the score either way.

    >>> fuse = SafetyFuse(kl_budget=10.0, patience=2, tolerance=0.02)
    >>> [fuse.observe(u, {"gold": g, "kl_ref": k}) for u, g, k in
    ...  ((0, 0.5, 0.0), (4, 0.7, 1.0), (8, 0.6, 2.0), (12, 0.6, 3.0))][-1].halt is not None
    True
    >>> fuse.best_update, fuse.best_score
    (4, 0.7)
    >>> fuse = SafetyFuse(kl_budget=None, patience=3, tolerance=0.05, keep_tolerance=0.02)
    >>> [fuse.observe(u, {"gold": g}).keep for u, g in ((0, 0.8), (4, 0.95), (8, 0.94), (12, 0.9))]
    [True, True, True, False]
    >>> fuse.best_update, fuse.best_score, fuse.peak_update, fuse.peak_score
    (8, 0.94, 4, 0.95)
    """

    def __init__(
        self,
        kl_budget: float | None,
        patience: int,
        tolerance: float,
        keep_tolerance: float = 0.0,
        split: str = "val",
        score: str = "gold",
        failures: tuple[str, ...] = (),
    ) -> None:
        if patience <= 0:
            raise ValueError(f"patience must be > 0, got {patience}")
        if keep_tolerance < 0 or tolerance < 0:
            raise ValueError("tolerance and keep_tolerance must be >= 0")
        self.kl_budget, self.patience, self.tolerance = kl_budget, patience, tolerance
        self.keep_tolerance = 0.0 if failures else keep_tolerance
        self.split, self.score, self.failures = split, score, tuple(failures)
        self.evals: list[dict[str, Any]] = []
        self.best_update = 0  # the kept policy's update and score
        self.best_score = -math.inf
        self.best_failures = math.inf
        self.peak_update = 0  # the highest score within the budget so far
        self.peak_score = -math.inf
        self.halted: str | None = None

    def observe(self, update: int, record: dict[str, Any]) -> Decision:
        """Take the evaluation ``record`` (its ``kl_ref`` and, when the run has checks, its
        score) made after ``update`` updates; returns whether to keep this policy and whether
        to halt. The record is appended to the history with its update."""
        rec = {**record, "update": update}
        self.evals.append(rec)
        kl = float(rec.get("kl_ref", math.nan))
        over_budget = self.kl_budget is not None and kl > self.kl_budget
        # with no score, the newest policy within the budget is the one to keep
        score = float(rec.get(self.score, len(self.evals)))
        failed = sum(float(rec.get(k, 0.0)) for k in self.failures)  # 0 without failure keys
        if not over_budget and score > self.peak_score:
            self.peak_score, self.peak_update = score, update
        if self.failures:
            good = (failed, -score) < (self.best_failures, -self.best_score)
        else:  # as good as the peak, within the evaluation's noise: the latest such is kept
            good = score >= self.peak_score - self.keep_tolerance
        keep = good and not over_budget  # never keep a blown budget
        if keep:
            self.best_score, self.best_update, self.best_failures = score, update, failed
        if over_budget:
            self.halted = (
                f"KL to the reference {kl:.2f} nats passed the budget {self.kl_budget} at "
                f"update {update}"
            )
        elif self.score in rec:
            recent = self.evals[-self.patience :]
            if len(recent) == self.patience and all(
                float(e[self.score]) < self.peak_score - self.tolerance for e in recent
            ):
                self.halted = (
                    f"eval {self.score} score fell more than {self.tolerance} below the peak "
                    f"({self.peak_score:.3f} at update {self.peak_update}) for {self.patience} "
                    f"evaluations in a row, at update {update}"
                )
        return Decision(keep, self.halted)

    def state_dict(self) -> dict[str, Any]:
        """The fuse as ``fuse.json`` writes it: ``evals`` (every record with its update),
        ``best_update`` and ``best_gold`` (the kept policy's update and score, under their
        historical names), ``peak_update`` and ``peak_score``, ``keep_tolerance``, ``halted``,
        ``split`` and ``score``."""
        state = {
            "evals": list(self.evals),
            "best_update": self.best_update,
            "best_gold": self.best_score,
            "peak_update": self.peak_update,
            "peak_score": self.peak_score,
            "keep_tolerance": self.keep_tolerance,
            "halted": self.halted,
            "split": self.split,
            "score": self.score,
        }
        if self.failures:
            state.update(failures=list(self.failures), best_failures=self.best_failures)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` wrote (a checkpoint of a run saved before the
        ``score`` key existed followed the gold score)."""
        self.evals = list(state["evals"])
        self.best_update = int(state["best_update"])
        self.best_score = float(state["best_gold"])
        # a run saved before the keep tolerance existed kept its peak
        self.peak_update = int(state.get("peak_update", self.best_update))
        self.peak_score = float(state.get("peak_score", self.best_score))
        self.keep_tolerance = float(state.get("keep_tolerance", 0.0))
        self.halted = state.get("halted")
        self.split = state.get("split", self.split)
        self.score = state.get("score", "gold")
        self.failures = tuple(state.get("failures", ()))
        self.best_failures = float(state.get("best_failures", math.inf if self.failures else 0))
