"""The PPO core shared by the Gymnasium and RLHF trainers: pure tensor functions, masks in every
signature, and the minibatch update loop. Depends on torch alone."""

from cliprail.ppo.advantages import gae
from cliprail.ppo.critic_free import (
    group_relative_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_variance_groups,
)
from cliprail.ppo.flat import flatten_parameters
from cliprail.ppo.kl import (
    AdaptiveKLController,
    FixedKLController,
    ZieglerKLController,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
)
from cliprail.ppo.losses import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    clipped_surrogate,
    entropy_bonus,
    kl_penalized_surrogate,
    kl_penalty,
    plain_surrogate,
    value_loss,
)
from cliprail.ppo.masked import (
    explained_variance,
    masked_count,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from cliprail.ppo.preference import best_of_n_kl, best_of_n_kl_estimate, dpo_loss
from cliprail.ppo.update import (
    NonFiniteError,
    UpdateResult,
    UpdateSync,
    clip_grad_norm,
    fused_or_plain,
    linear_anneal,
    ppo_update,
    set_learning_rate,
    zero_grads,
)

__all__ = [
    "LOSS_AGGREGATIONS",
    "AdaptiveKLController",
    "FixedKLController",
    "NonFiniteError",
    "UpdateResult",
    "UpdateSync",
    "ZieglerKLController",
    "aggregate_loss",
    "best_of_n_kl",
    "best_of_n_kl_estimate",
    "clip_grad_norm",
    "clipped_surrogate",
    "dpo_loss",
    "entropy_bonus",
    "explained_variance",
    "flatten_parameters",
    "fused_or_plain",
    "gae",
    "group_relative_advantages",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalized_surrogate",
    "kl_penalty",
    "linear_anneal",
    "masked_count",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "plain_surrogate",
    "ppo_update",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "set_learning_rate",
    "value_loss",
    "zero_grads",
    "zero_variance_groups",
]
