"""RLHF PPO: token rewards by hand, one update moves the policy and not the reference, and the
whole pipeline (world -> SFT -> reward -> PPO with the fuse) end to end at tiny size."""

from __future__ import annotations

import json

import pytest
import torch

from cliprail.cli import main
from cliprail.ppo import FixedKLController
from cliprail.rlhf.ppo import (
    PPOConfig,
    Rollout,
    advantages_and_returns,
    load_models,
    ppo_step,
    rollout,
    token_rewards,
)

pytest.importorskip("transformers")


def test_token_rewards_by_hand():
    # two responses: lengths 3 and 1 (then padding); scores 2 and -1; beta 0.5, k1
    ro = Rollout(
        input_ids=torch.zeros(2, 6, dtype=torch.long), attention_mask=torch.ones(2, 6),
        response_mask=torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]), query_len=2,
        logprobs=torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-1.0, -7.0, -7.0, -7.0]]),
        ref_logprobs=torch.tensor([[-1.5, -1.0, -0.5, 3.0], [-2.0, 1.0, 1.0, 1.0]]),
        values=torch.zeros(2, 4), scores=torch.tensor([2.0, -1.0]),
    )  # fmt: skip
    rewards, kl = token_rewards(ro, beta=0.5, estimator="k1")
    # k1 = logp - ref_logp on real tokens: [0.5, -1.0, 0.0] and [1.0]; nothing on padding
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    expected = torch.tensor([[-0.25, 0.5, 0.0 + 2.0, 0.0], [-0.5 - 1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    cfg = PPOConfig(prompts=None, sft_model=None, reward_model="rm", run_dir=None)  # type: ignore
    adv, ret = advantages_and_returns(ro, rewards, cfg)
    # gamma 1, lambda 0.95, zero values: A_t = r_t + 0.95 A_{t+1} inside each response:
    # A_2 = 2, A_1 = 0.5 + 0.95 * 2 = 2.4, A_0 = -0.25 + 0.95 * 2.4 = 2.03; 0 on padding
    torch.testing.assert_close(ret, torch.tensor([[2.03, 2.4, 2.0, 0.0], [-1.5, 0, 0, 0]]))
    assert (adv[ro.response_mask == 0] == 0).all()


def _cfg(root, **kw):
    base = dict(prompts=root / "data" / "prompts.jsonl", sft_model=root / "sft" / "model",
                reward_model=root / "rm" / "model", run_dir=root / "ppo", batch_size=8,
                minibatch_size=4, epochs=2, max_new_tokens=12, eval_prompts=8,
                progress=False)  # fmt: skip
    return PPOConfig(**{**base, **kw})


def test_one_update_changes_policy_and_not_reference(pipeline):
    cfg = _cfg(pipeline)
    m = load_models(cfg)
    before = {k: v.clone() for k, v in m.policy.state_dict().items()}
    ref_before = {k: v.clone() for k, v in m.ref.state_dict().items()}
    rm_before = {k: v.clone() for k, v in m.reward.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    prompts = [json.loads(x)["prompt"] for x in
               (pipeline / "data" / "prompts.jsonl").read_text().splitlines()[:8]]  # fmt: skip
    ro = rollout(m, cfg, prompts, g)
    params = [*m.policy.parameters(), *m.value.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    stats = ppo_step(m, cfg, ro, opt, FixedKLController(0.05), g)
    assert stats["optimizer_steps"] == 2 * 2  # epochs x minibatches
    assert any(not torch.equal(before[k], v) for k, v in m.policy.state_dict().items())
    assert all(torch.equal(ref_before[k], v) for k, v in m.ref.state_dict().items())
    assert all(torch.equal(rm_before[k], v) for k, v in m.reward.state_dict().items())
    assert stats["kl_ref"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at rollout


def test_ppo_cli_end_to_end_with_the_fuse(pipeline, capsys):
    args = ["rlhf", "ppo", "--prompts", str(pipeline / "data" / "prompts.jsonl"),
            "--sft-model", str(pipeline / "sft" / "model"), "--reward-model",
            str(pipeline / "rm" / "model"), "--run-dir", str(pipeline / "ppo-cli"),
            "--total-episodes", "32", "--batch-size", "8", "--minibatch-size", "4",
            "--epochs", "1", "--max-new-tokens", "12", "--eval-every", "2",
            "--eval-prompts", "8", "--kl-budget", "0.0001", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "the safety fuse halted the run: KL to the reference" in err
    fuse = json.loads((pipeline / "ppo-cli" / "fuse.json").read_text())
    assert fuse["halted"] and fuse["best_update"] == 0  # only the start was under budget
    assert fuse["split"] == "val"  # chosen on val; `rlhf eval` tests on eval
    assert (pipeline / "ppo-cli" / "best" / "model.safetensors").is_file()
    # eval: SFT against the best checkpoint, then the report
    assert main(["rlhf", "eval", "--run-dir", str(pipeline / "ppo-cli"), "--n-prompts", "8",
                 "--json"]) == 0  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert set(res["sft"]) >= {"gold", "unsafe_advice_rate", "missed_emergency_rate",
                               "wrong_or_invented_slot_rate", "over_refusal_rate",
                               "unsafe_advice_rate_medical", "missed_emergency_rate_red_flag",
                               "wrong_action_rate", "no_answer_rate", "degenerate_rate",
                               "proxy_reward", "kl_ref", "mean_length"}  # fmt: skip
    assert res["wins"] + res["losses"] + res["ties"] == 8
    assert 0.0 <= res["win_rate"] <= 1.0 and res["n_prompts"] == 8
    assert res["sft"]["kl_ref"] == pytest.approx(0.0, abs=1e-5)  # the reference itself
    report = (pipeline / "ppo-cli" / "report.html").read_text()
    assert report.count("<img") == 3 and "Answer cards" in report and "What happened" in report
    assert "The safety fuse halted the run" in report
    for name in ("gold_and_proxy.png", "gold_vs_sqrt_kl.png", "diagnostics.png"):
        assert (pipeline / "ppo-cli" / name).read_bytes().startswith(b"\x89PNG")
    # the minibatch does not divide the batch: one line, exit 2
    assert main([*args[:-1], "--batch-size", "6"]) == 2
    err = capsys.readouterr().err
    assert err == "cliprail: error: --minibatch-size 4 must divide --batch-size 6\n"


def test_trim_padding_keeps_logprobs_and_values(pipeline):
    from cliprail.rlhf.models import response_logprobs
    from cliprail.rlhf.ppo import trim_padding, values_of

    cfg = _cfg(pipeline)
    m = load_models(cfg)
    prompts = [json.loads(x)["prompt"] for x in
               (pipeline / "data" / "prompts.jsonl").read_text().splitlines()[:8]]  # fmt: skip
    ro = rollout(m, cfg, prompts, torch.Generator().manual_seed(0))
    # a minibatch of the two shortest prompts: left prompt columns all padding
    order = ro.attention_mask[:, : ro.query_len].sum(1).argsort()[:2]
    mb = {"input_ids": ro.input_ids[order], "attention_mask": ro.attention_mask[order],
          "response_mask": ro.response_mask[order], "logprobs": ro.logprobs[order]}  # fmt: skip
    small, lq = trim_padding(mb, ro.query_len)
    assert small["input_ids"].shape[1] < mb["input_ids"].shape[1] and lq < ro.query_len
    full_lp, _ = response_logprobs(m.policy, mb["input_ids"], mb["attention_mask"], ro.query_len,
                                   cfg.temperature)  # fmt: skip
    lp, _ = response_logprobs(m.policy, small["input_ids"], small["attention_mask"], lq,
                              cfg.temperature)  # fmt: skip
    Lr = small["response_mask"].shape[1]
    real = small["response_mask"].bool()
    torch.testing.assert_close(lp[real], full_lp[:, :Lr][real], atol=1e-5, rtol=1e-5)
    assert not mb["response_mask"][:, Lr:].any()  # only padding was cut on the right
    v_full = values_of(m.value, mb["input_ids"], mb["attention_mask"], ro.query_len)
    v = values_of(m.value, small["input_ids"], small["attention_mask"], lq)
    torch.testing.assert_close(v[real], v_full[:, :Lr][real], atol=1e-5, rtol=1e-5)


def test_nan_rewards_are_dropped_before_the_weights(pipeline):
    cfg = _cfg(pipeline)
    m = load_models(cfg)
    prompts = [json.loads(x)["prompt"] for x in
               (pipeline / "data" / "prompts.jsonl").read_text().splitlines()[:8]]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    ro = rollout(m, cfg, prompts, g)
    ro.scores[[1, 5]] = float("nan")  # injected: two responses with a NaN reward
    ro.values[2, 0] = float("inf")  # and one with an inf value on a real token
    params = [*m.policy.parameters(), *m.value.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    stats = ppo_step(m, cfg, ro, opt, FixedKLController(0.05), g)
    assert stats["nonfinite_responses"] == 3 and stats["skipped_update"] == 0
    assert stats["optimizer_steps"] == 2 * 2 and stats["skipped_nonfinite"] == 0
    assert all(torch.isfinite(p).all() for p in params)
    ro.scores[:] = float("nan")  # every response: the update is skipped, nothing moves
    before = [p.detach().clone() for p in params]
    stats = ppo_step(m, cfg, ro, opt, FixedKLController(0.05), g)
    assert stats["skipped_update"] == 1 and stats["optimizer_steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))


def test_a_nan_reward_model_halts_the_run_and_keeps_the_best(pipeline, capsys, monkeypatch):
    from cliprail.rlhf.models import ScalarHeadModel

    real_score = ScalarHeadModel.score
    calls = {"n": 0}

    def broken(self, ids, mask):  # fine for the fuse's first evaluation, then NaN forever
        calls["n"] += 1
        out = real_score(self, ids, mask)
        return out if calls["n"] == 1 else torch.full_like(out, float("nan"))

    monkeypatch.setattr(ScalarHeadModel, "score", broken)
    run = pipeline / "ppo-nan"
    rc = main(["rlhf", "ppo", "--prompts", str(pipeline / "data" / "prompts.jsonl"),
               "--sft-model", str(pipeline / "sft" / "model"), "--reward-model",
               str(pipeline / "rm" / "model"), "--run-dir", str(run), "--total-episodes", "80",
               "--batch-size", "8", "--minibatch-size", "4", "--epochs", "1",
               "--max-new-tokens", "6", "--eval-every", "100", "--eval-prompts", "8",
               "--max-nonfinite-updates", "3", "--no-eos-penalty", "None",
               "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "non-finite score or log-prob in 3 updates in a row (update 3)" in err[0]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_update"] for r in rows if "skipped_update" in r] == [1.0, 1.0]
    assert (run / "best" / "model.safetensors").is_file()  # the last good policy is kept
    assert not (run / "policy").exists()


def test_the_fuse_never_keeps_a_checkpoint_past_the_kl_budget(pipeline, tmp_path, monkeypatch):
    """An evaluation whose KL passed the budget halts the run and is not a best candidate, even
    with the highest gold score (the evaluations are stubbed: gold and KL rise together)."""
    import cliprail.rlhf.ppo as ppo_mod
    from cliprail.rlhf.ppo import PPOConfig, train_ppo

    calls: list[int] = []

    def fake_eval(m, cfg, requests, policy=None):
        calls.append(1)
        k = (len(calls) - 1) // 2  # held-out and red-team evaluations alternate
        return {"gold": 0.1 * k, "kl_ref": 0.3 * k, "proxy_reward": 0.0}

    monkeypatch.setattr(ppo_mod, "evaluate_policy", fake_eval)
    data = pipeline / "data"
    fuse = train_ppo(PPOConfig(prompts=data / "prompts.jsonl", sft_model=pipeline / "sft" / "model",
                               reward_model=pipeline / "rm" / "model", run_dir=tmp_path / "run",
                               total_episodes=32, batch_size=8, minibatch_size=8, epochs=1,
                               max_new_tokens=4, eval_every=1, eval_prompts=2, kl_budget=0.5,
                               progress=False))  # fmt: skip
    # update 1: gold 0.1, KL 0.3 (kept); update 2: gold 0.2, KL 0.6 > 0.5 (halts, not kept)
    assert [e["update"] for e in fuse["evals"]] == [0, 1, 2]
    assert fuse["halted"].startswith("KL to the reference 0.60 nats passed the budget 0.5")
    assert fuse["best_update"] == 1 and fuse["best_gold"] == pytest.approx(0.1)
