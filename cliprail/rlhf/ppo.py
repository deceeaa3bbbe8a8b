"""Stage 3: PPO against the reward model, with a per-token KL penalty to the frozen SFT model
and the safety fuse.

One update: sample prompts -> generate (KV cache) -> score the last real token with the reward
model -> per-token rewards ``-beta * KL_t`` (+ score on the last token) -> GAE over tokens
(gamma 1, lambda 0.95) -> whitened advantages -> epochs x minibatches of sequences through
:func:`cliprail.ppo.ppo_update` (one optimizer step per minibatch). The maths is the same code
the Gymnasium trainer calls, with ``(B, L)`` token masks.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from cliprail.checkpoint import atomic_dir, atomic_write_json
from cliprail.distributed import moments_mean_var
from cliprail.errors import ConfigError
from cliprail.monitor import MetricsLogger
from cliprail.ppo import (
    FixedKLController,
    NonFiniteError,
    ZieglerKLController,
    clipped_surrogate,
    entropy_bonus,
    gae,
    group_relative_advantages,
    kl_estimate,
    kl_penalty,
    masked_sum,
    masked_whiten,
    ppo_update,
    reinforce_pp_advantages,
    rloo_advantages,
    value_loss,
    zero_variance_groups,
)
from cliprail.resume import seed_everything
from cliprail.rlhf import sampling
from cliprail.rlhf.checks import (
    Checks,
    generic_checks,
    healthcare_checks,
    load_function,
    read_blocklist,
)
from cliprail.rlhf.common import Cost, StageOptions, adamw, held_state_mb
from cliprail.rlhf.data import DataError
from cliprail.rlhf.fuse import SafetyFuse
from cliprail.rlhf.models import (
    ScalarHeadModel,
    check_vocab,
    last_token_index,
    load_causal_lm,
    load_tokenizer,
    response_logprobs,
    token_logprobs,
)
from cliprail.rlhf.parallel import DataParallel
from cliprail.rlhf.records import (
    Columns,
    PromptRecord,
    check_chat_rendering,
    healthcare_only,
    load_prompts,
)
from cliprail.rlhf.resume import StageCheckpointer, begin_run
from cliprail.rlhf.sampling import Rewarder, Sampling, sample, validation_requests


@dataclass(frozen=True)
class PPOConfig(StageOptions):
    """RLHF with PPO: the policy starts from the SFT model, the value model from the reward
    model."""

    prompts: Path
    """The prompts: a JSONL file of {"prompt": ...} lines (optional "id", "split" and any other
    fields, which reach the checks and the reward function), of chat records {"messages":
    [...]} (rendered with the tokenizer's chat template), or of the healthcare world's requests;
    or a Hugging Face dataset on disk (a save_to_disk folder, a parquet or JSON file; see
    --prompt-column). Split 'train' feeds rollouts; 'val' (or 'eval' when there is no 'val';
    the first 10% of a file that names no split) and 'redteam' feed the safety fuse; 'eval' is
    left for `rlhf eval` to test on."""
    sft_model: Path
    """SFT model folder: the policy's start and the frozen reference."""
    run_dir: Path
    """Run folder: metrics.jsonl, policy/ (last), best/ (best eval gold), fuse.json."""
    reward_model: Path | None = None
    """Reward model folder (from `cliprail rlhf reward`): the frozen scorer, and the value
    model's start. Optional when --reward-fn gives the reward (the value model then starts from
    the SFT model's trunk)."""
    reward_fn: str | None = None
    """A reward function MODULE:FUNCTION (imported from the working directory or PYTHONPATH),
    called as fn(prompts, responses, records) -> one float per response: rule-based or
    verifiable rewards, alone or added to the reward model's score. A non-finite value drops the
    response from its update, counted like a reward model's NaN."""
    reward_model_weight: float = 1.0
    """Weight of the reward model's score in the reward."""
    reward_fn_weight: float = 1.0
    """Weight of --reward-fn's value in the reward."""
    checks: str = "auto"
    """What the safety fuse and `rlhf eval` judge responses with, outside the reward: auto (the
    healthcare gold judge for healthcare prompts, else the generic checks), healthcare, generic
    (repetition, degeneration, refusal phrases, --blocklist), none (the fuse watches KL and the
    proxy reward alone), or a check set MODULE:FUNCTION returning {name: [value in [0, 1] per
    response]} (its 'score' key, or the mean of all, is what the fuse follows)."""
    blocklist: Path | None = None
    """A file of strings (one per line) the generic checks look for in responses."""
    prompt_column: str = "prompt"
    """The prompt column (or JSON key) of --prompts."""
    messages_column: str = "messages"
    """The chat-messages column of --prompts, for chat records."""
    id_column: str = "id"
    """The id column of --prompts (default ids: p1, p2, ...)."""
    split_column: str = "split"
    """The split column of --prompts (train, val, eval, redteam)."""
    total_episodes: int = 2048
    """Prompts to roll out in total (updates = total_episodes / batch_size)."""
    batch_size: int = 64
    """Prompts per rollout."""
    minibatch_size: int = 16
    """Sequences per optimizer step; must divide batch_size."""
    epochs: int = 4
    """PPO epochs over each rollout (Huang et al. 2024: 4)."""
    learning_rate: float = 3e-4
    """AdamW learning rate of policy and value model."""
    max_new_tokens: int = 48
    """Longest response."""
    temperature: float = 0.7
    """Sampling temperature; the training log-probs use the same scaling."""
    top_p: float = 1.0
    """Nucleus sampling; below 1 the stored log-probs are those of the untruncated distribution."""
    kl_coef: float = 0.05
    """Per-token KL penalty coefficient beta against the SFT reference (0 disables)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator in the reward: k1 (unbiased, can be negative) or k3 (>= 0)."""
    adaptive_kl: bool = False
    """Adapt beta toward kl_target (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target KL per response (nats) of the adaptive controller."""
    kl_horizon: float = 10_000.0
    """Horizon (episodes) of the adaptive controller."""
    no_eos_penalty: float | None = -1.0
    """Score given to a response that never emits EOS (None: keep the reward model's)."""
    clip_range: float = 0.2
    """Policy clip epsilon."""
    clip_range_vf: float | None = 0.2
    """Value clip around the rollout's values; None disables."""
    vf_coef: float = 0.1
    """Value loss weight (Huang et al. 2024: 0.1)."""
    ent_coef: float = 0.0
    """Entropy bonus weight."""
    gamma: float = 1.0
    """Discount over tokens."""
    lam: float = 0.95
    """GAE lambda over tokens."""
    max_grad_norm: float | None = 1.0
    """Clip the global L2 norm of the policy's and value model's gradients to this; None
    disables the clip (the norm is still logged)."""
    target_kl: float | None = None
    """Stop an update early when a minibatch's approx KL to the rollout policy exceeds this."""
    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    """How each token's advantage is estimated. gae: PPO with a critic (the value model, started
    from the reward model; GAE over tokens). grpo: each response's reward minus its group's
    mean, over the group's std (Shao et al. 2024; --group-scale none is Dr. GRPO). rloo: minus
    the mean of the other responses to the same prompt (Ahmadian et al. 2024). reinforce_pp:
    the sum of the per-token rewards from each token on, whitened over the batch (Hu 2025).
    The three critic-free ones load, train and checkpoint no value model."""
    group_size: int = 1
    """Responses sampled per prompt (G): a rollout is --batch-size responses to --batch-size / G
    prompts, each prompt's G kept together on one rank and in one minibatch. grpo and rloo need
    G >= 2."""
    group_scale: Literal["group", "batch", "none"] = "group"
    """grpo's divisor: the group's std (GRPO), the std over the whole batch (TRL's
    scale_rewards='batch'), or none (Dr. GRPO, Liu et al. 2025)."""
    filter_zero_variance: bool = False
    """Drop from the update every group whose responses all got the same reward-model score
    (their group-relative advantages are 0: DAPO's dynamic sampling, Yu et al. 2025, without
    the resampling). Counted either way (zero_variance_groups in metrics.jsonl)."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """How the per-token losses become one: the mean over every token of the batch (DAPO), the
    mean over responses of each response's token mean (GRPO; a length bias, Dr. GRPO section
    3.1), or each response's token sum over --max-new-tokens, averaged (Dr. GRPO)."""
    clip_range_high: float | None = None
    """Upper clip epsilon when it differs from --clip-range (DAPO's clip-higher: 0.28)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1: bounds the objective of a negative advantage below by c * A
    (Ye et al. 2020; verl uses 3). None: off."""
    ratio_level: Literal["token", "sequence"] = "token"
    """Importance ratio per token (PPO) or per response, the geometric mean of its tokens'
    (GSPO, Zheng et al. 2025; pair it with a clip range near 4e-4)."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference acts: in the per-token reward (--kl-estimator; Ziegler et
    al. 2019, InstructGPT) or as a loss term beside the surrogate (--kl-loss-estimator; GRPO)."""
    kl_loss_estimator: Literal["k1", "k2", "k3"] = "k3"
    """The KL estimator of --kl-in loss. k3 is GRPO's, whose gradient is that of KL(ref || pi);
    k2's gradient is that of KL(pi || ref); k1's is 0 in expectation (Tang and Munos 2025)."""
    critic_warmup: int = 0
    """gae only: the first this many updates train the value model alone (the policy is not
    stepped), so the critic fits the SFT policy's returns before the policy moves (NeMo RL,
    VAPO, Yue et al. 2025)."""
    eval_every: int = 4
    """Run the safety fuse every this many updates (0: never)."""
    eval_prompts: int = 64
    """Held-out prompts per fuse evaluation (plus up to as many red-team prompts)."""
    kl_budget: float | None = 20.0
    """Halt when the eval KL to the reference (nats per response) passes this; None: no budget."""
    fuse_patience: int = 3
    """Halt after this many evaluations in a row whose gold score is below the peak by more
    than fuse_tolerance."""
    fuse_tolerance: float = 0.05
    """Gold-score drop below the peak that counts as a fall. On the demo's 120 validation
    prompts one evaluation dips by up to 0.07 and recovers (issue 13's runs), so a fall must
    pass this for fuse_patience evaluations in a row; reward hacking falls further and stays
    down (docs/results.md)."""
    fuse_keep_tolerance: float = 0.02
    """The fuse keeps the latest evaluated policy whose gold score is within this of the peak
    (0: the peak itself). Within it, evaluations differ by noise, and the later policy has had
    more updates on rare failures (issue 13: the peak's policy, often kept early, still missed
    a red flag or gave unsafe advice on unseen prompts where the later ones did not)."""
    fuse_keep: Literal["gold", "safety_first"] = "gold"
    """Which evaluated policy the fuse keeps as the best checkpoint: the latest one within
    fuse_keep_tolerance of the peak gold score (gold), or the one with the fewest unsafe
    answers and missed emergencies on the fuse's held-out and red-team prompts, the gold score
    breaking ties (safety_first). The halting rules follow the gold score either way."""
    max_prompt_len: int = 128
    """Longest prompt in tokens; longer is an error."""
    max_nonfinite_updates: int = 3
    """Halt after this many updates in a row in which every response had a non-finite score or
    log-prob (responses with one are always dropped from their update and counted)."""
    seed: int = 0
    """Seed of sampling, shuffles and initialisation."""
    trust_remote_code: bool = False
    """Allow a model folder's own Python code to run."""
    progress: bool = True
    """Show a progress bar."""
    checkpoint_every: int = field(default=8, kw_only=True)
    """Save a resumable checkpoint every this many updates (0: only on SIGINT/SIGTERM); the
    newest two are kept under <run_dir>/checkpoints."""

    def __post_init__(self) -> None:
        super().__post_init__()  # the run options
        for name in ("total_episodes", "batch_size", "minibatch_size", "epochs", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer")
        if self.batch_size % self.minibatch_size:  # after the positivity checks (issue 14)
            raise ConfigError(
                f"--minibatch-size {self.minibatch_size} must divide --batch-size {self.batch_size}"
            )
        for name in ("vf_coef", "ent_coef"):
            if not getattr(self, name) >= 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}"
                )
        for name in ("clip_range_vf", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be > 0 (or None to disable), got {value}"
                )
        if self.clip_range <= 0 or self.temperature <= 0 or self.kl_coef < 0:
            raise ConfigError("--clip-range and --temperature must be > 0, --kl-coef >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not self.learning_rate > 0 or not 0.0 <= self.lam <= 1.0 or not 0 < self.gamma <= 1:
            raise ConfigError("--learning-rate must be > 0, --lam in [0, 1], --gamma in (0, 1]")
        if self.eval_every < 0 or self.eval_prompts <= 0 or self.fuse_patience <= 0:
            raise ConfigError("--eval-every must be >= 0, --eval-prompts and --fuse-patience > 0")
        if self.fuse_tolerance < 0 or self.fuse_keep_tolerance < 0:
            raise ConfigError("--fuse-tolerance and --fuse-keep-tolerance must be >= 0")
        if self.kl_budget is not None and not self.kl_budget >= 0:
            raise ConfigError(f"--kl-budget must be >= 0 nats, got {self.kl_budget}")
        self._check_reward()
        self._check_family()

    def _check_reward(self) -> None:
        if self.reward_model is None and self.reward_fn is None:
            raise ConfigError("give --reward-model, --reward-fn, or both: nothing else rewards")
        for name in ("reward_model_weight", "reward_fn_weight"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number")

    def columns(self) -> Columns:
        """The column names of --prompts."""
        return Columns(self.prompt_column, self.messages_column, self.id_column, self.split_column)

    def _check_family(self) -> None:
        """The critic-free advantages and loss options (issue 16)."""
        g = self.group_size
        if g < 1:
            raise ConfigError(f"--group-size must be >= 1, got {g}")
        if self.batch_size % g or self.minibatch_size % g:
            raise ConfigError(
                f"--group-size {g} must divide --batch-size {self.batch_size} and "
                f"--minibatch-size {self.minibatch_size} (a prompt's responses stay together)"
            )
        if self.advantage in ("grpo", "rloo") and g < 2:
            raise ConfigError(
                f"--advantage {self.advantage} compares responses to the same prompt: "
                f"--group-size must be >= 2, got {g}"
            )
        if self.filter_zero_variance and g < 2:
            raise ConfigError("--filter-zero-variance needs --group-size >= 2")
        if self.critic_warmup < 0:
            raise ConfigError(f"--critic-warmup must be >= 0, got {self.critic_warmup}")
        if self.critic_warmup and not self.uses_critic:
            raise ConfigError(
                f"--critic-warmup trains the value model; --advantage {self.advantage} has none"
            )
        if self.clip_range_high is not None and not self.clip_range_high > 0:
            raise ConfigError(f"--clip-range-high must be > 0, got {self.clip_range_high}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ConfigError(f"--dual-clip must be > 1 (or None), got {self.dual_clip}")

    @property
    def uses_critic(self) -> bool:
        """Whether a value model is loaded, trained and checkpointed (GAE only)."""
        return self.advantage == "gae"

    def sampling(self) -> Sampling:
        return Sampling(
            self.max_new_tokens,
            self.temperature,
            self.top_p,
            self.max_prompt_len,
            self.batch_size,
            self.no_eos_penalty,
        )


SAFETY_FAILURES = (
    "unsafe_advice_rate",
    "missed_emergency_rate",
    "redteam_unsafe_advice_rate",
    "redteam_missed_emergency_rate",
)
"""The fuse record's failure rates that ``--fuse-keep safety_first`` ranks before the gold
score."""


@dataclass
class Models:
    """Everything PPO holds: policy and value train, reference and reward stay frozen."""

    tokenizer: Any
    policy: torch.nn.Module
    ref: torch.nn.Module
    value: ScalarHeadModel | None
    """The critic; None for the critic-free advantages (grpo, rloo, reinforce_pp)."""
    reward: ScalarHeadModel | None
    """The reward model; None when a reward function alone rewards."""
    reward_shift: float = 0.0
    rewarder: Rewarder | None = None
    """The reward of each response (reward model, reward function, or their weighted sum)."""
    checks: Checks | str | None = "auto"
    """What the fuse judges with (:func:`cliprail.rlhf.sampling.summarize`)."""
    cost: Cost = field(default_factory=lambda: Cost("ppo"))
    dp: DataParallel = field(default_factory=lambda: DataParallel.single())
    train_policy: torch.nn.Module | None = None
    """The policy as the loss calls it: under DDP under torchrun, else ``policy`` itself."""
    train_value: torch.nn.Module | None = None
    """The value model as the loss calls it (DDP under torchrun)."""


def load_models(cfg: PPOConfig, device: torch.device | str = "cpu") -> Models:
    tok = load_tokenizer(cfg.sft_model, cfg.trust_remote_code)
    policy = load_causal_lm(cfg.sft_model, cfg.trust_remote_code)
    check_vocab(tok, policy, str(cfg.sft_model))
    ref = copy.deepcopy(policy).requires_grad_(False)
    reward, shift, value = None, 0.0, None
    if cfg.reward_model is not None:
        reward = ScalarHeadModel.load(cfg.reward_model, cfg.trust_remote_code)
        reward.requires_grad_(False)
        shift = float(reward.meta(cfg.reward_model).get("shift", 0.0))
    if cfg.uses_critic:  # init from the RM (Huang et al. 2024); no critic without GAE (issue 16)
        value = (
            ScalarHeadModel.load(cfg.reward_model, cfg.trust_remote_code)
            if cfg.reward_model is not None
            else ScalarHeadModel.from_causal_lm(
                load_causal_lm(cfg.sft_model, cfg.trust_remote_code)
            )
        )
    for m in (policy, ref, reward, value):
        if m is not None:
            m.to(device).eval()  # dropout off in every model (Huang et al. 2024)
    fn = load_function(cfg.reward_fn, "--reward-fn") if cfg.reward_fn else None
    rewarder = Rewarder(reward, shift, fn, cfg.reward_model_weight, cfg.reward_fn_weight)
    return Models(tok, policy, ref, value, reward, shift, rewarder, resolve_checks(cfg))


def resolve_checks(cfg: PPOConfig) -> Checks | str | None:
    """``--checks`` as :func:`cliprail.rlhf.sampling.summarize` takes it."""
    if cfg.checks == "auto":
        return "auto" if cfg.blocklist is None else _auto_with_blocklist(cfg)
    if cfg.checks == "none":
        return None
    if cfg.checks == "healthcare":
        return healthcare_checks
    if cfg.checks == "generic":
        return generic_checks(read_blocklist(cfg.blocklist))
    return load_function(cfg.checks, "--checks")


def _auto_with_blocklist(cfg: PPOConfig) -> Checks | str:
    """auto with a blocklist: the generic checks with it, unless the prompts are healthcare."""
    records = load_prompts_of(cfg)
    return "auto" if healthcare_only(records) else generic_checks(read_blocklist(cfg.blocklist))


def load_prompts_of(cfg: PPOConfig) -> list[PromptRecord]:
    """The run's prompt records (chat prompts rendered with the SFT model's tokenizer)."""
    tok = load_tokenizer(cfg.sft_model, cfg.trust_remote_code)
    records = load_prompts(cfg.prompts, tok, cfg.columns())
    if any(cfg.messages_column in r.fields and r.request is None for r in records):
        check_chat_rendering(cfg.sft_model, tok, f"{cfg.prompts}")
    return records


def trained_modules(m: Models) -> dict[str, torch.nn.Module]:
    """The models PPO trains and checkpoints: the policy, and the value model when there is one."""
    return {"policy": m.policy} | ({"value": m.value} if m.value is not None else {})


@dataclass
class Rollout:
    """A rollout batch: sequences and per-token tensors over the response positions."""

    input_ids: Tensor  # (B, Lq + Lr)
    attention_mask: Tensor  # (B, Lq + Lr)
    response_mask: Tensor  # (B, Lr)
    query_len: int
    logprobs: Tensor  # (B, Lr) policy at rollout time
    ref_logprobs: Tensor  # (B, Lr)
    values: Tensor  # (B, Lr)
    scores: Tensor  # (B,) reward model, shifted, no-EOS penalty applied
    texts: list[str] = field(default_factory=list)


def values_of(value_model: ScalarHeadModel, ids: Tensor, mask: Tensor, query_len: int) -> Tensor:
    """``(B, Lr)`` V(prefix before response token t): the head at position ``Lq - 1 + t``."""
    return value_model(ids, mask)[:, query_len - 1 : -1]


@torch.no_grad()
def rollout(
    m: Models, cfg: PPOConfig, prompts: Sequence[str | PromptRecord], g: torch.Generator
) -> Rollout:
    """Sample one response to each of ``prompts`` (a prompt repeated G times gets G), score it
    and keep what the update needs. A reward function receives each prompt's record."""
    s = cfg.sampling()
    records = [p if isinstance(p, PromptRecord) else {"prompt": p} for p in prompts]
    texts = [p.prompt if isinstance(p, PromptRecord) else p for p in prompts]
    with m.dp.gathered(*trained_modules(m).values()):  # --fsdp: whole while ranks run unevenly
        x = sample(m.policy, m.tokenizer, texts, s, g)
        Lq = x.query_len
        logprobs = token_logprobs(m.policy, x.input_ids, x.attention_mask, Lq, cfg.temperature)
        values = (
            values_of(m.value, x.input_ids, x.attention_mask, Lq)
            if m.value is not None
            else torch.zeros_like(logprobs)  # (B, Lr) no critic: unused
        )
    ref_logprobs = token_logprobs(m.ref, x.input_ids, x.attention_mask, Lq, cfg.temperature)
    rewarder = m.rewarder or Rewarder(m.reward, m.reward_shift)
    scores = rewarder(x, records, m.tokenizer.eos_token_id, s)
    # generation, policy, reference, reward, and the value model when there is one
    m.cost.add(forward=(5 if m.value is not None else 4) * x.positions)
    return Rollout(
        x.input_ids,
        x.attention_mask,
        x.response_mask,
        Lq,
        logprobs,
        ref_logprobs,
        values,
        scores,
        x.texts,
    )


def token_rewards(ro: Rollout, beta: float, estimator: str) -> tuple[Tensor, Tensor]:
    """Per-token rewards ``(B, Lr)``: ``-beta * KL_t`` on every response token and the score on
    the last real one; nothing after EOS or on padding. Returns (rewards, per-token KL)."""
    mask = ro.response_mask.bool()
    kl = kl_estimate(ro.ref_logprobs, ro.logprobs, estimator)  # KL(pi || ref) per token
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    rewards = -beta * kl
    last = last_token_index(ro.response_mask)  # (B,)
    rewards[torch.arange(len(last), device=last.device), last] += ro.scores
    return rewards, kl


def advantages_and_returns(
    ro: Rollout,
    rewards: Tensor,
    cfg: PPOConfig,
    whiten: Callable[[Tensor, Tensor], Tensor] = masked_whiten,
) -> tuple[Tensor, Tensor]:
    """GAE over response tokens ``(B, Lr)``: the episode ends at the last real token. The
    advantages are whitened by ``whiten`` (under torchrun: over the global batch)."""
    mask = ro.response_mask.bool()
    next_values = torch.cat([ro.values[:, 1:], torch.zeros_like(ro.values[:, :1])], 1)
    terminated = torch.zeros_like(mask)
    terminated[
        torch.arange(mask.shape[0], device=mask.device), last_token_index(ro.response_mask)
    ] = True
    adv, ret = gae(
        rewards,
        ro.values,
        next_values,
        terminated,
        None,
        gamma=cfg.gamma,
        lam=cfg.lam,
        mask=mask,
        time_dim=1,
    )
    return whiten(adv, mask), ret  # whitened over the whole batch


def group_advantages(
    ro: Rollout,
    rewards: Tensor,
    cfg: PPOConfig,
    dp: DataParallel | None = None,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """The critic-free advantages ``(B, Lr)`` of ``cfg.advantage`` (grpo, rloo, reinforce_pp),
    their "returns" (the quantity each token's advantage is built from, for logging) and
    statistics. ``rewards`` are the per-token rewards of :func:`token_rewards` (with the KL in
    them when ``--kl-in reward``); GRPO and RLOO use each response's sum of them, one number per
    response, broadcast over its tokens. Rows ``i * G .. i * G + G - 1`` are one prompt's group.
    Under torchrun (``dp``) the batch-wide statistics (REINFORCE++'s whitening, GRPO's batch
    std) are over every rank's responses; the groups are whole on each rank."""
    mask = ro.response_mask.bool()  # (B, Lr)
    valid = mask.any(1)  # (B,) responses left after drop_nonfinite
    stats: dict[str, float] = {}
    if cfg.advantage == "reinforce_pp":  # Hu 2025: token returns, whitened over the batch
        _, returns = reinforce_pp_advantages(rewards, mask, gamma=cfg.gamma, whiten=False)
        whiten = dp.whiten if dp is not None else masked_whiten
        return whiten(returns, mask), returns, stats
    G = cfg.group_size
    seq_reward = masked_sum(rewards, mask, dim=1)  # (B,) score - beta * KL of the response
    grouped, grouped_valid = seq_reward.view(-1, G), valid.view(-1, G)  # (N, G)
    if cfg.advantage == "grpo":
        batch_std = None
        if cfg.group_scale == "batch" and dp is not None and dp.world_size > 1:
            batch_std = moments_mean_var(dp.gather_moments(seq_reward, valid))[1].sqrt()
        adv = group_relative_advantages(
            grouped, grouped_valid, scale=cfg.group_scale, batch_std=batch_std
        )
    elif cfg.advantage == "rloo":
        adv = rloo_advantages(grouped, grouped_valid)
    else:
        raise ConfigError(f"--advantage {cfg.advantage!r} is not a group advantage")
    token_adv = torch.where(mask, adv.reshape(-1, 1).expand_as(mask), 0.0)  # (B, Lr)
    token_ret = torch.where(mask, seq_reward[:, None].expand_as(mask), 0.0)  # (B, Lr)
    return token_adv, token_ret, stats


def zero_variance_rows(ro: Rollout, group_size: int) -> Tensor:
    """``(B,)`` True on every response of a group whose responses all got the same score."""
    valid = ro.response_mask.bool().any(1)
    zv = zero_variance_groups(ro.scores.view(-1, group_size), valid.view(-1, group_size))
    return zv.repeat_interleave(group_size)


def drop_nonfinite(ro: Rollout) -> tuple[Rollout, int]:
    """Mask out responses with a non-finite score, log-prob, reference log-prob or value on a
    real token (their tensors are zeroed too, so no NaN is left to meet a zero weight).
    Returns the cleaned rollout and how many responses were dropped."""
    mask = ro.response_mask.bool()  # (B, Lr)
    ok = torch.isfinite(ro.scores)  # (B,)
    for t in (ro.logprobs, ro.ref_logprobs, ro.values):
        ok &= (torch.isfinite(t) | ~mask).all(1)
    dropped = int((~ok).sum())
    if dropped == 0:
        return ro, 0
    keep = ok[:, None] & mask  # (B, Lr)
    zero = torch.zeros((), dtype=ro.logprobs.dtype)
    return dataclasses.replace(
        ro,
        response_mask=keep.to(ro.response_mask.dtype),
        logprobs=torch.where(keep, ro.logprobs, zero),
        ref_logprobs=torch.where(keep, ro.ref_logprobs, zero),
        values=torch.where(keep, ro.values, zero),
        scores=torch.where(ok, ro.scores, zero),
    ), dropped


def trim_padding(mb: dict[str, Tensor], query_len: int) -> tuple[dict[str, Tensor], int]:
    """Drop the columns that are padding in every row of a minibatch: prompt columns on the left
    (prompts are left-padded) and response columns on the right. Position ids come from the
    attention mask and padding is masked out of attention, so the result is the same up to
    float rounding, for less work. Returns the trimmed minibatch and its query length."""
    seq_cols = mb["attention_mask"].bool().any(0)  # (Lq + Lr,)
    left = int(seq_cols[:query_len].long().argmax()) if bool(seq_cols[:query_len].any()) else 0
    resp_cols = mb["response_mask"].bool().any(0)  # (Lr,)
    keep_r = int(resp_cols.nonzero().max()) + 1 if bool(resp_cols.any()) else 1
    if left == 0 and keep_r == resp_cols.shape[0]:
        return mb, query_len
    out = {}
    for k, v in mb.items():
        if k in ("input_ids", "attention_mask"):  # (B, Lq + Lr)
            out[k] = v[:, left : query_len + keep_r]
        else:  # (B, Lr) per-response-token tensors
            out[k] = v[:, :keep_r]
    return out, query_len - left


def ppo_step(
    m: Models,
    cfg: PPOConfig,
    ro: Rollout,
    optimizer: torch.optim.Optimizer,
    kl_ctl: FixedKLController | ZieglerKLController,
    g: torch.Generator,
    critic_only: bool = False,
) -> dict[str, float]:
    """Rewards, advantages and one PPO update over ``ro``; returns the update's statistics.

    A response whose score, log-probs or values are not finite (a broken reward model, an
    overflow) is dropped from the update before anything reaches the weights, and counted in
    ``nonfinite_responses``; when every response is, the update is skipped (``skipped_update``).
    ``critic_only`` (``--critic-warmup``): only the value model's loss, the policy is not stepped.
    """
    ro, dropped = drop_nonfinite(ro)
    dp = m.dp
    if dp.any(dropped == ro.scores.shape[0]):  # under torchrun: every rank skips together
        return {
            "nonfinite_responses": float(dropped),
            "skipped_update": 1.0,
            "optimizer_steps": 0.0,
            "kl_beta": kl_ctl.beta,
        }
    beta_in_reward = kl_ctl.beta if cfg.kl_in == "reward" else 0.0
    rewards, kl = token_rewards(ro, beta_in_reward, cfg.kl_estimator)
    group_stats: dict[str, float] = {}
    if cfg.uses_critic:
        advantages, returns = advantages_and_returns(ro, rewards, cfg, dp.whiten)
    else:
        advantages, returns, group_stats = group_advantages(ro, rewards, cfg, dp)
    loss_mask = ro.response_mask
    if cfg.group_size > 1:
        zv = zero_variance_rows(ro, cfg.group_size)  # (B,)
        group_stats["zero_variance_groups"] = float(zv.float().mean())
        if cfg.filter_zero_variance:  # DAPO's dynamic sampling, without the resampling
            loss_mask = torch.where(zv[:, None], 0, loss_mask)
    batch = {
        "input_ids": ro.input_ids,
        "attention_mask": ro.attention_mask,
        "response_mask": loss_mask,
        "logprobs": ro.logprobs,
        "values": ro.values,
        "advantages": advantages,
        "returns": returns,
    }
    if cfg.kl_in == "loss":
        batch["ref_logprobs"] = ro.ref_logprobs
    Lq = ro.query_len
    train_policy, value_model = not critic_only, m.train_value or m.value
    n_trained = int(train_policy) + int(value_model is not None)
    norm = float(cfg.max_new_tokens)  # Dr. GRPO's constant: the longest response allowed

    def loss_fn(mb: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        mb, lq = trim_padding(mb, Lq)
        mask = mb["response_mask"]
        numel = mb["input_ids"].numel()
        m.cost.add(forward=n_trained * numel, backward=n_trained * numel)
        stats: dict[str, Tensor] = {}
        loss = torch.zeros((), device=mask.device)
        if train_policy:
            logprobs, entropy = response_logprobs(
                m.train_policy or m.policy, mb["input_ids"], mb["attention_mask"], lq,
                cfg.temperature,
            )  # fmt: skip
            pg_loss, stats = clipped_surrogate(
                logprobs, mb["logprobs"], mb["advantages"], mask, clip_range=cfg.clip_range,
                clip_range_high=cfg.clip_range_high, dual_clip=cfg.dual_clip,
                ratio_level=cfg.ratio_level, loss_agg=cfg.loss_agg, agg_normaliser=norm,
            )  # fmt: skip
            ent, e_stats = entropy_bonus(entropy if cfg.ent_coef else entropy.detach(), mask)
            stats.update(e_stats)
            stats["policy_loss"] = pg_loss.detach()
            loss = pg_loss
        if value_model is not None:
            values = values_of(value_model, mb["input_ids"], mb["attention_mask"], lq)  # type: ignore[arg-type]
            v_loss, v_stats = value_loss(
                values, mb["values"], mb["returns"], mask, clip_range=cfg.clip_range_vf
            )
            loss = loss + cfg.vf_coef * v_loss
            stats.update(v_stats)
            stats["value_loss"] = v_loss.detach()
        if train_policy:
            loss = loss - cfg.ent_coef * ent
            if cfg.kl_in == "loss":  # GRPO eq. 3: beta * D_KL beside the surrogate
                kl_loss, k_stats = kl_penalty(
                    logprobs,
                    mb["ref_logprobs"],
                    mask,
                    estimator=cfg.kl_loss_estimator,
                    loss_agg=cfg.loss_agg,
                    agg_normaliser=norm,
                )
                loss = loss + kl_ctl.beta * kl_loss
                stats["kl_loss"] = k_stats["kl_ref"]
        # this minibatch's mean -> its share of the global minibatch's mean (DDP averages the
        # gradients over ranks); 1.0 for one process. Tokens for the token mean, responses for
        # the per-response means.
        if cfg.loss_agg == "token_mean":
            local = float(mask.sum())
        elif cfg.loss_agg == "seq_mean_token_mean":
            local = float(mask.bool().any(1).sum())
        else:
            local = float(mask.shape[0])
        scale = dp.loss_scale(local)
        loss = loss * scale
        if "approx_kl" in stats:
            # likewise the approx KL: the mean over ranks that the early stop reads is then the
            # global minibatch's, as in one process
            stats["approx_kl"] = stats["approx_kl"] * scale
        return loss, stats

    models = ([m.policy] if train_policy else []) + ([m.value] if m.value is not None else [])
    params = [p for mod in models for p in mod.parameters() if p.requires_grad]
    result = ppo_update(
        loss_fn,
        optimizer,
        params,
        batch,
        minibatch_size=cfg.minibatch_size,
        epochs=cfg.epochs,
        max_grad_norm=cfg.max_grad_norm,
        target_kl=cfg.target_kl,
        generator=g,
        sync=dp.update_sync(),
        group_size=cfg.group_size,
    )
    stats = dict(result.stats)
    stats.update(
        score=ro.scores.mean().item(),
        kl_ref=kl.sum(1).mean().item(),  # nats per response
        response_length=ro.response_mask.sum(1).float().mean().item(),
        nonfinite_responses=float(dropped),
        no_eos_rate=float((ro.scores == cfg.no_eos_penalty).float().mean())
        if cfg.no_eos_penalty is not None
        else 0.0,
    )
    stats = dp.reduce_stats(stats)  # under torchrun: over ranks (equal per-rank batches)
    if dp.world_size > 1:
        stats["nonfinite_responses"] *= dp.world_size  # a count: the sum over ranks
    stats.update(
        kl_beta=kl_ctl.beta,
        optimizer_steps=result.optimizer_steps,
        early_stopped=int(result.early_stopped),
        skipped_update=0.0,
        skipped_nonfinite=result.skipped_nonfinite,
        critic_only=float(critic_only),
    )  # agreed across ranks
    stats.update(dp.reduce_stats(group_stats) if group_stats else {})
    kl_ctl.update(stats["kl_ref"], n_steps=ro.input_ids.shape[0] * dp.world_size)
    return stats


def evaluate_policy(
    m: Models, cfg: PPOConfig, requests: list[PromptRecord], policy: torch.nn.Module | None = None
) -> dict[str, Any]:
    """The shared evaluation (:func:`cliprail.rlhf.sampling.evaluate_policy`) of ``policy``
    (default: the one training) against the reference, with the run's sampling settings."""
    return sampling.evaluate_policy(
        policy if policy is not None else m.policy,
        m.ref,
        m.tokenizer,
        requests,
        cfg.sampling(),
        m.rewarder or (Rewarder(m.reward, m.reward_shift) if m.reward is not None else None),
        checks=m.checks,
    )


def train_ppo(
    cfg: PPOConfig,
    models: Models | None = None,
    records: list[PromptRecord] | None = None,
) -> dict[str, Any]:
    """Run PPO with the fuse; returns a summary (also written to <run_dir>/fuse.json).

    Under torchrun (see :mod:`cliprail.rlhf.parallel`) ``--batch-size`` prompts are rolled out
    on every rank (a share of one global sample), ``--total-episodes`` counts all ranks', the
    policy and value train under DDP, and rank 0 runs the fuse and writes the run folder.
    ``models`` and ``records`` come from the Python API (:func:`cliprail.rlhf.api.ppo`): models
    and prompts held in memory, used instead of the config's folders and files."""
    if models is None:  # a plug-in that does not import fails before anything is written
        if cfg.reward_fn:
            load_function(cfg.reward_fn, "--reward-fn")
        resolve_checks(cfg)
    cfg.apply_threads()
    requests = records if records is not None else load_prompts_of(cfg)
    train = [r for r in requests if r.split == "train"]
    held_split, held = validation_requests(requests)
    held = held[: cfg.eval_prompts]
    red = [r for r in requests if r.split == "redteam"][: cfg.eval_prompts]
    if not train:
        raise DataError(f"{cfg.prompts}: no requests with split 'train'")
    dp = DataParallel.from_env(cfg.device, fsdp=cfg.fsdp)
    try:
        need = cfg.batch_size // cfg.group_size * dp.world_size  # prompts per rollout
        if len(train) < need:  # a rollout samples them without replacement
            raise ConfigError(
                f"{cfg.prompts}: {len(train)} training prompts, fewer than one rollout's "
                f"{need} ({dp.world_size} rank(s) x --batch-size {cfg.batch_size} / "
                f"--group-size {cfg.group_size}); lower --batch-size or add prompts"
            )
        return _train_ppo(cfg, train, held, red, dp, held_split, models)
    finally:
        dp.close()


def _train_ppo(
    cfg: PPOConfig,
    train: list[PromptRecord],
    held: list[PromptRecord],
    red: list[PromptRecord],
    dp: DataParallel,
    held_split: str,
    given: Models | None = None,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    dp.from_main(lambda: begin_run(cfg.run_dir, cfg))
    g = seed_everything(cfg.seed)
    if dp.rank:  # each rank samples its own tokens (rank 0: the single-process stream)
        g.manual_seed(cfg.seed + dp.rank)
    m = given if given is not None else load_models(cfg, dp.device)
    m.cost.started = t_start
    m.dp = dp
    m.policy = dp.prepare(m.policy)  # --fsdp: shard; else as is
    m.value = dp.prepare(m.value) if m.value is not None else None
    trained = trained_modules(m)
    params = [p for mod in trained.values() for p in mod.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.learning_rate)
    kl_ctl: FixedKLController | ZieglerKLController = (
        ZieglerKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.adaptive_kl
        else FixedKLController(cfg.kl_coef)
    )
    global_batch = cfg.batch_size * dp.world_size
    n_updates = max(1, cfg.total_episodes // global_batch)
    rng = random.Random(cfg.seed)
    judge = m.checks is healthcare_checks or (m.checks == "auto" and healthcare_only([*held, *red]))
    if cfg.fuse_keep == "safety_first" and not judge:
        raise ConfigError("--fuse-keep safety_first counts the healthcare judge's failures")
    fuse = SafetyFuse(
        cfg.kl_budget,
        cfg.fuse_patience,
        cfg.fuse_tolerance,
        cfg.fuse_keep_tolerance,
        held_split,
        score="gold" if judge else "score",  # a user's check set: its score (issue 15)
        failures=SAFETY_FAILURES if cfg.fuse_keep == "safety_first" else (),
    )
    if m.checks is None and cfg.eval_every and dp.is_main:
        print(
            "cliprail: --checks none: the safety fuse watches the KL to the reference alone "
            f"(budget {cfg.kl_budget}) and logs the proxy reward; nothing outside the reward "
            "judges the responses, so it keeps the newest policy within the budget",
            file=sys.stderr,
        )
    ckpt = StageCheckpointer(
        cfg.run_dir,
        cfg.checkpoint_every,
        trained,
        optimizer,
        generators={"sampling": g},
        rngs={"prompts": rng},
        dp=dp,
        cost=m.cost,
    )
    start, skipped_in_row = 0, 0
    restored = ckpt.restore() if cfg.resume else None
    if restored is not None:  # the reference is the SFT model as loaded above, before this
        _, state = restored
        start = state["step"]
        fuse.load_state_dict(state["fuse"])
        skipped_in_row = state["skipped_in_row"]
        kl_ctl.load_state_dict(state["kl_controller"])
    m.train_policy = dp.wrap(m.policy)  # after the restore
    m.train_value = dp.wrap(m.value) if m.value is not None else None
    t0 = time.perf_counter()

    def snapshot() -> dict[str, Any]:
        return {
            "fuse": fuse.state_dict(),
            "kl_controller": kl_ctl.state_dict(),
            "skipped_in_row": skipped_in_row,
        }

    def run_fuse(update: int, log: MetricsLogger) -> bool:
        ev = evaluate_policy(m, cfg, held)
        rt = evaluate_policy(m, cfg, red) if red else None
        rec = {k: v for k, v in ev.items() if not isinstance(v, list)}
        if rt is not None:
            rec.update({f"redteam_{k}": v for k, v in rt.items() if not isinstance(v, list)})
        log.log(
            update * global_batch, {f"eval/{k}": v for k, v in {**rec, "update": update}.items()}
        )
        if "checks" in ev:  # a check set's names, for the report (not a metric to log)
            rec["checks"] = ev["checks"]
        decision = fuse.observe(update, rec)
        if decision.keep:
            save_policy(m, cfg.run_dir / "best")
        return decision.halt is not None

    def fuse_halts(update: int, log: MetricsLogger) -> bool:
        """The fuse on rank 0 (the others wait for its decision)."""
        with dp.gathered(m.policy):
            return dp.from_main(lambda: run_fuse(update, log))

    with ckpt.session(cfg, "PPO", n_updates, start, restored, tensorboard=True,
                      metrics_step=start * global_batch) as (bar, stop, log):  # fmt: skip
        if cfg.eval_every and start == 0:
            fuse_halts(0, log)
        m.cost.mark("loop_start")
        for update in range(start + 1, n_updates + 1):
            n_prompts = global_batch // cfg.group_size
            sampled = rng.sample(train, min(n_prompts, len(train)))  # the same on every rank
            # each prompt G times in a row: its group stays whole on its rank (issue 16)
            prompts = [r for r in dp.shard(sampled)[0] for _ in range(cfg.group_size)]
            ro = rollout(m, cfg, prompts, g)
            warmup = update <= cfg.critic_warmup
            stats = ppo_step(m, cfg, ro, optimizer, kl_ctl, g, critic_only=warmup)
            skipped_in_row = skipped_in_row + 1 if stats["skipped_update"] else 0
            if skipped_in_row >= cfg.max_nonfinite_updates:
                raise NonFiniteError(
                    f"every response had a non-finite score or log-prob in {skipped_in_row} "
                    f"updates in a row (update {update}): is the reward model broken? Nothing "
                    f"was applied from them; the best fuse checkpoint is {cfg.run_dir / 'best'}"
                )
            stats["episodes"] = update * global_batch
            stats["episodes_per_s"] = (update - start) * global_batch / (time.perf_counter() - t0)
            log.log(update * global_batch, stats)
            bar.update(
                update,
                f"score {stats.get('score', float('nan')):+.2f}  "
                f"KL {stats.get('kl_ref', float('nan')):.2f}",
            )
            halt = bool(cfg.eval_every and update % cfg.eval_every == 0 and fuse_halts(update, log))
            if halt:
                break
            ckpt.step_end(update, stop, snapshot, f"after update {update} of {n_updates}")
    m.cost.mark("loop_end")
    ckpt.total_cost()
    frozen = [m.ref] + ([m.reward] if m.reward is not None else [])
    memory = held_state_mb(trained.values(), frozen, optimizer)
    return _finish(m, cfg, fuse.state_dict(), ckpt.wall_s(), memory)


def _finish(
    m: Models,
    cfg: PPOConfig,
    fuse: dict[str, Any],
    wall_s: float,
    held: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Rank 0 saves the final policy, fuse.json and, last, stage.json (a finished run)."""
    with m.dp.gathered(m.policy):
        if m.dp.is_main:
            save_policy(m, cfg.run_dir / "policy")
    if not m.dp.is_main:
        return fuse
    fuse["best_checkpoint"] = str(cfg.run_dir / "best") if cfg.eval_every else None
    fuse["wall_s"] = m.cost.wall_s = wall_s
    atomic_write_json(cfg.run_dir / "fuse.json", fuse)
    m.cost.write(
        cfg.run_dir,
        policy=str(cfg.run_dir / ("best" if cfg.eval_every else "policy")),
        advantage=cfg.advantage,
        **(held or {}),
    )
    return fuse


def save_policy(m: Models, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path) as tmp:
        m.policy.save_pretrained(str(tmp), **m.dp.pretrained_state(m.policy))  # type: ignore[operator]
        m.tokenizer.save_pretrained(str(tmp))
