"""Hostile input through the command line: every case gives exactly one line
``cliprail: error: <what, where, what was expected>``, exit code 2, no traceback, and leaves
what was written before untouched."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from cliprail.cli import main

pytest.importorskip("transformers")

GOOD_PAIR = {"prompt": "Patient: book Dr. Ali Mon 2 Mar 09:00.\nAssistant:",
             "chosen": "Booked: Dr. Ali, Mon 2 Mar 09:00.", "rejected": "Sure."}  # fmt: skip


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("cliprail: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _jsonl(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


# --- data files: (file content, what the one line must say) ---------------------------------
DATA_CASES = [
    ("malformed-json", b'{"prompt": "a", "chosen": "b"\n', [":1:", "malformed JSON"]),
    ("not-an-object", b'["prompt", "chosen"]\n', [":1:", "expected a JSON object, got list"]),
    ("missing-field", b'{"prompt": "a", "chosen": "b"}\n', [":1:", "missing field 'rejected'"]),
    ("mistyped-field", b'{"prompt": "a", "chosen": 3, "rejected": "c"}\n',
     [":1:", "field 'chosen' must be a string, got int"]),
    ("null-field", b'{"prompt": null, "chosen": "b", "rejected": "c"}\n',
     [":1:", "field 'prompt' must be a string, got NoneType"]),
    ("empty-string", b'{"prompt": "", "chosen": "b", "rejected": "c"}\n',
     [":1:", "field 'prompt' is empty"]),
    ("whitespace-string", b'{"prompt": "a", "chosen": " \\t ", "rejected": "c"}\n',
     [":1:", "field 'chosen' is empty"]),
    ("identical-pair", (json.dumps({**GOOD_PAIR, "rejected": GOOD_PAIR["chosen"]}) + "\n").encode(),
     [":1:", "'chosen' and 'rejected' are identical"]),
    ("invalid-utf8", b'{"prompt": "a\xff", "chosen": "b", "rejected": "c"}\n',
     [":1:", "not valid UTF-8"]),
    ("ten-megabyte-line", b'{"prompt": "' + b"x" * (10 << 20) + b'", "chosen": "b", '
     b'"rejected": "c"}\n', [":1:", "bytes, more than the", "limit of one record"]),
    ("error-on-line-3", (json.dumps(GOOD_PAIR) + "\n\n").encode() + b"{oops}\n",
     [":3:", "malformed JSON"]),
    ("empty-file", b"", ["no records"]),
    ("only-blank-lines", b"\n  \n\n", ["no records"]),
    ("truncated-last-line", (json.dumps(GOOD_PAIR) + "\n").encode() + b'{"prompt": "a", "ch',
     [":2:", "malformed JSON"]),
]  # fmt: skip


@pytest.mark.parametrize("name,content,needles", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_preference_files(pipeline, tmp_path, capsys, name, content, needles):
    f = _jsonl(tmp_path / f"{name}.jsonl", content)
    rc = main(["rlhf", "reward", "--data", str(f), "--sft-model", str(pipeline / "sft" / "model"),
               "--run-dir", str(tmp_path / "rm"), "--no-progress"])  # fmt: skip
    line = _one_line_error(capsys, rc, *needles)
    assert str(f) in line  # names the file
    assert not (tmp_path / "rm").exists()  # nothing started


def test_a_utf8_bom_is_accepted_not_an_error(pipeline, tmp_path):
    from cliprail.rlhf.data import read_jsonl

    f = _jsonl(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + json.dumps(GOOD_PAIR).encode() + b"\n")
    assert read_jsonl(f, ("prompt", "chosen", "rejected"))[0]["chosen"] == GOOD_PAIR["chosen"]


def _ppo_args(pipeline, run_dir, **over):
    args = {"--prompts": str(pipeline / "data" / "prompts.jsonl"),
            "--sft-model": str(pipeline / "sft" / "model"),
            "--reward-model": str(pipeline / "rm" / "model"), "--run-dir": str(run_dir),
            "--total-episodes": "8", "--batch-size": "8", "--minibatch-size": "4",
            "--max-new-tokens": "4", "--eval-every": "0"}  # fmt: skip
    args.update(over)
    return ["rlhf", "ppo", *[x for kv in args.items() for x in kv], "--no-progress"]


def _half_written(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    w = dst / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])  # a save cut short
    return dst


def _pickle_only(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "model.safetensors").rename(dst / "pytorch_model.bin")
    return dst


def _remote_code(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilLM"}
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "modeling_evil.py").write_text(
        f"open({str(dst / 'REMOTE_CODE_RAN')!r}, 'w').close()\n"
    )  # fmt: skip
    return dst


def _no_config(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "config.json").unlink()
    return dst


def _other_vocab(src: Path, dst: Path) -> Path:
    from cliprail.rlhf.models import load_tokenizer, tiny_gpt2

    small = tiny_gpt2(vocab_size=64, n_embd=16, n_head=2, n_layer=1)
    small.save_pretrained(dst)
    load_tokenizer(src).save_pretrained(dst)
    return dst


MODEL_CASES = [
    ("missing-folder", lambda src, dst: dst, ["model folder not found"]),
    ("a-file-not-a-folder", lambda src, dst: _jsonl(dst, b"{}"), ["found a file"]),
    ("no-config", _no_config, ["no config.json", "half-written"]),
    ("half-written-weights", _half_written, ["cannot load a causal LM"]),
    ("pickle-only-weights", _pickle_only, ["pickle format", "pytorch_model.bin", "safetensors"]),
    ("vocabulary-mismatch", _other_vocab, ["do not belong together"]),
]  # fmt: skip


@pytest.mark.parametrize("name,make,needles", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_folders(pipeline, tmp_path, capsys, name, make, needles):
    folder = make(pipeline / "sft" / "model", tmp_path / "model")
    rc = main(_ppo_args(pipeline, tmp_path / "run", **{"--sft-model": str(folder)}))
    _one_line_error(capsys, rc, str(folder), *needles)


def test_model_code_in_the_folder_never_runs_without_the_flag(pipeline, tmp_path, capsys):
    folder = _remote_code(pipeline / "sft" / "model", tmp_path / "model")
    assert main(_ppo_args(pipeline, tmp_path / "run", **{"--sft-model": str(folder)})) == 0
    assert not (folder / "REMOTE_CODE_RAN").exists()  # built-in GPT-2 code, not the folder's


def test_reward_folder_that_is_not_a_reward_model(pipeline, tmp_path, capsys):
    rc = main(_ppo_args(pipeline, tmp_path / "run",
                        **{"--reward-model": str(pipeline / "sft" / "model")}))  # fmt: skip
    _one_line_error(capsys, rc, "not a reward or value model")


CONFIG_CASES = [
    ({"--batch-size": "0"}, "--batch-size"),
    ({"--minibatch-size": "3"}, "--minibatch-size 3 must divide --batch-size 8"),
    ({"--temperature": "0"}, "--temperature must be > 0"),
    ({"--top-p": "1.5"}, "--top-p must be in (0, 1]"),
    ({"--gamma": "1.5"}, "--gamma in (0, 1]"),
    ({"--clip-range": "-0.1"}, "--clip-range"),
    ({"--kl-coef": "-1"}, "--kl-coef >= 0"),
    ({"--kl-budget": "-1"}, "--kl-budget must be >= 0 nats"),
    # issue 14: the modulo ran before the positivity check (a ZeroDivisionError traceback)
    ({"--minibatch-size": "0"}, "--minibatch-size must be a positive integer"),
    ({"--vf-coef": "-0.1"}, "--vf-coef must be >= 0"),
    ({"--ent-coef": "-0.01"}, "--ent-coef must be >= 0"),
    ({"--clip-range-vf": "-0.2"}, "--clip-range-vf must be > 0"),
    ({"--max-grad-norm": "0"}, "--max-grad-norm must be > 0"),
]  # fmt: skip


@pytest.mark.parametrize("over,needle", CONFIG_CASES, ids=[next(iter(c[0])) for c in CONFIG_CASES])
def test_impossible_config_values(pipeline, tmp_path, capsys, over, needle):
    rc = main(_ppo_args(pipeline, tmp_path / "run", **over))
    _one_line_error(capsys, rc, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["rlhf", "dpo", "--beta", "0"], "--beta must be > 0"),
        (["rlhf", "sft", "--n-head", "3"], "--n-head 3 must divide --n-embd 64"),
        (["rlhf", "reward", "--holdout", "1.0"], "--holdout must be in (0, 1)"),
        (["rlhf", "best-of-n", "--n", "0"], "--n must list integers >= 1"),
    ],
)
def test_impossible_values_in_other_stages(pipeline, tmp_path, capsys, argv, needle):
    common = {"dpo": ["--data", "x", "--sft-model", "y"], "sft": ["--data", "x"],
              "reward": ["--data", "x", "--sft-model", "y"],
              "best-of-n": ["--prompts", "x", "--sft-model", "y",
                            "--reward-model", "z"]}  # fmt: skip
    rc = main([*argv, *common[argv[1]], "--run-dir", str(tmp_path / "r")])
    _one_line_error(capsys, rc, needle)


@pytest.mark.parametrize(
    "device,needle",
    [("cuda", "this machine has no CUDA GPU"), ("tpu", "not a device"),
     ("meta", "cliprail runs on cpu or cuda")],
)  # fmt: skip
def test_a_device_this_machine_lacks(pipeline, tmp_path, capsys, device, needle):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    data = pipeline / "data" / "demonstrations.jsonl"
    rc = main(["rlhf", "sft", "--data", str(data), "--run-dir", str(tmp_path / "r"),
               "--device", device])  # fmt: skip
    _one_line_error(capsys, rc, f"--device {device}", needle)
    assert not (tmp_path / "r" / "model").exists()


@pytest.mark.parametrize(
    "content,needle",
    [(None, "file not found"), (b'{"a": 1}', "expected a JSON list of non-empty strings"),
     (b'["Dr. Ali", ""]', "expected a JSON list of non-empty strings"),
     (b"[1, 2", "not a JSON list of strings")],
)  # fmt: skip
def test_extra_tokens_file_that_is_not_a_list_of_strings(pipeline, tmp_path, capsys, content,
                                                         needle):  # fmt: skip
    f = tmp_path / "tokens.json"
    if content is not None:
        f.write_bytes(content)
    data = pipeline / "data" / "demonstrations.jsonl"
    rc = main(["rlhf", "sft", "--data", str(data), "--run-dir", str(tmp_path / "r"),
               "--extra-tokens", str(f)])  # fmt: skip
    _one_line_error(capsys, rc, str(f), needle)
    assert not (tmp_path / "r").exists()


def test_world_rate_out_of_range(tmp_path, capsys):
    rc = main(["rlhf", "world", "--out", str(tmp_path / "w"), "--p-medical", "1.5"])
    _one_line_error(capsys, rc, "--p-medical must be in [0, 1], got 1.5")
    assert not (tmp_path / "w").exists()


def test_prompt_longer_than_the_context_window(pipeline, tmp_path, capsys):
    rc = main(_ppo_args(pipeline, tmp_path / "run", **{"--max-prompt-len": "8"}))
    _one_line_error(capsys, rc, "exceeds the context budget of 8", "--max-prompt-len")


def test_prompts_file_errors(pipeline, tmp_path, capsys):
    # any prompt with extra fields is valid input (issue 15), but one prompt fills no rollout
    f = _jsonl(tmp_path / "p.jsonl", b'{"id": "a", "prompt": "hi", "colour": "red"}\n')
    rc = main(_ppo_args(pipeline, tmp_path / "run", **{"--prompts": str(f)}))
    _one_line_error(capsys, rc, str(f), "1 training prompts, fewer than one rollout's 8")
    f = _jsonl(tmp_path / "m.jsonl", b'{"prompt": "hi"}\n{"text": "no prompt"}\n')
    rc = main(_ppo_args(pipeline, tmp_path / "run", **{"--prompts": str(f)}))
    _one_line_error(capsys, rc, f"{f}:2: missing field 'prompt'")
    f = _jsonl(tmp_path / "s.jsonl", b'{"prompt": "hi", "split": "test"}\n')
    rc = main(_ppo_args(pipeline, tmp_path / "run", **{"--prompts": str(f)}))
    _one_line_error(capsys, rc, f"{f}:1: field 'split' must be one of")
    f = _jsonl(tmp_path / "c.jsonl", b'{"messages": [{"role": "robot", "content": "hi"}]}\n')
    rc = main(_ppo_args(pipeline, tmp_path / "run", **{"--prompts": str(f)}))
    _one_line_error(capsys, rc, f"{f}:1: messages[0]: unknown role 'robot'")
    f = _jsonl(tmp_path / "r.jsonl", b'{"id": "a", "prompt": "hi", "kind": "book"}\n')
    rc = main(_ppo_args(pipeline, tmp_path / "run", **{"--prompts": str(f)}))
    _one_line_error(capsys, rc, f"{f}:1: not a healthcare request", "missing field 'clinician'")
    f = _jsonl(tmp_path / "q.jsonl", b'{"id": "a", "prompt": "hi", "kind": "book", "clinician": '
               b'"Dr. A", "department": "x", "open_slots": "Mon 2 Mar 09:00"}\n')  # fmt: skip
    rc = main(_ppo_args(pipeline, tmp_path / "run", **{"--prompts": str(f)}))
    _one_line_error(capsys, rc, "'open_slots' must be a list of strings")


def test_run_folder_in_use_is_not_overwritten(pipeline, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_ppo_args(pipeline, run)) == 0
    capsys.readouterr()
    before = _digest(run)
    rc = main(_ppo_args(pipeline, run))
    _one_line_error(capsys, rc, str(run), "already holds a run")
    assert _digest(run) == before


def test_run_folder_that_cannot_be_created(pipeline, tmp_path, capsys):
    blocker = _jsonl(tmp_path / "a-file", b"x")
    rc = main(_ppo_args(pipeline, blocker / "run"))
    _one_line_error(capsys, rc, "cannot write the run folder")


def test_full_disk_while_saving_keeps_the_previous_model(pipeline, tmp_path, capsys,
                                                         monkeypatch):  # fmt: skip
    """The SFT run writes its model once; a rerun into a copy of that folder (with --model, a
    fine-tune) hits a full disk while saving: the old model stays loadable and complete."""
    import cliprail.checkpoint as ck

    run = tmp_path / "sft"
    shutil.copytree(pipeline / "sft", run)
    (run / "config.json").unlink()  # reuse the folder as a fresh run's target
    before = _digest(run / "model")
    real_replace = ck.os.replace

    def full_disk(src, dst):  # the new model's folder cannot be put in place
        if Path(src).name.startswith(".model.") and str(src).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", full_disk)
    rc = main(["rlhf", "sft", "--data", str(pipeline / "data" / "demonstrations.jsonl"),
               "--run-dir", str(run), "--model", str(pipeline / "sft" / "model"),
               "--epochs", "1", "--no-progress"])  # fmt: skip
    _one_line_error(capsys, rc, "No space left on device", "intact")
    assert _digest(run / "model") == before
    assert not [p for p in run.iterdir() if p.name.startswith(".model.")]  # no debris
    from cliprail.rlhf.models import load_causal_lm

    load_causal_lm(run / "model")


def test_debug_flag_shows_the_traceback(pipeline, tmp_path):
    from cliprail.errors import CliprailError

    with pytest.raises(CliprailError):
        main(["--debug", *_ppo_args(pipeline, tmp_path / "run", **{"--batch-size": "0"})])


def test_compare_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    rc = main(["rlhf", "compare", str(tmp_path)])
    _one_line_error(capsys, rc, str(tmp_path), "no stage.json")


def test_atomic_dir_failure_mid_write_leaves_the_old_folder(tmp_path):
    from cliprail.checkpoint import atomic_dir

    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_bytes(b"old")
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        (tmp / "weights").write_bytes(b"new, half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (target / "weights").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary debris
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_bytes(b"new")
    assert (target / "weights").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# --- issue 15: own data, checks and reward functions -----------------------------------------
def test_plug_ins_that_do_not_import_raise_or_miscount(pipeline, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MODULE:FUNCTION is imported from the working directory
    (tmp_path / "plug.py").write_text(
        "def raises(prompts, responses, records):\n    raise RuntimeError('my bug')\n"
        "def short(prompts, responses, records):\n    return [0.0]\n"
        "def checks_short(prompts, responses, records):\n    return {'a': [1.0]}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plain = _jsonl(tmp_path / "plain.jsonl", b"".join(b'{"prompt": "hi"}\n' for _ in range(20)))
    cases = [
        ({"--checks": "nosuch:f"}, "--checks 'nosuch:f': cannot import 'nosuch'"),
        ({"--reward-fn": "plug:missing"}, "'plug' has no function 'missing'"),
        ({"--reward-fn": "plug"}, "expected MODULE:FUNCTION"),
        ({"--reward-fn": "plug:raises"}, "--reward-fn 'raises' raised RuntimeError: my bug"),
        ({"--reward-fn": "plug:short"}, "returned 1 values for 8 responses"),
        ({"--checks": "plug:checks_short", "--eval-every": "1", "--eval-prompts": "4"},
         "checks 'checks_short': 'a' has 1 values for 4 responses"),
        ({"--prompt-column": "question", "--prompts": str(plain)}, "no column 'question'"),
    ]  # fmt: skip
    for i, (over, message) in enumerate(cases):
        run = tmp_path / f"run{i}"
        rc = main(_ppo_args(pipeline, run, **over))
        _one_line_error(capsys, rc, message)
        if i < 3:  # does not import: refused before the run folder exists
            assert not run.exists()
    # a dataset whose columns do not hold the named one
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a", "b"]}).to_parquet(str(tmp_path / "p.parquet"))
    capsys.readouterr()  # the datasets library's own progress bar, writing the file
    rc = main(_ppo_args(pipeline, tmp_path / "runp", **{"--prompts": str(tmp_path / "p.parquet")}))
    _one_line_error(capsys, rc, "no column 'prompt'", "['text']", "--prompt-column")


def test_chat_demonstrations_without_an_assistant_turn(tmp_path, capsys):
    f = _jsonl(tmp_path / "d.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n')
    rc = main(["rlhf", "sft", "--data", str(f), "--run-dir", str(tmp_path / "sft"),
               "--no-progress"])  # fmt: skip
    _one_line_error(capsys, rc, f"{f}:1: no assistant turn at the end of 'messages'")
    assert not (tmp_path / "sft").exists()
    f = _jsonl(tmp_path / "p.jsonl", (json.dumps({
        "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
        "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}],
    }) + "\n").encode())  # fmt: skip
    rc = main(["rlhf", "dpo", "--data", str(f), "--sft-model", str(tmp_path / "nosuch"),
               "--run-dir", str(tmp_path / "dpo"), "--no-progress"])  # fmt: skip
    assert rc == 2
    capsys.readouterr()


def test_threads_flag(pipeline, tmp_path, capsys, monkeypatch):
    rc = main(_ppo_args(pipeline, tmp_path / "run", **{"--threads": "0"}))
    _one_line_error(capsys, rc, "--threads must be >= 1, got 0")
    assert not (tmp_path / "run").exists()
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    assert main(_ppo_args(pipeline, tmp_path / "run1", **{"--threads": "1"})) == 0
    assert seen == [1]
    capsys.readouterr()
