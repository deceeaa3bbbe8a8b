"""Exact resume of ``cliprail rl train``: env snapshots, SIGKILL anywhere, SIGINT and SIGTERM.

Three tiers: env snapshots round-trip step for step (classic control, MuJoCo when installed,
through safetensors and JSON as in a checkpoint); the trainer crashed in-process and resumed
(Pendulum with observation and reward normalisation; the fallback for an env without a rule);
and the real command in subprocesses, SIGKILLed at chosen points (after an update between
checkpoints, halfway through writing a checkpoint, right after one), at a random moment from
outside, and stopped by SIGTERM and SIGINT, each chain ending bitwise equal to one straight run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load, load_file, save

import cliprail.resume as resume_module
from cliprail.rl.config import preset_config
from cliprail.rl.envs import make_vector_env
from cliprail.rl.envstate import EnvSnapshot, SnapshotError, capture, layers, restore
from cliprail.rl.trainer import RLTrainer

HAS_MUJOCO = importlib.util.find_spec("mujoco") is not None
HAS_ALE = importlib.util.find_spec("ale_py") is not None


# --- env snapshots, step for step ------------------------------------------------------------
def _vector(env_id: str, num_envs: int = 2):
    return make_vector_env(preset_config("classic", env_id=env_id, num_envs=num_envs))


def _through_checkpoint(snap: EnvSnapshot) -> EnvSnapshot:
    """What a checkpoint does to a snapshot: safetensors bytes, JSON text, rank-1 names."""
    tensors, meta = snap.to_checkpoint()
    return EnvSnapshot.from_checkpoint(load(save(tensors)), json.loads(json.dumps(meta)))


def _trajectory(envs, actions) -> list[tuple]:
    """Everything a step returns that the trainer reads, copied (the episode's wall-clock
    ``t`` left out)."""
    out = []
    for a in actions:
        obs, rewards, terminated, truncated, info = envs.step(a)
        finals = [None if x is None else np.copy(x) for x in info.get("final_obs", [])]
        episode = info.get("final_info", {}).get("episode", {})
        out.append((obs.copy(), rewards.copy(), terminated.copy(), truncated.copy(), finals,
                    {k: np.copy(v) for k, v in episode.items() if k != "t"}))  # fmt: skip
    return out


def _assert_same(a: list[tuple], b: list[tuple]) -> None:
    for t, (x, y) in enumerate(zip(a, b, strict=True)):
        for i in range(4):
            assert np.array_equal(x[i], y[i]), f"step {t}, field {i}"
        assert len(x[4]) == len(y[4]), f"step {t}: final_obs"
        for p, q in zip(x[4], y[4], strict=True):
            assert (p is None and q is None) or np.array_equal(p, q), f"step {t}: final_obs"
        assert x[5].keys() == y[5].keys(), f"step {t}: episode keys"
        assert all(np.array_equal(x[5][k], y[5][k]) for k in x[5]), f"step {t}: episode"


NO_MUJOCO = pytest.mark.skipif(not HAS_MUJOCO, reason="mujoco is not installed")
# (env id, steps after the snapshot): classic control runs past its time limit, so autoresets
# (which draw from the restored np_random) happen; Hopper falls within 300 steps; Ant reads
# the torso's position *before* each step (MjData's stale kinematics) and rarely ends.
ROUND_TRIP_ENVS = [
    ("CartPole-v1", 510),
    ("Pendulum-v1", 210),
    ("Acrobot-v1", 510),
    ("MountainCarContinuous-v0", 1009),
    pytest.param("Hopper-v5", 300, marks=NO_MUJOCO),
    pytest.param("Ant-v5", 150, marks=NO_MUJOCO),
]


@pytest.mark.parametrize(("env_id", "n_steps"), ROUND_TRIP_ENVS)
def test_snapshot_round_trip_step_for_step(env_id, n_steps):
    a = _vector(env_id)
    a.action_space.seed(0)
    obs, _ = a.reset(seed=3)
    steps = 0
    # mid-episode in every env: TimeLimit has counted steps since the last reset
    while steps < 37 or any(layers(e)[1]._elapsed_steps == 0 for e in a.envs):
        obs, *_ = a.step(a.action_space.sample())
        steps += 1
    snap = _through_checkpoint(capture(a, obs))
    actions = [a.action_space.sample() for _ in range(n_steps)]
    b = _vector(env_id)
    b.reset(seed=12345)  # another start: only the restore can make b continue a
    assert np.array_equal(restore(b, snap), obs)
    ta, tb = _trajectory(a, actions), _trajectory(b, actions)
    assert env_id == "Ant-v5" or any(x[2].any() or x[3].any() for x in ta)  # episodes ended
    _assert_same(ta, tb)
    a.close()
    b.close()


def test_gymnasium_sync_vector_env_next_step_round_trip():
    # Gymnasium's SyncVectorEnv carries which envs reset on their next step (NEXT_STEP mode).
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode

    def make():
        fns = [lambda: gym.wrappers.RecordEpisodeStatistics(gym.make("CartPole-v1"))] * 2
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=AutoresetMode.NEXT_STEP)

    a, b = make(), make()
    a.action_space.seed(1)
    obs, _ = a.reset(seed=5)
    while not a._autoreset_envs.any():  # snapshot where an env resets on its next step
        obs, *_ = a.step(a.action_space.sample())
    snap = _through_checkpoint(capture(a, obs))
    actions = [a.action_space.sample() for _ in range(200)]
    b.reset(seed=6)
    restore(b, snap)
    _assert_same(_trajectory(a, actions), _trajectory(b, actions))


def test_unknown_state_is_refused_not_guessed():
    envs = _vector("CartPole-v1")
    obs, _ = envs.reset(seed=0)
    envs.envs[1].unwrapped.wind = 0.3  # state no rule names
    with pytest.raises(SnapshotError, match=r"CartPoleEnv has attributes .* wind"):
        capture(envs, obs)
    counter = _vector("cliprail-test/Counter-v0")  # tests/conftest.py: a class without a rule
    obs, _ = counter.reset(seed=0)
    with pytest.raises(SnapshotError, match="CounterEnv: cliprail has no rule"):
        capture(counter, obs)


def test_restore_checks_everything_before_writing():
    cart = _vector("CartPole-v1")
    obs, _ = cart.reset(seed=0)
    snap = capture(cart, obs)
    three = _vector("CartPole-v1", num_envs=3)
    three.reset(seed=0)
    with pytest.raises(SnapshotError, match="saved 2 envs, this run has 3"):
        restore(three, snap)
    pend = _vector("Pendulum-v1")
    pend.reset(seed=0)
    before = [e.unwrapped.state.copy() for e in pend.envs]
    bad = EnvSnapshot(snap.meta, {**snap.arrays, "obs": np.zeros((2, 3), np.float32)})
    with pytest.raises(SnapshotError, match="saved wrappers"):
        restore(pend, bad)
    assert all(np.array_equal(e.unwrapped.state, s) for e, s in zip(pend.envs, before, strict=True))
    broken = json.loads(json.dumps(snap.meta))  # a hand-edited state.json
    del broken["envs"][1][2]["state"]
    with pytest.raises(SnapshotError, match="malformed"):
        restore(cart, EnvSnapshot(broken, snap.arrays))


@pytest.mark.skipif(not HAS_ALE, reason="ale-py is not installed")
def test_atari_names_the_emulator_as_the_reason():
    envs = make_vector_env(preset_config("atari", env_id="ALE/Pong-v5", num_envs=1))
    obs, _ = envs.reset(seed=0)
    with pytest.raises(SnapshotError, match="AtariEnv: the ALE emulator state"):
        capture(envs, obs)
    envs.close()


# --- the trainer, crashed in-process and resumed ---------------------------------------------
class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after the fault point runs (a BaseException, so no
    ``except Exception`` on the way catches it)."""


def _crash_after_update(monkeypatch, n: int) -> None:
    calls = {"n": 0}

    def fault_point(name: str) -> None:
        if name == "rl-update":
            calls["n"] += 1
            if calls["n"] == n:
                raise _Killed

    monkeypatch.setattr(resume_module, "fault_point", fault_point)


def _metrics(run: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("steps_per_s")  # wall clock
    return recs


def test_pendulum_with_normalisation_resumes_exactly(tmp_path, monkeypatch):
    kw = dict(env_id="Pendulum-v1", num_envs=2, num_steps=64, minibatch_size=64, epochs=2,
              total_steps=1024, checkpoint_every=2, progress=False, tensorboard=False)  # fmt: skip
    straight = RLTrainer(preset_config("mujoco", run_dir=tmp_path / "a", **kw))
    assert straight.obs_norm is not None and straight.reward_scaler is not None
    straight.train()
    _crash_after_update(monkeypatch, 5)  # after update 5; the checkpoint holds update 4
    with pytest.raises(_Killed):
        RLTrainer(preset_config("mujoco", run_dir=tmp_path / "b", **kw)).train()
    monkeypatch.undo()
    resumed = RLTrainer(preset_config("mujoco", run_dir=tmp_path / "b", resume=True, **kw))
    resumed.train()
    assert torch.equal(straight.flat_params, resumed.flat_params)
    for key in ("mean", "var", "count"):
        assert np.array_equal(straight.obs_norm.rms.state()[key], resumed.obs_norm.rms.state()[key])
    assert np.array_equal(straight.reward_scaler.returns, resumed.reward_scaler.returns)
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    state = json.loads((tmp_path / "b/checkpoints/update_0000008/state.json").read_text())
    assert state["envs_exact"] is True and state["envs_reason"] is None


def test_env_without_rule_falls_back_with_one_warning(tmp_path, monkeypatch, capsys):
    kw = dict(env_id="cliprail-test/Counter-v0", num_envs=2, num_steps=8, minibatch_size=16,
              epochs=1, total_steps=64, checkpoint_every=2, progress=False, tensorboard=False,
              run_dir=tmp_path / "run")  # fmt: skip
    _crash_after_update(monkeypatch, 3)
    with pytest.raises(_Killed):
        RLTrainer(preset_config("classic", **kw)).train()
    monkeypatch.undo()
    state = json.loads((tmp_path / "run/checkpoints/update_0000002/state.json").read_text())
    assert state["envs_exact"] is False and "CounterEnv" in state["envs_reason"]
    assert not (tmp_path / "run/checkpoints/update_0000002/envs.safetensors").exists()
    capsys.readouterr()
    resumed = RLTrainer(preset_config("classic", resume=True, **kw))
    resumed.train()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "CounterEnv" in warnings[0] and "will not match a straight run bitwise" in warnings[0]
    assert resumed.update_idx == 4
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [16, 32, 48, 64]


# --- the command, killed and stopped in subprocesses -----------------------------------------
UPDATES, BATCH = 40, 256  # 2 envs x 128 steps; ~0.1 s an update here (40: room for three stops)
ARGS = ["rl", "train", "--env-id", "CartPole-v1", "--num-envs", "2", "--num-steps", "128",
        "--minibatch-size", "128", "--epochs", "2", "--total-steps", str(UPDATES * BATCH),
        "--checkpoint-every", "2", "--seed", "7", "--no-progress", "--no-tensorboard"]  # fmt: skip
TIMEOUT = 300


def _cmd(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cliprail", *ARGS, "--run-dir", str(run), *extra]


def _env(kill_at: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CLIPRAIL_KILL_AT"}
    env["OMP_NUM_THREADS"] = "1"
    if kill_at is not None:
        env["CLIPRAIL_KILL_AT"] = kill_at
    return env


def _run(run: Path, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(run, *extra), env=_env(kill_at), capture_output=True, text=True,
                          timeout=TIMEOUT)  # fmt: skip


def _start(run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(_cmd(run, *extra), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _latest(run: Path) -> int:
    return int((run / "checkpoints" / "latest").read_text().strip().removeprefix("update_"))


def _wait_for_checkpoint(run: Path, p: subprocess.Popen, after: int = 0) -> int:
    """Wait until ``latest`` names a checkpoint newer than update ``after``; returns it."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            if _latest(run) > after:
                return _latest(run)
        except (FileNotFoundError, ValueError):  # not written yet, or being replaced
            pass
        assert p.poll() is None, f"the run ended before a checkpoint: {p.communicate()[1]}"
        time.sleep(0.02)
    raise AssertionError("no checkpoint in time")


def _killed(p: subprocess.CompletedProcess | subprocess.Popen) -> bool:
    return p.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The reference: the same command run straight through."""
    run = tmp_path_factory.mktemp("straight") / "run"
    p = _run(run)
    assert p.returncode == 0, p.stderr
    return run


def _assert_same_end(run: Path, ref: Path) -> None:
    """Bitwise the same final checkpoint (weights, Adam state, RNGs, envs) and the same metrics,
    each step once; only wall-clock values may differ."""
    assert _latest(run) == _latest(ref) == UPDATES
    a, b = (r / "checkpoints" / f"update_{UPDATES:07d}" for r in (run, ref))
    groups = sorted(f.name for f in b.glob("*.safetensors"))
    assert sorted(f.name for f in a.glob("*.safetensors")) == groups
    assert "envs.safetensors" in groups  # the env state was saved
    for group in groups:
        ta, tb = load_file(a / group), load_file(b / group)
        assert ta.keys() == tb.keys(), group
        for k in tb:
            if "time_queue" not in k:  # episode durations: wall clock
                assert torch.equal(ta[k], tb[k]), f"{group}: {k}"
    oa, ob = (torch.load(c / "optimizer.pt", weights_only=True) for c in (a, b))
    assert oa["param_groups"] == ob["param_groups"]
    for pid, st in ob["state"].items():
        assert all(torch.equal(oa["state"][pid][k], v) for k, v in st.items())
    sa, sb = (json.loads((c / "state.json").read_text()) for c in (a, b))
    assert sa.pop("envs") is not None and sb.pop("envs") is not None  # holds wall clock
    assert sa.pop("wall_s") > 0 and sb.pop("wall_s") > 0  # the run's wall time so far
    assert sa == sb and sa["envs_exact"] is True
    ma, mb = _metrics(run), _metrics(ref)
    assert [m["step"] for m in ma] == [BATCH * i for i in range(1, UPDATES + 1)]
    assert ma == mb


def test_sigkill_at_chosen_points_resumes_bitwise(straight, tmp_path):
    rng = random.Random(20240611)
    run = tmp_path / "run"
    files = len([f for f in (straight / "checkpoints" / f"update_{UPDATES:07d}").iterdir()
                 if f.name != "manifest.json"])  # fmt: skip
    # 1. after an update between two checkpoints: that update is done again after --resume
    u = rng.randrange(3, 18, 2)
    p = _run(run, kill_at=f"rl-update:{u}")
    assert _killed(p), p.stderr
    assert _latest(run) == u - 1
    # 2. halfway through writing one of the next process's first two checkpoints (u+1, u+3)
    n = rng.randrange(1, 2 * files + 1)
    p = _run(run, "--resume", kill_at=f"checkpoint-file:{n}")
    assert _killed(p), p.stderr
    assert _latest(run) == (u - 1 if n <= files else u + 1)
    assert any(d.name.startswith(".update_") for d in (run / "checkpoints").iterdir())
    # 3. right after a checkpoint (even update e): nothing is done twice
    c = _latest(run)
    e = rng.randrange(c + 2, UPDATES - 1, 2)
    p = _run(run, "--resume", kill_at=f"rl-update:{e - c}")
    assert _killed(p), p.stderr
    assert _latest(run) == e
    p = _run(run, "--resume")
    assert p.returncode == 0, p.stderr
    _assert_same_end(run, straight)


def _stop_line(err: str, name: str, run: Path) -> None:
    """One line names the signal, the saved checkpoint and --resume; no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "--resume" in line]
    assert len(lines) == 1, err
    m = re.fullmatch(
        rf"cliprail: stopped by {name} after update (\d+) of {UPDATES}; checkpoint saved to "
        r"(\S+); run the same command with --resume to continue",
        lines[0],
    )
    assert m, lines[0]
    assert Path(m[2]) == run / "checkpoints" / f"update_{int(m[1]):07d}"
    assert _latest(run) == int(m[1])


def test_sigterm_sigkill_at_a_random_moment_and_sigint_then_resume_bitwise(straight, tmp_path):
    run = tmp_path / "run"
    # SIGTERM once the first checkpoint exists: save, one line, exit code 143
    p = _start(run)
    _wait_for_checkpoint(run, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 143, err
    _stop_line(err, "SIGTERM", run)
    # SIGKILL from outside at a random moment after the resumed run's first checkpoint
    p = _start(run, "--resume")
    _wait_for_checkpoint(run, p, after=_latest(run))
    time.sleep(random.Random(7).uniform(0.0, 1.0))
    assert p.poll() is None, "the run finished before the kill: make it longer"
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=TIMEOUT)
    assert _killed(p)
    # SIGINT once the next resumed run has written a checkpoint: exit code 130
    p = _start(run, "--resume")
    _wait_for_checkpoint(run, p, after=_latest(run))
    # a signal during the last update is not a stop (a finished run just finishes): on a loaded
    # machine 24 updates left too little room here (session 7)
    assert _latest(run) < UPDATES, "the run finished before the SIGINT: make it longer"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 130, err
    _stop_line(err, "SIGINT", run)
    done = _run(run, "--resume")
    assert done.returncode == 0, done.stderr
    _assert_same_end(run, straight)
