"""The command line end to end at tiny size, and its one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cliprail.cli import main

TINY = ["--num-envs", "2", "--num-steps", "64", "--minibatch-size", "64", "--epochs", "2",
        "--no-progress", "--no-tensorboard"]  # fmt: skip


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_eval_resume_end_to_end(tmp_path, capsys):
    rd = str(tmp_path / "run")
    code, _, err = run(["rl", "train", "--env-id", "CartPole-v1", "--total-steps", "256",
                        "--run-dir", rd, "--checkpoint-every", "1", *TINY], capsys)  # fmt: skip
    assert code == 0, err
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoints"} <= files
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "update_0000002"
    code, out, err = run(["rl", "eval", "--run-dir", rd, "--episodes", "3", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["episodes"] == 3 and res["global_step"] == 256 and res["mean_return"] > 0
    code, _, err = run(["rl", "train", "--env-id", "CartPole-v1", "--total-steps", "512",
                        "--run-dir", rd, "--resume", *TINY], capsys)  # fmt: skip
    assert code == 0, err
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [128, 256, 384, 512]
    code, out, _ = run(["rl", "eval", "--run-dir", rd, "--episodes", "2"], capsys)
    assert code == 0 and "mean return" in out and "512 training steps" in out


def test_mujoco_preset_and_overrides_in_config(tmp_path, capsys):
    rd = tmp_path / "m"
    code, _, err = run(["rl", "train", "--preset", "mujoco", "--env-id", "Pendulum-v1",
                        "--total-steps", "128", "--num-steps", "128", "--run-dir", str(rd),
                        "--no-progress", "--no-tensorboard"], capsys)  # fmt: skip
    assert code == 0, err
    cfg = json.loads((rd / "config.json").read_text())
    assert cfg["preset"] == "mujoco" and cfg["num_steps"] == 128  # flag overrode the preset
    assert cfg["epochs"] == 10 and cfg["minibatch_size"] == 64 and cfg["normalize_obs"]
    code, out, _ = run(["rl", "eval", "--run-dir", str(rd), "--episodes", "1", "--json"], capsys)
    assert code == 0 and json.loads(out)["mean_length"] == 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--env-id", "NoSuchEnv-v9"], "unknown environment id 'NoSuchEnv-v9'"),
        (
            ["--env-id", "cliprail-test/MultiBinary-v0"],
            "action space MultiBinary(3) is not supported",
        ),
        (["--clip-range", "0"], "--clip-range must be > 0"),
        (["--minibatch-size", "100"], "--minibatch-size 100 must divide the batch size"),
        (["--gamma", "1.5"], "--gamma must be in (0, 1]"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--total-steps", "0"], "--total-steps must be a positive integer"),
    ],
)
def test_bad_input_one_clear_line(tmp_path, capsys, args, message):
    rd = tmp_path / "bad"
    code, _, err = run(["rl", "train", "--run-dir", str(rd), *TINY, *args], capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("cliprail: error:")
    assert not rd.exists()  # nothing written


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    rd = tmp_path / "r"
    args = ["rl", "train", "--total-steps", "128", "--run-dir", str(rd), *TINY]
    assert run(args, capsys)[0] == 0
    before = (rd / "metrics.jsonl").read_bytes()
    code, _, err = run(args, capsys)
    assert code == 2 and "already holds a run" in err
    assert (rd / "metrics.jsonl").read_bytes() == before
    code, _, err = run([*args, "--resume", "--learning-rate", "0.5"], capsys)
    assert code == 2 and "learning_rate (saved 0.001, given 0.5)" in err


def test_eval_errors(tmp_path, capsys):
    code, _, err = run(["rl", "eval", "--run-dir", str(tmp_path / "none")], capsys)
    assert code == 2 and "not a run folder" in err
    rd = tmp_path / "r"
    assert run(["rl", "train", "--total-steps", "128", "--run-dir", str(rd), *TINY], capsys)[0] == 0
    ckpt = rd / "checkpoints" / "update_0000001" / "model.safetensors"
    ckpt.write_bytes(b"garbage" + ckpt.read_bytes()[7:])
    code, _, err = run(["rl", "eval", "--run-dir", str(rd)], capsys)
    assert code == 2 and "no valid checkpoint" in err and "corrupt" in err
    (rd / "config.json").write_text("{not json")
    code, _, err = run(["rl", "eval", "--run-dir", str(rd)], capsys)
    assert code == 2 and "config.json: not valid JSON" in err


def test_unknown_command_and_help(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "rl train" in capsys.readouterr().out


def test_console_script_help_lists_every_flag():
    out = subprocess.run([sys.executable, "-m", "cliprail", "rl", "train", "--help"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    for flag in ["--env-id", "--preset", "--total-steps", "--seed", "--run-dir", "--resume",
                 "--clip-range", "--target-kl", "--normalize-obs", "--objective"]:  # fmt: skip
        assert flag in out


@pytest.mark.parametrize("torchrun", [False, True])
def test_a_torchrun_worker_exits_with_its_code_and_skips_teardown(torchrun):
    # Under torchrun, `python -m cliprail` leaves with os._exit once main has returned: the
    # interpreter's teardown of torch.distributed could abort a finished run (SIGABRT). The exit
    # code and the output are main's; only the teardown (here an atexit hook) is skipped.
    code = ("import atexit, runpy, sys; atexit.register(lambda: print('teardown')); "
            "sys.argv = ['cliprail', 'no-such-command']; "
            "runpy.run_module('cliprail', run_name='__main__')")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    if torchrun:
        env["TORCHELASTIC_RUN_ID"] = "test"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)  # fmt: skip
    assert p.returncode == 2
    assert "unknown command 'no-such-command'" in p.stderr
    assert ("teardown" in p.stdout) is not torchrun
