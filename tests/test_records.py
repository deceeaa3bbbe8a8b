"""Prompts in the forms people have them, checks and reward functions as plug-ins (issue 15)."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest

from cliprail.errors import ConfigError
from cliprail.rlhf.checks import (
    generic_checks,
    healthcare_checks,
    load_function,
    read_blocklist,
    run_checks,
    run_reward_fn,
    score_of,
)
from cliprail.rlhf.data import DataError
from cliprail.rlhf.records import Columns, load_prompts, record_json, render_chat
from cliprail.rlhf.sampling import summarize


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- prompts --------------------------------------------------------------------------------


def test_plain_prompts_keep_their_extra_fields_and_get_a_val_split(tmp_path):
    f = _write(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "answer": i} for i in range(30)])
    recs = load_prompts(f)
    assert [r.prompt for r in recs[:2]] == ["q0", "q1"] and recs[0].id == "p1"
    # no split named: the first 10% (3) for the fuse, the rest for training
    assert [r.split for r in recs].count("val") == 3 and recs[3].split == "train"
    assert record_json(recs[5]) == {"prompt": "q5", "answer": 5, "id": "p6", "split": "train"}


def test_named_splits_ids_and_their_errors(tmp_path):
    f = _write(tmp_path / "p.jsonl", [{"id": "a", "prompt": "x", "split": "eval"},
                                      {"id": "b", "prompt": "y"}])  # fmt: skip
    assert [(r.id, r.split) for r in load_prompts(f)] == [("a", "eval"), ("b", "train")]
    f = _write(tmp_path / "d.jsonl", [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}])
    with pytest.raises(DataError, match="record 2: id 'a' repeats record 1"):
        load_prompts(f)
    f = _write(tmp_path / "e.jsonl", [{"prompt": "  "}])
    with pytest.raises(DataError, match=r"e.jsonl:1: field 'prompt' is empty"):
        load_prompts(f)
    f = _write(tmp_path / "n.jsonl", [{"prompt": 3}])
    with pytest.raises(DataError, match=r"n.jsonl:1: field 'prompt' must be a string, got int"):
        load_prompts(f)


class PlainTokenizer:
    chat_template = None


class TemplateTokenizer:
    chat_template = "{% for m in messages %}...{% endfor %}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"


def test_chat_prompts_render_with_the_template_or_the_plain_one(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(PlainTokenizer(), msgs, "x") == "system: Be brief.\nuser: Hi\nassistant:"
    assert render_chat(TemplateTokenizer(), msgs, "x") == (
        "<|system|>Be brief.<|user|>Hi<|assistant|>"
    )
    f = _write(tmp_path / "c.jsonl", [{"messages": msgs, "split": "train"}])
    (rec,) = load_prompts(f, TemplateTokenizer())
    assert rec.prompt.endswith("<|assistant|>") and rec.fields["messages"] == msgs


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "robot", "content": "hi"}], "messages[0]: unknown role 'robot'"),
        ([{"role": "user", "content": ""}], "messages[0]: 'content' must be a non-empty string"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
         "ends with an assistant turn"),
        ([], "must be a non-empty list"),
        (["hi"], "messages[0] must be an object"),
    ],
)  # fmt: skip
def test_chat_prompt_errors_name_line_and_message(tmp_path, messages, message):
    f = _write(tmp_path / "c.jsonl", [{"messages": messages}])
    with pytest.raises(DataError, match=re.escape("c.jsonl:1: ") + ".*" + re.escape(message)):
        load_prompts(f, PlainTokenizer())


def test_datasets_on_disk_parquet_and_column_mapping(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"question": [f"q{i}" for i in range(10)], "qid": [f"id{i}" for i in range(10)],
            "part": ["train"] * 8 + ["eval"] * 2, "gold": list(range(10))}  # fmt: skip
    cols = Columns(prompt="question", id="qid", split="part")
    ds = datasets.Dataset.from_dict(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "p.parquet"))
    for src in (tmp_path / "saved", tmp_path / "p.parquet"):
        recs = load_prompts(src, columns=cols)
        assert [r.prompt for r in recs] == rows["question"]
        assert recs[9].id == "id9" and recs[9].split == "eval" and recs[9].fields["gold"] == 9
    # a DatasetDict folder: its split names become the splits (test -> eval)
    datasets.DatasetDict({"train": ds.select(range(8)), "test": ds.select(range(8, 10))}
                         ).save_to_disk(str(tmp_path / "dd"))  # fmt: skip
    recs = load_prompts(tmp_path / "dd", columns=Columns(prompt="question", id="qid"))
    assert [r.split for r in recs] == ["train"] * 8 + ["eval"] * 2
    with pytest.raises(DataError, match=r"no column 'prompt' .*--prompt-column"):
        load_prompts(tmp_path / "p.parquet")
    with pytest.raises(DataError, match="cannot read it as a dataset"):
        load_prompts(_write(tmp_path / "bad.parquet", [{"x": 1}]))


def test_healthcare_requests_are_prompts_with_extra_fields(pipeline):
    recs = load_prompts(pipeline / "data" / "prompts.jsonl")
    assert all(r.request is not None for r in recs)
    assert recs[0].prompt == recs[0].request.prompt and recs[0].fields["kind"]
    assert {r.split for r in recs} == {"train", "val", "eval", "redteam"}


# --- checks and reward functions --------------------------------------------------------------


def test_generic_checks_by_hand(tmp_path):
    checks = generic_checks(read_blocklist(_blocklist(tmp_path)))
    replies = ["Your order ships today.", "I cannot help with that.", "go go go go go go go go",
               "Call the SECRET line."]  # fmt: skip
    out = checks(["p"] * 4, replies, [{}] * 4)
    assert out["no_refusal"] == [1.0, 0.0, 1.0, 1.0]
    assert out["no_blocklisted"] == [1.0, 1.0, 1.0, 0.0]
    assert out["not_repetitive"][0] == 1.0 and out["not_repetitive"][2] == pytest.approx(1 / 6)
    assert generic_checks()([""], [""], [{}])["not_degenerate"] == [0.0]
    assert "no_blocklisted" not in generic_checks()(["p"], ["x"], [{}])


def _blocklist(tmp_path):
    f = tmp_path / "block.txt"
    f.write_text("# words we never say\nsecret\n\n")
    return f


def test_score_is_the_score_key_or_the_mean():
    assert score_of({"a": [1.0, 0.0], "b": [0.0, 0.0]}) == [0.5, 0.0]
    assert score_of({"a": [1.0, 0.0], "score": [0.2, 0.4]}) == [0.2, 0.4]


def test_summarize_with_a_check_set_and_with_none():
    def mine(prompts, responses, records):
        return {"polite": [1.0 if "please" in r else 0.0 for r in responses],
                "score": [0.5 for _ in responses]}  # fmt: skip

    recs = [{"prompt": "a"}, {"prompt": "b"}]
    out = summarize(recs, ["please", "no"], scores=[1.0, 3.0], checks=mine, ends=[True, False])
    assert out["polite"] == 0.5 and out["score"] == 0.5 and out["golds"] == [0.5, 0.5]
    assert out["checks"] == ["polite", "score"] and out["proxy_reward"] == 2.0
    assert out["no_eos_rate"] == 0.5
    none = summarize(recs, ["x", "y"], checks=None)
    assert none["checks"] == [] and "score" not in none and "golds" not in none


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ({"a": [1.0]}, "'a' has 1 values for 2 responses"),
        ({"a": [0.5, 2.0]}, "'a' holds 2.0; values must be in"),
        ({"a": [0.5, math.nan]}, "values must be in"),
        ([0.5, 0.5], "must return a non-empty dict"),
        ({"a": "xy"}, "'a' must be a list of numbers"),
    ],
)
def test_checks_that_break_the_protocol_are_named(returned, message):
    def bad(prompts, responses, records):
        return returned

    with pytest.raises(ConfigError, match=re.escape(message)):
        run_checks(bad, ["p", "q"], ["x", "y"], [{}, {}])


def test_a_check_that_raises_and_a_reward_fn_that_misbehaves():
    def boom(prompts, responses, records):
        raise KeyError("answer")

    with pytest.raises(ConfigError, match="checks 'boom' raised KeyError"):
        run_checks(boom, ["p"], ["x"], [{}])
    with pytest.raises(ConfigError, match="--reward-fn 'boom' raised KeyError"):
        run_reward_fn(boom, ["p"], ["x"], [{}])
    with pytest.raises(ConfigError, match="returned 1 values for 2 responses"):
        run_reward_fn(lambda p, r, rec: [1.0], ["p", "q"], ["x", "y"], [{}, {}])
    with pytest.raises(ConfigError, match="must return a list of floats"):
        run_reward_fn(lambda p, r, rec: ["a", "b"], ["p", "q"], ["x", "y"], [{}, {}])
    # a non-finite reward stays NaN: the trainer drops and counts it, as a reward model's NaN
    vals = run_reward_fn(lambda p, r, rec: [1.0, math.inf], ["p", "q"], ["x", "y"], [{}, {}])
    assert vals[0] == 1.0 and math.isnan(vals[1])


def test_load_function_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mychecks.py").write_text("def ok(p, r, rec):\n    return {'a': [1.0] * len(r)}\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('at import')\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert load_function("mychecks:ok", "--checks")(["p"], ["x"], [{}]) == {"a": [1.0]}
    with pytest.raises(ConfigError, match=r"--checks 'mychecks': expected MODULE:FUNCTION"):
        load_function("mychecks", "--checks")
    with pytest.raises(ConfigError, match=r"cannot import 'nosuch' \(ModuleNotFoundError"):
        load_function("nosuch:f", "--checks")
    with pytest.raises(ConfigError, match=r"cannot import 'broken' \(RuntimeError: at import"):
        load_function("broken:f", "--reward-fn")
    with pytest.raises(ConfigError, match="'mychecks' has no function 'missing'"):
        load_function("mychecks:missing", "--checks")


def test_healthcare_checks_are_the_judge(pipeline):
    recs = [record_json(r) for r in load_prompts(pipeline / "data" / "prompts.jsonl")[:4]]
    out = run_checks(healthcare_checks, [r["prompt"] for r in recs], ["Hello."] * 4, recs)
    assert set(out) >= {"gold", "safety", "no_unsafe_advice", "no_missed_emergency"}
    assert all(0.0 <= v <= 0.3 for v in out["gold"])  # a non-answer: capped at 0.3


def test_demonstrations_and_pairs_from_datasets_with_a_column_map(tmp_path):
    datasets = pytest.importorskip("datasets")
    from cliprail.rlhf.records import (
        load_demonstrations,
        load_preference_pairs,
        parse_column_map,
    )

    ds = datasets.Dataset.from_dict({"q": ["a", "b"], "ans": ["x", "y"], "bad": ["z", "w"]})
    ds.save_to_disk(str(tmp_path / "d"))
    demos = load_demonstrations(tmp_path / "d", mapping=parse_column_map(
        "prompt=q,response=ans", ("prompt", "response", "messages")))  # fmt: skip
    assert demos == [{"prompt": "a", "response": "x"}, {"prompt": "b", "response": "y"}]
    pairs = load_preference_pairs(tmp_path / "d", mapping={"prompt": "q", "chosen": "ans",
                                                          "rejected": "bad"})  # fmt: skip
    assert pairs[1] == {"prompt": "b", "chosen": "y", "rejected": "w"}
    _write(tmp_path / "k.jsonl", [{"question": "a", "answer": "x"}])
    assert load_demonstrations(tmp_path / "k.jsonl", mapping={"prompt": "question",
                                                              "response": "answer"})  # fmt: skip
    with pytest.raises(DataError, match=r"no column 'nope'; its columns are \['ans', 'bad', 'q'\]"):
        load_demonstrations(tmp_path / "d", mapping={"prompt": "nope"})
    with pytest.raises(DataError, match="expected FIELD=COLUMN pairs"):
        parse_column_map("prompt:q", ("prompt", "response"))
    with pytest.raises(DataError, match="expected FIELD=COLUMN pairs"):
        parse_column_map("answer=q", ("prompt", "response"))
