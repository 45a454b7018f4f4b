"""Clipped PPO policy and value losses and truncated importance weights."""

from __future__ import annotations

import torch

from stages.ppo.core.checks import (
    _as_bool_mask,
    _float_dtype,
    _require_ndim,
    _require_same_shape,
)
from stages.ppo.core.stats import masked_mean

# --------------------------------------------------------------------------------------------
# losses


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (to minimise), masked mean over real tokens.

    ``ratio = exp(logp - old_logp)``;
    ``loss = mean(w * max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``, ``w = 1`` unless given.

    Args:
        logp: ``(B, T)`` log-probs under the current policy (carries the gradient).
        old_logp: ``(B, T)`` log-probs under the rollout policy (treated as constants).
        advantages: ``(B, T)`` (typically whitened; treated as constants).
        mask: ``(B, T)`` 0/1.
        cliprange: eps > 0.
        token_weights: optional ``(B, T)`` per-token weights (constants), e.g.
            :func:`truncated_importance_weights` for a rollout engine's samples: each token's clipped term
            is multiplied by its weight before the masked mean (verl's ``rollout_is_weights``, TRL's
            ``importance_sampling_ratio``). The statistics below do not use them.

    Returns:
        ``(loss, stats)``: loss is a 0-dim fp32 tensor. ``stats`` holds detached 0-dim fp32 tensors:
        ``clipfrac`` (fraction of real tokens where the clipped term was active), ``approx_kl``
        (``0.5 * mean((logp - old_logp)^2)``, the quadratic estimate of KL(old || new) that is
        accurate for the small steps PPO takes), ``ratio_max`` and ``ratio_mean`` over real tokens
        (``ratio_max`` lets the trainer skip minibatches whose ratio explodes).
    """
    fn = "clipped_policy_loss"
    _require_ndim(fn, "logp", logp, 2, "(batch, response_len)")
    _require_same_shape(fn, "logp", logp, old_logp=old_logp, advantages=advantages, mask=mask)
    eps = float(cliprange)
    if not eps > 0:
        raise ValueError(f"{fn}: `cliprange` must be > 0, got {eps}")
    m = _as_bool_mask(fn, mask)

    dtype = _float_dtype(logp, old_logp, advantages)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    # Log-ratio forced to 0 in padding: exp of garbage there could be inf and poison the gradient
    # through torch.where's backward (0 * inf = NaN).
    log_ratio = torch.where(m, logp.to(dtype) - old_logp.detach().to(dtype), zero)
    ratio = torch.exp(log_ratio)
    adv = torch.where(m, advantages.detach().to(dtype), zero)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - eps, 1.0 + eps)
    per_token = torch.maximum(pg_unclipped, pg_clipped)
    if token_weights is not None:
        _require_same_shape(fn, "logp", logp, token_weights=token_weights)
        per_token = per_token * torch.where(m, token_weights.detach().to(dtype), zero)
    loss = masked_mean(per_token, m)

    with torch.no_grad():
        stats = {"clipfrac": masked_mean((pg_clipped > pg_unclipped).to(dtype), m),
                 "approx_kl": 0.5 * masked_mean(log_ratio.square(), m),
                 "ratio_max": ratio.masked_fill(~m, float("-inf")).max(), "ratio_mean": masked_mean(ratio, m)}
    return loss, stats


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped value loss: ``0.5 * mean(max((V - R)^2, (V_clip - R)^2))`` over real tokens.

    ``V_clip = old_V + clip(V - old_V, -eps_v, eps_v)`` keeps the critic near its rollout values.

    Args:
        values: ``(B, T)`` current critic values (carries the gradient).
        old_values: ``(B, T)`` critic values from the rollout (constants).
        returns: ``(B, T)`` GAE returns (constants).
        mask: ``(B, T)`` 0/1.
        cliprange_value: eps_v > 0.

    Returns:
        ``(loss, stats)``: 0-dim fp32 loss; ``stats["vf_clipfrac"]`` is the detached fraction of real
        tokens where the clipped error was the larger one (i.e. clipping limited the update).
    """
    fn = "clipped_value_loss"
    _require_ndim(fn, "values", values, 2, "(batch, response_len)")
    _require_same_shape(fn, "values", values, old_values=old_values, returns=returns, mask=mask)
    eps = float(cliprange_value)
    if not eps > 0:
        raise ValueError(f"{fn}: `cliprange_value` must be > 0, got {eps}")
    m = _as_bool_mask(fn, mask)

    dtype = _float_dtype(values, old_values, returns)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    v = torch.where(m, values.to(dtype), zero)
    old = torch.where(m, old_values.detach().to(dtype), zero)
    ret = torch.where(m, returns.detach().to(dtype), zero)
    v_clipped = old + torch.clamp(v - old, -eps, eps)
    err_unclipped = (v - ret).square()
    err_clipped = (v_clipped - ret).square()
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), m)
    with torch.no_grad():
        vf_clipfrac = masked_mean((err_clipped > err_unclipped).to(dtype), m)
    return loss, {"vf_clipfrac": vf_clipfrac.detach()}


def truncated_importance_weights(
    old_logp: torch.Tensor,
    engine_logp: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance sampling (TIS) weights for tokens a rollout engine sampled:
    ``w_t = min(exp(old_logp_t - engine_logp_t), cap)``.

    The tokens come from the engine's distribution (``engine_logp``, e.g. vLLM in bf16) while the PPO ratio
    is taken against the trainer's ``old_logp``; ``w_t`` reweights each token's policy loss from the one to
    the other, capped so that a token the engine found unlikely cannot dominate the update (Yao et al.
    2025, "Your efficient RL framework secretly brings you off-policy RL training"; verl's rollout
    correction ``rollout_is: token`` / ``rollout_is_threshold``, TRL's ``vllm_importance_sampling_mode:
    token_truncate`` / ``vllm_importance_sampling_clip_max``). Pass ``w`` to :func:`clipped_policy_loss` as
    ``token_weights``: it multiplies the per-token clipped loss and is a constant (no gradient).

    Args:
        old_logp: ``(B, T)`` the trainer's log-probs of the sampled tokens.
        engine_logp: ``(B, T)`` the engine's log-probs of the same tokens. A NaN (the engine gave none)
            counts as no difference (weight 1), as TRL does.
        mask: ``(B, T)`` 0/1.
        cap: the largest weight, >= 1 (verl and OpenRLHF default to 2).

    Returns:
        ``(weights, stats)``: ``weights`` ``(B, T)`` fp32 (fp64 for fp64 inputs), detached, 1 on padding;
        ``stats`` holds detached 0-dim tensors over real tokens: ``is_weight_mean`` (mean weight after the
        cap) and ``is_capped_frac`` (share of tokens whose raw ratio exceeded ``cap``).
    """
    fn = "truncated_importance_weights"
    _require_ndim(fn, "old_logp", old_logp, 2, "(batch, response_len)")
    _require_same_shape(fn, "old_logp", old_logp, engine_logp=engine_logp, mask=mask)
    cap = float(cap)
    if not cap >= 1.0:
        raise ValueError(f"{fn}: `cap` must be >= 1, got {cap}")
    m = _as_bool_mask(fn, mask)
    dtype = _float_dtype(old_logp, engine_logp)
    zero = torch.zeros((), dtype=dtype, device=old_logp.device)
    with torch.no_grad():
        log_ratio = torch.nan_to_num(old_logp.detach().to(dtype) - engine_logp.detach().to(dtype), nan=0.0)
        # padding -> log-ratio 0 (weight 1); the clamp keeps exp finite (a -inf trainer log-prob gives ~0)
        log_ratio = torch.where(m, log_ratio, zero).clamp(-20.0, 20.0)
        raw = torch.exp(log_ratio)
        weights = raw.clamp(max=cap)
        stats = {"is_weight_mean": masked_mean(weights, m), "is_capped_frac": masked_mean((raw > cap).to(dtype), m)}
    return weights, stats
