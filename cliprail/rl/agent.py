"""Actor-critic networks and their action distributions.

* ``mlp``: separate actor and critic MLPs (PPO paper Table 3: no parameter sharing), so policy
  gradients never reach the critic and value gradients never reach the actor.
* ``cnn``: the Nature CNN trunk (Mnih et al. 2015) shared by a policy and a value head (paper's
  Atari setting); uint8 frames are scaled to [0, 1] inside the network.

Distributions are written out as tensor maths rather than ``torch.distributions`` objects: no
argument validation or object construction in the acting loop (a measured cost on CPU).
Orthogonal initialisation with gains sqrt(2) (hidden), 0.01 (policy head), 1 (value head) follows
"The 37 implementation details of PPO" #2.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from cliprail.rl.config import RLConfig
from cliprail.rl.envs import SpaceSpec

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def layer_init(layer: nn.Linear | nn.Conv2d, gain: float) -> nn.Module:
    """Orthogonal weights with ``gain``, zero bias."""
    nn.init.orthogonal_(layer.weight, gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def mlp(
    in_dim: int, hidden: tuple[int, ...], out_dim: int, act: type[nn.Module], out_gain: float
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [layer_init(nn.Linear(in_dim, width), math.sqrt(2)), act()]
        in_dim = width
    layers.append(layer_init(nn.Linear(in_dim, out_dim), out_gain))
    return nn.Sequential(*layers)


def nature_cnn(in_channels: int) -> nn.Sequential:
    """Nature CNN for ``(C, 84, 84)`` inputs in [0, 1]; 512 features."""
    g = math.sqrt(2)
    return nn.Sequential(
        layer_init(nn.Conv2d(in_channels, 32, 8, stride=4), g),
        nn.ReLU(),
        layer_init(nn.Conv2d(32, 64, 4, stride=2), g),
        nn.ReLU(),
        layer_init(nn.Conv2d(64, 64, 3, stride=1), g),
        nn.ReLU(),
        nn.Flatten(),
        layer_init(nn.Linear(64 * 7 * 7, 512), g),
        nn.ReLU(),
    )


class ActorCritic(nn.Module):
    """Policy and value function for one env's spaces.

    ``act(obs)`` samples (or takes the mode of) actions for a batch of observations; ``evaluate``
    recomputes log-probs, entropies and values of stored actions for the PPO loss.
    """

    def __init__(self, spec: SpaceSpec, cfg: RLConfig) -> None:
        super().__init__()
        self.spec = spec
        self.continuous = spec.kind == "continuous"
        self.trunk: nn.Module | None
        if cfg.network == "cnn":
            self.trunk = nature_cnn(spec.obs_shape[0])
            self.actor: nn.Module = layer_init(nn.Linear(512, spec.action_dim), 0.01)
            self.critic: nn.Module = layer_init(nn.Linear(512, 1), 1.0)
        else:
            self.trunk = None
            in_dim = int(np.prod(spec.obs_shape))
            act = nn.Tanh if cfg.activation == "tanh" else nn.ReLU
            self.actor = mlp(in_dim, cfg.hidden_sizes, spec.action_dim, act, 0.01)
            self.critic = mlp(in_dim, cfg.hidden_sizes, 1, act, 1.0)
        if self.continuous:
            # State-independent log std ("37 implementation details", continuous #2).
            self.log_std = nn.Parameter(torch.full((spec.action_dim,), float(cfg.log_std_init)))
        self.nvec = list(spec.nvec)

    def _features(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs of the actor and of the critic heads."""
        if self.trunk is not None:
            h = self.trunk(obs.float() / 255.0)  # (N, 512)
            return h, h
        x = obs.flatten(1) if obs.dim() > 2 else obs
        return x, x

    def value(self, obs: Tensor) -> Tensor:
        """``(N,)`` state values."""
        _, xc = self._features(obs)
        return self.critic(xc).squeeze(-1)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """``(policy outputs (N, action_dim), values (N,))``: logits or Gaussian means."""
        xa, xc = self._features(obs)
        return self.actor(xa), self.critic(xc).squeeze(-1)

    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Sample actions. Returns ``(actions, logprobs (N,), values (N,))``; actions are
        ``(N, k)`` int64 category indices (k components) or ``(N, A)`` raw Gaussian samples."""
        out, values = self(obs)
        if self.continuous:
            std = self.log_std.exp()
            actions = out if deterministic else out + std * torch.randn_like(out)
            return actions, _gaussian_logprob(out, self.log_std, actions), values
        chunks = [out] if len(self.nvec) == 1 else list(out.split(self.nvec, dim=-1))
        acts, logp = [], torch.zeros_like(values)
        for logits in chunks:
            log_p = torch.log_softmax(logits, dim=-1)
            if deterministic:
                a = log_p.argmax(-1)
            else:  # Gumbel-max: argmax(logits - log E), E ~ Exp(1)
                a = (log_p - torch.empty_like(log_p).exponential_().log()).argmax(-1)
            logp = logp + log_p.gather(-1, a.unsqueeze(-1)).squeeze(-1)
            acts.append(a)
        return torch.stack(acts, dim=-1), logp, values

    def evaluate(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(logprobs (N,), entropy (N,), values (N,))`` of stored ``actions`` under the
        current parameters, with gradients."""
        out, values = self(obs)
        if self.continuous:
            logp = _gaussian_logprob(out, self.log_std, actions)
            entropy = (0.5 + _LOG_SQRT_2PI + self.log_std).sum().expand_as(logp)
            return logp, entropy, values
        chunks = [out] if len(self.nvec) == 1 else list(out.split(self.nvec, dim=-1))
        logp = torch.zeros_like(values)
        entropy = torch.zeros_like(values)
        for i, logits in enumerate(chunks):
            log_p = torch.log_softmax(logits, dim=-1)
            logp = logp + log_p.gather(-1, actions[:, i : i + 1]).squeeze(-1)
            entropy = entropy - (log_p.exp() * log_p).sum(-1)
        return logp, entropy, values


def _gaussian_logprob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """Log density of a diagonal Gaussian, summed over action components: ``(N,)``."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - _LOG_SQRT_2PI).sum(-1)


class NumpyPolicy:
    """Acting for MLP policies on CPU in NumPy: the rollout's batch-of-a-few forward passes cost
    tens of microseconds each in eager PyTorch and a few in NumPy.

    The arrays *share memory* with the torch parameters, so optimizer steps show up here with
    no copy. Only actions come from this path: the trainer recomputes the log-probs and values
    it stores with :meth:`ActorCritic.evaluate`, the same computation as the training forward
    pass, so the probability ratio is exactly 1 before the first step of an update.
    """

    def __init__(self, agent: ActorCritic, rng: np.random.Generator) -> None:
        if not self.supports(agent):
            raise ValueError("NumpyPolicy needs an MLP ActorCritic on the CPU in float32")
        linears = [m for m in agent.actor.modules() if isinstance(m, nn.Linear)]
        self.layers = [(m.weight.detach().numpy().T, m.bias.detach().numpy()) for m in linears]
        self.tanh = any(isinstance(m, nn.Tanh) for m in agent.actor.modules())
        self.continuous = agent.continuous
        self.log_std = agent.log_std.detach().numpy() if agent.continuous else None
        self.nvec = agent.nvec
        self.rng = rng

    @staticmethod
    def supports(agent: ActorCritic) -> bool:
        p = next(agent.parameters())
        return agent.trunk is None and p.device.type == "cpu" and p.dtype == torch.float32

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Actions for ``obs`` ``(N, *obs_shape)``: ``(N, A)`` float32 raw Gaussian samples or
        ``(N, k)`` int64 category indices."""
        h = obs.reshape(obs.shape[0], -1)
        last = len(self.layers) - 1
        for i, (w_t, b) in enumerate(self.layers):
            h = h @ w_t + b
            if i < last:
                h = np.tanh(h) if self.tanh else np.maximum(h, 0.0)
        if self.log_std is not None:
            noise = self.rng.standard_normal(h.shape, dtype=np.float32)
            return h + np.exp(self.log_std) * noise
        if len(self.nvec) == 1:
            return self._sample(h)[:, None]
        splits = np.cumsum(self.nvec)[:-1]
        return np.stack([self._sample(x) for x in np.split(h, splits, axis=-1)], axis=-1)

    def _sample(self, logits: np.ndarray) -> np.ndarray:
        # Gumbel-max: argmax(logits - log E), E ~ Exp(1), equals sampling softmax(logits).
        e = self.rng.standard_exponential(logits.shape, dtype=np.float32)
        return np.argmax(logits - np.log(e), axis=-1).astype(np.int64)
