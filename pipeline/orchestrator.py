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
- ``failed``: run again (it resumes from checkpoints where the config is unchanged).

Before launching a stage, its parents must be ``complete`` with matching chat-format fingerprints, or the
run stops with a message naming the stage and why. A stage's output (stdout and stderr) goes to the
console and to ``outputs/<run>/<stage>/stage.log``; a non-zero exit stops the chain and names that log.
At the end the run report is written (``pipeline/report.py``) and its path printed.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import REPO_ROOT, ConfigError, RunConfig, load_config
from .launch import config_file_for, describe, has_cuda, stage_command, stage_env
from .manifest import (
    MANIFEST,
    ManifestError,
    atomic_write_json,
    check_fingerprints,
    read_manifest,
    require_complete_parent,
)
from .stage import STAGE_ORDER, hint_command, parents_of, stage_identity

Printer = Callable[[str], None]


class StageFailed(RuntimeError):
    """A stage process exited non-zero (or exited without completing its manifest)."""

    def __init__(self, stage: str, returncode: int, log_path: Path, error: str | None):
        self.stage, self.returncode, self.log_path, self.error = stage, returncode, log_path, error
        detail = f": {error}" if error else ""
        super().__init__(
            f"stage '{stage}' failed (exit code {returncode}){detail}\n  log: {log_path}\n"
            f"  fix the cause and re-run the same command: completed stages are skipped and '{stage}' "
            "resumes from its last checkpoint"
        )


@dataclass
class Decision:
    """What the orchestrator does with one stage: ``run``, ``resume``, ``rerun`` or ``skip``, and why."""

    stage: str
    action: str
    reason: str


@dataclass
class PipelineResult:
    run_dir: Path
    config_file: Path
    decisions: list[Decision] = field(default_factory=list)
    report: Path | None = None


# ----------------------------------------------------------------------------------------- processes
def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def _process_start_time(pid: int) -> float | None:
    """Epoch seconds at which ``pid`` started (Linux /proc), or None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    boot = _boot_time()
    if boot is None or len(fields) < 20:
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def process_state(manifest: dict[str, Any]) -> str:
    """For a ``running`` manifest: ``alive``, ``dead`` (its process is gone) or ``other-host``.

    A pid that exists but whose process started well after the manifest was written belongs to another
    program (pid reuse) and counts as ``dead``.
    """
    host = manifest.get("host")
    if host and host != socket.gethostname():
        return "other-host"
    pid = manifest.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return "dead"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        pass  # exists, owned by someone else
    if pid == os.getpid():
        return "alive"
    started = _process_start_time(pid)
    if started is not None and isinstance(manifest.get("started_at"), (int, float)):
        if started > float(manifest["started_at"]) + 5.0:
            return "dead"
    zombie = False
    try:
        zombie = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        pass
    return "dead" if zombie else "alive"


# ------------------------------------------------------------------------------------------ decisions
def select_stages(cfg: RunConfig, requested: Sequence[str] | None) -> list[str]:
    """The stages to run, in pipeline order (the config's stages when none are requested).

    A requested stage that the config's ``stages`` list lacks (``--stages sft rlaif_label rm ppo`` on a
    config without ``rlaif_label``) is added to ``cfg.stages`` in place, so that the stage processes,
    which read the resolved config, chain through it (``parents_of``). Unknown names are a ConfigError.
    """
    if not requested:
        return list(cfg.stages)
    unknown = [s for s in requested if s not in STAGE_ORDER]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; expected some of {', '.join(STAGE_ORDER)}")
    missing = [s for s in requested if s not in cfg.stages]
    if missing:
        from pydantic import ValidationError

        try:
            cfg.stages = [s for s in STAGE_ORDER if s in cfg.stages or s in missing]  # validated assignment
        except ValidationError as err:  # e.g. ppo added without the reward model it needs
            reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
            raise ConfigError(f"--stages {' '.join(requested)}: {reasons}") from None
    return [s for s in cfg.stages if s in requested]


def decide(cfg: RunConfig, stage: str, force: bool = False) -> Decision:
    """Decide from the stage's manifest whether to skip, run, resume or re-run it (see module doc).

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
        if force:
            return Decision(stage, "run", f"--force (an interrupted run by {where} is discarded)")
        if (stage_dir / "checkpoints").exists():
            return Decision(stage, "resume", f"interrupted ({where} is gone); resuming from its last checkpoint")
        return Decision(stage, "rerun", f"interrupted ({where} is gone) before its first checkpoint")
    if force:
        return Decision(stage, "run", "--force")
    if status == "failed":
        error = manifest.get("error") or "no error recorded"
        return Decision(stage, "rerun", f"the previous run failed ({error})")
    if status == "complete":
        config_hash, input_hash = stage_identity(cfg, stage)
        if manifest.get("config_hash") != config_hash:
            return Decision(stage, "run", "its config changed since it completed")
        if manifest.get("input_hash") != input_hash:
            return Decision(stage, "run", "its inputs changed since it completed (a parent stage or a data file)")
        return Decision(stage, "skip", "complete, config and inputs unchanged")
    raise ManifestError(f"{stage_dir / MANIFEST}: unknown status {status!r}; delete the file or re-run with --force")


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


# ------------------------------------------------------------------------------------------ memory
def memory_plans(cfg: RunConfig, stages: Sequence[str], out: Printer, check: bool = True) -> None:
    """Print the memory estimate of each stage; raise MemoryPlanError when one cannot fit the device."""
    if importlib.util.find_spec("pipeline.memory") is None:
        out("memory plan: pipeline/memory.py is not in this checkout; no estimate printed")
        return
    from . import memory

    device = memory.device_memory_bytes(cfg) if check else None
    for stage in stages:
        plan = memory.estimate(cfg, stage)
        out(plan.format())
        if device is not None:
            plan.check(device)


def _stage_deepspeed(cfg: RunConfig, stage: str) -> tuple[str, int, int, float, str, float | None] | None:
    """(json path, micro batch, grad accum, lr, precision, max grad norm) of a stage that names a DeepSpeed JSON."""
    if stage in ("sft", "rm"):
        train = getattr(cfg, stage).train
        if train.deepspeed:
            return (train.deepspeed, train.per_device_batch_size, train.gradient_accumulation_steps,
                    train.learning_rate, train.precision, train.max_grad_norm)
    if stage == "ppo" and cfg.ppo.deepspeed:
        ppo = cfg.ppo
        return (ppo.deepspeed, ppo.mini_batch_size // ppo.gradient_accumulation_steps, ppo.gradient_accumulation_steps,
                ppo.learning_rate, ppo.precision, ppo.max_grad_norm)
    return None


def check_deepspeed(cfg: RunConfig, stages: Sequence[str], cuda: bool, out: Printer) -> None:
    """Validate offline the DeepSpeed JSON each stage names, at the run's world size (ConfigError if bad)."""
    wanted = {s: d for s in stages if (d := _stage_deepspeed(cfg, s)) is not None}
    if not wanted or importlib.util.find_spec("pipeline.deepspeed_check") is None:
        return
    from .deepspeed_check import validate_ds_config

    world = cfg.launch.nnodes * cfg.launch.nproc_per_node
    problems: list[str] = []
    for stage, (path, micro, accum, lr, precision, clip) in wanted.items():
        bf16 = precision == "bf16" or (precision == "auto" and cuda)
        found = validate_ds_config(path, world, micro, accum, lr, bf16, max_grad_norm=clip)
        problems += [f"stage '{stage}': {p}" for p in found]
        if not found:
            out(f"[{stage}] DeepSpeed config {path}: valid at world size {world}")
    if problems:
        raise ConfigError("DeepSpeed config problems:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------------- launch
def write_resolved_config(cfg: RunConfig, path: Path | None = None) -> Path:
    """Write the resolved config as JSON (what each stage process reads) and return its path."""
    path = path or config_file_for(cfg)
    atomic_write_json(path, cfg.to_dict())
    return path


def run_process(cmd: list[str], env: dict[str, str], log_path: Path, append: bool, echo: bool = True) -> int:
    """Run ``cmd`` from the repo root, tee its stdout+stderr to ``log_path`` (and the console), return its code.

    Ctrl-C is passed on to the process, which gets 60 s to save its state before it is terminated.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab" if append else "wb") as log:
        header = f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {describe(cmd)}\n"
        log.write(header.encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = proc.stdout.fileno()
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                if echo:
                    sys.stdout.write(decoder.decode(chunk))
                    sys.stdout.flush()
            return proc.wait()
        except KeyboardInterrupt:
            _stop(proc)
            raise
        finally:
            proc.stdout.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        # a terminal's Ctrl-C reached the stage too (same process group): give it a moment to save and exit
        proc.wait(timeout=3)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    """A TCP port that is free on this machine right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_stage(cfg: RunConfig, stage: str, config_file: Path, decision: Decision, cpu: bool,
                 entry: str | None = None, echo: bool = True) -> None:
    """Start ``stage`` with the configured launcher; raise StageFailed unless it exits 0 with a complete manifest."""
    stage_dir = cfg.stage_dir(stage)
    if decision.action == "run" and (stage_dir / "checkpoints").exists():
        # a fresh run (--force, or a changed config) must not pick up old training state
        shutil.rmtree(stage_dir / "checkpoints")
    env = stage_env(cfg, cpu=cpu)
    if (cfg.launch.launcher == "deepspeed" and cfg.launch.nnodes == 1 and "master_port" not in cfg.launch.model_fields_set
            and not env.get("MASTER_PORT")):
        env["MASTER_PORT"] = str(free_port())  # one node: any free port, so that two runs never collide
    cmd = stage_command(cfg, stage, config_file, entry=entry, env=env)
    log_path = stage_dir / "stage.log"
    code = run_process(cmd, env, log_path, append=decision.action != "run", echo=echo)
    manifest = read_manifest(stage_dir) or {}
    if code != 0:
        raise StageFailed(stage, code, log_path, manifest.get("error"))
    if manifest.get("status") != "complete":
        raise StageFailed(stage, code, log_path,
                          f"the process exited 0 but {stage_dir / MANIFEST} says status={manifest.get('status')!r}")


# ---------------------------------------------------------------------------------------------- run
class RunLock:
    """An exclusive lock on ``outputs/<run>/.orchestrator.lock`` while one ``pipeline run`` drives the run.

    ``flock`` is released by the kernel when the process dies, so a crashed orchestrator never leaves a
    stale lock behind. A second orchestrator on the same run gets a ManifestError naming the holder.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".orchestrator.lock"
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ManifestError(
                f"another `pipeline run` is driving {self.path.parent} ({holder}); wait for it to finish "
                "or stop it, then re-run"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def run_pipeline(config: str | os.PathLike, overrides: Sequence[str] = (), stages: Sequence[str] | None = None,
                 force: bool = False, entry: str | None = None, out: Printer = print, echo: bool = True,
                 report: bool = True) -> PipelineResult:
    """Run the requested stages of a config (see the module doc). Returns what was done and the report path.

    Raises ConfigError (bad config/overrides), ManifestError (a parent or a concurrent run stops the
    chain), MemoryPlanError (a stage cannot fit), StageFailed (a stage process failed).
    """
    cfg = load_config(config, list(overrides))
    selected = select_stages(cfg, stages)
    cfg.run_dir().mkdir(parents=True, exist_ok=True)
    config_file = write_resolved_config(cfg)
    out(f"run '{cfg.run_name}': {cfg.run_dir()}  (resolved config: {config_file})")
    out(f"stages: {' -> '.join(selected)}   launcher: {cfg.launch.launcher}"
        + (f" x{cfg.launch.nproc_per_node}/node, {cfg.launch.nnodes} node(s)" if cfg.launch.launcher != "local" else ""))
    memory_plans(cfg, selected, out)
    with RunLock(cfg.run_dir()):
        result = _run_stages(cfg, selected, config_file, force, entry, out, echo)
    if report:
        from .report import write_report

        result.report = write_report(cfg, out=out)
        out(f"report: {result.report}")
    return result


def _run_stages(cfg: RunConfig, selected: Sequence[str], config_file: Path, force: bool, entry: str | None,
                out: Printer, echo: bool) -> PipelineResult:
    cuda: bool | None = None
    result = PipelineResult(cfg.run_dir(), config_file)
    ran_now: set[str] = set()
    for stage in selected:
        decision = decide(cfg, stage, force=force)
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
        launch_stage(cfg, stage, config_file, decision, cpu=not cuda, entry=entry, echo=echo)
        ran_now.add(stage)
        out(f"[{stage}] complete in {time.time() - started:.1f} s")
    return result


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
    if status == "running":
        state = process_state(manifest)
        row["detail"] = {"alive": f"in progress (pid {manifest.get('pid')})",
                         "dead": f"interrupted (pid {manifest.get('pid')} is gone); re-run to resume",
                         "other-host": f"running on {manifest.get('host')} (pid {manifest.get('pid')})"}[state]
    elif status == "failed":
        row["detail"] = manifest.get("error") or ""
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
    stages = list(cfg.stages) + [s for s in STAGE_ORDER if s not in cfg.stages and cfg.stage_dir(s).exists()]
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
    from .slurm import format_job_states

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
