"""RLHF on data that is not healthcare (issue 15): the shipped example end to end (its data
generator, checks and rule reward, no reward model), and chat-form data through every stage."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cliprail.cli import main

pytest.importorskip("transformers")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_data"
TINY = ["--n-embd", "32", "--n-head", "2", "--no-progress"]


def test_the_own_data_example_end_to_end(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(data),
                    "--n-train", "200"], check=True, capture_output=True)  # fmt: skip
    monkeypatch.syspath_prepend(str(EXAMPLE))  # as PYTHONPATH=examples/own_data would
    assert main(["rlhf", "sft", "--data", str(data / "demonstrations.jsonl"), "--run-dir",
                 str(tmp_path / "sft"), "--extra-tokens", str(data / "tokens.json"),
                 "--epochs", "2", *TINY]) == 0  # fmt: skip
    run = tmp_path / "ppo"
    assert main(["rlhf", "ppo", "--prompts", str(data / "prompts.jsonl"), "--sft-model",
                 str(tmp_path / "sft" / "model"), "--reward-fn", "order_reward:order_reward",
                 "--checks", "order_checks:order_checks", "--advantage", "grpo",
                 "--group-size", "4", "--total-episodes", "32", "--batch-size", "16",
                 "--minibatch-size", "8", "--epochs", "1", "--max-new-tokens", "16",
                 "--eval-every", "1", "--eval-prompts", "8", "--run-dir", str(run),
                 "--no-progress"]) == 0  # fmt: skip
    assert "eval score" in capsys.readouterr().err  # the fuse kept on the checks' score
    fuse = json.loads((run / "fuse.json").read_text())
    assert fuse["score"] == "score" and len(fuse["evals"]) == 3
    assert fuse["evals"][0]["checks"] == ["no_refusal", "one_sentence", "right_order",
                                          "score", "ship_day"]  # fmt: skip
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/right_order" in r for r in rows)  # every check, every evaluation
    assert all("value_loss" not in r for r in rows)  # GRPO: no value model
    assert main(["rlhf", "eval", "--run-dir", str(run), "--n-prompts", "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["ppo"]) >= {"right_order", "score", "proxy_reward", "kl_ref", "no_eos_rate"}
    assert res["wins"] + res["losses"] + res["ties"] == 8
    report = (run / "report.html").read_text()
    assert report.count("<img") == 4 and "The checks along the run" in report
    assert (run / "checks.png").read_bytes().startswith(b"\x89PNG")
    # compare judges with the PPO run's own checks, and shows them
    assert main(["rlhf", "compare", str(tmp_path / "sft"), str(run), "--n-prompts", "8",
                 "--out", str(tmp_path / "cmp")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "score" in out and "right_or" in out and "GRPO" in out


def _chat(user: str, reply: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": user}]  # fmt: skip
    return msgs + ([{"role": "assistant", "content": reply}] if reply else [])


def _rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


WORDS = ["red", "blue", "green", "gold", "grey", "pink", "teal", "navy"]


def test_chat_data_through_sft_reward_ppo_and_dpo(tmp_path, capsys):
    demos = _rows(
        tmp_path / "demos.jsonl", [{"messages": _chat(f"Say {w}.", w)} for w in WORDS * 4]
    )
    pairs = _rows(tmp_path / "pairs.jsonl", [
        {"chosen": _chat(f"Say {w}.", w), "rejected": _chat(f"Say {w}.", "no")} for w in WORDS * 4
    ])  # fmt: skip
    prompts = _rows(tmp_path / "prompts.jsonl",
                    [{"messages": _chat(f"Say {w}."), "word": w} for w in WORDS * 4])  # fmt: skip
    sft = tmp_path / "sft"
    assert main(["rlhf", "sft", "--data", str(demos), "--run-dir", str(sft), "--epochs", "2",
                 "--vocab-size", "300", *TINY]) == 0  # fmt: skip
    signature = json.loads((sft / "model" / "chat_rendering.json").read_text())["signature"]
    assert signature == "system: S\nuser: U\nassistant:"  # the plain template: no chat template
    model = str(sft / "model")
    assert main(["rlhf", "reward", "--data", str(pairs), "--sft-model", model, "--run-dir",
                 str(tmp_path / "rm"), "--epochs", "1", "--no-progress"]) == 0  # fmt: skip
    args = ["rlhf", "ppo", "--prompts", str(prompts), "--sft-model", str(sft / "model"),
            "--reward-model", str(tmp_path / "rm" / "model"), "--total-episodes", "16",
            "--batch-size", "8", "--minibatch-size", "8", "--epochs", "1",
            "--max-new-tokens", "8", "--eval-every", "1", "--eval-prompts", "4", "--run-dir",
            str(tmp_path / "ppo"), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    fuse = json.loads((tmp_path / "ppo" / "fuse.json").read_text())
    assert fuse["evals"][0]["checks"] == ["no_refusal", "not_degenerate", "not_repetitive"]
    assert main(["rlhf", "dpo", "--data", str(pairs), "--sft-model", model, "--run-dir",
                 str(tmp_path / "dpo"), "--epochs", "1", "--no-progress"]) == 0  # fmt: skip
    # another chat layout than the SFT model learned from: one line, exit 2, nothing written
    (sft / "model" / "chat_rendering.json").write_text(json.dumps({"signature": "<|user|>U"}))
    capsys.readouterr()
    rc = main([*args[:-2], str(tmp_path / "ppo2"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "the chat template renders prompts as" in err, err
    assert not (tmp_path / "ppo2").exists()


def test_reward_fn_alone_with_no_checks_and_a_nan(tmp_path, capsys, monkeypatch):
    """No reward model, no checks: the value model starts from the SFT trunk (GAE), the fuse
    watches KL alone and says so; a reward function's NaN is dropped and counted (no no-EOS
    penalty here: it would replace the NaN of a reply cut at the length limit)."""
    demos = _rows(tmp_path / "d.jsonl", [{"prompt": f"Say {w}:", "response": w} for w in WORDS * 4])
    prompts = _rows(tmp_path / "p.jsonl", [{"prompt": f"Say {w}:", "w": w} for w in WORDS * 4])
    (tmp_path / "rules.py").write_text(
        "import math\n"
        "def reward(prompts, responses, records):\n"
        "    return [math.nan if i == 0 else float(r.strip() == rec['w'])\n"
        "            for i, (r, rec) in enumerate(zip(responses, records))]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["rlhf", "sft", "--data", str(demos), "--run-dir", str(tmp_path / "sft"),
                 "--epochs", "2", "--vocab-size", "300", *TINY]) == 0  # fmt: skip
    run = tmp_path / "ppo"
    assert main(["rlhf", "ppo", "--prompts", str(prompts), "--sft-model",
                 str(tmp_path / "sft" / "model"), "--reward-fn", "rules:reward", "--checks",
                 "none", "--total-episodes", "16", "--batch-size", "8", "--minibatch-size",
                 "8", "--epochs", "1", "--max-new-tokens", "6", "--eval-every", "1",
                 "--eval-prompts", "4", "--no-eos-penalty", "None", "--run-dir", str(run),
                 "--no-progress"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "--checks none: the safety fuse watches the KL to the reference alone" in err
    assert "the newest within the KL budget" in err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "nonfinite_responses" in r]
    assert train and all(r["nonfinite_responses"] == 1.0 for r in train)  # the NaN, counted
    assert all("value_loss" in r for r in train)  # GAE: a value model, from the SFT trunk
    assert json.loads((run / "fuse.json").read_text())["best_update"] == 2  # newest in budget


def test_python_api_trains_models_held_in_memory(tmp_path):
    """Issue 15: the stages as functions on in-memory models, data and callables; the example
    script runs them end to end and GRPO lifts its checks' score."""
    out = subprocess.run([sys.executable, str(EXAMPLE.parent / "rlhf_in_memory.py"), "--out",
                          str(tmp_path)], check=True, capture_output=True, text=True)  # fmt: skip
    line = out.stdout.strip().splitlines()[-1]
    found = re.findall(r"score ([0-9.]+) before PPO, ([0-9.]+)", line)
    before, after = (float(x) for x in found[0])
    assert after > before, line
    fuse = json.loads((tmp_path / "ppo" / "fuse.json").read_text())
    assert fuse["evals"][0]["checks"] == ["one_word", "right_colour", "score"]
    cfg = json.loads((tmp_path / "ppo" / "config.json").read_text())
    assert cfg["prompts"] == "<in memory>" and cfg["reward_fn"] == "<in memory: reward>"


def test_python_api_trains_the_policy_in_place(tmp_path):
    import torch

    from cliprail.rlhf import api
    from cliprail.rlhf.models import tiny_gpt2, train_tokenizer

    tok = train_tokenizer([f"Say {w}. {w}." for w in WORDS], 120)
    policy = tiny_gpt2(len(tok), n_layer=1, n_embd=16, n_head=2,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    result = api.ppo(policy, tok, [f"Say {w}." for w in WORDS * 4], run_dir=tmp_path / "ppo",
                     reward_fn=lambda p, r, rec: [float(len(x)) for x in r], checks="generic",
                     total_episodes=16, batch_size=8, minibatch_size=8, epochs=1,
                     max_new_tokens=4, eval_every=1, eval_prompts=3, progress=False)  # fmt: skip
    assert result.policy is policy
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert result.fuse["evals"][0]["checks"] == ["no_refusal", "not_degenerate", "not_repetitive"]
    with pytest.raises(ValueError, match="give reward_model, reward_fn, or both"):
        api.ppo(policy, tok, ["x"], run_dir=tmp_path / "none")


def test_python_api_reward_model_and_dpo_in_memory(tmp_path):
    import copy

    import torch

    from cliprail.rlhf import api
    from cliprail.rlhf.models import ScalarHeadModel, tiny_gpt2, train_tokenizer

    tok = train_tokenizer([f"Say {w}. {w}. no." for w in WORDS], 120)
    lm = tiny_gpt2(len(tok), n_layer=1, n_embd=16, n_head=2,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    pairs = [{"prompt": f"Say {w}.", "chosen": f"{w}.", "rejected": "no."} for w in WORDS * 4]
    rm = api.reward_model(copy.deepcopy(lm), tok, pairs, run_dir=tmp_path / "rm", epochs=2,
                          progress=False)  # fmt: skip
    assert isinstance(rm, ScalarHeadModel) and (tmp_path / "rm" / "model").is_dir()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    metrics = api.dpo(lm, tok, pairs, run_dir=tmp_path / "dpo", epochs=1, progress=False)
    assert "heldout_implicit_accuracy" in metrics
    assert any(not torch.equal(before[k], v) for k, v in lm.state_dict().items())  # in place
    chat = [{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "b"}]}] * 8  # fmt: skip
    api.dpo(lm, tok, chat, run_dir=tmp_path / "dpo-chat", epochs=1, progress=False)
