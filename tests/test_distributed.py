"""Data parallelism (torchrun, gloo on CPU, 2 processes): lockstep, equivalence, one writer.

Three tiers: the merge maths without any process group; two gloo processes started with
``torch.multiprocessing`` that drive the trainer directly (bitwise-identical parameters,
2 ranks x batch B == 1 process x batch 2B, agreed early stop and skips, rank 1 writes nothing);
and the real command under ``torchrun --standalone --nproc_per_node=2`` (run folder, resume with
the same world size, a different world size refused).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cliprail.cli import main
from cliprail.distributed import (
    init_process_group,
    local_moments,
    merge_moments,
    moments_mean_var,
    whiten_with,
)
from cliprail.errors import ConfigError
from cliprail.ppo import UpdateSync, masked_whiten, ppo_update
from cliprail.rl.config import preset_config
from cliprail.rl.normalize import RunningMeanStd, SyncedRunningMeanStd
from cliprail.rl.trainer import RLTrainer, Rollout

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)

# The 2-rank and 1-process updates see the same samples; they differ only in float summation
# order (two half-batch means averaged vs one mean; per-rank moments merged vs one variance),
# about 1e-7 relative per step, which Adam turns into at most lr x 1e-3 or so per parameter.
EQUIV_ATOL = 1e-5
T, N = 16, 2  # rollout horizon and envs *per rank* of the equivalence test
TINY = ["--env-id", "CartPole-v1", "--num-envs", "2", "--num-steps", "32", "--minibatch-size",
        "16", "--epochs", "2", "--checkpoint-every", "2", "--normalize-obs", "--normalize-reward",
        "--target-kl", "0.01", "--no-progress", "--no-tensorboard"]  # fmt: skip


# --- the merge maths, no process group ------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True])
def test_merged_moments_whiten_like_one_batch(masked):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, generator=g) * 3 + 1
    mask = torch.rand(96, generator=g) > 0.3 if masked else None
    shards = [slice(0, 40), slice(40, 96)]  # unequal shards: the merge weighs by count
    parts = torch.stack(
        [local_moments(x[s], None if mask is None else mask[s]) for s in shards]
    )  # (W, 3)
    mean, var = moments_mean_var(merge_moments(parts))
    got = torch.cat(
        [whiten_with(x[s], mean, var, None if mask is None else mask[s]) for s in shards]
    )
    torch.testing.assert_close(got, masked_whiten(x, mask), atol=1e-6, rtol=1e-6)


def test_synced_running_mean_std_equals_one_stream():
    rng = np.random.default_rng(0)
    ranks = [SyncedRunningMeanStd((3,)), SyncedRunningMeanStd((3,))]
    whole = RunningMeanStd((3,))

    def gather(_x):  # every rank's pending moments, in rank order, as all_gather returns them
        return [np.concatenate([r.pending.mean, r.pending.var, [r.pending.count]]) for r in ranks]

    for _round in range(3):
        for r in ranks:
            for _ in range(5):  # one env (Welford) and a batch of 4 (merge)
                for x in (rng.normal(2, 3, (1, 3)), rng.normal(-1, 2, (4, 3))):
                    r.update(x)
                    whole.update(x)
        packed = gather(None)
        for r in ranks:
            r.sync(lambda _x, packed=packed: packed)
        for key in ("mean", "var", "count"):
            assert np.array_equal(ranks[0].state()[key], ranks[1].state()[key])  # bitwise
            np.testing.assert_allclose(ranks[0].state()[key], whole.state()[key], rtol=1e-10)


def test_update_sync_of_one_worker_changes_nothing():
    # The hook path with identity collectives takes exactly the steps of the plain path.
    results = []
    for sync in (None, UpdateSync(average_gradients=lambda grads: None, mean=lambda x: x)):
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 1)
        x = torch.randn(64, 3)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)

        def loss_fn(mb, net=net):
            out = net(mb["x"]).squeeze(-1)
            return out.pow(2).mean(), {"approx_kl": out.detach().abs().mean() * 0.01}

        res = ppo_update(loss_fn, opt, list(net.parameters()), {"x": x}, minibatch_size=16,
                         epochs=3, target_kl=0.02, generator=torch.Generator().manual_seed(1),
                         sync=sync)  # fmt: skip
        results.append((res, [p.detach().clone() for p in net.parameters()]))
    (a, pa), (b, pb) = results
    assert a.stats == b.stats and a.optimizer_steps == b.optimizer_steps
    assert all(torch.equal(u, v) for u, v in zip(pa, pb, strict=True))


# --- two gloo processes driving the trainer -------------------------------------------------
def _cfg(run_dir: Path, **kw):
    base = dict(env_id="CartPole-v1", progress=False, tensorboard=False, run_dir=run_dir)
    return preset_config("classic", **{**base, **kw})


def _equiv_cfg(run_dir: Path, num_envs: int):
    # One minibatch per epoch, so both sides step on the same samples in each step.
    return _cfg(run_dir, num_envs=num_envs, num_steps=T, minibatch_size=num_envs * T, epochs=4)


def _fixed_rollout(tr: RLTrainer, cols: slice) -> Rollout:
    """Columns ``cols`` of one fixed (T, 2N) rollout, the same in every process."""
    g = torch.Generator().manual_seed(123)
    obs = torch.randn(T, 2 * N, 4, generator=g)
    actions = torch.randint(0, 2, (T, 2 * N, 1), generator=g)
    rewards = torch.rand(T, 2 * N, generator=g)
    terminated = torch.rand(T, 2 * N, generator=g) < 0.1
    truncated = (torch.rand(T, 2 * N, generator=g) < 0.05) & ~terminated
    next_values = torch.randn(T, 2 * N, generator=g)
    with torch.no_grad():
        logprobs, _, values = tr.agent.evaluate(obs.reshape(-1, 4), actions.reshape(-1, 1))
    ro = Rollout(obs, actions, logprobs.view(T, 2 * N), values.view(T, 2 * N), rewards,
                 terminated, truncated, next_values)  # fmt: skip
    return Rollout(*(getattr(ro, f).narrow(1, cols.start, cols.stop - cols.start).contiguous()
                     for f in ro.__dataclass_fields__))  # fmt: skip


def _audit_writes(root: Path, log: list[str]) -> None:
    """Record every attempt of this process to create or change a file under ``root``."""
    root_s = os.path.abspath(root)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    events = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree",
              "tempfile.mkstemp", "tempfile.mkdtemp", "os.truncate"}  # fmt: skip

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], str | Path):
            mode, flags = args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            )
            if writing and os.path.abspath(args[0]).startswith(root_s):
                log.append(f"{event} {args[0]}")
        elif event in events and args and str(args[0]).startswith(root_s):
            log.append(f"{event} {args[0]}")

    sys.addaudithook(hook)


def _worker(rank: int, store: str, out: str) -> None:
    """One rank: (a) update on its half of a fixed batch, (b) agreed early stop and skip,
    (c) train 4 updates with every agreement exercised, (d) refuse a 1-process checkpoint."""
    out_dir = Path(out)
    init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    res: dict = {}
    # (a) equivalence: rank r updates on columns [r N, (r + 1) N) of the fixed rollout
    tr = RLTrainer(_equiv_cfg(out_dir / "unused", num_envs=N))
    res["eq_stats"] = tr.update(_fixed_rollout(tr, slice(rank * N, (rank + 1) * N)), clip=0.2)
    res["eq_params"] = tr.flat_params.detach().clone()
    tr.envs.close()
    # (b) rank 0 alone sees a large KL at call 3 and rank 1 alone a NaN loss at call 2
    w = torch.nn.Parameter(torch.zeros(3))
    calls = {"n": 0}

    def loss_fn(mb):
        calls["n"] += 1
        bad = rank == 1 and calls["n"] == 2
        loss = (mb["x"] @ w - 1).pow(2).mean() * (float("nan") if bad else 1.0)
        kl = 0.9 if (rank == 0 and calls["n"] == 3) else 0.0
        return loss, {"approx_kl": torch.tensor(kl)}

    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(rank))
    r = ppo_update(loss_fn, torch.optim.SGD([w], lr=0.1), [w], {"x": x}, minibatch_size=4,
                   epochs=2, target_kl=0.4, sync=_sync())  # fmt: skip
    res["agree"] = (r.optimizer_steps, r.skipped_nonfinite, r.early_stopped, w.detach().clone())
    # (c) training: own envs and seeds; obs/reward normalisation, early stop, 4 minibatches
    run = out_dir / "train"
    writes: list[str] = []
    _audit_writes(run, writes)
    tr = RLTrainer(_cfg(run, num_envs=2, num_steps=32, minibatch_size=16, epochs=2,
                        total_steps=512, normalize_obs=True, normalize_reward=True,
                        target_kl=0.01, checkpoint_every=2))  # fmt: skip
    tr.train()
    res["params"] = tr.flat_params.detach().clone()
    res["obs_rms"] = {k: np.copy(v) for k, v in tr.obs_norm.rms.state().items()}
    res["reward_rms"] = {k: np.copy(v) for k, v in tr.reward_scaler.rms.state().items()}
    res["recent_returns"] = list(tr.recent_returns)
    res["writes"] = writes
    # (c') the last checkpoint holds this rank's own RNG and env-side state
    live = _rank_local(tr)
    again = RLTrainer(_cfg(run, num_envs=2, num_steps=32, minibatch_size=16, epochs=2,
                           total_steps=1024, normalize_obs=True, normalize_reward=True,
                           target_kl=0.01, checkpoint_every=2, resume=True))  # fmt: skip
    again.load(run / "checkpoints" / "update_0000004")
    res["live"], res["restored"] = live, _rank_local(again)
    again.envs.close()
    # (d) a checkpoint written by one process cannot be resumed by two
    single = RLTrainer(_cfg(out_dir / "single", num_envs=2, num_steps=32, minibatch_size=16,
                            epochs=1, total_steps=512, resume=True))  # fmt: skip
    try:
        single.train()
        res["refused"] = None
    except ConfigError as exc:
        res["refused"] = str(exc)
    single.envs.close()
    torch.save(res, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


def _rank_local(tr: RLTrainer) -> dict:
    """What differs between ranks: RNG states and the reward scaler's running returns."""
    return {
        "torch": torch.get_rng_state(),
        "shuffle": tr.shuffle_rng.get_state(),
        "acting": json.dumps(tr.np_rng.bit_generator.state),
        "returns": torch.from_numpy(tr.reward_scaler.returns.copy()),
    }


def _sync():
    from cliprail.distributed import Distributed

    d = Distributed.from_env("cpu")
    assert d is not None
    return d.update_sync()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    # a 1-process run for (d) to refuse
    RLTrainer(_cfg(out / "single", num_envs=2, num_steps=32, minibatch_size=16, epochs=1,
                   total_steps=64)).train()  # fmt: skip
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=2, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_parameters_and_statistics_identical_on_every_rank(two_ranks):
    out, (r0, r1) = two_ranks
    assert torch.equal(r0["params"], r1["params"])  # bitwise, after 4 updates x 8 steps
    for key in ("mean", "var", "count"):
        assert np.array_equal(r0["obs_rms"][key], r1["obs_rms"][key])
        assert np.array_equal(r0["reward_rms"][key], r1["reward_rms"][key])
    # the merged statistics count both ranks' observations once: 4 rollouts x (32 + 1) x 2 envs
    assert r0["obs_rms"]["count"] == pytest.approx(1e-4 + 2 * 4 * 33 * 2)
    assert r0["recent_returns"] == r1["recent_returns"] and r0["recent_returns"]
    state = json.loads(
        (out / "train" / "checkpoints" / "update_0000004" / "state.json").read_text()
    )
    assert state["world_size"] == 2 and set(state["ranks"]) == {"1"}
    lines = (out / "train" / "metrics.jsonl").read_text().splitlines()
    # global steps: 2 ranks x 2 envs x 32 steps = 128 per update
    assert [json.loads(line)["step"] for line in lines] == [128, 256, 384, 512]


def test_two_ranks_with_batch_b_match_one_process_with_batch_2b(two_ranks, tmp_path):
    _, ranks = two_ranks
    tr = RLTrainer(_equiv_cfg(tmp_path / "one", num_envs=2 * N))
    start = tr.flat_params.detach().clone()
    stats = tr.update(_fixed_rollout(tr, slice(0, 2 * N)), clip=0.2)
    tr.envs.close()
    for r in ranks:
        torch.testing.assert_close(r["eq_params"], tr.flat_params.detach(), atol=EQUIV_ATOL,
                                   rtol=0)  # fmt: skip
        assert r["eq_stats"]["optimizer_steps"] == stats["optimizer_steps"] == 4
        for key in ("loss", "policy_loss", "value_loss", "approx_kl", "clip_fraction",
                    "entropy", "grad_norm", "explained_variance"):  # fmt: skip
            assert r["eq_stats"][key] == pytest.approx(stats[key], rel=1e-4, abs=1e-6), key
    assert (tr.flat_params.detach() - start).abs().max() > 100 * EQUIV_ATOL  # it did move


def test_checkpoint_restores_each_ranks_own_state(two_ranks):
    _, (r0, r1) = two_ranks
    for r in (r0, r1):
        for key in ("torch", "shuffle", "returns"):
            assert torch.equal(r["restored"][key], r["live"][key]), key
        assert r["restored"]["acting"] == r["live"]["acting"]
    assert r0["live"]["acting"] != r1["live"]["acting"]  # rank r acts with seed + r
    assert not torch.equal(r0["live"]["returns"], r1["live"]["returns"])


def test_early_stop_and_nonfinite_skip_are_agreed(two_ranks):
    _, (r0, r1) = two_ranks
    # calls: 1 steps; 2 NaN on rank 1 -> both skip; 3 KL 0.9 on rank 0 (mean 0.45) -> both stop
    assert r0["agree"][:3] == r1["agree"][:3] == (1, 1, True)
    assert torch.equal(r0["agree"][3], r1["agree"][3])


def test_rank_one_writes_nothing_and_wrong_world_size_is_refused(two_ranks):
    _, (r0, r1) = two_ranks
    assert r1["writes"] == []
    assert any("metrics.jsonl" in w for w in r0["writes"])  # the audit hook does see writes
    for r in (r0, r1):
        assert r["refused"] is not None and "written by 1 process" in r["refused"]


# --- the command under torchrun ---------------------------------------------------------------
def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return subprocess.run(
        [*cmd, "--standalone", "--nproc_per_node=2", "-m", "cliprail", "rl", "train", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_torchrun_cli_one_writer_resume_and_world_size(tmp_path, capsys):
    run = tmp_path / "run"
    p = _torchrun([*TINY, "--total-steps", "512", "--run-dir", str(run)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(x.name for x in run.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl"]
    assert sorted(x.name for x in (run / "checkpoints").iterdir()) == [
        "latest", "update_0000002", "update_0000004"]  # fmt: skip
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [128, 256, 384, 512]  # one per update
    # resume with the same world size
    p = _torchrun([*TINY, "--total-steps", "1024", "--run-dir", str(run), "--resume"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [128 * i for i in range(1, 9)]
    # a different world size: one clear line, exit code 2, nothing touched
    before = (run / "metrics.jsonl").read_bytes()
    code = main(["rl", "train", *TINY, "--total-steps", "2048", "--run-dir", str(run), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "2 processes" in err and "nproc_per_node=2" in err
    assert (run / "metrics.jsonl").read_bytes() == before
