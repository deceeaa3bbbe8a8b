"""DPO and best-of-n stages and `cliprail rlhf compare` over SFT, PPO, DPO and best-of-n runs,
end to end at tiny size."""

from __future__ import annotations

import json
import math

import pytest

from cliprail.cli import main

pytest.importorskip("transformers")


def _paths(root):
    return {"prompts": str(root / "data" / "prompts.jsonl"),
            "pairs": str(root / "data" / "preferences.jsonl"),
            "sft": str(root / "sft" / "model"), "rm": str(root / "rm" / "model")}  # fmt: skip


def test_dpo_starts_at_the_reference_and_learns_the_pairs(pipeline, capsys):
    p = _paths(pipeline)
    run = pipeline / "dpo"
    assert main(["rlhf", "dpo", "--data", p["pairs"], "--sft-model", p["sft"], "--run-dir",
                 str(run), "--epochs", "3", "--batch-size", "8", "--learning-rate", "1e-3",
                 "--prompts", p["prompts"], "--reward-model", p["rm"], "--eval-prompts", "8",
                 "--no-progress"]) == 0  # fmt: skip
    assert "held-out implicit-reward accuracy" in capsys.readouterr().err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    # the policy equals the reference at the first step: the log-ratio margin is 0, loss log 2
    assert train[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert train[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    metrics = json.loads((run / "dpo_metrics.json").read_text())
    assert metrics["train_implicit_accuracy"] > 0.7  # 86 training pairs, 3 epochs
    assert [e["epoch"] for e in metrics["evals"]] == [0, 1, 2, 3]
    assert metrics["evals"][0]["kl_ref"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["evals"][-1]["kl_ref"] > 0.0
    stage = json.loads((run / "stage.json").read_text())
    assert stage["stage"] == "dpo" and stage["tokens_backward"] > 0
    assert stage["tokens_forward"] > stage["tokens_backward"]  # + the reference pass
    # the phases the benchmarks read (issue 14: they patched the stage's functions instead)
    ph = stage["phases"]
    assert 0 < ph["reference_start"] < ph["reference_end"] <= ph["loop_start"] < ph["loop_end"]
    assert ph["loop_end"] <= stage["wall_s"] + 1e-6


def test_best_of_n_and_compare_end_to_end(pipeline, capsys):
    p = _paths(pipeline)
    bon = pipeline / "bon"
    assert main(["rlhf", "best-of-n", "--prompts", p["prompts"], "--sft-model", p["sft"],
                 "--reward-model", p["rm"], "--run-dir", str(bon), "--n", "1", "2", "4",
                 "--pool", "4", "--eval-prompts", "8", "--max-new-tokens", "12",
                 "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "KL analytic" in out
    res = json.loads((bon / "bestofn.json").read_text())
    assert [pt["n"] for pt in res["points"]] == [1, 2, 4]
    assert [pt["kl_analytic"] for pt in res["points"]] == pytest.approx(
        [0.0, math.log(2) - 0.5, math.log(4) - 0.75])  # fmt: skip
    proxy = [pt["proxy_reward"] for pt in res["points"]]
    assert proxy[0] <= proxy[1] <= proxy[2]  # more candidates: a better pick by the RM
    for pt in res["points"]:
        assert pt["kl_estimate"] <= math.log(pt["n"]) + 1e-9
    # a PPO run next to them, then compare all four
    ppo = pipeline / "ppo-cmp"
    assert main(["rlhf", "ppo", "--prompts", p["prompts"], "--sft-model", p["sft"],
                 "--reward-model", p["rm"], "--run-dir", str(ppo), "--total-episodes", "16",
                 "--batch-size", "8", "--minibatch-size", "4", "--epochs", "1",
                 "--max-new-tokens", "12", "--eval-every", "1", "--eval-prompts", "8",
                 "--no-progress"]) == 0  # fmt: skip
    ppo_phases = json.loads((ppo / "stage.json").read_text())["phases"]
    assert 0 < ppo_phases["loop_start"] < ppo_phases["loop_end"]
    if not (pipeline / "dpo" / "stage.json").is_file():  # run alone: make the DPO run
        assert main(["rlhf", "dpo", "--data", p["pairs"], "--sft-model", p["sft"], "--run-dir",
                     str(pipeline / "dpo"), "--epochs", "1", "--no-progress"]) == 0  # fmt: skip
    # the critic-free form on the same budget (issue 16): its row is named by --advantage
    rloo = pipeline / "rloo-cmp"
    assert main(["rlhf", "ppo", "--prompts", p["prompts"], "--sft-model", p["sft"],
                 "--reward-model", p["rm"], "--run-dir", str(rloo), "--total-episodes", "16",
                 "--batch-size", "8", "--minibatch-size", "4", "--epochs", "1",
                 "--max-new-tokens", "12", "--eval-every", "1", "--eval-prompts", "8",
                 "--advantage", "rloo", "--group-size", "4", "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    out_dir = pipeline / "cmp"
    runs = [str(pipeline / "sft"), str(ppo), str(rloo), str(pipeline / "dpo"), str(bon)]
    assert main(["rlhf", "compare", *runs, "--n-prompts", "8", "--out", str(out_dir),
                 "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["SFT", "PPO", "RLOO", "DPO", "best-of-1", "best-of-2", "best-of-4"]
    rows = {r["method"]: r for r in result["rows"]}
    # no value model: the weights, gradients and AdamW state of one trunk less, measured
    ppo_mem, rloo_mem = rows["PPO"], rows["RLOO"]
    assert rloo_mem["weights_mb"] < ppo_mem["weights_mb"] and rloo_mem["peak_rss_mb"] > 0
    assert rloo_mem["optimizer_mb"] < 0.6 * ppo_mem["optimizer_mb"]
    assert rloo_mem["held_mb"] < ppo_mem["held_mb"]
    curves = json.loads((out_dir / "compare.json").read_text())["curves"]
    assert len(curves["RLOO (rloo-cmp)"]) == 3  # along the run: the fuse at updates 0, 1, 2
    assert rows["SFT"]["kl_ref"] == pytest.approx(0.0, abs=1e-5)  # the reference itself
    for r in result["rows"]:
        assert {"gold", "unsafe_advice_rate", "missed_emergency_rate", "over_refusal_rate",
                "wrong_or_invented_slot_rate", "proxy_reward", "kl_ref", "wall_s",
                "tokens_forward", "tokens_backward"} <= set(r)  # fmt: skip
        assert r["wall_s"] > 0 and r["tokens_forward"] > 0
    assert rows["best-of-4"]["tokens_backward"] == 0  # sampling only
    # SFT judged here and best-of-1 (the first SFT sample) see the same prompts
    assert 0.0 <= rows["best-of-1"]["gold"] <= 1.0
    assert (out_dir / "compare.png").read_bytes()[:4] == b"\x89PNG"
    page = (out_dir / "compare.html").read_text()
    assert "<img" in page and "best-of-4" in page
    # a best-of-n run made on other prompts is refused, naming the run
    assert main(["rlhf", "compare", str(bon), "--prompts", p["prompts"], "--sft-model", p["sft"],
                 "--n-prompts", "6", "--out", str(out_dir)]) == 2  # fmt: skip
    assert "other prompts" in capsys.readouterr().err
    # a reward-model run is not a policy
    assert main(["rlhf", "compare", str(pipeline / "rm"), "--out", str(out_dir)]) == 2
    assert "is not a policy" in capsys.readouterr().err
