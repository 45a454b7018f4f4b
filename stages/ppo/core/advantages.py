"""Advantage estimators: GAE, discounted returns, group baselines (GRPO/RLOO), the KL return."""

from __future__ import annotations

import torch

from stages.ppo.core.checks import (
    _as_bool_mask,
    _check_unit_interval,
    _float_dtype,
    _require_ndim,
    _require_prefix_mask,
    _require_same_shape,
    _require_tensor,
    _shape,
)
from stages.ppo.core.kl import per_token_rewards

# --------------------------------------------------------------------------------------------
# advantages


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over response tokens.

    With ``V_{T_i} = 0`` after the last real token ``T_i - 1`` of row ``i`` (the episode ends at
    eos, so the bootstrap value is terminal)::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t

    Args:
        rewards: ``(B, T)`` per-token rewards (see :func:`per_token_rewards`).
        values: ``(B, T)`` critic values of the state before each response token.
        mask: ``(B, T)`` 0/1, each row 1s then 0s.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1]. ``lam=1`` gives Monte-Carlo advantages (reward-to-go minus
            value), ``lam=0`` one-step TD errors.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, fp32 (fp64 if an input is fp64), detached
        (they are targets, never differentiated). Both are 0 where ``mask`` is 0; rewards and values
        at padded positions are ignored entirely, so garbage there cannot leak backwards.

    Raises:
        ValueError: wrong shapes, a mask that is not 0/1 or not right-padded, gamma/lam outside [0, 1].
    """
    fn = "compute_gae"
    _require_ndim(fn, "rewards", rewards, 2, "(batch, response_len)")
    _require_same_shape(fn, "rewards", rewards, values=values, mask=mask)
    gamma = _check_unit_interval(fn, "gamma", gamma)
    lam = _check_unit_interval(fn, "lam", lam)
    m = _as_bool_mask(fn, mask)
    _require_prefix_mask(fn, m)

    dtype = _float_dtype(rewards, values)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    r = torch.where(m, rewards.detach().to(dtype), zero)
    # Zeroing values past the end makes V_{t+1} = 0 at the last real token: the terminal bootstrap.
    v = torch.where(m, values.detach().to(dtype), zero)
    mf = m.to(dtype)

    batch, length = r.shape
    advantages = torch.zeros_like(r)
    last_gae = torch.zeros(batch, dtype=dtype, device=r.device)
    next_value = torch.zeros(batch, dtype=dtype, device=r.device)
    for t in range(length - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        # Multiplying by the mask resets the recursion in padding, so A_{t+1} = 0 for the last real t.
        last_gae = (delta + gamma * lam * last_gae) * mf[:, t]
        advantages[:, t] = last_gae
        next_value = v[:, t]
    returns = advantages + v
    return advantages, returns


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go ``G_t = sum_{s >= t} gamma^(s - t) * r_s`` over each row's real tokens (no critic).

    REINFORCE++ (Hu 2025) uses it with the per-token rewards of :func:`per_token_rewards`
    (``-beta * KL_s`` on every token, the score at the last one), so ``G_t = score - beta * sum_{s >= t} KL_s``
    at ``gamma = 1``; its baseline is global: the caller whitens ``G`` over the whole (global) batch.
    Equal to :func:`compute_gae` with ``values = 0`` and ``lam = 1``.

    Args:
        rewards: ``(B, T)`` per-token rewards.
        mask: ``(B, T)`` 0/1, each row 1s then 0s.
        gamma: discount in [0, 1].

    Returns:
        ``(B, T)`` fp32 (fp64 if rewards are fp64), detached, 0 where ``mask`` is 0 (rewards in padding
        are ignored).
    """
    fn = "discounted_returns"
    _require_ndim(fn, "rewards", rewards, 2, "(batch, response_len)")
    _require_same_shape(fn, "rewards", rewards, mask=mask)
    gamma = _check_unit_interval(fn, "gamma", gamma)
    m = _as_bool_mask(fn, mask)
    _require_prefix_mask(fn, m)
    dtype = _float_dtype(rewards)
    r = torch.where(m, rewards.detach().to(dtype), torch.zeros((), dtype=dtype, device=rewards.device))
    out = torch.zeros_like(r)
    running = torch.zeros(r.size(0), dtype=dtype, device=r.device)
    for t in range(r.size(1) - 1, -1, -1):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return torch.where(m, out, torch.zeros((), dtype=dtype, device=r.device))


def _grouped(fn: str, scores: torch.Tensor, mask: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (scores as (G, K) in fp32/fp64, mask as bool (B, T)) after the checks the group estimators share."""
    _require_tensor(fn, "scores", scores)
    _require_ndim(fn, "mask", mask, 2, "(batch, response_len)")
    if scores.dim() != 1 or scores.size(0) != mask.size(0):
        raise ValueError(f"{fn}: `scores` must be 1-D (batch,) matching mask's batch size {mask.size(0)}; "
                         f"got scores {_shape(scores)} and mask {_shape(mask)}")
    k = int(group_size)
    if k < 2:
        raise ValueError(f"{fn}: `group_size` must be >= 2 (a group baseline needs other samples), got {k}")
    if scores.size(0) % k:
        raise ValueError(f"{fn}: batch size {scores.size(0)} is not a multiple of group_size {k}; rows must be "
                         "whole groups, each prompt's K samples consecutive")
    m = _as_bool_mask(fn, mask)
    return scores.detach().to(_float_dtype(scores)).view(-1, k), m


#: ``ppo.scale_rewards``'s values: what GRPO divides the centred score by
GRPO_SCALES = ("group", "batch", "none")


def grpo_advantages(scores: torch.Tensor, mask: torch.Tensor, group_size: int, eps: float = 1e-6,
                    scale: str = "group", batch_scores: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath): the group-centred score, scaled, the same on every token.

    Rows come in groups of ``K = group_size`` consecutive samples of one prompt. For sample ``i`` of group
    ``g``, by ``scale``::

        group:  A_i = (r_i - mean_g(r)) / (std_g(r) + eps)     GRPO
        batch:  A_i = (r_i - mean_g(r)) / (std_B(r) + eps)     std over the whole batch (TRL scale_rewards='batch')
        none:   A_i =  r_i - mean_g(r)                         Dr. GRPO (Liu et al. 2025): no std

    Stds are unbiased (Bessel, divides by n - 1). A group whose rewards are all equal gives 0 (no signal, no
    NaN). Dividing by a group's std weighs prompts by how much their samples disagree (a nearly solved or
    nearly failed prompt gets unit-scale advantages from tiny reward gaps): Dr. GRPO calls this a
    question-level difficulty bias; the batch std keeps one scale for all prompts.

    Args:
        scores: ``(B,)`` sequence rewards, ``B = G * K``.
        mask: ``(B, T)`` 0/1 response mask; the advantage is put on every real token.
        group_size: ``K >= 2``.
        eps: added to the std (keeps a near-constant group finite).
        scale: one of :data:`GRPO_SCALES`.
        batch_scores: ``(N,)`` the scores the ``batch`` std is taken over: the global batch, every rank's
            scores (default: ``scores``). Unused by the other scales.

    Returns:
        ``(B, T)`` fp32 (fp64 if scores are fp64), detached, 0 where ``mask`` is 0.
    """
    grouped, m = _grouped("grpo_advantages", scores, mask, group_size)
    if scale not in GRPO_SCALES:
        raise ValueError(f"grpo_advantages: `scale` must be one of {GRPO_SCALES}, got {scale!r}")
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "none":
        adv = centred.reshape(-1)
    else:
        if scale == "group":
            scale_std = grouped.std(dim=1, unbiased=True, keepdim=True)
        else:
            pool = scores if batch_scores is None else batch_scores
            scale_std = pool.detach().to(grouped.dtype).reshape(-1).std(unbiased=True)
        # an equal group is exactly 0 whatever eps (0 / 0 with eps = 0)
        adv = torch.where(centred == 0, torch.zeros_like(centred), centred / (scale_std + float(eps))).reshape(-1)
    return torch.where(m, adv.unsqueeze(1).expand(m.shape), torch.zeros((), dtype=adv.dtype, device=adv.device))


def rloo_advantages(scores: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): the score minus the mean of the *other* samples of
    its prompt, no std normalisation, the same on every token::

        A_i = r_i - (sum_g(r) - r_i) / (K - 1)  =  K / (K - 1) * (r_i - mean_g(r))

    The baseline does not depend on ``r_i``, so the estimator stays unbiased. Shapes and layout as in
    :func:`grpo_advantages`.
    """
    grouped, m = _grouped("rloo_advantages", scores, mask, group_size)
    k = grouped.size(1)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    adv = (grouped - baseline).reshape(-1)
    return torch.where(m, adv.unsqueeze(1).expand(m.shape), torch.zeros((), dtype=adv.dtype, device=adv.device))


def kl_return(kl: torch.Tensor, mask: torch.Tensor, kl_coef: float, gamma: float = 1.0) -> torch.Tensor:
    """The KL part of a critic-free advantage: ``-kl_coef * sum_{s >= t} gamma^(s - t) * KL_s`` per token.

    The group estimators (:func:`grpo_advantages`, :func:`rloo_advantages`) see the task score only; the
    KL penalty is added after them at its own scale, per token, as OpenRLHF does for its group
    estimators (``compute_reward`` then the reward-to-go). Subtracting ``beta * sum_t KL_t`` from the score
    *before* the group normalisation would divide the KL by the group's std: in a group whose scores tie
    the advantage becomes ``-(KL_i - mean) / std(KL)``, unit scale whatever ``kl_coef``.

    Args:
        kl: ``(B, T)`` per-token KL estimates (:func:`kl_penalty`).
        mask: ``(B, T)`` 0/1, each row 1s then 0s.
        kl_coef: beta >= 0.
        gamma: discount in [0, 1].

    Returns:
        ``(B, T)`` fp32 (fp64 if ``kl`` is fp64), detached, 0 where ``mask`` is 0; linear in ``kl_coef``.
    """
    zero_scores = torch.zeros(kl.size(0), dtype=_float_dtype(kl), device=kl.device)
    return discounted_returns(per_token_rewards(zero_scores, kl, mask, kl_coef), mask, gamma)
