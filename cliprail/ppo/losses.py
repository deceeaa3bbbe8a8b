"""PPO loss terms as pure functions. Each returns ``(loss, stats)``; the caller sums the terms.

``loss`` is a scalar to *minimise* (the surrogate objectives are negated). ``stats`` holds
detached scalar tensors: diagnostics, never part of the graph, not yet synchronised to Python
floats (the update loop does that once per minibatch). Every function takes a ``mask`` so the
same code serves ``(T, B)`` environment steps and ``(B, L)`` response tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cliprail.ppo.masked import masked_mean

Stats = dict[str, Tensor]


def _ratio_stats(log_ratio: Tensor, ratio: Tensor, mask: Tensor | None, clip_range: float) -> Stats:
    with torch.no_grad():
        lr, r = log_ratio.detach(), ratio.detach()
        if mask is not None:
            m = mask if mask.dtype == torch.bool else mask != 0
            r_min, r_max = torch.aminmax(r[m]) if bool(m.any()) else (r.new_ones(()),) * 2
        else:
            r_min, r_max = torch.aminmax(r)
        return {
            # Fraction of samples outside [1 - eps, 1 + eps] (CleanRL's and SB3's definition).
            "clip_fraction": masked_mean(((r - 1.0).abs() > clip_range).to(r.dtype), mask),
            # KL(pi_old || pi) from samples of pi_old (joschu.net/blog/kl-approx.html).
            "approx_kl": masked_mean(torch.expm1(lr) - lr, mask),  # k3
            "approx_kl_k1": masked_mean(-lr, mask),
            "ratio_mean": masked_mean(r, mask),
            "ratio_min": r_min,
            "ratio_max": r_max,
        }


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    clip_range: float = 0.2,
) -> tuple[Tensor, Stats]:
    """The clipped surrogate objective, PPO paper eq. 7, as a loss.

    ``L = -E[min(r A, clip(r, 1 - eps, 1 + eps) A)]`` with ``r = exp(logprobs - old_logprobs)``.
    The min removes the incentive to push ``r`` beyond ``1 + eps`` when ``A > 0`` and below
    ``1 - eps`` when ``A < 0``: there the gradient is exactly zero.

    Args:
        logprobs: ``(*S)`` log pi_theta(a|s) of the taken actions, with grad.
        old_logprobs: ``(*S)`` log pi_old(a|s) stored at rollout time.
        advantages: ``(*S)`` advantage estimates (already normalised if wanted).
        mask: ``(*S)`` samples that count; None means all.
        clip_range: eps > 0.

    Returns:
        ``(loss, stats)`` with stats ``clip_fraction``, ``approx_kl`` (k3), ``approx_kl_k1``,
        ``ratio_mean``, ``ratio_min``, ``ratio_max``.

    >>> loss, s = clipped_surrogate(torch.log(torch.tensor([1.5])), torch.zeros(1),
    ...                             torch.tensor([2.0]), clip_range=0.2)
    >>> round(loss.item(), 4), s["clip_fraction"].item()
    (-2.4, 1.0)
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    surr_unclipped = ratio * advantages
    surr_clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages
    loss = -masked_mean(torch.minimum(surr_unclipped, surr_clipped), mask)
    return loss, _ratio_stats(log_ratio, ratio, mask, clip_range)


def plain_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    clip_range: float = 0.2,
) -> tuple[Tensor, Stats]:
    """The unconstrained surrogate ``-E[r A]`` (the "no clipping or penalty" row of the PPO
    paper's Table 1). ``clip_range`` only sets the threshold of the ``clip_fraction`` diagnostic.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss = -masked_mean(ratio * advantages, mask)
    return loss, _ratio_stats(log_ratio, ratio, mask, clip_range)


def kl_penalized_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    beta: float,
    clip_range: float = 0.2,
) -> tuple[Tensor, Stats]:
    """The KL-penalty objective, PPO paper eq. 8: ``-E[r A - beta KL(pi_old, pi)]``.

    KL(pi_old || pi_theta) is estimated per sample with k3 from the actions pi_old took; since
    E_old[r] = 1, E_old[k3] equals the exact KL for every theta, so its gradient is unbiased too.
    ``clip_range`` only sets the threshold of the ``clip_fraction`` diagnostic.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    kl = torch.expm1(log_ratio) - log_ratio  # k3, >= 0
    loss = -masked_mean(ratio * advantages - beta * kl, mask)
    stats = _ratio_stats(log_ratio, ratio, mask, clip_range)
    stats["kl_beta"] = torch.tensor(beta)
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor | None = None,
    *,
    clip_range: float | None = None,
) -> tuple[Tensor, Stats]:
    """Squared-error critic loss ``0.5 E[(V - R)^2]``, optionally clipped around the old values.

    With ``clip_range`` c, ``V_clip = V_old + clip(V - V_old, -c, c)`` and the loss is
    ``0.5 E[max((V - R)^2, (V_clip - R)^2)]`` (baselines' PPO2; "37 implementation details" #9).
    """
    err = (values - returns) ** 2
    if clip_range is None:
        loss = 0.5 * masked_mean(err, mask)
        clip_frac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        err_clipped = (v_clipped - returns) ** 2
        loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
        with torch.no_grad():
            clip_frac = masked_mean(
                ((values - old_values).abs() > clip_range).to(values.dtype), mask
            )
    return loss, {"value_clip_fraction": clip_frac.detach()}


def entropy_bonus(entropy: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Stats]:
    """Mean policy entropy (PPO paper eq. 9's S term). Returned positive: subtract ``c2`` times
    it from the loss to encourage exploration."""
    ent = masked_mean(entropy, mask)
    return ent, {"entropy": ent.detach()}
