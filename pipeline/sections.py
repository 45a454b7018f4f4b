"""The config sections several stages share: the base model and chat format, data sources, training and
tuning settings, reward sources, judges and the rollout engine.

Each stage's own section lives beside the stage, in its declaration module (``stages/<package>/config.py``,
``stages/<stage>_config.py``), built from these; ``pipeline/config.py`` assembles the run config from the
registry. Every section is a pydantic model with ``extra="forbid"`` (a misspelled key is an error naming
the closest valid one) and every field has a description (docs/CONFIG.md is generated from them).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .paths import PACKAGE_ROOT, resolve_path
from .registry import TrainingShape


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def describe(model: type[BaseModel]) -> str:
    """A section's description in its parent: the first paragraph of its docstring, on one line."""
    return " ".join((model.__doc__ or model.__name__).strip().split("\n\n")[0].split())


#: ``json_schema_extra`` flag of a setting added after run folders were written without it (:func:`added_setting`).
ADDED_SETTING = "alignpipe_added_setting"


def added_setting(default: Any, **field: Any) -> Any:
    """A field for a setting added to an existing section: at its default it is left out of the stage identity
    (``pipeline.stage.stage_section``), so stages made before it existed, which ran exactly as the default
    runs, stay up to date; set to anything else it is hashed like any setting."""
    return Field(default, json_schema_extra={ADDED_SETTING: True}, **field)


def drop_added_defaults(model: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    """``dumped`` (``model``'s JSON dump) without the :func:`added_setting` fields that hold their default, in
    ``model`` and the sections inside it."""
    out = dict(dumped)
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get(ADDED_SETTING) and name in out and value == info.get_default(call_default_factory=True):
            del out[name]
        elif isinstance(value, BaseModel) and isinstance(out.get(name), dict):
            out[name] = drop_added_defaults(value, out[name])
    return out


def section(model: type[BaseModel], description: str | None = None) -> Any:
    """A field holding the section ``model`` (default: its defaults), described by its docstring."""
    return Field(default_factory=model, description=description or describe(model))


# --------------------------------------------------------------------------------------------- model
class TinyModelConfig(Section):
    """A tiny random Llama plus a byte-level BPE tokenizer trained locally (cached; for tests)."""

    hidden_size: int = Field(64, gt=0, description="Width of the hidden states.")
    num_layers: int = Field(2, gt=0, description="Decoder layers.")
    num_heads: int = Field(4, gt=0, description="Attention heads (must divide hidden_size).")
    num_kv_heads: int = Field(2, gt=0, description="Key/value heads (grouped-query attention; must divide num_heads).")
    intermediate_size: int = Field(128, gt=0, description="Width of the MLP's hidden layer.")
    vocab_size: int = Field(512, ge=300, description="Vocabulary of the locally trained tokenizer.")
    max_position_embeddings: int = Field(512, gt=0, description="Longest sequence the model takes.")
    seed: int = Field(0, description="Seed of the random weights.")

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads}")
        return self


class ModelConfig(Section):
    """Where the base model comes from.

    source:
      - ``tiny``: built from ``tiny`` (config + locally trained tokenizer), cached under ``cache_dir``.
      - ``local``: a Hugging Face folder at ``path``.
      - ``hub``: a hub name at ``path`` (needs network; honours HF_HUB_OFFLINE).
      - ``gguf``: a GGUF file; ``path`` is the folder (or ``package`` names an installed Python package
        whose folder holds it) and ``gguf_file`` the file name. Converted once to safetensors and cached.
    """

    source: Literal["tiny", "local", "hub", "gguf"] = Field(
        "tiny", description="tiny (built locally, for tests), local (a folder at path), hub (a hub name at path) or "
                            "gguf (a GGUF file: path or package, and gguf_file).")
    path: str | None = Field(None, description="local: the model folder; hub: org/name; gguf: the folder of the file.")
    package: str | None = Field(None, description="gguf: an installed Python package whose folder holds the file.")
    gguf_file: str | None = Field(None, description="gguf: the file name (converted once to safetensors, cached).")
    revision: str | None = Field(None, description="hub: a branch, tag or commit (default: the main branch).")
    hub_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$",
        description="The hub id (org/name) this base corresponds to when it is a local or GGUF copy: the model "
                    "cards' base_model. A hub source names it already.")
    trust_remote_code: bool = Field(False, description="Let transformers run the model's own code (hub models only).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Weight dtype the stages load the model in (auto: the checkpoint's).")
    tiny: TinyModelConfig = section(TinyModelConfig)
    cache_dir: str = Field(".cache/alignpipe", description="Where built (tiny) and converted (gguf) bases are cached; "
                                                           "relative to the working directory.")
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


class ChatConfig(Section):
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
class DataSource(Section):
    """A data set: a local file (.jsonl/.json/.csv/.parquet, optionally .gz) or ``hub:org/name``.

    ``columns`` maps our field names (messages, prompt, completion, chosen, rejected, responses,
    ranking, margin) to the source's columns. A value is a column name or dotted path
    (``instances.0.output``), or a format string with ``{dotted.path}`` fields
    (``"{instruction}\\n\\n{instances.0.input}"``).
    """

    path: str = Field(description="A local file (relative to the config file's folder, the working directory, "
                                  "then alignpipe's shipped files) or hub:org/name.")
    split: str = Field("train", description="hub data sets: the split to read.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Our field name -> the source's column, dotted path or format string "
                                          "(e.g. {prompt: question, reference: answer}).")
    max_records: int | None = Field(None, gt=0, description="Read only the first N records (None: all).")
    max_bad_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Skip (and count) malformed records up to this share of the file; "
                                         "0: the first one is an error naming its file and line.")

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str) -> str:
        if value.startswith("hub:"):
            return value
        resolved = resolve_path(value)
        if not resolved.exists():
            raise ValueError(f"data file not found: {value} (looked at {resolved})")
        return value


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


def check_location(value: str | None) -> str | None:
    """A field validator: ``value`` (when set) names an existing folder or a hub name (``model_location``)."""
    if value is not None:
        model_location(value)  # raises with the folder it looked at
    return value


def deepspeed_exists(value: str | None) -> str | None:
    """A field validator: ``value`` (when set) is a DeepSpeed JSON that exists."""
    if value is not None and not resolve_path(value).exists():
        raise ValueError(f"DeepSpeed config not found: {value}")
    return value


# ------------------------------------------------------------------------------------------ training
class TrainConfig(Section):
    """Optimisation settings of the stages on the shared engine (``sft.train``; ``rm.train`` and
    ``dpo.train`` are subclasses that change only default values)."""

    epochs: float = Field(1.0, gt=0, description="Passes over the training data (fractions allowed).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs when set.")
    per_device_batch_size: int = Field(8, gt=0, description="Rows (SFT) or pairs (RM, DPO) per micro-batch per device.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    global_batch_size: int | None = Field(
        None, gt=0, description="If set, must equal per_device_batch_size x grad accumulation x world size."
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW (after warm-up).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of the steps with a linear warm-up from 0.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Schedule of the learning rate after the warm-up.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient's global norm to this (None: off).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory, "
                                                            "about a third more compute).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 on CPU."
    )
    logging_steps: int = Field(1, gt=0, description="Write a metrics.jsonl row every N optimizer steps.")
    save_steps: int = Field(50, gt=0, description="Write a resumable checkpoint every N optimizer steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate on held-out data every N steps (and at the end).")
    seed: int = Field(0, description="Seed of the data order, new weights (LoRA, heads) and dropout.")
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
        return deepspeed_exists(value)

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


class PreferenceSection(Section):
    """The settings the stages that train on preference pairs share (``rm``, ``dpo``; stages/preferences.py)."""

    data: DataSource | None = Field(
        None, description="Preference pairs (prompt/chosen/rejected, HH transcripts, or prompt/responses/ranking); "
                          "unused when rlaif_label is in the run (its labelled pairs replace it).")
    eval_data: DataSource | None = Field(None, description="Held-out pairs (default: eval_fraction of data, split by "
                                                           "prompt).")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of prompts held out when eval_data is not set.")
    init_from: Literal["sft", "base"] = Field(
        "sft", description="Start from the sft stage's model or the base model (for dpo also the reference).")
    max_length: int = Field(512, gt=8, description="Tokens per sequence (prompt + response); prompts are cut from the "
                                                   "left, pairs that still do not fit are skipped (and counted).")


def check_global_batch(shape: TrainingShape, world: int) -> None:
    """A training stage's global batch size, when set (``TrainingShape.global_batch_size``), equals micro-batch x
    accumulation x the world size the launch section gives (the run config checks every stage's)."""
    if shape.global_batch_size is None:
        return
    actual = shape.micro_batch * shape.grad_accum * world
    if actual != shape.global_batch_size:
        raise ValueError(
            f"{shape.keys['global']}={shape.global_batch_size} but per_device_batch_size ({shape.micro_batch}) x "
            f"gradient_accumulation_steps ({shape.grad_accum}) x world size ({world}, from launch) = {actual}")


def engine_training(stage: str) -> Callable[[Any], TrainingShape]:
    """``StageSpec.training`` of a stage on the shared engine (sft, rm, dpo: ``<stage>.train``, ``.tuning``)."""

    def shape(cfg: Any) -> TrainingShape:
        section_ = getattr(cfg, stage)
        train = section_.train
        small = (f"{stage}.train.per_device_batch_size=1 {stage}.train.gradient_accumulation_steps="
                 f"{train.gradient_accumulation_steps * train.per_device_batch_size} "
                 f"{stage}.train.gradient_checkpointing=true")
        return TrainingShape(
            deepspeed=train.deepspeed, micro_batch=train.per_device_batch_size,
            grad_accum=train.gradient_accumulation_steps, learning_rate=train.learning_rate,
            precision=train.precision, max_grad_norm=train.max_grad_norm, tuning=section_.tuning,
            gradient_checkpointing=train.gradient_checkpointing, global_batch_size=train.global_batch_size,
            keys={"deepspeed": f"{stage}.train.deepspeed", "tuning": f"{stage}.tuning.method", "small_batch": small,
                  "global": f"{stage}.train.global_batch_size"})

    return shape



class TuningConfig(Section):
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
    ] = Field("full", description="full, freeze, gradual_unfreeze, or a PEFT method (lora, dora, rslora, qlora, "
                                  "adalora, ia3, prefix, prompt, ptuning, llama_adapter).")
    trainable_layers: int = Field(1, ge=0, description="freeze / gradual_unfreeze: top decoder layers trained "
                                                       "(at the start, for gradual_unfreeze).")
    trainable_modules: list[str] = Field(
        default_factory=list, description="freeze: also train parameters whose names contain one of these.")
    unfreeze_every_steps: int = Field(10, gt=0, description="gradual_unfreeze: optimizer steps between unfreezing "
                                                            "one more layer.")
    lora_r: int = Field(8, gt=0, description="LoRA family: rank of the update matrices.")
    lora_alpha: int = Field(16, gt=0, description="LoRA family: scale numerator (the update is scaled by alpha / r, "
                                                  "alpha / sqrt(r) for rslora).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA family: dropout on the adapter's input.")
    target_modules: list[str] | str = Field(
        "all-linear", description="PEFT: the modules adapted ('all-linear' or a list of module names).")
    adalora_target_r: int = Field(4, gt=0, description="adalora: average rank after the budget is pruned.")
    num_virtual_tokens: int = Field(8, gt=0, description="prefix / prompt / ptuning: virtual tokens learned.")
    adapter_len: int = Field(4, gt=0, description="llama_adapter: adaption prompt length.")
    adapter_layers: int = Field(1, gt=0, description="llama_adapter: top layers given the adaption prompt.")
    adapter_name: str = Field("default", description="PEFT: the adapter's name in adapter/.")

    @property
    def is_peft(self) -> bool:
        return self.method not in ("full", "freeze", "gradual_unfreeze")

    @property
    def is_lora_family(self) -> bool:
        return self.method in ("lora", "dora", "rslora", "qlora", "adalora")


# ----------------------------------------------------------------------------------- rewards, judges
class RewardSourceConfig(Section):
    """One term of a reward: the RM, a Python function ``module:function``, or an AI judge."""

    kind: Literal["rm", "function", "judge"] = Field(
        "rm", description="rm: the reward model; function: a Python function; judge: an AI judge.")
    function: str | None = Field(
        None, description="kind function: 'module:function' with fn(prompts, responses, references) -> scores.")
    judge: str | None = Field(None, description="Name of a judge defined under rlaif.judges.")
    weight: float = Field(1.0, description="Its weight in the summed reward.")

    @model_validator(mode="after")
    def _needs(self) -> "RewardSourceConfig":
        if self.kind == "function" and (not self.function or ":" not in self.function):
            raise ValueError("reward source kind 'function' needs function: 'module:function'")
        if self.kind == "judge" and not self.judge:
            raise ValueError("reward source kind 'judge' needs judge: <name under rlaif.judges>")
        return self


class JudgeConfig(Section):
    """An AI judge. kind: hf (local causal LM), http (OpenAI-compatible), function (module:function)."""

    kind: Literal["hf", "http", "function"] = Field(
        "hf", description="hf: a local causal LM; http: an OpenAI-compatible endpoint; function: module:function.")
    model: str | None = Field(None, description="hf: 'base', 'sft' or a folder; http: the served model name.")
    base_url: str | None = Field(None, description="http: the API base, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str | None = Field(None, description="Name of the environment variable holding the API key.")
    function: str | None = Field(None, description="function: 'module:function' judging a pair (or scoring one).")
    constitution: str | None = Field(
        "configs/constitutions/default.yaml", description="YAML file of the principles the judge applies (None: one "
                                                          "built-in helpfulness/harmlessness principle).")
    principles: Literal["sample", "all"] = Field(
        "sample", description="sample: one principle per prompt (seeded, as Constitutional AI); all: every principle.")
    timeout_s: float = Field(30.0, gt=0, description="http: seconds one request may take.")
    max_retries: int = Field(4, ge=0, description="http: retries of a failed or malformed request.")
    concurrency: int = Field(4, gt=0, description="http: requests in flight.")
    cache: bool = Field(True, description="Cache judgments (<output_root>/.judge_cache/judgments.sqlite, keyed by "
                                          "judge and rubric): a re-run asks nothing twice.")


class RLAIFConfig(Section):
    """``rlaif``: the AI judges, by name, that rlaif_label and reward sources of kind 'judge' use."""

    judges: dict[str, JudgeConfig] = Field(
        default_factory=lambda: {"default": JudgeConfig()}, description="Judge name -> its settings.")


# -------------------------------------------------------------------------------------------- rollout
class VLLMRolloutConfig(Section):
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


class RolloutConfig(Section):
    """``rollout``: which engine samples responses from a local model in ppo (all advantage estimators),
    rlaif_label, best_of_n and a distill hf/stage teacher. ``hf``: transformers ``generate`` in the stage's
    process (the default and the reference for correctness); ``vllm``: a vLLM worker process. Sampling is
    the stage's own settings either way (no model generation defaults); PPO's ratios and KL always use
    log-probs from the trainer's own forward pass, and with an engine PPO reweights each token's policy
    loss by the engine-to-trainer probability ratio (``importance_sampling``; docs/ROLLOUT.md)."""

    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers generate in the stage's process (the reference); vllm: a vLLM worker.")
    vllm: VLLMRolloutConfig = section(VLLMRolloutConfig)
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
            python = python if python.is_absolute() else PACKAGE_ROOT / python
            if not python.exists():
                raise ValueError(f"rollout.backend is 'vllm' but rollout.vllm.python={self.vllm.python} does not "
                                 "exist: run `make vllm-env` (builds .venv-vllm), point rollout.vllm.python at an "
                                 "interpreter with vllm installed, or set rollout.vllm.base_url to a running worker")
        return self
