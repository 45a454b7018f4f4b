"""The ``dpo`` stage's declaration: its settings (``dpo:``) and its ``SPEC`` (pipeline/registry.py).

Light on purpose (no torch): the control plane reads it. The stage itself is ``stages/dpo/trainer.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.registry import DATA_FIELDS, StageSpec, lazy
from pipeline.sections import (
    PreferenceSection,
    TrainConfig,
    TuningConfig,
    added_setting,
    engine_training,
    section,
)


class DPOTrainConfig(TrainConfig):
    """``dpo.train``: ``TrainConfig`` with DPO's learning rate, 5e-6, by default (a subclass, not a default
    factory, so that one key given keeps the rest of the defaults)."""

    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate of AdamW (after warm-up).")


#: ``dpo.loss`` values that use no reference model (none is run, and no reference log-prob computed)
REFERENCE_FREE = ("orpo", "simpo")
#: ``dpo.loss`` values whose log-probs are per-token means of the response (the others: sums)
LENGTH_NORMALISED = ("ipo", "orpo", "simpo")
#: ``dpo.beta`` when it is not given, by ``dpo.loss`` (orpo has none: its weight is ``dpo.orpo_lambda``).
#: SimPO's is the SimPO paper's (its sweeps use 2.0 to 2.5 on a reward of per-token means); TRL's CPOConfig
#: shares 0.1 between its sigmoid and simpo losses.
DEFAULT_BETA = {"simpo": 2.0, "orpo": None}
#: the defaults of the settings one loss alone reads (null until that loss is chosen; set with another, refused)
DEFAULT_SIMPO_GAMMA = 0.5  # TRL's CPOConfig.simpo_gamma
DEFAULT_ORPO_LAMBDA = 0.1  # TRL's ORPOConfig.beta


class DPOConfig(PreferenceSection):
    """``dpo``: direct preference optimisation on the same preference data as ``rm`` (stages/dpo/).

    loss: ``sigmoid`` (DPO), ``ipo`` (IPO, on per-token mean log-probs), ``cdpo`` (conservative DPO:
    labels flipped with probability ``label_smoothing``), ``kto`` (KTO on unpaired rows labelled desirable or
    not; pairs are unpaired), ``orpo`` and ``simpo`` (no reference model). The reference is the starting
    policy (the SFT model, or the base), in eval mode, and no second copy of the model is held: with a PEFT
    method its log-probs are those of the same model with the adapter disabled, computed for each
    micro-batch's pairs when it is first trained on and cached (kept in checkpoints); otherwise they are
    computed before the first step for exactly the pairs the run's steps will train on. The pair settings
    are ``PreferenceSection``'s; each objective's formula, keys and use: docs/DPO.md.
    """

    loss: Literal["sigmoid", "ipo", "cdpo", "kto", "orpo", "simpo"] = Field(
        "sigmoid", description="sigmoid: DPO; ipo: IPO on per-token mean log-probs; cdpo: conservative DPO; kto: "
                               "KTO on rows labelled desirable or not (pairs are unpaired); orpo: ORPO and simpo: "
                               "SimPO, both without a reference model (docs/DPO.md).")
    beta: float | None = Field(
        None, gt=0, description="Inverse temperature of the implicit reward beta * (logp - ref_logp); simpo: the "
                                "scale of its reward beta * per-token mean logp. Not given: 0.1, or 2.0 for simpo; "
                                "orpo has none (its weight is orpo_lambda).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cdpo only: probability that a label is flipped.")
    desirable_weight: float = added_setting(
        1.0, gt=0, description="kto only: lambda_D, the weight of a desirable row's loss (KTO paper: keep "
                               "lambda_D n_D / (lambda_U n_U) in [1, 4/3] with n_D, n_U the rows of each label).")
    undesirable_weight: float = added_setting(1.0, gt=0, description="kto only: lambda_U, the weight of an "
                                                                     "undesirable row's loss.")
    simpo_gamma: float | None = added_setting(
        None, ge=0, description=f"simpo only: gamma, the target margin of -log sigmoid(beta (m_c - m_r) - gamma) "
                                f"(not given: {DEFAULT_SIMPO_GAMMA}, TRL's default).")
    simpo_sft_weight: float = added_setting(
        0.0, ge=0, description="simpo only: weight of an SFT term, the chosen response's per-token NLL (TRL's "
                               "cpo_alpha; 0: off, as in SimPO).")
    orpo_lambda: float | None = added_setting(
        None, ge=0, description=f"orpo only: lambda, the weight of the odds-ratio term beside the chosen "
                                f"response's NLL (TRL's ORPOConfig.beta; not given: {DEFAULT_ORPO_LAMBDA}).")
    disable_dropout: bool = Field(
        True, description="Dropout off in the policy (as TRL's DPO default): the reference's log-probs come from "
                          "eval mode, so with dropout on the policy would differ from it at step 0 already.")
    train: DPOTrainConfig = section(DPOTrainConfig)
    tuning: TuningConfig = section(TuningConfig)

    @model_validator(mode="before")
    @classmethod
    def _defaults_of_the_loss(cls, data: Any) -> Any:
        """The settings whose default depends on the loss (beta, simpo_gamma, orpo_lambda), when not given."""
        if not isinstance(data, dict):
            return data
        loss = data.get("loss", "sigmoid")
        filled = {"beta": DEFAULT_BETA.get(loss, 0.1)}
        if loss == "simpo":
            filled["simpo_gamma"] = DEFAULT_SIMPO_GAMMA
        if loss == "orpo":
            filled["orpo_lambda"] = DEFAULT_ORPO_LAMBDA
        return {**data, **{k: v for k, v in filled.items() if data.get(k) is None}}

    @model_validator(mode="after")
    def _settings_of_the_loss(self) -> "DPOConfig":
        if self.loss == "cdpo" and self.label_smoothing == 0:
            raise ValueError("dpo.loss='cdpo' needs dpo.label_smoothing > 0 (e.g. 0.1); with 0 it is plain "
                             "sigmoid DPO")
        if self.loss == "orpo" and self.beta is not None:
            raise ValueError(f"dpo.beta={self.beta} is not used by dpo.loss='orpo': ORPO has no reference model, and "
                             "the weight of its odds-ratio term is dpo.orpo_lambda; remove dpo.beta")
        only = {"label_smoothing": ("cdpo", self.label_smoothing != 0),
                "desirable_weight": ("kto", self.desirable_weight != 1.0),
                "undesirable_weight": ("kto", self.undesirable_weight != 1.0),
                "simpo_gamma": ("simpo", self.simpo_gamma is not None),
                "simpo_sft_weight": ("simpo", self.simpo_sft_weight != 0),
                "orpo_lambda": ("orpo", self.orpo_lambda is not None)}
        for key, (owner, given) in only.items():
            if given and self.loss != owner:
                raise ValueError(f"dpo.{key}={getattr(self, key)} is only used by dpo.loss='{owner}' (got dpo.loss="
                                 f"'{self.loss}'); set dpo.loss={owner} or remove dpo.{key}")
        return self

    @property
    def uses_reference(self) -> bool:
        """Whether the loss compares the policy with a reference (all but orpo and simpo)."""
        return self.loss not in REFERENCE_FREE

    def objective(self) -> dict[str, Any]:
        """The loss and the settings it reads (the manifest's ``dpo_loss``)."""
        keys = {"sigmoid": ("beta", "label_smoothing"), "ipo": ("beta", "label_smoothing"),
                "cdpo": ("beta", "label_smoothing"), "kto": ("beta", "desirable_weight", "undesirable_weight"),
                "orpo": ("orpo_lambda",), "simpo": ("beta", "simpo_gamma", "simpo_sft_weight")}[self.loss]
        return {"loss": self.loss, **{key: getattr(self, key) for key in keys}}


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


def dpo_activations(plan: Any, seq: int, pairs: int, loss: str = "sigmoid") -> dict[str, int]:
    """Activation bytes of a DPO micro-batch of ``pairs`` pairs (KTO: rows), by component (``plan``: the memory
    planner's ``MemoryBuilder``).

    A micro-batch is one forward over 2 x ``pairs`` sequences (the chosen rows, then the rejected ones) of
    up to ``seq`` tokens; KTO's is ``pairs`` rows with gradient, then their mismatched sequences without:

    - ``layers``: what the decoder layers keep for backward (no LM head);
    - ``logprobs``: the log-softmax over the whole vocabulary for every token (``LOGPROB_BYTES``);
    - ``reference_pass``: the reference's forward over 2 x ``pairs`` sequences (and the held-out ones'), with
      no gradient: the logits in the compute dtype, their fp32 copy and logsumexp's temporary, plus one
      layer's tensors in flight. It runs before a step's training forward, not beside it (KTO's no-gradient
      pass over the mismatched sequences is half of it); 0 for the losses without a reference (orpo, simpo);
    - ``peak``: the larger of training (``layers + logprobs``) and the reference pass.
    """
    vocab = plan.dims.vocab
    trained = pairs if loss == "kto" else 2 * pairs
    layers = plan.activations(seq, trained, lm_head=False)
    logprobs = trained * seq * vocab * LOGPROB_BYTES
    tokens = 2 * pairs * seq
    reference_pass = (0 if loss in REFERENCE_FREE else
                      tokens * vocab * (plan.knobs.act_bytes + 8) + tokens * plan.layer_token_bytes())
    return {"layers": layers, "logprobs": logprobs, "reference_pass": reference_pass,
            "peak": max(layers + logprobs, reference_pass)}


def memory_estimate(cfg: Any, plan: Any) -> None:
    """The policy (each pair two sequences in one forward, through the LM head); the reference is the same
    weights (adapter disabled, or log-probs taken before the first step): no copy; orpo and simpo have none."""
    dpo = cfg.dpo
    plan.trained("policy", "causal_lm", dpo_activations(plan, dpo.max_length, plan.knobs.micro_batch, dpo.loss)["peak"])
    if not dpo.uses_reference:
        plan.note(f"dpo.loss={dpo.loss} has no reference model: no reference weights and no reference pass")
        return
    plan.shared("reference")
    if plan.knobs.tuning.is_peft:
        plan.note("reference = the policy with the adapter disabled: no extra weights (DESIGN §7)")
    else:
        plan.note("reference log-probs come from the starting policy before the first step: no reference copy of "
                  "the weights")
    plan.note("the reference's forward (no gradient) runs before a step's training forward: the policy's "
              "activations are the larger of the two, not their sum")


def report_section(section: Any) -> list[str]:
    """The curves; a key the run's loss does not log is left out (KTO's ``kl`` and label accuracy, ORPO's and
    SimPO's ``nll``; KTO on unpaired rows has no margin or pair accuracy)."""
    return section.grid("dpo_curves.png", "DPO", ("loss", "eval_loss", "margin", "eval_margin", "accuracy",
                                                  "eval_accuracy", "kl", "label_accuracy", "eval_label_accuracy",
                                                  "nll"), missing="no DPO metrics logged")


SPEC = StageSpec(
    name="dpo", order=70, title="DPO", config_model=DPOConfig, run=lazy("stages.dpo.trainer:run"), parents=parents,
    check=check, data_fields=data_fields, training=engine_training("dpo"), memory_estimate=memory_estimate,
    report_section=report_section,
    headline=("eval_accuracy", "eval_margin"),
    evaluated_policy=True, card=("direct preference optimisation (DPO family) against the starting policy", ("dpo",)),
)
