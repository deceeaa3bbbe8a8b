"""The Gymnasium trainer: truncation bootstrapping, the old-policy anchor, determinism, resume."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from cliprail.rl.config import preset_config
from cliprail.rl.trainer import RLTrainer


def _cfg(tmp_path, name="run", **kw):
    base = dict(progress=False, tensorboard=False, run_dir=tmp_path / name)
    return preset_config(kw.pop("preset", "classic"), **{**base, **kw})


def test_truncation_bootstraps_from_the_final_observation(tmp_path):
    # Counter env: obs = [t]; TimeLimit truncates at t = 5, then the env resets to [0].
    cfg = _cfg(tmp_path, env_id="cliprail-test/Counter-v0", num_envs=2, num_steps=12,
               minibatch_size=8, total_steps=24)  # fmt: skip
    tr = RLTrainer(cfg)
    obs, _ = tr.envs.reset(seed=0)
    ro, _, episodes = tr.collect(obs)
    trunc = ro.truncated[:, 0]
    assert trunc.nonzero().flatten().tolist() == [4, 9]
    assert not ro.terminated.any()
    with torch.no_grad():
        v_final = tr.agent.value(torch.tensor([[5.0]]))  # V(final obs [5])
        v_reset = tr.agent.value(torch.tensor([[0.0]]))  # V(reset obs [0])
    torch.testing.assert_close(ro.next_values[4, 0], v_final[0])
    torch.testing.assert_close(ro.values[5, 0], v_reset[0])
    # inside an episode the next value is the next row's value
    torch.testing.assert_close(ro.next_values[2, 0], ro.values[3, 0])
    assert [length for _, length in episodes] == [5, 5, 5, 5]
    assert all(ret == 5.0 for ret, _ in episodes)
    tr.envs.close()


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1", "cliprail-test/MultiDiscrete-v0"])
def test_ratio_is_one_before_the_first_step(tmp_path, env_id):
    # The stored log-probs come from the same computation as the training forward pass.
    cfg = _cfg(tmp_path, env_id=env_id, num_envs=2, num_steps=64, minibatch_size=32,
               total_steps=128)  # fmt: skip
    tr = RLTrainer(cfg)
    obs, _ = tr.envs.reset(seed=0)
    ro, _, _ = tr.collect(obs)
    flat_obs = ro.obs.reshape(-1, *tr.spec.obs_shape)
    flat_act = ro.actions.reshape(-1, ro.actions.shape[-1])
    idx = torch.randperm(128)[:32]
    logp, _, values = tr.agent.evaluate(flat_obs[idx], flat_act[idx])
    ratio = torch.exp(logp - ro.logprobs.reshape(-1)[idx])
    torch.testing.assert_close(ratio, torch.ones(32), atol=1e-6, rtol=0)
    torch.testing.assert_close(values, ro.values.reshape(-1)[idx], atol=1e-6, rtol=0)
    tr.envs.close()


def test_first_update_starts_with_zero_clip_fraction(tmp_path):
    cfg = _cfg(tmp_path, num_envs=2, num_steps=64, minibatch_size=128, epochs=1,
               total_steps=128)  # fmt: skip
    tr = RLTrainer(cfg)
    obs, _ = tr.envs.reset(seed=0)
    ro, _, _ = tr.collect(obs)
    stats = tr.update(ro, clip=0.2)  # one epoch of one minibatch: its stats are pre-step
    assert stats["clip_fraction"] == 0.0
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-9)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    tr.envs.close()


def _params(tr):
    return {k: v.clone() for k, v in tr.agent.state_dict().items()}


@pytest.mark.parametrize(
    ("env_id", "preset"), [("CartPole-v1", "classic"), ("Pendulum-v1", "mujoco")]
)
def test_same_seed_same_parameters(tmp_path, env_id, preset):
    kw = dict(env_id=env_id, preset=preset, num_steps=128, minibatch_size=64, epochs=2,
              total_steps=512)  # fmt: skip
    a = RLTrainer(_cfg(tmp_path, "a", **kw))
    a.train()
    b = RLTrainer(_cfg(tmp_path, "b", **kw))
    b.train()
    pa, pb = _params(a), _params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    c = RLTrainer(_cfg(tmp_path, "c", seed=2, **kw))
    c.train()
    assert not all(torch.equal(pa[k], _params(c)[k]) for k in pa)


def test_resume_continues_from_checkpoint(tmp_path, capsys):
    kw = dict(env_id="Pendulum-v1", preset="mujoco", num_steps=128, minibatch_size=64,
              epochs=2, checkpoint_every=2)  # fmt: skip
    first = RLTrainer(_cfg(tmp_path, total_steps=512, **kw))
    first.train()
    assert first.update_idx == 4
    saved = _params(first)
    resumed = RLTrainer(_cfg(tmp_path, total_steps=1024, resume=True, **kw))
    resumed.load(resumed.run_dir / "checkpoints" / "update_0000004")
    assert all(torch.equal(saved[k], v) for k, v in resumed.agent.state_dict().items())
    np.testing.assert_array_equal(resumed.obs_norm.rms.mean, first.obs_norm.rms.mean)
    resumed = RLTrainer(_cfg(tmp_path, total_steps=1024, resume=True, **kw))
    resumed.train()
    assert resumed.update_idx == 8 and resumed.global_step == 1024
    assert "warning" not in capsys.readouterr().err  # the envs continued, not restarted
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in lines]
    assert steps == [128 * i for i in range(1, 9)]  # every step exactly once


def test_dual_clip_and_clip_higher_reach_the_update(tmp_path):
    """Issue 16 in the Gymnasium trainer: --dual-clip and --clip-range-high change the update
    and are logged; the defaults stay the paper's (the same parameters as before)."""
    kw = dict(num_envs=2, num_steps=64, minibatch_size=64, epochs=4, total_steps=128)
    runs = {}
    for name, extra in (("paper", {}), ("dual", {"dual_clip": 1.5, "clip_range_high": 0.05})):
        tr = RLTrainer(_cfg(tmp_path, name, clip_range=0.02, anneal_clip=False, **kw, **extra))
        obs, _ = tr.envs.reset(seed=0)
        ro, _, _ = tr.collect(obs)
        stats = tr.update(ro, clip=0.02)
        runs[name] = (stats, _params(tr))
        tr.envs.close()
    assert "dual_clip_fraction" not in runs["paper"][0]
    assert runs["dual"][0]["dual_clip_fraction"] >= 0.0
    pa, pb = runs["paper"][1], runs["dual"][1]
    assert not all(torch.equal(pa[k], pb[k]) for k in pa)  # a wider upper clip moves it more


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"dual_clip": 1.0}, "--dual-clip must be > 1"),
        ({"clip_range_high": -0.1}, "--clip-range-high must be > 0"),
        ({"dual_clip": 3.0, "objective": "kl_fixed"}, "--objective is kl_fixed"),
    ],
)
def test_clip_options_are_checked(tmp_path, kw, message):
    from cliprail.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        RLTrainer(_cfg(tmp_path, **kw))


def _train_params(tmp_path, name, **kw):
    tr = RLTrainer(_cfg(tmp_path, name, num_envs=2, num_steps=64, minibatch_size=32, epochs=2,
                        total_steps=256, **kw))  # fmt: skip
    tr.train()
    return _params(tr)


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++")),
    reason="torch.compile's CPU backend needs a C++ compiler (the fallback is tested below)",
)
def test_compile_matches_eager_to_float_rounding(tmp_path, capsys):
    """Issue 17: --compile runs the same maths (clip annealed over 2 updates, a tensor input,
    no recompile) and ends within float rounding of the eager run."""
    from torch._dynamo.utils import counters

    eager = _train_params(tmp_path, "eager")
    counters.clear()
    compiled = _train_params(tmp_path, "compiled", compile=True)
    assert "--compile" not in capsys.readouterr().err  # it compiled, no fallback
    assert counters["stats"]["unique_graphs"] == 1  # the annealed clip did not recompile
    worst = max(float((eager[k] - compiled[k]).abs().max()) for k in eager)
    assert worst < 1e-4, worst
    assert any(not torch.equal(eager[k], v) for k, v in _params_start(tmp_path).items())


def _params_start(tmp_path):
    tr = RLTrainer(_cfg(tmp_path, "start", num_envs=2, num_steps=64, minibatch_size=32))
    tr.envs.close()
    return _params(tr)


def test_compile_falls_back_to_eager_when_it_fails(tmp_path, monkeypatch, capsys):
    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("InductorError: no working C++ compiler\nmore lines")

        return call

    eager = _train_params(tmp_path, "eager")
    monkeypatch.setattr(torch, "compile", broken)
    fallback = _train_params(tmp_path, "fallback", compile=True)
    err = capsys.readouterr().err
    assert err.count("--compile: torch.compile failed (RuntimeError: InductorError") == 1
    assert "training continues eagerly" in err
    assert all(torch.equal(eager[k], fallback[k]) for k in eager)  # eager from the first step
