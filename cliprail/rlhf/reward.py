"""Stage 2: a Bradley-Terry reward model on preference pairs.

Loss ``-log sigmoid(r(chosen) - r(rejected))``; held-out pairwise accuracy reported; the scores
are shifted so that the demonstrations (the SFT data) average 0 (Huang et al. 2024), and the
shift is saved with the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cliprail.checkpoint import atomic_dir, atomic_write_json
from cliprail.errors import ConfigError
from cliprail.resume import seed_everything
from cliprail.rlhf.common import (
    Cost,
    EpochShuffle,
    StageOptions,
    adamw,
    split_pairs,
)
from cliprail.rlhf.data import encode_pairs, load_preferences
from cliprail.rlhf.models import (
    ScalarHeadModel,
    check_vocab,
    last_token_scores,
    load_causal_lm,
    load_tokenizer,
    model_device,
)
from cliprail.rlhf.parallel import DataParallel
from cliprail.rlhf.records import load_demonstrations, parse_column_map
from cliprail.rlhf.resume import StageCheckpointer, begin_run


@dataclass(frozen=True)
class RewardConfig(StageOptions):
    """Train a reward model from ``preferences.jsonl``, starting from the SFT model."""

    data: Path
    """preferences.jsonl: {"prompt", "chosen", "rejected"} per line."""
    sft_model: Path
    """The SFT model folder (trunk of the reward model; its tokenizer is used)."""
    run_dir: Path
    """Run folder; the reward model goes to <run_dir>/model."""
    demonstrations: Path | None = None
    """demonstrations.jsonl whose responses define reward 0 (none: no shift)."""
    columns: str = ""
    """Which columns of --data hold the fields read, as FIELD=COLUMN pairs (e.g.
    'prompt=question,chosen=better,rejected=worse'): for a JSONL file with other keys,
    or a Hugging Face dataset on disk (a save_to_disk folder, a parquet or JSON file), which
    --data may be."""
    epochs: int = 4
    """Passes over the training pairs."""
    batch_size: int = 32
    """Pairs per optimizer step."""
    learning_rate: float = 1e-3
    """AdamW learning rate."""
    holdout: float = 0.1
    """Share of pairs held out to measure accuracy."""
    max_prompt_len: int = 128
    """Longest prompt in tokens."""
    max_response_len: int = 64
    """Responses are cut to this many tokens."""
    seed: int = 0
    """Seed of the split, initialisation and shuffling."""
    trust_remote_code: bool = False
    """Allow a model folder's own Python code to run."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        super().__post_init__()  # the run options
        for name in ("epochs", "batch_size", "max_prompt_len", "max_response_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a positive integer, got "
                    f"{getattr(self, name)}"
                )
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"--holdout must be in (0, 1), got {self.holdout}")
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning-rate must be > 0, got {self.learning_rate}")


def _scores(
    rm: ScalarHeadModel, tok: Any, prompts: list[str], responses: list[str], cfg: RewardConfig
) -> torch.Tensor:
    b = encode_pairs(tok, prompts, responses, cfg.max_prompt_len, cfg.max_response_len)
    b = b.to(model_device(rm))
    return rm.score(b.input_ids, b.attention_mask).cpu()


@torch.no_grad()
def score_all(
    rm: ScalarHeadModel,
    tok: Any,
    prompts: list[str],
    responses: list[str],
    cfg: RewardConfig,
    chunk: int = 64,
) -> torch.Tensor:
    """``(N,)`` reward-model scores, computed in chunks, without gradients."""
    rm.eval()
    return torch.cat(
        [
            _scores(rm, tok, prompts[i : i + chunk], responses[i : i + chunk], cfg)
            for i in range(0, len(prompts), chunk)
        ]
    )


def accuracy(
    rm: ScalarHeadModel, tok: Any, pairs: list[dict[str, Any]], cfg: RewardConfig
) -> float:
    """Share of pairs where the chosen response scores higher (0 for no pairs)."""
    if not pairs:
        return 0.0
    prompts = [p["prompt"] for p in pairs]
    chosen = score_all(rm, tok, prompts, [p["chosen"] for p in pairs], cfg)
    rejected = score_all(rm, tok, prompts, [p["rejected"] for p in pairs], cfg)
    return float((chosen > rejected).float().mean())


def train_reward(cfg: RewardConfig) -> dict[str, Any]:
    """Train, evaluate and save the reward model; returns its metrics. Under torchrun every
    rank trains on its share of each global batch (see :mod:`cliprail.rlhf.parallel`) and rank
    0 evaluates and saves."""
    cfg.apply_threads()
    mapping = parse_column_map(cfg.columns, ("prompt", "chosen", "rejected"))
    tok = load_tokenizer(cfg.sft_model, cfg.trust_remote_code)
    pairs = load_preferences(cfg.data, tok, mapping)
    dp = DataParallel.from_env(cfg.device, fsdp=cfg.fsdp)
    try:
        return _train_reward(cfg, pairs, dp)
    finally:
        dp.close()


def _train_reward(
    cfg: RewardConfig,
    pairs: list[dict[str, Any]],
    dp: DataParallel,
    given: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """The reward-model loop; ``given`` is ``(causal LM, tokenizer)`` held in memory by the
    Python API (:func:`cliprail.rlhf.api.reward_model`): the trunk of the reward model."""
    dp.from_main(lambda: begin_run(cfg.run_dir, cfg))
    t0 = time.perf_counter()
    cost = Cost("reward", started=t0)
    g = seed_everything(cfg.seed)
    if given is not None:
        lm, tok = given
    else:
        tok = load_tokenizer(cfg.sft_model, cfg.trust_remote_code)
        lm = load_causal_lm(cfg.sft_model, cfg.trust_remote_code)
    check_vocab(tok, lm, str(cfg.sft_model))
    rm = ScalarHeadModel.from_causal_lm(lm)
    rm = dp.prepare(rm.to(dp.device))  # --fsdp: sharded over the ranks; else as it is
    train, held = split_pairs(pairs, cfg.holdout, g)
    opt = adamw(rm.parameters(), cfg.learning_rate)
    shuffle = EpochShuffle(len(train), cfg.batch_size * dp.world_size, g)  # global batches
    total = cfg.epochs * shuffle.steps_per_epoch
    ckpt = StageCheckpointer(
        cfg.run_dir,
        cfg.checkpoint_every,
        {"model": rm},
        opt,
        generators={"shuffle": g},
        dp=dp,
        cost=cost,
        shuffle=shuffle,
        started=t0,
    )
    restored = ckpt.restore() if cfg.resume else None
    start = restored[1]["step"] if restored is not None else 0
    train_rm = dp.wrap(rm)  # DDP after the restore: it starts from rank 0's weights

    with ckpt.session(cfg, "reward model", total, start, restored, tensorboard=False) as (
        bar,
        stop,
        log,
    ):
        rm.train()
        cost.mark("loop_start")
        for step in range(start, total):
            _, global_idx = shuffle.indices(step)
            idx, real = dp.shard(global_idx)
            chunk = [train[i] for i in idx]
            prompts = [p["prompt"] for p in chunk]
            # chosen and rejected in one forward: (2B,) scores
            b = encode_pairs(
                tok,
                prompts + prompts,
                [p["chosen"] for p in chunk] + [p["rejected"] for p in chunk],
                cfg.max_prompt_len,
                cfg.max_response_len,
            ).to(dp.device)
            s = last_token_scores(train_rm(b.input_ids, b.attention_mask), b.attention_mask)
            margin = s[: len(chunk)] - s[len(chunk) :]
            scale = dp.loss_scale(len(chunk) if real else 0)  # the global batch's mean
            loss = -F.logsigmoid(margin).mean() * scale  # Bradley-Terry
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
            opt.step()
            cost.add(forward=b.input_ids.numel(), backward=b.input_ids.numel())
            row = dp.reduce_stats(
                {"loss": loss.item(), "accuracy": float((margin > 0).float().mean()) * scale}
            )
            log.log(step + 1, row)
            bar.update(step + 1, f"loss {row['loss']:.3f}")
            ckpt.step_end(step + 1, stop, dict, f"after step {step + 1} of {total}")
        cost.mark("loop_end")
        bar.close()
        ckpt.total_cost()
        out = cfg.run_dir / "model"
        with dp.gathered(rm):
            if dp.is_main:  # rank 0 evaluates and saves; the others are done
                metrics = _finish(rm, tok, train, held, cfg)
                log.log(total + 1, metrics)
                with atomic_dir(out) as tmp:
                    rm.save(
                        tmp,
                        {"shift": metrics["reward_shift"], **metrics},
                        state_dict=dp.module_state(rm) if dp.fsdp else None,
                    )
                    tok.save_pretrained(str(tmp))
    if not dp.is_main:
        return {}
    cost.wall_s = ckpt.wall_s()
    atomic_write_json(cfg.run_dir / "reward_metrics.json", metrics)
    cost.write(cfg.run_dir, model=str(out))  # last: a run with stage.json is finished
    return metrics


def _finish(
    rm: ScalarHeadModel,
    tok: Any,
    train: list[dict[str, Any]],
    held: list[dict[str, Any]],
    cfg: RewardConfig,
) -> dict[str, Any]:
    """Held-out and train accuracy, and the shift that makes the demonstrations average 0."""
    metrics: dict[str, Any] = {
        "heldout_accuracy": accuracy(rm, tok, held, cfg),
        "train_accuracy": accuracy(rm, tok, train[:500], cfg),
        "pairs_train": len(train),
        "pairs_heldout": len(held),
    }
    shift = 0.0
    if cfg.demonstrations is not None:
        tok_ = load_tokenizer(cfg.sft_model, cfg.trust_remote_code)
        demos = load_demonstrations(cfg.demonstrations, tok_)[:512]
        scores = score_all(
            rm, tok, [d["prompt"] for d in demos], [d["response"] for d in demos], cfg
        )
        shift = float(scores.mean())
    metrics["reward_shift"] = shift
    return metrics
