"""PPO loss terms as pure functions. Each returns ``(loss, stats)``; the caller sums the terms.

``loss`` is a scalar to *minimise* (the surrogate objectives are negated). ``stats`` holds
detached scalar tensors: diagnostics, never part of the graph, not yet synchronised to Python
floats (the update loop does that once per minibatch). Every function takes a ``mask`` so the
same code serves ``(T, B)`` environment steps and ``(B, L)`` response tokens.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from cliprail.ppo.masked import masked_mean, masked_sum

Stats = dict[str, Tensor]


def _ratio_stats(
    log_ratio: Tensor,
    ratio: Tensor,
    mask: Tensor | None,
    clip_range: float | Tensor,
    clip_range_high: float | Tensor | None = None,
) -> Stats:
    with torch.no_grad():
        lr, r = log_ratio.detach(), ratio.detach()
        if clip_range_high is None:  # no branch on the values: clip ranges may be tensors
            outside = (r - 1.0).abs() > clip_range
        else:
            outside = (r < 1.0 - clip_range) | (r > 1.0 + clip_range_high)
        if mask is not None:
            m = mask if mask.dtype == torch.bool else mask != 0
            r_min, r_max = torch.aminmax(r[m]) if bool(m.any()) else (r.new_ones(()),) * 2
        else:
            r_min, r_max = torch.aminmax(r)
        return {
            # Fraction of samples outside [1 - eps, 1 + eps] (CleanRL's and SB3's definition),
            # [1 - eps_low, 1 + eps_high] with clip-higher.
            "clip_fraction": masked_mean(outside.to(r.dtype), mask),
            # KL(pi_old || pi) from samples of pi_old (joschu.net/blog/kl-approx.html).
            "approx_kl": masked_mean(torch.expm1(lr) - lr, mask),  # k3
            "approx_kl_k1": masked_mean(-lr, mask),
            "ratio_mean": masked_mean(r, mask),
            "ratio_min": r_min,
            "ratio_max": r_max,
        }


LossAgg = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
LOSS_AGGREGATIONS: tuple[str, ...] = get_args(LossAgg)


def aggregate_loss(
    losses: Tensor,
    mask: Tensor | None = None,
    mode: str = "token_mean",
    *,
    normaliser: float | None = None,
) -> Tensor:
    """Reduce per-sample losses to a scalar, the way the RLHF libraries name the modes (verl's
    ``loss_agg_mode``).

    Args:
        losses: ``(*S)`` per-sample losses; for sequences ``(B, L)`` per token.
        mask: ``(*S)`` samples that count; None means all.
        mode: ``"token_mean"``: the mean over every counted token of the batch (DAPO, Yu et al.
            2025, eq. 8: each token weighs the same, so a long response is not diluted);
            ``"seq_mean_token_mean"``: the mean over sequences of each sequence's token mean
            (GRPO's eq. 3: a token of a short response weighs more than one of a long response,
            the length bias Dr. GRPO describes); ``"seq_mean_token_sum_norm"``: each sequence's
            token sum divided by a constant, averaged over sequences (Dr. GRPO, Liu et al. 2025,
            section 3.1: no length-dependent normaliser at all).
        normaliser: the constant of ``seq_mean_token_sum_norm`` (the longest response allowed,
            ``max_new_tokens``); default the second dimension of ``losses``.

    Returns:
        A scalar. The two sequence modes need ``(B, L)`` losses; on a 1-D input (one sample per
        row, the Gymnasium trainer's flattened batch) every mode is the plain mean.

    >>> x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    >>> m = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    >>> [round(aggregate_loss(x, m, k).item(), 3) for k in LOSS_AGGREGATIONS]
    [1.6, 2.5, 1.0]
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGGREGATIONS}")
    if mode == "token_mean" or losses.dim() < 2:
        return masked_mean(losses, mask)
    if mode == "seq_mean_token_mean":
        per_seq = masked_mean(losses, mask, dim=-1)  # (B,)
        if mask is None:
            return per_seq.mean()
        has_tokens = (mask != 0).any(-1)  # (B,) a fully masked sequence does not count
        return masked_mean(per_seq, has_tokens)
    norm = float(losses.shape[-1]) if normaliser is None else normaliser
    return (masked_sum(losses, mask, dim=-1) / norm).mean()  # (B,) -> scalar


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    clip_range: float | Tensor = 0.2,
    clip_range_high: float | Tensor | None = None,
    dual_clip: float | None = None,
    ratio_level: Literal["token", "sequence"] = "token",
    loss_agg: str = "token_mean",
    agg_normaliser: float | None = None,
) -> tuple[Tensor, Stats]:
    """The clipped surrogate objective, PPO paper eq. 7, as a loss, with the variants the RLHF
    libraries ship (all off by default: then it is eq. 7 exactly).

    ``L = -E[min(r A, clip(r, 1 - eps, 1 + eps) A)]`` with ``r = exp(logprobs - old_logprobs)``.
    The min removes the incentive to push ``r`` beyond ``1 + eps`` when ``A > 0`` and below
    ``1 - eps`` when ``A < 0``: there the gradient is exactly zero.

    Args:
        logprobs: ``(*S)`` log pi_theta(a|s) of the taken actions, with grad.
        old_logprobs: ``(*S)`` log pi_old(a|s) stored at rollout time.
        advantages: ``(*S)`` advantage estimates (already normalised if wanted).
        mask: ``(*S)`` samples that count; None means all.
        clip_range: eps > 0 (the lower side, ``1 - eps``, and the upper side unless
            ``clip_range_high`` is given).
        clip_range_high: the upper side ``1 + eps_high`` (DAPO's clip-higher, Yu et al. 2025,
            section 3.1: 0.28 beside eps_low 0.2, so a rare token with a positive advantage can
            grow more before the clip stops it, against entropy collapse).
        dual_clip: c > 1: for ``A < 0`` the objective is also bounded below by ``c A`` (Ye et
            al. 2020, eq. 6), so a ratio far above ``1 + eps`` on a bad action cannot make the
            loss unboundedly large (verl's default c = 3).
        ratio_level: ``"token"`` (eq. 7 per sample) or ``"sequence"``: GSPO's ratio (Zheng et
            al. 2025, eq. 7), ``s = exp(mean_t (log pi - log pi_old))`` over each sequence's
            counted tokens, shared by all its tokens. Needs ``(B, L)`` inputs; GSPO pairs it with
            small clip ranges (3e-4 / 4e-4) and ``loss_agg="seq_mean_token_mean"``.
        loss_agg, agg_normaliser: how the per-token objective is reduced
            (:func:`aggregate_loss`); ``"token_mean"`` is eq. 7's mean.

    Returns:
        ``(loss, stats)`` with stats ``clip_fraction``, ``approx_kl`` (k3), ``approx_kl_k1``,
        ``ratio_mean``, ``ratio_min``, ``ratio_max`` (of the per-token ratio), and
        ``dual_clip_fraction`` when ``dual_clip`` is set.

    >>> loss, s = clipped_surrogate(torch.log(torch.tensor([1.5])), torch.zeros(1),
    ...                             torch.tensor([2.0]), clip_range=0.2)
    >>> round(loss.item(), 4), s["clip_fraction"].item()
    (-2.4, 1.0)
    """
    high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = logprobs - old_logprobs  # (*S)
    if ratio_level == "sequence":  # GSPO eq. 7: the length-normalised sequence ratio
        if log_ratio.dim() != 2:
            raise ValueError("ratio_level='sequence' needs (B, L) token tensors")
        seq_log_ratio = masked_mean(log_ratio, mask, dim=-1)  # (B,)
        # one value per sequence, its gradient spread as d s / d log pi_t = s / |y| (GSPO eq. 10)
        used_log_ratio = seq_log_ratio.unsqueeze(-1).expand_as(log_ratio)  # (B, L)
    elif ratio_level == "token":
        used_log_ratio = log_ratio
    else:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; expected 'token' or 'sequence'")
    ratio = torch.exp(used_log_ratio)
    surr_unclipped = ratio * advantages
    surr_clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + high) * advantages  # type: ignore[arg-type]  # a float or a tensor, both fine
    objective = torch.minimum(surr_unclipped, surr_clipped)  # (*S) eq. 7
    dual_stats: Stats = {}
    if dual_clip is not None:
        if not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bounded = torch.maximum(objective, dual_clip * advantages)  # Ye et al. 2020, eq. 6
        negative = advantages < 0
        with torch.no_grad():
            hit = negative & (bounded > objective)
            dual_stats["dual_clip_fraction"] = masked_mean(hit.to(ratio.dtype), mask)
        objective = torch.where(negative, bounded, objective)
    loss = -aggregate_loss(objective, mask, loss_agg, normaliser=agg_normaliser)
    stats = _ratio_stats(used_log_ratio, ratio, mask, clip_range, clip_range_high)
    stats.update(dual_stats)
    return loss, stats


def plain_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    clip_range: float | Tensor = 0.2,
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
    clip_range: float | Tensor = 0.2,
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


def kl_penalty(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor | None = None,
    *,
    estimator: Literal["k1", "k2", "k3"] = "k3",
    loss_agg: str = "token_mean",
    agg_normaliser: float | None = None,
    clamp: float = 20.0,
) -> tuple[Tensor, Stats]:
    """The KL to the reference as a loss term (GRPO's ``beta * D_KL`` in the objective, Shao et
    al. 2024, eq. 3-4), the alternative to a KL penalty in the reward. Add ``beta`` times it.

    The samples come from the policy (``x ~ pi_theta``, at rollout time), and the gradient flows
    through ``log pi_theta(x)`` alone, not through the sampling. What that gradient estimates
    then depends on the estimator (Tang and Munos 2025, arXiv:2506.09477, section 3), as the
    exact expectations over a categorical show (tests/test_critic_free.py):

    * ``k1 = log pi - log ref``: ``E[grad k1] = E[grad log pi] = 0``. No gradient in
      expectation, only noise: k1 is for the reward, not the loss.
    * ``k2 = (log pi - log ref)^2 / 2``: ``E[grad k2] = grad KL(pi || ref)``, the reverse KL the
      RLHF objective means.
    * ``k3 = ref/pi - 1 - log(ref/pi)`` (GRPO's choice): ``E[grad k3] = E[(1 - ref/pi) grad log
      pi] = grad KL(ref || pi)``, the *forward* KL's gradient: mass-covering, a biased
      gradient for the reverse KL although k3 is an unbiased estimate of its value.

    After the first minibatch the samples come from ``pi_old``, not ``pi_theta``; like GRPO's
    implementations this term is not importance-weighted (the bias is of the order of the
    policy change within one rollout).

    Args:
        logprobs: ``(*S)`` log pi_theta of the sampled tokens, with grad.
        ref_logprobs: ``(*S)`` log pi_ref of the same tokens.
        mask: ``(*S)`` tokens that count; None means all.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (above).
        loss_agg, agg_normaliser: the reduction (:func:`aggregate_loss`), the same as the
            surrogate's, so the two terms weigh tokens alike.
        clamp: ``log(ref/pi)`` is clamped to ``[-clamp, clamp]`` before the exponential of k3
            (verl #747, #751: an overflow to inf, then NaN, on a token the policy made far
            likelier than the reference).

    Returns:
        ``(loss, stats)`` with ``kl_ref`` (the penalty's mean over counted tokens, detached).

    >>> lp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    >>> round(kl_penalty(lp, ref, estimator="k3")[0].item(), 4)  # 0.5 - 1 + log 2
    0.1931
    """
    logr = torch.clamp(ref_logprobs - logprobs, -clamp, clamp)  # (*S) log(ref / pi)
    if estimator == "k1":
        kl = -logr
    elif estimator == "k2":
        kl = 0.5 * logr**2
    elif estimator == "k3":
        kl = torch.expm1(logr) - logr
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")
    loss = aggregate_loss(kl, mask, loss_agg, normaliser=agg_normaliser)
    return loss, {"kl_ref": masked_mean(kl.detach(), mask)}
