"""The run report: ``outputs/<run>/report.md`` with PNG plots (matplotlib, Agg), DESIGN §6.

``write_report`` first runs the held-out evaluation (``pipeline.evaluation``: answers generated, scored and
compared, cached, written to ``evaluation.json``), then renders. Rendering reads only files: the stages'
``manifest.json`` and ``metrics.jsonl``, ``evaluation.json`` and the answer rows it names
(``report/samples*.json``), ``standard_eval.json``; it loads no model (``render_report``).

The answer comes first: the verdict table (each policy against its parent on held-out prompts,
``verdict.py``), then the training signals (the RM's held-out accuracy, PPO's reward and KL at the start and
end of training). Then sections, each from the stage's ``metrics.jsonl`` and ``manifest.json`` (a stage that
has not run says "not run"; ``sections.py``):

- overview: each stage's status, wall time and folder;
- SFT: training ``loss`` and ``eval_loss`` curves;
- RLAIF labels: a pointer to the labelling stage's final metrics;
- RM: accuracy curves (``accuracy``/``eval_accuracy``), held-out accuracy and mean margin, accuracy by
  margin bucket, and the score histogram the RM stage saves (``score_histogram.png``);
- PPO and DPO: their logged curves;
- sample generations of SFT and each policy on the same held-out prompts with their verifier and RM scores
  and the judge's verdict (from ``ppo/samples.jsonl`` when the PPO stage wrote it, else generated greedily);
- the few-shot baseline and the distillation models, when the run has them.

Under the training signals, the lm-evaluation-harness figures of ``python -m pipeline eval`` when it has
run (``standard_eval.json``, read only: the report never runs lm-eval).

Last, every stage's final metrics (its manifest's ``metrics``), each table in a collapsed ``<details>`` block.
Plots and copied images live in ``outputs/<run>/report/``; links in the Markdown are relative.
``report.html`` beside ``report.md`` is the same report as one self-contained page, images inlined.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import RunConfig, load_config
from ..evaluation import evaluate
from ..evaluation.cache import Printer
from ..evaluation.runs import POLICY_STAGES, RESULTS_DIR, run_stages
from ..manifest import atomic_write_text
from .sections import (
    STANDARD_EVAL_FILE,
    STANDARD_EVAL_SAMPLES,
    full_metrics_lines,
    stage_lines,
    standard_eval_lines,
    training_summary_lines,
)
from .verdict import (
    distill_section,
    icl_section,
    off_task_samples_section,
    samples_section,
    verdict_entries,
    verdict_lines,
)


def render_report(cfg: RunConfig, evaluation: dict[str, Any] | None, out: Printer = print) -> Path:
    """Write ``outputs/<run>/report.md`` (+ ``report/*.png``, ``report.html``) from the stages' manifests and
    metrics and ``evaluation`` (what ``evaluation.json`` holds; None: no verdict); return its path."""
    run_dir = cfg.run_dir()
    plots = run_dir / RESULTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    stages = run_stages(cfg)
    evaluation = evaluation or {}
    entries = verdict_entries(evaluation)
    lines = [f"# alignpipe run report: {cfg.run_name}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from `{run_dir}`.", ""]
    if entries:
        lines += verdict_lines(entries)
    lines += training_summary_lines(cfg, stages)
    lines += standard_eval_lines(cfg)
    lines += stage_lines(cfg, stages, plots)
    for policy in POLICY_STAGES:
        if policy in entries:
            lines += samples_section(cfg, evaluation, policy, entries[policy][1])
            lines += off_task_samples_section(cfg, evaluation, policy)
    if "icl" in evaluation:
        lines += icl_section(cfg, evaluation)
    if "distill" in evaluation:
        lines += distill_section(cfg, evaluation)
    lines += full_metrics_lines(cfg, stages)
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    try:
        from ..report_html import write_html_report

        write_html_report(path)
    except Exception as exc:  # noqa: BLE001 - report.md stands on its own; say why there is no HTML copy
        out(f"report: report.html not written ({type(exc).__name__}: {exc})")
    return path


def write_report(cfg: RunConfig, out: Printer = print, generate_samples: bool = True,
                 n_samples: int | None = None) -> Path:
    """The held-out evaluation (``pipeline.evaluation.evaluate``: each comparison from its cache when that is
    fresh, generated when ``generate_samples``; on ``n_samples`` prompts, default ``report.n_prompts``), then
    the report rendered from it (:func:`render_report`); returns the path of ``report.md``."""
    return render_report(cfg, evaluate(cfg, out=out, generate=generate_samples, n=n_samples), out)


def report_for(config: str | os.PathLike, overrides: Sequence[str] = (), out: Printer = print,
               generate_samples: bool = True) -> Path:
    """``python -m pipeline report CONFIG``: load the config and write the report."""
    return write_report(load_config(config, list(overrides)), out=out, generate_samples=generate_samples)


__all__ = ["STANDARD_EVAL_FILE", "STANDARD_EVAL_SAMPLES", "render_report", "report_for", "standard_eval_lines",
           "write_report"]
