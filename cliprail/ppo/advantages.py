"""Generalized Advantage Estimation (Schulman et al. 2016) with terminations and truncations apart.

The layout is ``(T, B)`` (time first, environment steps) or ``(B, L)`` (tokens, ``time_dim=1``).
Each step ``t`` carries its reward, the value of its state and ``next_values[t]``, the value of the
*true* next state. On a truncation (a time limit) the true next state is the final observation,
not the reset observation the vector env returns, and its value must be bootstrapped; on a
termination there is nothing after the end and the bootstrap is zero (SB3 issue #633). Both end
the episode: the advantage recursion never crosses a ``terminated | truncated`` boundary.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _bool(x: Tensor | None, like: Tensor) -> Tensor:
    if x is None:
        return torch.zeros_like(like, dtype=torch.bool)
    return x if x.dtype == torch.bool else x != 0


def gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    truncated: Tensor | None = None,
    *,
    gamma: float,
    lam: float,
    mask: Tensor | None = None,
    time_dim: int = 0,
) -> tuple[Tensor, Tensor]:
    """Advantages and returns by GAE(gamma, lambda).

    Args:
        rewards: ``(T, B)`` reward received after the action at step ``t``.
        values: ``(T, B)`` V(s_t) from the critic that acted.
        next_values: ``(T, B)`` V(s_{t+1}) of the true next state: the next row of ``values``
            inside an episode, V(final observation) on a truncation, anything on a termination
            (it is multiplied by zero), V(s_T) for the last row of a rollout.
        terminated: ``(T, B)`` the episode ended in a terminal state at step ``t``: no bootstrap.
        truncated: ``(T, B)`` the episode was cut (time limit) at step ``t``: bootstrap from
            ``next_values`` but do not carry the advantage across.
        gamma, lam: discount and GAE lambda.
        mask: ``(T, B)`` steps that exist; masked steps (padding) get advantage and return 0 and
            pass nothing to earlier steps. None means every step counts.
        time_dim: 0 for ``(T, B)``; 1 for ``(B, L)`` token layouts.

    Returns:
        ``(advantages, returns)``, both shaped like ``rewards``, ``returns = advantages + values``
        (the critic's target, "lambda-returns").

    Example: one episode of two steps that terminates, gamma = lam = 1:
        >>> r = torch.tensor([[1.0], [1.0]]); v = torch.tensor([[0.5], [0.5]])
        >>> adv, ret = gae(r, v, torch.tensor([[0.5], [9.0]]), torch.tensor([[False], [True]]),
        ...                gamma=1.0, lam=1.0)
        >>> adv.squeeze(1).tolist(), ret.squeeze(1).tolist()
        ([1.5, 0.5], [2.0, 1.0])
    """
    if not (rewards.shape == values.shape == next_values.shape == terminated.shape):
        raise ValueError(
            "gae: rewards, values, next_values and terminated must share one shape, got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(next_values.shape)}, "
            f"{tuple(terminated.shape)}"
        )
    if time_dim not in (0, 1) or rewards.dim() != 2:
        raise ValueError("gae: expects 2-D tensors with time_dim 0 (T, B) or 1 (B, L)")
    if time_dim == 1:
        adv, ret = gae(
            rewards.T,
            values.T,
            next_values.T,
            terminated.T,
            None if truncated is None else truncated.T,
            gamma=gamma,
            lam=lam,
            mask=None if mask is None else mask.T,
        )
        return adv.T, ret.T

    term = _bool(terminated, rewards)
    done = term | _bool(truncated, rewards)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    # One-step TD errors, all at once: delta_t = r_t + gamma V(s_{t+1}) [not terminal] - V(s_t)
    deltas = rewards + gamma * torch.where(term, zero, next_values) - values  # (T, B)
    # Carry factor gamma*lam, cut at episode ends; a masked step passes nothing back either.
    carry = torch.where(done, zero, torch.full_like(rewards, gamma * lam))  # (T, B)
    if mask is not None:
        keep = _bool(mask, rewards)
        deltas = torch.where(keep, deltas, zero)
        carry = torch.where(keep, carry, zero)
    # The reverse recursion A_t = delta_t + carry_t A_{t+1} (GAE paper eq. 16) is sequential in T
    # and vectorised over B; rows are unbound once so the loop does one fused op per step.
    adv_rows: list[Tensor] = [zero] * rewards.shape[0]
    last = torch.zeros_like(rewards[0])
    d_rows, c_rows = deltas.unbind(0), carry.unbind(0)
    for t in range(rewards.shape[0] - 1, -1, -1):
        last = torch.addcmul(d_rows[t], c_rows[t], last)
        adv_rows[t] = last
    advantages = torch.stack(adv_rows)  # (T, B)
    if mask is not None:
        # A masked step's own delta was zeroed; also zero its (carry-free) value part of the return.
        returns = torch.where(keep, advantages + values, zero)
    else:
        returns = advantages + values
    return advantages, returns
