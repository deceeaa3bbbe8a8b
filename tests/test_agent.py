"""Networks: gradient routing, distributions against torch.distributions, the NumPy actor."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cliprail.ppo import clipped_surrogate, value_loss
from cliprail.rl.agent import ActorCritic, NumpyPolicy
from cliprail.rl.config import RLConfig, preset_config
from cliprail.rl.envs import SpaceSpec

CONT = SpaceSpec((5,), np.dtype("float32"), "continuous", 3, low=(-1.0,) * 3, high=(1.0,) * 3)
DISC = SpaceSpec((4,), np.dtype("float32"), "discrete", 6, (6,), (0,))
MULTI = SpaceSpec((4,), np.dtype("float32"), "multidiscrete", 5, (3, 2), (0, 0))


def _agent(spec, **kw):
    torch.manual_seed(0)
    return ActorCritic(spec, dataclasses.replace(RLConfig(), **kw))


@pytest.mark.parametrize("spec", [CONT, DISC, MULTI], ids=["continuous", "discrete", "multi"])
def test_gradients_reach_only_their_network(spec):
    agent = _agent(spec)
    obs = torch.randn(16, spec.obs_shape[0])
    actions, old_logp, _ = agent.act(obs)
    logp, _, values = agent.evaluate(obs, actions)
    pg_loss, _ = clipped_surrogate(logp, old_logp - 0.1, torch.randn(16), clip_range=0.2)
    pg_loss.backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in agent.critic.parameters())
    assert any(p.grad is not None and (p.grad != 0).any() for p in agent.actor.parameters())
    agent.zero_grad(set_to_none=True)
    logp, _, values = agent.evaluate(obs, actions)
    v_loss, _ = value_loss(values, values.detach(), torch.randn(16))
    v_loss.backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in agent.actor.parameters())
    if spec.kind == "continuous":
        assert agent.log_std.grad is None or (agent.log_std.grad == 0).all()
    assert any(p.grad is not None and (p.grad != 0).any() for p in agent.critic.parameters())


def test_continuous_logprob_and_entropy_match_torch_distributions():
    agent = _agent(CONT)
    with torch.no_grad():
        agent.log_std.copy_(torch.tensor([-0.5, 0.0, 0.3]))
    obs = torch.randn(8, 5)
    actions = torch.randn(8, 3)
    logp, ent, _ = agent.evaluate(obs, actions)
    mean, _ = agent(obs)
    dist = torch.distributions.Normal(mean, agent.log_std.exp())
    torch.testing.assert_close(logp, dist.log_prob(actions).sum(-1))
    torch.testing.assert_close(ent, dist.entropy().sum(-1))


@pytest.mark.parametrize("spec", [DISC, MULTI], ids=["discrete", "multi"])
def test_categorical_logprob_and_entropy_match_torch_distributions(spec):
    agent = _agent(spec)
    obs = torch.randn(8, 4)
    actions, act_logp, _ = agent.act(obs)
    logp, ent, _ = agent.evaluate(obs, actions)
    logits, _ = agent(obs)
    ref_logp, ref_ent = torch.zeros(8), torch.zeros(8)
    for i, chunk in enumerate(logits.split(list(spec.nvec), dim=-1)):
        d = torch.distributions.Categorical(logits=chunk)
        ref_logp += d.log_prob(actions[:, i])
        ref_ent += d.entropy()
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(ent, ref_ent)
    torch.testing.assert_close(act_logp, ref_logp)


@pytest.mark.parametrize("spec", [CONT, DISC, MULTI], ids=["continuous", "discrete", "multi"])
def test_numpy_policy_matches_torch_network(spec):
    agent = _agent(spec, activation="tanh")
    pol = NumpyPolicy(agent, np.random.default_rng(0))
    obs = np.random.default_rng(1).standard_normal((6, spec.obs_shape[0])).astype(np.float32)
    # the deterministic part (the actor's output) agrees with torch
    h = obs
    for i, (w_t, b) in enumerate(pol.layers):
        h = h @ w_t + b
        h = np.tanh(h) if i < len(pol.layers) - 1 else h
    out, _ = agent(torch.from_numpy(obs))
    np.testing.assert_allclose(h, out.detach().numpy(), rtol=1e-5, atol=1e-6)
    # weights are shared: an optimizer step is visible without rebuilding the policy
    with torch.no_grad():
        next(agent.actor.parameters()).add_(1.0)
    out2, _ = agent(torch.from_numpy(obs))
    np.testing.assert_allclose(obs @ pol.layers[0][0] + pol.layers[0][1],
                               torch.nn.functional.linear(torch.from_numpy(obs),
                                   next(agent.actor.parameters()), agent.actor[0].bias
                               ).detach().numpy(), rtol=1e-5, atol=1e-5)  # fmt: skip
    assert not np.allclose(out2.detach().numpy(), out.detach().numpy())


def test_numpy_policy_samples_from_the_policy_distribution():
    agent = _agent(DISC)
    pol = NumpyPolicy(agent, np.random.default_rng(0))
    obs = np.zeros((1, 4), np.float32)
    with torch.no_grad():
        agent.actor[-1].bias.copy_(torch.log(torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])))
        agent.actor[-1].weight.zero_()
    counts = np.bincount(np.concatenate([pol.act(obs)[:, 0] for _ in range(20_000)]), minlength=6)
    np.testing.assert_allclose(counts / 20_000, [0.5, 0.2, 0.1, 0.1, 0.05, 0.05], atol=0.012)
    cont = _agent(CONT)
    with torch.no_grad():
        cont.log_std.fill_(np.log(0.5))
    cpol = NumpyPolicy(cont, np.random.default_rng(0))
    x = np.zeros((4000, 5), np.float32)
    a = cpol.act(x)
    mean, _ = cont(torch.from_numpy(x[:1]))
    np.testing.assert_allclose(a.mean(0), mean.detach().numpy()[0], atol=0.03)
    np.testing.assert_allclose(a.std(0), 0.5, atol=0.02)


def test_cnn_agent_shapes():
    spec = SpaceSpec((4, 84, 84), np.dtype("uint8"), "discrete", 6, (6,), (0,))
    agent = ActorCritic(spec, preset_config("atari"))
    obs = torch.randint(0, 255, (3, 4, 84, 84), dtype=torch.uint8)
    actions, logp, values = agent.act(obs)
    assert actions.shape == (3, 1) and logp.shape == (3,) and values.shape == (3,)
    assert not NumpyPolicy.supports(agent)
