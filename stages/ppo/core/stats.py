"""Masked statistics over real tokens, explained variance and running moments for reward normalisation."""

from __future__ import annotations

import math

import torch

from stages.ppo.core.checks import (
    _as_bool_mask,
    _float_dtype,
    _require_same_shape,
    _require_tensor,
    _shape,
)

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
