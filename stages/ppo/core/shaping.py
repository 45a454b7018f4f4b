"""Sequence-reward shaping by response length: DAPO's soft overlong punishment."""

from __future__ import annotations

import torch

from stages.ppo.core.checks import _require_tensor, _shape


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): a penalty growing linearly over the last
    ``buffer`` tokens before the length limit, to be added to the sequence reward::

        R_length(L) =  0                                   L <= L_max - B
                    = -factor * (L - (L_max - B)) / B      L_max - B < L <= L_max
                    = -factor                              L > L_max

    (DAPO writes ``factor = 1``; verl's ``overlong_buffer.penalty_factor``.) A rollout never exceeds
    ``L_max = max_new_tokens``, so in practice a response cut at the limit gets ``-factor``.

    Args:
        lengths: ``(B,)`` response lengths ``L`` in tokens (real tokens, eos included), any integer or float dtype.
        max_length: ``L_max`` > 0 (the generation's ``max_new_tokens``).
        buffer: ``B``, 0 < B <= L_max.
        factor: the largest penalty, >= 0.

    Returns:
        ``(B,)`` fp32 penalties in ``[-factor, 0]`` (0 is no penalty).
    """
    fn = "overlong_penalty"
    _require_tensor(fn, "lengths", lengths)
    if lengths.dim() != 1:
        raise ValueError(f"{fn}: `lengths` must be 1-D (batch,), got shape {_shape(lengths)}")
    max_length, buffer, factor = int(max_length), int(buffer), float(factor)
    if not 0 < buffer <= max_length:
        raise ValueError(f"{fn}: `buffer` must be in (0, max_length={max_length}], got {buffer}")
    if not factor >= 0:
        raise ValueError(f"{fn}: `factor` must be >= 0, got {factor}")
    excess = lengths.to(torch.float32) - float(max_length - buffer)
    return -factor * (excess / buffer).clamp(0.0, 1.0)
