"""Run configuration: one YAML file per run, validated before any model is loaded.

A run config has a top-level section for the base model and chat format and one section per stage.
Every section is a pydantic model with ``extra="forbid"``, so a misspelled key is an error that names
the key, where it is, and the closest valid key. ``key=value`` overrides from the command line use
dotted paths (``sft.train.learning_rate=1e-4``) and are parsed as YAML scalars.

Loading is cheap (no torch import) so ``pipeline status`` and config validation stay fast.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .paths import PACKAGE_ROOT, config_not_found, eval_tasks_dir, find_config, output_path, resolve_path, use_bases

REPO_ROOT = PACKAGE_ROOT  # the folder holding pipeline/, stages/, data/, configs/ (pipeline/paths.py)


class ConfigError(ValueError):
    """A config file or override is invalid. The message names the file/key and what was expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- model
class TinyModelConfig(_Section):
    """A tiny random Llama plus a byte-level BPE tokenizer trained locally (cached; for tests)."""

    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(128, gt=0)
    vocab_size: int = Field(512, ge=300)
    max_position_embeddings: int = Field(512, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads}")
        return self


class ModelConfig(_Section):
    """Where the base model comes from.

    source:
      - ``tiny``: built from ``tiny`` (config + locally trained tokenizer), cached under ``cache_dir``.
      - ``local``: a Hugging Face folder at ``path``.
      - ``hub``: a hub name at ``path`` (needs network; honours HF_HUB_OFFLINE).
      - ``gguf``: a GGUF file; ``path`` is the folder (or ``package`` names an installed Python package
        whose folder holds it) and ``gguf_file`` the file name. Converted once to safetensors and cached.
    """

    source: Literal["tiny", "local", "hub", "gguf"] = "tiny"
    path: str | None = None
    package: str | None = None
    gguf_file: str | None = None
    revision: str | None = None
    hub_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$",
        description="The hub id (org/name) this base corresponds to when it is a local or GGUF copy: the model "
                    "cards' base_model. A hub source names it already.")
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    cache_dir: str = ".cache/alignpipe"
    pad_token: str | None = Field(
        None, description="Token to use as pad when the tokenizer has none or pad == eos (must differ from eos)."
    )

    @model_validator(mode="after")
    def _source_needs(self) -> "ModelConfig":
        if self.source in ("local", "hub") and not self.path:
            raise ValueError(f"model.source={self.source!r} needs model.path")
        if self.source == "gguf":
            if not (self.path or self.package):
                raise ValueError("model.source='gguf' needs model.path (a folder) or model.package")
            if not self.gguf_file:
                raise ValueError("model.source='gguf' needs model.gguf_file (the .gguf file name)")
        return self


class ChatConfig(_Section):
    """Chat formatting. ``template`` overrides the tokenizer's chat template (Jinja text or a file path).

    A tokenizer without a chat template is never given one silently: the run stops and asks for
    ``template``. Besides Jinja text or a file, two names are built in: ``chatml`` (ChatML, as SmolLM2
    and Qwen use) and ``raw`` (the messages' contents concatenated as they are, each assistant turn
    closed by eos: for plain-text prompts such as ``"Question: ...\\nAnswer:"``).
    """

    template: str | None = Field(
        None, description="Jinja text, a file path, 'chatml' or 'raw' (default: the tokenizer's own template).")
    system_prompt: str | None = Field(
        None, description="System message prepended to every conversation that has none (None: template default)."
    )


# ---------------------------------------------------------------------------------------------- data
class DataSource(_Section):
    """A data set: a local file (.jsonl/.json/.csv/.parquet, optionally .gz) or ``hub:org/name``.

    ``columns`` maps our field names (messages, prompt, completion, chosen, rejected, responses,
    ranking, margin) to the source's columns. A value is a column name or dotted path
    (``instances.0.output``), or a format string with ``{dotted.path}`` fields
    (``"{instruction}\\n\\n{instances.0.input}"``).
    """

    path: str
    split: str = "train"
    columns: dict[str, str] = Field(default_factory=dict)
    max_records: int | None = Field(None, gt=0)
    max_bad_fraction: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str) -> str:
        if value.startswith("hub:"):
            return value
        resolved = resolve_path(value)
        if not resolved.exists():
            raise ValueError(f"data file not found: {value} (looked at {resolved})")
        return value


# resolve_path (imported above, from pipeline/paths.py): relative paths in configs are looked up in the
# config file's folder, the working directory, then alignpipe's shipped files.


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_location(value: str) -> str:
    """A model or tokenizer given in a config -> what ``from_pretrained`` loads.

    An existing local folder (relative to the repository root unless absolute) gives its absolute path;
    ``hub:org/name`` or a bare ``org/name`` that is not a local folder gives the hub name. Anything else
    is an error naming both forms.
    """
    text = str(value).strip()
    if text.startswith("hub:"):
        name = text[4:]
        if not _HUB_NAME.match(name):
            raise ValueError(f"{value!r} is not a hub model name (hub:org/name)")
        return name
    folder = resolve_path(text)
    if folder.is_dir():
        return str(folder)
    if _HUB_NAME.match(text) and not text.startswith((".", "~")):
        return text
    raise ValueError(f"model folder not found: {value} (looked at {folder}); give an existing folder, or a hub "
                     "name as org/name or hub:org/name")


# ------------------------------------------------------------------------------------------ training
class TrainConfig(_Section):
    """Optimisation settings of the stages on the shared engine (``sft.train``; ``rm.train`` and
    ``dpo.train`` are subclasses that change only default values)."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs when set.")
    per_device_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    global_batch_size: int | None = Field(
        None, gt=0, description="If set, must equal per_device_batch_size x grad accumulation x world size."
    )
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 on CPU."
    )
    logging_steps: int = Field(1, gt=0)
    save_steps: int = Field(50, gt=0, description="Write a resumable checkpoint every N optimizer steps.")
    eval_steps: int | None = Field(None, gt=0)
    seed: int = 0
    deepspeed: str | None = Field(None, description="Path to a DeepSpeed JSON (configs/deepspeed/...).")
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (None: torch default).")
    # dynamic hyper-parameters (stages.engine.Engine); each is logged per step and kept in checkpoints
    monitor: str = Field("eval_loss", description="The held-out metric that reduce-on-plateau and early "
                                                  "stopping watch (a key the stage's evaluation logs).")
    monitor_mode: Literal["min", "max"] = Field("min", description="min: lower is better (a loss); max: higher.")
    min_delta: float = Field(0.0, ge=0, description="A change of `monitor` smaller than this is no improvement.")
    lr_plateau_factor: float | None = Field(
        None, gt=0, lt=1, description="Reduce-on-plateau: multiply the learning rate (on top of its schedule) by "
                                      "this after lr_plateau_patience evaluations without improvement. None: off.")
    lr_plateau_patience: int = Field(2, gt=0, description="Evaluations without improvement before a reduction.")
    lr_plateau_min_scale: float = Field(0.0, ge=0, lt=1, description="The reductions stop at this fraction of "
                                                                      "the schedule's learning rate.")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many evaluations without improvement of `monitor`, and end "
                                "with the weights of the best evaluation. None: off.")
    batch_ramp: dict[int, int] = Field(
        default_factory=dict, description="Batch-size ramp-up through gradient accumulation: {optimizer step: "
                                          "accumulation steps from that step on}, e.g. {0: 1, 50: 2, 150: 4} "
                                          "(steps before the first key use gradient_accumulation_steps). The "
                                          "micro-batch order does not change, so resume stays exact.")

    @field_validator("deepspeed")
    @classmethod
    def _ds_exists(cls, value: str | None) -> str | None:
        return _deepspeed_exists(value)

    @field_validator("batch_ramp")
    @classmethod
    def _ramp_positive(cls, value: dict[int, int]) -> dict[int, int]:
        bad = {k: v for k, v in value.items() if k < 0 or v < 1}
        if bad:
            raise ValueError(f"batch_ramp needs steps >= 0 and accumulation steps >= 1, got {bad}")
        return dict(sorted(value.items()))

    @model_validator(mode="after")
    def _dynamic_needs(self) -> "TrainConfig":
        watching = self.lr_plateau_factor is not None or self.early_stopping_patience is not None
        if watching and not self.eval_steps:
            raise ValueError("lr_plateau_factor / early_stopping_patience watch the held-out metric: set "
                             "eval_steps (and give the stage held-out data: eval_data or eval_fraction)")
        return self

    def accumulation_at(self, step: int) -> int:
        """Gradient accumulation steps of optimizer step ``step`` (0-based): ``batch_ramp`` or the fixed value."""
        value = self.gradient_accumulation_steps
        for start, accum in self.batch_ramp.items():  # sorted by the validator
            if step >= start:
                value = accum
        return value

    def global_batch(self, world_size: int) -> int:
        """Sequences per optimizer step over all ranks: per-device batch x grad accumulation x world size."""
        return self.per_device_batch_size * self.gradient_accumulation_steps * world_size


# A stage whose defaults differ from TrainConfig's has a subclass with those defaults, not a default_factory
# building TrainConfig(learning_rate=...): a factory's values apply only when the whole section is absent, so
# one key given (``dpo.train.max_steps=40``) would silently bring back the generic rate for the rest.
class RMTrainConfig(TrainConfig):
    """``rm.train``: ``TrainConfig`` with the reward model's learning rate, 5e-5, by default."""

    learning_rate: float = Field(5e-5, gt=0)


class DPOTrainConfig(TrainConfig):
    """``dpo.train``: ``TrainConfig`` with DPO's learning rate, 5e-6, by default."""

    learning_rate: float = Field(5e-6, gt=0)


def _deepspeed_exists(value: str | None) -> str | None:
    if value is not None and not resolve_path(value).exists():
        raise ValueError(f"DeepSpeed config not found: {value}")
    return value


class PPOTrainConfig(_Section):
    """``ppo.train``: the actor's and critic's optimisation settings, each meaning what it means under
    ``sft.train`` / ``rm.train``. PPO's batch shape (``episodes_per_rollout``, ``mini_batch_size``,
    ``gradient_accumulation_steps``, ``ppo_epochs``) stays in ``ppo`` next to the algorithm it shapes."""

    learning_rate: float = Field(1e-5, gt=0)
    critic_learning_rate: float | None = Field(None, gt=0, description="Default: learning_rate.")
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Schedule over each model's PPO optimizer steps (the actor's exclude "
                                "critic_warmup_steps).")
    max_grad_norm: float | None = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 on CPU; fp16 is refused.")
    save_steps: int = Field(20, gt=0, description="Write a resumable checkpoint every N PPO steps.")
    seed: int = 0
    deepspeed: str | None = Field(None, description="Path to a DeepSpeed JSON (configs/deepspeed/...).")
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (None: torch default).")

    @field_validator("deepspeed")
    @classmethod
    def _ds_exists(cls, value: str | None) -> str | None:
        return _deepspeed_exists(value)


#: PPO keys that moved from ``ppo.<key>`` to ``ppo.train.<key>`` (old configs still load, with a warning).
PPO_TRAIN_KEYS = tuple(PPOTrainConfig.model_fields)

#: ``ppo.rollout_batch_size`` was renamed ``ppo.episodes_per_rollout``: it always counted episodes, never
#: prompts (old configs still load, with this warning; stage hashes use the old name, see pipeline.stage).
RENAMED_ROLLOUT_BATCH_SIZE = (
    "ppo.rollout_batch_size is renamed ppo.episodes_per_rollout (read as ppo.episodes_per_rollout={value}; "
    "write it so). It counts episodes (one prompt, one response) per rollout per device, not prompts: a "
    "rollout takes episodes_per_rollout / ppo.num_samples_per_prompt prompts. OpenRLHF's --rollout_batch_size "
    "R counts prompts over all devices, each sampled --n_samples_per_prompt K times: the same number here "
    "takes R x devices / K prompts per step instead of R; OpenRLHF's setting is episodes_per_rollout = "
    "R x K / devices")


@dataclass(frozen=True)
class PPOSizes:
    """PPO's batch sizes at one world size, derived once (``PPOConfig.sizes``). Per rank unless ``global_``."""

    world_size: int
    episodes_per_rollout: int  # episodes (prompt, response) per rollout per rank
    global_batch: int          # episodes per PPO step, all ranks
    mini_batch: int            # episodes per optimizer step per rank
    grad_accum: int
    micro_batch: int           # episodes per forward/backward
    n_minibatches: int         # optimizer steps per PPO epoch
    total_steps: int           # PPO steps (rollout + update)
    optimizer_steps: int       # optimizer steps of the critic over the run


class TuningConfig(_Section):
    """How parameters are trained.

    method:
      full; freeze (train only the top ``trainable_layers`` decoder layers and/or ``trainable_modules``);
      gradual_unfreeze (start with the top ``trainable_layers``, unfreeze one more every
      ``unfreeze_every_steps``); lora, dora, rslora, qlora (4-bit base via bitsandbytes); adalora; ia3;
      prefix; prompt; ptuning; llama_adapter.
    """

    method: Literal[
        "full", "freeze", "gradual_unfreeze", "lora", "dora", "rslora", "qlora", "adalora", "ia3",
        "prefix", "prompt", "ptuning", "llama_adapter",
    ] = "full"
    trainable_layers: int = Field(1, ge=0)
    trainable_modules: list[str] = Field(default_factory=list)
    unfreeze_every_steps: int = Field(10, gt=0)
    lora_r: int = Field(8, gt=0)
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    adalora_target_r: int = Field(4, gt=0)
    num_virtual_tokens: int = Field(8, gt=0)
    adapter_len: int = Field(4, gt=0)
    adapter_layers: int = Field(1, gt=0)
    adapter_name: str = "default"

    @property
    def is_peft(self) -> bool:
        return self.method not in ("full", "freeze", "gradual_unfreeze")

    @property
    def is_lora_family(self) -> bool:
        return self.method in ("lora", "dora", "rslora", "qlora", "adalora")


class LoggingConfig(_Section):
    wandb: bool = False
    wandb_project: str = "alignpipe"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    tensorboard: bool = False
    progress_bar: bool = True


# ---------------------------------------------------------------------------------------------- stages
class SFTConfig(_Section):
    data: DataSource | None = None
    eval_data: DataSource | None = None
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    max_length: int = Field(512, gt=8)
    packing: bool = False
    train: TrainConfig = Field(default_factory=TrainConfig)
    tuning: TuningConfig = Field(default_factory=TuningConfig)


class RMConfig(_Section):
    data: DataSource | None = None
    eval_data: DataSource | None = None
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    init_from: Literal["sft", "base"] = "sft"
    max_length: int = Field(512, gt=8)
    center_rewards_coefficient: float = Field(0.0, ge=0)
    train: RMTrainConfig = Field(default_factory=RMTrainConfig)
    tuning: TuningConfig = Field(default_factory=TuningConfig)


class DPOConfig(_Section):
    """``dpo``: direct preference optimisation on the same preference data as ``rm`` (stages/dpo/).

    loss: ``sigmoid`` (DPO), ``ipo`` (IPO, on per-token mean log-probs), ``cdpo`` (conservative DPO:
    labels flipped with probability ``label_smoothing``). The reference is the starting policy (the SFT
    model, or the base), in eval mode, and no second copy of the model is held: with a PEFT method its
    log-probs are those of the same model with the adapter disabled, computed for each micro-batch's pairs
    when it is first trained on and cached (kept in checkpoints); otherwise they are computed before the
    first step for exactly the pairs the run's steps will train on.
    """

    data: DataSource | None = None
    eval_data: DataSource | None = None
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    init_from: Literal["sft", "base"] = "sft"
    max_length: int = Field(512, gt=8)
    loss: Literal["sigmoid", "ipo", "cdpo"] = "sigmoid"
    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward beta * (logp - ref_logp).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cdpo only: probability that a label is flipped.")
    disable_dropout: bool = Field(
        True, description="Dropout off in the policy (as TRL's DPO default): the reference's log-probs come from "
                          "eval mode, so with dropout on the policy would differ from it at step 0 already.")
    train: DPOTrainConfig = Field(default_factory=DPOTrainConfig)
    tuning: TuningConfig = Field(default_factory=TuningConfig)

    @model_validator(mode="after")
    def _smoothing_only_for_cdpo(self) -> "DPOConfig":
        if self.loss == "cdpo" and self.label_smoothing == 0:
            raise ValueError("dpo.loss='cdpo' needs dpo.label_smoothing > 0 (e.g. 0.1); with 0 it is plain "
                             "sigmoid DPO")
        if self.loss != "cdpo" and self.label_smoothing != 0:
            raise ValueError(f"dpo.label_smoothing={self.label_smoothing} is only used by dpo.loss='cdpo' "
                             f"(got loss {self.loss!r}); set dpo.loss=cdpo or label_smoothing=0")
        return self


class RewardSourceConfig(_Section):
    """One term of the PPO reward: the RM, a Python function ``module:function``, or an AI judge."""

    kind: Literal["rm", "function", "judge"] = "rm"
    function: str | None = None
    judge: str | None = Field(None, description="Name of a judge defined under rlaif.judges.")
    weight: float = 1.0

    @model_validator(mode="after")
    def _needs(self) -> "RewardSourceConfig":
        if self.kind == "function" and (not self.function or ":" not in self.function):
            raise ValueError("reward source kind 'function' needs function: 'module:function'")
        if self.kind == "judge" and not self.judge:
            raise ValueError("reward source kind 'judge' needs judge: <name under rlaif.judges>")
        return self


def _check_location(value: str | None) -> str | None:
    if value is not None:
        model_location(value)  # raises with the folder it looked at
    return value


class PolicySourceConfig(_Section):
    """A policy PPO starts from that this run did not train (``ppo.policy``): a causal LM folder or hub name.

    Its tokenizer comes from ``tokenizer`` (a folder or hub name) or else from ``path``; the chat
    template in force is ``chat.template`` or the tokenizer's own (none: the run stops and says so).
    """

    path: str = Field(description="Folder or hub name (org/name or hub:org/name) of the policy's weights.")
    tokenizer: str | None = Field(None, description="Folder or hub name of its tokenizer (default: path).")

    @field_validator("path", "tokenizer")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        return _check_location(value)


class RewardModelSourceConfig(_Section):
    """A reward model this run did not train (``ppo.reward_model``): any ``AutoModelForSequenceClassification``
    with one label, folder or hub name.

    One the ``rm`` stage trained (its ``model/``) is read at its trained position: the generated token ids
    themselves when its tokenizer and chat format equal the policy's, else the decoded text in its own
    chat template (``chat_template``, else its tokenizer's own). Any other is read as transformers reads
    it: the decoded text in its whole chat-template render, the model's own pooling. The manifest records
    which (``reward_model_read``, ``rm_scoring``); ``stages.scoring.reward_reading`` decides.
    """

    path: str = Field(description="Folder or hub name (org/name or hub:org/name) of the reward model.")
    tokenizer: str | None = Field(None, description="Folder or hub name of its tokenizer (default: path).")
    chat_template: str | None = Field(
        None, description="Its chat template: Jinja text, a file, 'chatml' or 'raw' (default: its tokenizer's own).")
    max_length: int | None = Field(
        None, gt=8,
        description="Longest sequence it scores; longer ones keep their last tokens (default: rm.max_length).")

    @field_validator("path", "tokenizer")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        return _check_location(value)


class PPOConfig(_Section):
    """PPO defaults follow one recipe: DESIGN §4, which is the N+ implementation details of RLHF with PPO
    (Huang et al. 2024, the TL;DR summarisation case study) except where docs/PPO.md lists otherwise.

    Models: the policy comes from the ``sft`` stage (``policy_from: sft``), the base model (``base``), or
    a model you bring (``policy``: folder or hub name; sets ``policy_from: path``). The reward model is
    the ``rm`` stage's, or one you bring (``reward_model``). The critic starts from the reward model
    (``critic_from: rm``), from the policy with a fresh value head (``policy``), or from a folder / hub
    name; ``auto`` picks ``rm`` when the run has a reward model sharing the policy's tokenizer, else
    ``policy``.
    """

    data: DataSource | None = None
    eval_data: DataSource | None = None
    policy_from: Literal["sft", "base", "path"] = Field(
        "sft", description="sft: the sft stage's model; base: model.*; path: ppo.policy (set by giving ppo.policy).")
    policy: PolicySourceConfig | None = Field(None, description="A policy you bring (folder or hub name).")
    reward_model: RewardModelSourceConfig | None = Field(
        None, description="A reward model you bring; used by kind 'rm' sources instead of the rm stage's.")
    critic_from: str = Field(
        "auto", description="auto | rm | policy | <folder or hub name of a model with the policy's tokenizer>.")
    rewards: list[RewardSourceConfig] = Field(default_factory=lambda: [RewardSourceConfig()])
    total_episodes: int = Field(256, gt=0)
    episodes_per_rollout: int = Field(
        16, gt=0, description="Episodes (one prompt, one sampled response) per rollout per device: "
                              "episodes_per_rollout / num_samples_per_prompt prompts, each sampled "
                              "num_samples_per_prompt times. Formerly rollout_batch_size (still read, with a "
                              "warning): OpenRLHF's rollout_batch_size counts prompts over all devices.")
    mini_batch_size: int = Field(8, gt=0, description="Episodes per optimizer step per device.")
    gradient_accumulation_steps: int = Field(1, gt=0)
    ppo_epochs: int = Field(1, gt=0)
    max_prompt_length: int = Field(128, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature; the log-probs used for ratios and KL are taken at the "
                               "same temperature (logits / temperature), so it is the policy being optimised.")
    top_k: int = Field(0, ge=0, description="Must stay 0: top-k filtering would change the sampling distribution "
                                            "but not the log-probs used for ratios and KL (refused).")
    top_p: float = Field(1.0, gt=0, le=1, description="Must stay 1: nucleus filtering would change the sampling "
                                                      "distribution but not the log-probs used for ratios and KL "
                                                      "(refused).")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k1", description="Per-token KL estimate to the reference. In the reward (default): k1 = logp - ref "
                          "(unbiased) or k3 (non-negative, lower variance); k2 works but is biased. As a loss "
                          "(kl_in_loss): k2 = 0.5 * (logp - ref)^2 (its gradient is the on-policy gradient of "
                          "KL(pi || ref)) or k3; k1 is refused there, its gradient does not depend on the reference.")
    kl_in_loss: bool = Field(False, description="Move the beta * KL term from the reward into the policy loss "
                                                "(needs kl_estimator k2 or k3).")
    kl_coef: float = Field(0.05, ge=0)
    adaptive_kl: bool = False
    target_kl: float = Field(6.0, gt=0)
    kl_horizon: int = Field(10000, gt=0)
    normalize_reward: bool = False
    reward_clip: float | None = Field(None, gt=0)
    missing_eos_penalty: float | None = Field(
        1.0, description="Subtracted from the sequence reward of a response that ends without eos (its absolute "
                         "value: 1 and -1 mean the same); 0 or null turns it off. Applied after normalisation "
                         "and clipping, so on the normalised scale when normalize_reward is on.")
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = Field(
        "gae", description="gae: PPO with a critic (GAE, gamma/lam). Critic-free (no critic is built or loaded; "
                           "critic_from, vf_coef, cliprange_value, critic_warmup_steps unused): grpo: each "
                           "prompt's num_samples_per_prompt samples, A = (r - group mean) / (group std + eps); "
                           "rloo: A = r - mean of the prompt's other samples (leave-one-out, no std); "
                           "reinforce_pp: REINFORCE++, per-token rewards (-beta * KL_t, score at the end), "
                           "A_t = reward-to-go whitened over the global batch (a global baseline). With the KL in "
                           "the reward, grpo/rloo normalise the task score alone and add the KL's reward-to-go "
                           "-beta * sum_{s>=t} KL_s at its own scale; kl_in_loss (k2/k3) works with all four. "
                           "See docs/PPO.md.")
    num_samples_per_prompt: int = Field(
        1, ge=1, description="Responses sampled per prompt (K). episodes_per_rollout counts episodes, so each "
                             "rollout takes episodes_per_rollout / K prompts per device; grpo and rloo need K >= 2.")
    group_std_eps: float = Field(1e-6, gt=0, description="grpo: added to the group std.")
    whiten_advantages: bool = Field(
        True, description="Whiten advantages over the global batch (gae; reinforce_pp always does: it is its "
                          "baseline). grpo is normalised per group and rloo is used as it is.")
    ratio_skip_threshold: float = Field(10.0, gt=1, description="Skip minibatches whose max ratio exceeds this.")
    critic_warmup_steps: int = Field(
        0, ge=0, description="First PPO steps in which only the critic trains; the actor's learning-rate "
                             "schedule spans only the steps after them.")
    ptx_coef: float = Field(0.0, ge=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    log_samples_every: int = Field(10, gt=0)
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    train: PPOTrainConfig = Field(default_factory=PPOTrainConfig)
    eval_steps: int | None = Field(
        None, gt=0, description="Score eval_data prompts every N steps (always before and after training).")
    ptx_data: DataSource | None = Field(
        None, description="SFT data for the PTX loss when ptx_coef > 0 (default: sft.data).")

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        """Old flat optimisation keys (``ppo.learning_rate``) are read as ``ppo.train.<key>``, with a note
        saying so; ``ppo.reward_from`` (never read: the reward is ``ppo.rewards``) is dropped, with a note."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        notes = []
        if "reward_from" in data:
            data.pop("reward_from")
            notes.append("ppo.reward_from is removed (it was never read; reward sources are ppo.rewards): delete it")
        if "rollout_batch_size" in data:
            if "episodes_per_rollout" in data:
                raise ValueError("ppo.rollout_batch_size and ppo.episodes_per_rollout are both set: "
                                 "keep ppo.episodes_per_rollout only (the new name of the same setting)")
            data["episodes_per_rollout"] = data.pop("rollout_batch_size")
            notes.append(RENAMED_ROLLOUT_BATCH_SIZE.format(value=data["episodes_per_rollout"]))
        moved = [key for key in PPO_TRAIN_KEYS if key in data]
        if moved:
            train = data.get("train") or {}
            train = dict(train.model_dump(exclude_unset=True) if isinstance(train, BaseModel) else train)
            for key in moved:
                if key in train:
                    raise ValueError(f"ppo.{key} and ppo.train.{key} are both set: keep ppo.train.{key} only")
                train[key] = data.pop(key)
            data["train"] = train
            notes.append("moved under ppo.train (read as such; write them there): "
                         + ", ".join(f"ppo.{k} -> ppo.train.{k}" for k in moved))
        for note in notes:
            warnings.warn(f"config: {note}", FutureWarning, stacklevel=2)
        return data

    @model_validator(mode="before")
    @classmethod
    def _policy_implies_path(cls, data: Any) -> Any:
        """Giving ``ppo.policy`` means the policy comes from it (``policy_from: path``) unless said otherwise."""
        if isinstance(data, dict) and data.get("policy") is not None and "policy_from" not in data:
            data = {**data, "policy_from": "path"}
        return data

    @model_validator(mode="after")
    def _model_sources(self) -> "PPOConfig":
        if self.policy_from == "path" and self.policy is None:
            raise ValueError("ppo.policy_from='path' needs ppo.policy: {path: <folder or hub name>}")
        if self.policy is not None and self.policy_from != "path":
            raise ValueError(f"ppo.policy is set but ppo.policy_from={self.policy_from!r}: the policy would not come "
                             "from it. Drop ppo.policy_from (giving ppo.policy implies 'path') or drop ppo.policy")
        if self.critic_from not in ("auto", "rm", "policy"):
            _check_location(self.critic_from)
        return self

    @model_validator(mode="after")
    def _checks(self) -> "PPOConfig":
        if self.train.precision == "fp16":
            raise ValueError("ppo.train.precision='fp16' is refused: PPO diverges in fp16; use 'bf16' or 'fp32'")
        if self.episodes_per_rollout % self.mini_batch_size:
            raise ValueError(
                f"ppo.episodes_per_rollout ({self.episodes_per_rollout}) must be divisible by "
                f"ppo.mini_batch_size ({self.mini_batch_size})"
            )
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"ppo.mini_batch_size ({self.mini_batch_size}) must be divisible by "
                f"ppo.gradient_accumulation_steps ({self.gradient_accumulation_steps})"
            )
        if self.top_k != 0 or self.top_p != 1.0:
            key = f"ppo.top_k={self.top_k}" if self.top_k != 0 else f"ppo.top_p={self.top_p}"
            raise ValueError(
                f"{key} is refused: top-k/top-p filtering changes the distribution the rollout samples from "
                "but not the log-probs used for the ratio and the KL, so the data would "
                "come from another policy than the one optimised. Use ppo.top_k=0 and ppo.top_p=1 (ppo.temperature "
                "is supported: the log-probs use it too)")
        if self.advantage_estimator in ("grpo", "rloo") and self.num_samples_per_prompt < 2:
            raise ValueError(
                f"ppo.advantage_estimator={self.advantage_estimator!r} needs ppo.num_samples_per_prompt >= 2 (its "
                f"baseline is the other samples of the same prompt), got {self.num_samples_per_prompt}. Set "
                "ppo.num_samples_per_prompt (e.g. 4), or use advantage_estimator gae or reinforce_pp")
        if self.episodes_per_rollout % self.num_samples_per_prompt:
            raise ValueError(
                f"ppo.episodes_per_rollout ({self.episodes_per_rollout}) must be divisible by "
                f"ppo.num_samples_per_prompt ({self.num_samples_per_prompt}): it counts episodes, whole groups")
        if not self.uses_critic:
            if self.critic_warmup_steps:
                raise ValueError(f"ppo.critic_warmup_steps={self.critic_warmup_steps} but "
                                 f"ppo.advantage_estimator={self.advantage_estimator!r} has no critic; set it to 0")
            if self.critic_from != "auto":
                raise ValueError(f"ppo.critic_from={self.critic_from!r} but ppo.advantage_estimator="
                                 f"{self.advantage_estimator!r} builds no critic; drop ppo.critic_from")
        if self.kl_in_loss and self.kl_estimator == "k1":
            raise ValueError(
                "ppo.kl_in_loss=true with ppo.kl_estimator='k1' is refused: the gradient of the k1 estimate "
                "(logp - ref_logp) does not depend on the reference, so the loss would not pull the policy "
                "towards it. Set ppo.kl_estimator to 'k2' (or 'k3') with kl_in_loss, or keep the KL in the reward")
        return self

    @property
    def uses_critic(self) -> bool:
        """Whether the advantage estimator needs a critic (only ``gae``)."""
        return self.advantage_estimator == "gae"

    def sizes(self, world_size: int) -> PPOSizes:
        """Every derived batch size, computed here once (trainer, memory planner and orchestrator use it)."""
        total_steps = max(1, math.ceil(self.total_episodes / (self.episodes_per_rollout * world_size)))
        n_minibatches = self.episodes_per_rollout // self.mini_batch_size
        return PPOSizes(
            world_size=world_size, episodes_per_rollout=self.episodes_per_rollout,
            global_batch=self.episodes_per_rollout * world_size, mini_batch=self.mini_batch_size,
            grad_accum=self.gradient_accumulation_steps,
            micro_batch=self.mini_batch_size // self.gradient_accumulation_steps,
            n_minibatches=n_minibatches, total_steps=total_steps,
            optimizer_steps=total_steps * self.ppo_epochs * n_minibatches)


class JudgeConfig(_Section):
    """An AI judge. kind: hf (local causal LM), http (OpenAI-compatible), function (module:function)."""

    kind: Literal["hf", "http", "function"] = "hf"
    model: str | None = Field(None, description="hf: 'base', 'sft' or a folder; http: the served model name.")
    base_url: str | None = None
    api_key_env: str | None = Field(None, description="Name of the environment variable holding the API key.")
    function: str | None = None
    constitution: str | None = "configs/constitutions/default.yaml"
    principles: Literal["sample", "all"] = "sample"
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(4, ge=0)
    concurrency: int = Field(4, gt=0)
    cache: bool = True


class RLAIFLabelConfig(_Section):
    data: DataSource | None = None
    judge: str = "default"
    num_responses: int = Field(2, ge=2)
    max_prompt_length: int = Field(128, gt=0)
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(1.0, gt=0)
    batch_size: int = Field(8, gt=0)
    seed: int = 0
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (None: torch default).")


class BestOfNConfig(_Section):
    """``best_of_n``: rejection sampling. For each prompt of ``data`` the policy (``policy_from``: the sft
    stage's model or the base) samples ``n`` responses; every reward source scores them; the best is kept
    (only when its score is >= ``threshold``, if set) and written as SFT data (``messages``) with its score
    and provenance to ``best_of_n/data.jsonl``, which an ``sft`` stage of a next run trains on (RAFT/ReST:
    see docs/PPO.md)."""

    data: DataSource | None = None
    policy_from: Literal["sft", "base"] = "sft"
    n: int = Field(4, ge=1, description="Responses sampled per prompt.")
    threshold: float | None = Field(None, description="Keep the best response only when its score is >= this.")
    require_eos: bool = Field(True, description="Only responses that ended with eos (finished) are candidates.")
    max_prompt_length: int = Field(128, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    rewards: list[RewardSourceConfig] = Field(
        default_factory=list, description="Reward sources (as ppo.rewards: rm, function, judge); required.")
    batch_size: int = Field(8, gt=0, description="Prompts per generate call (each gives n sequences).")
    seed: int = 0
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (None: torch default).")


class TeacherConfig(_Section):
    """The ``distill`` teacher. kind: ``hf`` (a causal LM folder or hub name in ``model``), ``stage`` (a
    complete stage folder of an earlier run in ``path``, e.g. outputs/big/ppo: its model/ and tokenizer),
    ``http`` (an OpenAI-compatible endpoint at ``base_url`` serving ``model``; key from ``api_key_env``)."""

    kind: Literal["hf", "stage", "http"] = "hf"
    model: str | None = Field(None, description="hf: folder or hub name ('base', the default for hf: this run's "
                                                "model.*); http: the served model name.")
    path: str | None = Field(None, description="stage: a stage folder (outputs/<run>/<stage>) with model/.")
    base_url: str | None = Field(None, description="http: the API base, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str | None = Field(None, description="http: environment variable holding the API key.")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)
    backoff_s: float = Field(0.5, ge=0, description="http: first retry delay (doubles per retry, jittered).")
    concurrency: int = Field(4, gt=0, description="http: requests in flight.")

    @model_validator(mode="before")
    @classmethod
    def _hf_model_defaults_to_base(cls, data: Any) -> Any:
        """An hf teacher without ``model`` is this run's base model, however much of the section is given
        (``distill.teacher.timeout_s=30`` alone keeps it)."""
        if isinstance(data, dict) and data.get("kind", "hf") == "hf" and data.get("model") is None:
            data = {**data, "model": "base"}
        return data

    @model_validator(mode="after")
    def _needs(self) -> "TeacherConfig":
        need = {"hf": "model", "stage": "path", "http": "base_url"}[self.kind]
        if not getattr(self, need):
            raise ValueError(f"distill.teacher kind {self.kind!r} needs {need}")
        return self


class TokenLevelDistillConfig(_Section):
    """``distill.token_level``: logit distillation in the ``sft`` stage (stages/kd.py). The student's loss on
    each response token becomes (1 - weight) x cross-entropy + weight x the divergence between the teacher's
    and the student's next-token distributions. The teacher is ``distill.teacher`` (hf or stage: it must
    share the student's vocabulary; an http teacher gives no logits)."""

    enabled: bool = False
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl: KL(teacher||student); reverse_kl: KL(student||teacher); jsd: "
                                  "generalized Jensen-Shannon with the teacher's weight beta (GKD).")
    beta: float = Field(0.5, gt=0, lt=1, description="jsd: the teacher's weight in the mixture (0 < beta < 1).")
    temperature: float = Field(1.0, gt=0, description="Both logit sets are divided by it; the divergence is "
                                                      "multiplied by its square.")
    weight: float = Field(0.5, ge=0, le=1, description="The divergence's share of the loss; 1 - weight goes to "
                                                       "the cross-entropy on the data's tokens.")


class DistillConfig(_Section):
    """``distill``: sequence-level distillation. A teacher answers every prompt of ``data``; the answers
    (cached per prompt, so a re-run asks nothing twice), filtered by ``filter`` reward sources when set
    (kept: total score >= ``threshold``), become SFT data with provenance in ``distill/data.jsonl``. With
    ``distill`` and ``sft`` in one run, the sft stage trains on that file instead of ``sft.data``."""

    data: DataSource | None = None
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    max_new_tokens: int = Field(128, gt=0)
    temperature: float = Field(0.0, ge=0, description="0: greedy; else plain sampling (no top-k/top-p).")
    max_prompt_length: int = Field(256, gt=0, description="hf/stage teachers: longer prompts are skipped.")
    batch_size: int = Field(8, gt=0, description="Prompts per generate call (hf/stage) or per cache flush (http).")
    filter: list[RewardSourceConfig] = Field(
        default_factory=list, description="Reward sources / verifiers (as ppo.rewards); empty: keep every answer.")
    threshold: float = Field(0.5, description="With a filter: keep an answer whose weighted score is >= this.")
    require_eos: bool = Field(False, description="Drop answers the teacher did not finish (cut at max_new_tokens).")
    cache: bool = Field(True, description="Cache answers per prompt in distill/answers.sqlite (resume, re-run).")
    seed: int = 0
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (None: torch default).")
    token_level: TokenLevelDistillConfig = Field(
        default_factory=TokenLevelDistillConfig, description="Logit distillation in the sft stage (off by default).")


class VLLMRolloutConfig(_Section):
    """``rollout.vllm``: the vLLM worker (docs/ROLLOUT.md). It runs in its own process and environment
    (``make vllm-env`` builds ``.venv-vllm``), started and stopped by the stage, or one already running at
    ``base_url``."""

    python: str = Field(".venv-vllm/bin/python", description="The interpreter of the environment with vllm "
                                                            "installed (relative to the repository root or absolute).")
    base_url: str | None = Field(
        None, description="http://127.0.0.1:PORT of a worker already running (stages/rollout_backend/vllm_worker.py "
                          "--port PORT); then nothing is started or stopped.")
    startup_timeout_s: float = Field(900.0, gt=0, description="Seconds the worker may take to load the model.")
    request_timeout_s: float = Field(900.0, gt=0, description="Seconds one generate / weight-sync request may take.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Engine weight dtype; auto: model.dtype (float32 on CPU keeps greedy equal to hf).")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="Share of the GPU memory vLLM takes (the "
                                                                        "CPU build reads it as a share of the RAM).")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="KV cache size in GiB (vLLM's kv_cache_memory_bytes). Default: 2 on a host without "
                                "CUDA (else the CPU build reserves gpu_memory_utilization of the RAM), vLLM's own "
                                "sizing from gpu_memory_utilization on GPUs.")
    enforce_eager: bool = Field(True, description="No CUDA graphs / torch.compile (faster start, less memory).")
    max_model_len: int | None = Field(None, gt=0, description="Engine context length (default: the stage's longest "
                                                             "prompt + max_new_tokens).")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="More vllm.LLM(...) arguments (e.g. tensor_parallel_size: 2).")


class RolloutConfig(_Section):
    """``rollout``: which engine samples responses from a local model in ppo (all advantage estimators),
    rlaif_label, best_of_n and a distill hf/stage teacher. ``hf``: transformers ``generate`` in the stage's
    process (the default and the reference for correctness); ``vllm``: a vLLM worker process. Sampling is
    the stage's own settings either way (no model generation defaults); PPO's ratios and KL always use
    log-probs from the trainer's own forward pass, and with an engine PPO reweights each token's policy
    loss by the engine-to-trainer probability ratio (``importance_sampling``; docs/ROLLOUT.md)."""

    backend: Literal["hf", "vllm"] = "hf"
    vllm: VLLMRolloutConfig = Field(default_factory=VLLMRolloutConfig)
    importance_sampling: Literal["auto"] | bool = Field(
        "auto", description="PPO with a rollout engine: multiply each response token's policy loss by the truncated "
                            "importance weight min(exp(old_logp - engine_logp), importance_sampling_cap), which "
                            "corrects for the engine sampling from a slightly different distribution than the "
                            "trainer's forward pass (bf16 kernels, another implementation). auto: on unless "
                            "backend is hf (hf samples with the trainer's own model: nothing to correct; true "
                            "with hf is refused); true / false (YAML's on / off) force it.")
    importance_sampling_cap: float = Field(
        2.0, ge=1, description="Largest importance weight (verl's rollout_is_threshold and OpenRLHF's "
                               "vllm_is_truncated_threshold default to 2; TRL's clip_max to 3).")
    engine_logp_warn: float | None = Field(
        0.05, gt=0, description="Warn once when a PPO step's rollout_engine_logp_diff (mean |engine log-prob - "
                                "trainer log-prob| per response token) exceeds this: at 0.05 a token's ratio "
                                "starts about 5% from 1 before any update, a quarter of the default cliprange "
                                "(SmolLM2-135M with bf16 weights against fp32 measured 0.040). null: never warn.")

    @property
    def uses_importance_sampling(self) -> bool:
        """Whether PPO weights its policy loss by truncated importance weights (``importance_sampling``)."""
        if self.importance_sampling == "auto":
            return self.backend != "hf"
        return self.importance_sampling

    @model_validator(mode="after")
    def _importance_sampling_needs_an_engine(self) -> "RolloutConfig":
        if self.importance_sampling is True and self.backend == "hf":
            raise ValueError("rollout.importance_sampling=true with rollout.backend='hf' is refused: hf samples with "
                             "the trainer's own model, there are no engine log-probs to correct for. Use auto or "
                             "false, or rollout.backend: vllm")
        return self

    @model_validator(mode="after")
    def _worker_reachable(self) -> "RolloutConfig":
        if self.backend == "vllm" and self.vllm.base_url is None:
            python = Path(self.vllm.python)
            python = python if python.is_absolute() else REPO_ROOT / python
            if not python.exists():
                raise ValueError(f"rollout.backend is 'vllm' but rollout.vllm.python={self.vllm.python} does not "
                                 "exist: run `make vllm-env` (builds .venv-vllm), point rollout.vllm.python at an "
                                 "interpreter with vllm installed, or set rollout.vllm.base_url to a running worker")
        return self


class RLAIFConfig(_Section):
    judges: dict[str, JudgeConfig] = Field(default_factory=lambda: {"default": JudgeConfig()})


class LaunchConfig(_Section):
    """How each stage process is started."""

    launcher: Literal["local", "torchrun", "deepspeed"] = "local"
    nproc_per_node: int = Field(1, gt=0)
    nnodes: int = Field(1, gt=0)
    master_addr: str | None = None
    master_port: int = Field(29500, gt=0, lt=65536)
    rdzv_backend: Literal["c10d", "static"] = "c10d"
    gpu_memory_gib: float | None = Field(None, gt=0, description="Per-device memory for the planner.")
    offload: bool = False
    cpu_wait_policy: Literal["passive", "inherit"] = Field(
        "passive", description="CPU stage processes: 'passive' sets OMP_WAIT_POLICY=PASSIVE and KMP_BLOCKTIME=0 "
        "(idle OpenMP threads sleep instead of spinning on cores other processes need); 'inherit' leaves them.")
    cpu_threads: int | Literal["available", "inherit"] = Field(
        "available", description="CPU stage processes: OMP_NUM_THREADS = the cores this process may use "
        "(CPU affinity and cgroup quota) / processes per node ('available'), a number, or 'inherit'. "
        "Variables already set in the environment win; a stage's train.num_threads overrides in-process.")


class SlurmConfig(_Section):
    partition: str | None = None
    account: str | None = None
    nodes: int = Field(1, gt=0)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int = Field(1, gt=0)
    mem: str | None = Field(None, description="e.g. '64G'")
    time: str = "01:00:00"
    extra_sbatch: list[str] = Field(default_factory=list)
    setup: list[str] = Field(default_factory=list, description="Shell lines run before the stage (module load ...).")


class ReportConfig(_Section):
    """What the run report evaluates: each policy against its parent on held-out prompts (DESIGN §6)."""

    eval_data: DataSource | None = Field(
        None, description="Held-out prompts (with a 'reference' column for the verifier). Default: "
                          "ppo.eval_data, else the tail of ppo.data.")
    n_prompts: int = Field(8, gt=0, description="How many held-out prompts both policies answer (greedy).")
    verifier: str | None = Field(
        None, description="A rule verifier of the task's ground truth, 'module:function' with the reward "
                          "function signature fn(prompts, responses, references) -> scores (higher is better).")
    batch_size: int = Field(16, gt=0, description="Generation batch size for the report's greedy answers.")
    icl_shots: int = Field(
        0, ge=0, description="Few-shot (ICL) baseline: the base model prompted with this many (user, assistant) "
                             "examples from sft.data (seeded, never a held-out prompt) is compared with SFT and "
                             "each policy in the verdict. 0: off.")

    @field_validator("verifier")
    @classmethod
    def _verifier_spec(cls, value: str | None) -> str | None:
        if value is not None and ":" not in value:
            raise ValueError(f"report.verifier must look like 'module:function', got {value!r}")
        return value


EVAL_TASKS_DIR = eval_tasks_dir()  # the lm-evaluation-harness tasks alignpipe ships (local data)


def eval_task_file(task: str) -> Path:
    """``eval.tasks`` entry -> its lm-evaluation-harness task YAML: a shipped task's name
    (``pipeline/eval_tasks/<name>.yaml``) or a path to a YAML file (relative to the repository root unless absolute)."""
    if task.endswith((".yaml", ".yml")):
        return resolve_path(task)
    return EVAL_TASKS_DIR / f"{task}.yaml"


class EvalConfig(_Section):
    """``python -m pipeline eval``: lm-evaluation-harness tasks on the base model and each complete policy
    stage (sft, ppo, dpo), offline: every task reads local files (pipeline/standard_eval.py)."""

    tasks: list[str] = Field(
        default_factory=lambda: ["gsm8k"], min_length=1,
        description="Shipped task names (pipeline/eval_tasks/<name>.yaml) or paths to lm-eval task YAML files.")
    limit: int | None = Field(
        None, gt=0, description="Score only the first N test records of each task (None: all of them).")
    num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples per question, drawn from the task's few-shot split (None: the "
                                "task file's num_fewshot).")
    batch_size: int = Field(8, gt=0, description="Questions per generate call.")
    max_gen_toks: int = Field(256, gt=0, description="Most tokens generated per answer.")
    apply_chat_template: bool = Field(
        False, description="Render each question (and the few-shot examples, as earlier turns) with the model's "
                           "chat template and chat.system_prompt; false: plain text, as lm-eval's default.")
    data: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Per task, split -> local file replacing the task file's "
                                          "dataset_kwargs.data_files entry, e.g. {gsm8k: {test: path}}.")
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (None: torch default).")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        shipped = sorted(p.stem for p in EVAL_TASKS_DIR.glob("*.yaml"))
        for task in tasks:
            if not eval_task_file(task).is_file():
                raise ValueError(f"unknown eval task {task!r} (looked at {eval_task_file(task)}); shipped tasks: "
                                 f"{', '.join(shipped) or 'none'}, or give the path of an lm-eval task YAML file")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"eval.tasks lists a task twice: {tasks}")
        return tasks

    @model_validator(mode="after")
    def _data_names_a_task(self) -> "EvalConfig":
        for task in self.data:
            if task not in self.tasks:
                raise ValueError(f"eval.data.{task}: {task!r} is not among eval.tasks {self.tasks}")
        return self


class PathsConfig(_Section):
    """Where relative paths resolve (pipeline/paths.py). Recorded when a config file is loaded; the resolved
    config carries it to the stage processes. Not part of any stage's identity."""

    config_dir: str | None = Field(
        None, description="Relative input paths are looked up here first, then in work_dir, then among "
                          "alignpipe's shipped files (default: the config file's folder).")
    work_dir: str | None = Field(
        None, description="output_root and model.cache_dir are relative to this folder (default: the working "
                          "directory the command started in).")


class RunConfig(_Section):
    """The whole run. See configs/tiny.yaml and configs/demo.yaml."""

    run_name: str = "run"
    output_root: str = "outputs"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    chat: ChatConfig = Field(default_factory=ChatConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rm: RMConfig = Field(default_factory=RMConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    rlaif_label: RLAIFLabelConfig = Field(default_factory=RLAIFLabelConfig)
    rlaif: RLAIFConfig = Field(default_factory=RLAIFConfig)
    best_of_n: BestOfNConfig = Field(default_factory=BestOfNConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    stages: list[Literal["sft", "rlaif_label", "rm", "ppo", "dpo", "best_of_n", "distill"]] = Field(
        default_factory=lambda: ["sft", "rm", "ppo"])
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or "/" in value or value.startswith("."):
            raise ValueError(f"run_name must be a plain folder name, got {value!r}")
        return value

    @property
    def world_size(self) -> int:
        """Processes the launch section starts (nnodes x nproc_per_node)."""
        return self.launch.nnodes * self.launch.nproc_per_node

    @model_validator(mode="after")
    def _global_batches(self) -> "RunConfig":
        world = self.world_size
        for name in ("sft", "rm", "dpo"):
            train = getattr(self, name).train
            if train.global_batch_size is None:
                continue
            actual = train.global_batch(world)
            if actual != train.global_batch_size:
                raise ValueError(
                    f"{name}.train.global_batch_size={train.global_batch_size} but per_device_batch_size "
                    f"({train.per_device_batch_size}) x gradient_accumulation_steps "
                    f"({train.gradient_accumulation_steps}) x world size ({world}, from launch) = {actual}"
                )
        return self

    @model_validator(mode="after")
    def _dpo_has_its_inputs(self) -> "RunConfig":
        """DPO needs preference data (dpo.data or rlaif_label's pairs) and its starting policy (before any
        model loads)."""
        if "dpo" not in self.stages:
            return self
        if self.dpo.data is None and "rlaif_label" not in self.stages:
            raise ValueError(
                "dpo.data is not set: point it at a preference file (prompt/chosen/rejected, HH transcripts, or "
                "prompt/responses/ranking) or hub:name, or add rlaif_label to the run's stages to train on "
                "AI-judged pairs of SFT samples")
        if self.dpo.init_from == "sft" and "sft" not in self.stages:
            raise ValueError(
                f"dpo.init_from is 'sft' but stages {self.stages} do not include 'sft'. Add 'sft' to stages (a "
                "complete stage of this run_name with the same config is skipped, not retrained), or set "
                "dpo.init_from: base")
        return self

    @model_validator(mode="after")
    def _ppo_has_its_models(self) -> "RunConfig":
        """PPO's reward sources, critic and policy must come from somewhere this run has, before any model loads."""
        if "ppo" not in self.stages:
            return self
        ppo = self.ppo
        reuse = ("(a complete stage of this run_name with the same config is skipped, not retrained, so listing "
                 "it costs nothing when it already ran)")
        needs_rm = [f"ppo.rewards[{i}] is kind 'rm'" for i, r in enumerate(ppo.rewards) if r.kind == "rm"]
        if ppo.critic_from == "rm":
            needs_rm.append("ppo.critic_from is 'rm'")
        if needs_rm and ppo.reward_model is None and "rm" not in self.stages:
            raise ValueError(
                f"{'; '.join(needs_rm)}, but this run has no reward model: stages {self.stages} do not include 'rm' "
                "and ppo.reward_model is not set. Add 'rm' to stages " + reuse + ", or set ppo.reward_model.path to "
                "a reward model folder or hub name, or use another reward source (kind: function / judge)")
        if ppo.policy_from == "sft" and "sft" not in self.stages:
            raise ValueError(
                f"ppo.policy_from is 'sft' but stages {self.stages} do not include 'sft'. Add 'sft' to stages " + reuse
                + ", or set ppo.policy.path to a policy folder or hub name, or ppo.policy_from: base")
        return self

    @model_validator(mode="after")
    def _best_of_n_has_its_models(self) -> "RunConfig":
        """best_of_n needs a reward source, and the stages its policy and RM come from."""
        if "best_of_n" not in self.stages:
            return self
        bon = self.best_of_n
        if not bon.rewards:
            raise ValueError("best_of_n.rewards is empty: best-of-N needs a reward source to pick the best, e.g. "
                             "best_of_n.rewards=[{kind: rm}] (with the rm stage) or [{kind: function, function: "
                             "'module:function'}] or [{kind: judge, judge: <name>}]")
        if bon.data is None:
            raise ValueError("best_of_n.data is not set: point it at a prompt file (a 'prompt' per record)")
        if any(r.kind == "rm" for r in bon.rewards) and "rm" not in self.stages:
            raise ValueError(f"best_of_n.rewards has a kind 'rm' source but stages {self.stages} do not include 'rm'")
        if bon.policy_from == "sft" and "sft" not in self.stages:
            raise ValueError(f"best_of_n.policy_from is 'sft' but stages {self.stages} do not include 'sft'; add it "
                             "or set best_of_n.policy_from: base")
        return self

    @model_validator(mode="after")
    def _distill_has_its_inputs(self) -> "RunConfig":
        """distill needs prompts; a filter of kind 'rm' needs the rm stage (it runs before distill)."""
        if "distill" not in self.stages:
            return self
        if self.distill.data is None:
            raise ValueError("distill.data is not set: point it at a prompt file (a 'prompt' per record)")
        if "sft" in self.stages and self.stages.index("sft") < self.stages.index("distill"):
            raise ValueError(f"stages {self.stages}: distill must come before sft (sft trains on its answers)")
        if any(r.kind == "rm" for r in self.distill.filter):
            raise ValueError("distill.filter has a kind 'rm' source, but distill runs before rm; filter with a "
                             "function (verifier 'module:function') or a judge")
        return self

    @model_validator(mode="after")
    def _token_level_distill_has_a_teacher(self) -> "RunConfig":
        """distill.token_level trains in the sft stage on a teacher's logits: sft must run, the teacher must be a
        model this process loads (hf/stage), not an endpoint. (Same vocabulary: checked by ``validate``/``run``
        before any stage starts, ``pipeline.models.model_source_problems``.)"""
        if not self.distill.token_level.enabled:
            return self
        if "sft" not in self.stages:
            raise ValueError(f"distill.token_level.enabled is true but stages {self.stages} do not include 'sft' "
                             "(the student learns the teacher's distribution in the sft stage); add sft or set "
                             "distill.token_level.enabled: false")
        if self.distill.teacher.kind == "http":
            raise ValueError("distill.token_level.enabled needs the teacher's logits, but distill.teacher.kind is "
                             "'http' (an endpoint returns text, not per-token distributions); use kind hf (a model "
                             "folder or hub name) or stage (a stage folder), or set distill.token_level.enabled: "
                             "false for sequence-level distillation only")
        return self

    @model_validator(mode="after")
    def _vllm_rollout_supports_the_policy(self) -> "RunConfig":
        """The vLLM backend syncs a PPO policy as full weights (full / freeze / gradual_unfreeze) or as a LoRA
        adapter (lora / rslora); other PEFT methods have no vLLM form."""
        if self.rollout.backend != "vllm" or "ppo" not in self.stages:
            return self
        method = self.ppo.tuning.method
        if method not in ("full", "freeze", "gradual_unfreeze", "lora", "rslora"):
            raise ValueError(f"rollout.backend 'vllm' with ppo.tuning.method={method!r} is not supported: the "
                             "engine takes the updated policy as full weights (full, freeze, gradual_unfreeze) or a "
                             "LoRA adapter (lora, rslora). Use one of those, or rollout.backend: hf")
        return self

    def run_dir(self) -> Path:
        return output_path(self.output_root) / self.run_name

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir() / stage

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------- loading
def _model_fields_at(path: list[str]) -> list[str]:
    """Valid keys of the section at dotted ``path`` (for 'did you mean' hints)."""
    model: Any = RunConfig
    for part in path:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            # dict[str, Section]: the next path part is a free key
            args = getattr(annotation, "__args__", ())
            model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if model is None:
                return []
    return list(getattr(model, "model_fields", {}))


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        key = ".".join(loc)
        if item["type"] == "extra_forbidden":
            valid = _model_fields_at(loc[:-1])
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{'.'.join(loc[:-1] + [close[0]])}'?" if close else ""
            valid_list = ", ".join(sorted(valid)) if valid else "?"
            lines.append(f"  unknown key '{key}'{hint} (valid keys here: {valid_list})")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            got = item.get("input")
            got_txt = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
            lines.append(f"  {key or '<root>'}: {msg}{got_txt}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], parsed YAML scalar)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. sft.train.max_steps=10)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: '{'.'.join(path[: i + 1])}' is a value, not a section"
                )
            node = child
        node[path[-1]] = value
    return data


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A config file (a path, or a shipped config's name: ``pipeline.paths.find_config``) as a mapping."""
    file = find_config(path)
    if file is None:
        raise ConfigError(config_not_found(path))
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config. Raises ConfigError with an actionable message."""
    data = apply_overrides(load_yaml(path), overrides or [])
    # relative paths resolve against the file's folder and the working directory (pipeline/paths.py), in this
    # process now and, through the resolved config, in the stage processes
    data["paths"] = {"config_dir": str(find_config(path).parent), "work_dir": str(Path.cwd()),
                     **(data.get("paths") or {})}
    use_bases(data["paths"]["config_dir"], data["paths"]["work_dir"])
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as err:
        source = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
        raise ConfigError(_format_validation_error(err, source)) from None
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    paths = data.get("paths") or {}
    use_bases(paths.get("config_dir"), paths.get("work_dir"))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
