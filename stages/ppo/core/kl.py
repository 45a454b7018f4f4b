"""KL estimators (k1/k2/k3), the KL penalty, per-token rewards and the KL coefficient controllers."""

from __future__ import annotations

import math
from typing import Literal

import torch

from stages.ppo.core.checks import (
    _as_bool_mask,
    _float_dtype,
    _require_ndim,
    _require_prefix_mask,
    _require_same_shape,
    _require_tensor,
    _shape,
)

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
# KL controllers (stateful; checkpointed with the run)


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
