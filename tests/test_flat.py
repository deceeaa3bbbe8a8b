"""Flat parameters update exactly like the separate tensors they replace."""

from __future__ import annotations

import copy

import torch
from torch import nn

from cliprail.ppo import flatten_parameters, ppo_update


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def _train(net, params, steps_seed=0):
    opt = torch.optim.Adam(params, lr=1e-2, eps=1e-5)
    g = torch.Generator().manual_seed(steps_seed)
    batch = {"x": torch.randn(64, 5, generator=g), "y": torch.randn(64, 3, generator=g)}
    ppo_update(lambda mb: ((net(mb["x"]) - mb["y"]).pow(2).mean(), {}), opt, params, batch,
               minibatch_size=16, epochs=3, max_grad_norm=0.5,
               generator=torch.Generator().manual_seed(1))  # fmt: skip
    return opt


def test_flat_training_matches_separate_tensors():
    a = _net()
    b = copy.deepcopy(a)
    _train(a, list(a.parameters()))
    flat = flatten_parameters(b)
    _train(b, [flat])
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
        assert pb.data_ptr() >= flat.data_ptr()  # still views of the flat buffer


def test_flat_views_survive_load_state_dict_and_share_with_numpy():
    net = _net()
    flat = flatten_parameters(net)
    w_np = net[0].weight.detach().numpy()
    state = {k: torch.full_like(v, 0.25) for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    assert (flat.detach() == 0.25).all()  # load copied into the flat storage
    assert (w_np == 0.25).all()  # and NumPy views see it
    with torch.no_grad():
        flat.add_(1.0)
    assert (net[2].bias == 1.25).all()
