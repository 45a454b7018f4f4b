"""Slurm batch jobs: one sbatch script per stage, chained with ``--dependency=afterok``.

``python -m pipeline slurm CONFIG [--submit] [--stages ...]`` writes ``outputs/<run>/slurm/<stage>.sbatch``
for each stage to run, with the resources of the ``slurm:`` section (nodes, GPUs per node as
``--gres=gpu:N``, CPUs per task, memory, time, partition, account, extra ``#SBATCH`` lines, setup lines).
Inside the allocation, ``srun`` starts ``python -m pipeline.launch`` once per node, which builds the
configured launcher's command (local, torchrun or deepspeed) from the job's environment and becomes it: the
rendezvous address is the first host of ``SLURM_JOB_NODELIST``, the port is derived from the job id, the node
rank is ``SLURM_NODEID`` (``pipeline/launch.py``). Each job's output goes to
``outputs/<run>/slurm/<stage>-<jobid>.log`` (appended to across requeues) and to the stage's ``stage.log``.

Preemption and time limits (``pipeline/preemption.py``, docs/SLURM.md): the job asks for ``--requeue`` and
``--signal=B:USR1@<slurm.signal_seconds>``; the script traps USR1 and TERM and passes the request to the
stage through its stop file; the stage checkpoints at its next step boundary and exits with 75, and the
script requeues the job (``scontrol requeue``: same job id, so the ``afterok`` jobs after it keep waiting),
which resumes from that checkpoint. A watchdog requeues anyway if the stage has not stopped in time.
``--time`` is ``launch.time_limit`` of the stage when set, else ``slurm.time``.

``--submit`` submits them in order with ``sbatch --parsable``, each later job with
``--dependency=afterok:<previous job>`` and ``--kill-on-invalid-dep=yes`` (so a failed stage cancels
the ones after it instead of leaving them pending for ever), and records the job ids in
``outputs/<run>/slurm/jobs.json``; ``pipeline status`` shows their states from ``scontrol show job``.

Leading stages that are already complete with an unchanged config and inputs are not submitted (unless
``--force``); once one stage is submitted, every later requested stage is too, since its inputs change.
``--stages ppo`` brings the parents it needs that are not complete into the chain, as ``pipeline run`` does
(``plan.with_parents``; ``--force`` applies to the requested stages only); ``--no-parents`` refuses instead.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import REPO_ROOT, ConfigError, RunConfig, load_config
from .launch import DEFAULT_ENTRY, entry_module, stage_command
from .manifest import ManifestError, atomic_write_json, atomic_write_text, read_manifest, require_complete_parent
from .plan import (
    Printer,
    check_deepspeed,
    decide,
    memory_plans,
    select_stages,
    with_parents,
    write_resolved_config,
)
from .preemption import STOP_EXIT_CODE, STOP_FILE, format_time_limit, parse_time_limit
from .registry import parents_of, spec_of
from .stage import hint_command

TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


class SlurmError(RuntimeError):
    """sbatch/scontrol failed or is missing; the message says which command and its output."""


@dataclass
class StageScript:
    stage: str
    path: Path
    log_pattern: Path  # with %j for the job id


def slurm_dir(cfg: RunConfig) -> Path:
    return cfg.run_dir() / "slurm"


def _shell_word(arg: str) -> str:
    """Quote one argv element; ``$VAR`` references stay expandable (double quotes)."""
    if "$" in arg:
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`") + '"'
    return shlex.quote(arg)


def shell_join(argv: Sequence[str]) -> str:
    return " ".join(_shell_word(str(a)) for a in argv)


def _check_resources(cfg: RunConfig) -> None:
    s, launch = cfg.slurm, cfg.launch
    if launch.launcher == "local" and s.nodes > 1:
        raise ConfigError(
            f"slurm.nodes={s.nodes} but launch.launcher='local' runs one process; set launch.launcher=torchrun "
            "or deepspeed for a multi-node job"
        )
    if "nnodes" in launch.model_fields_set and launch.nnodes != s.nodes:
        raise ConfigError(f"launch.nnodes={launch.nnodes} differs from slurm.nodes={s.nodes}; set them equal")
    if s.gpus_per_node and launch.nproc_per_node > s.gpus_per_node:
        raise ConfigError(
            f"launch.nproc_per_node={launch.nproc_per_node} processes per node but slurm.gpus_per_node="
            f"{s.gpus_per_node}; one process per GPU: make them equal"
        )


def _vllm_lines(cfg: RunConfig) -> list[str]:
    """rollout.backend vllm: where the engine runs (docs/ROLLOUT.md), and a check that its environment exists on
    the node before the stage starts."""
    v = cfg.rollout.vllm
    if v.base_url:
        return [f"# rollout.backend: vllm at {v.base_url} (a worker you started; it must be reachable from the "
                "first node)"]
    python = v.python if Path(v.python).is_absolute() else str(REPO_ROOT / v.python)
    return ["# rollout.backend: vllm: rank 0 starts a vLLM worker on the first node, on the GPUs it sees; the",
            "# vLLM environment must be on a filesystem the nodes share (make vllm-env)",
            f"test -x {shlex.quote(python)} || {{ echo \"rollout.vllm.python {python} is missing on $(hostname): "
            "run make vllm-env where the nodes see it\" >&2; exit 1; }"]


def _sbatch_header(cfg: RunConfig, stage: str, log_pattern: Path) -> list[str]:
    """The script's first lines: what it is, and its ``#SBATCH`` resources from the ``slurm`` section."""
    s = cfg.slurm
    limit = cfg.launch.time_limit_for(stage)
    lines = [
        "#!/bin/bash",
        f"# alignpipe: stage '{stage}' of run '{cfg.run_name}'. Written by `python -m pipeline slurm`;",
        "# submit the chain with `python -m pipeline slurm CONFIG --submit`.",
        f"#SBATCH --job-name=alignpipe-{cfg.run_name}-{stage}",
        f"#SBATCH --nodes={s.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={s.cpus_per_task}",
        f"#SBATCH --time={format_time_limit(limit) if limit is not None else s.time}",
        f"#SBATCH --output={log_pattern}",
        "#SBATCH --open-mode=append",  # a requeued job goes on writing the same log
        f"#SBATCH --chdir={REPO_ROOT}",
        "#SBATCH --kill-on-invalid-dep=yes",
        "#SBATCH --requeue" if s.requeue else "#SBATCH --no-requeue",
    ]
    if s.signal_seconds:
        lines.append(f"#SBATCH --signal=B:USR1@{s.signal_seconds}")
    if s.gpus_per_node:
        lines.append(f"#SBATCH --gres=gpu:{s.gpus_per_node}")
    if s.mem:
        lines.append(f"#SBATCH --mem={s.mem}")
    if s.partition:
        lines.append(f"#SBATCH --partition={s.partition}")
    if s.account:
        lines.append(f"#SBATCH --account={s.account}")
    for extra in s.extra_sbatch:
        extra = extra.strip()
        lines.append(extra if extra.startswith("#SBATCH") else f"#SBATCH {extra}")
    return lines


def _deadline_lines(cfg: RunConfig, stage: str) -> list[str]:
    """``ALIGNPIPE_DEADLINE``, the time the stage watches (pipeline/preemption.py): ``SLURM_JOB_END_TIME`` where
    Slurm sets it, else the job's end time from squeue, else now plus the job's time limit."""
    limit = cfg.launch.time_limit_for(stage)
    if limit is None:
        try:
            limit = parse_time_limit(cfg.slurm.time)
        except ValueError:  # UNLIMITED, or a form Slurm knows and we do not: squeue's end time or nothing
            limit = None
    return [
        "job_end_epoch() {  # the job's end time in epoch seconds ('' when it has none)",
        '  local end; end="$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null)"',
        '  case "$end" in [0-9]*T[0-9]*) date -d "$end" +%s 2>/dev/null && return ;; esac',
        f"  echo $(( $(date +%s) + {limit} ))" if limit is not None else "  echo",
        "}",
        'export ALIGNPIPE_DEADLINE="${SLURM_JOB_END_TIME:-$(job_end_epoch)}"',
    ]


def _stop_lines(cfg: RunConfig) -> list[str]:
    """The trap: with ``--signal=B:USR1`` (and on a SIGTERM) Slurm signals this shell, not the stage, and
    signalling the job step would reach the launchers first (SIGTERM to srun cancels the step; SIGUSR1 ends
    torchrun); so the request goes to the stage through the stop file, which every rank checks at its step
    boundaries. After the warning a watchdog requeues the job anyway if the stage has not stopped in time."""
    s = cfg.slurm
    lines = [
        "STOPS=0",
        "WATCHDOG=",
        "stop_stage() {  # $1: the signal this shell received",
        "  STOPS=$((STOPS + 1))",
        '  echo "SIG$1 to the batch script of job $SLURM_JOB_ID" > "$STOP_FILE"',
        '  echo "=== $(date \'+%F %T\') SIG$1: the stage checkpoints and stops at its next step boundary" '
        '>> "$STAGE_LOG"',
    ]
    if s.requeue and s.signal_seconds:
        grace = max(s.signal_seconds - 15, s.signal_seconds // 2)
        lines += [
            '  if [ "$1" = USR1 ] && [ -z "$WATCHDOG" ]; then',
            f'    ( sleep {grace}; echo "=== $(date \'+%F %T\') the stage has not stopped {grace} s after the warning: '
            'requeueing (it resumes from its last checkpoint)" >> "$STAGE_LOG"; scontrol requeue "$SLURM_JOB_ID" ) &',
            "    WATCHDOG=$!",
            "  fi",
        ]
    return lines + ["}", "trap 'stop_stage USR1' USR1", "trap 'stop_stage TERM' TERM"]


def _wait_and_requeue_lines(cfg: RunConfig, python: str) -> list[str]:
    """Wait for the stage (a trapped signal cuts ``wait`` short: wait again); then a stage that stopped with a
    checkpoint (exit 75, or its manifest says so: torchrun reports 1) is requeued, or fails with 75."""
    requeue = [
        '  echo "=== $(date \'+%F %T\') the stage stopped with a checkpoint (exit $RC): requeueing job $SLURM_JOB_ID" '
        '>> "$STAGE_LOG"',
        "  trap '' TERM USR1  # the requeue ends this script",
        '  scontrol requeue "$SLURM_JOB_ID" || echo "=== scontrol requeue failed: submit the job again to resume" '
        '>> "$STAGE_LOG"',
    ] if cfg.slurm.requeue else [
        '  echo "=== $(date \'+%F %T\') the stage stopped with a checkpoint (exit $RC); slurm.requeue is off: '
        'submit again to resume" >> "$STAGE_LOG"',
    ]
    return [
        "stage_stopped() {  # the manifest this job's stage run wrote says it stopped on request",
        f"  {shlex.quote(python)} -c 'import json, sys; m = json.load(open(sys.argv[1])); "
        'sys.exit(not (m.get("status") == "interrupted" and m.get("started_at", 0) >= float(sys.argv[2]) - 1))\' '
        '"$STAGE_DIR/manifest.json" "$JOB_STARTED" 2>/dev/null',
        "}",
        "RC=127",
        "while :; do",
        "  seen=$STOPS",
        '  wait "$STAGE_PID"; status=$?',
        '  [ "$status" = 127 ] && break  # reported already: a signal came just after the stage ended',
        "  RC=$status",
        '  [ "$STOPS" = "$seen" ] && break  # the stage ended; else a trapped signal cut the wait short',
        "done",
        '[ -n "$WATCHDOG" ] && kill "$WATCHDOG" 2>/dev/null',
        f'if [ "$RC" != 0 ] && {{ [ "$RC" = {STOP_EXIT_CODE} ] || stage_stopped; }}; then',
        *requeue,
        f"  exit {STOP_EXIT_CODE}",
        "fi",
        'exit "$RC"',
    ]


def sbatch_script(cfg: RunConfig, stage: str, config_file: Path, entry: str | None = None,
                  python: str | None = None, env: Mapping[str, str] | None = None) -> tuple[str, Path]:
    """The sbatch script text for ``stage`` and its output log pattern (``%j`` = job id)."""
    _check_resources(cfg)
    s = cfg.slurm
    python = python or sys.executable
    log_pattern = slurm_dir(cfg) / f"{stage}-%j.log"
    stage_command(cfg, stage, config_file, python=python, entry=entry, env=env)  # the launch settings are valid
    lines = _sbatch_header(cfg, stage, log_pattern) + ["", "set -eo pipefail", f"cd {shlex.quote(str(REPO_ROOT))}"]
    if s.setup:
        lines += ["# setup (slurm.setup)", *s.setup]
    if cfg.rollout.backend == "vllm" and spec_of(cfg, stage).samples:
        lines += _vllm_lines(cfg)
    lines += [
        f'export PYTHONPATH={shlex.quote(str(REPO_ROOT))}"${{PYTHONPATH:+:$PYTHONPATH}}"',
        "export PYTHONUNBUFFERED=1",
    ]
    if not s.gpus_per_node:
        lines.append("export DS_ACCELERATOR=cpu")
    lines += [
        f"STAGE_DIR={shlex.quote(str(cfg.stage_dir(stage)))}",
        'STAGE_LOG="$STAGE_DIR/stage.log"',
        f'STOP_FILE="$STAGE_DIR/{STOP_FILE}"',
        "JOB_STARTED=$(date +%s)",
        'mkdir -p "$STAGE_DIR"',
        'rm -f "$STOP_FILE"  # a request an earlier run of this job did not get to act on',
        'echo "=== $(date \'+%F %T\') slurm job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on '
        '$SLURM_JOB_NODELIST" >> "$STAGE_LOG"',
        *_stop_lines(cfg),
        *_deadline_lines(cfg, stage),
        "set +e  # from here on the script reads the exit codes itself",
        "# one task per node: pipeline.launch builds the launcher's rendezvous from the job's environment",
        f"{_srun_line(cfg, stage, config_file, python, entry_module(entry, env))} "
        '> >(trap "" TERM USR1; exec tee -a "$STAGE_LOG") 2>&1 &',
        "STAGE_PID=$!",
        *_wait_and_requeue_lines(cfg, python),
        "",
    ]
    return "\n".join(lines), log_pattern


def _srun_line(cfg: RunConfig, stage: str, config_file: Path, python: str, entry: str) -> str:
    s = cfg.slurm
    srun = ["srun", f"--nodes={s.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={s.cpus_per_task}",
            "--kill-on-bad-exit=1", python, "-m", "pipeline.launch", stage, "--config", str(config_file)]
    if entry != DEFAULT_ENTRY:
        srun += ["--entry", entry]
    return shell_join(srun)


def write_scripts(cfg: RunConfig, stages: Sequence[str], config_file: Path, entry: str | None = None,
                  env: Mapping[str, str] | None = None) -> list[StageScript]:
    """Write one executable sbatch script per stage under ``outputs/<run>/slurm/``."""
    out: list[StageScript] = []
    for stage in stages:
        text, log_pattern = sbatch_script(cfg, stage, config_file, entry=entry, env=env)
        path = slurm_dir(cfg) / f"{stage}.sbatch"
        atomic_write_text(path, text)
        path.chmod(0o755)
        out.append(StageScript(stage, path, log_pattern))
    return out


def _run(cmd: list[str], env: Mapping[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=dict(env) if env is not None else None,
                              timeout=timeout, cwd=REPO_ROOT)
    except FileNotFoundError:
        raise SlurmError(f"'{cmd[0]}' not found: this machine has no Slurm client on PATH") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"'{' '.join(cmd)}' did not answer within {timeout:.0f} s; is slurmctld up?") from None


def submit(cfg: RunConfig, scripts: Sequence[StageScript], env: Mapping[str, str] | None = None,
           out: Printer = print) -> list[dict[str, Any]]:
    """Submit the scripts as an afterok chain; record and return [{stage, job_id, script, log}]."""
    jobs: list[dict[str, Any]] = []
    previous: str | None = None
    for script in scripts:
        cmd = ["sbatch", "--parsable", "--kill-on-invalid-dep=yes"]
        if previous:
            cmd.append(f"--dependency=afterok:{previous}")
        cmd.append(str(script.path))
        done = _run(cmd, env)
        if done.returncode != 0:
            _record(cfg, jobs)
            raise SlurmError(
                f"sbatch failed for stage '{script.stage}' ({script.path}), exit {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()}"
                + (f"; already submitted: {', '.join(j['job_id'] for j in jobs)}" if jobs else "")
            )
        job_id = done.stdout.strip().split(";")[0]
        log = str(script.log_pattern).replace("%j", job_id)
        jobs.append({"stage": script.stage, "job_id": job_id, "script": str(script.path), "log": log,
                     "dependency": previous})
        out(f"[{script.stage}] submitted job {job_id}" + (f" (after {previous})" if previous else "")
            + f"; log: {log}")
        previous = job_id
    _record(cfg, jobs)
    return jobs


def _record(cfg: RunConfig, jobs: list[dict[str, Any]]) -> None:
    atomic_write_json(slurm_dir(cfg) / "jobs.json",
                      {"run_name": cfg.run_name, "submitted_at": time.time(), "jobs": jobs})


def read_jobs(cfg: RunConfig) -> list[dict[str, Any]]:
    """The jobs recorded by the last ``--submit`` of this run ([] if none)."""
    path = slurm_dir(cfg) / "jobs.json"
    if not path.exists():
        return []
    try:
        return list(json.loads(path.read_text()).get("jobs", []))
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ManifestError(f"{path}: unreadable ({exc}); delete it and submit again") from None


def parse_scontrol(text: str) -> dict[str, str]:
    """``Key=Value`` pairs of ``scontrol show job`` output (values without spaces)."""
    fields: dict[str, str] = {}
    for token in text.split():
        if "=" in token:
            key, value = token.split("=", 1)
            fields.setdefault(key, value)
    return fields


def job_state(job_id: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """JobState, Reason and ExitCode of a job from ``scontrol show job`` (sacct needs slurmdbd)."""
    try:
        done = _run(["scontrol", "show", "job", "-o", str(job_id)], env, timeout=20)
    except SlurmError as exc:
        return {"JobState": "UNKNOWN", "Reason": str(exc), "ExitCode": "?"}
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip() or "not known to scontrol"
        return {"JobState": "UNKNOWN", "Reason": f"{reason} (finished jobs are forgotten after MinJobAge)",
                "ExitCode": "?"}
    fields = parse_scontrol(done.stdout)
    return {k: fields.get(k, "?") for k in ("JobState", "Reason", "ExitCode", "RunTime", "NodeList", "Restarts")}


def job_states(cfg: RunConfig, env: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    return [{"stage": j["stage"], "job_id": j["job_id"], "log": j.get("log", ""), **job_state(j["job_id"], env)}
            for j in read_jobs(cfg)]


def format_job_states(cfg: RunConfig) -> str:
    """The Slurm part of ``pipeline status`` ('' when nothing was submitted)."""
    states = job_states(cfg)
    if not states:
        return ""
    lines = ["slurm jobs:"]
    for row in states:
        reason = f" reason={row['Reason']}" if row.get("Reason") not in (None, "None", "?") else ""
        requeued = f" requeued={row['Restarts']}" if row.get("Restarts") not in (None, "0", "?") else ""
        lines.append(f"  {row['stage']:<12} job {row['job_id']}: {row['JobState']} exit={row['ExitCode']}{reason}"
                     f"{requeued}  log: {row['log']}")
    return "\n".join(lines)


def plan_submission(cfg: RunConfig, stages: Sequence[str], force: bool, out: Printer,
                    added: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Which of ``stages`` to submit: drop leading stages that are complete and up to date (unless force;
    ``added``: parents brought in by ``with_parents``, never forced).

    Parents outside the submission must already be complete (ManifestError otherwise).
    """
    chosen: list[str] = []
    for stage in stages:
        decision = decide(cfg, stage, force=force and stage not in added)
        if not chosen and decision.action == "skip":
            out(f"[{stage}] skip: {decision.reason}")
            continue
        chosen.append(stage)
    for stage in chosen:
        for parent in parents_of(cfg, stage):
            if parent not in chosen:
                try:
                    require_complete_parent(cfg.stage_dir(parent), parent, stage, hint_command(parent))
                except ManifestError as exc:
                    raise ManifestError(f"cannot submit stage '{stage}': {exc}") from None
    return chosen


def slurm_pipeline(config: str | os.PathLike, overrides: Sequence[str] = (), stages: Sequence[str] | None = None,
                   do_submit: bool = False, force: bool = False, entry: str | None = None,
                   env: Mapping[str, str] | None = None, out: Printer = print,
                   parents: bool = True) -> list[dict[str, Any]]:
    """Write the sbatch scripts of a run (and submit them with ``do_submit``). Returns the submitted jobs.
    ``parents``: requested stages bring their incomplete parents into the chain (see the module doc)."""
    cfg = load_config(config, list(overrides))
    selected = select_stages(cfg, stages)
    added: set[str] = set()
    if parents and stages:
        selected, added = with_parents(cfg, selected, out)
    # the planner checks against launch.gpu_memory_gib (this machine is not the cluster's node)
    memory_plans(cfg, selected, out, check=cfg.launch.gpu_memory_gib is not None)
    check_deepspeed(cfg, selected, cuda=cfg.slurm.gpus_per_node > 0, out=out)
    chosen = plan_submission(cfg, selected, force, out, added)
    if not chosen:
        out("nothing to submit: every requested stage is complete and up to date (use --force to re-run)")
        return []
    config_file = write_resolved_config(cfg, slurm_dir(cfg) / "config.resolved.json")
    if force:
        for stage in (s for s in chosen if s not in added):  # an added parent resumes; never wiped
            manifest = read_manifest(cfg.stage_dir(stage))
            if manifest is not None and (cfg.stage_dir(stage) / "checkpoints").exists():
                shutil.rmtree(cfg.stage_dir(stage) / "checkpoints")
    scripts = write_scripts(cfg, chosen, config_file, entry=entry, env=env)
    for script in scripts:
        out(f"[{script.stage}] {script.path}")
    if not do_submit:
        out("not submitted (add --submit, or run sbatch on the scripts in order with --dependency=afterok)")
        return []
    return submit(cfg, scripts, env=env, out=out)
