"""Masked reductions: the one place where padding and invalid steps are excluded.

Every function takes a ``mask`` broadcastable to ``x``; ``True`` (or non-zero) marks entries that
count. Masked-out entries are excluded with :func:`torch.where`, not multiplied by zero, so a NaN
or inf sitting in padding can never leak into a result or a gradient.

The same functions serve ``(T, B)`` environment layouts and ``(B, L)`` token layouts.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _as_bool(mask: Tensor | None, like: Tensor) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        mask = mask != 0
    return mask.expand_as(like)


def masked_sum(x: Tensor, mask: Tensor | None = None, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over entries where ``mask`` is true (all of ``x`` when ``mask`` is None).

    >>> masked_sum(torch.tensor([1.0, 2.0, float("nan")]), torch.tensor([True, True, False]))
    tensor(3.)
    """
    m = _as_bool(mask, x)
    if m is not None:
        x = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_count(x: Tensor, mask: Tensor | None = None, dim: int | None = None) -> Tensor:
    """Number of counted entries, as ``x``'s dtype (so it divides without a cast)."""
    m = _as_bool(mask, x)
    if m is None:
        n = x.numel() if dim is None else x.shape[dim]
        return torch.tensor(float(n), dtype=x.dtype, device=x.device)
    return m.sum().to(x.dtype) if dim is None else m.sum(dim).to(x.dtype)


def masked_mean(x: Tensor, mask: Tensor | None = None, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over counted entries. An all-masked reduction returns 0, not NaN.

    >>> masked_mean(torch.tensor([[1.0, 3.0], [5.0, 100.0]]), torch.tensor([[1, 1], [1, 0]]))
    tensor(3.)
    """
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    total = masked_sum(x, mask, dim)
    count = masked_count(x, mask, dim)
    return total / count.clamp_min(1.0)


def masked_var(x: Tensor, mask: Tensor | None = None, unbiased: bool = True) -> Tensor:
    """Variance of the counted entries of ``x`` (a scalar), Bessel-corrected when ``unbiased``."""
    mean = masked_mean(x, mask)
    centered = x - mean
    m = _as_bool(mask, x)
    if m is not None:  # before squaring: 0 * (NaN - mean) in the backward would leak (a bug)
        centered = torch.where(m, centered, torch.zeros((), dtype=x.dtype, device=x.device))
    sq = masked_sum(centered**2, mask)
    count = masked_count(x, mask)
    denom = count - 1.0 if unbiased else count
    return sq / denom.clamp_min(1.0)


def masked_whiten(
    x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """Normalise ``x`` to zero mean and unit variance over the counted entries.

    With ``shift_mean=False`` only the scale changes (the mean is added back), as the RLHF
    literature does for rewards. Masked-out entries come back as 0.

    >>> masked_whiten(torch.tensor([1.0, 3.0, 7.0]), torch.tensor([1, 1, 0]))
    tensor([-0.7071,  0.7071,  0.0000])
    """
    m = _as_bool(mask, x)
    if m is None:  # fast path: the hot loop of the Gymnasium trainer calls this per minibatch
        mean, var = x.mean(), x.var() if x.numel() > 1 else x.new_zeros(())
    else:  # padding out first, so neither the value nor the gradient sees it
        x = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
        mean, var = masked_mean(x, m), masked_var(x, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    if m is not None:
        out = torch.where(m, out, torch.zeros((), dtype=x.dtype, device=x.device))
    return out


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor | None = None) -> Tensor:
    """1 - Var[returns - values] / Var[returns]: 1 is a perfect critic, 0 predicts the mean.

    Returns NaN when the returns have no variance (nothing to explain), as SB3 and CleanRL do.
    """
    var_returns = masked_var(returns, mask)
    # Constant returns: the variance is rarely exactly 0 in floating point (the mean of n copies
    # of 0.1 is not 0.1), so compare with the returns' own scale, not with 0.
    scale = masked_mean(returns * returns, mask)
    if var_returns.item() <= 1e3 * torch.finfo(returns.dtype).eps * max(scale.item(), 1e-30):
        return torch.tensor(float("nan"), dtype=values.dtype, device=values.device)
    return 1.0 - masked_var(returns - values, mask) / var_returns
