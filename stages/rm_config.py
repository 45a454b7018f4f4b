"""The ``rm`` stage's declaration: its settings (``rm:``) and its ``SPEC`` (pipeline/registry.py).

Light on purpose (no torch): the control plane reads it. The stage itself is ``stages/rm.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline.registry import DATA_FIELDS, StageSpec, lazy
from pipeline.sections import PreferenceSection, TrainConfig, TuningConfig, engine_training, section


# A stage whose defaults differ from TrainConfig's has a subclass with those defaults, not a default_factory
# building TrainConfig(learning_rate=...): a factory's values apply only when the whole section is absent, so
# one key given (``dpo.train.max_steps=40``) would silently bring back the generic rate for the rest.
class RMTrainConfig(TrainConfig):
    """``rm.train``: ``TrainConfig`` with the reward model's learning rate, 5e-5, by default."""

    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate of AdamW (after warm-up).")


class RMConfig(PreferenceSection):
    """``rm``: a pairwise (Bradley-Terry) reward model trained on preference pairs, its score read at the
    response's last token (stages/rm.py). The pair settings are ``PreferenceSection``'s."""

    center_rewards_coefficient: float = Field(
        0.0, ge=0, description="Weight of the reward-centring term mean((r_chosen + r_rejected)^2) (0: off).")
    train: RMTrainConfig = section(RMTrainConfig)
    tuning: TuningConfig = section(TuningConfig)


def parents(cfg: Any) -> list[str]:
    """The sft stage's model it starts from (``init_from: sft``); rlaif_label's pairs when it is in the run."""
    return (["sft"] if cfg.rm.init_from == "sft" else []) + (["rlaif_label"] if "rlaif_label" in cfg.stages else [])


def data_fields(cfg: Any) -> tuple[str, ...]:
    """With ``rlaif_label`` in the run its labelled file (a parent's hash) replaces ``rm.data``."""
    return ("eval_data",) if "rlaif_label" in cfg.stages else DATA_FIELDS


def memory_estimate(cfg: Any, plan: Any) -> None:
    """The reward model trained on pairs: each pair is two sequences (chosen, rejected) in one forward."""
    plan.trained("reward_model", "seq_cls",
                 plan.activations(cfg.rm.max_length, 2 * plan.knobs.micro_batch, lm_head=False))


def _histogram(stage_dir: Path) -> Path | None:
    """The held-out score histogram the stage saved (``score_histogram.png``)."""
    for candidate in (stage_dir / "score_histogram.png", stage_dir / "model" / "score_histogram.png"):
        if candidate.exists():
            return candidate
    found = sorted(stage_dir.rglob("score_histogram.png")) if stage_dir.exists() else []
    return found[0] if found else None


def report_section(section: Any) -> list[str]:
    """Held-out accuracy and margin, accuracy and loss curves, the score histogram, accuracy by margin bucket."""
    lines: list[str] = []
    acc, margin = section.metrics.get("eval_accuracy"), section.metrics.get("eval_mean_margin")
    if acc is not None or margin is not None:
        lines += [f"Held-out accuracy: **{section.cell(acc)}**, mean margin (chosen − rejected): "
                  f"**{section.cell(margin)}**", ""]
    lines += section.plot("rm_accuracy.png", "RM accuracy", {"train accuracy": "accuracy",
                                                             "eval accuracy": "eval_accuracy"}, "accuracy")
    lines += section.plot("rm_loss.png", "RM loss", {"train loss": "loss", "eval loss": "eval_loss"}, "loss")
    histogram = _histogram(section.dir)
    if histogram is not None:
        lines += ["Scores of chosen and rejected responses on held-out pairs:", ""]
        lines += section.image(histogram, "rm_score_histogram.png", "RM score histogram")
    buckets = section.metrics.get("accuracy_by_margin_bucket")
    if isinstance(buckets, dict) and buckets:
        lines += ["Accuracy by margin bucket:", ""] + section.table(["bucket", "accuracy"], list(buckets.items()))
    elif isinstance(buckets, list) and buckets and all(isinstance(b, dict) for b in buckets):
        header = list(dict.fromkeys(k for b in buckets for k in b))
        rows = [[b.get(h) for h in header] for b in buckets]
        lines += ["Accuracy by margin bucket:", ""] + section.table(header, rows)
    return lines


SPEC = StageSpec(
    name="rm", order=40, title="Reward model", config_model=RMConfig, run=lazy("stages.rm:run"), parents=parents,
    data_fields=data_fields, training=engine_training("rm"),
    memory_estimate=memory_estimate, report_section=report_section, headline=("eval_accuracy", "eval_mean_margin"),
    card=("a pairwise reward model (Bradley-Terry), score read at the response's last token", ("reward-model", "rlhf")),
)
