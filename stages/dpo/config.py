"""The ``dpo`` stage's declaration: its settings (``dpo:``) and its ``SPEC`` (pipeline/registry.py).

Light on purpose (no torch): the control plane reads it. The stage itself is ``stages/dpo/trainer.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.registry import DATA_FIELDS, StageSpec, lazy
from pipeline.sections import PreferenceSection, TrainConfig, TuningConfig, engine_training, section


class DPOTrainConfig(TrainConfig):
    """``dpo.train``: ``TrainConfig`` with DPO's learning rate, 5e-6, by default (a subclass, not a default
    factory, so that one key given keeps the rest of the defaults)."""

    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate of AdamW (after warm-up).")


class DPOConfig(PreferenceSection):
    """``dpo``: direct preference optimisation on the same preference data as ``rm`` (stages/dpo/).

    loss: ``sigmoid`` (DPO), ``ipo`` (IPO, on per-token mean log-probs), ``cdpo`` (conservative DPO:
    labels flipped with probability ``label_smoothing``). The reference is the starting policy (the SFT
    model, or the base), in eval mode, and no second copy of the model is held: with a PEFT method its
    log-probs are those of the same model with the adapter disabled, computed for each micro-batch's pairs
    when it is first trained on and cached (kept in checkpoints); otherwise they are computed before the
    first step for exactly the pairs the run's steps will train on. The pair settings are
    ``PreferenceSection``'s.
    """

    loss: Literal["sigmoid", "ipo", "cdpo"] = Field(
        "sigmoid", description="sigmoid: DPO; ipo: IPO on per-token mean log-probs; cdpo: conservative DPO.")
    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward beta * (logp - ref_logp).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cdpo only: probability that a label is flipped.")
    disable_dropout: bool = Field(
        True, description="Dropout off in the policy (as TRL's DPO default): the reference's log-probs come from "
                          "eval mode, so with dropout on the policy would differ from it at step 0 already.")
    train: DPOTrainConfig = section(DPOTrainConfig)
    tuning: TuningConfig = section(TuningConfig)

    @model_validator(mode="after")
    def _smoothing_only_for_cdpo(self) -> "DPOConfig":
        if self.loss == "cdpo" and self.label_smoothing == 0:
            raise ValueError("dpo.loss='cdpo' needs dpo.label_smoothing > 0 (e.g. 0.1); with 0 it is plain "
                             "sigmoid DPO")
        if self.loss != "cdpo" and self.label_smoothing != 0:
            raise ValueError(f"dpo.label_smoothing={self.label_smoothing} is only used by dpo.loss='cdpo' "
                             f"(got loss {self.loss!r}); set dpo.loss=cdpo or label_smoothing=0")
        return self


def parents(cfg: Any) -> list[str]:
    """The sft stage's model it starts from (``init_from: sft``); rlaif_label's pairs when it is in the run."""
    return (["sft"] if cfg.dpo.init_from == "sft" else []) + (["rlaif_label"] if "rlaif_label" in cfg.stages else [])


def data_fields(cfg: Any) -> tuple[str, ...]:
    """With ``rlaif_label`` in the run its labelled file (a parent's hash) replaces ``dpo.data``."""
    return ("eval_data",) if "rlaif_label" in cfg.stages else DATA_FIELDS


def check(cfg: Any) -> None:
    """DPO needs preference data (dpo.data or rlaif_label's pairs) and its starting policy (before any model
    loads)."""
    if "dpo" not in cfg.stages:
        return
    if cfg.dpo.data is None and "rlaif_label" not in cfg.stages:
        raise ValueError(
            "dpo.data is not set: point it at a preference file (prompt/chosen/rejected, HH transcripts, or "
            "prompt/responses/ranking) or hub:name, or add rlaif_label to the run's stages to train on "
            "AI-judged pairs of SFT samples")
    if cfg.dpo.init_from == "sft" and "sft" not in cfg.stages:
        raise ValueError(
            f"dpo.init_from is 'sft' but stages {cfg.stages} do not include 'sft'. Add 'sft' to stages (a "
            "complete stage of this run_name with the same config is skipped, not retrained), or set "
            "dpo.init_from: base")


# DPO's response log-probs (stages.dpo.core.sequence_logprobs) at the backward's peak, bytes per token and
# vocabulary entry: the fp32 logits the log-softmax keeps for backward, plus three fp32 tensors of that size
# alive together in it (logsumexp's gradient, gather's scattered gradient, the logits slice's gradient).
# Measured on CPU (sequence_logprobs + backward, 8 x 128 tokens x 49,152): 4.1 fp32 logits tensors at the
# peak, under fp32 and bf16 alike (the bf16 logits are freed once upcast).
LOGPROB_BYTES = 16


def dpo_activations(plan: Any, seq: int, pairs: int) -> dict[str, int]:
    """Activation bytes of a DPO micro-batch of ``pairs`` pairs, by component (``plan``: the memory planner's
    ``MemoryBuilder``).

    A micro-batch is one forward over 2 x ``pairs`` sequences (the chosen rows, then the rejected ones) of
    up to ``seq`` tokens:

    - ``layers``: what the decoder layers keep for backward (no LM head);
    - ``logprobs``: the log-softmax over the whole vocabulary for every token (``LOGPROB_BYTES``);
    - ``reference_pass``: the reference's forward over the same micro-batch (and the held-out one's), with
      no gradient: the logits in the compute dtype, their fp32 copy and logsumexp's temporary, plus one
      layer's tensors in flight. It runs before a step's training forward, not beside it;
    - ``peak``: the larger of training (``layers + logprobs``) and the reference pass.
    """
    tokens, vocab = 2 * pairs * seq, plan.dims.vocab
    layers = plan.activations(seq, 2 * pairs, lm_head=False)
    logprobs = tokens * vocab * LOGPROB_BYTES
    reference_pass = tokens * vocab * (plan.knobs.act_bytes + 8) + tokens * plan.layer_token_bytes()
    return {"layers": layers, "logprobs": logprobs, "reference_pass": reference_pass,
            "peak": max(layers + logprobs, reference_pass)}


def memory_estimate(cfg: Any, plan: Any) -> None:
    """The policy (each pair two sequences in one forward, through the LM head); the reference is the same
    weights (adapter disabled, or log-probs taken before the first step): no copy."""
    plan.trained("policy", "causal_lm", dpo_activations(plan, cfg.dpo.max_length, plan.knobs.micro_batch)["peak"])
    plan.shared("reference")
    if plan.knobs.tuning.is_peft:
        plan.note("reference = the policy with the adapter disabled: no extra weights (DESIGN §7)")
    else:
        plan.note("reference log-probs come from the starting policy before the first step: no reference copy of "
                  "the weights")
    plan.note("the reference's forward (no gradient) runs before a step's training forward: the policy's "
              "activations are the larger of the two, not their sum")


def report_section(section: Any) -> list[str]:
    return section.grid("dpo_curves.png", "DPO", ("loss", "eval_loss", "margin", "eval_margin", "accuracy",
                                                  "eval_accuracy"), missing="no DPO metrics logged")


SPEC = StageSpec(
    name="dpo", order=70, title="DPO", config_model=DPOConfig, run=lazy("stages.dpo.trainer:run"), parents=parents,
    check=check, data_fields=data_fields, training=engine_training("dpo"), memory_estimate=memory_estimate,
    report_section=report_section,
    headline=("eval_accuracy", "eval_margin"),
    evaluated_policy=True, card=("direct preference optimisation (DPO family) against the starting policy", ("dpo",)),
)
