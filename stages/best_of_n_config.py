"""The ``best_of_n`` stage's declaration: its settings (``best_of_n:``) and its ``SPEC``
(pipeline/registry.py). Light on purpose (no torch): the control plane reads it. The stage itself is
``stages/best_of_n.py``.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import BestOfNConfig
from pipeline.registry import StageSpec, lazy


def parents(cfg: Any) -> list[str]:
    """The sft stage's policy (``policy_from: sft``) and the rm stage when a reward source is kind 'rm'."""
    bon = cfg.best_of_n
    return (["sft"] if bon.policy_from == "sft" else []) + (["rm"] if any(r.kind == "rm" for r in bon.rewards)
                                                             else [])


SPEC = StageSpec(
    name="best_of_n", order=50, config_model=BestOfNConfig, run=lazy("stages.best_of_n:run"),
    parents=parents, reads=("rm",), samples=True, headline=("kept", "score_mean_kept"),
    card=("best-of-N / rejection-sampling fine-tuning", ("best-of-n", "rejection-sampling")),
)
