"""The run folder as the evaluation and the report read it: which stages the run has, their manifests, and
where the evaluation keeps its results (``evaluation.json``, the answer rows under ``report/``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..manifest import read_manifest
from ..registry import specs, stage_names

EVALUATION_FILE = "evaluation.json"
RESULTS_DIR = "report"  # the answer rows (report/samples*.json) beside the report's plots
# the built-in stages' titles, and those whose output is a policy the evaluation compares with its SFT parent
# (``StageSpec.title``, ``StageSpec.evaluated_policy``)
STAGE_TITLES = {spec.name: spec.title for spec in specs() if spec.title}
POLICY_STAGES = tuple(spec.name for spec in specs() if spec.evaluated_policy)


def run_stages(cfg: RunConfig) -> list[str]:
    """The config's stages, then any other stage of its registry whose folder exists."""
    return list(cfg.stages) + [s for s in stage_names(cfg) if s not in cfg.stages and cfg.stage_dir(s).exists()]


def stage_manifest(cfg: RunConfig, stage: str) -> dict[str, Any] | None:
    """The stage's manifest, None when it has not run, ``{"status": "corrupt", "error"}`` when unreadable."""
    try:
        return read_manifest(cfg.stage_dir(stage))
    except Exception as exc:  # a corrupt manifest is reported, not fatal for the report
        return {"status": "corrupt", "error": str(exc)}


def is_complete(cfg: RunConfig, stage: str) -> bool:
    return (stage_manifest(cfg, stage) or {}).get("status") == "complete"


def rows_file(cfg: RunConfig, name: str) -> Path:
    """Where the evaluation keeps one comparison's answer rows: ``report/samples[_<name>].json`` ("ppo" has
    no suffix), a JSON object ``{"key": cache key, "result": {"rows": [...], ...}}``."""
    suffix = "" if name == "ppo" else f"_{name}"
    return cfg.run_dir() / RESULTS_DIR / f"samples{suffix}.json"


def read_rows_file(cfg: RunConfig, relative: str | None) -> dict[str, Any] | None:
    """The ``result`` saved in a rows file (a path relative to the run folder); None when absent or unreadable."""
    if not relative:
        return None
    try:
        result = json.loads((cfg.run_dir() / relative).read_text()).get("result")
    except (OSError, ValueError, AttributeError):
        return None
    return result if isinstance(result, dict) else None
