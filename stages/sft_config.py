"""The ``sft`` stage's declaration: its settings (``sft:``) and its ``SPEC`` (pipeline/registry.py).

Light on purpose (no torch): the control plane reads it. The stage itself is ``stages/sft.py``.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import SFTConfig
from pipeline.registry import DATA_FIELDS, StageSpec, lazy


def parents(cfg: Any) -> list[str]:
    """With ``distill`` in the run, sft trains on the teacher's answers."""
    return ["distill"] if "distill" in cfg.stages else []


def data_fields(cfg: Any) -> tuple[str, ...]:
    """With ``distill`` in the run its ``data.jsonl`` (a parent's hash) replaces ``sft.data``."""
    return ("eval_data",) if "distill" in cfg.stages else DATA_FIELDS


def identity_extra(cfg: Any, data: dict[str, Any]) -> dict[str, Any]:
    """With token-level distillation the stage trains on the teacher's logits: the teacher is part of it."""
    if not cfg.distill.token_level.enabled:
        return {}
    return {"distill_token_level": {"teacher": data["distill"]["teacher"],
                                    "token_level": data["distill"]["token_level"]}}


SPEC = StageSpec(
    name="sft", order=20, title="SFT", config_model=SFTConfig, run=lazy("stages.sft:run"), parents=parents,
    reads=("distill",), identity_extra=identity_extra, data_fields=data_fields, headline=("eval_loss", "loss"),
    card=("supervised fine-tuning (SFT) on conversations, loss on the assistant tokens", ("sft",)),
)
