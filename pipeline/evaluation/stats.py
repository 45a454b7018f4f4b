"""The report's statistics, pure Python: win rates with Wilson's interval, paired comparisons of a policy with
its parent over the same prompts, and means with a normal 95% interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Z95 = 1.959964  # two-sided 95% normal quantile


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """Fraction of pairs where ``a`` beats ``b`` (ties count half)."""
    if not a:
        return float("nan")
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


def wilson_interval(rate: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``rate`` observed on ``n`` trials.

    Used for win rates with ties counted half: a tie has less variance than a coin flip, so treating the
    rate as a plain proportion over ``n`` prompts gives an interval that is, if anything, too wide (never
    a win claimed too easily), and it stays inside [0, 1] for small ``n`` and rates near 0 or 1.
    """
    if n <= 0:
        return float("nan"), float("nan")
    denom = 1.0 + z * z / n
    centre = (rate + z * z / (2 * n)) / denom
    half = z * math.sqrt(rate * (1.0 - rate) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def verdict_of(low: float, high: float) -> str:
    """'policy better' / 'parent better' when the 95% interval of the win rate excludes 0.5."""
    if low > 0.5:
        return "policy better"
    if high < 0.5:
        return "parent better"
    return "no measurable difference"


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` (N,) with a normal 95% interval, mean ± Z95 x sd / sqrt(N)
    (sample sd; a zero-width interval for N = 1)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = sum(map(float, values)) / n
    sd = math.sqrt(sum((float(v) - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = Z95 * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_difference(policy: Sequence[float], parent: Sequence[float]) -> dict[str, Any]:
    """The mean of per-prompt differences ``policy - parent`` with its normal 95% interval (paired).

    Args:
        policy, parent: (N,) values of the same N prompts.
    Returns:
        ``{n, mean_parent, mean_policy, diff, diff_ci_low, diff_ci_high}``.
    """
    n = len(policy)
    if n == 0 or n != len(parent):
        raise ValueError(f"paired_difference needs two equally long, non-empty lists ({n}, {len(parent)})")
    diff, low, high = mean_interval([float(a) - float(b) for a, b in zip(policy, parent)])
    return {"n": n, "mean_parent": sum(map(float, parent)) / n, "mean_policy": sum(map(float, policy)) / n,
            "diff": diff, "diff_ci_low": low, "diff_ci_high": high}


def paired_difference_known(policy: Sequence[float | None], parent: Sequence[float | None]) -> dict[str, Any] | None:
    """:func:`paired_difference` over the prompts where both values are known (not None); None when none is."""
    pairs = [(a, b) for a, b in zip(policy, parent) if a is not None and b is not None]
    return paired_difference([a for a, _ in pairs], [b for _, b in pairs]) if pairs else None


def paired_comparison(policy: Sequence[str | float], parent: Sequence[str | float]) -> dict[str, Any]:
    """Per-prompt comparison of a policy against its parent, with a 95% interval.

    Args:
        policy, parent: (N,) scores of the same N prompts (higher is better).
    Returns:
        ``{n, wins, losses, ties, win_rate (ties count half), ci_low, ci_high (Wilson), verdict,
        mean_policy, mean_parent, mean_diff, diff_ci_low, diff_ci_high}``: the mean score difference with
        a normal 95% interval over prompts (paired, :func:`paired_difference`).
    """
    n = len(policy)
    if n == 0 or n != len(parent):
        raise ValueError(f"paired_comparison needs two equally long, non-empty score lists ({n}, {len(parent)})")
    wins = sum(float(a) > float(b) for a, b in zip(policy, parent))
    losses = sum(float(a) < float(b) for a, b in zip(policy, parent))
    rate = (wins + 0.5 * (n - wins - losses)) / n
    low, high = wilson_interval(rate, n)
    diff = paired_difference([float(v) for v in policy], [float(v) for v in parent])
    return {"n": n, "wins": wins, "losses": losses, "ties": n - wins - losses, "win_rate": rate,
            "ci_low": low, "ci_high": high, "verdict": verdict_of(low, high),
            "mean_policy": diff["mean_policy"], "mean_parent": diff["mean_parent"], "mean_diff": diff["diff"],
            "diff_ci_low": diff["diff_ci_low"], "diff_ci_high": diff["diff_ci_high"]}


def outcome_comparison(outcomes: Sequence[str]) -> dict[str, Any]:
    """``paired_comparison`` from verdicts "policy" / "parent" / "tie" (a judge's), as 1 / 0 / 0.5 scores."""
    value = {"policy": 1.0, "parent": 0.0, "tie": 0.5}
    return paired_comparison([value[o] for o in outcomes], [0.5] * len(outcomes))


def mean_known(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    known = [float(v) for v in values if v is not None]
    return sum(known) / len(known) if known else None
