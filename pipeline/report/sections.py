"""The report's sections from each stage's ``manifest.json`` and ``metrics.jsonl``: the overview, the SFT,
RLAIF, RM, PPO and DPO sections with their plots, the training signals under the verdict, the
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
from .markdown import md_cell, md_table, metrics_table
from .plots import number, plot_curves, plot_grid, read_metrics, series

PPO_KEYS = ("score", "kl", "response_length", "entropy", "eos_rate", "kl_coef")
DPO_KEYS = ("loss", "eval_loss", "margin", "eval_margin", "accuracy", "eval_accuracy")
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


def _sft_section(cfg: RunConfig, plots: Path) -> list[str]:
    lines, manifest = _section_head(cfg, "sft", "SFT")
    if manifest is None:
        return lines
    rows = read_metrics(cfg.stage_dir("sft"))
    png = plot_curves(plots / "sft_loss.png", "SFT loss",
                      {"train loss": series(rows, "loss"), "eval loss": series(rows, "eval_loss"),
                       # token-level distillation: the two parts of the train loss
                       "train CE": series(rows, "ce_loss"), "train KD": series(rows, "kd_loss")}, "loss")
    lines += [f"![SFT loss]({png.relative_to(cfg.run_dir())})", ""] if png else ["no loss logged", ""]
    return lines


def _rlaif_section(cfg: RunConfig) -> list[str]:
    lines, manifest = _section_head(cfg, "rlaif_label", "RLAIF labels")
    if manifest is None:
        return lines
    return lines + [f"The labelling stage's final metrics are under *{FULL_METRICS_TITLE}* at the end.", ""]


def _find_histogram(cfg: RunConfig) -> Path | None:
    stage_dir = cfg.stage_dir("rm")
    for candidate in (stage_dir / "score_histogram.png", stage_dir / "model" / "score_histogram.png"):
        if candidate.exists():
            return candidate
    found = sorted(stage_dir.rglob("score_histogram.png")) if stage_dir.exists() else []
    return found[0] if found else None


def _rm_section(cfg: RunConfig, plots: Path) -> list[str]:
    lines, manifest = _section_head(cfg, "rm", "Reward model")
    if manifest is None:
        return lines
    rows = read_metrics(cfg.stage_dir("rm"))
    metrics = manifest.get("metrics") or {}
    acc = metrics.get("eval_accuracy")
    margin = metrics.get("eval_mean_margin")
    if acc is not None or margin is not None:
        lines += [f"Held-out accuracy: **{md_cell(acc)}**, mean margin (chosen − rejected): **{md_cell(margin)}**", ""]
    png = plot_curves(plots / "rm_accuracy.png", "RM accuracy",
                      {"train accuracy": series(rows, "accuracy"), "eval accuracy": series(rows, "eval_accuracy")},
                      "accuracy")
    if png:
        lines += [f"![RM accuracy]({png.relative_to(cfg.run_dir())})", ""]
    loss_png = plot_curves(plots / "rm_loss.png", "RM loss",
                           {"train loss": series(rows, "loss"), "eval loss": series(rows, "eval_loss")}, "loss")
    if loss_png:
        lines += [f"![RM loss]({loss_png.relative_to(cfg.run_dir())})", ""]
    histogram = _find_histogram(cfg)
    if histogram is not None:
        target = plots / "rm_score_histogram.png"
        shutil.copyfile(histogram, target)
        lines += ["Scores of chosen and rejected responses on held-out pairs:", "",
                  f"![RM score histogram]({target.relative_to(cfg.run_dir())})", ""]
    buckets = metrics.get("accuracy_by_margin_bucket")
    if isinstance(buckets, dict) and buckets:
        lines += ["Accuracy by margin bucket:", ""]
        lines += md_table(["bucket", "accuracy"], [(k, v) for k, v in buckets.items()]) + [""]
    elif isinstance(buckets, list) and buckets and all(isinstance(b, dict) for b in buckets):
        header = list(dict.fromkeys(k for b in buckets for k in b))
        lines += ["Accuracy by margin bucket:", ""]
        lines += md_table(header, [[b.get(h) for h in header] for b in buckets]) + [""]
    return lines


def _curves_section(cfg: RunConfig, plots: Path, stage: str, keys: Sequence[str]) -> list[str]:
    """``## PPO`` / ``## DPO``: the stage's logged curves in one grid of plots."""
    title = stage.upper()
    lines, manifest = _section_head(cfg, stage, title)
    if manifest is None:
        return lines
    rows = read_metrics(cfg.stage_dir(stage))
    png = plot_grid(plots / f"{stage}_curves.png", title, {k: series(rows, k) for k in keys})
    lines += [f"![{title} curves]({png.relative_to(cfg.run_dir())})", ""] if png else [f"no {title} metrics logged", ""]
    return lines


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
    """``## Stages`` (the overview table), then the section of each stage the run has, plots into ``plots``."""
    lines = ["## Stages", ""] + _overview(cfg, stages) + [""]
    if "sft" in stages:
        lines += _sft_section(cfg, plots)
    if "rlaif_label" in stages:
        lines += _rlaif_section(cfg)
    if "rm" in stages:
        lines += _rm_section(cfg, plots)
    if "ppo" in stages:
        lines += _curves_section(cfg, plots, "ppo", PPO_KEYS)
    if "dpo" in stages:
        lines += _curves_section(cfg, plots, "dpo", DPO_KEYS)
    return lines
