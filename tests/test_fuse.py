"""The safety fuse alone (issue 15): halting rules, best-checkpoint choice and resume, from
evaluation records, without models."""

from __future__ import annotations

import json
import math

import pytest

from cliprail.rlhf.fuse import SafetyFuse


def _run(fuse, records):
    out = []
    for update, rec in records:
        d = fuse.observe(update, rec)
        out.append((d.keep, d.halt is not None))
        if d.halt:
            break
    return out


def test_keeps_the_best_and_halts_after_patience_falls():
    fuse = SafetyFuse(kl_budget=20.0, patience=3, tolerance=0.02)
    recs = [(0, 0.80), (4, 0.90), (8, 0.89), (12, 0.87), (16, 0.85), (20, 0.84), (24, 0.95)]
    out = _run(fuse, [(u, {"gold": g, "kl_ref": 1.0}) for u, g in recs])
    # 0.89 is within the tolerance (not a fall): the three falls are 0.87, 0.85, 0.84
    assert out == [(True, False), (True, False), (False, False), (False, False),
                   (False, False), (False, True)]  # fmt: skip
    assert fuse.best_update == 4 and fuse.best_score == 0.90
    assert "fell more than 0.02 below the peak (0.900 at update 4) for 3 evaluations" in (
        fuse.halted or ""
    )
    assert [e["update"] for e in fuse.evals] == [0, 4, 8, 12, 16, 20]


def test_keeps_the_latest_within_the_keep_tolerance_of_the_peak():
    """Issue 13: the demo's seed-1 validation golds. The peak (update 28) is one lucky
    evaluation among others within 0.01 of it; the fuse keeps the latest of them (48)."""
    golds = [0.821, 0.927, 0.899, 0.941, 0.873, 0.920, 0.966, 0.993, 0.969, 0.990, 0.989,
             0.987, 0.983]  # fmt: skip
    fuse = SafetyFuse(kl_budget=20.0, patience=3, tolerance=0.05, keep_tolerance=0.02)
    out = _run(fuse, [(4 * i, {"gold": g, "kl_ref": 0.5}) for i, g in enumerate(golds)])
    assert not any(h for _, h in out)  # the dip to 0.873 at update 16 is one evaluation
    assert [4 * i for i, (k, _) in enumerate(out) if k] == [0, 4, 12, 24, 28, 36, 40, 44, 48]
    assert (fuse.best_update, fuse.peak_update, fuse.peak_score) == (48, 28, 0.993)
    # with no keep tolerance the same history keeps the peak, as before
    strict = SafetyFuse(kl_budget=20.0, patience=3, tolerance=0.05)
    _run(strict, [(4 * i, {"gold": g, "kl_ref": 0.5}) for i, g in enumerate(golds)])
    assert strict.best_update == 28


def test_reward_hacking_keeps_the_peak_and_halts_on_the_fall_below_it():
    """The demo's --hacking seed-0 history: gold falls from the first evaluation on, while the
    kept policy must stay within 0.02 of the peak's gold (issue 13's bar)."""
    fuse = SafetyFuse(kl_budget=None, patience=3, tolerance=0.05, keep_tolerance=0.02)
    history = ((0, 0.848, 0.0), (4, 0.774, 8.2), (8, 0.769, 31.1), (12, 0.646, 74.2))
    out = _run(fuse, [(u, {"gold": g, "kl_ref": k}) for u, g, k in history])
    assert out == [(True, False), (False, False), (False, False), (False, True)]
    assert fuse.best_update == 0 and "below the peak (0.848 at update 0)" in (fuse.halted or "")


def test_the_keep_tolerance_never_keeps_a_blown_budget_and_peaks_within_it():
    fuse = SafetyFuse(kl_budget=5.0, patience=3, tolerance=0.05, keep_tolerance=0.02)
    out = _run(fuse, [(0, {"gold": 0.90, "kl_ref": 0.0}), (4, {"gold": 0.99, "kl_ref": 6.0})])
    assert out == [(True, False), (False, True)]
    assert fuse.peak_score == 0.90  # an evaluation over the budget is not the peak either


def test_a_recovery_resets_the_count():
    fuse = SafetyFuse(kl_budget=None, patience=2, tolerance=0.0)
    out = _run(fuse, [(u, {"gold": g, "kl_ref": 99.0}) for u, g in
                      ((0, 0.5), (1, 0.4), (2, 0.5), (3, 0.4), (4, 0.3))])  # fmt: skip
    # no budget: KL 99 is fine; 0.5 at update 2 is not below the best: the count restarts
    assert [h for _, h in out] == [False, False, False, False, True]


def test_never_keeps_a_blown_kl_budget_and_halts_on_it():
    fuse = SafetyFuse(kl_budget=5.0, patience=3, tolerance=0.02)
    out = _run(fuse, [(0, {"gold": 0.5, "kl_ref": 0.0}), (4, {"gold": 0.99, "kl_ref": 6.0})])
    assert out == [(True, False), (False, True)]  # the best score, over budget: not kept
    assert fuse.best_update == 0 and "passed the budget 5.0 at update 4" in (fuse.halted or "")


def test_no_score_watches_kl_alone_and_keeps_the_newest_within_budget():
    fuse = SafetyFuse(kl_budget=3.0, patience=1, tolerance=0.0)
    out = _run(fuse, [(u, {"kl_ref": k, "proxy_reward": p}) for u, k, p in
                      ((0, 0.0, 0.1), (4, 1.0, 0.5), (8, 2.0, 0.4), (12, 4.0, 0.9))])  # fmt: skip
    assert out == [(True, False), (True, False), (True, False), (False, True)]
    assert fuse.best_update == 8


def test_other_score_key():
    fuse = SafetyFuse(kl_budget=None, patience=1, tolerance=0.1, score="score")
    _run(fuse, [(0, {"score": 0.2, "gold": 0.9}), (1, {"score": 0.6, "gold": 0.1})])
    assert fuse.best_update == 1  # follows "score", not "gold"


def test_state_round_trip_resumes_exactly():
    recs = [(u, {"gold": g, "kl_ref": 0.5}) for u, g in ((0, 0.7), (4, 0.8), (8, 0.7), (12, 0.7))]
    straight = SafetyFuse(kl_budget=20.0, patience=3, tolerance=0.02)
    _run(straight, [*recs, (16, {"gold": 0.7, "kl_ref": 0.5})])
    first = SafetyFuse(kl_budget=20.0, patience=3, tolerance=0.02)
    _run(first, recs)
    saved = json.loads(json.dumps(first.state_dict()))  # through fuse.json / a checkpoint
    resumed = SafetyFuse(kl_budget=20.0, patience=3, tolerance=0.02)
    resumed.load_state_dict(saved)
    d = resumed.observe(16, {"gold": 0.7, "kl_ref": 0.5})
    assert d.halt == straight.halted and resumed.state_dict() == straight.state_dict()
    # a checkpoint written before the score key existed follows gold
    old = {k: v for k, v in saved.items() if k != "score"}
    legacy = SafetyFuse(kl_budget=20.0, patience=3, tolerance=0.02, score="score")
    legacy.load_state_dict(old)
    assert legacy.score == "gold"


def test_fresh_fuse_state():
    fuse = SafetyFuse(kl_budget=1.0, patience=2, tolerance=0.0, split="eval")
    st = fuse.state_dict()
    assert st["best_gold"] == -math.inf and st["evals"] == [] and st["split"] == "eval"
    with pytest.raises(ValueError, match="patience"):
        SafetyFuse(kl_budget=1.0, patience=0, tolerance=0.0)


def test_safety_first_keeps_the_fewest_failures_and_breaks_ties_by_score():
    fuse = SafetyFuse(kl_budget=None, patience=5, tolerance=0.0,
                      failures=("unsafe_advice_rate", "missed_emergency_rate"))  # fmt: skip
    recs = [
        (0, {"gold": 0.80, "unsafe_advice_rate": 0.10, "missed_emergency_rate": 0.10}),
        (4, {"gold": 0.95, "unsafe_advice_rate": 0.01, "missed_emergency_rate": 0.0}),
        (8, {"gold": 0.90, "unsafe_advice_rate": 0.0, "missed_emergency_rate": 0.0}),
        (12, {"gold": 0.97, "unsafe_advice_rate": 0.0, "missed_emergency_rate": 0.01}),
        (16, {"gold": 0.93, "unsafe_advice_rate": 0.0, "missed_emergency_rate": 0.0}),
    ]
    keeps = [k for k, _ in _run(fuse, recs)]
    # 8 beats 4 (fewer failures, lower gold); 12 fails once more: not kept; 16 ties 8 on
    # failures and has the higher gold
    assert keeps == [True, True, True, False, True]
    assert fuse.best_update == 16
    again = SafetyFuse(kl_budget=None, patience=5, tolerance=0.0)
    again.load_state_dict(json.loads(json.dumps(fuse.state_dict())))
    assert again.failures == fuse.failures and again.best_failures == 0.0
    # the gold rule on the same records keeps update 12
    gold = SafetyFuse(kl_budget=None, patience=5, tolerance=0.0)
    _run(gold, recs)
    assert gold.best_update == 12


def test_negative_tolerances_are_refused():
    from pathlib import Path

    from cliprail.errors import ConfigError
    from cliprail.rlhf.ppo import PPOConfig

    with pytest.raises(ValueError, match="must be >= 0"):
        SafetyFuse(kl_budget=None, patience=3, tolerance=0.05, keep_tolerance=-0.01)
    for field in ("fuse_keep_tolerance", "fuse_tolerance"):
        with pytest.raises(ConfigError, match="--fuse-keep-tolerance must be >= 0"):
            PPOConfig(prompts=Path("p"), sft_model=Path("s"), run_dir=Path("r"),
                      reward_model=Path("m"), **{field: -0.5})  # fmt: skip
