"""The stage contract: manifest.json, atomic writes, hashes and the chat-format fingerprint.

Every stage writes ``outputs/<run>/<stage>/manifest.json``; the next stage reads only manifests.
A manifest carries: stage, status (running/complete/failed), the resolved config, parent manifests
(path + hash), data file hashes, the chat-format fingerprint, library versions, git commit, pid/host,
wall time and final metrics. See DESIGN §1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import REPO_ROOT

MANIFEST = "manifest.json"
STATUSES = ("running", "complete", "failed", "interrupted")  # interrupted: a signal, resumable; failed: an error


class ManifestError(RuntimeError):
    """A parent stage's manifest is missing, incomplete or incompatible."""


# ------------------------------------------------------------------------------------ atomic writes
def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written ``tmp_dir`` into place at ``final_dir`` (swap, then delete the old one)."""
    final_dir = Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------- hashing
def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_json(obj: Any) -> str:
    return hash_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


# ------------------------------------------------------------------------------------------ metadata
def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str | None:
    """The commit of alignpipe's checkout; None for an installed copy (whose folder may sit inside some
    other repository, e.g. a project's virtual environment)."""
    if not (REPO_ROOT / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------- manifests
def read_manifest(stage_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: corrupt manifest ({exc})") from exc


def write_manifest(stage_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    if manifest.get("status") not in STATUSES:
        raise ValueError(f"manifest status must be one of {STATUSES}, got {manifest.get('status')!r}")
    atomic_write_json(Path(stage_dir) / MANIFEST, manifest)


def new_manifest(stage: str, config: dict[str, Any], config_hash: str, input_hash: str) -> dict[str, Any]:
    return {
        "stage": stage,
        "status": "running",
        "config": config,
        "config_hash": config_hash,
        "input_hash": input_hash,
        "parents": {},
        "data_files": {},
        "chat_fingerprint": None,
        "chat_format": None,
        "libraries": library_versions(),
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": time.time(),
        "wall_time_s": None,
        "metrics": {},
    }


def require_complete_parent(stage_dir: str | os.PathLike, parent: str, child: str, hint_cmd: str) -> dict:
    """Return the parent's manifest or raise a ManifestError that says which stage and the fix."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise ManifestError(
            f"stage '{child}' needs the '{parent}' stage output at {stage_dir}, which does not exist. "
            f"Make it first: {hint_cmd}"
        )
    if manifest.get("status") != "complete":
        raise ManifestError(
            f"stage '{child}' needs a complete '{parent}' stage, but {Path(stage_dir) / MANIFEST} says "
            f"status={manifest.get('status')!r}. Finish it first: {hint_cmd}"
        )
    return manifest


def check_fingerprints(child: str, fingerprints: dict[str, str | None]) -> None:
    """Refuse to chain stages whose chat-format fingerprints differ (DESIGN §3, §5.7)."""
    distinct = {v for v in fingerprints.values() if v is not None}
    if len(distinct) > 1:
        detail = ", ".join(f"{k}={str(v)[:12]}" for k, v in fingerprints.items())
        raise ManifestError(
            f"stage '{child}': chat-format fingerprints differ ({detail}). The tokenizer, chat template or "
            "special tokens changed between stages; re-run the earlier stages with --force."
        )
