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
from safetensors.torch import load_file, save_file

from cliprail.cli import main
from cliprail.distributed import init_process_group

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def _stage_args(stage: str, pipe: Path, run: Path, batch: int) -> list[str]:
    data, sft = pipe / "data", pipe / "sft" / "model"
    common = ["--run-dir", str(run), "--no-progress", "--batch-size", str(batch),
              "--checkpoint-every", "3"]  # fmt: skip
    if stage == "sft":  # from the SFT model: the tokenizer and initial weights are fixed
        return ["rlhf", "sft", "--data", str(data / "demonstrations.jsonl"), "--model",
                str(sft), "--epochs", "1", "--learning-rate", "1e-3", *common]  # fmt: skip
    if stage == "reward":
        return ["rlhf", "reward", "--data", str(data / "preferences.jsonl"), "--sft-model",
                str(sft), "--epochs", "1", *common]  # fmt: skip
    return ["rlhf", "dpo", "--data", str(data / "preferences.jsonl"), "--sft-model", str(sft),
            "--epochs", "1", "--learning-rate", "1e-3", *common]  # fmt: skip


def _torchrun(args: list[str], cwd: Path, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return subprocess.run(
        [*cmd, "--standalone", "--nproc_per_node=2", "-m", "cliprail", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip


def test_fsdp_sft_killed_and_resumed_under_torchrun_is_bitwise_the_same_run(two_ranks,
                                                                            pipeline,
                                                                            tmp_path):  # fmt: skip
    """2 ranks under --fsdp: SIGKILLed after step 5 (checkpoint at 3), --resume with 2 ranks
    gathers the full optimizer state back into shards and ends bitwise where an uninterrupted
    run ends, with the same metrics lines."""
    whole, cut = two_ranks("sft", True), tmp_path / "cut"
    args = [*_stage_args("sft", pipeline, cut, batch=8), "--fsdp"]
    p = _torchrun(args, tmp_path, {"CLIPRAIL_KILL_AT": "rlhf-step:5"})
    assert p.returncode != 0 and not (cut / "model").exists()
    p = _torchrun([*args, "--resume"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = _model(whole), _model(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def lines(run: Path) -> list[dict]:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]

    assert lines(whole) == lines(cut)


def _model(run: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted((run / "model").glob("*.safetensors"))
            for k, v in load_file(f).items()}  # fmt: skip


# 2 x B and 1 x 2B see the same rows per step; they differ only in float summation order
# (two shard sums vs one; chunked reference passes), which Adam's normalised steps carry into
# the weights (measured: SFT 9e-8, reward 2e-6, DPO 1e-7), against steps of lr = 1e-3 a step.
EQUIV_ATOL = 1e-5


@pytest.fixture(scope="module")
def two_ranks(pipeline, tmp_path_factory):
    """(stage, fsdp) -> the run folder of ``torchrun --nproc_per_node=2`` with --batch-size 8
    (made on first use)."""
    runs: dict[tuple[str, bool], Path] = {}

    def run(stage: str, fsdp: bool) -> Path:
        if (stage, fsdp) not in runs:
            tmp = tmp_path_factory.mktemp(f"two-{stage}-{'fsdp' if fsdp else 'ddp'}")
            args = [*_stage_args(stage, pipeline, tmp / "run", batch=8), *(["--fsdp"] * fsdp)]
            p = _torchrun(args, tmp)
            assert p.returncode == 0, p.stderr[-3000:]
            runs[stage, fsdp] = tmp / "run"
        return runs[stage, fsdp]

    return run


@pytest.fixture(scope="module")
def one_process(pipeline, tmp_path_factory):
    """stage -> the run folder of one process with --batch-size 16 (made on first use)."""
    runs: dict[str, Path] = {}

    def run(stage: str) -> Path:
        if stage not in runs:
            out = tmp_path_factory.mktemp(f"one-{stage}") / "run"
            torch.set_num_threads(1)
            assert main(_stage_args(stage, pipeline, out, batch=16)) == 0
            runs[stage] = out
        return runs[stage]

    return run


# DDP and FSDP share the sharding, loss scaling and stage code; DDP's own part (the wrapper) is
# covered by SFT here and by PPO below, so reward and DPO run under FSDP only (make test < 10 min)
@pytest.mark.parametrize(
    ("stage", "fsdp"),
    [("sft", False), ("sft", True), ("reward", True), ("dpo", True)],
    ids=["sft-ddp", "sft-fsdp", "reward-fsdp", "dpo-fsdp"],
)
def test_two_ranks_batch_b_match_one_process_batch_2b(pipeline, two_ranks, one_process, stage,
                                                      fsdp):  # fmt: skip
    """DDP replicates the model, FSDP shards it; both must end where one process ends."""
    two, one = two_ranks(stage, fsdp), one_process(stage)
    assert sorted(x.name for x in two.iterdir()) == sorted(x.name for x in one.iterdir())
    assert sorted(x.name for x in (two / "model").iterdir()) == sorted(
        x.name for x in (one / "model").iterdir()
    )  # the same folder as one process writes (FSDP: gathered full weights, not shards)
    steps = [json.loads(x)["step"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    steps1 = [json.loads(x)["step"] for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert steps == steps1  # one line per global step, written once (by rank 0)
    m2, m1 = _model(two), _model(one)
    start = _model(pipeline / "sft") if stage != "reward" else None
    assert m2.keys() == m1.keys()
    worst = max(float((m2[k] - m1[k]).abs().max()) for k in m1)
    assert worst < EQUIV_ATOL, worst
    print(f"{stage}: 2 ranks ({'FSDP' if fsdp else 'DDP'}) vs 1 process, largest weight "
          f"difference {worst:.2e}")  # fmt: skip
    if start is not None:  # and the runs did move: the match is not trivially true
        moved = max(float((m1[k] - start[k]).abs().max()) for k in m1 if k in start)
        assert moved > 100 * EQUIV_ATOL, moved
    # the logged losses agree too (rank 0 logs the mean over ranks of the scaled shard losses)
    l2 = [json.loads(x).get("loss") for x in (two / "metrics.jsonl").read_text().splitlines()]
    l1 = [json.loads(x).get("loss") for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert [a for a in l2 if a is not None] == pytest.approx([a for a in l1 if a is not None],
                                                             rel=1e-4)  # fmt: skip
    # stage.json counts every rank's tokens (less padding than one batch padded to its longest)
    t2, t1 = (json.loads((r / "stage.json").read_text())["tokens_forward"] for r in (two, one))
    assert 0.7 * t1 < t2 <= t1, (t2, t1)
    # the last checkpoints match too: under FSDP they hold the full (gathered) weights and Adam
    # state, keyed by parameter name instead of position, in the same parameter order
    c2, c1 = (sorted((r / "checkpoints").glob("step_*"))[-1] for r in (two, one))
    assert c2.name == c1.name
    group = "policy" if stage == "dpo" else "model"
    w2, w1 = load_file(c2 / f"{group}.safetensors"), load_file(c1 / f"{group}.safetensors")
    assert w2.keys() == w1.keys()
    assert max(float((w2[k] - w1[k]).abs().max()) for k in w1) < EQUIV_ATOL
    o2, o1 = (torch.load(c / "optimizer.pt", weights_only=True)["optimizer"]["state"]
              for c in (c2, c1))  # fmt: skip
    names = {f"{group}.{k}" for k in w1 if k != "lm_head.weight"}  # tied to the embedding
    assert (set(o2) == names) if fsdp else (list(o2) == list(o1))
    for a, b in zip(o2.values(), o1.values(), strict=True):  # both in parameter order
        assert a["exp_avg_sq"].shape == b["exp_avg_sq"].shape  # full, not a shard
        assert float((a["exp_avg"] - b["exp_avg"]).abs().max()) < EQUIV_ATOL


# --- PPO in two gloo processes ----------------------------------------------------------------
def _ppo_cfg(pipe: Path, run: Path, **kw):
    from cliprail.rlhf.ppo import PPOConfig

    data = pipe / "data"
    base = dict(prompts=data / "prompts.jsonl", sft_model=pipe / "sft" / "model",
                reward_model=pipe / "rm" / "model", run_dir=run, total_episodes=32,
                batch_size=8, minibatch_size=8, epochs=2, max_new_tokens=8, eval_every=2,
                eval_prompts=4, checkpoint_every=2, progress=False)  # fmt: skip
    return PPOConfig(**{**base, **kw})


def _fixed_update(pipe: Path, rows: slice, dp, **family) -> dict[str, torch.Tensor]:
    """One ppo_step on rows ``rows`` of a rollout every rank generates identically (``family``:
    the issue-16 options, e.g. a critic-free advantage)."""
    from cliprail.ppo import FixedKLController
    from cliprail.rlhf.common import adamw
    from cliprail.rlhf.ppo import load_models, ppo_step, rollout
    from cliprail.rlhf.sampling import load_requests

    n = len(range(16)[rows])  # each rank: one minibatch of its rows, 2 epochs
    cfg = _ppo_cfg(pipe, pipe / "unused", batch_size=16, minibatch_size=16, **family)
    torch.manual_seed(0)
    m = load_models(cfg)
    prompts = [r.prompt for r in load_requests(cfg.prompts) if r.split == "train"][:16]
    ro = rollout(m, cfg, prompts, torch.Generator().manual_seed(0))
    # rows 0-5 end after 3 tokens (as at an EOS), so the halves hold unequal token counts
    ro.response_mask[:6, 3:] = 0
    ro.attention_mask[:6, ro.query_len + 3 :] = 0
    half = type(ro)(**{k: (v[rows] if isinstance(v, torch.Tensor) and k != "query_len" else v)
                       for k, v in vars(ro).items()})  # fmt: skip
    m.dp = dp
    if family:  # a critic-free run holds no value model
        m.value = None
    models = {"policy": m.policy} | ({"value": m.value} if m.value is not None else {})
    models = {k: dp.prepare(v) for k, v in models.items()}  # FSDP: sharded here
    m.policy, m.value = models["policy"], models.get("value")
    m.train_policy = dp.wrap(m.policy)
    m.train_value = dp.wrap(m.value) if m.value is not None else None
    params = [p for mod in models.values() for p in mod.parameters() if p.requires_grad]
    cfg = _ppo_cfg(pipe, pipe / "unused", batch_size=n, minibatch_size=n, **family)
    # plain SGD for the family runs: Adam's first steps are nearly sign(g), blind to a gradient
    # scaled by the wrong (local) std, which this comparison must see
    opt = torch.optim.SGD(params, lr=0.5) if family else adamw(params, cfg.learning_rate)
    stats = ppo_step(m, cfg, half, opt, FixedKLController(0.05), torch.Generator().manual_seed(1))
    with dp.gathered(*models.values()):
        weights = {
            f"{name}.{k}": v.clone()
            for name, mod in models.items()
            for k, v in dp.module_state(mod).items()
        }
        return {**weights, "approx_kl": torch.tensor(stats["approx_kl"], dtype=torch.float64)}


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


def _ppo_worker(rank: int, pipe: str, out: str, fsdp: bool) -> None:
    from cliprail.rlhf.parallel import DataParallel
    from cliprail.rlhf.ppo import train_ppo

    init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    torch.set_num_threads(1)
    dp = DataParallel.from_env(fsdp=fsdp)
    res = {"eq": _fixed_update(Path(pipe), slice(rank * 8, (rank + 1) * 8), dp)}
    run = Path(out) / "train"
    writes: list[str] = []
    _audit_writes(run, writes)
    train_ppo(_ppo_cfg(Path(pipe), run, fsdp=fsdp))  # the group exists: train_ppo joins it
    res["writes"] = writes
    if fsdp:
        res.update(_fsdp_checks(Path(pipe), run, Path(out), dp))
    # the trained weights as each rank holds them, from the last (rank 0's) checkpoint too
    torch.save(res, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _fsdp_checks(pipe: Path, run: Path, out: Path, dp) -> dict:
    """Under FSDP: generation of different lengths on each rank inside ``gathered`` (no
    collective inside, so no hang), and a checkpoint round trip: the last checkpoint restored
    into freshly sharded models and optimizer, then saved again under ``out/again``."""
    import random

    from cliprail.rlhf.common import adamw
    from cliprail.rlhf.generation import generate
    from cliprail.rlhf.ppo import load_models
    from cliprail.rlhf.resume import StageCheckpointer

    cfg = _ppo_cfg(pipe, run, fsdp=True)
    m = load_models(cfg)
    policy, value = dp.prepare(m.policy), dp.prepare(m.value)
    q = torch.full((2, 4), m.tokenizer.eos_token_id + 1)
    with dp.gathered(policy):
        resp, _ = generate(policy, q, torch.ones_like(q), max_new_tokens=2 + 5 * dp.rank,
                           eos_token_id=-1, pad_token_id=0)  # fmt: skip
    lengths = dp.gather_objects(resp.shape[1])  # a collective after uneven work: both got here
    params = [p for p in [*policy.parameters(), *value.parameters()] if p.requires_grad]
    ckpt = StageCheckpointer(run, 0, {"policy": policy, "value": value},
                             adamw(params, cfg.learning_rate),
                             generators={"sampling": torch.Generator()},
                             rngs={"prompts": random.Random()}, dp=dp)  # fmt: skip
    restored = ckpt.restore()
    assert restored is not None
    path, state = restored
    ckpt.ckpt.root = out / "again"
    ckpt.save(state["step"], {})
    return {"lengths": lengths, "restored": path.name}


GRPO_2RANK = {"advantage": "grpo", "group_size": 4, "group_scale": "batch",
              "loss_agg": "seq_mean_token_mean", "kl_in": "loss",
              "no_eos_penalty": None}  # fmt: skip
"""Each half holds two whole groups; the batch std and the response-count loss scale must be
global for two ranks to make one process's update. The reward model's own scores: with 8-token
responses the no-EOS penalty would give every response -1 and every advantage 0 (a vacuous
comparison, found by breaking the global std on purpose)."""


def _grpo_worker(rank: int, pipe: str, out: str) -> None:
    from cliprail.rlhf.parallel import DataParallel

    init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    torch.set_num_threads(1)
    dp = DataParallel.from_env()
    res = _fixed_update(Path(pipe), slice(rank * 8, (rank + 1) * 8), dp, **GRPO_2RANK)
    save_file({k: v.contiguous() for k, v in res.items()}, str(Path(out) / f"grpo{rank}.st"))
    dist.destroy_process_group()


def test_grpo_update_on_two_ranks_matches_one_process(pipeline, tmp_path):
    """Issue 16: groups whole on each rank, the batch std over both, the per-response loss mean
    scaled by response counts: two ranks of 8 make the update one process makes on 16."""
    from cliprail.rlhf.parallel import DataParallel

    mp.spawn(_grpo_worker, args=(str(pipeline), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (load_file(tmp_path / f"grpo{r}.st") for r in range(2))
    torch.set_num_threads(1)
    one = _fixed_update(pipeline, slice(0, 16), DataParallel.single(), **GRPO_2RANK)
    assert not any(k.startswith("value.") for k in one)
    sft = load_file(pipeline / "sft" / "model" / "model.safetensors")
    moved = max(float((one[f"policy.{k}"] - v).abs().max()) for k, v in sft.items()
                if f"policy.{k}" in one)  # fmt: skip
    assert moved > 1e-3, moved  # the update did something to compare
    for k in one:
        assert torch.equal(r0[k], r1[k]), k
    one.pop("approx_kl")
    worst = max(float((r0[k] - one[k]).abs().max()) for k in one)
    assert worst < 1e-5, worst


@pytest.fixture(scope="module")
def ppo_runs(pipeline, tmp_path_factory):
    """fsdp -> (output folder, each rank's results) of the 2-process PPO worker, spawned on
    first use."""
    runs: dict[bool, tuple[Path, list[dict]]] = {}

    def get(fsdp: bool) -> tuple[Path, list[dict]]:
        if fsdp not in runs:
            out = tmp_path_factory.mktemp("ppo-fsdp" if fsdp else "ppo-ddp")
            mp.spawn(_ppo_worker, args=(str(pipeline), str(out), fsdp), nprocs=2, join=True)
            runs[fsdp] = out, [torch.load(out / f"rank{r}.pt", weights_only=False)
                               for r in range(2)]  # fmt: skip
        return runs[fsdp]

    return get


@pytest.fixture(params=[False, True], ids=["ddp", "fsdp"])
def ppo_two_ranks(request, ppo_runs):
    return ppo_runs(request.param)


def test_ppo_update_on_two_halves_matches_one_update_on_the_whole(pipeline, ppo_two_ranks):
    from cliprail.rlhf.parallel import DataParallel

    _, (r0, r1) = ppo_two_ranks
    torch.set_num_threads(1)
    one = _fixed_update(pipeline, slice(0, 16), DataParallel.single())
    for k in one:
        assert torch.equal(r0["eq"][k], r1["eq"][k]), k  # the ranks agree bitwise
    approx_kl = one.pop("approx_kl")
    worst = max(float((r0["eq"][k] - one[k]).abs().max()) for k in one)
    assert worst < 1e-5, worst
    # the approx KL the early stop reads is the global token mean, not a mean of rank means
    # (the halves hold different numbers of response tokens)
    assert float(r0["eq"]["approx_kl"]) == pytest.approx(float(approx_kl), rel=1e-4)
    assert float(approx_kl) > 0
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


def test_ppo_under_fsdp_matches_ddp_and_checkpoints_round_trip(ppo_runs):
    out, (r0, r1) = ppo_runs(True)
    assert r0["lengths"] == r1["lengths"] == [2, 7]  # uneven generation did not hang
    # the FSDP run (same per-rank samples) ends where the DDP run ends: only the gradient
    # reduction's summation order differs (measured 7e-9)
    fsdp = load_file(out / "train" / "policy" / "model.safetensors")
    ddp = load_file(ppo_runs(False)[0] / "train" / "policy" / "model.safetensors")
    assert fsdp.keys() == ddp.keys()
    assert max(float((fsdp[k] - ddp[k]).abs().max()) for k in ddp) < EQUIV_ATOL
    # restored into fresh shards and saved again: the same full tensors, bitwise
    name = r0["restored"]
    a, b = out / "train" / "checkpoints" / name, out / "again" / name
    for group in ("policy", "value"):
        ta, tb = load_file(a / f"{group}.safetensors"), load_file(b / f"{group}.safetensors")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    oa, ob = (torch.load(c / "optimizer.pt", weights_only=True)["optimizer"] for c in (a, b))
    assert oa["state"].keys() == ob["state"].keys()
    for k, st in oa["state"].items():
        assert all(torch.equal(st[x], ob["state"][k][x]) for x in st), k
