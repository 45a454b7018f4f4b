"""The report's sections from each stage's ``manifest.json`` and ``metrics.jsonl``: the overview, each stage's
own section (its spec's ``report_section``, written with ``StageSection``: the SFT, RLAIF, RM, PPO and DPO
ones live in their stages' declaration modules), the training signals under the verdict, the
lm-evaluation-harness figures of ``python -m pipeline eval`` and every stage's final metrics. A stage that
has not run says so."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..evaluation.runs import STAGE_TITLES, stage_manifest
from ..manifest import MANIFEST, hash_file
from ..registry import stage_specs
from .markdown import md_cell, md_table, metrics_table
from .plots import number, plot_curves, plot_grid, read_metrics, series

STANDARD_EVAL_FILE = "standard_eval.json"  # lm-evaluation-harness results, written by pipeline eval
STANDARD_EVAL_SAMPLES = "standard_eval"  # its per-question answers: <this folder>/<model>-<task>.jsonl
FULL_METRICS_TITLE = "Full metrics"
TREND_STEPS = 5  # the PPO trend compares the mean of the first and of the last this-many logged steps


def _section_head(cfg: RunConfig, stage: str, title: str) -> tuple[list[str], dict[str, Any] | None]:
    """(the section's first lines, the stage's manifest); the manifest is None unless the stage is complete,
    and the lines then say "not run" or its status (and error)."""
    manifest = stage_manifest(cfg, stage)
    lines = [f"## {title}", ""]
    if manifest is None:
        return lines + ["not run", ""], None
    status = manifest.get("status")
    if status != "complete":
        note = f"status: **{status}**"
        if manifest.get("error"):
            note += f" — {manifest['error']}"
        return lines + [note, ""], None
    return lines, manifest


def _overview(cfg: RunConfig, stages: Sequence[str]) -> list[str]:
    rows = []
    for stage in stages:
        manifest = stage_manifest(cfg, stage)
        if manifest is None:
            rows.append((stage, "not run", "", ""))
            continue
        wall = manifest.get("wall_time_s")
        rows.append((stage, manifest.get("status"), f"{wall:.1f}" if isinstance(wall, (int, float)) else "",
                     os.path.relpath(cfg.stage_dir(stage), cfg.run_dir())))
    return md_table(["stage", "status", "wall time (s)", "folder"], rows)


class StageSection:
    """What a stage's ``report_section(section)`` (``StageSpec``) builds its section from: the complete stage's
    manifest, final ``metrics`` and ``metrics.jsonl`` rows, and plots, tables and images that land in the
    report's folder (links relative to the run folder). The report writes the section's heading, and for a stage
    that is not complete its status instead of calling the stage."""

    full_metrics_title = FULL_METRICS_TITLE

    def __init__(self, cfg: RunConfig, stage: str, manifest: dict[str, Any], plots: Path):
        self.cfg, self.stage, self.manifest, self.plots = cfg, stage, manifest, plots
        self.dir = cfg.stage_dir(stage)
        self.metrics: dict[str, Any] = manifest.get("metrics") or {}
        self._rows: list[dict[str, Any]] | None = None

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The stage's ``metrics.jsonl`` rows."""
        if self._rows is None:
            self._rows = read_metrics(self.dir)
        return self._rows

    def _image(self, png: Path | None, alt: str, missing: str | None) -> list[str]:
        if png is None:
            return [missing, ""] if missing else []
        return [f"![{alt}]({png.relative_to(self.cfg.run_dir())})", ""]

    def plot(self, file: str, title: str, curves: dict[str, str], ylabel: str = "", missing: str | None = None
             ) -> list[str]:
        """One plot of ``{label: metric key}`` curves over the steps (``missing``: the line when none was logged)."""
        png = plot_curves(self.plots / file, title, {label: series(self.rows, key) for label, key in curves.items()},
                          ylabel)
        return self._image(png, title, missing)

    def grid(self, file: str, title: str, keys: Sequence[str], missing: str | None = None) -> list[str]:
        """Small multiples, one panel per metric key."""
        png = plot_grid(self.plots / file, title, {k: series(self.rows, k) for k in keys})
        return self._image(png, f"{title} curves", missing)

    def image(self, source: Path, file: str, alt: str) -> list[str]:
        """A picture the stage saved, copied into the report's folder."""
        target = self.plots / file
        shutil.copyfile(source, target)
        return self._image(target, alt, None)

    @staticmethod
    def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
        return md_table(header, rows) + [""]

    @staticmethod
    def cell(value: Any) -> str:
        return md_cell(value)


def _trend(rows: Sequence[dict[str, Any]], key: str) -> tuple[float, float, float, float, int] | None:
    """(first step, last step, mean of the first k values, mean of the last k values, k) of ``key``; None
    when fewer than two steps logged it. k = min(TREND_STEPS, a quarter of the steps, at least 1)."""
    steps, values = series(rows, key)
    if len(values) < 2:
        return None
    k = max(1, min(TREND_STEPS, len(values) // 4))
    return steps[0], steps[-1], sum(values[:k]) / k, sum(values[-k:]) / k, k


def training_summary_lines(cfg: RunConfig, stages: Sequence[str]) -> list[str]:
    """Under the verdict: the reward model's held-out accuracy and the PPO reward (``score``) and KL trend,
    start of training against its end (empty when neither stage completed)."""
    lines: list[str] = []
    rm = (stage_manifest(cfg, "rm") if "rm" in stages else None) or {}
    metrics = (rm.get("metrics") or {}) if rm.get("status") == "complete" else {}
    acc = number(metrics.get("eval_accuracy"))
    if acc is not None:
        margin = number(metrics.get("eval_mean_margin"))
        pairs = metrics.get("eval_pairs")
        lines.append(f"- Reward model held-out accuracy: **{acc:.3f}**"
                     + (f" on {pairs} pairs" if isinstance(pairs, int) else "")
                     + (f", mean margin (chosen − rejected) {margin:.3f}" if margin is not None else "")
                     + " (0.5 is chance).")
    ppo = stage_manifest(cfg, "ppo") if "ppo" in stages else None
    if (ppo or {}).get("status") == "complete":
        rows = read_metrics(cfg.stage_dir("ppo"))
        for key, label in (("score", "reward (score)"), ("kl", "KL to the reference")):
            trend = _trend(rows, key)
            if trend is None:
                continue
            first, last, start, end, k = trend
            span = "step" if k == 1 else f"{k} steps"
            lines.append(f"- PPO {label}: {start:.3f} (first {span}, from step {first:g}) -> **{end:.3f}** "
                         f"(last {span}, to step {last:g}), change {end - start:+.3f}.")
    if not lines:
        return []
    return (["### Training signals", ""] + lines
            + ["", "PPO's reward and KL are on its training prompts; the verdict above is on held-out prompts.", ""])


def standard_eval_lines(cfg: RunConfig) -> list[str]:
    """The lm-evaluation-harness figures of ``python -m pipeline eval`` (``outputs/<run>/standard_eval.json``,
    ``pipeline.standard_eval``), base -> SFT -> PPO/DPO per task and metric; empty when it has not run. The
    report only reads them (lm-eval takes minutes per model on a CPU)."""
    path = cfg.run_dir() / STANDARD_EVAL_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    models = saved.get("models") or {}
    if not models:
        return []
    settings = saved.get("settings") or {}
    limit = settings.get("limit")
    shots = settings.get("num_fewshot")
    examples = ("zero-shot" if shots == 0 else
                f"{'the task default' if shots is None else shots} few-shot example(s) from the task's few-shot split")
    lines = ["## Standard evaluation (lm-evaluation-harness)", "",
             f"`python -m pipeline eval`: lm-eval {settings.get('lm_eval_version', '?')}, "
             f"{'the first ' + str(limit) if limit else 'all'} test questions per task, {examples}, "
             f"greedy, up to {settings.get('max_gen_toks')} generated tokens, chat template "
             f"{'on' if settings.get('apply_chat_template') else 'off'}. Interval: Wilson 95% over questions.", ""]
    rows, stale = [], []
    for name, entry in models.items():
        # a stage re-run after the evaluation has a new manifest: its figures describe the old weights
        manifest = cfg.stage_dir(name) / MANIFEST
        if name != "base" and manifest.exists() and hash_file(manifest) != entry.get("identity"):
            stale.append(name)
        for task, summary in (entry.get("tasks") or {}).items():
            for key, m in (summary.get("metrics") or {}).items():
                ci = (f"{m['ci_low']:.3f} to {m['ci_high']:.3f}" if "ci_low" in m else "")
                count = f"{m['correct']}/{summary.get('n')}" if "correct" in m else ""
                stderr = f"{m['stderr']:.3f}" if isinstance(m.get("stderr"), (int, float)) else ""
                rows.append((task, key, STAGE_TITLES.get(name, name), summary.get("n"), summary.get("num_fewshot"),
                             f"**{m['value']:.3f}**", count, stderr, ci, entry.get("wall_time_s")))
    rows.sort(key=lambda r: (r[0], r[1]))  # stable: the models stay in base -> SFT -> PPO order
    lines += md_table(["task", "metric,filter", "model", "questions", "shots", "score", "correct", "stderr",
                       "95% CI", "model's eval wall time (s)"], rows)
    if stale:
        lines += ["", f"Stale: {', '.join(stale)} re-ran after this evaluation; run `python -m pipeline eval` again."]
    return lines + ["", f"Per-question answers: `{STANDARD_EVAL_SAMPLES}/<model>-<task>.jsonl`.", ""]


def full_metrics_lines(cfg: RunConfig, stages: Sequence[str]) -> list[str]:
    """Each completed stage's final metrics (its manifest's ``metrics``) in a collapsed ``<details>`` block."""
    blocks: list[str] = []
    for stage in stages:
        manifest = stage_manifest(cfg, stage)
        if (manifest or {}).get("status") != "complete":
            continue
        table = metrics_table(manifest.get("metrics") or {}, skip=("accuracy_by_margin_bucket",))
        if table:
            title = STAGE_TITLES.get(stage, stage)
            blocks += ["<details>", f"<summary>{title}: final metrics</summary>", ""] + table + ["", "</details>", ""]
    return [f"## {FULL_METRICS_TITLE}", "", "Each stage's final metrics (`manifest.json`), collapsed.", ""] + blocks \
        if blocks else []


def stage_lines(cfg: RunConfig, stages: Sequence[str], plots: Path) -> list[str]:
    """``## Stages`` (the overview table), then the section of each stage the run has (its spec's
    ``report_section``, in pipeline order), plots into ``plots``."""
    lines = ["## Stages", ""] + _overview(cfg, stages) + [""]
    for spec in stage_specs(cfg):
        if spec.name in stages and spec.report_section is not None:
            head, manifest = _section_head(cfg, spec.name, spec.display)
            lines += head
            if manifest is not None:
                lines += spec.report_section(StageSection(cfg, spec.name, manifest, plots))
    return lines
