"""The ``distill`` stage's declaration: its settings (``distill:``) and its ``SPEC`` (pipeline/registry.py).

Light on purpose (no torch): the control plane reads it. The stage itself is ``stages/distill.py``.
"""

from __future__ import annotations

from pipeline.config import DistillConfig
from pipeline.registry import StageSpec, lazy

SPEC = StageSpec(
    name="distill", order=10, config_model=DistillConfig, run=lazy("stages.distill:run"),
    samples=True, headline=("kept", "finished_rate"),
)
