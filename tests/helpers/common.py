"""Helpers the test files share: a stage's JSON-lines logs and saved weights, a minimal run config.

Imported as ``tests.helpers.common`` (the repository root is on pytest's ``pythonpath``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch


def read_jsonl(path: Path, missing_ok: bool = False) -> list[dict]:
    """Every row of a JSON-lines file; ``[]`` for a file that does not exist when ``missing_ok``."""
    if missing_ok and not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def metrics_rows(stage_dir: Path) -> list[dict]:
    """Every row of a stage's ``metrics.jsonl`` (training steps and evaluations alike)."""
    return read_jsonl(stage_dir / "metrics.jsonl")


def train_rows(stage_dir: Path, key: str) -> list[dict]:
    """The rows of a stage's ``metrics.jsonl`` that hold ``key`` (the training steps: ``score`` for PPO,
    ``loss`` for the preference stages)."""
    return [row for row in metrics_rows(stage_dir) if key in row]


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def write_config(tmp_path: Path, extra: str = "", run_name: str = "r") -> Path:
    """A run config ``<tmp_path>/<run_name>.yaml`` on the tiny model and the demo prompts, outputs under
    ``<tmp_path>/out``; ``extra`` is appended YAML."""
    path = tmp_path / f"{run_name}.yaml"
    path.write_text(
        f"run_name: {run_name}\n"
        f"output_root: {tmp_path / 'out'}\n"
        "model: {source: tiny}\n"
        "ppo:\n  data: {path: data/demo/prompts.jsonl}\n" + extra
    )
    return path


MARKER_WORDS = ["apple", "river", "garden", "window", "planet", "silver", "pencil", "rocket", "forest", "candle",
                "bridge", "letter", "castle", "dragon", "mirror", "orange", "pepper", "summer", "winter", "yellow"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """``rows`` as a JSON-lines file at ``path``; returns ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def marker_preferences(n: int, seed: int = 0) -> list[dict]:
    """The preference stages' learnable toy task: chosen ends with the marker word 'thanks'; rejected is a
    different sentence without it."""
    rng = random.Random(seed)
    return [{"prompt": f"Tell me about the {rng.choice(MARKER_WORDS)}.",
             "chosen": " ".join(rng.sample(MARKER_WORDS, 3)) + " thanks",
             "rejected": " ".join(rng.sample(MARKER_WORDS, 3))}
            for _ in range(n)]
