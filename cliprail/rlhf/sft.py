"""Stage 1: supervised fine-tuning on demonstrations, loss on response tokens only.

With no ``--model`` the stage builds the demo's model: a BPE tokenizer trained on the data and a
tiny GPT-2 from a config. With ``--model DIR`` it fine-tunes any local causal LM.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cliprail.checkpoint import atomic_dir
from cliprail.errors import ConfigError
from cliprail.ppo import masked_mean
from cliprail.resume import seed_everything
from cliprail.rlhf.common import Cost, EpochShuffle, StageOptions, adamw
from cliprail.rlhf.data import encode_pairs, read_extra_tokens
from cliprail.rlhf.models import (
    check_vocab,
    load_causal_lm,
    load_tokenizer,
    tiny_gpt2,
    token_logprobs,
    tokenizer_from_json,
    train_tokenizer,
)
from cliprail.rlhf.parallel import DataParallel
from cliprail.rlhf.records import CHAT_FILE, chat_signature, load_demonstrations, parse_column_map
from cliprail.rlhf.resume import StageCheckpointer, begin_run


@dataclass(frozen=True)
class SFTConfig(StageOptions):
    """Supervised fine-tuning on ``demonstrations.jsonl``."""

    data: Path
    """demonstrations.jsonl: one {"prompt", "response"} object per line."""
    run_dir: Path
    """Run folder; the fine-tuned model and tokenizer go to <run_dir>/model."""
    model: Path | None = None
    """A local causal-LM folder to fine-tune; none builds a tiny GPT-2 and a tokenizer."""
    columns: str = ""
    """Which columns of --data hold the fields read, as FIELD=COLUMN pairs (e.g.
    'prompt=question,response=answer'): for a JSONL file with other keys, or a Hugging Face
    dataset on disk (a save_to_disk folder, a parquet or JSON file), which --data may be."""
    epochs: int = 12
    """Passes over the demonstrations."""
    batch_size: int = 16
    """Demonstrations per optimizer step."""
    learning_rate: float = 2e-3
    """AdamW learning rate (a tiny model from scratch wants a large one; fine-tuning a
    pretrained model wants ~1e-5)."""
    max_prompt_len: int = 128
    """Longest prompt in tokens; a longer one is an error, never silently cut."""
    max_response_len: int = 64
    """Responses are cut to this many tokens (EOS included)."""
    vocab_size: int = 1024
    """Tokenizer vocabulary when one is trained."""
    extra_tokens: Path | None = None
    """A JSON file holding a list of strings, each made a single token of the trained tokenizer
    (`cliprail rlhf world` writes tokens.json: the calendar slots and clinicians, which the tiny
    model then copies from the prompt as one id each). Ignored with --model."""
    n_layer: int = 2
    """Layers of the tiny GPT-2."""
    n_embd: int = 64
    """Width of the tiny GPT-2."""
    n_head: int = 4
    """Attention heads of the tiny GPT-2."""
    seed: int = 0
    """Seed of initialisation and shuffling."""
    trust_remote_code: bool = False
    """Allow a model folder's own Python code to run (off: only built-in architectures)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        super().__post_init__()  # the run options
        for name in (
            "epochs",
            "batch_size",
            "max_prompt_len",
            "max_response_len",
            "n_layer",
            "n_embd",
            "n_head",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a positive integer, got "
                    f"{getattr(self, name)}"
                )
        if self.n_embd % self.n_head:
            raise ConfigError(f"--n-head {self.n_head} must divide --n-embd {self.n_embd}")
        if self.vocab_size < 300:
            raise ConfigError(
                f"--vocab-size must be at least 300 (256 bytes + specials + "
                f"merges), got {self.vocab_size}"
            )
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning-rate must be > 0, got {self.learning_rate}")


def train_sft(cfg: SFTConfig) -> Path:
    """Run SFT; returns the folder of the fine-tuned model (with its tokenizer). Under torchrun
    every rank trains on its share of each global batch (see :mod:`cliprail.rlhf.parallel`)."""
    cfg.apply_threads()
    # chat demonstrations render with the model's chat template (a trained tokenizer has none:
    # the plain template), the same rendering PPO gives chat prompts
    template_tok = load_tokenizer(cfg.model, cfg.trust_remote_code) if cfg.model else None
    mapping = parse_column_map(cfg.columns, ("prompt", "response", "messages"))
    demos = load_demonstrations(cfg.data, template_tok, mapping)
    read_extra_tokens(cfg.extra_tokens)  # a bad tokens file fails before the run folder exists
    dp = DataParallel.from_env(cfg.device, fsdp=cfg.fsdp)
    try:
        return _train_sft(cfg, demos, dp)
    finally:
        dp.close()


def _train_sft(
    cfg: SFTConfig,
    demos: list[dict[str, Any]],
    dp: DataParallel,
    given: tuple[Any, Any] | None = None,
) -> Path:
    """The SFT loop; ``given`` is ``(model, tokenizer)`` held in memory by the Python API
    (:func:`cliprail.rlhf.api.sft`), trained in place instead of loaded."""
    dp.from_main(lambda: begin_run(cfg.run_dir, cfg))
    t0 = time.perf_counter()
    cost = Cost("sft", started=t0)
    g = seed_everything(cfg.seed)
    tok_dir = cfg.run_dir / "tokenizer"  # a trained tokenizer is kept, so --resume reuses it
    if given is not None:
        model, tokenizer = given
        check_vocab(tokenizer, model, "the model given")
    elif cfg.model is None:

        def tokenizer_json() -> str:  # rank 0 trains (or reloads) it; the others get its JSON
            if cfg.resume and tok_dir.is_dir():
                return str(load_tokenizer(tok_dir).backend_tokenizer.to_str())
            texts = [d["prompt"] for d in demos] + [d["response"] for d in demos]
            trained = train_tokenizer(texts, cfg.vocab_size, read_extra_tokens(cfg.extra_tokens))
            with atomic_dir(tok_dir) as tmp:
                trained.save_pretrained(str(tmp))
            return str(trained.backend_tokenizer.to_str())

        tokenizer = tokenizer_from_json(dp.from_main(tokenizer_json))
        model = tiny_gpt2(
            len(tokenizer),
            cfg.n_layer,
            cfg.n_embd,
            cfg.n_head,
            seed=cfg.seed,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    else:
        tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
        model = load_causal_lm(cfg.model, cfg.trust_remote_code)
        check_vocab(tokenizer, model, str(cfg.model))
    model.train()
    model = dp.prepare(model.to(dp.device))  # --fsdp: sharded over the ranks; else as it is
    opt = adamw(model.parameters(), cfg.learning_rate)
    shuffle = EpochShuffle(len(demos), cfg.batch_size * dp.world_size, g)  # global batches
    total = cfg.epochs * shuffle.steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(total, 1))
    ckpt = StageCheckpointer(
        cfg.run_dir,
        cfg.checkpoint_every,
        {"model": model},
        opt,
        sched,
        {"shuffle": g},
        dp=dp,
        cost=cost,
        shuffle=shuffle,
        started=t0,
    )
    restored = ckpt.restore() if cfg.resume else None
    start = restored[1]["step"] if restored is not None else 0
    train_model = dp.wrap(model)  # DDP after the restore: it starts from rank 0's weights

    with ckpt.session(cfg, "SFT", total, start, restored, tensorboard=False) as (bar, stop, log):
        cost.mark("loop_start")
        for step in range(start, total):
            epoch, global_idx = shuffle.indices(step)
            idx, real = dp.shard(global_idx)
            b = encode_pairs(
                tokenizer,
                [demos[i]["prompt"] for i in idx],
                [demos[i]["response"] for i in idx],
                cfg.max_prompt_len,
                cfg.max_response_len,
            ).to(dp.device)
            logprobs = token_logprobs(train_model, b.input_ids, b.attention_mask, b.query_len)
            count = b.response_mask.sum() if real else torch.zeros(())
            # the mean over response tokens only; under torchrun over the global batch's tokens
            loss = -masked_mean(logprobs, b.response_mask) * dp.loss_scale(float(count))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            cost.add(forward=b.input_ids.numel(), backward=b.input_ids.numel())
            row = dp.reduce_stats({"loss": loss.item()})
            log.log(step + 1, {**row, "epoch": epoch})
            bar.update(step + 1, f"loss {row['loss']:.3f}")
            ckpt.step_end(step + 1, stop, dict, f"after step {step + 1} of {total}")
    cost.mark("loop_end")
    out = cfg.run_dir / "model"
    with dp.gathered(model):
        if dp.is_main:
            with atomic_dir(out) as tmp:
                model.save_pretrained(str(tmp), **dp.pretrained_state(model))
                tokenizer.save_pretrained(str(tmp))
                # how this model's demonstrations were rendered as chat (issue 15): PPO and the
                # reward model check that their prompts render the same way
                (tmp / CHAT_FILE).write_text(json.dumps({"signature": chat_signature(tokenizer)}))
    ckpt.total_cost()
    if dp.is_main:
        cost.wall_s = ckpt.wall_s()
        cost.write(cfg.run_dir, policy=str(out))  # last: a run with stage.json is finished
    return out
