"""The reuse window: one optimizer step per minibatch, early stop, non-finite minibatches."""

from __future__ import annotations

import pytest
import torch

from cliprail.ppo import NonFiniteError, linear_anneal, ppo_update


class CountingSGD(torch.optim.SGD):
    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def _setup(n=32):
    w = torch.nn.Parameter(torch.zeros(3))
    batch = {"x": torch.randn(n, 3, generator=torch.Generator().manual_seed(0)),
             "idx": torch.arange(n)}  # fmt: skip
    return w, batch


def test_one_optimizer_step_per_minibatch():
    # TRL #5645: with several minibatches the optimizer stepped once per epoch.
    w, batch = _setup(32)
    opt = CountingSGD([w], lr=0.01)
    seen = []

    def loss_fn(mb):
        seen.append(mb["idx"].clone())
        return (mb["x"] @ w).pow(2).mean() + w.sum(), {}

    res = ppo_update(loss_fn, opt, [w], batch, minibatch_size=8, epochs=3)
    assert opt.steps == res.optimizer_steps == 3 * 4
    assert res.epochs_completed == 3 and not res.early_stopped
    # each epoch visits every sample exactly once, in a fresh order
    for e in range(3):
        epoch = torch.cat(seen[4 * e : 4 * e + 4])
        assert sorted(epoch.tolist()) == list(range(32))
    assert torch.cat(seen[:4]).tolist() != torch.cat(seen[4:8]).tolist()


def test_shuffles_deterministic_under_seed():
    orders = []
    for _ in range(2):
        w, batch = _setup(16)
        got = []
        ppo_update(lambda mb, got=got, w=w: (got.append(mb["idx"]) or w.sum(), {}),
                   torch.optim.SGD([w], lr=0.1), [w], batch, minibatch_size=4, epochs=2,
                   generator=torch.Generator().manual_seed(7))  # fmt: skip
        orders.append(torch.cat(got).tolist())
    assert orders[0] == orders[1]


def test_early_stop_on_target_kl_before_stepping():
    w, batch = _setup(32)
    opt = CountingSGD([w], lr=0.01)
    calls = {"n": 0}

    def loss_fn(mb):
        calls["n"] += 1
        kl = torch.tensor(0.001 if calls["n"] <= 5 else 0.5)
        return w.sum(), {"approx_kl": kl}

    res = ppo_update(loss_fn, opt, [w], batch, minibatch_size=8, epochs=10, target_kl=0.02)
    assert res.early_stopped
    assert opt.steps == 5  # the 6th minibatch exceeded the target and did not step
    assert res.epochs_completed == 1


def test_grad_norm_is_clipped():
    w = torch.nn.Parameter(torch.zeros(4))
    batch = {"x": torch.zeros(4, 1)}
    opt = torch.optim.SGD([w], lr=1.0)
    res = ppo_update(lambda mb: ((w * 100).sum(), {}), opt, [w], batch, minibatch_size=4,
                     epochs=1, max_grad_norm=0.5)  # fmt: skip
    assert res.stats["grad_norm"] == pytest.approx(200.0)  # reported before clipping
    assert torch.linalg.vector_norm(w).item() == pytest.approx(0.5, rel=1e-5)


def test_nonfinite_minibatches_skipped_then_halt():
    w, batch = _setup(32)
    before = w.detach().clone()
    opt = CountingSGD([w], lr=0.1)
    losses = iter([float("nan"), 1.0, float("inf"), 1.0])

    def loss_fn(mb):
        return w.sum() * next(losses), {}

    res = ppo_update(loss_fn, opt, [w], batch, minibatch_size=8, epochs=1)
    assert res.skipped_nonfinite == 2 and opt.steps == 2
    assert torch.isfinite(w).all()

    w2 = torch.nn.Parameter(before.clone())
    with pytest.raises(NonFiniteError, match="3 minibatches in a row"):
        ppo_update(lambda mb: (w2.sum() * float("nan"), {}), torch.optim.SGD([w2], lr=0.1),
                   [w2], batch, minibatch_size=8, epochs=1, max_nonfinite_in_row=3)  # fmt: skip
    torch.testing.assert_close(w2.detach(), before)  # nothing reached the weights


def test_minibatch_size_must_divide():
    w, batch = _setup(10)
    with pytest.raises(ValueError, match="divide"):
        ppo_update(lambda mb: (w.sum(), {}), torch.optim.SGD([w], lr=0.1), [w], batch,
                   minibatch_size=3, epochs=1)  # fmt: skip


def test_linear_anneal():
    assert linear_anneal(3e-4, 0.0) == 3e-4
    assert linear_anneal(3e-4, 0.5) == pytest.approx(1.5e-4)
    assert linear_anneal(3e-4, 1.0) == 0.0
    assert linear_anneal(1.0, 2.0, end=0.5) == 0.5
