"""Argument checks shared by the PPO math: tensor kinds, shapes, 0/1 masks, unit intervals."""

from __future__ import annotations

import torch

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
