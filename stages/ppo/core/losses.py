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
# aggregation: how a (B, T) per-token loss becomes one number

#: ``ppo.loss_aggregation``'s values: token-mean (DAPO), seq-mean-token-sum (Dr. GRPO), seq-mean-token-mean (GRPO)
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def _check_aggregation(fn: str, aggregation: str, max_length: float | None) -> None:
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"{fn}: `aggregation` must be one of {LOSS_AGGREGATIONS}, got {aggregation!r}")
    if aggregation == "seq-mean-token-sum" and not (max_length is not None and max_length > 0):
        raise ValueError(f"{fn}: aggregation 'seq-mean-token-sum' needs `max_length` > 0 (the constant each "
                         f"sequence's token sum is divided by), got {max_length}")


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str = "token-mean",
    max_length: float | None = None,
) -> torch.Tensor:
    """One loss from per-token losses ``l_it`` over real tokens, three ways (``N`` = real tokens, ``S`` =
    sequences with at least one real token, ``|y_i|`` = row ``i``'s real tokens, ``L`` = ``max_length``)::

        token-mean            sum_i sum_t l_it / N                  DAPO (Yu et al. 2025); TRL 'bnpo'/'dapo'
        seq-mean-token-sum    (1/S) sum_i (sum_t l_it) / L          Dr. GRPO (Liu et al. 2025); TRL 'dr_grpo'
        seq-mean-token-mean   (1/S) sum_i (sum_t l_it) / |y_i|      GRPO (Shao et al. 2024); TRL 'grpo'

    Token-mean weighs every token the same (long responses weigh more); seq-mean-token-mean weighs every
    sequence the same (a token of a long response weighs less, the length bias Dr. GRPO points out);
    seq-mean-token-sum weighs every token the same with a constant divisor. Rows without real tokens are
    not counted. Over several micro-batches and ranks the same loss is a sum over units weighted by
    :func:`loss_units` (the caller's global normalisation).

    Args:
        per_token: ``(B, T)`` per-token losses (may carry a gradient; padding may hold anything finite or not).
        mask: ``(B, T)`` 0/1.
        aggregation: one of :data:`LOSS_AGGREGATIONS`.
        max_length: ``L`` for ``seq-mean-token-sum`` (the generation's ``max_new_tokens``); unused otherwise.

    Returns:
        0-dim tensor in ``per_token``'s dtype.

    Raises:
        ValueError: an unknown aggregation, a missing ``max_length``, a mask with no real token.
    """
    fn = "aggregate_loss"
    _check_aggregation(fn, aggregation, max_length)
    _require_ndim(fn, "per_token", per_token, 2, "(batch, response_len)")
    if aggregation == "token-mean":
        return masked_mean(per_token, mask)
    _require_same_shape(fn, "per_token", per_token, mask=mask)
    m = _as_bool_mask(fn, mask)
    lengths = m.sum(dim=1)
    has_tokens = lengths > 0
    if not bool(has_tokens.any()):
        raise ValueError(f"{fn}: `mask` has no real entries (shape {tuple(mask.shape)}); the mean is undefined")
    token_sums = torch.where(m, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device)).sum(1)
    divisor = lengths.clamp_min(1).to(per_token.dtype) if aggregation == "seq-mean-token-mean" else float(max_length)
    return (token_sums / divisor)[has_tokens].mean()


def loss_units(mask: torch.Tensor, aggregation: str = "token-mean") -> torch.Tensor:
    """What :func:`aggregate_loss` averages over in ``mask`` ``(B, T)``: its real tokens (``token-mean``) or its
    sequences with at least one real token (the ``seq-mean-*`` modes), as a 0-dim int64 tensor. A micro-batch's
    loss weighted by its units over the units of the whole minibatch on all ranks (``stages.training.loss_weight``)
    gives the minibatch's loss whatever its split."""
    fn = "loss_units"
    _check_aggregation(fn, aggregation, 1.0)
    _require_ndim(fn, "mask", mask, 2, "(batch, response_len)")
    m = _as_bool_mask(fn, mask)
    return m.sum() if aggregation == "token-mean" else (m.sum(dim=1) > 0).sum()


# --------------------------------------------------------------------------------------------
# losses


def importance_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                         level: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """The log of the importance ratio each token's clipped term uses, and the plain per-token log-ratio.

    ``token`` (PPO): ``log r_it = logp_it - old_logp_it``. ``sequence`` (GSPO, Zheng et al. 2025, the
    "GSPO-token" form): ``log s_i = mean_t (logp_it - old_logp_it)`` over row ``i``'s real tokens, and
    ``log r_it = sg(log s_i) + logp_it - sg(logp_it)``: its value is ``log s_i`` on every token of the row, its
    gradient ``grad logp_it``, so ``grad r_it = s_i * grad logp_it`` (``sg``: stop-gradient). With one
    advantage per sequence and ``seq-mean-token-mean`` aggregation the gradient is GSPO's,
    ``s_i * A_i * mean_t grad logp_it``; per-token advantages (GAE) are GSPO-token's.

    Args:
        logp: ``(B, T)`` current log-probs (carry the gradient). old_logp: ``(B, T)`` (constants).
        mask: ``(B, T)`` bool. level: ``token`` or ``sequence``.

    Returns:
        ``(log_ratio, token_log_ratio)``, both ``(B, T)`` in fp32 (fp64 for fp64 inputs), 0 in padding;
        ``token_log_ratio`` is ``logp - old_logp`` at either level (for the KL statistic).
    """
    dtype = _float_dtype(logp, old_logp)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    # Log-ratio forced to 0 in padding: exp of garbage there could be inf and poison the gradient
    # through torch.where's backward (0 * inf = NaN).
    token_log_ratio = torch.where(mask, logp.to(dtype) - old_logp.detach().to(dtype), zero)
    if level == "token":
        return token_log_ratio, token_log_ratio
    if level != "sequence":
        raise ValueError(f"importance_log_ratio: `level` must be 'token' or 'sequence', got {level!r}")
    seq_log_ratio = token_log_ratio.detach().sum(1) / mask.sum(1).clamp_min(1).to(dtype)
    logp_real = torch.where(mask, logp.to(dtype), zero)
    log_ratio = torch.where(mask, seq_log_ratio.unsqueeze(1) + (logp_real - logp_real.detach()), zero)
    return log_ratio, token_log_ratio


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float,
    token_weights: torch.Tensor | None = None, *, cliprange_high: float | None = None,
    clip_ratio_c: float | None = None, importance_level: str = "token", aggregation: str = "token-mean",
    max_length: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (to minimise), aggregated over real tokens (a masked mean by default).

    ``ratio = exp(logp - old_logp)`` (per token; per sequence with ``importance_level='sequence'``, see
    :func:`importance_log_ratio`);
    ``l_t = w_t * max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps_low, 1 + eps_high))``, ``w = 1`` unless given;
    with dual clip (``clip_ratio_c`` = c > 1, Ye et al. 2020) ``l_t = min(l_t, -A_t * c)`` where ``A_t < 0``,
    so a token whose ratio ran far above 1 with a negative advantage adds at most ``-A_t * c``;
    ``loss = aggregate_loss(l, mask, aggregation, max_length)``.

    Args:
        logp: ``(B, T)`` log-probs under the current policy (carries the gradient).
        old_logp: ``(B, T)`` log-probs under the rollout policy (treated as constants).
        advantages: ``(B, T)`` (typically whitened; treated as constants).
        mask: ``(B, T)`` 0/1.
        cliprange: eps_low > 0, and eps_high too unless ``cliprange_high`` is given.
        token_weights: optional ``(B, T)`` per-token weights (constants), e.g.
            :func:`truncated_importance_weights` for a rollout engine's samples: each token's clipped term
            is multiplied by its weight before aggregation (verl's ``rollout_is_weights``, TRL's
            ``importance_sampling_ratio``). The statistics below do not use them.
        cliprange_high: eps_high > 0 (DAPO's clip-higher, Yu et al. 2025); None: ``cliprange``.
        clip_ratio_c: the dual-clip bound c > 1 (None: off).
        importance_level: ``token`` or ``sequence``.
        aggregation, max_length: see :func:`aggregate_loss`.

    Returns:
        ``(loss, stats)``: loss is a 0-dim fp32 tensor (0, with a graph, for a mask without real tokens);
        ``stats``: clip shares, ``approx_kl``, ``ratio_max``, ``ratio_mean`` (:func:`_policy_stats`).
    """
    fn = "clipped_policy_loss"
    _require_ndim(fn, "logp", logp, 2, "(batch, response_len)")
    _require_same_shape(fn, "logp", logp, old_logp=old_logp, advantages=advantages, mask=mask)
    eps_low, eps_high = _clip_bounds(fn, cliprange, cliprange_high, clip_ratio_c)
    _check_aggregation(fn, aggregation, max_length)
    m = _as_bool_mask(fn, mask)

    dtype = _float_dtype(logp, old_logp, advantages)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    log_ratio, token_log_ratio = importance_log_ratio(logp, old_logp, m, importance_level)
    ratio = torch.exp(log_ratio)
    adv = torch.where(m, advantages.detach().to(dtype), zero)
    per_token, clipped, dual_active = _clipped_terms(adv, ratio, eps_low, eps_high, clip_ratio_c)
    if token_weights is not None:
        _require_same_shape(fn, "logp", logp, token_weights=token_weights)
        per_token = per_token * torch.where(m, token_weights.detach().to(dtype), zero)
    if not bool(m.any()):  # e.g. every response of the micro-batch dropped from the loss (ppo.mask_truncated)
        return (per_token * 0.0).sum(), _zero_policy_stats(dtype, logp.device, clip_ratio_c is not None)
    loss = aggregate_loss(per_token, m, aggregation, max_length)

    return loss, _policy_stats(ratio, adv, token_log_ratio, m, clipped, dual_active, eps_low, eps_high)


@torch.no_grad()
def _policy_stats(ratio: torch.Tensor, adv: torch.Tensor, token_log_ratio: torch.Tensor, m: torch.Tensor,
                  clipped: torch.Tensor, dual_active: torch.Tensor | None, eps_low: float, eps_high: float
                  ) -> dict[str, torch.Tensor]:
    """:func:`clipped_policy_loss`'s statistics, detached 0-dim tensors over real tokens (``m``; all inputs
    ``(B, T)``): ``clipfrac`` (share where the clipped term was active) = ``clipfrac_low`` (ratio below
    ``1 - eps_low`` with ``A < 0``) + ``clipfrac_high`` (above ``1 + eps_high`` with ``A > 0``); with dual clip
    ``clipfrac_dual`` (share bounded by ``-A * c``); ``approx_kl`` (``0.5 * mean((logp - old_logp)^2)`` per
    token, the quadratic estimate of KL(old || new), accurate for PPO's small steps); ``ratio_max`` and
    ``ratio_mean`` of the ratio the clip sees (``ratio_max`` lets the trainer skip exploding minibatches)."""
    dtype = ratio.dtype
    stats = {"clipfrac": masked_mean(clipped.to(dtype), m),
             "clipfrac_low": masked_mean(((ratio < 1.0 - eps_low) & (adv < 0)).to(dtype), m),
             "clipfrac_high": masked_mean(((ratio > 1.0 + eps_high) & (adv > 0)).to(dtype), m),
             "approx_kl": 0.5 * masked_mean(token_log_ratio.square(), m),
             "ratio_max": ratio.masked_fill(~m, float("-inf")).max(), "ratio_mean": masked_mean(ratio, m)}
    if dual_active is not None:
        stats["clipfrac_dual"] = masked_mean(dual_active.to(dtype), m)
    return stats


def _clip_bounds(fn: str, cliprange: float, cliprange_high: float | None, clip_ratio_c: float | None
                 ) -> tuple[float, float]:
    """(eps_low, eps_high), checked; ``clip_ratio_c`` must be > 1 when given."""
    eps_low = float(cliprange)
    eps_high = eps_low if cliprange_high is None else float(cliprange_high)
    if not (eps_low > 0 and eps_high > 0):
        raise ValueError(f"{fn}: `cliprange` and `cliprange_high` must be > 0, got {eps_low} and {eps_high}")
    if clip_ratio_c is not None and not float(clip_ratio_c) > 1:
        raise ValueError(f"{fn}: `clip_ratio_c` must be > 1 (the dual-clip bound on the ratio), got {clip_ratio_c}")
    return eps_low, eps_high


def _clipped_terms(adv: torch.Tensor, ratio: torch.Tensor, eps_low: float, eps_high: float,
                   clip_ratio_c: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per token (all ``(B, T)``): the clipped surrogate ``max(-A r, -A clip(r))``, bounded by ``-A c`` where
    ``A < 0`` with dual clip; whether the clipped term was active; where the dual bound was (None without it)."""
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(pg_unclipped, pg_clipped)
    dual_active = None
    if clip_ratio_c is not None:
        dual_bound = -adv * float(clip_ratio_c)
        dual_active = (adv < 0) & (per_token > dual_bound)
        per_token = torch.where(adv < 0, torch.minimum(per_token, dual_bound), per_token)
    return per_token, pg_clipped > pg_unclipped, dual_active


def _zero_policy_stats(dtype: torch.dtype, device: torch.device, dual: bool) -> dict[str, torch.Tensor]:
    names = ["clipfrac", "clipfrac_low", "clipfrac_high", "approx_kl", "ratio_max", "ratio_mean"]
    return {name: torch.zeros((), dtype=dtype, device=device) for name in names + ["clipfrac_dual"] * dual}


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
