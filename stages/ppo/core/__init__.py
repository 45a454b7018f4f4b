"""Pure PPO math (DESIGN §4): GAE, masked statistics, KL estimators, losses, KL controllers.

Every function here is side-effect free and works on plain tensors, so it can be tested against
hand-worked numbers and reused by any trainer. Shape names used in the docstrings:

- ``B``: batch size (number of sequences)
- ``T``: response length (tokens generated after the prompt, right-padded)
- ``V``: vocabulary size

Masks are ``(B, T)`` with 1 on real response tokens and 0 on padding after the end (eos included
as a real token). They may be bool, integer or float, but must hold only 0/1. Functions that need
"the last real token" additionally require each row's mask to be a run of 1s followed by 0s,
because that is the layout the rollout produces (tokens after eos are masked) and a hole in the
middle would silently cut the GAE bootstrap chain.

Losses and statistics are computed in fp32 (or fp64 if given fp64) whatever the input dtype:
bf16 log-probabilities lose too much precision for ratios exp(logp - old_logp) near 1.

Modules by concern: ``checks`` (argument validation), ``stats`` (masked statistics, explained
variance, running moments), ``advantages`` (GAE, discounted returns, group estimators, KL return),
``kl`` (KL estimators, penalty, per-token rewards, controllers), ``losses`` (clipped losses,
importance weights, loss aggregation), ``shaping`` (length penalties on the sequence reward), ``logits``
(log-probabilities, entropy), ``sampling`` (dynamic sampling: tied groups and which groups fill a batch).
Import from ``stages.ppo.core``.
"""

from stages.ppo.core.advantages import (
    GRPO_SCALES,
    compute_gae,
    discounted_returns,
    grpo_advantages,
    kl_return,
    rloo_advantages,
)
from stages.ppo.core.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
    per_token_rewards,
)
from stages.ppo.core.logits import entropy_from_logits, logprobs_from_logits
from stages.ppo.core.losses import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    clipped_policy_loss,
    clipped_value_loss,
    importance_log_ratio,
    loss_units,
    truncated_importance_weights,
)
from stages.ppo.core.sampling import group_rows, select_groups, tied_groups
from stages.ppo.core.shaping import overlong_penalty
from stages.ppo.core.stats import RunningMoments, explained_variance, masked_mean, masked_var, masked_whiten

__all__ = [
    "compute_gae",
    "discounted_returns",
    "grpo_advantages",
    "rloo_advantages",
    "kl_return",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "per_token_rewards",
    "clipped_policy_loss",
    "importance_log_ratio",
    "aggregate_loss",
    "loss_units",
    "LOSS_AGGREGATIONS",
    "overlong_penalty",
    "GRPO_SCALES",
    "clipped_value_loss",
    "truncated_importance_weights",
    "entropy_from_logits",
    "logprobs_from_logits",
    "explained_variance",
    "FixedKLController",
    "AdaptiveKLController",
    "RunningMoments",
    "tied_groups",
    "select_groups",
    "group_rows",
]
