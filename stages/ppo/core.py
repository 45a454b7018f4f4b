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
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = [
    "compute_gae",
    "discounted_returns",
    "grpo_advantages",
    "rloo_advantages",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "per_token_rewards",
    "clipped_policy_loss",
    "clipped_value_loss",
    "truncated_importance_weights",
    "entropy_from_logits",
    "logprobs_from_logits",
    "explained_variance",
    "FixedKLController",
    "AdaptiveKLController",
    "RunningMoments",
]


# --------------------------------------------------------------------------------------------
# validation helpers


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 unless some input is fp64 (tests and numerics checks keep fp64 precision)."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _require_tensor(fn: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    return x


def _require_ndim(fn: str, name: str, x: torch.Tensor, ndim: int, layout: str) -> None:
    _require_tensor(fn, name, x)
    if x.dim() != ndim:
        raise ValueError(f"{fn}: `{name}` must be {ndim}-D {layout}, got shape {_shape(x)}")


def _require_same_shape(fn: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        _require_tensor(fn, name, t)
        if t.shape != ref.shape:
            raise ValueError(
                f"{fn}: `{name}` must have the same shape as `{ref_name}`; "
                f"got {ref_name} {_shape(ref)} and {name} {_shape(t)}"
            )


def _as_bool_mask(fn: str, mask: torch.Tensor) -> torch.Tensor:
    """Return mask as bool after checking it only holds 0/1 (a float mask of weights is a bug here)."""
    _require_tensor(fn, "mask", mask)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise ValueError(f"{fn}: `mask` has unsupported dtype {mask.dtype}; use bool or an integer/float 0/1 tensor")
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        raise ValueError(
            f"{fn}: `mask` must contain only 0 and 1 (1 = real response token); "
            f"found other values, e.g. {mask[bad].flatten()[:3].tolist()}"
        )
    return mask != 0


def _require_prefix_mask(fn: str, mask: torch.Tensor) -> None:
    """Each row must be 1...1 0...0 (mask is bool, (B, T))."""
    if mask.size(1) > 1:
        # A 0 followed by a 1 anywhere in a row means a hole or left padding.
        holes = (~mask[:, :-1]) & mask[:, 1:]
        if bool(holes.any()):
            rows = holes.any(dim=1).nonzero().flatten()[:5].tolist()
            raise ValueError(
                f"{fn}: each row of `mask` must be 1s followed by 0s (response tokens are right-padded, "
                f"tokens after eos masked); rows {rows} have a 0 before a 1. Left-padded or gappy masks "
                f"must be converted before calling this function."
            )


def _check_unit_interval(fn: str, name: str, value: float) -> float:
    value = float(value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{fn}: `{name}` must be in [0, 1], got {value}")
    return value


# --------------------------------------------------------------------------------------------
# masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1.

    Args:
        x: any shape ``S``.
        mask: shape ``S``, 0/1.
        dim: reduce over this dim only; ``None`` reduces over everything.

    Returns:
        0-dim tensor if ``dim`` is None, otherwise ``x`` with ``dim`` removed. Slices with no real
        entries (only possible with ``dim``) give 0, so a fully padded row does not turn a whole
        statistic into NaN.

    Masked-out entries are excluded with ``torch.where`` rather than multiplied by 0, so NaN/inf
    in padding (e.g. -inf log-probs of padding tokens) cannot leak into the result.

    Raises:
        ValueError: shapes differ, or ``dim`` is None and the mask has no real entries.
    """
    fn = "masked_mean"
    _require_tensor(fn, "x", x)
    _require_same_shape(fn, "x", x, mask=mask)
    m = _as_bool_mask(fn, mask)
    xz = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        n = m.sum()
        if int(n) == 0:
            raise ValueError(f"{fn}: `mask` has no real entries (shape {_shape(mask)}); the mean is undefined")
        return xz.sum() / n
    n = m.sum(dim=dim)
    return xz.sum(dim=dim) / n.clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over entries where ``mask`` is 1 (all dims reduced).

    Args:
        x: any shape ``S``.
        mask: shape ``S``, 0/1.
        unbiased: apply Bessel's correction n / (n - 1) (needs at least 2 real entries).

    Returns:
        0-dim tensor.

    Raises:
        ValueError: shapes differ, the mask is empty, or ``unbiased`` with fewer than 2 real entries.
    """
    fn = "masked_var"
    mean = masked_mean(x, mask)
    m = _as_bool_mask(fn, mask)
    centered = torch.where(m, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    var = masked_mean(centered.square(), mask)
    if unbiased:
        n = int(m.sum())
        if n < 2:
            raise ValueError(
                f"{fn}: unbiased variance needs at least 2 real entries, `mask` has {n}; "
                f"pass unbiased=False or a larger batch"
            )
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` to mean 0 / variance 1 over the real entries; 0 where ``mask`` is 0.

    Args:
        x: any shape ``S`` (typically advantages ``(B, T)``).
        mask: shape ``S``, 0/1.
        shift_mean: if False, the mean is added back (only the scale is normalised), which is how
            rewards are sometimes whitened without changing their sign.

    Returns:
        Tensor of shape ``S``, dtype of ``x``. Uses the unbiased variance and ``rsqrt(var + 1e-8)``
        so a constant batch gives zeros instead of NaN.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    m = _as_bool_mask("masked_whiten", mask)
    return torch.where(m, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


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


def grpo_advantages(scores: torch.Tensor, mask: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath): the group-normalised score, the same on every token.

    Rows come in groups of ``K = group_size`` consecutive samples of one prompt. For sample ``i`` of group
    ``g``::

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)        std unbiased (Bessel, divides by K - 1)

    A group whose rewards are all equal gives 0 (no signal, no NaN).

    Args:
        scores: ``(B,)`` sequence rewards, ``B = G * K``.
        mask: ``(B, T)`` 0/1 response mask; the advantage is put on every real token.
        group_size: ``K >= 2``.
        eps: added to the std (keeps a near-constant group finite).

    Returns:
        ``(B, T)`` fp32 (fp64 if scores are fp64), detached, 0 where ``mask`` is 0.
    """
    grouped, m = _grouped("grpo_advantages", scores, mask, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    scale = grouped.std(dim=1, unbiased=True, keepdim=True) + float(eps)
    # an equal group is exactly 0 whatever eps (0 / 0 with eps = 0)
    adv = torch.where(centred == 0, torch.zeros_like(centred), centred / scale).reshape(-1)
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


# --------------------------------------------------------------------------------------------
# KL


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k1 KL estimate ``logp - ref_logp`` (unbiased for KL(pi || ref), can be negative).

    Args:
        logp: ``(B, T)`` log-probs of the sampled tokens under the policy.
        ref_logp: ``(B, T)`` log-probs of the same tokens under the reference.

    Returns:
        ``(B, T)`` in fp32 (fp64 if an input is fp64).
    """
    fn = "kl_k1"
    _require_tensor(fn, "logp", logp)
    _require_same_shape(fn, "logp", logp, ref_logp=ref_logp)
    dtype = _float_dtype(logp, ref_logp)
    return logp.to(dtype) - ref_logp.to(dtype)


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k2 KL estimate ``0.5 * (logp - ref_logp)^2`` (always >= 0, biased for KL(pi || ref)).

    The estimator for a KL *loss* term: with tokens sampled from pi, the expected gradient of k2 is
    the gradient of KL(pi || ref), whereas k1's gradient, ``grad logp``, has expectation 0 whatever
    the reference is (DESIGN §4). Shapes as in :func:`kl_k1`.
    """
    fn = "kl_k2"
    _require_tensor(fn, "logp", logp)
    _require_same_shape(fn, "logp", logp, ref_logp=ref_logp)
    dtype = _float_dtype(logp, ref_logp)
    return 0.5 * (logp.to(dtype) - ref_logp.to(dtype)).square()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 KL estimate ``exp(ref - logp) - (ref - logp) - 1`` (Schulman's k3; always >= 0).

    Unbiased for KL(pi || ref) when tokens are sampled from pi, with lower variance than k1.
    Computed as ``expm1(d) - d`` so that it is accurate near 0 and never rounds below 0.

    Args:
        logp: ``(B, T)`` policy log-probs of the sampled tokens.
        ref_logp: ``(B, T)`` reference log-probs of the same tokens.

    Returns:
        ``(B, T)`` in fp32 (fp64 if an input is fp64).
    """
    fn = "kl_k3"
    _require_tensor(fn, "logp", logp)
    _require_same_shape(fn, "logp", logp, ref_logp=ref_logp)
    dtype = _float_dtype(logp, ref_logp)
    log_ratio = ref_logp.to(dtype) - logp.to(dtype)
    return torch.expm1(log_ratio) - log_ratio


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: Literal["k1", "k2", "k3"] = "k1"
) -> torch.Tensor:
    """Per-token KL estimate with the chosen estimator (``"k1"`` default, DESIGN §4).

    In the reward, k1 (unbiased) or k3; as a loss term, k2 or k3 (never k1: see :func:`kl_k2`).
    Shapes as in :func:`kl_k1`.
    """
    if estimator == "k1":
        return kl_k1(logp, ref_logp)
    if estimator == "k2":
        return kl_k2(logp, ref_logp)
    if estimator == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"kl_penalty: `estimator` must be 'k1', 'k2' or 'k3', got {estimator!r}")


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * kl`` on every real token, plus the score at the last one.

    Args:
        scores: ``(B,)`` sequence scores (RM score, normalised/clipped, plus penalties).
        kl: ``(B, T)`` per-token KL estimates (:func:`kl_penalty`).
        mask: ``(B, T)`` 0/1, each row 1s then 0s.
        kl_coef: beta >= 0 (float or 0-dim tensor, e.g. a KL controller's value).

    Returns:
        ``(B, T)`` rewards in fp32 (fp64 if an input is fp64); 0 where ``mask`` is 0. The score lands
        at index ``mask.sum(1) - 1``, the last real token (the eos when there is one), which is where
        the RM reads its score (DESIGN §3).

    Raises:
        ValueError: wrong shapes, a negative ``kl_coef``, or a row with no real tokens (it has no
        token to carry its score; the rollout must keep at least one token, e.g. the eos).
    """
    fn = "per_token_rewards"
    _require_ndim(fn, "kl", kl, 2, "(batch, response_len)")
    _require_same_shape(fn, "kl", kl, mask=mask)
    _require_tensor(fn, "scores", scores)
    if scores.dim() != 1 or scores.size(0) != kl.size(0):
        raise ValueError(
            f"{fn}: `scores` must be 1-D (batch,) matching kl's batch size {kl.size(0)}; "
            f"got scores {_shape(scores)} and kl {_shape(kl)}"
        )
    coef = float(kl_coef)
    if not math.isfinite(coef) or coef < 0:
        raise ValueError(f"{fn}: `kl_coef` must be a finite number >= 0, got {coef}")
    m = _as_bool_mask(fn, mask)
    _require_prefix_mask(fn, m)
    lengths = m.sum(dim=1)
    empty = (lengths == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(
            f"{fn}: rows {empty[:5].tolist()} of `mask` have no real tokens, so there is no token to "
            f"carry the sequence score; keep at least the eos (or one token) unmasked per response"
        )

    dtype = _float_dtype(scores, kl)
    zero = torch.zeros((), dtype=dtype, device=kl.device)
    rewards = torch.where(m, -coef * kl.to(dtype), zero)
    last = (lengths - 1).unsqueeze(1)
    rewards = rewards.scatter_add(1, last, scores.to(dtype).unsqueeze(1))
    return rewards


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
        clipfrac = masked_mean((pg_clipped > pg_unclipped).to(dtype), m)
        approx_kl = 0.5 * masked_mean(log_ratio.square(), m)
        ratio_max = ratio.masked_fill(~m, float("-inf")).max()
        ratio_mean = masked_mean(ratio, m)
    stats = {
        "clipfrac": clipfrac.detach(),
        "approx_kl": approx_kl.detach(),
        "ratio_max": ratio_max.detach(),
        "ratio_mean": ratio_mean.detach(),
    }
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


# --------------------------------------------------------------------------------------------
# logits -> per-token quantities


def _check_logits(fn: str, logits: torch.Tensor, other: torch.Tensor, other_name: str) -> None:
    _require_ndim(fn, "logits", logits, 3, "(batch, response_len, vocab)")
    _require_tensor(fn, other_name, other)
    if other.shape != logits.shape[:2]:
        raise ValueError(
            f"{fn}: `{other_name}` must be (batch, response_len) = {_shape(logits)[:2]} to match "
            f"logits {_shape(logits)}; got {other_name} {_shape(other)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"{fn}: `logits` must be a floating tensor, got {logits.dtype}")


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of ``labels`` under ``softmax(logits)``, in fp32.

    ``logp[b, t] = logits[b, t, labels[b, t]] - logsumexp(logits[b, t, :])``

    Args:
        logits: ``(B, T, V)``, any float dtype (bf16 on GPU). Must already be aligned with labels
            (i.e. the logits that *predict* each label, shifted by the caller).
        labels: ``(B, T)`` integer token ids in ``[0, V)``. Padding must hold a valid id (e.g.
            pad_token_id), not -100; mask the result instead.

    Returns:
        ``(B, T)`` fp32 (fp64 if logits are fp64), differentiable w.r.t. ``logits``.

    Memory: rows are processed one at a time, so the fp32 upcast and the softmax intermediates
    cost one ``(T, V)`` slice at a time instead of a full fp32 copy of a ``(B, T, V)`` tensor.
    """
    fn = "logprobs_from_logits"
    _check_logits(fn, logits, labels, "labels")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{fn}: `labels` must be an integer tensor of token ids, got {labels.dtype}")
    vocab = logits.size(-1)
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"{fn}: `labels` must be token ids in [0, {vocab}); got values in [{lo}, {hi}]. "
                f"Replace ignore-index padding (-100) with a real id such as pad_token_id and mask it."
            )
    dtype = _float_dtype(logits)
    labels = labels.long()
    rows = []
    for i in range(logits.size(0)):
        row = logits[i].to(dtype)  # (T, V); no copy when already fp32
        picked = row.gather(-1, labels[i].unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row, dim=-1))
    if not rows:
        return torch.zeros(labels.shape, dtype=dtype, device=logits.device)
    return torch.stack(rows, dim=0)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of the per-token entropy of ``softmax(logits)``.

    ``H[b, t] = logsumexp(z) - sum_v softmax(z)_v * z_v`` with ``z = logits[b, t]``.

    Args:
        logits: ``(B, T, V)``, any float dtype.
        mask: ``(B, T)`` 0/1.

    Returns:
        0-dim fp32 tensor (fp64 for fp64 logits), differentiable (usable as an entropy bonus).
        Rows are processed one at a time, for the same memory reason as :func:`logprobs_from_logits`.
    """
    fn = "entropy_from_logits"
    _check_logits(fn, logits, mask, "mask")
    dtype = _float_dtype(logits)
    rows = []
    for i in range(logits.size(0)):
        z = logits[i].to(dtype)
        p = torch.softmax(z, dim=-1)
        rows.append(torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1))
    if not rows:
        raise ValueError(f"{fn}: empty batch, logits shape {_shape(logits)}")
    return masked_mean(torch.stack(rows, dim=0), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var[returns - values] / Var[returns]`` over real tokens (critic quality diagnostic).

    1 is a perfect critic, 0 is no better than predicting the mean, negative is worse.

    Args:
        values: ``(B, T)`` critic values.
        returns: ``(B, T)`` GAE returns.
        mask: ``(B, T)`` 0/1.

    Returns:
        Detached 0-dim fp32 tensor; NaN when the returns have zero variance (the ratio is undefined).
    """
    fn = "explained_variance"
    _require_tensor(fn, "values", values)
    _require_same_shape(fn, "values", values, returns=returns, mask=mask)
    dtype = _float_dtype(values, returns)
    with torch.no_grad():
        v = values.detach().to(dtype)
        r = returns.detach().to(dtype)
        var_r = masked_var(r, mask, unbiased=False)
        var_res = masked_var(r - v, mask, unbiased=False)
        if float(var_r) == 0.0:
            return torch.tensor(float("nan"), dtype=dtype, device=values.device)
        return 1.0 - var_res / var_r


# --------------------------------------------------------------------------------------------
# KL controllers and reward normalisation (stateful; checkpointed with the run)


class FixedKLController:
    """Constant KL coefficient beta. ``update`` is a no-op so trainers treat both controllers alike."""

    kind = "fixed"

    def __init__(self, coef: float):
        coef = float(coef)
        if not math.isfinite(coef) or coef < 0:
            raise ValueError(f"FixedKLController: `coef` must be a finite number >= 0, got {coef}")
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        _check_controller_state(self.kind, state)
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences").

    After each rollout of ``n_steps`` episodes with mean KL ``current_kl``::

        err   = clip(current_kl / target - 1, -0.2, 0.2)
        beta *= 1 + err * n_steps / horizon

    so beta rises when the policy drifts further than ``target`` from the reference and falls when
    it stays closer, at a rate bounded by the clip.
    """

    kind = "adaptive"

    def __init__(self, init_coef: float, target: float, horizon: int):
        init_coef, target, horizon = float(init_coef), float(target), float(horizon)
        if not math.isfinite(init_coef) or init_coef < 0:
            raise ValueError(f"AdaptiveKLController: `init_coef` must be a finite number >= 0, got {init_coef}")
        if not math.isfinite(target) or target <= 0:
            raise ValueError(f"AdaptiveKLController: `target` must be > 0, got {target}")
        if not math.isfinite(horizon) or horizon <= 0:
            raise ValueError(f"AdaptiveKLController: `horizon` must be > 0, got {horizon}")
        self.value = init_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adjust beta from the latest mean KL (per sequence) and return the new value."""
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"AdaptiveKLController.update: `current_kl` must be finite, got {current_kl}")
        if n_steps <= 0:
            raise ValueError(f"AdaptiveKLController.update: `n_steps` must be > 0, got {n_steps}")
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        """Restore beta. ``target``/``horizon`` stay as constructed: they come from the run config,
        which the orchestrator already compares on resume; the saved copies are for inspection."""
        _check_controller_state(self.kind, state)
        self.value = float(state["value"])


def _check_controller_state(kind: str, state: dict) -> None:
    if not isinstance(state, dict) or "value" not in state:
        raise ValueError(f"KL controller state must be a dict with 'value', got {state!r}")
    saved = state.get("kind", kind)
    if saved != kind:
        raise ValueError(
            f"KL controller checkpoint is '{saved}' but this run uses '{kind}'; "
            f"resume with the same ppo.adaptive_kl setting the checkpoint was made with"
        )


class RunningMoments:
    """Running mean and standard deviation of every value seen (for reward normalisation).

    Batches are merged with Chan et al.'s parallel update, exact for any batch sizes, in Python
    floats (fp64) so that the statistics do not drift over long runs. In multi-process training,
    gather the scores across ranks before ``update`` so every rank holds identical statistics.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 0.0  # population variance (M2 / count)
        self.count = 0

    @property
    def std(self) -> float:
        """Unbiased sample standard deviation (0 until 2 values have been seen)."""
        if self.count < 2:
            return 0.0
        return math.sqrt(self.var * self.count / (self.count - 1))

    def update(self, x: torch.Tensor) -> tuple[float, float]:
        """Fold the values of ``x`` (any shape, flattened) into the running moments.

        Returns:
            ``(batch_mean, batch_std)`` of ``x`` itself (std unbiased; 0 for a single value), for logging.
        """
        _require_tensor("RunningMoments.update", "x", x)
        flat = x.detach().reshape(-1).to(torch.float64)
        n = flat.numel()
        if n == 0:
            raise ValueError("RunningMoments.update: `x` is empty")
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("RunningMoments.update: `x` contains NaN or inf; refusing to corrupt the running stats")
        b_mean = float(flat.mean())
        b_var = float(flat.var(unbiased=False))
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total
        b_std = math.sqrt(b_var * n / (n - 1)) if n > 1 else 0.0
        return b_mean, b_std

    def normalize(self, x: torch.Tensor, clip: float | None = None) -> torch.Tensor:
        """``(x - mean) / std``, optionally clipped to ``[-clip, clip]``; same shape and dtype as x.

        Until two values have been seen the spread is unknown, so only the mean is subtracted.
        """
        _require_tensor("RunningMoments.normalize", "x", x)
        if self.count == 0:
            raise ValueError("RunningMoments.normalize: no values seen yet; call update() first")
        scale = max(self.std, 1e-8) if self.count >= 2 else 1.0
        out = (x - self.mean) / scale
        if clip is not None:
            clip = float(clip)
            if not clip > 0:
                raise ValueError(f"RunningMoments.normalize: `clip` must be > 0, got {clip}")
            out = out.clamp(-clip, clip)
        return out

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        missing = {"mean", "var", "count"} - set(state)
        if missing:
            raise ValueError(f"RunningMoments.load_state_dict: state is missing {sorted(missing)}")
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = int(state["count"])
