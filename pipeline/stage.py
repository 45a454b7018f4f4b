"""What every stage process shares: its folder, its manifest lifecycle, its metrics log, its parents.

A stage's ``run(cfg: RunConfig) -> dict`` (its ``StageSpec``, pipeline/registry.py) does its work inside
``with StageContext(cfg, "sft") as ctx:`` (stages/context.py), which holds a ``StageRun``. On entry the manifest
says ``running`` (with this pid); on a clean exit it says ``complete`` with final metrics and wall time; on an
exception, ``failed`` with the error.

``stage_identity`` gives the (config_hash, input_hash) pair that the orchestrator compares to decide
whether a complete stage can be skipped: the stage's own config section plus the model/chat sections,
the hashes of the parent manifests it consumes, and the hashes of its data files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import RunConfig, resolve_path
from .manifest import (
    ManifestError,
    check_fingerprints,
    hash_file,
    hash_json,
    new_manifest,
    read_manifest,
    require_complete_parent,
    write_manifest,
)
from .preemption import (  # noqa: F401  (STOP_EXIT_CODE, StageInterrupted: re-exported for the stages)
    STOP_EXIT_CODE,
    StageInterrupted,
    StageStopped,
    stop_request_for,
)
from .registry import DATA_FIELDS, parents_of, spec_of
from .sections import drop_added_defaults

#: ``rollout`` keys that shape only PPO's loss: the sampling stages' hashes leave them out (the ppo stage's
#: ``identity_extra`` puts them back into its own).
PPO_ONLY_ROLLOUT_KEYS = ("importance_sampling", "importance_sampling_cap")


def stage_section(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """What a stage's config hash covers (and its manifest records as ``config``): the model and chat sections,
    its own section and the seed; for a stage that samples (``StageSpec.samples``) the judges and, with
    another engine than hf, the rollout settings; then its spec's ``identity_extra``."""
    spec = spec_of(cfg, stage)
    data = drop_added_defaults(cfg, cfg.to_dict())  # settings added since, at their defaults: as before them
    # model.hub_id only names the base in model cards: it changes no weights, so it is not part of the identity
    model = {key: value for key, value in data["model"].items() if key != "hub_id"}
    section = {"model": model, "chat": data["chat"], stage: data[stage], "seed": data["seed"]}
    if spec.samples:
        section["rlaif"] = data["rlaif"]
        if cfg.rollout.backend != "hf":  # another engine samples other responses (hf: hashes stay as they were)
            # engine_logp_warn only decides when to print a warning
            dropped = ("engine_logp_warn", *PPO_ONLY_ROLLOUT_KEYS)
            section["rollout"] = {k: v for k, v in data["rollout"].items() if k not in dropped}
    if spec.identity_extra is not None:
        section.update(spec.identity_extra(cfg, data))
    return section


def data_sources(cfg: RunConfig, stage: str) -> list[str]:
    """The local data files a stage reads by config: its section's ``StageSpec.data_fields``. ``rm`` with
    ``rlaif_label`` among the stages trains on the labelled file instead of ``rm.data``: that file is covered
    by the rlaif_label manifest's hash (a parent), and the unused ``rm.data`` file is left out of the input
    hash (likewise ``sft`` with ``distill``)."""
    spec = spec_of(cfg, stage)
    section = getattr(cfg, stage)
    out = []
    for name in spec.data_fields(cfg) if spec.data_fields is not None else DATA_FIELDS:
        source = getattr(section, name, None)
        if source is not None and not source.path.startswith("hub:"):
            out.append(source.path)
    return out


def data_hashes(cfg: RunConfig, stage: str) -> dict[str, str]:
    """Content hash of each data file, keyed by the path as the config writes it (where it was found is not
    part of the hash: a checkout and an installed copy reading the same file agree)."""
    return {p: hash_file(resolve_path(p)) for p in data_sources(cfg, stage)}


def data_locations(cfg: RunConfig, stage: str) -> dict[str, str]:
    """Where each data file was found (``pipeline/paths.py``), for the manifest and the 'inputs changed' reason."""
    return {p: str(resolve_path(p)) for p in data_sources(cfg, stage)}


def parent_hashes(cfg: RunConfig, stage: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for parent in parents_of(cfg, stage):
        path = cfg.stage_dir(parent) / "manifest.json"
        out[parent] = hash_file(path) if path.exists() else None
    return out


def external_models(cfg: RunConfig, stage: str) -> dict[str, str]:
    """Models a stage loads that no stage of this run made (PPO: ``ppo.policy``, ``ppo.reward_model``, a
    ``critic_from`` path), by config key -> location (local folder or hub name): its spec's
    ``external_models``."""
    spec = spec_of(cfg, stage)
    return spec.external_models(cfg) if spec.external_models is not None else {}


def model_fingerprint(location: str) -> str:
    """A cheap fingerprint of a model folder (file names, sizes, modification times) or a hub name as is.

    Weights are not read (they can be many GB): a model retrained in place changes sizes or times, so a
    complete stage that used it is re-run rather than skipped."""
    folder = Path(location)
    if not folder.is_dir():
        return f"hub:{location}"
    files = sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in folder.rglob("*") if f.is_file())
    return hash_json(files)


def _renamed(section: dict[str, Any], stage: str, renames: Mapping[str, str]) -> dict[str, Any]:
    section = dict(section)
    if isinstance(section.get(stage), dict):
        section[stage] = {renames.get(key, key): value for key, value in section[stage].items()}
    return section


def hashed_section(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """``stage_section`` as the config hash reads it: settings renamed after run folders were written with them
    (``StageSpec.former_names``) under their former names, so a stage made before the rename stays up to date
    (same value, same meaning; only the name changed)."""
    return _renamed(stage_section(cfg, stage), stage, spec_of(cfg, stage).former_names)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(recorded: dict[str, Any], cfg: RunConfig, stage: str, limit: int = 4) -> list[str]:
    """What differs between a manifest's recorded ``config`` and ``cfg``'s section of ``stage``, for
    messages: ``["ppo.kl_coef: 0.05 -> 0.1", "rollout.importance_sampling: (not set) -> 'auto'"]`` (at most
    ``limit`` entries, then ``"... N more"``). Settings recorded under a former name compare (and show)
    under the current one."""
    current_names = {old: new for new, old in spec_of(cfg, stage).former_names.items()}
    old = _flatten(json.loads(json.dumps(_renamed(recorded, stage, current_names), default=str)))
    new = _flatten(json.loads(json.dumps(stage_section(cfg, stage), default=str)))
    unset = object()
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, unset) != new.get(k, unset))

    def show(value: Any) -> str:
        return "(not set)" if value is unset else repr(value)

    out = [f"{k}: {show(old.get(k, unset))} -> {show(new.get(k, unset))}" for k in keys[:limit]]
    return out + ([f"... {len(keys) - limit} more"] if len(keys) > limit else [])


def input_changes(manifest: dict[str, Any], cfg: RunConfig, stage: str) -> list[str]:
    """What differs between the inputs a manifest recorded and ``cfg``'s, for messages: a parent that re-ran,
    a data file whose content changed (with where it is read from now, and was: a relative path may now be
    found elsewhere, ``pipeline/paths.py``), a data file added or no longer read, an external model."""
    out = []
    recorded_parents = {p: v.get("hash") for p, v in (manifest.get("parents") or {}).items() if isinstance(v, dict)}
    for parent, now in parent_hashes(cfg, stage).items():
        if recorded_parents.get(parent) != now:
            out.append(f"parent '{parent}' changed")
    old, new = manifest.get("data_files") or {}, data_hashes(cfg, stage)
    was, where = manifest.get("data_locations") or {}, data_locations(cfg, stage)
    for path in sorted(old.keys() | new.keys()):
        if path not in new:
            out.append(f"data file {path} is no longer read")
        elif path not in old:
            out.append(f"data file {path} is read now ({where[path]})")
        elif old[path] != new[path]:
            moved = f", was {was[path]}" if path in was and was[path] != where[path] else ""
            out.append(f"data file {path} changed (read from {where[path]}{moved})")
    recorded_models = {k: v.get("fingerprint") for k, v in (manifest.get("external_models") or {}).items()}
    out += [f"model {key} changed" for key, loc in external_models(cfg, stage).items()
            if recorded_models.get(key) != model_fingerprint(loc)]
    return out


def stage_identity(cfg: RunConfig, stage: str) -> tuple[str, str]:
    config_hash = hash_json(hashed_section(cfg, stage))
    inputs: dict[str, Any] = {"parents": parent_hashes(cfg, stage), "data": data_hashes(cfg, stage)}
    models = external_models(cfg, stage)
    if models:  # only when there are some, so the hashes of existing runs stay what they were
        inputs["models"] = {key: model_fingerprint(loc) for key, loc in models.items()}
    input_hash = hash_json(inputs)
    return config_hash, input_hash


def resume_step(stage_dir: str | os.PathLike) -> int | None:
    """The step a re-run of the stage resumes from: the checkpoint ``checkpoints/latest`` names (None: none)."""
    checkpoints = Path(stage_dir) / "checkpoints"
    try:
        tag = (checkpoints / "latest").read_text().strip()
    except OSError:
        return None
    if not tag.startswith("step-") or not (checkpoints / tag).is_dir():
        return None
    try:
        return int(tag.removeprefix("step-"))
    except ValueError:
        return None


def hint_command(stage: str) -> str:
    return f"make {stage} CONFIG=<your config>  (or: python -m pipeline run CONFIG --stages {stage})"


def _current_rss_bytes() -> int | None:
    """Resident set size of this process now (Linux /proc; None elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_memory(rss_start: int | None = None) -> dict[str, Any]:
    """This process's peak memory, for the manifest (bench/gpu_check.py compares it with pipeline/memory.py):
    ``rss_peak_bytes`` (ru_maxrss: the whole process's life), ``rss_start_bytes`` (when the stage began, after
    the imports: the runtime's own share), and on CUDA ``cuda_max_allocated_bytes`` / ``cuda_max_reserved_bytes``
    of the current device (torch's allocator; rank 0's, as only rank 0 writes the manifest)."""
    import sys

    out: dict[str, Any] = {"rss_start_bytes": rss_start}
    try:
        import resource

        out["rss_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    except (ImportError, OSError):
        out["rss_peak_bytes"] = None
    torch = sys.modules.get("torch")  # never import torch here: the control plane runs without it
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_device"] = torch.cuda.get_device_name()
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        out["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    return out


class StageRun:
    """Context manager for one stage run: manifest, metrics.jsonl, parents, optional wandb/TensorBoard."""

    def __init__(self, cfg: RunConfig, stage: str, is_main: bool = True):
        self.cfg = cfg
        self.stage = stage
        self.dir = cfg.stage_dir(stage)
        self.checkpoints = self.dir / "checkpoints"
        self.is_main = is_main
        self.started = time.time()
        self.manifest: dict[str, Any] = {}
        self.parents: dict[str, dict[str, Any]] = {}
        self._wandb = None
        self._tb = None

    # -------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "StageRun":
        self.dir.mkdir(parents=True, exist_ok=True)
        for parent in parents_of(self.cfg, self.stage):
            self.parents[parent] = require_complete_parent(
                self.cfg.stage_dir(parent), parent, self.stage, hint_command(parent)
            )
        check_fingerprints(self.stage, {p: m.get("chat_fingerprint") for p, m in self.parents.items()})
        config_hash, input_hash = stage_identity(self.cfg, self.stage)
        previous = read_manifest(self.dir)
        self.resuming = bool(previous and previous.get("status") in ("running", "failed", "interrupted")
                             and previous.get("config_hash") == config_hash and self.checkpoints.exists())
        if not self.resuming and self.is_main and self.checkpoints.exists():
            # a different config or a finished stage: stale training state must not leak into this run
            shutil.rmtree(self.checkpoints)
        if not self.resuming and self.is_main and (self.dir / "metrics.jsonl").exists():
            (self.dir / "metrics.jsonl").unlink()
        self.manifest = new_manifest(self.stage, stage_section(self.cfg, self.stage), config_hash, input_hash)
        self.manifest["run_name"] = self.cfg.run_name
        self.manifest["parents"] = {
            p: {"path": str(self.cfg.stage_dir(p) / "manifest.json"), "hash": h}
            for p, h in parent_hashes(self.cfg, self.stage).items()
        }
        self.manifest["data_files"] = data_hashes(self.cfg, self.stage)
        self.manifest["data_locations"] = data_locations(self.cfg, self.stage)
        models = external_models(self.cfg, self.stage)
        if models:
            self.manifest["external_models"] = {key: {"location": loc, "fingerprint": model_fingerprint(loc)}
                                                for key, loc in models.items()}
        self.manifest["resumed"] = self.resuming
        self._rss_start = _current_rss_bytes()
        # SIGTERM / SIGUSR1 / the stop file / the deadline: a training loop stops at a step boundary
        launch = self.cfg.launch
        self.stop = stop_request_for(self.dir, launch.time_limit_for(self.stage), launch.time_limit_margin_s)
        self.stop.install()
        try:
            if self.is_main:
                write_manifest(self.dir, self.manifest)
                self._open_loggers()
        except BaseException:  # __exit__ will not run: the handlers must not outlive the stage
            self.stop.restore()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.manifest["wall_time_s"] = round(time.time() - self.started, 3)
        self.manifest["peak_memory"] = peak_memory(getattr(self, "_rss_start", None))
        if exc is None:
            self.manifest["status"] = "complete"
            if self.is_main and self.checkpoints.exists():
                # training state is kept only until the stage completes (DESIGN §1)
                shutil.rmtree(self.checkpoints, ignore_errors=True)
            if self.is_main:
                self._write_model_cards()
        elif isinstance(exc, KeyboardInterrupt):  # Ctrl-C or a stop request: resumable, not an error of the stage
            self.manifest["status"] = "interrupted"
            self.manifest["interrupted_by"] = str(exc) if isinstance(exc, StageInterrupted) else "SIGINT (Ctrl-C)"
            self.manifest["resume_step"] = resume_step(self.dir)
            if isinstance(exc, StageStopped):  # at a step boundary, with a checkpoint at that step
                self.manifest["stopped_at_step"] = exc.step
        else:
            self.manifest["status"] = "failed"
            self.manifest["error"] = "".join(traceback.format_exception_only(exc_type, exc)).strip()
            self.manifest["resume_step"] = resume_step(self.dir)
        try:
            if self.is_main:
                write_manifest(self.dir, self.manifest)
                self._close_loggers()
        finally:
            if getattr(self, "stop", None) is not None:
                # only now: a launcher that sees another rank exit first sends SIGTERM, which must not cut the
                # manifest's writing short
                self.stop.restore()
        return False

    def _write_model_cards(self) -> None:
        """A hub-style README.md in model/ and adapter/ (``pipeline/modelcard.py``); a card that cannot be
        written is reported, never a reason to fail a stage whose model is saved."""
        from .modelcard import write_model_cards

        try:
            write_model_cards(self.dir, self.manifest)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            print(f"[alignpipe] warning: no model card written for '{self.stage}': {exc}", flush=True)

    # ---------------------------------------------------------------------------------- helpers
    def parent_dir(self, parent: str) -> Path:
        return self.cfg.stage_dir(parent)

    def set_chat_format(self, fmt: dict[str, Any], fingerprint: str) -> None:
        for parent, manifest in self.parents.items():
            theirs = manifest.get("chat_fingerprint")
            if theirs is not None and theirs != fingerprint:
                raise ManifestError(
                    f"stage '{self.stage}': the chat format in force differs from the '{parent}' stage's "
                    f"(fingerprint {fingerprint[:12]} vs {theirs[:12]}). Re-run '{parent}' with --force or "
                    "use the same tokenizer/template."
                )
        self.manifest["chat_format"] = fmt
        self.manifest["chat_fingerprint"] = fingerprint

    def update(self, **fields: Any) -> None:
        """Merge fields into the manifest (written at exit; call ``flush`` to write now)."""
        self.manifest.update(fields)

    def flush(self) -> None:
        if self.is_main:
            write_manifest(self.dir, self.manifest)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        row = {"step": step, "time": round(time.time() - self.started, 3), **metrics}
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row, default=float) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._wandb is not None:
            self._wandb.log({f"{self.stage}/{k}": v for k, v in scalars.items()}, step=step)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{self.stage}/{k}", v, step)

    def _open_loggers(self) -> None:
        log_cfg = self.cfg.logging
        if log_cfg.wandb:
            try:
                import wandb

                os.environ.setdefault("WANDB_MODE", log_cfg.wandb_mode)
                self._wandb = wandb.init(
                    project=log_cfg.wandb_project, name=f"{self.cfg.run_name}-{self.stage}",
                    dir=str(self.dir), config=stage_section(self.cfg, self.stage), reinit=True,
                )
            except ImportError:
                print("[alignpipe] logging.wandb is on but wandb is not installed: pip install wandb")
        if log_cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
            except ImportError:
                print("[alignpipe] logging.tensorboard is on but tensorboard is not installed: pip install tensorboard")

    def _close_loggers(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
