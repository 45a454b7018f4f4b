"""The ``sft`` stage's declaration: its settings (``sft:``) and its ``SPEC`` (pipeline/registry.py).

Light on purpose (no torch): the control plane reads it. The stage itself is ``stages/sft.py``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pipeline.registry import DATA_FIELDS, StageSpec, lazy
from pipeline.sections import DataSource, Section, TrainConfig, TuningConfig, engine_training, section


class SFTConfig(Section):
    """``sft``: supervised fine-tuning of the base model on conversations, the loss on the assistant tokens
    (stages/sft.py)."""

    data: DataSource | None = Field(
        None, description="Conversations ('messages', or 'prompt' + 'completion'); unused when distill is in "
                          "the run (its answers replace it).")
    eval_data: DataSource | None = Field(None, description="Held-out conversations (default: eval_fraction of data).")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Share of data held out when eval_data is not set.")
    max_length: int = Field(512, gt=8, description="Tokens per conversation; longer ones are cut (and counted).")
    packing: bool = Field(False, description="Pack several conversations into one row (each attends only to "
                                             "itself).")
    train: TrainConfig = section(TrainConfig)
    tuning: TuningConfig = section(TuningConfig)


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


def memory_estimate(cfg: Any, plan: Any) -> None:
    """The policy trained on micro-batches of ``max_length`` tokens; with token-level distillation, a frozen
    teacher's forward per micro-batch (its logits and their fp32 softmax)."""
    k = plan.knobs
    # no padding mask: the collate pads on the right and passes position ids (pipeline.memory._layer_saved)
    plan.trained("policy", "causal_lm", plan.activations(cfg.sft.max_length, k.micro_batch, lm_head=True,
                                                         padded=False))
    if cfg.distill.token_level.enabled and cfg.distill.teacher.kind != "http":
        logits = k.micro_batch * cfg.sft.max_length * plan.dims.vocab * (k.act_bytes + 8)
        plan.frozen("teacher", "causal_lm", activations=logits)
        plan.note("teacher (distill.token_level) sized as the student: same vocabulary; a larger teacher needs more")


def report_section(section: Any) -> list[str]:
    """The training loss and held-out loss (with token-level distillation also its two parts)."""
    curves = {"train loss": "loss", "eval loss": "eval_loss", "train CE": "ce_loss", "train KD": "kd_loss"}
    return section.plot("sft_loss.png", "SFT loss", curves, "loss", missing="no loss logged")


SPEC = StageSpec(
    name="sft", order=20, title="SFT", config_model=SFTConfig, run=lazy("stages.sft:run"), parents=parents,
    reads=("distill",), identity_extra=identity_extra,
    data_fields=data_fields, training=engine_training("sft"), memory_estimate=memory_estimate,
    report_section=report_section,
    headline=("eval_loss", "loss"),
    card=("supervised fine-tuning (SFT) on conversations, loss on the assistant tokens", ("sft",)),
)
