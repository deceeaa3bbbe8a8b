"""PPO on CartPole-v1 with cliprail's pieces, top to bottom (about 60 lines of logic).

The trainer (`cliprail rl train`) does the same with checkpoints, metrics and normalisation;
this script shows the loop itself: rollout -> GAE -> epochs x minibatches.

    python examples/ppo_cartpole.py
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from cliprail.ppo import (
    clipped_surrogate,
    entropy_bonus,
    gae,
    masked_whiten,
    ppo_update,
    value_loss,
)
from cliprail.rl.agent import ActorCritic
from cliprail.rl.config import preset_config
from cliprail.rl.envs import space_spec

cfg = preset_config("classic")  # 8 envs x 32 steps, 20 epochs, minibatch 256, lr 1e-3 annealed
T, N, updates = cfg.num_steps, cfg.num_envs, 100_000 // (cfg.num_steps * cfg.num_envs)
torch.manual_seed(1)
torch.set_num_threads(1)
envs = gym.make_vec("CartPole-v1", N, vectorization_mode="sync",
                    vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP})  # fmt: skip
agent = ActorCritic(space_spec(envs.single_observation_space, envs.single_action_space, ""), cfg)
opt = torch.optim.Adam(agent.parameters(), lr=cfg.learning_rate, eps=cfg.adam_eps)

obs, _ = envs.reset(seed=1)
returns, ep_ret = [], np.zeros(N)
for update in range(updates):
    frac = update / updates
    opt.param_groups[0]["lr"] = cfg.learning_rate * (1 - frac)  # anneal lr and clip to 0
    clip = cfg.clip_range * (1 - frac)
    buf = {k: [] for k in ("obs", "actions", "logprobs", "values", "rewards", "term", "trunc")}
    final_values = torch.zeros(T, N)
    for t in range(T):  # --- rollout
        obs_t = torch.as_tensor(obs, dtype=torch.float32)
        actions, logprobs, values = agent.act(obs_t)
        obs, rewards, term, trunc, info = envs.step(actions[:, 0].numpy())
        ep_ret += rewards
        for i in np.flatnonzero(term | trunc):
            returns.append(ep_ret[i])
            ep_ret[i] = 0
            if trunc[i] and not term[i]:  # bootstrap a time limit from the true final obs
                final = torch.as_tensor(info["final_obs"][i], dtype=torch.float32)[None]
                final_values[t, i] = agent.value(final).detach()[0]
        for k, v in zip(buf, (obs_t, actions, logprobs, values, rewards, term, trunc), strict=True):
            buf[k].append(torch.as_tensor(v))
    b = {k: torch.stack(v) for k, v in buf.items()}  # (T, N, ...)
    with torch.no_grad():
        next_values = torch.cat(
            [b["values"][1:], agent.value(torch.as_tensor(obs, dtype=torch.float32))[None]]
        )
    next_values = torch.where(b["trunc"], final_values, next_values)
    advantages, rets = gae(b["rewards"].float(), b["values"], next_values, b["term"], b["trunc"],
                           gamma=cfg.gamma, lam=cfg.gae_lambda)  # fmt: skip
    batch = {"obs": b["obs"].flatten(0, 1), "actions": b["actions"].flatten(0, 1),
             "logprobs": b["logprobs"].flatten(), "values": b["values"].flatten(),
             "advantages": advantages.flatten(), "returns": rets.flatten()}  # fmt: skip

    def loss_fn(mb, clip=clip):  # --- the PPO loss, eq. 9 of the paper
        logprobs, entropy, values = agent.evaluate(mb["obs"], mb["actions"])
        pg, stats = clipped_surrogate(logprobs, mb["logprobs"], masked_whiten(mb["advantages"]),
                                      clip_range=max(clip, 1e-8))  # fmt: skip
        vf, _ = value_loss(values, mb["values"], mb["returns"])
        ent, _ = entropy_bonus(entropy)
        return pg + cfg.vf_coef * vf - cfg.ent_coef * ent, stats

    result = ppo_update(loss_fn, opt, agent.parameters(), batch,
                        minibatch_size=cfg.minibatch_size, epochs=cfg.epochs)  # fmt: skip
    if update % 50 == 0 or update == updates - 1:
        print(f"update {update:4d}  return(last 20) {np.mean(returns[-20:]):6.1f}  "
              f"clip_frac {result.stats['clip_fraction']:.3f}  "
              f"approx_kl {result.stats['approx_kl']:.4f}")  # fmt: skip
envs.close()
