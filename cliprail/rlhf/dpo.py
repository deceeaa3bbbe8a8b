"""``cliprail rlhf dpo``: Direct Preference Optimization from the SFT model, on the same
``preferences.jsonl`` the reward model learns from.

The reference is the frozen SFT model; its log-probs of every pair are computed once, before
training (they never change). Each step runs the policy over chosen and rejected responses in
one forward pass, sums the response tokens' log-probs (IPO: averages them) and minimises
:func:`cliprail.ppo.dpo_loss`. Held-out pairs are the reward model's (same seed, same split), so
DPO's implicit-reward accuracy compares with the reward model's pairwise accuracy. Given
``--prompts`` (and optionally ``--reward-model``), the policy is sampled on held-out prompts
after every epoch and judged like PPO's fuse evaluations: the points of DPO's curve in
``cliprail rlhf compare``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from cliprail.checkpoint import atomic_dir, atomic_write_json
from cliprail.errors import ConfigError
from cliprail.monitor import MetricsLogger
from cliprail.ppo import clip_grad_norm, dpo_loss, masked_mean, masked_sum
from cliprail.resume import seed_everything
from cliprail.rlhf.common import (
    Cost,
    EpochShuffle,
    StageOptions,
    adamw,
    split_pairs,
)
from cliprail.rlhf.data import Batch, encode_pairs, load_preferences
from cliprail.rlhf.models import (
    ScalarHeadModel,
    check_vocab,
    load_causal_lm,
    load_tokenizer,
    model_device,
    token_logprobs,
)
from cliprail.rlhf.parallel import DataParallel
from cliprail.rlhf.records import PromptRecord, parse_column_map
from cliprail.rlhf.resume import StageCheckpointer, begin_run
from cliprail.rlhf.sampling import Sampling, evaluate_policy, load_requests, validation_requests


@dataclass(frozen=True)
class DPOConfig(StageOptions):
    """DPO (or IPO) on preference pairs, starting from and anchored to the SFT model."""

    data: Path
    """preferences.jsonl: {"prompt", "chosen", "rejected"} per line."""
    sft_model: Path
    """The SFT model folder: the policy's start and the frozen reference."""
    run_dir: Path
    """Run folder: metrics.jsonl, the trained policy in <run_dir>/model, dpo_metrics.json."""
    columns: str = ""
    """Which columns of --data hold the fields read, as FIELD=COLUMN pairs (e.g.
    'prompt=question,chosen=better,rejected=worse'): for a JSONL file with other keys,
    or a Hugging Face dataset on disk (a save_to_disk folder, a parquet or JSON file), which
    --data may be."""
    beta: float = 0.1
    """Strength of the anchor to the reference (Rafailov et al. 2023: 0.1; larger stays closer)."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's Bradley-Terry loss; ipo: Azar et al.'s squared loss on mean log-ratios."""
    label_smoothing: float = 0.0
    """Assumed share of flipped labels (conservative DPO); 0 is plain DPO."""
    epochs: int = 2
    """Passes over the training pairs."""
    batch_size: int = 32
    """Pairs per optimizer step."""
    learning_rate: float = 2e-4
    """AdamW learning rate, decayed linearly to 0."""
    holdout: float = 0.1
    """Share of pairs held out (the same pairs as the reward model's for the same seed)."""
    max_prompt_len: int = 128
    """Longest prompt in tokens; longer is an error."""
    max_response_len: int = 64
    """Responses are cut to this many tokens."""
    prompts: Path | None = None
    """prompts.jsonl: when given, sample and judge held-out prompts after every epoch."""
    reward_model: Path | None = None
    """Reward model folder, for the proxy reward of those evaluations (optional)."""
    eval_prompts: int = 64
    """Held-out prompts per evaluation."""
    seed: int = 0
    """Seed of the split, shuffling and sampling."""
    trust_remote_code: bool = False
    """Allow a model folder's own Python code to run."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        super().__post_init__()  # the run options
        if self.beta <= 0:
            raise ConfigError(f"--beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        for name in ("epochs", "batch_size", "max_response_len", "eval_prompts"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer")
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"--holdout must be in (0, 1), got {self.holdout}")


def sequence_logps(model: torch.nn.Module, b: Batch, average: bool = False) -> torch.Tensor:
    """``(B,)`` log-probability of each response (sum over its tokens, or mean if ``average``)."""
    logprobs = token_logprobs(model, b.input_ids, b.attention_mask, b.query_len)
    if average:
        return masked_mean(logprobs, b.response_mask, dim=1)
    return masked_sum(logprobs, b.response_mask, dim=1)


def _encode(tok: Any, pairs: list[dict[str, Any]], cfg: DPOConfig) -> Batch:
    """Chosen responses then rejected ones, ``(2B, L)``: one forward scores both."""
    prompts = [p["prompt"] for p in pairs]
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    return encode_pairs(tok, prompts + prompts, responses, cfg.max_prompt_len, cfg.max_response_len)


@torch.no_grad()
def pair_logps(
    model: torch.nn.Module,
    tok: Any,
    pairs: list[dict[str, Any]],
    cfg: DPOConfig,
    cost: Cost | None = None,
    chunk: int = 64,
) -> torch.Tensor:
    """``(N, 2)`` log-probs of (chosen, rejected) of every pair, in chunks, without gradients."""
    out = [torch.zeros(0, 2)]
    for i in range(0, len(pairs), chunk):
        b = _encode(tok, pairs[i : i + chunk], cfg).to(model_device(model))
        if cost is not None:
            cost.add(forward=b.input_ids.numel())
        out.append(sequence_logps(model, b, average=cfg.loss_type == "ipo").view(2, -1).T.cpu())
    return torch.cat(out)


def implicit_accuracy(
    policy: torch.nn.Module,
    tok: Any,
    pairs: list[dict[str, Any]],
    ref_logps: torch.Tensor,
    cfg: DPOConfig,
) -> float:
    """Share of pairs whose implicit reward ``beta * (log pi - log ref)`` ranks chosen first."""
    if not pairs:
        return 0.0
    logratio = pair_logps(policy, tok, pairs, cfg) - ref_logps  # (N, 2)
    return float((logratio[:, 0] > logratio[:, 1]).float().mean())


def train_dpo(cfg: DPOConfig) -> dict[str, Any]:
    """Train with DPO; returns the metrics (also in <run_dir>/dpo_metrics.json). Under torchrun
    every rank trains on its share of each global batch (see :mod:`cliprail.rlhf.parallel`);
    rank 0 runs the evaluations and saves."""
    cfg.apply_threads()
    mapping = parse_column_map(cfg.columns, ("prompt", "chosen", "rejected"))
    tok = load_tokenizer(cfg.sft_model, cfg.trust_remote_code)
    pairs = load_preferences(cfg.data, tok, mapping)
    held_requests = []
    if cfg.prompts is not None:
        held_requests = validation_requests(load_requests(cfg.prompts))[1][: cfg.eval_prompts]
    dp = DataParallel.from_env(cfg.device, fsdp=cfg.fsdp)
    try:
        return _train_dpo(cfg, pairs, held_requests, dp)
    finally:
        dp.close()


def _train_dpo(
    cfg: DPOConfig,
    pairs: list[dict[str, Any]],
    held_requests: list[PromptRecord],
    dp: DataParallel,
    given: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """The DPO loop; ``given`` is ``(policy, tokenizer)`` held in memory by the Python API
    (:func:`cliprail.rlhf.api.dpo`), trained in place."""
    dp.from_main(lambda: begin_run(cfg.run_dir, cfg))
    t0 = time.perf_counter()
    g = seed_everything(cfg.seed)
    train, held = split_pairs(pairs, cfg.holdout, g)
    if given is not None:
        policy, tok = given
    else:
        tok = load_tokenizer(cfg.sft_model, cfg.trust_remote_code)
        policy = load_causal_lm(cfg.sft_model, cfg.trust_remote_code)
    check_vocab(tok, policy, str(cfg.sft_model))
    policy = policy.to(dp.device)
    ref = copy.deepcopy(policy).requires_grad_(False).eval()
    policy.eval()  # dropout off: the log-ratio must be 0 at the start
    reward, shift = None, 0.0
    if cfg.reward_model is not None:
        reward = ScalarHeadModel.load(cfg.reward_model, cfg.trust_remote_code)
        reward = reward.to(dp.device).eval()
        shift = float(reward.meta(cfg.reward_model).get("shift", 0.0))
    cost = Cost("dpo", started=t0)
    # the reference pass over every pair, once; under torchrun shared out over the ranks
    cost.mark("reference_start")
    ref_train = dp.map_rows(lambda rows: pair_logps(ref, tok, rows, cfg, cost), train)
    ref_held = dp.map_rows(lambda rows: pair_logps(ref, tok, rows, cfg, cost), held)
    cost.mark("reference_end")
    policy = dp.prepare(policy)  # --fsdp: sharded over the ranks; else as it is
    opt = adamw(policy.parameters(), cfg.learning_rate)
    shuffle = EpochShuffle(len(train), cfg.batch_size * dp.world_size, g)  # global batches
    total = cfg.epochs * shuffle.steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(total, 1))
    evals: list[dict[str, Any]] = []
    sampling = Sampling(max_prompt_len=cfg.max_prompt_len)
    ckpt = StageCheckpointer(
        cfg.run_dir,
        cfg.checkpoint_every,
        {"policy": policy},
        opt,
        sched,
        {"shuffle": g},
        dp=dp,
        cost=cost,
        shuffle=shuffle,
        started=t0,
    )
    # on resume the reference pass above is recomputed (same numbers); the restored cost
    # replaces the counters, so it is not counted twice
    restored = ckpt.restore() if cfg.resume else None
    start = restored[1]["step"] if restored is not None else 0
    if restored is not None:
        evals = restored[1]["evals"]
    train_policy = dp.wrap(policy)  # DDP after the restore: it starts from rank 0's weights

    def snapshot() -> dict[str, Any]:
        return {"evals": evals}

    def evaluate(epoch: int, step: int, log: MetricsLogger) -> None:
        if not held_requests:
            return
        with dp.gathered(policy):  # --fsdp: whole on every rank while rank 0 samples
            if not dp.is_main:  # rank 0 evaluates; nothing to agree on
                return
            ev = evaluate_policy(policy, ref, tok, held_requests, sampling, reward, shift)
        rec = {k: v for k, v in ev.items() if not isinstance(v, list)}
        rec["epoch"] = epoch
        evals.append(rec)
        log.log(step, {f"eval/{k}": v for k, v in rec.items()})

    with ckpt.session(cfg, "DPO", total, start, restored, tensorboard=True) as (bar, stop, log):
        if start == 0:
            evaluate(0, 0, log)
        cost.mark("loop_start")
        for step in range(start, total):
            epoch, global_idx = shuffle.indices(step)
            idx, real = dp.shard(global_idx)
            b = _encode(tok, [train[i] for i in idx], cfg).to(dp.device)
            lp = sequence_logps(train_policy, b, average=cfg.loss_type == "ipo")  # (2n,)
            n = len(idx)
            loss, stats = dpo_loss(
                lp[:n],
                lp[n:],
                ref_train[idx, 0].to(dp.device),
                ref_train[idx, 1].to(dp.device),
                beta=cfg.beta,
                loss_type=cfg.loss_type,
                label_smoothing=cfg.label_smoothing,
            )
            scale = dp.loss_scale(n if real else 0)  # the global batch's mean
            loss = loss * scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_grad_norm(list(policy.parameters()), 1.0)
            opt.step()
            sched.step()
            cost.add(forward=b.input_ids.numel(), backward=b.input_ids.numel())
            row = {k: float(v) * scale for k, v in stats.items()}  # pair means: global ones
            row.update(loss=loss.item())
            row = dp.reduce_stats(row)
            row.update(grad_norm=float(grad_norm), epoch=epoch + 1)
            log.log(step + 1, row)
            bar.update(step + 1, f"loss {row['loss']:.3f}  acc {row['reward_accuracy']:.2f}")
            if (step + 1) % shuffle.steps_per_epoch == 0:  # the epoch's evaluation, then save
                evaluate(epoch + 1, step + 1, log)
            ckpt.step_end(step + 1, stop, snapshot, f"after step {step + 1} of {total}")
        cost.mark("loop_end")
        bar.close()
        ckpt.total_cost()
        out = cfg.run_dir / "model"
        with dp.gathered(policy):
            if not dp.is_main:
                return {}
            metrics: dict[str, Any] = {
                "heldout_implicit_accuracy": implicit_accuracy(policy, tok, held, ref_held, cfg),
                "train_implicit_accuracy": implicit_accuracy(
                    policy, tok, train[:500], ref_train[:500], cfg
                ),
                "pairs_train": len(train),
                "pairs_heldout": len(held),
                "evals": evals,
            }
            log.log(total + 1, {k: v for k, v in metrics.items() if k != "evals"})
            with atomic_dir(out) as tmp:
                policy.save_pretrained(str(tmp), **dp.pretrained_state(policy))
                tok.save_pretrained(str(tmp))
    cost.wall_s = ckpt.wall_s()
    atomic_write_json(cfg.run_dir / "dpo_metrics.json", metrics)
    cost.write(cfg.run_dir, policy=str(out))  # last: a run with stage.json is finished
    return metrics
