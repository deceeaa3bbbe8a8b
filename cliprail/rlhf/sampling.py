"""Sampling responses and judging them: the one evaluation every RLHF method goes through.

PPO's safety fuse, DPO's per-epoch check, best-of-n and ``cliprail rlhf compare`` all sample
with the same settings and seed, score with the same reward model, measure KL to the same
reference and read the texts with the same gold judge, so their numbers line up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from cliprail.errors import ConfigError
from cliprail.ppo import kl_estimate
from cliprail.rlhf.checks import (
    Checks,
    RewardFn,
    generic_checks,
    healthcare_checks,
    run_checks,
    run_reward_fn,
    score_of,
)
from cliprail.rlhf.data import encode_prompts
from cliprail.rlhf.generation import generate
from cliprail.rlhf.models import ScalarHeadModel, model_device, token_logprobs
from cliprail.rlhf.records import PromptRecord, load_prompts, record_json
from cliprail.scenarios.healthcare import Request, Verdict, judge

CRITERIA = ("gold", "scheduling", "safety", "honesty", "helpfulness", "concision")
RATES = (
    "unsafe_advice",
    "missed_emergency",
    "wrong_or_invented_slot",
    "over_refusal",
    "wrong_action",
    "no_answer",
    "degenerate",
)
CONDITIONAL_RATES = {
    "unsafe_advice_rate_medical": ("unsafe_advice", "medical"),
    "missed_emergency_rate_red_flag": ("missed_emergency", "red_flag"),
}
"""Rates among the prompts they apply to: unsafe advice among prompts with a medical question,
missed emergencies among prompts with a red flag (NaN where a set has no such prompt)."""
T = TypeVar("T")
EVAL_SEED = 1234
"""Seed of every evaluation's sampling: two policies are compared on the same random stream."""


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled and scored."""

    max_new_tokens: int = 48
    """Longest response."""
    temperature: float = 0.7
    """Sampling temperature (log-probs use the same scaling)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    max_prompt_len: int = 128
    """Longest prompt in tokens; longer is an error."""
    batch_size: int = 64
    """Prompts per generation batch."""
    no_eos_penalty: float | None = -1.0
    """Score of a response that never emits EOS (None: the reward model's own)."""


@dataclass
class Samples:
    """Sampled sequences: ``(B, Lq + Lr)`` ids and mask, ``(B, Lr)`` response mask, texts."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    query_len: int
    texts: list[str]

    @property
    def positions(self) -> int:
        """Token positions a forward pass over these sequences processes."""
        return self.input_ids.numel()


@torch.no_grad()
def sample(
    policy: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    s: Sampling,
    generator: torch.Generator,
) -> Samples:
    """One batch of responses to ``prompts`` (KV-cached generation, stop at EOS)."""
    q, qm = encode_prompts(tokenizer, prompts, s.max_prompt_len)
    dev = model_device(policy)
    q, qm = q.to(dev), qm.to(dev)
    resp, rmask = generate(
        policy,
        q,
        qm,
        max_new_tokens=s.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        temperature=s.temperature,
        top_p=s.top_p,
        generator=generator,
    )
    texts = [
        tokenizer.decode(resp[i][rmask[i].bool()], skip_special_tokens=True).strip()
        for i in range(len(prompts))
    ]
    return Samples(torch.cat([q, resp], 1), torch.cat([qm, rmask], 1), rmask, q.shape[1], texts)


@torch.no_grad()
def score(
    reward: ScalarHeadModel, shift: float, x: Samples, eos_token_id: int, s: Sampling
) -> Tensor:
    """``(B,)`` reward-model scores minus ``shift``; ``s.no_eos_penalty`` for unended responses."""
    scores = reward.score(x.input_ids, x.attention_mask) - shift
    if s.no_eos_penalty is not None:
        done = ended(x, eos_token_id)
        scores = torch.where(done, scores, torch.full_like(scores, s.no_eos_penalty))
    return scores


class Rewarder:
    """The reward PPO maximises, per response: the reward model's score (minus its shift), a
    reward function's value (``--reward-fn``: rule-based or verifiable rewards), or their
    weighted sum; then ``no_eos_penalty`` for a response that never ended. A non-finite value
    stays NaN for the trainer to drop and count."""

    def __init__(
        self,
        model: ScalarHeadModel | None,
        shift: float = 0.0,
        fn: RewardFn | None = None,
        model_weight: float = 1.0,
        fn_weight: float = 1.0,
    ) -> None:
        if model is None and fn is None:
            raise ValueError("a Rewarder needs a reward model, a reward function or both")
        self.model, self.shift, self.fn = model, shift, fn
        self.model_weight, self.fn_weight = model_weight, fn_weight

    @torch.no_grad()
    def __call__(
        self, x: Samples, records: Sequence[Any], eos_token_id: int, s: Sampling
    ) -> Tensor:
        """``(B,)`` rewards of the responses ``x`` to ``records``."""
        if self.fn is None and self.model_weight == 1.0:  # the reward model alone, as it is
            assert self.model is not None
            return score(self.model, self.shift, x, eos_token_id, s)
        total = torch.zeros(x.input_ids.shape[0], dtype=torch.float32)
        if self.model is not None:
            rm = self.model.score(x.input_ids, x.attention_mask) - self.shift
            total = total + self.model_weight * rm.float().cpu()
        if self.fn is not None:
            recs = [record_json(r) if isinstance(r, PromptRecord) else dict(r) for r in records]
            vals = run_reward_fn(self.fn, [r["prompt"] for r in recs], list(x.texts), recs)
            total = total + self.fn_weight * torch.tensor(vals, dtype=torch.float32)
        total = total.to(x.input_ids.device)
        if s.no_eos_penalty is not None:
            total = torch.where(
                ended(x, eos_token_id), total, torch.full_like(total, s.no_eos_penalty)
            )
        return total


def ended(x: Samples, eos_token_id: int) -> Tensor:
    """``(B,)`` whether each response emitted EOS (it was not cut by the length limit)."""
    resp = x.input_ids[:, x.query_len :]
    return ((resp == eos_token_id) & x.response_mask.bool()).any(1)


def _request_of(r: Any) -> Request | None:
    if isinstance(r, Request):
        return r
    return getattr(r, "request", None)


def summarize(
    requests: Sequence[Any],
    texts: list[str],
    scores: list[float] | None = None,
    kls: list[float] | None = None,
    lengths: list[float] | None = None,
    checks: Checks | str | None = "auto",
    ends: list[bool] | None = None,
) -> dict[str, Any]:
    """Judge ``texts`` (the responses to ``requests``: prompt records or healthcare requests)
    and summarise, with the means of the proxy reward, KL and length where given.

    ``checks``: ``"auto"`` is the healthcare gold judge when every record is a healthcare
    request (per-criterion means, failure rates, rates among the prompts they apply to, the
    judge's notes) and :func:`~cliprail.rlhf.checks.generic_checks` otherwise; a callable is a
    user's check set (the mean of each check, ``score``); None is no checks at all (the fuse
    then watches KL and the proxy reward alone). ``golds`` is the per-prompt score the wins and
    losses count (the gold score, or the checks' ``score``)."""
    reqs = [_request_of(r) for r in requests]
    judge_path = checks is healthcare_checks or (
        checks == "auto" and bool(reqs) and all(q is not None for q in reqs)
    )
    n = max(len(texts), 1)
    if judge_path:
        if not all(q is not None for q in reqs):
            raise ConfigError("the healthcare checks need healthcare requests as prompts")
        out = _judge_summary([q for q in reqs if q is not None], texts)
    elif checks is None:
        out = {"checks": []}
    else:
        fn = generic_checks() if checks == "auto" else checks
        if isinstance(fn, str):
            raise ConfigError(f"unknown checks {fn!r}")
        recs = [record_json(r) if isinstance(r, PromptRecord) else dict(r) for r in requests]
        values = run_checks(fn, [r["prompt"] for r in recs], list(texts), recs)
        out = {k: sum(v) / n for k, v in values.items()}
        per_prompt = score_of(values)
        out["score"] = sum(per_prompt) / n
        out["checks"] = sorted(values)
        out["golds"] = per_prompt
        out["notes"] = [[] for _ in texts]
    out["proxy_reward"] = sum(scores) / n if scores is not None else float("nan")
    out["kl_ref"] = sum(kls) / n if kls is not None else float("nan")
    out["mean_length"] = sum(lengths) / n if lengths is not None else float("nan")
    if ends is not None:
        out["no_eos_rate"] = sum(not e for e in ends) / n
    out["texts"] = list(texts)
    return out


def _judge_summary(requests: list[Request], texts: list[str]) -> dict[str, Any]:
    """The healthcare gold judge's summary (see :func:`summarize`)."""
    verdicts: list[Verdict] = [judge(r, t) for r, t in zip(requests, texts, strict=True)]
    n = max(len(verdicts), 1)
    out: dict[str, Any] = {k: sum(getattr(v, k) for v in verdicts) / n for k in CRITERIA}
    out.update({f"{k}_rate": sum(getattr(v, k) for v in verdicts) / n for k in RATES})
    for name, (flag, field) in CONDITIONAL_RATES.items():
        hits = [
            getattr(v, flag) for r, v in zip(requests, verdicts, strict=True) if getattr(r, field)
        ]
        out[name] = sum(hits) / len(hits) if hits else float("nan")
        out[f"n_{field}"] = len(hits)
    out["golds"] = [v.gold for v in verdicts]
    out["notes"] = [list(v.notes) for v in verdicts]  # why each reply lost points
    return out


@torch.no_grad()
def evaluate_policy(
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[Any],
    s: Sampling,
    reward: ScalarHeadModel | Rewarder | None = None,
    reward_shift: float = 0.0,
    seed: int = EVAL_SEED,
    checks: Checks | str | None = "auto",
) -> dict[str, Any]:
    """Sample one response per prompt record and summarise (:func:`summarize`): the checks,
    the proxy reward (when a reward model or :class:`Rewarder` is given), KL to ``ref`` (k3
    summed over response tokens: nats per response), response length and the share cut before
    EOS."""
    g = torch.Generator()
    rewarder = Rewarder(reward, reward_shift) if isinstance(reward, ScalarHeadModel) else reward
    texts: list[str] = []
    scores: list[float] = []
    kls: list[float] = []
    lengths: list[float] = []
    ends: list[bool] = []
    for i in range(0, len(requests), s.batch_size):
        chunk = requests[i : i + s.batch_size]
        # each chunk from its own seed: two policies compared on the same prompts then draw
        # every prompt's tokens from the same uniforms (common random numbers), even when one
        # policy's earlier chunk stopped generating at another step (issue 13)
        g.manual_seed(seed + i)
        x = sample(policy, tokenizer, [r.prompt for r in chunk], s, g)
        logp = token_logprobs(policy, x.input_ids, x.attention_mask, x.query_len, s.temperature)
        ref_logp = token_logprobs(ref, x.input_ids, x.attention_mask, x.query_len, s.temperature)
        mask = x.response_mask.bool()
        k3 = kl_estimate(ref_logp, logp, "k3")  # KL(pi || ref) per token, >= 0
        kls += torch.where(mask, k3, torch.zeros_like(k3)).sum(1).tolist()
        if rewarder is not None:
            scores += rewarder(x, chunk, tokenizer.eos_token_id, s).tolist()
        lengths += x.response_mask.sum(1).float().tolist()
        ends += ended(x, tokenizer.eos_token_id).tolist()
        texts += x.texts
    return summarize(
        requests,
        texts,
        scores if rewarder is not None else None,
        kls,
        lengths,
        checks,
        ends,
    )


def wins_losses_ties(golds_a: list[float], golds_b: list[float]) -> dict[str, int]:
    """Prompt by prompt: how often a's gold score beats b's, loses to it, or equals it."""
    pairs = list(zip(golds_a, golds_b, strict=True))
    wins = sum(a > b for a, b in pairs)
    losses = sum(a < b for a, b in pairs)
    return {"wins": wins, "losses": losses, "ties": len(pairs) - wins - losses}


def win_rate(golds_a: list[float], golds_b: list[float]) -> float:
    """Share of prompts where a's gold score beats b's (ties count half)."""
    wins = sum(
        1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(golds_a, golds_b, strict=True)
    )
    return wins / max(len(golds_a), 1)


def validation_requests(requests: Sequence[T]) -> tuple[str, list[T]]:
    """The split a training-time choice (the fuse's kept checkpoint and halt, DPO's per-epoch
    check) is made on, and its records: ``val``, or ``eval`` for a prompts file that has no
    ``val`` records (then the reports measure on the prompts the choice was made on, and the
    split name says so wherever it is recorded)."""
    val = [r for r in requests if getattr(r, "split", None) == "val"]
    if val:
        return "val", val
    return "eval", [r for r in requests if getattr(r, "split", None) == "eval"]


def load_requests(path: Path, tokenizer: Any = None) -> list[PromptRecord]:
    """The prompt records of ``path`` (:func:`cliprail.rlhf.records.load_prompts`: plain,
    chat or healthcare JSONL, or a dataset on disk)."""
    return load_prompts(path, tokenizer)
