"""The stage registry: every stage is declared once, by a ``StageSpec``, and found here by name.

A stage's declaration module (``stages/<package>/config.py``, or ``stages/<stage>_config.py`` beside a
one-file stage) holds its settings model and ``SPEC = StageSpec(...)``: its name, its place in the
pipeline order, its config section, its parents, the function that runs it, and what the control plane
asks of it (report section, memory estimate, DeepSpeed settings, console headline). Nothing else in the
project lists stages: the config loader, the orchestrator, the planner, the Slurm writer, the memory
planner and the report all iterate ``stage_specs(cfg)``.

The built-in stages are named in ``BUILTIN_STAGES`` (``module:attribute`` strings, imported when first
asked for, so reading a config imports no stage code beyond these light modules). A run adds its own stages
with the config key ``extra_stages: ["my_package.my_stage:SPEC"]``: the entry travels with the resolved
config to every stage process and Slurm job, so a plugin stage needs no change to this project
(docs/ARCHITECTURE.md, "Adding a stage"). Standard library only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The stages alignpipe ships, by declaration module (imported on first use, in this order of declaration;
#: the pipeline order is each spec's ``order``).
BUILTIN_STAGES = (
    "stages.distill_config:SPEC",
    "stages.sft_config:SPEC",
    "stages.rlaif.config:SPEC",
    "stages.rm_config:SPEC",
    "stages.best_of_n_config:SPEC",
    "stages.ppo.config:SPEC",
    "stages.dpo.config:SPEC",
)

#: The section fields that name a stage's data files by default (``StageSpec.data_fields``).
DATA_FIELDS = ("data", "eval_data", "ptx_data")


class RegistryError(ValueError):
    """A stage entry that cannot be loaded, is not a ``StageSpec``, or clashes with another stage's name."""


@dataclass(frozen=True)
class TrainingShape:
    """What the planner needs of a training stage's settings (``StageSpec.training``): the DeepSpeed JSON it
    names and the batch it trains with (per device), its precision and tuning, and the overrides a user
    gives to make it fit (the memory planner's suggestions: ``keys["deepspeed"]`` and ``keys["tuning"]`` name
    the settings, ``keys["small_batch"]`` is the overrides of micro-batch 1 with gradient checkpointing; a
    stage that samples during training may offer ``smaller_rollout_batch`` with ``keys["rollout_batch"]``)."""

    deepspeed: str | None
    micro_batch: int
    grad_accum: int
    learning_rate: float
    precision: str
    max_grad_norm: float | None
    tuning: Any
    gradient_checkpointing: bool
    rollout_batch: int = 0
    keys: Mapping[str, str] = field(default_factory=dict)
    smaller_rollout_batch: int = 0
    global_batch_size: int | None = None  # the setting that must equal micro x accumulation x world (keys["global"])


def _no_parents(cfg: Any) -> list[str]:
    return []


@dataclass(frozen=True)
class StageSpec:
    """One stage, as the rest of the pipeline sees it.

    - ``name``: the stage's name in ``stages:``, its config section (``cfg.<name>``) and its output folder;
    - ``order``: its place in the pipeline order (parents come first; built-ins are 10 apart);
    - ``config_model``: the pydantic model of its section (every field default-constructible);
    - ``run(cfg) -> dict``: the stage's body in its own process, returning its final metrics;
    - ``parents(cfg) -> [stage]``: the stages whose output it reads, by config;
    - ``title``: its name in the report and messages;
    - ``reads``: other stages' sections it reads (a declared dependency; tests/test_registry.py checks the
      stage's code against it);
    - ``check(cfg)``: cross-section validation (raise ValueError), run on every validated config;
    - ``samples``: it samples from a model with the rollout backend (``rollout`` and ``rlaif`` are part of its
      identity; its Slurm job starts the vLLM worker's environment);
    - ``identity_extra(cfg, data) -> dict``: more parts of its config hash (``data``: the config as JSON);
    - ``former_names``: renamed keys of its section, hashed under their former names;
    - ``data_fields(cfg)``: its section's fields that name data files (default ``DATA_FIELDS``);
    - ``external_models(cfg) -> {config key: location}``: models it loads that no stage of the run made;
    - ``training(cfg) -> TrainingShape``: its DeepSpeed/batch settings (None: it trains nothing);
    - ``memory_estimate(cfg, plan)``: adds its models to the memory planner's ``plan`` (None: not planned);
    - ``report_section(section)``: its report section's lines, from the report's ``section`` helper;
    - ``headline``: the metrics of its closing console line;
    - ``evaluated_policy``: the held-out evaluation compares its policy with its SFT parent;
    - ``card``: (one-line description, hub tags) of its model card.
    """

    name: str
    order: int
    config_model: type
    run: Callable[[Any], dict[str, Any]]
    parents: Callable[[Any], list[str]] = _no_parents
    title: str = ""
    reads: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    samples: bool = False
    identity_extra: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None
    former_names: Mapping[str, str] = field(default_factory=dict)
    data_fields: Callable[[Any], tuple[str, ...]] | None = None
    external_models: Callable[[Any], dict[str, str]] | None = None
    training: Callable[[Any], TrainingShape | None] | None = None
    memory_estimate: Callable[[Any, Any], None] | None = None
    report_section: Callable[[Any], list[str]] | None = None
    headline: tuple[str, ...] = ()
    evaluated_policy: bool = False
    card: tuple[str, tuple[str, ...]] | None = None

    @property
    def display(self) -> str:
        return self.title or self.name


def lazy(target: str) -> Callable[..., Any]:
    """``"module:function"`` as a function that imports its module on first call: a declaration module names
    the stage's body without importing torch or transformers (the control plane reads specs without them)."""
    module, _, attribute = target.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), attribute)(*args, **kwargs)

    call.__qualname__ = call.__name__ = attribute
    call.target = target  # type: ignore[attr-defined]
    return call


_LOADED: dict[str, StageSpec] = {}


def load_spec(entry: str) -> StageSpec:
    """The ``StageSpec`` at ``entry`` (``"module:attribute"``), imported once."""
    if entry not in _LOADED:
        module, sep, attribute = entry.partition(":")
        if not sep or not module or not attribute:
            raise RegistryError(f"stage entry {entry!r} is not of the form 'module:attribute' (e.g. "
                                "'my_package.my_stage:SPEC')")
        try:
            spec = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as exc:
            raise RegistryError(f"stage entry {entry!r} cannot be loaded: {type(exc).__name__}: {exc}") from None
        if not isinstance(spec, StageSpec):
            raise RegistryError(f"stage entry {entry!r} is a {type(spec).__name__}, not a StageSpec")
        _LOADED[entry] = spec
    return _LOADED[entry]


def specs(extra: Sequence[str] = ()) -> tuple[StageSpec, ...]:
    """The built-in stages plus those ``extra`` entries name, in pipeline order (``order``, then name)."""
    found: dict[str, StageSpec] = {}
    for entry in (*BUILTIN_STAGES, *extra):
        spec = load_spec(entry)
        if spec.name in found and found[spec.name] is not spec:
            raise RegistryError(f"stage entry {entry!r} declares the stage {spec.name!r}, which another stage "
                                "already has; give it another name")
        found[spec.name] = spec
    return tuple(sorted(found.values(), key=lambda s: (s.order, s.name)))


def stage_specs(cfg: Any) -> tuple[StageSpec, ...]:
    """The stages a run config knows: the built-ins and its ``extra_stages``, in pipeline order."""
    return specs(tuple(getattr(cfg, "extra_stages", ())))


def stage_names(cfg: Any) -> tuple[str, ...]:
    return tuple(spec.name for spec in stage_specs(cfg))


def spec_of(cfg: Any, stage: str) -> StageSpec:
    """The spec of ``stage`` in ``cfg``'s registry; an unknown name is a RegistryError naming the known ones."""
    for spec in stage_specs(cfg):
        if spec.name == stage:
            return spec
    raise RegistryError(f"unknown stage {stage!r}; expected one of {', '.join(stage_names(cfg))}")


def loaded_spec(stage: str) -> StageSpec | None:
    """The spec of ``stage`` among the built-ins and the stages this process has loaded (a run's extra_stages
    load with its config), or None: for code that has a manifest but no config (model cards)."""
    specs()  # the built-ins
    return next((spec for spec in _LOADED.values() if spec.name == stage), None)


def parents_of(cfg: Any, stage: str) -> list[str]:
    """The stages whose output ``stage`` reads in the run ``cfg`` (its spec's ``parents``)."""
    return spec_of(cfg, stage).parents(cfg)
