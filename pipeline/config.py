"""Run configuration: one YAML file per run, validated before any model is loaded.

A run config has the sections every stage shares (the base model, the chat format, judges, the rollout
engine, launch, Slurm, logging, report, evaluation) and one section per stage. The stages' sections live
beside the stages (``stages/<package>/config.py``, ``stages/<stage>_config.py``) and the shared building
blocks in ``pipeline/sections.py``; ``run_config_model`` assembles the run's model from the stage registry
(``pipeline/registry.py``: the built-in stages and the config's ``extra_stages``). docs/CONFIG.md lists
every key (``python -m pipeline.config_doc``).

Every section is a pydantic model with ``extra="forbid"``, so a misspelled key is an error that names
the key, where it is, and the closest valid key. ``key=value`` overrides from the command line use
dotted paths (``sft.train.learning_rate=1e-4``) and are parsed as YAML scalars.

Loading is cheap (no torch import) so ``pipeline status`` and config validation stay fast.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator

from .paths import PACKAGE_ROOT, config_not_found, eval_tasks_dir, find_config, output_path, resolve_path, use_bases
from .preemption import parse_time_limit
from .registry import RegistryError, specs, stage_specs
from .sections import (  # noqa: F401  (re-exported: the shared sections' long-standing home)
    ChatConfig,
    DataSource,
    JudgeConfig,
    ModelConfig,
    RewardSourceConfig,
    RLAIFConfig,
    RolloutConfig,
    Section,
    TinyModelConfig,
    TrainConfig,
    TuningConfig,
    VLLMRolloutConfig,
    check_global_batch,
    model_location,
    section,
)

REPO_ROOT = PACKAGE_ROOT  # the folder holding pipeline/, stages/, data/, configs/ (pipeline/paths.py)
_Section = Section  # the name the sections below were written with


class ConfigError(ValueError):
    """A config file or override is invalid. The message names the file/key and what was expected."""


# --------------------------------------------------------------------------------------- run sections
class LoggingConfig(Section):
    """Where metrics go besides each stage's metrics.jsonl."""

    wandb: bool = Field(False, description="Also log to Weights & Biases (pip install wandb).")
    wandb_project: str = Field("alignpipe", description="The W&B project.")
    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="WANDB_MODE unless the environment sets it (offline: synced later with wandb sync).")
    tensorboard: bool = Field(False, description="Also write TensorBoard events into <stage>/tensorboard.")
    progress_bar: bool = Field(True, description="A progress bar per training stage on the console.")


class LaunchConfig(Section):
    """How each stage process is started."""

    launcher: Literal["local", "torchrun", "deepspeed"] = Field(
        "local", description="local: one process; torchrun or deepspeed: nproc_per_node processes per node.")
    nproc_per_node: int = Field(1, gt=0, description="Processes (devices) per node.")
    nnodes: int = Field(1, gt=0, description="Nodes (default: NNODES or SLURM_JOB_NUM_NODES when set).")
    master_addr: str | None = Field(None, description="Rendezvous host (default: MASTER_ADDR, else 127.0.0.1).")
    master_port: int = Field(29500, gt=0, lt=65536, description="Rendezvous port (default: MASTER_PORT when set; one "
                                                                "node under deepspeed: a free port).")
    rdzv_backend: Literal["c10d", "static"] = Field("c10d", description="torchrun's rendezvous backend.")
    gpu_memory_gib: float | None = Field(None, gt=0, description="Per-device memory for the planner.")
    offload: bool = Field(False, description="Read by nothing (older configs carry it): offload is set in the "
                                             "DeepSpeed JSON, e.g. configs/deepspeed/zero3_offload.json.")
    cpu_wait_policy: Literal["passive", "inherit"] = Field(
        "passive", description="CPU stage processes: 'passive' sets OMP_WAIT_POLICY=PASSIVE and KMP_BLOCKTIME=0 "
        "(idle OpenMP threads sleep instead of spinning on cores other processes need); 'inherit' leaves them.")
    cpu_threads: int | Literal["available", "inherit"] = Field(
        "available", description="CPU stage processes: OMP_NUM_THREADS = the cores this process may use "
        "(CPU affinity and cgroup quota) / processes per node ('available'), a number, or 'inherit'. "
        "Variables already set in the environment win; a stage's train.num_threads overrides in-process.")
    time_limit: int | str | dict[str, int | str] | None = Field(
        None, description="Wall-clock limit of each stage: a Slurm time ('01:30:00', '1-12:00:00', '90:00') or "
        "minutes, or a mapping from stage name to one. Written as #SBATCH --time of the stage's job (instead of "
        "slurm.time); the stage watches it (under Slurm the job's own end time) and, when less than the margin "
        "is left, checkpoints and exits with code 75 so that the job requeues and resumes (docs/SLURM.md).")
    time_limit_margin_s: float = Field(
        60.0, ge=0, description="The least time (seconds) a stage keeps in hand before its deadline to checkpoint "
        "and exit; the margin is 1.5 x (longest step + longest checkpoint) measured when that is more.")

    @field_validator("time_limit")
    @classmethod
    def _valid_time_limit(cls, value: Any) -> Any:
        for limit in (value.values() if isinstance(value, dict) else [value] if value is not None else []):
            parse_time_limit(limit)
        return value

    def time_limit_for(self, stage: str) -> int | None:
        """``time_limit`` of ``stage`` in seconds (None: no limit of its own)."""
        limit = self.time_limit.get(stage) if isinstance(self.time_limit, dict) else self.time_limit
        return None if limit is None else parse_time_limit(limit)



class SlurmConfig(Section):
    """``python -m pipeline slurm``: the resources of each stage's sbatch job (pipeline/slurm.py)."""

    partition: str | None = Field(None, description="#SBATCH --partition.")
    account: str | None = Field(None, description="#SBATCH --account.")
    nodes: int = Field(1, gt=0, description="#SBATCH --nodes (must equal launch.nnodes).")
    gpus_per_node: int = Field(0, ge=0, description="#SBATCH --gres=gpu:N (0: a CPU job, DS_ACCELERATOR=cpu).")
    cpus_per_task: int = Field(1, gt=0, description="#SBATCH --cpus-per-task.")
    mem: str | None = Field(None, description="#SBATCH --mem, e.g. '64G'.")
    time: str = Field("01:00:00", description="#SBATCH --time, per stage job.")
    extra_sbatch: list[str] = Field(default_factory=list, description="More #SBATCH lines, e.g. '--qos=high'.")
    setup: list[str] = Field(default_factory=list, description="Shell lines run before the stage (module load ...).")
    signal_seconds: int = Field(
        120, ge=0, description="#SBATCH --signal=B:USR1@N: Slurm warns the job N seconds before its time limit; the "
        "script asks the stage to checkpoint at its next step boundary and requeues the job (0: no warning).")
    requeue: bool = Field(
        True, description="#SBATCH --requeue: a stage that stopped with a checkpoint (the warning, a preemption, its "
        "deadline) is requeued under the same job id and resumes; the jobs after it wait. false: the job fails.")



class ReportConfig(Section):
    """What the run report evaluates: each policy against its parent on held-out prompts (DESIGN §6)."""

    eval_data: DataSource | None = Field(
        None, description="Held-out prompts (with a 'reference' column for the verifier). Default: "
                          "ppo.eval_data, else the tail of ppo.data.")
    n_prompts: int = Field(8, gt=0, description="How many held-out prompts both policies answer (greedy).")
    general_prompts: DataSource | None = Field(
        None, description="Off-task drift: prompts unlike the training tasks, never trained on (an optional "
                          "'reference' column for the overlap score); each policy and its parent answer them "
                          "greedily and the report compares format share, length, eos rate, empty answers, KL "
                          "and reference overlap (docs/USAGE.md). None: not measured.")
    n_general: int = Field(48, gt=0, description="How many general_prompts (the head) each model answers.")
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



class EvalConfig(Section):
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



class PathsConfig(Section):
    """Where relative paths resolve (pipeline/paths.py). Recorded when a config file is loaded; the resolved
    config carries it to the stage processes. Not part of any stage's identity."""

    config_dir: str | None = Field(
        None, description="Relative input paths are looked up here first, then in work_dir, then among "
                          "alignpipe's shipped files (default: the config file's folder).")
    work_dir: str | None = Field(
        None, description="output_root and model.cache_dir are relative to this folder (default: the working "
                          "directory the command started in).")



class RunConfig(Section):
    """The whole run (configs/tiny.yaml, configs/demo.yaml): the sections every stage shares. The model a config
    is validated with (``run_config_model``) adds one section per stage of the registry."""

    run_name: str = Field("run", description="The run's folder under output_root: outputs/<run_name>/<stage>/.")
    output_root: str = Field("outputs", description="Where run folders go (relative to the working directory).")
    seed: int = Field(0, description="The run's seed (part of every stage's identity; stages seed from it and from "
                                     "their own seed settings).")
    determinism: bool = Field(
        True, description="Every stage process starts with its generators seeded from `seed` and torch's "
        "deterministic kernels (use_deterministic_algorithms, warn-only; CUBLAS_WORKSPACE_CONFIG on CUDA), so two "
        "runs of one config and seed on one machine and thread count end with the same bits. false: torch's "
        "defaults (its deterministic kernels can be slower on a GPU). Not part of the stage hashes. Cost: "
        "docs/RESULTS.md, Determinism.")
    model: ModelConfig = section(ModelConfig)
    chat: ChatConfig = section(ChatConfig)
    extra_stages: list[str] = Field(
        default_factory=list, description="Stages this run adds to the built-in ones, as 'module:attribute' of a "
                                          "StageSpec (docs/ARCHITECTURE.md, 'Adding a stage'); each brings its "
                                          "own section.")
    stages: list[str] = Field(
        default_factory=lambda: ["sft", "rm", "ppo"], description="The stages this run runs, in order: built-in "
        "(distill, sft, rlaif_label, rm, best_of_n, ppo, dpo) or from extra_stages.")
    rlaif: RLAIFConfig = section(RLAIFConfig)
    rollout: RolloutConfig = section(RolloutConfig)
    launch: LaunchConfig = section(LaunchConfig)
    slurm: SlurmConfig = section(SlurmConfig)
    logging: LoggingConfig = section(LoggingConfig)
    report: ReportConfig = section(ReportConfig)
    eval: EvalConfig = section(EvalConfig)
    paths: PathsConfig = section(PathsConfig)

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or "/" in value or value.startswith("."):
            raise ValueError(f"run_name must be a plain folder name, got {value!r}")
        return value

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, value: list[str], info: ValidationInfo) -> list[str]:
        """Each name is a stage of the registry: a built-in one or one of ``extra_stages`` (validated first)."""
        known = [spec.name for spec in specs(tuple(info.data.get("extra_stages") or ()))]
        for name in value:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown stage {name!r}{hint} (stages: {', '.join(known)}; a stage of your own "
                                 "is added with extra_stages)")
        return value

    @model_validator(mode="after")
    def _stage_checks(self) -> "RunConfig":
        """Each stage's global batch against the launch section (``TrainingShape.global_batch_size``) and its
        cross-section checks (``StageSpec.check``), in pipeline order."""
        fields = type(self).model_fields
        for spec in stage_specs(self):
            if spec.name not in fields:
                continue
            if spec.training is not None:
                check_global_batch(spec.training(self), self.world_size)
            if spec.check is not None:
                spec.check(self)
        return self

    @model_validator(mode="after")
    def _time_limit_checks(self) -> "RunConfig":
        """``launch.time_limit``'s stage names are stages of the run; one limit for every stage replaces
        ``slurm.time``, so both set is a contradiction."""
        limit = self.launch.time_limit
        if isinstance(limit, dict):
            unknown = sorted(set(limit) - set(self.stages))
            if unknown:
                raise ValueError(f"launch.time_limit names {', '.join(map(repr, unknown))}, not among the run's "
                                 f"stages ({', '.join(self.stages)})")
        elif limit is not None and "time" in self.slurm.model_fields_set:
            raise ValueError(f"launch.time_limit={limit!r} and slurm.time={self.slurm.time!r} both set each stage "
                             "job's time limit; keep launch.time_limit (the stage also watches it) and drop "
                             "slurm.time, or give launch.time_limit per stage")
        return self

    @property
    def world_size(self) -> int:
        """Processes the launch section starts (nnodes x nproc_per_node)."""
        return self.launch.nnodes * self.launch.nproc_per_node

    def run_dir(self) -> Path:
        return output_path(self.output_root) / self.run_name

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir() / stage

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


@functools.cache
def run_config_model(extra_stages: tuple[str, ...] = ()) -> type[RunConfig]:
    """``RunConfig`` with one section per stage of the registry (the built-ins and ``extra_stages``), each the
    stage's ``config_model`` (its defaults when absent). Raises RegistryError for an entry that cannot load."""
    fields: dict[str, Any] = {}
    for spec in specs(extra_stages):
        if spec.name in RunConfig.model_fields:
            raise RegistryError(f"stage {spec.name!r} has the name of the run config's own section; rename it")
        fields[spec.name] = (spec.config_model, section(spec.config_model))
    return create_model("RunConfig", __base__=RunConfig, __module__=__name__, **fields)


# ---------------------------------------------------------------------------------------------- loading
def _model_fields_at(root: type[BaseModel], path: list[str]) -> list[str]:
    """Valid keys of the section at dotted ``path`` of the model ``root`` (for 'did you mean' hints)."""
    model: Any = root
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



def _format_validation_error(err: ValidationError, source: str, root: type[BaseModel]) -> str:
    lines = [f"{source}: invalid config"]
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        key = ".".join(loc)
        if item["type"] == "extra_forbidden":
            valid = _model_fields_at(root, loc[:-1])
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



class _ConfigLoader(yaml.SafeLoader):
    """YAML as PyYAML's safe loader reads it, except that YAML 1.1's base-60 numbers stay text: ``1:30:00`` is
    the time limit it looks like, not the integer 5400 (YAML 1.2 dropped base 60 too)."""


def _base60_as_text(kind: str) -> Any:
    construct = getattr(yaml.SafeLoader, f"construct_yaml_{kind}")

    def constructor(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
        return loader.construct_scalar(node) if ":" in str(node.value) else construct(loader, node)

    return constructor


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _base60_as_text("int"))
_ConfigLoader.add_constructor("tag:yaml.org,2002:float", _base60_as_text("float"))


def _load_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], parsed YAML scalar)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. sft.train.max_steps=10)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = _load_yaml_text(raw) if raw.strip() else None
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
        data = _load_yaml_text(file.read_text()) or {}
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
    return _validated(data, str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else ""))



def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    paths = data.get("paths") or {}
    use_bases(paths.get("config_dir"), paths.get("work_dir"))
    return _validated(data, source)


def _validated(data: dict[str, Any], source: str) -> RunConfig:
    """``data`` validated by the run config model of its stages (``extra_stages`` loaded first)."""
    extra = data.get("extra_stages") or ()
    try:
        model = run_config_model(tuple(extra) if isinstance(extra, list) else ())
    except RegistryError as exc:
        raise ConfigError(f"{source}: extra_stages: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source, model)) from None


#: Names this module used to define, now beside their stage: still importable from here.
MOVED = {"SFTConfig": "stages.sft_config", "RMConfig": "stages.rm_config", "RMTrainConfig": "stages.rm_config",
         "DPOConfig": "stages.dpo.config", "DPOTrainConfig": "stages.dpo.config", "PPOConfig": "stages.ppo.config",
         "PPOTrainConfig": "stages.ppo.config", "PPOSizes": "stages.ppo.config", "PPO_TRAIN_KEYS": "stages.ppo.config",
         "PolicySourceConfig": "stages.ppo.config", "RewardModelSourceConfig": "stages.ppo.config",
         "RLAIFLabelConfig": "stages.rlaif.config", "BestOfNConfig": "stages.best_of_n_config",
         "DistillConfig": "stages.distill_config", "TeacherConfig": "stages.distill_config",
         "TokenLevelDistillConfig": "stages.distill_config"}


def __getattr__(name: str) -> Any:
    if name in MOVED:
        return getattr(importlib.import_module(MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

