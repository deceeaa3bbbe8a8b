"""Critic-free advantages: baselines from the other samples instead of a value model.

PPO with a critic (GAE, :mod:`cliprail.ppo.advantages`) learns V(s) to reduce the variance of the
policy gradient. In RLHF the reward is one score per response, and the field's stable trainers
now replace the critic with a baseline computed from several responses to the same prompt:

* GRPO (Shao et al. 2024, DeepSeekMath eq. 3): ``A_i = (r_i - mean_g r) / std_g r``, one
  advantage per response, broadcast over its tokens. Dr. GRPO (Liu et al. 2025, section 3.1)
  drops the division by the group's std: it up-weights prompts that are too easy or too hard.
  TRL's ``scale_rewards="batch"`` divides by the std over the whole batch instead.
* RLOO (Ahmadian et al. 2024, eq. 5): ``A_i = r_i - mean_{j != i} r_j``, the leave-one-out
  baseline, unbiased because ``r_i`` does not enter its own baseline;
  ``= G / (G - 1) * (r_i - mean_g r)``.
* REINFORCE++ (Hu 2025, section 3): the KL penalty goes into the per-token reward as in PPO, the
  return is the undiscounted sum of the rewards from t on (no critic, no GAE), and the returns
  are whitened over every token of the global batch.

Layout: a batch of ``N`` prompts with ``G`` responses each is ``(N, G)`` (rows are groups); the
caller keeps each prompt's responses together (``(N * G,)`` reshaped, contiguous). ``mask``
marks the responses that count (a response dropped for a non-finite score is out of its group's
statistics and gets advantage 0).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from cliprail.ppo.masked import masked_mean, masked_var, masked_whiten

GroupScale = Literal["group", "batch", "none"]


def _valid(scores: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return torch.ones_like(scores, dtype=torch.bool)
    return mask if mask.dtype == torch.bool else mask != 0


def group_relative_advantages(
    scores: Tensor,
    mask: Tensor | None = None,
    *,
    scale: GroupScale = "group",
    eps: float = 1e-4,
    batch_std: Tensor | None = None,
) -> Tensor:
    """GRPO's outcome advantages ``(N, G)``: each score minus its group's mean, then scaled.

    Args:
        scores: ``(N, G)`` one scalar reward per response, ``G`` responses to each of ``N``
            prompts.
        mask: ``(N, G)`` responses that count; None means all.
        scale: ``"group"`` divides by the group's (Bessel-corrected) std, as GRPO does;
            ``"batch"`` by the std of every counted score in the batch (TRL's
            ``scale_rewards="batch"``); ``"none"`` leaves the centred score (Dr. GRPO, Liu et al.
            2025: the per-group std is a question-difficulty bias).
        eps: added to the std (GRPO's and TRL's 1e-4), so a group whose responses all scored the
            same (std 0) gets advantages 0, not NaN.
        batch_std: for ``scale="batch"`` when the batch is split over data-parallel ranks: the
            std over every rank's scores (default: the std of ``scores``).

    Returns:
        ``(N, G)`` advantages; 0 where ``mask`` is false and in a group with one counted response
        (nothing to compare it with).

    >>> group_relative_advantages(torch.tensor([[1.0, 3.0], [2.0, 2.0]]), scale="none")
    tensor([[-1.,  1.],
            [ 0.,  0.]])
    """
    if scores.dim() != 2:
        raise ValueError(f"group_relative_advantages: scores must be (N, G), got {scores.shape}")
    valid = _valid(scores, mask)  # (N, G)
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    count = valid.sum(1, keepdim=True)  # (N, 1)
    mean = masked_mean(scores, valid, dim=1).unsqueeze(1)  # (N, 1)
    centred = torch.where(valid, scores - mean, zero)  # (N, G)
    one = torch.ones((), dtype=scores.dtype, device=scores.device)
    if scale == "group":
        var = (centred**2).sum(1, keepdim=True) / (count - 1).clamp_min(1)  # (N, 1) unbiased
        denom = var.sqrt() + eps  # (N, 1)
    elif scale == "batch":
        std = masked_var(scores, valid).sqrt() if batch_std is None else batch_std
        denom = std.to(scores.dtype) + eps  # ()
    elif scale == "none":
        denom = one
    else:
        raise ValueError(f"unknown scale {scale!r}; expected 'group', 'batch' or 'none'")
    # a std of exactly 0 (eps 0) only meets centred scores of exactly 0: keep them 0, not NaN
    adv = centred / torch.where(denom > 0, denom, one)
    return torch.where(valid & (count > 1), adv, zero)


def rloo_advantages(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """RLOO's advantages ``(N, G)``: each score minus the mean of the *other* counted scores of
    its group (Ahmadian et al. 2024, eq. 5; Kool et al. 2019).

    Args:
        scores: ``(N, G)`` one scalar reward per response.
        mask: ``(N, G)`` responses that count; None means all.

    Returns:
        ``(N, G)`` advantages; 0 where ``mask`` is false and in a group with fewer than two
        counted responses (no other sample to form a baseline from).

    >>> rloo_advantages(torch.tensor([[1.0, 2.0, 6.0]]))
    tensor([[-3.0000, -1.5000,  4.5000]])
    """
    if scores.dim() != 2:
        raise ValueError(f"rloo_advantages: scores must be (N, G), got {scores.shape}")
    valid = _valid(scores, mask)  # (N, G)
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    s = torch.where(valid, scores, zero)  # (N, G)
    count = valid.sum(1, keepdim=True).to(scores.dtype)  # (N, 1)
    others = (s.sum(1, keepdim=True) - s) / (count - 1).clamp_min(1)  # (N, G) leave-one-out
    return torch.where(valid & (count > 1), s - others, zero)


def reinforce_pp_advantages(
    rewards: Tensor, mask: Tensor, *, gamma: float = 1.0, whiten: bool = True
) -> tuple[Tensor, Tensor]:
    """REINFORCE++'s token advantages (Hu 2025, eq. 5-6): the return from each token on,
    ``G_t = sum_{s >= t} gamma^(s-t) r_s``, whitened over every counted token of the batch.

    Args:
        rewards: ``(B, L)`` per-token rewards: ``-beta * KL_t`` on each response token and the
            score added on the last real one (:func:`cliprail.rlhf.ppo.token_rewards`).
        mask: ``(B, L)`` response tokens that count; nothing passes through a masked token.
        gamma: discount over tokens (1 in the paper and in RLHF practice).
        whiten: normalise the returns to zero mean and unit variance over the counted tokens
            (the paper's global batch normalisation; under data parallelism the caller passes
            ``whiten=False`` and whitens over all ranks itself).

    Returns:
        ``(advantages, returns)``, both ``(B, L)``, 0 on masked tokens.

    >>> adv, ret = reinforce_pp_advantages(torch.tensor([[-0.1, -0.1, 1.0]]),
    ...                                    torch.ones(1, 3), whiten=False)
    >>> [round(x, 4) for x in ret[0].tolist()]
    [0.8, 0.9, 1.0]
    """
    if rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(
            f"reinforce_pp_advantages: rewards and mask must be (B, L), got "
            f"{tuple(rewards.shape)} and {tuple(mask.shape)}"
        )
    keep = mask if mask.dtype == torch.bool else mask != 0
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    r = torch.where(keep, rewards, zero)  # (B, L)
    carry = torch.where(keep, torch.full_like(r, gamma), zero)  # (B, L) a masked token cuts
    returns = torch.empty_like(r)
    last = torch.zeros_like(r[:, 0])  # (B,)
    for t in range(r.shape[1] - 1, -1, -1):  # G_t = r_t + gamma G_{t+1}
        last = r[:, t] + carry[:, t] * last
        returns[:, t] = last
    returns = torch.where(keep, returns, zero)
    adv = masked_whiten(returns, keep) if whiten else returns
    return adv, returns


def zero_variance_groups(scores: Tensor, mask: Tensor | None = None, atol: float = 0.0) -> Tensor:
    """``(N,)`` True for each group whose counted scores are all equal (within ``atol``): its
    group-relative advantages are all 0, so it adds no policy gradient, only KL and cost. DAPO
    (Yu et al. 2025, section 3.2, dynamic sampling) filters such groups out of the batch.

    >>> zero_variance_groups(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    tensor([ True, False])
    """
    valid = _valid(scores, mask)
    inf = torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    hi = torch.where(valid, scores, -inf).amax(1)  # (N,)
    lo = torch.where(valid, scores, inf).amin(1)  # (N,)
    return (hi - lo <= atol) | (valid.sum(1) < 2)
