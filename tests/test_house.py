"""Issue 14's small defects, each pinned by a test that failed before its fix."""

from __future__ import annotations

import itertools

import pytest
import torch

from cliprail.rlhf.common import adamw


def test_adamw_falls_back_when_the_fused_kernel_is_refused(monkeypatch):
    """The docstring promised a fallback; the code always asked for the fused kernel."""
    real = torch.optim.AdamW

    class NoFused(real):  # type: ignore[misc, valid-type]
        def __init__(self, params, **kw):
            if kw.get("fused"):
                raise RuntimeError("`fused=True` requires all the params to be floating point")
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", NoFused)
    p = torch.nn.Parameter(torch.ones(3))
    opt = adamw([p], 1e-3)
    assert isinstance(opt, NoFused) and not opt.defaults["fused"]
    p.grad = torch.ones(3)
    opt.step()
    assert torch.all(p < 1)


def test_logprobs_from_logits_keeps_float64():
    from cliprail.rlhf.models import logprobs_from_logits

    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 3))
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float64
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    half = logprobs_from_logits(logits.to(torch.bfloat16), labels)
    assert half.dtype == torch.float32  # low precision is still computed in float32


def test_preset_none_is_refused_not_silently_the_cartpole_preset(tmp_path, capsys):
    """``--preset none`` trained with the classic (CartPole) values without a word: the
    config's own defaults are the classic preset, so "none" named nothing of its own."""
    from cliprail.cli import main
    from cliprail.rl.config import PRESETS

    assert "none" not in PRESETS
    rc = main(["rl", "train", "--preset", "none", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown preset 'none'" in err and "classic" in err, err
    assert not (tmp_path / "r").exists()


def _ppo_run_without_fuse(tmp_path):
    """A PPO run folder as `rlhf ppo --eval-every 0` leaves it: no best/, fuse.json says so."""
    from cliprail.checkpoint import atomic_write_json
    from cliprail.configio import config_to_dict
    from cliprail.rlhf.ppo import PPOConfig

    run = tmp_path / "ppo"
    run.mkdir()
    cfg = PPOConfig(prompts=tmp_path / "missing.jsonl", sft_model=tmp_path / "no-sft",
                    reward_model=tmp_path / "no-rm", run_dir=run, eval_every=0)  # fmt: skip
    atomic_write_json(run / "config.json", config_to_dict(cfg))
    atomic_write_json(run / "fuse.json", {"evals": [], "best_update": 0, "best_gold": None,
                                          "halted": None, "best_checkpoint": None})  # fmt: skip
    (run / "policy").mkdir()
    return run


def test_eval_of_a_run_without_a_best_checkpoint_says_what_to_pass(tmp_path, capsys):
    """`rlhf eval` defaulted to best/, loaded every model, then failed with "model folder not
    found" and no hint. Now it names the cause and the flag before loading anything."""
    from cliprail.cli import main

    run = _ppo_run_without_fuse(tmp_path)
    rc = main(["rlhf", "eval", "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "--eval-every 0" in err and "--checkpoint policy" in err, err
    assert "missing.jsonl" not in err  # it stopped before reading the prompts or the models


def test_ppo_last_line_without_fuse_evaluations():
    """The last line read ``best checkpoint None (update 0, eval gold -inf)``."""
    from cliprail.cli import fuse_line

    line = fuse_line({"halted": None, "best_checkpoint": None, "best_update": 0,
                      "best_gold": float("-inf"), "evals": []}, "runs/p/policy")  # fmt: skip
    assert "None" not in line and "-inf" not in line
    assert "no fuse evaluation" in line and "runs/p/policy" in line
    kept = fuse_line({"halted": None, "best_checkpoint": "runs/p/best", "best_update": 8,
                      "best_gold": 0.9123, "evals": [{}]}, "runs/p/policy")  # fmt: skip
    assert "runs/p/best" in kept and "update 8" in kept and "0.912" in kept


def test_help_joins_docstring_lines_into_sentences():
    from cliprail.cli import help_paragraphs

    doc = """Show the failure: a biased panel (reviewer bias
    6: they like short answers) and no KL penalty or
    `--kl-budget`.

    Second paragraph
    (continued).
    - a list item
    - another"""
    assert help_paragraphs(doc) == (
        "Show the failure: a biased panel (reviewer bias 6: they like short answers) and no KL "
        "penalty or `--kl-budget`.\n\nSecond paragraph (continued).\n- a list item\n- another"
    )


@pytest.mark.parametrize("argv", [["demo"], ["rlhf", "ppo"], ["rl", "train"]])
def test_help_text_does_not_break_mid_sentence(argv, capsys, monkeypatch):
    """tyro kept the docstrings' line breaks before lines starting with a digit, a backtick or
    a parenthesis: `cliprail demo --help` printed "(reviewer bias" and "6: they like" on
    separate lines whatever the terminal's width."""
    from cliprail.cli import main

    monkeypatch.setenv("COLUMNS", "2000")  # rich wraps nothing: every break is tyro's
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    out = capsys.readouterr().out
    rows = [r.strip("│ ").rstrip() for r in out.splitlines()]
    # a continuation row that starts with a non-letter right after a row ending mid-sentence
    broken = [
        (a, b)
        for a, b in itertools.pairwise(rows)
        if a and b and a[-1].isalpha() and not b[0].isalpha() and not b.startswith(("-", "(def"))
    ]
    assert not broken, broken[:3]


def test_finished_episodes_without_the_mask_means_every_env():
    """`rl eval` re-implemented this and indexed ``final_info["_episode"]`` (a KeyError when a
    vector env leaves the mask out); both now use the one helper, which also names the env."""
    import numpy as np

    from cliprail.rl.evaluate import finished_episodes

    ep = {"r": np.array([1.5, 2.0]), "l": np.array([3, 4])}
    assert finished_episodes({"final_info": {"episode": ep}}) == [(0, 1.5, 3), (1, 2.0, 4)]
    masked = {"final_info": {"episode": ep, "_episode": np.array([False, True])}}
    assert finished_episodes(masked) == [(1, 2.0, 4)]
    assert finished_episodes({}) == []


def test_one_process_is_a_world_of_one_not_none():
    """Trainers branched on ``dist is None`` about fifteen times; a single process now gets a
    Distributed of world size 1 whose collectives are the single-process computations."""
    from cliprail.distributed import Distributed
    from cliprail.interrupt import StopRequest
    from cliprail.ppo import explained_variance, masked_whiten

    d = Distributed.from_env("cpu")
    assert d.world_size == 1 and d.is_main and not d.distributed
    x = torch.randn(7, generator=torch.Generator().manual_seed(0))
    m = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    torch.testing.assert_close(d.whiten(x, m), masked_whiten(x, m), rtol=0, atol=0)
    y = x + 0.1
    assert d.explained_variance(x, y) == float(explained_variance(x, y))
    assert d.gather_objects({"a": 1}) == [{"a": 1}] and d.from_main(lambda: 3) == 3
    assert d.reduce_stats({"k_min": 1.0}) == {"k_min": 1.0} and d.update_sync() is None
    stop = StopRequest()
    assert not d.stop_agreed(stop)
    stop.signum = 15
    assert d.stop_agreed(stop)
