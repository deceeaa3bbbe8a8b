"""`cliprail demo` end to end at tiny size: summary.json, --json's last line, the report."""

from __future__ import annotations

import json

import pytest

from cliprail.cli import main
from cliprail.rlhf.evaluate import COLUMNS

pytest.importorskip("transformers")


def test_demo_writes_the_summary_and_prints_it_last(tmp_path, capsys):
    run = tmp_path / "demo"
    args = [
        "demo",
        "--run-dir",
        str(run),
        "--n-train",
        "96",
        "--n-eval",
        "8",
        "--sft-epochs",
        "1",
        "--total-episodes",
        "16",
        "--no-progress",
        "--json",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])  # the last line, alone
    assert len(captured.out.strip().splitlines()) == 1  # progress went to stderr
    assert summary == json.loads((run / "summary.json").read_text())
    assert set(summary) == {"seed", "wall_s", "sft", "ppo", "fuse"}
    assert summary["seed"] == 0 and summary["wall_s"] > 0
    assert set(summary["sft"]) == set(COLUMNS)
    assert set(summary["ppo"]) == {*COLUMNS, "wins", "losses", "ties", "win_rate"}
    ppo = summary["ppo"]
    assert ppo["wins"] + ppo["losses"] + ppo["ties"] == 8
    assert summary["fuse"]["kept_update"] == 0 and summary["fuse"]["verdict"] == "not tripped"
    (first,) = summary["fuse"]["history"]
    assert first["update"] == 0 and {"gold", "proxy", "kl"} <= set(first)
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)  # update 0 is the SFT model itself
    # the fuse chose on val; the summary tests on eval, prompts nothing chose on
    assert summary["fuse"]["split"] == "val"
    prompts = [json.loads(x) for x in (run / "data" / "prompts.jsonl").read_text().splitlines()]
    val = {p["prompt"] for p in prompts if p["split"] == "val"}
    test = {p["prompt"] for p in prompts if p["split"] == "eval"}
    assert len(val) == len(test) == 8 and not val & test
    report = (run / "report.html").read_text()
    assert "What happened" in report
    assert "8 eval prompts, which the fuse never evaluated, the kept policy moved" in report


def test_demo_with_a_critic_free_advantage(tmp_path, capsys):
    """--advantage rloo: the main run holds no value model (its stage.json says so)."""
    run = tmp_path / "demo"
    assert main(["demo", "--run-dir", str(run), "--n-train", "96", "--n-eval", "8",
                 "--sft-epochs", "1", "--total-episodes", "16", "--advantage", "rloo",
                 "--group-size", "4", "--no-progress", "--json"]) == 0  # fmt: skip
    stage = json.loads((run / "ppo" / "stage.json").read_text())
    assert stage["advantage"] == "rloo"
    config = json.loads((run / "ppo" / "config.json").read_text())
    assert config["group_size"] == 4 and config["advantage"] == "rloo"
    capsys.readouterr()


def test_demo_ppo_settings_default_and_hacking(tmp_path):
    """Issue 13: the default run takes 1e-4 for 72 updates of 64 prompts; --hacking keeps the
    larger step (2e-4, 48 updates) with no KL penalty or budget; explicit flags win."""
    from cliprail.cli import DemoArgs, demo_ppo_config

    data = {"prompts": tmp_path / "prompts.jsonl"}
    cfg = demo_ppo_config(DemoArgs(), tmp_path, data, tmp_path / "sft", 120)
    assert (cfg.learning_rate, cfg.total_episodes, cfg.kl_coef, cfg.kl_budget) == (
        1e-4,
        4608,
        0.2,
        20.0,
    )
    assert (cfg.fuse_keep_tolerance, cfg.fuse_tolerance, cfg.fuse_patience) == (0.02, 0.05, 3)
    hack = demo_ppo_config(DemoArgs(hacking=True), tmp_path, data, tmp_path / "sft", 120)
    assert (hack.learning_rate, hack.total_episodes, hack.kl_coef, hack.kl_budget) == (
        2e-4,
        3072,
        0.0,
        None,
    )
    own = DemoArgs(hacking=True, ppo_learning_rate=5e-5, total_episodes=640)
    mine = demo_ppo_config(own, tmp_path, data, tmp_path / "sft", 120)
    assert (mine.learning_rate, mine.total_episodes) == (5e-5, 640)
