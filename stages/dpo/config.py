"""The ``dpo`` stage's declaration: its settings (``dpo:``) and its ``SPEC`` (pipeline/registry.py).

Light on purpose (no torch): the control plane reads it. The stage itself is ``stages/dpo/trainer.py``.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import DPOConfig
from pipeline.registry import DATA_FIELDS, StageSpec, lazy


def parents(cfg: Any) -> list[str]:
    """The sft stage's model it starts from (``init_from: sft``); rlaif_label's pairs when it is in the run."""
    return (["sft"] if cfg.dpo.init_from == "sft" else []) + (["rlaif_label"] if "rlaif_label" in cfg.stages else [])


def data_fields(cfg: Any) -> tuple[str, ...]:
    """With ``rlaif_label`` in the run its labelled file (a parent's hash) replaces ``dpo.data``."""
    return ("eval_data",) if "rlaif_label" in cfg.stages else DATA_FIELDS


SPEC = StageSpec(
    name="dpo", order=70, title="DPO", config_model=DPOConfig, run=lazy("stages.dpo.trainer:run"), parents=parents,
    data_fields=data_fields, headline=("eval_accuracy", "eval_margin"), evaluated_policy=True,
    card=("direct preference optimisation (DPO family) against the starting policy", ("dpo",)),
)
