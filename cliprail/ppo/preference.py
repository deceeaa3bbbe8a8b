"""The other camp's maths, beside PPO's: Direct Preference Optimization and best-of-n.

* DPO (Rafailov et al. 2023, eq. 7) trains the policy straight from preference pairs: with the
  implicit reward ``r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))`` the Bradley-Terry
  likelihood of the pairs is maximised, no reward model and no sampling.
* IPO (Azar et al. 2023, eq. 17) regresses the log-ratio margin onto ``1 / (2 * beta)`` instead,
  so deterministic preferences do not push the margin to infinity.
* Best-of-n samples n responses from the reference and keeps the one the reward model likes
  best. Its KL to the reference is at most ``log n - (n - 1) / n`` (Stiennon et al. 2020,
  appendix G.3; Gao et al. 2022), with equality for continuous rewards without ties; the
  estimator here measures it from a reference pool, ties included (Beirami et al. 2024).

Pure tensor functions, torch only, like the rest of :mod:`cliprail.ppo`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Stats = dict[str, Tensor]


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Stats]:
    """DPO (``sigmoid``) or IPO (``ipo``) loss over a batch of pairs, all inputs ``(B,)``.

    The inputs are sequence log-probabilities of the responses (sums over response tokens; for
    IPO callers usually pass per-token means, as Azar et al.'s experiments and TRL do). With
    ``h = (pi_c - ref_c) - (pi_r - ref_r)``:

    * sigmoid: ``-(1 - s) * log sigmoid(beta h) - s * log sigmoid(-beta h)``, ``s`` the label
      smoothing of conservative DPO (Mitchell 2023; 0 is plain DPO);
    * ipo: ``(h - 1 / (2 beta))**2``.

    Stats: implicit rewards ``beta * (pi - ref)`` of chosen and rejected, their margin and the
    implicit-reward accuracy (share of pairs whose chosen reward is higher).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_logratio = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratio = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratio - rejected_logratio  # (B,)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
            -beta * h
        )
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2  # Azar et al. 2023, eq. 17 (tau = beta)
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    with torch.no_grad():
        chosen_rewards = beta * chosen_logratio.detach()
        rejected_rewards = beta * rejected_logratio.detach()
        stats: Stats = {
            "rewards_chosen": chosen_rewards.mean(),
            "rewards_rejected": rejected_rewards.mean(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).to(h.dtype).mean(),
        }
    return losses.mean(), stats


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || reference) for a continuous reward without ties: ``log n - (n-1)/n``.

    An upper bound when ties are possible (Beirami et al. 2024, theorem 1).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_kl_estimate(chosen_rewards: Tensor, pool_rewards: Tensor, n: int) -> Tensor:
    """Estimated KL(best-of-n || reference) from a pool of reference samples per prompt.

    ``chosen_rewards`` ``(P,)``: the reward of each prompt's best-of-n response; ``pool_rewards``
    ``(P, M)``: rewards of M further reference samples of the same prompt, drawn independently.
    With ``F`` and ``F-`` the empirical CDF of the reward at and below the chosen reward (pool plus
    the chosen sample), best-of-n puts ``F**n - F-**n`` on that reward level where the reference
    puts ``F - F-``, so ``log pi_bon(y) / pi_ref(y) = log((F**n - F-**n) / (F - F-))`` when ties
    within a level are broken uniformly. Returns the mean over prompts (a 0-dim tensor); it tends
    to ``log n - (n-1)/n`` when rewards never tie and is lower when they do.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    c = chosen_rewards.to(torch.float64).unsqueeze(1)  # (P, 1)
    pool = pool_rewards.to(torch.float64)  # (P, M)
    total = pool.shape[1] + 1.0
    at_or_below = ((pool <= c).sum(1) + 1.0) / total  # F, the chosen sample counted: (P,)
    below = (pool < c).sum(1) / total  # F-: (P,)
    ratio = (at_or_below**n - below**n) / (at_or_below - below)  # (P,) in [1/..., n]
    return torch.log(ratio).mean()
