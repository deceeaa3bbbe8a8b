"""Sampling responses and judging them: the one evaluation every RLHF method goes through.

PPO's safety fuse, DPO's per-epoch check, best-of-n and ``cliprail rlhf compare`` all sample
with the same settings and seed, score with the same reward model, measure KL to the same
reference and read the texts with the same gold judge, so their numbers line up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cliprail.ppo import kl_estimate
from cliprail.rlhf.data import DataError, encode_prompts, read_jsonl
from cliprail.rlhf.generation import generate
from cliprail.rlhf.models import ScalarHeadModel, model_device, token_logprobs
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
        resp = x.input_ids[:, x.query_len :]
        ended = ((resp == eos_token_id) & x.response_mask.bool()).any(1)
        scores = torch.where(ended, scores, torch.full_like(scores, s.no_eos_penalty))
    return scores


def summarize(
    requests: list[Request],
    texts: list[str],
    scores: list[float] | None = None,
    kls: list[float] | None = None,
    lengths: list[float] | None = None,
) -> dict[str, Any]:
    """Gold judge over ``texts``: per-criterion means, failure rates, and the means of the proxy
    reward, KL and length where given. Keeps the texts and per-prompt gold scores."""
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
    out["proxy_reward"] = sum(scores) / n if scores is not None else float("nan")
    out["kl_ref"] = sum(kls) / n if kls is not None else float("nan")
    out["mean_length"] = sum(lengths) / n if lengths is not None else float("nan")
    out["texts"] = list(texts)
    out["golds"] = [v.gold for v in verdicts]
    out["notes"] = [list(v.notes) for v in verdicts]  # why each reply lost points
    return out


@torch.no_grad()
def evaluate_policy(
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    tokenizer: Any,
    requests: list[Request],
    s: Sampling,
    reward: ScalarHeadModel | None = None,
    reward_shift: float = 0.0,
    seed: int = EVAL_SEED,
) -> dict[str, Any]:
    """Sample one response per request and summarise: gold and criteria, failure rates, proxy
    reward (when a reward model is given), KL to ``ref`` (k3 summed over response tokens: nats
    per response) and response length."""
    g = torch.Generator()
    texts: list[str] = []
    scores: list[float] = []
    kls: list[float] = []
    lengths: list[float] = []
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
        if reward is not None:
            scores += score(reward, reward_shift, x, tokenizer.eos_token_id, s).tolist()
        lengths += x.response_mask.sum(1).float().tolist()
        texts += x.texts
    return summarize(requests, texts, scores if reward is not None else None, kls, lengths)


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


def validation_requests(requests: list[Request]) -> tuple[str, list[Request]]:
    """The split a training-time choice (the fuse's kept checkpoint and halt, DPO's per-epoch
    check) is made on, and its requests: ``val``, or ``eval`` for a prompts file that has no
    ``val`` requests (then the reports measure on the prompts the choice was made on, and the
    split name says so wherever it is recorded)."""
    val = [r for r in requests if r.split == "val"]
    if val:
        return "val", val
    return "eval", [r for r in requests if r.split == "eval"]


def load_requests(path: Path) -> list[Request]:
    recs = read_jsonl(path, ("id", "prompt"))
    out = []
    for n, r in enumerate(recs, start=1):
        try:
            out.append(Request.from_json(r))
        except ValueError as exc:
            raise DataError(f"{path}: record {n}: not a healthcare request: {exc}") from None
    return out
