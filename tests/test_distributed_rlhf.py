"""The RLHF stages under torch.distributed (gloo on CPU, 2 processes).

* SFT, reward model and DPO under ``torchrun --nproc_per_node=2`` with ``--batch-size B`` end
  where one process with ``--batch-size 2B`` ends (same global shuffle, losses scaled to the
  global mean), and the run folder holds what a one-process run writes;
* PPO in two gloo processes: an update on each rank's half of a fixed rollout equals one update
  on the whole rollout in one process (global whitening, global token mean); a short training
  run keeps the parameters bitwise equal on both ranks (checked at every checkpoint and at the
  end) and rank 1 creates, writes, renames or deletes nothing in the run folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from cliprail.cli import main
from cliprail.distributed import init_process_group

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def _stage_args(stage: str, pipe: Path, run: Path, batch: int) -> list[str]:
    data, sft = pipe / "data", pipe / "sft" / "model"
    common = ["--run-dir", str(run), "--no-progress", "--batch-size", str(batch)]
    if stage == "sft":  # from the SFT model: the tokenizer and initial weights are fixed
        return ["rlhf", "sft", "--data", str(data / "demonstrations.jsonl"), "--model",
                str(sft), "--epochs", "1", "--learning-rate", "1e-3", *common]  # fmt: skip
    if stage == "reward":
        return ["rlhf", "reward", "--data", str(data / "preferences.jsonl"), "--sft-model",
                str(sft), "--epochs", "1", *common]  # fmt: skip
    return ["rlhf", "dpo", "--data", str(data / "preferences.jsonl"), "--sft-model", str(sft),
            "--epochs", "1", "--learning-rate", "1e-3", *common]  # fmt: skip


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return subprocess.run(
        [*cmd, "--standalone", "--nproc_per_node=2", "-m", "cliprail", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def _model(run: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted((run / "model").glob("*.safetensors"))
            for k, v in load_file(f).items()}  # fmt: skip


# 2 x B and 1 x 2B see the same rows per step; they differ only in float summation order
# (two shard sums vs one; chunked reference passes), which Adam's normalised steps carry into
# the weights (measured: SFT 9e-8, reward 2e-6, DPO 1e-7), against steps of lr = 1e-3 a step.
EQUIV_ATOL = 1e-5


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_two_ranks_batch_b_match_one_process_batch_2b(pipeline, tmp_path, stage):
    two, one = tmp_path / "two", tmp_path / "one"
    p = _torchrun(_stage_args(stage, pipeline, two, batch=8), tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    torch.set_num_threads(1)
    assert main(_stage_args(stage, pipeline, one, batch=16)) == 0
    assert sorted(x.name for x in two.iterdir()) == sorted(x.name for x in one.iterdir())
    steps = [json.loads(x)["step"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    steps1 = [json.loads(x)["step"] for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert steps == steps1  # one line per global step, written once (by rank 0)
    m2, m1 = _model(two), _model(one)
    start = _model(pipeline / "sft") if stage != "reward" else None
    assert m2.keys() == m1.keys()
    worst = max(float((m2[k] - m1[k]).abs().max()) for k in m1)
    assert worst < EQUIV_ATOL, worst
    print(f"{stage}: 2 ranks vs 1 process, largest weight difference {worst:.2e}")
    if start is not None:  # and the runs did move: the match is not trivially true
        moved = max(float((m1[k] - start[k]).abs().max()) for k in m1 if k in start)
        assert moved > 100 * EQUIV_ATOL, moved
    # the logged losses agree too (rank 0 logs the mean over ranks of the scaled shard losses)
    l2 = [json.loads(x).get("loss") for x in (two / "metrics.jsonl").read_text().splitlines()]
    l1 = [json.loads(x).get("loss") for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert [a for a in l2 if a is not None] == pytest.approx([a for a in l1 if a is not None],
                                                             rel=1e-4)  # fmt: skip


# --- PPO in two gloo processes ----------------------------------------------------------------
def _ppo_cfg(pipe: Path, run: Path, **kw):
    from cliprail.rlhf.ppo import PPOConfig

    data = pipe / "data"
    base = dict(prompts=data / "prompts.jsonl", sft_model=pipe / "sft" / "model",
                reward_model=pipe / "rm" / "model", run_dir=run, total_episodes=32,
                batch_size=8, minibatch_size=8, epochs=2, max_new_tokens=8, eval_every=2,
                eval_prompts=4, checkpoint_every=2, progress=False)  # fmt: skip
    return PPOConfig(**{**base, **kw})


def _fixed_update(pipe: Path, rows: slice, dp) -> dict[str, torch.Tensor]:
    """One ppo_step on rows ``rows`` of a rollout every rank generates identically."""
    from cliprail.ppo import FixedKLController
    from cliprail.rlhf.common import adamw
    from cliprail.rlhf.ppo import load_models, ppo_step, rollout
    from cliprail.rlhf.sampling import load_requests

    n = len(range(16)[rows])  # each rank: one minibatch of its rows, 2 epochs
    cfg = _ppo_cfg(pipe, pipe / "unused", batch_size=16, minibatch_size=16)
    torch.manual_seed(0)
    m = load_models(cfg)
    prompts = [r.prompt for r in load_requests(cfg.prompts) if r.split == "train"][:16]
    ro = rollout(m, cfg, prompts, torch.Generator().manual_seed(0))
    half = type(ro)(**{k: (v[rows] if isinstance(v, torch.Tensor) and k != "query_len" else v)
                       for k, v in vars(ro).items()})  # fmt: skip
    m.dp = dp
    m.train_policy, m.train_value = dp.wrap(m.policy), dp.wrap(m.value)
    params = [p for p in [*m.policy.parameters(), *m.value.parameters()] if p.requires_grad]
    cfg = _ppo_cfg(pipe, pipe / "unused", batch_size=n, minibatch_size=n)
    ppo_step(m, cfg, half, adamw(params, cfg.learning_rate), FixedKLController(0.05),
             torch.Generator().manual_seed(1))  # fmt: skip
    return {**{f"policy.{k}": v.clone() for k, v in m.policy.state_dict().items()},
            **{f"value.{k}": v.clone() for k, v in m.value.state_dict().items()}}  # fmt: skip


CHANGES = ("os.rename", "os.replace", "os.remove", "os.unlink", "os.mkdir", "shutil.rmtree",
           "os.rmdir")  # fmt: skip


def _audit_writes(root: Path, seen: list[str]) -> None:
    """Record every file-creating, writing, renaming or deleting call under ``root``."""
    prefix = str(root)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and str(args[0]).startswith(prefix):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            if (mode and any(c in str(mode) for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            ):
                seen.append(f"open {args[0]}")
        elif event in CHANGES and any(str(a).startswith(prefix) for a in args[:2]):
            seen.append(f"{event} {args[0]}")

    sys.addaudithook(hook)


def _ppo_worker(rank: int, pipe: str, out: str) -> None:
    from cliprail.rlhf.parallel import DataParallel
    from cliprail.rlhf.ppo import train_ppo

    init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    torch.set_num_threads(1)
    dp = DataParallel.from_env()
    res = {"eq": _fixed_update(Path(pipe), slice(rank * 8, (rank + 1) * 8), dp)}
    run = Path(out) / "train"
    writes: list[str] = []
    _audit_writes(run, writes)
    train_ppo(_ppo_cfg(Path(pipe), run))  # the group exists: train_ppo joins it
    res["writes"] = writes
    # the trained weights as each rank holds them, from the last (rank 0's) checkpoint too
    torch.save(res, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ppo_two_ranks(pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo-ddp")
    mp.spawn(_ppo_worker, args=(str(pipeline), str(out)), nprocs=2, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_ppo_update_on_two_halves_matches_one_update_on_the_whole(pipeline, ppo_two_ranks):
    from cliprail.rlhf.parallel import DataParallel

    _, (r0, r1) = ppo_two_ranks
    torch.set_num_threads(1)
    one = _fixed_update(pipeline, slice(0, 16), DataParallel(None))
    for k in one:
        assert torch.equal(r0["eq"][k], r1["eq"][k]), k  # DDP: the ranks agree bitwise
    worst = max(float((r0["eq"][k] - one[k]).abs().max()) for k in one)
    assert worst < 1e-5, worst
    sft = load_file(pipeline / "sft" / "model" / "model.safetensors")
    moved = max(float((one[f"policy.{k}"] - v).abs().max()) for k, v in sft.items()
                if f"policy.{k}" in one)  # fmt: skip
    assert moved > 50 * 1e-5, moved  # 2 Adam steps of lr 3e-4 moved it ~6e-4: not trivial


def test_ppo_training_on_two_ranks_one_writer(ppo_two_ranks):
    out, (r0, r1) = ppo_two_ranks
    run = out / "train"
    assert r1["writes"] == [] and r0["writes"]
    names = sorted(x.name for x in run.iterdir())
    assert names == ["best", "checkpoints", "config.json", "fuse.json", "metrics.jsonl",
                     "policy", "stage.json", "tensorboard"]  # fmt: skip
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["step"] for r in rows if "score" in r]
    assert train == [16, 32]  # 32 episodes = 2 updates of 2 ranks x 8 prompts
    state = json.loads((run / "checkpoints" / "step_00000002" / "state.json").read_text())
    assert state["world_size"] == 2 and "1" in state["ranks"]
    rng = load_file(run / "checkpoints" / "step_00000002" / "rng.safetensors")
    assert not torch.equal(rng["gen.sampling"], rng["gen.sampling.rank1"])  # own streams
