"""The ``rm`` stage's declaration: its settings (``rm:``) and its ``SPEC`` (pipeline/registry.py).

Light on purpose (no torch): the control plane reads it. The stage itself is ``stages/rm.py``.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import RMConfig
from pipeline.registry import DATA_FIELDS, StageSpec, lazy


def parents(cfg: Any) -> list[str]:
    """The sft stage's model it starts from (``init_from: sft``); rlaif_label's pairs when it is in the run."""
    return (["sft"] if cfg.rm.init_from == "sft" else []) + (["rlaif_label"] if "rlaif_label" in cfg.stages else [])


def data_fields(cfg: Any) -> tuple[str, ...]:
    """With ``rlaif_label`` in the run its labelled file (a parent's hash) replaces ``rm.data``."""
    return ("eval_data",) if "rlaif_label" in cfg.stages else DATA_FIELDS


SPEC = StageSpec(
    name="rm", order=40, title="Reward model", config_model=RMConfig, run=lazy("stages.rm:run"), parents=parents,
    data_fields=data_fields, headline=("eval_accuracy", "eval_mean_margin"),
    card=("a pairwise reward model (Bradley-Terry), score read at the response's last token", ("reward-model", "rlhf")),
)
