"""Curves from a stage's ``metrics.jsonl`` as PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def read_metrics(stage_dir: Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl`` (unparseable lines, e.g. a line cut by a crash, are skipped)."""
    path = Path(stage_dir) / "metrics.jsonl"
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def number(value: Any) -> float | None:
    """``value`` as a finite float; None for anything else (booleans, strings, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that carry a finite number under ``key`` (row index if no step)."""
    xs: list[float] = []
    ys: list[float] = []
    for i, row in enumerate(rows):
        y = number(row.get(key))
        if y is None:
            continue
        x = number(row.get("step"))
        xs.append(x if x is not None else float(i))
        ys.append(y)
    return xs, ys


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: Path, title: str, curves: dict[str, tuple[list[float], list[float]]],
                ylabel: str = "", xlabel: str = "step") -> Path | None:
    """One axes with a line per non-empty curve; None (no file) when every curve is empty."""
    curves = {label: xy for label, xy in curves.items() if xy[0]}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    try:
        for label, (xs, ys) in curves.items():
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend()
        fig.tight_layout()
        return _save_png(fig, path)
    finally:
        plt.close(fig)


def _save_png(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_grid(path: Path, title: str, panels: dict[str, tuple[list[float], list[float]]]) -> Path | None:
    """Small multiples: one axes per non-empty panel, three per row."""
    panels = {k: v for k, v in panels.items() if v[0]}
    if not panels:
        return None
    plt = _pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), dpi=100, squeeze=False)
    try:
        flat = [ax for row in axes for ax in row]
        for ax, (name, (xs, ys)) in zip(flat, panels.items()):
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in flat[len(panels):]:
            ax.axis("off")
        fig.suptitle(title)
        fig.tight_layout()
        return _save_png(fig, path)
    finally:
        plt.close(fig)
