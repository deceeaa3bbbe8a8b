"""DPO preference pairs per second: cliprail vs TRL's DPOTrainer, same model, data and batch, one
process.

What is compared. Both libraries run DPO on the healthcare scenario from the *same* files:

* world: ``cliprail.scenarios.healthcare.build(BuildConfig(seed))``; the pairs are its
  ``preferences.jsonl`` (prompt, chosen, rejected);
* policy start and frozen reference: cliprail's SFT model (a BPE tokenizer and a 2-layer, 64-wide
  GPT-2 trained by ``cliprail.rlhf.sft.train_sft``), loaded with ``AutoModelForCausalLM``;
* the same training pairs: cliprail's ``split_pairs`` with the same seed and ``--holdout`` picks
  them for both (cliprail inside ``train_dpo``, TRL in the script, in its timed span); the held-out
  pairs train neither and score both.

SFT training is short (``--sft-epochs``), untimed, and reused when ``--out`` already holds it.
Then, per repeat, cliprail's ``train_dpo`` and TRL's ``DPOTrainer`` each run ``--epochs`` passes
over the training pairs in batches of ``--batch-size`` pairs, one optimizer step per batch. The
timed span of each is "data in, trained policy out": the ``train_dpo`` call (it reads the JSONL,
splits, loads tokenizer and model, computes the reference log-probs, trains, scores its held-out
accuracy, saves the policy) and, for TRL, reading and splitting the same JSONL, loading tokenizer
and model, building the ``datasets.Dataset`` of strings, building ``DPOTrainer`` (which tokenizes
the dataset and precomputes the reference log-probs) and ``train()``. Pairs per second = training
pairs x epochs / that time; the last line is the ratio. With ``--repeats N`` the runs alternate
(cliprail, TRL, cliprail, ...) and medians are reported. The share before the first optimizer
step is printed for each, split into loading/tokenization and reference log-probs (cliprail:
the phase timestamps the stage records in its ``stage.json``; TRL: a subclass that times
``_precompute_ref_logps``). After training, both policies are scored
by the same function, ``cliprail.rlhf.dpo.implicit_accuracy``: held-out implicit-reward accuracy
against the same reference log-probs; the mean training loss over steps is printed too.

Fairness choices (both sides get the same values):

* torch threads 2 (``torch.set_num_threads``), fp32, CPU (TRL: ``use_cpu``, ``bf16=False``),
  dropout off (cliprail: ``eval()``; TRL: ``disable_dropout``), no activation (gradient)
  checkpointing (on by default in TRL configs; cliprail has none; TRL:
  ``activation_checkpointing=False``, the name transformers 5.24 reads first);
* DPO sigmoid loss, beta ``--beta``, no label smoothing, summed response-token log-probs, batch
  mean of the per-pair loss;
* ``--batch-size`` pairs per optimizer step (TRL: ``per_device_train_batch_size``,
  ``gradient_accumulation_steps=1``; the last, partial batch is kept by both), ``--epochs``;
* AdamW fused, lr ``--lr``, eps 1e-5, betas (0.9, 0.999), no weight decay, linear decay to 0
  over all steps without warm-up, gradient-norm clip 1.0 (TRL: ``optim="adamw_torch_fused"``,
  ``adam_epsilon=1e-5``, ``lr_scheduler_type="linear"``, ``max_grad_norm=1.0``);
* reference log-probs computed once before training on both sides, 64 pairs per reference
  forward (cliprail's fixed chunk; TRL: ``precompute_ref_log_probs=True``,
  ``precompute_ref_batch_size=64``). TRL gets ``ref_model=None``: with precomputation it takes
  the reference from the policy before its first step (the SFT weights) and keeps no second
  model, its cheapest path; cliprail deep-copies the policy as its reference;
* identical token sequences. cliprail encodes ``prompt`` and ``" " + response.strip()`` apart and
  appends EOS; TRL tokenizes ``prompt + completion`` together, appends the EOS string itself and
  splits at the prompt's length. TRL's dataset therefore holds ``" " + chosen.strip()`` and
  ``" " + rejected.strip()``; every prompt ends in ``"Assistant:"``, so the BPE never merges
  across the boundary. The script asserts, before anything is timed, that the two tokenizations
  agree on every training pair, and after the first TRL run that TRL's own tokenized dataset
  holds exactly cliprail's ids (same pairs, same order). TRL 1.12 caps only prompt plus
  completion (``max_length``, keep the start), cliprail caps each part (``max_prompt_len``,
  ``max_response_len``), so the caps are set where neither cuts anything: ``--max-prompt-len``
  128, ``--max-response-len`` 96 (the longest response of this world is 81 tokens with EOS),
  TRL ``max_length`` = their sum; the script refuses caps that would cut a training sequence;
* no evaluation, checkpoints, progress bars or loggers during the timed run where the library
  lets one turn them off (TRL: ``eval_strategy="no"``, ``save_strategy="no"``,
  ``logging_strategy="no"``, ``report_to="none"``, ``disable_tqdm``, its printer/progress
  callback removed, datasets' progress bars off). cliprail's ``train_dpo`` always writes
  metrics.jsonl and TensorBoard scalars every step, scores the held-out pairs (and up to 500
  training pairs) after training and saves the policy: all inside its timed span, printed as
  "after training". TRL's span has no save.

What still differs (each library's own work, not the setup): padding (cliprail left-pads prompts and
right-pads responses, so its batch is longest prompt + longest response wide, with position ids from
the mask; TRL right-pads whole sequences, longest prompt+response wide); cliprail tokenizes each
batch as it is drawn (every epoch), TRL once up front with ``datasets.map``; TRL also computes
per-step metrics (entropy, token accuracy, logit means) from the full logits and hashes the model's
weights to key its reference-log-prob cache (a fresh random key for an in-memory dataset, so no
repeat reuses another's reference log-probs); cliprail also computes the reference log-probs of the
held-out pairs inside its span, and its log-prob helper takes a full log-softmax where TRL takes a
gather and a logsumexp (measured before cliprail stopped computing an unused per-token entropy
there: its reference pass over the training pairs was ~30% slower than TRL's, ~20% from the
entropy, ~6% from wider batches). The pair order (TRL's shuffled DataLoader vs
cliprail's seeded permutation) and so the random streams differ: accuracy and loss are comparable in
level, not bit for bit. Run it on idle cores: with other processes on the two cores, TRL slowed down
far more than cliprail (its reference pass took ~20x its idle time, cliprail's ~3x; plausibly its
many small per-row ops, e.g. the row-by-row logsumexp of ``selective_log_softmax``, each waiting on
a descheduled thread), which inflated the ratio to 3x in such a run. No shim of TRL or transformers
was needed: trl 1.12.0 runs as installed on transformers 5.24 and torch 2.13.

    pip install -e '.[bench]' -c constraints.txt
    python benchmarks/dpo_vs_trl.py [--epochs 1] [--repeats 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import THREADS, add_run_args, alternate, stage_record, work_folder, world_and_sft

from cliprail.rlhf.common import Cost, split_pairs
from cliprail.rlhf.data import load_preferences
from cliprail.rlhf.dpo import DPOConfig, implicit_accuracy, pair_logps, train_dpo
from cliprail.rlhf.models import load_causal_lm, load_tokenizer

REF_CHUNK = 64  # pairs per reference forward: cliprail's fixed chunk in _reference_logps


@dataclass(frozen=True)
class Setup:
    """The shared inputs of both runs."""

    preferences: Path
    sft_model: Path
    train: list[dict[str, Any]]
    held: list[dict[str, Any]]
    ref_held: torch.Tensor  # (n_held, 2) SFT log-probs of (chosen, rejected)


def cliprail_config(
    sft_model: Path, preferences: Path, args: argparse.Namespace, run_dir: Path
) -> DPOConfig:
    return DPOConfig(
        data=preferences,
        sft_model=sft_model,
        run_dir=run_dir,
        beta=args.beta,
        loss_type="sigmoid",
        label_smoothing=0.0,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        holdout=args.holdout,
        max_prompt_len=args.max_prompt_len,
        max_response_len=args.max_response_len,
        prompts=None,  # no sampled evaluations during training
        seed=args.seed,
        progress=False,
    )


def cliprail_ids(tok: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """cliprail's token ids of one (prompt, response), as ``encode_pairs`` builds them."""
    return tok.encode(prompt), [*tok.encode(" " + response.strip()), tok.eos_token_id]


def trl_strings(pairs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The columns of TRL's dataset: completions with cliprail's leading space (TRL adds EOS)."""
    return {
        "prompt": [p["prompt"] for p in pairs],
        "chosen": [" " + p["chosen"].strip() for p in pairs],
        "rejected": [" " + p["rejected"].strip() for p in pairs],
    }


def check_tokens(tok: Any, train: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Assert that TRL's way of tokenizing (prompt + completion + EOS string in one call, split at
    the prompt's length) gives cliprail's ids on every training pair, and that no cap cuts one."""
    cols = trl_strings(train)
    longest_p = longest_r = 0
    for i, p in enumerate(train):
        for key in ("chosen", "rejected"):
            q, r = cliprail_ids(tok, p["prompt"], p[key])
            full = tok(text=cols["prompt"][i] + cols[key][i] + tok.eos_token)["input_ids"]
            assert full[: len(q)] == q and full[len(q) :] == r, (
                f"pair {i} {key}: TRL's tokenization differs from cliprail's"
            )
            longest_p, longest_r = max(longest_p, len(q)), max(longest_r, len(r))
    if longest_p > args.max_prompt_len or longest_r > args.max_response_len:
        raise SystemExit(
            f"the longest prompt has {longest_p} tokens and the longest response {longest_r} "
            f"(with EOS): raise --max-prompt-len/--max-response-len to at least these, so neither "
            f"library cuts a sequence (TRL 1.12 caps only prompt + completion)"
        )
    return f"longest prompt {longest_p}, longest response {longest_r} tokens with EOS"


def check_trl_dataset(tok: Any, train: list[dict[str, Any]], dataset: Any) -> None:
    """Assert that TRL's own tokenized training set holds cliprail's ids, pair by pair."""
    assert len(dataset) == len(train), f"TRL kept {len(dataset)} of {len(train)} training pairs"
    cols = {k: dataset[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    for i, p in enumerate(train):
        q, c = cliprail_ids(tok, p["prompt"], p["chosen"])
        _, r = cliprail_ids(tok, p["prompt"], p["rejected"])
        got = (cols["prompt_ids"][i], cols["chosen_ids"][i], cols["rejected_ids"][i])
        assert got == (q, c, r), f"pair {i}: TRL's tokenized dataset differs from cliprail's ids"


def check_trl_training(trainer: Any, steps: int) -> None:
    """Assert that TRL trained as configured: cliprail's number of optimizer steps, fused AdamW,
    eps 1e-5, no weight decay in any parameter group, lr decayed to 0, no activation
    checkpointing, no reference model kept."""
    assert trainer.state.global_step == steps, f"TRL took {trainer.state.global_step} steps"
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"], type(opt)
    assert opt.defaults["eps"] == 1e-5, opt.defaults
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups), "weight decay is on"
    assert trainer.lr_scheduler.get_last_lr()[0] == 0.0, "the lr did not decay to 0"
    assert not trainer.args.activation_checkpointing and trainer.ref_model is None


def build_setup(out: Path, args: argparse.Namespace) -> Setup:
    """World and SFT model with cliprail's own code (reused if already in out), the split, and
    the reference log-probs of the held-out pairs (untimed, used to score both policies)."""
    data, sft = world_and_sft(out, args)
    pairs = load_preferences(data["preferences"])
    train, held = split_pairs(pairs, args.holdout, torch.Generator().manual_seed(args.seed))
    tok = load_tokenizer(sft)
    what = check_tokens(tok, train, args)
    print(
        f"setup: {len(pairs)} pairs, {len(train)} train / {len(held)} held out; TRL's and "
        f"cliprail's tokenizations agree on every training pair ({what}; nothing cut)",
        flush=True,
    )
    ref = load_causal_lm(sft).eval()
    cfg = cliprail_config(sft, data["preferences"], args, out / "unused")
    ref_held = pair_logps(ref, tok, held, cfg, Cost("bench"))
    return Setup(data["preferences"], sft, train, held, ref_held)


@dataclass
class Result:
    pairs: int  # training pairs x epochs
    seconds: float  # the whole timed span
    before: float  # before the first optimizer step
    ref: float  # reference log-probs (inside ``before``)
    loop: float  # the training loop (TRL: ``train()``)
    accuracy: float  # held-out implicit-reward accuracy
    loss: float  # mean training loss over steps


def run_cliprail(setup: Setup, args: argparse.Namespace, rep: int) -> Result:
    torch.set_num_threads(THREADS)
    run_dir = Path(args.out) / f"dpo-cliprail-{rep}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = cliprail_config(setup.sft_model, setup.preferences, args, run_dir)
    t0 = time.perf_counter()
    metrics = train_dpo(cfg)
    seconds = time.perf_counter() - t0
    assert metrics["pairs_train"] == len(setup.train), "cliprail split differs from the setup's"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    stage = stage_record(run_dir)  # the stage's own phase timestamps, from its start
    ph, before_stage = stage["phases"], seconds - stage["wall_s"]  # reading the pairs etc.
    return Result(
        pairs=len(setup.train) * args.epochs,
        seconds=seconds,
        before=before_stage + ph["loop_start"],
        ref=ph["reference_end"] - ph["reference_start"],
        loop=ph["loop_end"] - ph["loop_start"],
        accuracy=float(metrics["heldout_implicit_accuracy"]),
        loss=statistics.fmean(losses),
    )


def trl_trainer_class() -> type:
    """``DPOTrainer`` that adds up the time of its reference-log-prob precomputation."""
    from trl import DPOTrainer

    class TimedDPOTrainer(DPOTrainer):
        ref_seconds = 0.0

        def _precompute_ref_logps(self, *a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **k)
            finally:
                self.ref_seconds += time.perf_counter() - t

    return TimedDPOTrainer


def run_trl(setup: Setup, args: argparse.Namespace, rep: int) -> Result:
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DPOConfig as TRLDPOConfig

    trainer_class = trl_trainer_class()
    torch.set_num_threads(THREADS)
    out_dir = Path(args.out) / f"dpo-trl-{rep}"
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    pairs = load_preferences(setup.preferences)
    train, _ = split_pairs(pairs, args.holdout, torch.Generator().manual_seed(args.seed))
    tok = load_tokenizer(setup.sft_model)
    policy = load_causal_lm(setup.sft_model)
    dataset = Dataset.from_dict(trl_strings(train))
    config = TRLDPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        optim="adamw_torch_fused",
        adam_epsilon=1e-5,
        adam_beta1=0.9,
        adam_beta2=0.999,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=args.beta,
        loss_type=["sigmoid"],
        label_smoothing=0.0,
        max_length=args.max_prompt_len + args.max_response_len,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=REF_CHUNK,
        disable_dropout=True,
        activation_checkpointing=False,  # TRL configs default to on (as gradient_checkpointing)
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
    )
    trainer = trainer_class(
        model=policy, ref_model=None, args=config, train_dataset=dataset, processing_class=tok
    )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    torch.set_num_threads(THREADS)
    before = time.perf_counter() - t0
    out = trainer.train()
    seconds = time.perf_counter() - t0
    if rep == 0:
        check_trl_dataset(tok, setup.train, trainer.train_dataset)
        check_trl_training(trainer, args.epochs * -(-len(train) // args.batch_size))
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    cfg = cliprail_config(setup.sft_model, setup.preferences, args, out_dir)
    accuracy = implicit_accuracy(trained, tok, setup.held, setup.ref_held, cfg)
    return Result(
        pairs=len(train) * args.epochs,
        seconds=seconds,
        before=before,
        ref=trainer.ref_seconds,
        loop=seconds - before,
        accuracy=accuracy,
        loss=float(out.training_loss),
    )


def summarise(name: str, results: list[Result], after: str) -> tuple[float, float]:
    """Print one library's medians; returns (pairs/s, training-loop pairs/s)."""

    def med(f: Any) -> float:
        return statistics.median(f(r) for r in results)

    sec, before = med(lambda r: r.seconds), med(lambda r: r.before)
    ref, loop = med(lambda r: r.ref), med(lambda r: r.loop)
    pps, loop_pps = med(lambda r: r.pairs / r.seconds), med(lambda r: r.pairs / r.loop)
    rest = sec - before - loop
    tail = f", {after} {rest:.1f} s" if rest >= 0.05 else ""
    print(
        f"{name}: {results[0].pairs} pairs in {sec:.1f} s = {pps:.1f} pairs/s"
        f"{' (medians)' if len(results) > 1 else ''}; before the first step {before:.1f} s "
        f"({before / sec:.0%}: reference log-probs {ref:.1f} s, loading and tokenization "
        f"{before - ref:.1f} s), training loop {loop:.1f} s{tail}; held-out implicit-reward "
        f"accuracy {med(lambda r: r.accuracy):.3f}, mean train loss {med(lambda r: r.loss):.3f}",
        flush=True,
    )
    return pps, loop_pps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--epochs", type=int, default=1, help="passes over the training pairs; default 1"
    )
    ap.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="pairs per optimizer step, the same for both; default 32",
    )
    ap.add_argument(
        "--lr",
        type=float,
        default=2e-4,
        help="AdamW learning rate, decayed linearly to 0; default 2e-4",
    )
    ap.add_argument("--beta", type=float, default=0.1, help="DPO beta; default 0.1")
    ap.add_argument(
        "--holdout",
        type=float,
        default=0.1,
        help="share of pairs held out (cliprail's split_pairs, the same pairs for both); "
        "default 0.1",
    )
    ap.add_argument(
        "--max-prompt-len",
        type=int,
        default=128,
        help="cliprail's prompt cap in tokens (TRL: part of max_length); default 128",
    )
    ap.add_argument(
        "--max-response-len",
        type=int,
        default=96,
        help="cliprail's response cap in tokens with EOS (TRL: max_length = prompt cap + this); "
        "default 96, above this world's longest response, so neither side cuts one",
    )
    add_run_args(ap, "world, SFT model, DPO runs")
    args = ap.parse_args(argv)
    for name in ("epochs", "batch_size", "repeats", "max_prompt_len", "max_response_len"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer")
    if not 0.0 < args.holdout < 1.0:
        ap.error("--holdout must be in (0, 1)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference-precompute bar
    with contextlib.ExitStack() as stack:
        work_folder(stack, args, "dpo-bench-")
        import datasets  # imported before any timing: their imports are slow and not DPO work
        import transformers
        import trl
        import trl.trainer.dpo_trainer

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()  # "Loading weights", both sides
        # transformers 5.24 deprecation notices TRL 1.12 triggers (is_gradient_checkpointing)
        warnings.filterwarnings("ignore", category=FutureWarning)
        setup = build_setup(args.out, args)
        print(
            f"setup: trl {trl.__version__}, torch {torch.__version__}, {THREADS} threads; "
            f"{args.epochs} epoch(s) of {len(setup.train)} pairs, {args.batch_size} pairs per "
            f"step, lr {args.lr:g}, beta {args.beta:g}",
            flush=True,
        )
        ours, theirs = alternate(
            args.repeats,
            lambda rep: run_cliprail(setup, args, rep),
            lambda rep: run_trl(setup, args, rep),
            lambda x, y: (
                f"cliprail {x.seconds:.1f} s, accuracy {x.accuracy:.3f}; trl "
                f"{y.seconds:.1f} s, accuracy {y.accuracy:.3f}; ratio "
                f"{(x.pairs / x.seconds) / (y.pairs / y.seconds):.1f}x"
            ),
        )
        a, a_loop = summarise("cliprail", ours, "after training (final accuracies, save)")
        b, b_loop = summarise("trl", theirs, "after training")
        print(
            f"training loop only: cliprail {a_loop:.1f} pairs/s, trl {b_loop:.1f} pairs/s, "
            f"ratio {a_loop / b_loop:.1f}x"
        )
        print(f"ratio cliprail/trl pairs/s: {a / b:.1f}x")


if __name__ == "__main__":
    main()
