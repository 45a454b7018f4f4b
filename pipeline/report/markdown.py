"""Markdown pieces of the report: table cells and tables, prompts as text."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def md_cell(value: Any, limit: int = 400) -> str:
    """A value as one Markdown table cell (pipes escaped, newlines as <br>, long text cut)."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, default=str)
    else:
        text = "" if value is None else str(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return lines


def metrics_table(metrics: dict[str, Any], skip: Sequence[str] = ()) -> list[str]:
    rows = [(k, v) for k, v in metrics.items() if k not in skip and not isinstance(v, (dict, list))]
    return md_table(["metric", "value"], rows) if rows else []


def prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return "" if prompt is None else str(prompt)
