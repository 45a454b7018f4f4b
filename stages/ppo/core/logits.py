"""Per-token quantities from logits: log-probabilities of labels and entropy."""

from __future__ import annotations

import torch

from stages.ppo.core.checks import (
    _float_dtype,
    _require_ndim,
    _require_tensor,
    _shape,
)
from stages.ppo.core.stats import masked_mean

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
