"""``python -m pipeline push RUN STAGE --repo NAME``: upload a stage's model (or adapter) with its card.

``RUN`` is a run folder (``outputs/<run>``) or a run name under ``outputs/``. The folder sent is the
stage's ``model/`` (``--adapter``: ``adapter/``), as it is, with its ``README.md`` card
(``pipeline/modelcard.py``; written from the manifest first when a stage completed before cards existed).
The stage must be ``complete``. ``--dry-run`` lists the files and their sizes and sends nothing; the
upload is ``huggingface_hub.HfApi.create_repo`` + ``upload_folder``, with the token read from the
environment variable ``--token-env`` names (default ``HF_TOKEN``; unset: huggingface_hub's own login).
The token is never printed or logged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError
from .manifest import read_manifest
from .modelcard import CARD, write_model_cards


@dataclass
class PushPlan:
    folder: Path
    repo: str
    files: list[tuple[str, int]] = field(default_factory=list)  # (path in the repo, bytes)


def stage_folder(run: str, stage: str) -> Path:
    """The stage folder of ``run`` (a run folder, or a run name under ``outputs/``)."""
    run_dir = Path(run)
    if not run_dir.is_dir() and (Path("outputs") / run).is_dir():
        run_dir = Path("outputs") / run
    stage_dir = run_dir / stage
    if not stage_dir.is_dir():
        raise ConfigError(f"no stage folder {stage_dir}; RUN is outputs/<run> (or the run name), STAGE e.g. sft")
    return stage_dir


def plan_push(run: str, stage: str, repo: str, adapter: bool = False) -> PushPlan:
    """Check the stage and list what would be sent; writes the card when the folder has none."""
    stage_dir = stage_folder(run, stage)
    manifest = read_manifest(stage_dir)
    if manifest is None or manifest.get("status") != "complete":
        status = "no manifest" if manifest is None else f"status={manifest.get('status')!r}"
        raise ConfigError(f"{stage_dir}: only a complete stage can be pushed ({status})")
    kind = "adapter" if adapter else "model"
    folder = stage_dir / kind
    if not folder.is_dir():
        other = "--adapter " if not adapter and (stage_dir / "adapter").is_dir() else ""
        raise ConfigError(f"{folder} does not exist" + (f"; push the adapter with {other}" if other else ""))
    if not (folder / CARD).exists():
        write_model_cards(stage_dir, manifest)
    if not repo or repo.count("/") > 1:
        raise ConfigError(f"--repo {repo!r}: give a hub repository name, NAME or ORG/NAME")
    files = sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*")
                   if p.is_file() and not p.name.startswith("."))
    return PushPlan(folder, repo, files)


def push(run: str, stage: str, repo: str, adapter: bool = False, dry_run: bool = False, private: bool = False,
         token_env: str = "HF_TOKEN", out: Callable[[str], None] = print) -> PushPlan:
    """Upload (or with ``dry_run`` only list) a stage's model or adapter folder to the hub repo ``repo``."""
    plan = plan_push(run, stage, repo, adapter)
    total = sum(size for _, size in plan.files)
    out(f"{'would send' if dry_run else 'sending'} {plan.folder} -> hub:{repo} "
        f"({len(plan.files)} files, {total / 1e6:.1f} MB)")
    for name, size in plan.files:
        out(f"  {name}  {size:,} bytes")
    if dry_run:
        return plan
    from huggingface_hub import HfApi

    token = os.environ.get(token_env) or None  # None: huggingface_hub's own login; never printed
    api = HfApi(token=token)
    url = api.create_repo(repo, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(plan.folder), repo_id=repo, repo_type="model",
                      commit_message=f"alignpipe: {Path(run).name} / {stage} ({plan.folder.name})",
                      ignore_patterns=[".*"])
    out(f"pushed: {url}")
    return plan
