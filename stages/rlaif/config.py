"""The ``rlaif_label`` stage's declaration: its settings (``rlaif_label:``) and its ``SPEC``
(pipeline/registry.py). Light on purpose (no torch): the control plane reads it. The stage itself is
``stages/rlaif/label.py``.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import RLAIFLabelConfig
from pipeline.registry import StageSpec, lazy


def parents(cfg: Any) -> list[str]:
    """The sft stage's policy samples when sft is in the run (else the base model)."""
    return ["sft"] if "sft" in cfg.stages else []


SPEC = StageSpec(
    name="rlaif_label", order=30, title="RLAIF labels", config_model=RLAIFLabelConfig,
    run=lazy("stages.rlaif.label:run"), parents=parents, samples=True, headline=("pairs_kept", "inconsistent"),
)
