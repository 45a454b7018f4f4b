"""Planning and pre-flight checks shared by ``pipeline run`` (orchestrator) and ``pipeline slurm``.

Nothing here starts a stage. It picks the stages of a run (``select_stages``), decides from each stage's
manifest whether to skip, run, resume or re-run it (``decide``, see ``pipeline/orchestrator.py``'s module
doc for the table), checks that a stage's parents are complete with matching chat formats
(``check_parents``), prints the memory plan of each stage (``memory_plans``), validates the DeepSpeed
JSONs offline at the run's world size (``check_deepspeed``) and writes the resolved config every stage
process reads (``write_resolved_config``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import memory
from .config import ConfigError, RunConfig
from .deepspeed_check import validate_ds_config
from .launch import config_file_for
from .manifest import (
    MANIFEST,
    ManifestError,
    atomic_write_json,
    check_fingerprints,
    read_manifest,
    require_complete_parent,
)
from .procs import process_state
from .registry import TrainingShape, parents_of, spec_of, stage_names
from .stage import config_changes, hint_command, input_changes, resume_step, stage_identity

Printer = Callable[[str], None]


@dataclass
class Decision:
    """What the orchestrator does with one stage: ``run``, ``resume``, ``rerun`` or ``skip``, and why."""

    stage: str
    action: str
    reason: str


def select_stages(cfg: RunConfig, requested: Sequence[str] | None) -> list[str]:
    """The stages to run, in pipeline order (the config's stages when none are requested).

    A requested stage that the config's ``stages`` list lacks (``--stages sft rlaif_label rm ppo`` on a
    config without ``rlaif_label``) is added to ``cfg.stages`` in place, so that the stage processes,
    which read the resolved config, chain through it (``parents_of``). Unknown names are a ConfigError.
    """
    if not requested:
        return list(cfg.stages)
    known = stage_names(cfg)  # pipeline order
    unknown = [s for s in requested if s not in known]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; expected some of {', '.join(known)}")
    missing = [s for s in requested if s not in cfg.stages]
    if missing:
        try:
            cfg.stages = [s for s in known if s in cfg.stages or s in missing]  # validated assignment
        except ValidationError as err:  # e.g. ppo added without the reward model it needs
            reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
            raise ConfigError(f"--stages {' '.join(requested)}: {reasons}") from None
    return [s for s in cfg.stages if s in requested]


def missing_parents(cfg: RunConfig, selected: Sequence[str]) -> dict[str, str]:
    """The parents the selected stages need that are not complete, as Make builds missing prerequisites.

    Walks ``parents_of`` from each selected stage: a parent outside ``selected`` whose manifest is not
    ``complete`` (absent, interrupted, failed, running) is needed, and so are its own incomplete parents.
    A complete parent is used as it is (``check_parents`` warns when its config changed) and its own
    parents are not looked at. Returns {parent: why it is needed}, in no particular order.
    """
    needed: dict[str, str] = {}
    todo = list(selected)
    while todo:
        stage = todo.pop()
        for parent in parents_of(cfg, stage):
            if parent in selected or parent in needed:
                continue
            manifest = read_manifest(cfg.stage_dir(parent))
            status = None if manifest is None else manifest.get("status")
            if status == "complete":
                continue
            needed[parent] = f"'{stage}' needs it and it is {'not run' if status is None else status}"
            todo.append(parent)
    return needed


def with_parents(cfg: RunConfig, selected: Sequence[str], out: Printer) -> tuple[list[str], set[str]]:
    """``selected`` plus the incomplete parents it needs (``missing_parents``), in pipeline order, saying
    which were added and why. Returns (stages to run, the added parents)."""
    needed = missing_parents(cfg, selected)
    if not needed:
        return list(selected), set()
    stages = select_stages(cfg, [*selected, *needed])
    for parent in stages:
        if parent in needed:
            out(f"[{parent}] added: {needed[parent]} (--no-parents / ONLY=1 refuses instead)")
    return stages, set(needed)


def decide(cfg: RunConfig, stage: str, force: bool = False) -> Decision:
    """Decide from the stage's manifest whether to skip, run, resume or re-run it (see the orchestrator's doc).

    Raises ManifestError when the stage is running in another live process.
    """
    stage_dir = cfg.stage_dir(stage)
    manifest = read_manifest(stage_dir)
    if manifest is None:
        return Decision(stage, "run", "no previous run")
    status = manifest.get("status")
    if status == "running":
        state = process_state(manifest)
        where = f"pid {manifest.get('pid')} on {manifest.get('host')}"
        if state == "alive":
            raise ManifestError(
                f"stage '{stage}' is already running ({where}, {stage_dir / MANIFEST}); another run of "
                f"'{cfg.run_name}' is in progress. Wait for it to finish or stop that process, then re-run."
            )
        if state == "other-host" and not force:
            raise ManifestError(
                f"stage '{stage}' says it is running ({where}, {stage_dir / MANIFEST}) on another host, which "
                "this machine cannot check. If that process is gone, re-run with --force."
            )
        return _interrupted(stage, stage_dir, f"{where} is gone", force)
    if status == "interrupted":
        return _interrupted(stage, stage_dir, f"by {manifest.get('interrupted_by') or 'a signal'}", force)
    if force:
        return Decision(stage, "run", "--force")
    if status == "failed":
        error = manifest.get("error") or "no error recorded"
        step = resume_step(stage_dir)
        resumes = f"; resuming from step {step} where the config is unchanged" if step is not None else ""
        return Decision(stage, "rerun", f"the previous run failed ({error}){resumes}")
    if status == "complete":
        config_hash, input_hash = stage_identity(cfg, stage)
        if manifest.get("config_hash") != config_hash:
            changes = config_changes(manifest.get("config") or {}, cfg, stage)
            return Decision(stage, "run", "its config changed since it completed"
                            + (f" ({'; '.join(changes)})" if changes else ""))
        if manifest.get("input_hash") != input_hash:
            changes = input_changes(manifest, cfg, stage)
            return Decision(stage, "run", "its inputs changed since it completed ("
                            + ("; ".join(changes) if changes else "a parent stage or a data file") + ")")
        return Decision(stage, "skip", "complete, config and inputs unchanged")
    raise ManifestError(f"{stage_dir / MANIFEST}: unknown status {status!r}; delete the file or re-run with --force")


def _interrupted(stage: str, stage_dir: Path, how: str, force: bool) -> Decision:
    """An interrupted stage (a signal, or its process vanished): resume from ``checkpoints/latest``."""
    if force:
        return Decision(stage, "run", f"--force (the run interrupted {how} is discarded)")
    step = resume_step(stage_dir)
    if step is not None:
        return Decision(stage, "resume", f"interrupted ({how}); resuming from step {step}, its last checkpoint")
    if (stage_dir / "checkpoints").exists():
        return Decision(stage, "resume", f"interrupted ({how}); resuming from its last checkpoint")
    return Decision(stage, "rerun", f"interrupted ({how}) before its first checkpoint")


def check_parents(cfg: RunConfig, stage: str, ran_now: set[str], warn: Printer) -> None:
    """Refuse to start ``stage`` unless every parent is complete and their chat formats agree.

    A parent that is complete but whose config no longer matches (and that is not part of this run) is
    used as it is, with a warning.
    """
    manifests: dict[str, dict[str, Any]] = {}
    for parent in parents_of(cfg, stage):
        try:
            manifests[parent] = require_complete_parent(cfg.stage_dir(parent), parent, stage, hint_command(parent))
        except ManifestError as exc:
            raise ManifestError(f"cannot start stage '{stage}': {exc}") from None
        if parent not in ran_now:
            config_hash, input_hash = stage_identity(cfg, parent)
            if manifests[parent].get("config_hash") != config_hash or manifests[parent].get("input_hash") != input_hash:
                warn(f"warning: '{parent}' at {cfg.stage_dir(parent)} was made with a different config or inputs "
                     f"than this one; '{stage}' uses it as it is. Add '{parent}' to --stages to refresh it.")
    try:
        check_fingerprints(stage, {p: m.get("chat_fingerprint") for p, m in manifests.items()})
    except ManifestError as exc:
        raise ManifestError(f"cannot start stage '{stage}': {exc}") from None


def memory_plans(cfg: RunConfig, stages: Sequence[str], out: Printer, check: bool = True,
                 detail: bool = True) -> None:
    """Print the memory estimate of each stage (``detail``: the table, else its one-line summary); raise
    MemoryPlanError when one cannot fit the device."""
    device = memory.device_memory_bytes(cfg) if check else None
    for stage in stages:
        plan = memory.estimate(cfg, stage)
        if plan is None:
            out(f"stage {stage}: no memory plan (its StageSpec has no memory_estimate)")
            continue
        out(plan.format() if detail else plan.summary())
        if device is not None:
            plan.check(device)


def _stage_deepspeed(cfg: RunConfig, stage: str) -> TrainingShape | None:
    """The training shape (``StageSpec.training``) of a stage that names a DeepSpeed JSON."""
    spec = spec_of(cfg, stage)
    shape = spec.training(cfg) if spec.training is not None else None
    return shape if shape is not None and shape.deepspeed else None


def check_deepspeed(cfg: RunConfig, stages: Sequence[str], cuda: bool, out: Printer) -> None:
    """Validate offline the DeepSpeed JSON each stage names, at the run's world size (ConfigError if bad)."""
    wanted = {s: d for s in stages if (d := _stage_deepspeed(cfg, s)) is not None}
    if not wanted:
        return
    world = cfg.launch.nnodes * cfg.launch.nproc_per_node
    problems: list[str] = []
    for stage, shape in wanted.items():
        bf16 = shape.precision == "bf16" or (shape.precision == "auto" and cuda)
        found = validate_ds_config(shape.deepspeed, world, shape.micro_batch, shape.grad_accum, shape.learning_rate,
                                   bf16, max_grad_norm=shape.max_grad_norm)
        problems += [f"stage '{stage}': {p}" for p in found]
        if not found:
            out(f"[{stage}] DeepSpeed config {shape.deepspeed}: valid at world size {world}")
    if problems:
        raise ConfigError("DeepSpeed config problems:\n  " + "\n  ".join(problems))


def write_resolved_config(cfg: RunConfig, path: Path | None = None) -> Path:
    """Write the resolved config as JSON (what each stage process reads) and return its path."""
    path = path or config_file_for(cfg)
    atomic_write_json(path, cfg.to_dict())
    return path
