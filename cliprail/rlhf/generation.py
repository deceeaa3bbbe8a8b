"""Batched sampling with a KV cache: temperature, top-p, max new tokens, stop at EOS.

Prompts are left-padded; position ids come from the attention mask in the prompt pass and in
every cached step, as in the training forward (:func:`~cliprail.rlhf.models.response_logprobs`),
so the log-probs stored at rollout time match the training computation.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from cliprail.rlhf.models import logits_to_keep_kwarg, position_ids_from_mask


def sample_token(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """``(B,)`` tokens from ``(B, V)`` logits. ``temperature == 0`` is greedy."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set with mass >= top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    if generator is not None and generator.device != probs.device:  # a CPU stream, GPU model:
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    query_ids: Tensor,
    query_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> tuple[Tensor, Tensor]:
    """Sample responses for left-padded queries ``(B, Lq)``.

    Returns ``(response_ids, response_mask)``, both ``(B, Lr)`` with ``Lr <= max_new_tokens``:
    tokens after a row's first EOS are ``pad_token_id`` with mask 0; the EOS itself counts.
    ``use_cache=False`` recomputes the whole sequence each step (the reference the tests use).
    """
    B = query_ids.shape[0]
    cache_arg = _cache_kwarg(model)
    ids, mask = query_ids, query_mask
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    out_tokens: list[Tensor] = []
    past = None
    step_ids = ids
    for _ in range(max_new_tokens):
        pos = position_ids_from_mask(mask)
        if use_cache and past is not None:
            out = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=pos[:, -1:],
                use_cache=True,
                **{cache_arg: past},
            )
        else:
            # the prompt pass needs the last position's logits only (not without the cache: the
            # tests' reference recomputes everything each step)
            keep = logits_to_keep_kwarg(model, 1) if use_cache else {}
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=use_cache, **keep
            )
        past = _cache_of(out) if use_cache else None
        token = sample_token(out.logits[:, -1], temperature, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        out_tokens.append(token)
        finished = finished | (token == eos_token_id)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
        step_ids = token[:, None]
        if bool(finished.all()):
            break
    response = torch.stack(out_tokens, dim=1)  # (B, Lr)
    return response, response_mask(response, eos_token_id)


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.x names the KV cache ``cache``; earlier versions ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def response_mask(response: Tensor, eos_token_id: int) -> Tensor:
    """``(B, Lr)`` 1 up to and including the first EOS, 0 after it."""
    is_eos = (response == eos_token_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first EOS
    return (~after_eos).long()
