"""RLHF PPO (and GRPO) episodes per second: cliprail vs TRL's PPOTrainer (GRPOTrainer), same
models and work, one process.

What is compared. Both libraries run PPO on the healthcare scenario from the *same* files:

* world: ``cliprail.scenarios.healthcare.build(BuildConfig(seed))`` (prompts.jsonl: the 'train'
  split feeds rollouts, the 'eval' split is held out for the gold score);
* policy and frozen reference: cliprail's SFT model (a BPE tokenizer and a 2-layer, 64-wide GPT-2
  trained by ``cliprail.rlhf.sft.train_sft``), loaded with ``AutoModelForCausalLM``;
* reward model and value-model start: cliprail's reward model (``train_reward``), a GPT-2 trunk
  plus a scalar head (:class:`cliprail.rlhf.models.ScalarHeadModel`).

SFT and reward-model training are short (``--sft-epochs``, ``--rm-epochs``), untimed, and reused
when ``--out`` already holds them. Then, per repeat, cliprail's ``train_ppo`` and TRL's
``PPOTrainer.train`` each roll out ``--episodes`` prompts in batches of ``--batch-size`` with
responses of at most ``--response-length`` tokens (stop at EOS), and run ``--epochs`` PPO epochs of
``--minibatch-size`` sequences per optimizer step. The timed span of each is "config in, trained
policy out": cliprail's ``train_ppo`` call (it loads its models, trains, writes its metrics and
saves the policy) and, for TRL, loading the four models and the tokenized prompts, building
``PPOTrainer`` and ``train()``. The model-loading/setup share is printed too. Episodes per second
= episodes / that time; the last line is the ratio. With ``--repeats N`` the runs alternate
(cliprail, TRL, cliprail, ...) and medians are reported. After training, both policies are
scored by the same function, ``cliprail.rlhf.ppo.evaluate_policy`` (same seed, same sampling
settings): gold = the healthcare judge's score averaged over the held-out eval prompts.

The floor. Last, the script times the model passes this work needs, alone
(:func:`model_floor`): per rollout batch the reference, reward and value forwards, then every
epoch's policy and value forward+backward, on the same prompt batches with responses of the
mean length cliprail's run produced; no generation, PPO maths or optimizer. No library running
these models on the same PyTorch kernels can do the work faster, so TRL's time / floor bounds
the ratio any of them could print.

Fairness choices (both sides get the same values):

* torch threads 2 (``torch.set_num_threads``), fp32, CPU (TRL: ``use_cpu``, ``bf16=False``);
* learning rate ``--lr`` (AdamW, eps 1e-5, no weight decay, constant schedule: cliprail's
  ``adamw``; TRL: ``adam_epsilon=1e-5``, ``lr_scheduler_type="constant"``, its default optimizer);
* temperature 0.7, top-p 1, per-token k1 KL penalty ``kl_coef`` 0.05 against the SFT reference,
  gamma 1, lambda 0.95, policy clip 0.2, value clip 0.2, vf_coef 0.1, no entropy bonus, no reward
  whitening, advantages whitened over the batch, dropout off;
* one optimizer step per minibatch: TRL gets ``per_device_train_batch_size=batch``,
  ``gradient_accumulation_steps=1``, ``num_mini_batches=batch/minibatch`` (with gradient
  accumulation instead, accelerate would step once per ``gradient_accumulation_steps``
  minibatches), ``local_rollout_forward_batch_size=batch`` (the whole rollout in one generate
  call, as in cliprail);
* no gradient-norm clipping: TRL's PPO loop never clips, so cliprail gets ``max_grad_norm=None``
  (it still measures the norm);
* no missing-EOS penalty on either side: the two define it differently (cliprail replaces the
  score of a response without EOS by a constant, TRL subtracts a constant from it) and with
  16-token responses most responses are cut before EOS, so either would dominate the reward;
* the reward model's mean-demonstration shift (saved with cliprail's reward model and subtracted
  by cliprail) is folded into the bias of TRL's reward head, so both see the same scores;
* no evaluation, sample generations, checkpoints, progress bars or loggers during the timed run
  (cliprail: ``eval_every=0``, ``progress=False``; TRL: ``num_sample_generations=0``,
  ``report_to="none"``, ``save_strategy="no"``, its printer/progress callback removed). TRL's
  gradient checkpointing (on by default in TRL configs) is off, as cliprail has none.

The adapter. TRL's PPOTrainer reads reward and value models through
``getattr(model, model.base_model_prefix)`` (the trunk) and ``model.score(hidden_states[-1])``,
the ``AutoModelForSequenceClassification`` layout. :func:`seq_cls_from_scalar_head` loads a
``GPT2ForSequenceClassification`` from the reward model's folder (the same trunk weights) and
replaces its bias-free ``score`` by a ``Linear`` holding cliprail's scalar head (weight and bias,
minus the shift for the reward model). The script asserts, before anything is timed, that TRL's
``get_reward`` through the adapters gives cliprail's reward scores and per-token values within
1e-5 on held-out sequences. No shim of TRL or transformers was needed: trl 1.12.0 runs as
installed on transformers 5.24 and torch 2.13.

GRPO (``--algo grpo``, issue 16). cliprail's ``--advantage grpo`` against TRL 1.12's
``GRPOTrainer`` (transformers generation, no vLLM) on the same SFT policy, reference, reward
model and prompts: ``--batch-size`` completions per rollout, ``--group-size`` per prompt (TRL's
``num_generations``; a generation batch of ``--batch-size``, ``steps_per_generation`` =
batch / minibatch), ``--epochs`` passes over each (TRL's ``num_iterations``), minibatches of
``--minibatch-size`` completions with one optimizer step each, group-std advantages, the token
mean over the minibatch (TRL's ``loss_type="dapo"``), clip 0.2, the KL as a k3 loss term with
coefficient ``--beta`` (both then run the reference model), gradient clip 1.0, temperature 0.7,
no value model on either side. TRL gets cliprail's reward model as a reward function over the
token ids it generated (:class:`RewardModelFn`: no detour through decoded text, so both score
the same sequences). Its floor drops the value model's passes.

What still differs (each library's own algorithm, not the setup): TRL samples with
``transformers``' ``generate`` and takes the rollout log-probs from its scores, cliprail with its
own KV-cache loop; TRL masks values one token past EOS (``padding_mask_p1``); the prompt order
(TRL's shuffled DataLoader vs cliprail's seeded sampling) and the random streams differ, so the
gold scores are comparable in level, not bit for bit.

    pip install -e '.[bench]' -c constraints.txt
    python benchmarks/rlhf_vs_trl.py [--episodes 128] [--repeats 1] [--out DIR]
    python benchmarks/rlhf_vs_trl.py --algo grpo [--group-size 4] [--beta 0.05]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import THREADS, add_run_args, alternate, work_folder, world_and_sft
from torch import nn

from cliprail.rlhf.models import (
    HEAD_FILE,
    ScalarHeadModel,
    load_causal_lm,
    load_tokenizer,
)
from cliprail.rlhf.ppo import (
    Models,
    PPOConfig,
    evaluate_policy,
    load_models,
    train_ppo,
    values_of,
)
from cliprail.rlhf.records import PromptRecord
from cliprail.rlhf.sampling import load_requests


@dataclass(frozen=True)
class Setup:
    """The shared inputs of both runs."""

    prompts: Path
    sft_model: Path
    reward_model: Path
    reward_shift: float
    train: list[PromptRecord]
    held: list[PromptRecord]


def build_setup(out: Path, args: argparse.Namespace) -> Setup:
    """World, SFT model and reward model with cliprail's own code (reused if already in out)."""
    from cliprail.rlhf.reward import RewardConfig, train_reward

    data, sft = world_and_sft(out, args)
    rm = out / "rm" / "model"
    if not (rm / HEAD_FILE).is_file():
        shutil.rmtree(out / "rm", ignore_errors=True)
        t0 = time.perf_counter()
        res = train_reward(
            RewardConfig(
                data=data["preferences"],
                sft_model=sft,
                run_dir=out / "rm",
                demonstrations=data["demonstrations"],
                epochs=args.rm_epochs,
                seed=args.seed,
                progress=False,
            )
        )
        print(
            f"setup: reward model trained in {time.perf_counter() - t0:.0f} s (untimed), "
            f"held-out pairwise accuracy {res['heldout_accuracy']:.3f}",
            flush=True,
        )
    shift = float(json.loads((rm / "scalar_head.json").read_text()).get("shift", 0.0))
    requests = load_requests(data["prompts"])
    train = [r for r in requests if r.split == "train"]
    held = [r for r in requests if r.split == "eval"][: args.eval_prompts]
    return Setup(data["prompts"], sft, rm, shift, train, held)


def cliprail_config(setup: Setup, args: argparse.Namespace, run_dir: Path) -> PPOConfig:
    return PPOConfig(
        prompts=setup.prompts,
        sft_model=setup.sft_model,
        reward_model=setup.reward_model,
        run_dir=run_dir,
        total_episodes=args.episodes,
        batch_size=args.batch_size,
        minibatch_size=args.minibatch_size,
        epochs=args.epochs,
        learning_rate=args.lr,
        max_new_tokens=args.response_length,
        temperature=0.7,
        top_p=1.0,
        kl_coef=0.05,
        kl_estimator="k1",
        no_eos_penalty=None,
        clip_range=0.2,
        clip_range_vf=0.2,
        vf_coef=0.1,
        ent_coef=0.0,
        gamma=1.0,
        lam=0.95,
        max_grad_norm=None,  # type: ignore[arg-type]  # TRL's PPO loop does not clip
        eval_every=0,
        eval_prompts=len(setup.held),
        kl_budget=None,
        seed=args.seed,
        progress=False,
    )


def cliprail_grpo_config(setup: Setup, args: argparse.Namespace, run_dir: Path) -> PPOConfig:
    """cliprail's side of ``--algo grpo``: the clip without a critic, TRL GRPOTrainer's defaults
    where they are a choice (token mean over the minibatch, TRL's "dapo"; group std; the KL as a
    k3 loss term with coefficient --beta; gradient clip 1.0)."""
    return dataclasses.replace(
        cliprail_config(setup, args, run_dir),
        advantage="grpo",
        group_size=args.group_size,
        group_scale="group",
        loss_agg="token_mean",
        kl_in="loss",
        kl_loss_estimator="k3",
        kl_coef=args.beta,
        clip_range_vf=None,
        max_grad_norm=1.0,
    )


def seq_cls_from_scalar_head(path: Path, shift: float = 0.0) -> nn.Module:
    """cliprail's scalar-head model at ``path`` in the layout TRL reads: a
    ``*ForSequenceClassification`` whose trunk holds the same weights and whose ``score`` is the
    scalar head (its bias lowered by ``shift``)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized": it is replaced below
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=1, use_safetensors=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    head = load_file(str(path / HEAD_FILE))
    score = nn.Linear(head["weight"].shape[1], 1, bias=True)
    with torch.no_grad():
        score.weight.copy_(head["weight"])
        score.bias.copy_(head["bias"] - shift)
    model.score = score
    return model.eval()


@torch.no_grad()
def check_adapters(setup: Setup, args: argparse.Namespace) -> float:
    """Assert that TRL's ``get_reward`` through the adapters equals cliprail's reward scores and
    per-token values (within 1e-5) on held-out prompts with demonstration-like responses."""
    from trl.experimental.utils import get_reward

    from cliprail.rlhf.data import encode_prompts

    tok = load_tokenizer(setup.sft_model)
    reward = ScalarHeadModel.load(setup.reward_model).eval()
    chunk = setup.held[:8]
    q, _ = encode_prompts(tok, [r.prompt for r in chunk], 128)
    # responses of different lengths, right-padded as TRL does after a stop token
    texts = [
        "Your appointment is confirmed.",
        "I cannot give medical advice here; please call the clinic.",
        "Booked: Tuesday 10:00 with the nurse.",
        "Please call 911 now.",
    ]
    resp = [
        [*tok.encode(texts[i % len(texts)])[: args.response_length - 1], tok.eos_token_id]
        for i in range(len(chunk))
    ]
    Lr = max(len(r) for r in resp)
    r_ids = torch.full((len(chunk), Lr), tok.pad_token_id, dtype=torch.long)
    for i, r in enumerate(resp):
        r_ids[i, : len(r)] = torch.tensor(r)
    ids = torch.cat([q, r_ids], 1)
    mask = (ids != tok.pad_token_id).long()
    Lq = q.shape[1]
    ours = reward.score(ids, mask) - setup.reward_shift
    _, theirs, _ = get_reward(
        seq_cls_from_scalar_head(setup.reward_model, setup.reward_shift), ids, tok.pad_token_id, Lq
    )
    err = float((ours - theirs).abs().max())
    assert err < 1e-5, f"reward adapter differs from cliprail's scores by {err}"
    ours_v = values_of(reward, ids, mask, Lq)
    full, _, _ = get_reward(seq_cls_from_scalar_head(setup.reward_model), ids, tok.pad_token_id, Lq)
    theirs_v = full[:, Lq - 1 : -1].squeeze(-1)
    real = (ids[:, Lq:] != tok.pad_token_id).bool()
    err_v = float((ours_v - theirs_v).abs()[real].max())
    assert err_v < 1e-5, f"value adapter differs from cliprail's values by {err_v}"
    return max(err, err_v)


@dataclass
class Result:
    episodes: int
    seconds: float
    setup_seconds: float
    gold: float
    proxy: float


def evaluate(
    eval_models: Models, setup: Setup, args: argparse.Namespace, policy: nn.Module
) -> tuple[float, float]:
    cfg = cliprail_config(setup, args, Path(args.out) / "eval")
    ev = evaluate_policy(eval_models, cfg, setup.held, policy=policy.eval())
    return float(ev["gold"]), float(ev["proxy_reward"])


def run_cliprail(
    setup: Setup,
    args: argparse.Namespace,
    rep: int,
    eval_models: Models,
    config: Callable[[Setup, argparse.Namespace, Path], PPOConfig] = cliprail_config,
) -> Result:
    """cliprail's timed run: ``train_ppo`` on the ``config`` built for this repeat."""
    torch.set_num_threads(THREADS)
    run_dir = Path(args.out) / f"ppo-cliprail-{rep}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = config(setup, args, run_dir)
    t0 = time.perf_counter()
    fuse = train_ppo(cfg)
    seconds = time.perf_counter() - t0
    episodes = max(1, cfg.total_episodes // cfg.batch_size) * cfg.batch_size
    gold, proxy = evaluate(eval_models, setup, args, load_causal_lm(run_dir / "policy"))
    return Result(episodes, seconds, seconds - fuse["wall_s"], gold, proxy)


def run_trl(setup: Setup, args: argparse.Namespace, rep: int, eval_models: Models) -> Result:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.ppo import PPOConfig as TRLPPOConfig
    from trl.experimental.ppo import PPOTrainer

    torch.set_num_threads(THREADS)
    out_dir = Path(args.out) / f"ppo-trl-{rep}"
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    tok = load_tokenizer(setup.sft_model)
    policy = AutoModelForCausalLM.from_pretrained(str(setup.sft_model), use_safetensors=True)
    ref = AutoModelForCausalLM.from_pretrained(str(setup.sft_model), use_safetensors=True)
    reward = seq_cls_from_scalar_head(setup.reward_model, setup.reward_shift)
    value = seq_cls_from_scalar_head(setup.reward_model)
    dataset = Dataset.from_dict({"input_ids": [tok.encode(r.prompt) for r in setup.train]})
    config = TRLPPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=args.batch_size // args.minibatch_size,
        num_ppo_epochs=args.epochs,
        total_episodes=args.episodes,
        local_rollout_forward_batch_size=args.batch_size,
        response_length=args.response_length,
        stop_token="eos",
        temperature=0.7,
        kl_coef=0.05,
        kl_estimator="k1",
        missing_eos_penalty=None,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        adam_epsilon=1e-5,
        weight_decay=0.0,
        num_sample_generations=0,
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        train_dataset=dataset,
        value_model=value,
    )
    setup_seconds, seconds = train_trl(trainer, t0)
    episodes = int(trainer.state.episode)
    trained = trainer.accelerator.unwrap_model(trainer.model).policy
    gold, proxy = evaluate(eval_models, setup, args, trained)
    return Result(episodes, seconds, setup_seconds, gold, proxy)


def train_trl(trainer: Any, t0: float) -> tuple[float, float]:
    """Train a TRL trainer with its printing callbacks removed; returns (setup seconds, total
    seconds) since ``t0``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    torch.set_num_threads(THREADS)
    setup_seconds = time.perf_counter() - t0
    with contextlib.redirect_stdout(sys.stderr):  # PPO's "===training policy===" banner
        trainer.train()
    return setup_seconds, time.perf_counter() - t0


def run_cliprail_grpo(
    setup: Setup, args: argparse.Namespace, rep: int, eval_models: Models
) -> Result:
    return run_cliprail(setup, args, rep, eval_models, cliprail_grpo_config)


class RewardModelFn:
    """TRL's reward-function protocol over cliprail's reward model, on the token ids TRL
    generated (prompt re-encoded as cliprail encodes it, left-padded; the completion as TRL
    sampled it, EOS included): the same scores cliprail's rollout computes, with no detour
    through decoded text."""

    __name__ = "cliprail_reward_model"

    def __init__(self, setup: Setup) -> None:
        self.tok = load_tokenizer(setup.sft_model)
        self.model = ScalarHeadModel.load(setup.reward_model).eval()
        self.shift = setup.reward_shift

    @torch.no_grad()
    def __call__(
        self, prompts: list[str], completion_ids: list[list[int]], **_: object
    ) -> list[float]:
        from cliprail.rlhf.data import encode_prompts

        q, qm = encode_prompts(self.tok, list(prompts), 128)
        Lr = max(1, max(len(c) for c in completion_ids))
        r = torch.full((len(prompts), Lr), self.tok.pad_token_id, dtype=torch.long)
        rm = torch.zeros((len(prompts), Lr), dtype=qm.dtype)
        for i, c in enumerate(completion_ids):
            r[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            rm[i, : len(c)] = 1
        ids, mask = torch.cat([q, r], 1), torch.cat([qm, rm], 1)
        return (self.model.score(ids, mask) - self.shift).tolist()


def run_trl_grpo(setup: Setup, args: argparse.Namespace, rep: int, eval_models: Models) -> Result:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(THREADS)
    out_dir = Path(args.out) / f"grpo-trl-{rep}"
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    tok = load_tokenizer(setup.sft_model)
    policy = AutoModelForCausalLM.from_pretrained(str(setup.sft_model), use_safetensors=True)
    dataset = Dataset.from_dict({"prompt": [r.prompt for r in setup.train]})
    per_rollout = args.batch_size // args.minibatch_size  # optimizer steps per epoch
    config = GRPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=args.minibatch_size,
        gradient_accumulation_steps=1,
        steps_per_generation=per_rollout,  # one generation batch = --batch-size completions
        num_generations=args.group_size,
        num_iterations=args.epochs,
        max_steps=args.episodes // args.batch_size * per_rollout * args.epochs,
        max_completion_length=args.response_length,
        temperature=0.7,
        top_p=1.0,
        beta=args.beta,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        adam_epsilon=1e-5,
        weight_decay=0.0,
        max_grad_norm=1.0,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        disable_dropout=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10**9,
        disable_tqdm=True,
        log_completions=False,
        seed=args.seed,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=RewardModelFn(setup),
        args=config,
        train_dataset=dataset,
        processing_class=tok,
    )
    setup_seconds, seconds = train_trl(trainer, t0)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    gold, proxy = evaluate(eval_models, setup, args, trained)
    return Result(args.episodes, seconds, setup_seconds, gold, proxy)


def response_length_of(run_dir: Path) -> int:
    """Mean response length (tokens, rounded down) over the updates of a cliprail PPO run."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lengths = [json.loads(x)["response_length"] for x in lines if '"response_length"' in x]
    return max(1, int(statistics.mean(lengths)))


def model_floor(
    setup: Setup, args: argparse.Namespace, response_len: int, critic: bool = True
) -> float:
    """Seconds the model passes of this PPO work take alone: a lower bound for any library that
    runs the same models with the same PyTorch kernels.

    Per rollout batch (the train prompts in order, left-padded per batch as both libraries do,
    followed by ``response_len`` tokens): the reference, reward and value forward passes without
    gradients (the rollout's old log-probs can come from generation, as in TRL), then for every
    epoch and minibatch a policy forward+backward (LM head on the response positions only) and a
    value forward+backward. Left out, so the bound is generous: generation, the PPO maths, the
    optimizer steps and anything else either library does. Without a ``critic`` (GRPO) there is
    no value model: the reference and reward forwards and the policy's passes alone."""
    from cliprail.rlhf.data import encode_prompts
    from cliprail.rlhf.models import token_logprobs

    torch.set_num_threads(THREADS)
    tok = load_tokenizer(setup.sft_model)
    policy = load_causal_lm(setup.sft_model).eval()
    ref = load_causal_lm(setup.sft_model).eval().requires_grad_(False)
    value = ScalarHeadModel.load(setup.reward_model).eval()
    reward = ScalarHeadModel.load(setup.reward_model).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    group = 1 if critic else args.group_size  # GRPO: batch / G prompts, each G times
    for start in range(0, args.episodes // group, args.batch_size // group):
        chunk = [
            r for r in setup.train[start : start + args.batch_size // group] for _ in range(group)
        ]
        q, qm = encode_prompts(tok, [r.prompt for r in chunk], 128)
        resp = torch.randint(0, len(tok), (len(chunk), response_len), generator=g)
        ids = torch.cat([q, resp], 1)  # (B, Lq + Lr)
        mask = torch.cat([qm, torch.ones_like(resp)], 1)
        Lq = q.shape[1]
        with torch.no_grad():
            token_logprobs(ref, ids, mask, Lq)
            reward(ids, mask)
            if critic:
                value(ids, mask)
        for _ in range(args.epochs):
            for mb in range(0, len(chunk), args.minibatch_size):
                rows = slice(mb, mb + args.minibatch_size)
                token_logprobs(policy, ids[rows], mask[rows], Lq).sum().backward()
                if critic:
                    value(ids[rows], mask[rows])[:, Lq - 1 : -1].sum().backward()
    return time.perf_counter() - t0


def summarise(name: str, results: list[Result]) -> float:
    sec = statistics.median(r.seconds for r in results)
    eps = statistics.median(r.episodes / r.seconds for r in results)
    setup_s = statistics.median(r.setup_seconds for r in results)
    gold = statistics.median(r.gold for r in results)
    proxy = statistics.median(r.proxy for r in results)
    med = " (medians)" if len(results) > 1 else ""
    print(
        f"{name}: {results[0].episodes} episodes in {sec:.1f} s = {eps:.2f} episodes/s, "
        f"gold {gold:.3f}, proxy reward {proxy:+.3f}{med}; model loading and setup "
        f"{setup_s:.1f} s of it",
        flush=True,
    )
    return eps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--episodes",
        type=int,
        default=128,
        help="prompts rolled out per run, a multiple of --batch-size (updates = episodes / "
        "batch size); default 128",
    )
    ap.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="prompts per rollout, the same for both; default 16 (the batch REFERENCES.md "
        "reports TRL at)",
    )
    ap.add_argument(
        "--minibatch-size",
        type=int,
        default=16,
        help="sequences per optimizer step; must divide --batch-size; default 16 (one "
        "minibatch per epoch)",
    )
    ap.add_argument("--epochs", type=int, default=4, help="PPO epochs per rollout; default 4")
    ap.add_argument(
        "--response-length",
        type=int,
        default=16,
        help="most tokens per response (both stop at EOS); default 16",
    )
    ap.add_argument(
        "--lr",
        type=float,
        default=3e-4,
        help="AdamW learning rate of policy and value model; default 3e-4",
    )
    ap.add_argument(
        "--rm-epochs", type=int, default=1, help="reward-model epochs (untimed setup); default 1"
    )
    ap.add_argument(
        "--eval-prompts",
        type=int,
        default=120,
        help="held-out eval prompts for the gold score (untimed); default 120 (all of them)",
    )
    ap.add_argument(
        "--algo",
        choices=("ppo", "grpo"),
        default="ppo",
        help="ppo: cliprail's PPO with a critic against TRL 1.12's PPOTrainer; grpo: cliprail's "
        "--advantage grpo against TRL 1.12's GRPOTrainer (generation through transformers, no "
        "vLLM); default ppo",
    )
    ap.add_argument(
        "--group-size",
        type=int,
        default=4,
        help="grpo: completions per prompt (TRL's num_generations); --batch-size counts "
        "completions and must be a multiple of it; default 4",
    )
    ap.add_argument(
        "--beta",
        type=float,
        default=0.05,
        help="grpo: coefficient of the k3 KL loss term to the SFT reference (TRL's beta); "
        "default 0.05, so both libraries run the reference model",
    )
    add_run_args(ap, "world, SFT, reward model, PPO or GRPO runs")
    args = ap.parse_args(argv)
    if args.algo == "grpo" and (
        args.batch_size % args.group_size or args.minibatch_size % args.group_size
    ):
        ap.error("--group-size must divide --batch-size and --minibatch-size (whole groups)")
    if args.batch_size % args.minibatch_size:
        ap.error("--minibatch-size must divide --batch-size")
    if args.episodes < args.batch_size or args.episodes % args.batch_size:
        ap.error("--episodes must be a positive multiple of --batch-size (whole rollouts)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        work_folder(stack, args, "rlhf-bench-")
        import trl  # imported before any timing: its import is slow and not PPO work
        import trl.experimental.ppo
        from trl import GRPOTrainer  # noqa: F401  (likewise)

        setup = build_setup(args.out, args)
        err = check_adapters(setup, args)
        print(
            f"setup: TRL reward/value adapters match cliprail's scalar-head model "
            f"(max abs diff {err:.1e})",
            flush=True,
        )
        eval_models = load_models(cliprail_config(setup, args, args.out / "eval"))
        sft_gold, sft_proxy = evaluate(eval_models, setup, args, eval_models.policy)
        print(
            f"setup: trl {trl.__version__}, torch {torch.__version__}, {THREADS} threads; "
            f"SFT policy before PPO: gold {sft_gold:.3f}, proxy reward {sft_proxy:+.3f} on "
            f"{len(setup.held)} held-out prompts",
            flush=True,
        )
        grpo = args.algo == "grpo"
        run_ours, run_theirs = (
            (run_cliprail_grpo, run_trl_grpo) if grpo else (run_cliprail, run_trl)
        )
        ours, theirs = alternate(
            args.repeats,
            lambda rep: run_ours(setup, args, rep, eval_models),
            lambda rep: run_theirs(setup, args, rep, eval_models),
            lambda a, b: (
                f"cliprail {a.seconds:.1f} s, gold {a.gold:.3f}; trl {b.seconds:.1f} s, "
                f"gold {b.gold:.3f}; ratio "
                f"{(a.episodes / a.seconds) / (b.episodes / b.seconds):.1f}x"
            ),
        )
        a = summarise("cliprail", ours)
        b = summarise("trl", theirs)
        response_len = response_length_of(Path(args.out) / "ppo-cliprail-0")
        floors = [
            model_floor(setup, args, response_len, critic=not grpo)
            for _ in range(max(args.repeats, 1))
        ]
        floor = statistics.median(floors)
        trl_s = statistics.median(r.seconds for r in theirs)
        passes = (
            "reference and reward forwards, {e} epochs of policy forward+backward"
            if grpo
            else "reference, reward and value forwards, {e} epochs of policy and value "
            "forward+backward"
        ).format(e=args.epochs)
        print(
            f"floor: the model passes of this work alone ({passes}; no generation, "
            f"{args.algo.upper()} maths or optimizer; {response_len}-token responses) take "
            f"{floor:.1f} s, so no library on these kernels can beat TRL by more than "
            f"{trl_s / floor:.1f}x here",
            flush=True,
        )
        print(f"ratio cliprail/trl {args.algo.upper()} episodes/s: {a / b:.1f}x")


if __name__ == "__main__":
    main()
