"""Exact resume of every RLHF stage: a run stopped (SIGKILL at chosen points, SIGKILL halfway
through writing a checkpoint, SIGTERM, SIGINT) and resumed with --resume ends bitwise equal to
the same run straight through, and metrics.jsonl holds each record exactly once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cliprail.checkpoint import latest_checkpoint
from cliprail.cli import main

TIMING = {"episodes_per_s", "wall_s"}  # wall-clock fields, the only ones allowed to differ


def _args(stage: str, pipe: Path, run: Path) -> list[str]:
    data, sft, rm = pipe / "data", pipe / "sft" / "model", pipe / "rm" / "model"
    common = ["--run-dir", str(run), "--no-progress", "--checkpoint-every", "2"]
    if stage == "sft":  # 96 demonstrations / 16 = 6 steps an epoch, 12 steps
        return ["rlhf", "sft", "--data", str(data / "demonstrations.jsonl"), "--epochs", "2",
                "--n-embd", "32", "--n-head", "2", "--vocab-size", "400", "--extra-tokens",
                str(data / "tokens.json"), *common]  # fmt: skip
    if stage == "reward":  # 87 training pairs / 16 = 6 steps an epoch, 12 steps
        return ["rlhf", "reward", "--data", str(data / "preferences.jsonl"), "--sft-model",
                str(sft), "--epochs", "2", "--batch-size", "16", "--demonstrations",
                str(data / "demonstrations.jsonl"), *common]  # fmt: skip
    if stage == "dpo":  # 87 pairs / 32 = 3 steps an epoch, 6 steps, an evaluation per epoch
        return ["rlhf", "dpo", "--data", str(data / "preferences.jsonl"), "--sft-model",
                str(sft), "--epochs", "2", "--prompts", str(data / "prompts.jsonl"),
                "--reward-model", str(rm), "--eval-prompts", "4", *common]  # fmt: skip
    assert stage == "ppo"  # 10 updates, the fuse every 3 (not aligned with the checkpoints)
    return ["rlhf", "ppo", "--prompts", str(data / "prompts.jsonl"), "--sft-model", str(sft),
            "--reward-model", str(rm), "--total-episodes", "40", "--batch-size", "4",
            "--minibatch-size", "2", "--epochs", "2", "--max-new-tokens", "6",
            "--eval-every", "3", "--eval-prompts", "4", "--adaptive-kl", *common]  # fmt: skip


def _subprocess(args: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.pop("CLIPRAIL_KILL_AT", None)
    if kill_at:
        env["CLIPRAIL_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "cliprail", *args], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def _records(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _final_tensors(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the last checkpoint (models and RNGs) and of the saved model folders."""
    out = {}
    ckpt = latest_checkpoint(run / "checkpoints")
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update({f"ckpt/{f.stem}/{k}": v for k, v in load_file(f).items()})
    for folder in ("model", "policy", "best"):
        for f in sorted((run / folder).glob("*.safetensors")):
            out.update({f"{folder}/{k}": v for k, v in load_file(f).items()})
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    ta, tb = _final_tensors(a), _final_tensors(b)
    assert ta.keys() == tb.keys() and ta
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert _records(a) == _records(b)
    for name in ("fuse.json", "dpo_metrics.json", "reward_metrics.json"):
        if (a / name).is_file():
            ja, jb = (json.loads((r / name).read_text()) for r in (a, b))
            for j in (ja, jb):  # wall time and the run's own path may differ
                j.pop("wall_s", None), j.pop("best_checkpoint", None)
            assert ja == jb, name


def _in_process(args: list[str]) -> None:
    """Run to the end in this process, one thread like the subprocesses (so the same floats)."""
    torch.set_num_threads(1)
    assert main(args) == 0


@pytest.fixture(scope="module")
def straight(pipeline, tmp_path_factory):
    """Each stage straight through."""
    root = tmp_path_factory.mktemp("straight")
    runs = {}
    for stage in ("sft", "reward", "dpo", "ppo"):
        runs[stage] = root / stage
        _in_process(_args(stage, pipeline, runs[stage]))
    return runs


# Several kill points in one resumed chain: mid-interval, halfway through writing a checkpoint
# file, right after a checkpoint. The step points are drawn from a seeded RNG over the run.
def _kill_chain(stage: str, n_steps: int) -> list[str]:
    r = random.Random(f"kill-{stage}")
    first = r.choice([k for k in range(3, n_steps // 2 + 1) if k % 2])  # after a checkpoint
    return [f"rlhf-step:{first}", f"checkpoint-file:{r.randint(1, 4)}", "rlhf-step:2"]


@pytest.mark.parametrize(("stage", "n_steps"), [("sft", 12), ("ppo", 10)])
def test_sigkill_chain_resumes_bitwise(pipeline, straight, tmp_path, stage, n_steps):
    run = tmp_path / stage
    args = _args(stage, pipeline, run)
    for i, point in enumerate(_kill_chain(stage, n_steps)):
        done = _subprocess(args + (["--resume"] if i else []), kill_at=point)
        assert done.returncode == -signal.SIGKILL, (point, done.stderr)
        latest_checkpoint(run / "checkpoints")  # a valid checkpoint survives every kill
    _in_process([*args, "--resume"])
    _assert_same_run(straight[stage], run)


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_sigkill_once_resumes_bitwise(pipeline, straight, tmp_path, stage):
    run = tmp_path / stage
    args = _args(stage, pipeline, run)
    k = 5 if stage == "dpo" else 7  # DPO: in the epoch after its first evaluation
    assert _subprocess(args, kill_at=f"rlhf-step:{k}").returncode == -signal.SIGKILL
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{k - 1:08d}"
    _in_process([*args, "--resume"])
    _assert_same_run(straight[stage], run)


def test_sigterm_saves_then_resume_is_bitwise(pipeline, straight, tmp_path):
    """An external SIGTERM: the update finishes, a checkpoint is saved, exit 143, one line."""
    run = tmp_path / "ppo"
    args = _args("ppo", pipeline, run)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.pop("CLIPRAIL_KILL_AT", None)
    proc = subprocess.Popen([sys.executable, "-m", "cliprail", *args], env=env,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "latest").is_file():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(random.Random(5).uniform(0.0, 0.5))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # it finished before the signal landed: nothing to resume
        pytest.skip("the run ended before SIGTERM arrived")
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "stopped by SIGTERM after update" in lines[0]
    assert "--resume" in lines[0] and "Traceback" not in err
    _in_process([*args, "--resume"])
    _assert_same_run(straight["ppo"], run)


def test_sigint_in_process_stops_saves_and_resumes(pipeline, straight, tmp_path, monkeypatch,
                                                   capsys):  # fmt: skip
    """SIGINT at several steps of one SFT run, in this process: exit 130 each time with the
    checkpoint of that very step, and the resumed chain ends bitwise equal to the straight run."""
    import cliprail.resume as resume  # the one resume layer's step_end calls fault_point

    torch.set_num_threads(1)  # as in _in_process
    run = tmp_path / "sft"
    args = _args("sft", pipeline, run)
    # Ctrl-C at this process's 3rd, 4th, 1st step: it stops after the next one (steps 4, 9, 11;
    # 9 and 11 are not periodic checkpoints, so the save on stop is what resumes)
    for i, at in enumerate([3, 4, 1]):
        calls = {"n": 0}

        def press_ctrl_c(name: str, at: int = at, calls: dict = calls) -> None:
            calls["n"] += 1
            if calls["n"] == at:
                signal.raise_signal(signal.SIGINT)

        monkeypatch.setattr(resume, "fault_point", press_ctrl_c)
        assert main(args + (["--resume"] if i else [])) == 130
        err = capsys.readouterr().err
        assert "stopped by SIGINT after step" in err and "Traceback" not in err
    monkeypatch.undo()
    _in_process([*args, "--resume"])
    _assert_same_run(straight["sft"], run)


def test_resume_refuses_a_changed_config_or_a_finished_run(pipeline, straight, capsys):
    args = _args("sft", pipeline, straight["sft"])
    assert main([*args, "--resume"]) == 2
    assert "this run finished" in capsys.readouterr().err
    lr = [*args, "--resume", "--learning-rate", "0.5"]
    (straight["sft"] / "stage.json").rename(straight["sft"] / "stage.json.bak")
    try:
        assert main(lr) == 2
        assert "--resume with a config that differs" in capsys.readouterr().err
    finally:
        (straight["sft"] / "stage.json.bak").rename(straight["sft"] / "stage.json")


def test_crash_before_the_first_checkpoint_resumes_from_the_start(
    pipeline, straight, tmp_path, monkeypatch
):
    """A run that died before any checkpoint (an OOM kill, --checkpoint-every 0) is not stuck:
    --resume starts it over, metrics.jsonl cut back to nothing, and ends as the straight run."""
    import cliprail.resume as resume

    run = tmp_path / "dpo"
    args = _args("dpo", pipeline, run)
    no_ckpt = [*args[: args.index("--checkpoint-every")], "--checkpoint-every", "0"]

    def crash(name: str) -> None:
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(resume, "fault_point", crash)
    torch.set_num_threads(1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(no_ckpt)  # dies after step 1, after the step-0 evaluation was logged
    monkeypatch.undo()
    assert (run / "metrics.jsonl").read_text() and not (run / "checkpoints").exists()
    _in_process([*args, "--resume"])  # the saved --checkpoint-every may change on resume
    _assert_same_run(straight["dpo"], run)


def test_resume_accepts_a_run_saved_before_a_field_existed(tmp_path):
    """A config.json written before ``fsdp``/``device`` existed resumes with their defaults; a
    non-default value is still a changed config."""
    from cliprail.configio import config_to_dict
    from cliprail.errors import ConfigError
    from cliprail.rlhf.resume import begin_run
    from cliprail.rlhf.sft import SFTConfig

    run = tmp_path / "run"
    run.mkdir()
    cfg = SFTConfig(data=tmp_path / "d.jsonl", run_dir=run, resume=True)
    old = json.loads(json.dumps(config_to_dict(cfg)))
    del old["fsdp"], old["device"]
    (run / "config.json").write_text(json.dumps(old))
    begin_run(run, cfg)  # no error
    with pytest.raises(ConfigError, match="device"):
        begin_run(run, SFTConfig(data=tmp_path / "d.jsonl", run_dir=run, resume=True,
                                 device="cuda"))  # fmt: skip
