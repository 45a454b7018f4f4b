"""The orchestrator: run the stages of one config in order, each as its own process (DESIGN §1).

``run_pipeline`` resolves the config (file + ``key=value`` overrides), writes it to
``outputs/<run>/config.resolved.json`` (what every stage process reads), prints the memory plan of each
stage, then for each requested stage decides what to do from its manifest:

- no manifest: run it;
- ``complete`` with the same config and input hashes (``stage_identity``): skip (``--force`` re-runs
  from scratch);
- ``complete`` with a different config or different inputs (a parent re-ran, a data file changed): run;
- ``running`` and its process is alive on this host: refuse, another run is in progress;
- ``running`` and its process is gone: run again; the stage resumes from its checkpoints by itself
  (``StageRun`` sees the interrupted manifest and the ``checkpoints/`` folder);
- ``interrupted`` (Ctrl-C or SIGTERM inside the stage; ``running`` with its process gone reads the same):
  resume from the step ``checkpoints/latest`` names, or run again when there is no checkpoint;
- ``failed`` (an error in the stage): run again (it resumes from checkpoints where the config is unchanged).

Requested stages (``--stages``) bring along the parents they need that are not complete, as Make does
(``plan.with_parents``: complete parents are used as they are, interrupted ones resume); ``--no-parents``
keeps the strict behaviour. Before launching a stage, its parents must be ``complete`` with matching
chat-format fingerprints, or the run stops with a message naming the stage and why. A stage's output
(stdout and stderr) goes to ``outputs/<run>/<stage>/stage.log`` and to the console, where (unless
``verbose``) what libraries say is left out (``pipeline/console.py``) and the memory plans are one line
each; a stage's last line on the console names its key metrics (its spec's ``headline``). A non-zero exit
stops the chain and names that log.
At the end the run report is written (``pipeline/report.py``) and its path printed.

The decisions above and the pre-flight checks (parents, memory plan, DeepSpeed JSON) live in
``pipeline/plan.py``, shared with ``pipeline/slurm.py``; pid liveness, the output tee and the run lock live
in ``pipeline/procs.py``. This module strings them together and formats ``pipeline status``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig, load_config
from .console import CONSOLE_ENV, libraries_to_file
from .launch import has_cuda, stage_command, stage_env
from .manifest import MANIFEST, ManifestError, read_manifest
from .models import check_model_sources
from .plan import (
    Decision,
    Printer,
    check_deepspeed,
    check_parents,
    decide,
    memory_plans,
    select_stages,
    with_parents,
    write_resolved_config,
)
from .preemption import STOP_EXIT_CODE
from .procs import RunLock, free_port, process_state, run_process
from .registry import parents_of, spec_of, stage_names
from .report import write_report
from .slurm import format_job_states
from .stage import resume_step, stage_identity


class StageFailed(RuntimeError):
    """A stage process exited non-zero (or exited without completing its manifest); exit code 75
    (``STOP_EXIT_CODE``): it stopped on request with a checkpoint, ``error`` says why."""

    def __init__(self, stage: str, returncode: int, log_path: Path, error: str | None):
        self.stage, self.returncode, self.log_path, self.error = stage, returncode, log_path, error
        detail = f": {error}" if error else ""
        if returncode == STOP_EXIT_CODE:
            super().__init__(f"stage '{stage}' stopped with a checkpoint{detail}\n  log: {log_path}\n"
                             f"  re-run the same command to resume it")
            return
        super().__init__(
            f"stage '{stage}' failed (exit code {returncode}){detail}\n  log: {log_path}\n"
            f"  fix the cause and re-run the same command: completed stages are skipped and '{stage}' "
            "resumes from its last checkpoint"
        )


@dataclass
class PipelineResult:
    run_dir: Path
    config_file: Path
    decisions: list[Decision] = field(default_factory=list)
    report: Path | None = None


# ------------------------------------------------------------------------------------------- launch
def launch_stage(cfg: RunConfig, stage: str, config_file: Path, decision: Decision, cpu: bool,
                 entry: str | None = None, echo: bool = True, verbose: bool = False) -> None:
    """Start ``stage`` with the configured launcher; raise StageFailed unless it exits 0 with a complete manifest."""
    stage_dir = cfg.stage_dir(stage)
    if decision.action == "run" and (stage_dir / "checkpoints").exists():
        # a fresh run (--force, or a changed config) must not pick up old training state
        shutil.rmtree(stage_dir / "checkpoints")
    env = stage_env(cfg, cpu=cpu)
    env.pop(CONSOLE_ENV, None)
    if not verbose:  # the stage marks what libraries say log-only; run_process keeps it off the console
        env[CONSOLE_ENV] = "quiet"
    launch = cfg.launch
    if (launch.launcher == "deepspeed" and launch.nnodes == 1 and "master_port" not in launch.model_fields_set
            and not env.get("MASTER_PORT")):
        env["MASTER_PORT"] = str(free_port())  # one node: any free port, so that two runs never collide
    cmd = stage_command(cfg, stage, config_file, entry=entry, env=env)
    log_path = stage_dir / "stage.log"
    code = run_process(cmd, env, log_path, append=decision.action != "run", echo=echo, quiet=not verbose)
    manifest = read_manifest(stage_dir) or {}
    if code == STOP_EXIT_CODE and manifest.get("status") == "interrupted":
        raise StageFailed(stage, code, log_path, f"by {manifest.get('interrupted_by')} at step "
                                                 f"{manifest.get('stopped_at_step', manifest.get('resume_step'))}")
    if code != 0:
        raise StageFailed(stage, code, log_path, manifest.get("error"))
    if manifest.get("status") != "complete":
        raise StageFailed(stage, code, log_path,
                          f"the process exited 0 but {stage_dir / MANIFEST} says status={manifest.get('status')!r}")


# ---------------------------------------------------------------------------------------------- run
def run_pipeline(config: str | os.PathLike, overrides: Sequence[str] = (), stages: Sequence[str] | None = None,
                 force: bool = False, entry: str | None = None, out: Printer = print, echo: bool = True,
                 report: bool = True, parents: bool = True, verbose: bool = False) -> PipelineResult:
    """Run the requested stages of a config (see the module doc). Returns what was done and the report path.

    ``parents`` (the default): requested stages bring their incomplete parents along, as Make builds missing
    prerequisites (``plan.with_parents``; complete parents are used, interrupted ones resume, ``force``
    applies only to the requested stages). ``parents=False`` (``--no-parents``, ``ONLY=1``) refuses instead.
    ``verbose``: the console gets everything the stages and libraries print, and the full memory tables.

    Raises ConfigError (bad config/overrides), ManifestError (a parent or a concurrent run stops the
    chain), MemoryPlanError (a stage cannot fit), StageFailed (a stage process failed).
    """
    cfg = load_config(config, list(overrides))
    selected = select_stages(cfg, stages)
    added: set[str] = set()
    if parents and stages:
        selected, added = with_parents(cfg, selected, out)
    check_model_sources(cfg, selected)  # before anything is written or launched
    cfg.run_dir().mkdir(parents=True, exist_ok=True)
    config_file = write_resolved_config(cfg)
    out(f"run '{cfg.run_name}': {cfg.run_dir()}  (resolved config: {config_file})")
    launch = cfg.launch
    out(f"stages: {' -> '.join(selected)}   launcher: {launch.launcher}"
        + (f" x{launch.nproc_per_node}/node, {launch.nnodes} node(s)" if launch.launcher != "local" else ""))
    memory_plans(cfg, selected, out, detail=verbose)
    with RunLock(cfg.run_dir()):
        result = _run_stages(cfg, selected, config_file, force, entry, out, echo, added, verbose)
    if report:
        if verbose:
            result.report = write_report(cfg, out=out)
        else:  # the sample generations load models in this process
            with libraries_to_file(cfg.run_dir() / "report.log"):
                result.report = write_report(cfg, out=out)
        out(f"report: {result.report}")
        if result.report.with_suffix(".html").exists():
            out(f"report: {result.report.with_suffix('.html')} (one self-contained page: open it in a browser)")
    return result


def _run_stages(cfg: RunConfig, selected: Sequence[str], config_file: Path, force: bool, entry: str | None,
                out: Printer, echo: bool, added: Set[str] = frozenset(), verbose: bool = False) -> PipelineResult:
    cuda: bool | None = None
    result = PipelineResult(cfg.run_dir(), config_file)
    ran_now: set[str] = set()
    for stage in selected:
        decision = decide(cfg, stage, force=force and stage not in added)  # added parents are never forced
        result.decisions.append(decision)
        if decision.action == "skip":
            out(f"[{stage}] skip: {decision.reason} ({cfg.stage_dir(stage)})")
            continue
        check_parents(cfg, stage, ran_now, out)
        if cuda is None:
            cuda = has_cuda()
            check_deepspeed(cfg, [s for s in selected if s not in ran_now], cuda, out)
        out(f"[{stage}] {decision.action}: {decision.reason}; log: {cfg.stage_dir(stage) / 'stage.log'}")
        started = time.time()
        launch_stage(cfg, stage, config_file, decision, cpu=not cuda, entry=entry, echo=echo, verbose=verbose)
        ran_now.add(stage)
        headline = stage_headline(cfg, stage, (read_manifest(cfg.stage_dir(stage)) or {}).get("metrics") or {})
        out(f"[{stage}] complete in {time.time() - started:.1f} s" + (f": {headline}" if headline else ""))
    return result


def stage_headline(cfg: RunConfig, stage: str, metrics: dict[str, Any]) -> str:
    """``eval_accuracy=0.718, eval_mean_margin=2.41``: the key metrics of the stage's closing console line
    (its spec's ``headline``, in that order), those it has."""
    return _short_metrics({k: metrics[k] for k in spec_of(cfg, stage).headline if k in metrics})


# -------------------------------------------------------------------------------------------- status
def stage_status(cfg: RunConfig, stage: str, stale_parents: Sequence[str] = ()) -> dict[str, Any]:
    """One stage's state for ``pipeline status``: status, whether it is up to date, metrics, location.

    ``stale_parents``: parents that will re-run, which makes a complete stage stale too.
    """
    stage_dir = cfg.stage_dir(stage)
    row: dict[str, Any] = {"stage": stage, "dir": str(stage_dir)}
    try:
        manifest = read_manifest(stage_dir)
    except ManifestError as exc:
        return {**row, "status": "corrupt", "detail": str(exc)}
    if manifest is None:
        return {**row, "status": "not run", "detail": ""}
    status = manifest.get("status")
    row["status"] = status
    row["metrics"] = manifest.get("metrics") or {}
    row["wall_time_s"] = manifest.get("wall_time_s")
    step = resume_step(stage_dir)
    resumes = (f"a re-run resumes from step {step}" if step is not None
               else "a re-run resumes from its last checkpoint" if (stage_dir / "checkpoints").exists()
               else "a re-run starts over (no checkpoint)")
    if status == "running":
        state = process_state(manifest)
        if state == "dead":  # killed (SIGKILL, out of memory, node failure): its process vanished
            row["status"] = "interrupted"
            row["detail"] = f"pid {manifest.get('pid')} is gone; {resumes}"
        else:
            row["detail"] = {"alive": f"in progress (pid {manifest.get('pid')})",
                             "other-host": f"running on {manifest.get('host')} (pid {manifest.get('pid')})"}[state]
    elif status == "interrupted":
        row["detail"] = f"by {manifest.get('interrupted_by') or 'a signal'}; {resumes}"
    elif status == "failed":
        row["detail"] = f"{manifest.get('error') or 'no error recorded'}; {resumes}"
    else:
        config_hash, input_hash = stage_identity(cfg, stage)
        if manifest.get("config_hash") != config_hash:
            row["detail"] = "stale: config changed (will re-run)"
        elif manifest.get("input_hash") != input_hash:
            row["detail"] = "stale: inputs changed (will re-run)"
        elif stale := [p for p in parents_of(cfg, stage) if p in stale_parents]:
            row["detail"] = f"stale: parent {', '.join(stale)} will re-run (then this re-runs)"
        else:
            row["detail"] = "up to date"
    return row


def _short_metrics(metrics: dict[str, Any], limit: int = 6) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
        if len(parts) >= limit:
            break
    return ", ".join(parts)


def format_status(cfg: RunConfig) -> str:
    """The text ``pipeline status`` prints: each stage's state, metrics and folder, then Slurm jobs."""
    lines = [f"run '{cfg.run_name}': {cfg.run_dir()}"]
    stages = list(cfg.stages) + [s for s in stage_names(cfg) if s not in cfg.stages and cfg.stage_dir(s).exists()]
    will_rerun: list[str] = []
    for stage in stages:
        row = stage_status(cfg, stage, will_rerun)
        if row["status"] != "complete" or str(row.get("detail", "")).startswith("stale"):
            will_rerun.append(stage)
        wall = f", {row['wall_time_s']:.1f} s" if isinstance(row.get("wall_time_s"), (int, float)) else ""
        detail = f" ({row['detail']})" if row.get("detail") else ""
        lines.append(f"  {stage:<12} {row['status']}{wall}{detail}")
        metrics = _short_metrics(row.get("metrics") or {})
        if metrics:
            lines.append(f"  {'':<12} {metrics}")
        if row["status"] != "not run":
            lines.append(f"  {'':<12} {row['dir']}")
    slurm = format_job_states(cfg)
    if slurm:
        lines.append(slurm)
    report = cfg.run_dir() / "report.md"
    if report.exists():
        lines.append(f"report: {report}")
    return "\n".join(lines)


def status_json(cfg: RunConfig) -> str:
    """Machine-readable status (``pipeline status --json``)."""
    rows: list[dict[str, Any]] = []
    will_rerun: list[str] = []
    for stage in cfg.stages:
        rows.append(stage_status(cfg, stage, will_rerun))
        if rows[-1]["status"] != "complete" or str(rows[-1].get("detail", "")).startswith("stale"):
            will_rerun.append(stage)
    return json.dumps(rows, indent=2, default=str)
