"""The ``rlaif_label`` stage's declaration: its settings (``rlaif_label:``) and its ``SPEC``
(pipeline/registry.py). Light on purpose (no torch): the control plane reads it. The stage itself is
``stages/rlaif/label.py``; the judges it asks are the shared ``rlaif.judges`` (``pipeline/sections.py``).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pipeline.registry import StageSpec, lazy
from pipeline.sections import DataSource, Section


class RLAIFLabelConfig(Section):
    """``rlaif_label``: offline RLAIF. The SFT policy samples responses to prompts and an AI judge labels every
    pair of them, giving preference data the rm and dpo stages train on (stages/rlaif/label.py)."""

    data: DataSource | None = Field(None, description="Prompts (a 'prompt' per record) the policy answers.")
    judge: str = Field("default", description="The judge, by its name under rlaif.judges.")
    num_responses: int = Field(2, ge=2, description="Responses sampled per prompt; every distinct pair is judged.")
    max_prompt_length: int = Field(128, gt=0, description="Longer prompts (in tokens) are skipped (and counted).")
    max_new_tokens: int = Field(48, gt=0, description="Most tokens sampled per response.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (no top-k/top-p).")
    batch_size: int = Field(8, gt=0, description="Prompts per generate call.")
    seed: int = Field(0, description="Seed of the sampling (batch b samples under seed + b).")
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (None: torch default).")


def parents(cfg: Any) -> list[str]:
    """The sft stage's policy samples when sft is in the run (else the base model)."""
    return ["sft"] if "sft" in cfg.stages else []


def memory_estimate(cfg: Any, plan: Any) -> None:
    """The sampling policy and its KV cache (an hf judge model is not planned)."""
    lab = cfg.rlaif_label
    plan.frozen("policy")
    plan.kv_cache(lab.max_prompt_length + lab.max_new_tokens, lab.batch_size)
    plan.note("an hf judge model, if any, is not included")


def report_section(section: Any) -> list[str]:
    return [f"The labelling stage's final metrics are under *{section.full_metrics_title}* at the end.", ""]


SPEC = StageSpec(
    name="rlaif_label", order=30, title="RLAIF labels", config_model=RLAIFLabelConfig,
    run=lazy("stages.rlaif.label:run"), parents=parents, samples=True, memory_estimate=memory_estimate,
    report_section=report_section,
    headline=("pairs_kept", "inconsistent"),
)
