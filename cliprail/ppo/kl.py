"""KL estimators and KL-coefficient controllers.

Estimators (http://joschu.net/blog/kl-approx.html) of KL(q || p) from samples x ~ q, written with
``logr = log p(x) - log q(x)``:

* ``k1 = -logr``: unbiased, high variance, can be negative per sample (TRL #925);
* ``k2 = logr**2 / 2``: biased, low variance, never negative;
* ``k3 = (exp(logr) - 1) - logr``: unbiased, low variance, never negative.

In PPO the samples come from the policy that acted. For the old-policy anchor (paper eq. 8)
``q = pi_old`` and ``p = pi_theta``; in RLHF's penalty against the reference model ``q = pi_theta``
(the samples are the policy's) and ``p = pi_ref``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def kl_k1(logprobs_p: Tensor, logprobs_q: Tensor) -> Tensor:
    """Per-sample k1 estimate of KL(q || p) for samples from q: ``log q - log p``."""
    return logprobs_q - logprobs_p


def kl_k2(logprobs_p: Tensor, logprobs_q: Tensor) -> Tensor:
    """Per-sample k2 estimate of KL(q || p): ``(log p - log q)**2 / 2``."""
    return 0.5 * (logprobs_p - logprobs_q) ** 2


def kl_k3(logprobs_p: Tensor, logprobs_q: Tensor) -> Tensor:
    """Per-sample k3 estimate of KL(q || p): ``(p/q - 1) - log(p/q)``; always >= 0."""
    logr = logprobs_p - logprobs_q
    return torch.expm1(logr) - logr


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_estimate(logprobs_p: Tensor, logprobs_q: Tensor, estimator: str = "k1") -> Tensor:
    """Per-sample estimate of KL(q || p) by name (``"k1"``, ``"k2"`` or ``"k3"``)."""
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; expected one of {sorted(KL_ESTIMATORS)}"
        ) from None
    return fn(logprobs_p, logprobs_q)


@dataclass
class FixedKLController:
    """A constant KL coefficient beta (PPO paper eq. 8 with a fixed beta; InstructGPT's 0.02)."""

    beta: float

    def update(self, kl: float, n_steps: int = 1) -> float:
        """Observe the measured KL; the coefficient does not move. Returns beta."""
        return self.beta

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])


@dataclass
class AdaptiveKLController:
    """The PPO paper's adaptive beta (section 4): after each policy update with mean KL ``d``,
    halve beta when ``d < d_targ / 1.5`` and double it when ``d > d_targ * 1.5``."""

    beta: float
    target: float

    def update(self, kl: float, n_steps: int = 1) -> float:
        if not math.isfinite(kl):
            return self.beta
        if kl < self.target / 1.5:
            self.beta /= 2.0
        elif kl > self.target * 1.5:
            self.beta *= 2.0
        return self.beta

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta, "target": self.target}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta, self.target = float(state["beta"]), float(state["target"])


@dataclass
class ZieglerKLController:
    """Ziegler et al. 2019 proportional controller for RLHF:
    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``."""

    beta: float
    target: float
    horizon: float

    def update(self, kl: float, n_steps: int = 1) -> float:
        if not math.isfinite(kl):
            return self.beta
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)  # Ziegler et al. 2019, eq. (2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])
        self.target, self.horizon = float(state["target"]), float(state["horizon"])
