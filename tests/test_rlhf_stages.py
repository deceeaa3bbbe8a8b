"""SFT and reward-model stages at tiny size; JSONL errors that name file, line and field."""

from __future__ import annotations

import json

import pytest

from cliprail.errors import RunDirError
from cliprail.rlhf.data import DataError, encode_pairs, encode_prompts, load_preferences, read_jsonl
from cliprail.rlhf.reward import RewardConfig, train_reward
from cliprail.rlhf.sft import SFTConfig, train_sft
from cliprail.scenarios.healthcare import BuildConfig, build

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build(tmp_path_factory.mktemp("world"), BuildConfig(n_train=64, n_eval=8, n_redteam=8))


@pytest.fixture(scope="module")
def sft_model(world, tmp_path_factory):
    run = tmp_path_factory.mktemp("sft") / "run"
    return train_sft(SFTConfig(data=world["demonstrations"], run_dir=run, epochs=8,
                               n_embd=32, n_head=2, vocab_size=400, extra_tokens=world["tokens"],
                               progress=False))  # fmt: skip


def test_sft_lowers_the_response_loss_and_saves_a_loadable_model(sft_model):
    losses = [json.loads(x)["loss"] for x in
              (sft_model.parent / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert losses[-1] < losses[0] - 1.0
    assert (sft_model / "model.safetensors").is_file() and (sft_model / "tokenizer.json").is_file()


def test_reward_model_learns_a_separable_preference(world, sft_model, tmp_path):
    prompts = [json.loads(x)["prompt"] for x in world["demonstrations"].read_text().splitlines()]
    refusal = "I am sorry, I cannot help with this request."
    pairs = [{"prompt": p, "chosen": "Booked: the slot you asked for.", "rejected": refusal}
             for p in prompts]  # fmt: skip
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in pairs * 3))
    metrics = train_reward(RewardConfig(data=data, sft_model=sft_model, run_dir=tmp_path / "rm",
                                        epochs=3, learning_rate=3e-3, holdout=0.2,
                                        demonstrations=world["demonstrations"],
                                        progress=False))  # fmt: skip
    assert metrics["heldout_accuracy"] >= 0.95
    assert (tmp_path / "rm" / "model" / "scalar_head.safetensors").is_file()
    with pytest.raises(RunDirError, match="already holds a run"):
        train_reward(RewardConfig(data=data, sft_model=sft_model, run_dir=tmp_path / "rm"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', ":2: malformed JSON"),
        (b'{"prompt": "a"}\n', ":1: missing field 'response'"),
        (b'{"prompt": "a", "response": 3}\n', "field 'response' must be a string"),
        (b'{"prompt": "a", "response": "  "}\n', "field 'response' is empty"),
        (b'{"prompt": "a", "response": "\xff\xfe"}\n', ":1: not valid UTF-8"),
        (b"[1, 2]\n", ":1: expected a JSON object"),
        (b"\n\n", "no records"),
    ],
)
def test_malformed_jsonl_names_file_line_and_field(tmp_path, content, message):
    f = tmp_path / "demos.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError, match=message) as exc:
        read_jsonl(f, ("prompt", "response"))
    assert str(f) in str(exc.value)


def test_identical_pair_and_long_prompt_and_empty_response(tmp_path, sft_model):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a", "chosen": "x", "rejected": "x"}) + "\n")
    with pytest.raises(DataError, match="identical"):
        load_preferences(f)
    from cliprail.rlhf.models import load_tokenizer

    tok = load_tokenizer(sft_model)
    with pytest.raises(DataError, match="exceeds the context budget of 8"):
        encode_prompts(tok, ["Patient: " + "please book " * 20], max_len=8)
    with pytest.raises(DataError, match="empty response"):
        encode_pairs(tok, ["Patient: hi"], ["   "], 32, 8)
    with pytest.raises(DataError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl", ("prompt",))


def test_tokenizer_that_does_not_fit_the_model_is_refused(world, sft_model, tmp_path):
    from cliprail.errors import CheckpointError
    from cliprail.rlhf.models import check_vocab, load_tokenizer, tiny_gpt2

    tok = load_tokenizer(sft_model)
    small = tiny_gpt2(vocab_size=50, n_embd=16, n_head=2, n_layer=1)
    with pytest.raises(CheckpointError, match="do not belong together"):
        check_vocab(tok, small, "model-dir")
    small.save_pretrained(tmp_path / "small")
    tok.save_pretrained(tmp_path / "small")
    with pytest.raises(CheckpointError, match="do not belong together"):
        train_sft(
            SFTConfig(
                data=world["demonstrations"],
                run_dir=tmp_path / "r",
                model=tmp_path / "small",
                progress=False,
            )
        )
