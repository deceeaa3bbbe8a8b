"""The PPO family in the RLHF trainer (issue 16): GRPO, RLOO and REINFORCE++ without a value
model, groups of G responses kept whole, zero-variance groups, the KL in the loss, the loss
options, critic warmup, and the config checks."""

from __future__ import annotations

import json

import pytest
import torch

from cliprail.cli import main
from cliprail.errors import ConfigError
from cliprail.ppo import FixedKLController, ppo_update
from cliprail.rlhf.ppo import (
    PPOConfig,
    Rollout,
    group_advantages,
    load_models,
    ppo_step,
    rollout,
    token_rewards,
    zero_variance_rows,
)

pytest.importorskip("transformers")


def _cfg(root, **kw):
    base = dict(prompts=root / "data" / "prompts.jsonl", sft_model=root / "sft" / "model",
                reward_model=root / "rm" / "model", run_dir=root / "ppo-family", batch_size=8,
                minibatch_size=4, epochs=2, max_new_tokens=12, eval_prompts=8,
                progress=False)  # fmt: skip
    return PPOConfig(**{**base, **kw})


def _rollout(scores, lengths, L=4, kl=0.0):
    """A hand-made rollout: response i has ``lengths[i]`` tokens; log-probs differ from the
    reference's by ``kl`` per token (k1)."""
    B = len(scores)
    mask = torch.tensor([[t < n for t in range(L)] for n in lengths], dtype=torch.long)
    return Rollout(
        input_ids=torch.zeros(B, 2 + L, dtype=torch.long), attention_mask=torch.ones(B, 2 + L),
        response_mask=mask, query_len=2, logprobs=torch.full((B, L), -1.0),
        ref_logprobs=torch.full((B, L), -1.0 - kl), values=torch.zeros(B, L),
        scores=torch.tensor(scores),
    )  # fmt: skip


def test_grpo_advantages_from_a_rollout_by_hand():
    # two prompts, G = 2: scores (1, 3) and (2, 2); the KL is in the reward: 0.5 nats/token,
    # beta 0.2 -> each response's reward is score - 0.1 * length
    ro = _rollout([1.0, 3.0, 2.0, 2.0], [2, 4, 1, 3], kl=0.5)
    cfg = PPOConfig(prompts=None, sft_model=None, reward_model="rm", run_dir=None,  # type: ignore
                    advantage="grpo", group_size=2, group_scale="none")  # fmt: skip
    rewards, _ = token_rewards(ro, beta=0.2, estimator="k1")
    adv, ret, _ = group_advantages(ro, rewards, cfg)
    seq = [1 - 0.2, 3 - 0.4, 2 - 0.1, 2 - 0.3]  # score - 0.1 * length
    expect = [(seq[0] - seq[1]) / 2, (seq[1] - seq[0]) / 2, (seq[2] - seq[3]) / 2, -0.1]
    for i, n in enumerate([2, 4, 1, 3]):  # one advantage per response, on its tokens only
        assert adv[i, :n].tolist() == pytest.approx([expect[i]] * n)
        assert (adv[i, n:] == 0).all()
        assert ret[i, 0].item() == pytest.approx(seq[i])
    rloo = PPOConfig(prompts=None, sft_model=None, reward_model="rm", run_dir=None,  # type: ignore
                     advantage="rloo", group_size=2)  # fmt: skip
    adv_rloo, _, _ = group_advantages(ro, rewards, rloo)
    assert adv_rloo[0, 0].item() == pytest.approx(seq[0] - seq[1])  # G = 2: minus the other
    # zero-variance groups come from the scores (before the KL): the second group
    assert zero_variance_rows(ro, 2).tolist() == [False, False, True, True]


def test_reinforce_pp_advantages_from_a_rollout():
    ro = _rollout([1.0, -1.0], [3, 1], kl=0.5)
    cfg = PPOConfig(prompts=None, sft_model=None, reward_model="rm", run_dir=None,  # type: ignore
                    advantage="reinforce_pp")  # fmt: skip
    rewards, _ = token_rewards(ro, beta=0.2, estimator="k1")
    adv, ret, _ = group_advantages(ro, rewards, cfg)
    # rewards -0.1 per token, the score added on the last: (-0.1, -0.1, 0.9) and (-1.1);
    # returns from each token on: (0.7, 0.8, 0.9) and (-1.1)
    assert ret[0, :3].tolist() == pytest.approx([0.7, 0.8, 0.9])
    assert ret[1, 0].item() == pytest.approx(-1.1)
    vals = torch.tensor([0.7, 0.8, 0.9, -1.1])
    assert adv[ro.response_mask.bool()].tolist() == pytest.approx(
        ((vals - vals.mean()) / vals.std()).tolist(), abs=1e-5
    )


def test_ppo_update_keeps_groups_whole():
    seen = []

    def loss_fn(mb):
        seen.append(mb["row"].tolist())
        return (w * mb["w"]).sum() * 0, {}

    w = torch.zeros(1, requires_grad=True)
    batch = {"row": torch.arange(12), "w": torch.ones(12)}
    opt = torch.optim.SGD([w], lr=0.1)
    ppo_update(loss_fn, opt, [w], batch, minibatch_size=6, epochs=3, group_size=3,
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert len(seen) == 6
    for mb in seen:  # each minibatch: two whole groups, each in order
        groups = [mb[:3], mb[3:]]
        for grp in groups:
            assert grp[0] % 3 == 0 and grp == [grp[0], grp[0] + 1, grp[0] + 2]
    with pytest.raises(ValueError, match=r"group_size 4 must .* divide minibatch_size 6"):
        ppo_update(loss_fn, opt, [w], batch, minibatch_size=6, epochs=1, group_size=4)


def test_group_size_one_shuffles_as_before():
    """group_size 1 draws the same permutation as before groups existed: the default runs'
    numbers (docs/results.md) are unchanged."""
    rows = []

    def loss_fn(mb):
        rows.append(mb["row"].tolist())
        return (w * mb["w"]).sum() * 0, {}

    w = torch.zeros(1, requires_grad=True)
    ppo_update(loss_fn, torch.optim.SGD([w], lr=0.1), [w],
               {"row": torch.arange(8), "w": torch.ones(8)}, minibatch_size=8, epochs=1,
               generator=torch.Generator().manual_seed(7))  # fmt: skip
    assert rows[0] == torch.randperm(8, generator=torch.Generator().manual_seed(7)).tolist()


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_loads_trains_and_saves_no_value_model(pipeline, advantage):
    cfg = _cfg(pipeline, advantage=advantage, group_size=4)
    m = load_models(cfg)
    assert m.value is None
    before = {k: v.clone() for k, v in m.policy.state_dict().items()}
    prompts = [json.loads(x)["prompt"] for x in
               (pipeline / "data" / "prompts.jsonl").read_text().splitlines()[:2]]  # fmt: skip
    ro = rollout(m, cfg, [p for p in prompts for _ in range(4)], torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.policy.parameters(), lr=1e-3)
    stats = ppo_step(m, cfg, ro, opt, FixedKLController(0.05), torch.Generator().manual_seed(1))
    assert stats["optimizer_steps"] == 2 * 2
    assert "value_loss" not in stats and "policy_loss" in stats
    assert any(not torch.equal(before[k], v) for k, v in m.policy.state_dict().items())
    assert 0.0 <= stats["zero_variance_groups"] <= 1.0


def test_grpo_cli_end_to_end_checkpoints_no_critic(pipeline, capsys):
    run = pipeline / "grpo-cli"
    args = ["rlhf", "ppo", "--prompts", str(pipeline / "data" / "prompts.jsonl"),
            "--sft-model", str(pipeline / "sft" / "model"), "--reward-model",
            str(pipeline / "rm" / "model"), "--run-dir", str(run), "--total-episodes", "16",
            "--batch-size", "8", "--minibatch-size", "4", "--epochs", "1",
            "--max-new-tokens", "12", "--eval-every", "1", "--eval-prompts", "8",
            "--advantage", "grpo", "--group-size", "4", "--kl-in", "loss",
            "--loss-agg", "seq_mean_token_sum_norm", "--clip-range-high", "0.28",
            "--dual-clip", "3", "--filter-zero-variance", "--ratio-level", "sequence",
            "--checkpoint-every", "1",
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "kl_loss" in r]
    assert len(train) == 2 and all("value_loss" not in r for r in train)
    assert all("zero_variance_groups" in r for r in train)
    ckpts = sorted((run / "checkpoints").iterdir())
    assert ckpts and not list(ckpts[-1].glob("value*"))  # policy only
    assert list(ckpts[-1].glob("policy*"))
    stage = json.loads((run / "stage.json").read_text())
    assert stage["tokens_forward"] > 0
    capsys.readouterr()


def test_critic_warmup_trains_the_value_model_alone(pipeline):
    cfg = _cfg(pipeline, critic_warmup=1)
    m = load_models(cfg)
    pol = {k: v.clone() for k, v in m.policy.state_dict().items()}
    val = {k: v.clone() for k, v in m.value.state_dict().items()}
    prompts = [json.loads(x)["prompt"] for x in
               (pipeline / "data" / "prompts.jsonl").read_text().splitlines()[:8]]  # fmt: skip
    ro = rollout(m, cfg, prompts, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([*m.policy.parameters(), *m.value.parameters()], lr=1e-3)
    stats = ppo_step(m, cfg, ro, opt, FixedKLController(0.05), torch.Generator(), critic_only=True)
    assert stats["critic_only"] == 1.0 and "policy_loss" not in stats
    assert all(torch.equal(pol[k], v) for k, v in m.policy.state_dict().items())
    assert any(not torch.equal(val[k], v) for k, v in m.value.state_dict().items())


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"advantage": "grpo"}, "--group-size must be >= 2"),
        ({"group_size": 3}, "--group-size 3 must divide --batch-size 8"),
        ({"group_size": 0}, "--group-size must be >= 1"),
        ({"advantage": "rloo", "group_size": 2, "critic_warmup": 2}, "rloo has none"),
        ({"critic_warmup": -1}, "--critic-warmup must be >= 0"),
        ({"dual_clip": 1.0}, "--dual-clip must be > 1"),
        ({"clip_range_high": 0.0}, "--clip-range-high must be > 0"),
        ({"filter_zero_variance": True}, "--filter-zero-variance needs --group-size >= 2"),
    ],
)
def test_family_config_errors(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, **kw)
