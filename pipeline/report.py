"""The run report: ``outputs/<run>/report.md`` with PNG plots (matplotlib, Agg), DESIGN §6.

The answer comes first: the verdict table (each policy against its parent on held-out prompts), then the
training signals (the RM's held-out accuracy, PPO's reward and KL at the start and end of training). Then
sections, each from the stage's ``metrics.jsonl`` and ``manifest.json`` (a stage that has not run says
"not run"):

- overview: each stage's status, wall time and folder;
- SFT: training ``loss`` and ``eval_loss`` curves;
- RLAIF labels: a pointer to the labelling stage's final metrics;
- RM: accuracy curves (``accuracy``/``eval_accuracy``), held-out accuracy and mean margin, accuracy by
  margin bucket, and the score histogram the RM stage saves (``score_histogram.png``);
- PPO: ``score``, ``kl``, ``response_length``, ``entropy``, ``eos_rate``, ``kl_coef`` curves;
- sample generations from the SFT and PPO policies on the same held-out prompts, with the RM win rate of
  PPO over SFT. They come from ``ppo/samples.jsonl`` (rows ``{prompt, sft, ppo}``) when the PPO stage
  wrote it, else ``sample_generations`` computes them (greedy decoding; prompts from ``ppo.eval_data``
  or the tail of ``ppo.data``) and caches them in ``report/samples.jsonl``;
- the judge win rate of PPO over SFT on the same prompts and responses, by the judge named by
  ``rlaif_label.judge`` (``rlaif.judges``), asked in both orders (inconsistent verdicts are ties). The
  win rates go into ``outputs/<run>/evaluation.json`` (``write_evaluation``) as well as the report.

Under the training signals, the lm-evaluation-harness figures of ``python -m pipeline eval`` when it has
run (``standard_eval.json``, read only: the report never runs lm-eval).

Last, every stage's final metrics (its manifest's ``metrics``), each table in a collapsed ``<details>`` block.
Plots and copied images live in ``outputs/<run>/report/``; links in the Markdown are relative.
``report.html`` beside ``report.md`` is the same report as one self-contained page, images inlined.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import RunConfig, load_config
from .manifest import MANIFEST, atomic_write_json, atomic_write_text, hash_file, hash_json, read_manifest

Printer = Callable[[str], None]
PPO_KEYS = ("score", "kl", "response_length", "entropy", "eos_rate", "kl_coef")
DPO_KEYS = ("loss", "eval_loss", "margin", "eval_margin", "accuracy", "eval_accuracy")
STAGE_TITLES = {"sft": "SFT", "rlaif_label": "RLAIF labels", "rm": "Reward model", "ppo": "PPO", "dpo": "DPO"}
POLICY_STAGES = ("ppo", "dpo")  # stages whose output is a policy the report compares with its SFT parent
SAMPLES_VERSION = 4  # 4: the verifier's per-sample parts (3: verifier, judge and RM comparisons with intervals)
EVALUATION_FILE = "evaluation.json"
STANDARD_EVAL_FILE = "standard_eval.json"  # lm-evaluation-harness results, written by pipeline eval
STANDARD_EVAL_SAMPLES = "standard_eval"  # its per-question answers: <this folder>/<model>-<task>.jsonl
FULL_METRICS_TITLE = "Full metrics"
TREND_STEPS = 5  # the PPO trend compares the mean of the first and of the last this-many logged steps


# --------------------------------------------------------------------------------------------- data
def read_metrics(stage_dir: Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl`` (unparseable lines, e.g. a line cut by a crash, are skipped)."""
    path = Path(stage_dir) / "metrics.jsonl"
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that carry a finite number under ``key`` (row index if no step)."""
    xs: list[float] = []
    ys: list[float] = []
    for i, row in enumerate(rows):
        y = _number(row.get(key))
        if y is None:
            continue
        x = _number(row.get("step"))
        xs.append(x if x is not None else float(i))
        ys.append(y)
    return xs, ys


# -------------------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: Path, title: str, curves: dict[str, tuple[list[float], list[float]]],
                ylabel: str = "", xlabel: str = "step") -> Path | None:
    """One axes with a line per non-empty curve; None (no file) when every curve is empty."""
    curves = {label: xy for label, xy in curves.items() if xy[0]}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    try:
        for label, (xs, ys) in curves.items():
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend()
        fig.tight_layout()
        return _save_png(fig, path)
    finally:
        plt.close(fig)


def _save_png(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_grid(path: Path, title: str, panels: dict[str, tuple[list[float], list[float]]]) -> Path | None:
    """Small multiples: one axes per non-empty panel, three per row."""
    panels = {k: v for k, v in panels.items() if v[0]}
    if not panels:
        return None
    plt = _pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), dpi=100, squeeze=False)
    try:
        flat = [ax for row in axes for ax in row]
        for ax, (name, (xs, ys)) in zip(flat, panels.items()):
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in flat[len(panels):]:
            ax.axis("off")
        fig.suptitle(title)
        fig.tight_layout()
        return _save_png(fig, path)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------- markdown
def md_cell(value: Any, limit: int = 400) -> str:
    """A value as one Markdown table cell (pipes escaped, newlines as <br>, long text cut)."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, default=str)
    else:
        text = "" if value is None else str(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return lines


def _metrics_table(metrics: dict[str, Any], skip: Sequence[str] = ()) -> list[str]:
    rows = [(k, v) for k, v in metrics.items() if k not in skip and not isinstance(v, (dict, list))]
    return md_table(["metric", "value"], rows) if rows else []


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return "" if prompt is None else str(prompt)


# ----------------------------------------------------------------------------------------- sections
def _stage_manifest(cfg: RunConfig, stage: str) -> dict[str, Any] | None:
    try:
        return read_manifest(cfg.stage_dir(stage))
    except Exception as exc:  # a corrupt manifest is reported, not fatal for the report
        return {"status": "corrupt", "error": str(exc)}


def _not_run(stage: str, manifest: dict[str, Any] | None) -> list[str] | None:
    if manifest is None:
        return ["not run", ""]
    status = manifest.get("status")
    if status != "complete":
        note = f"status: **{status}**"
        if manifest.get("error"):
            note += f" — {manifest['error']}"
        return [note, ""]
    return None


def _overview(cfg: RunConfig, stages: Sequence[str]) -> list[str]:
    rows = []
    for stage in stages:
        manifest = _stage_manifest(cfg, stage)
        if manifest is None:
            rows.append((stage, "not run", "", ""))
            continue
        wall = manifest.get("wall_time_s")
        rows.append((stage, manifest.get("status"), f"{wall:.1f}" if isinstance(wall, (int, float)) else "",
                     os.path.relpath(cfg.stage_dir(stage), cfg.run_dir())))
    return md_table(["stage", "status", "wall time (s)", "folder"], rows)


def _sft_section(cfg: RunConfig, plots: Path) -> list[str]:
    manifest = _stage_manifest(cfg, "sft")
    lines = ["## SFT", ""]
    if (missing := _not_run("sft", manifest)) is not None:
        return lines + missing
    rows = read_metrics(cfg.stage_dir("sft"))
    png = plot_curves(plots / "sft_loss.png", "SFT loss",
                      {"train loss": series(rows, "loss"), "eval loss": series(rows, "eval_loss"),
                       # token-level distillation: the two parts of the train loss
                       "train CE": series(rows, "ce_loss"), "train KD": series(rows, "kd_loss")}, "loss")
    lines += [f"![SFT loss]({png.relative_to(cfg.run_dir())})", ""] if png else ["no loss logged", ""]
    return lines


def _rlaif_section(cfg: RunConfig) -> list[str]:
    manifest = _stage_manifest(cfg, "rlaif_label")
    lines = ["## RLAIF labels", ""]
    if (missing := _not_run("rlaif_label", manifest)) is not None:
        return lines + missing
    return lines + [f"The labelling stage's final metrics are under *{FULL_METRICS_TITLE}* at the end.", ""]


def _find_histogram(cfg: RunConfig) -> Path | None:
    stage_dir = cfg.stage_dir("rm")
    for candidate in (stage_dir / "score_histogram.png", stage_dir / "model" / "score_histogram.png"):
        if candidate.exists():
            return candidate
    found = sorted(stage_dir.rglob("score_histogram.png")) if stage_dir.exists() else []
    return found[0] if found else None


def _rm_section(cfg: RunConfig, plots: Path) -> list[str]:
    manifest = _stage_manifest(cfg, "rm")
    lines = ["## Reward model", ""]
    if (missing := _not_run("rm", manifest)) is not None:
        return lines + missing
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
    lines = [f"## {title}", ""]
    if (missing := _not_run(stage, _stage_manifest(cfg, stage))) is not None:
        return lines + missing
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
    rm = (_stage_manifest(cfg, "rm") if "rm" in stages else None) or {}
    metrics = (rm.get("metrics") or {}) if rm.get("status") == "complete" else {}
    acc = _number(metrics.get("eval_accuracy"))
    if acc is not None:
        margin = _number(metrics.get("eval_mean_margin"))
        pairs = metrics.get("eval_pairs")
        lines.append(f"- Reward model held-out accuracy: **{acc:.3f}**"
                     + (f" on {pairs} pairs" if isinstance(pairs, int) else "")
                     + (f", mean margin (chosen − rejected) {margin:.3f}" if margin is not None else "")
                     + " (0.5 is chance).")
    ppo = _stage_manifest(cfg, "ppo") if "ppo" in stages else None
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


def _full_metrics(cfg: RunConfig, stages: Sequence[str]) -> list[str]:
    """Each completed stage's final metrics (its manifest's ``metrics``) in a collapsed ``<details>`` block."""
    blocks: list[str] = []
    for stage in stages:
        manifest = _stage_manifest(cfg, stage)
        if (manifest or {}).get("status") != "complete":
            continue
        table = _metrics_table(manifest.get("metrics") or {}, skip=("accuracy_by_margin_bucket",))
        if table:
            title = STAGE_TITLES.get(stage, stage)
            blocks += ["<details>", f"<summary>{title}: final metrics</summary>", ""] + table + ["", "</details>", ""]
    return [f"## {FULL_METRICS_TITLE}", "", "Each stage's final metrics (`manifest.json`), collapsed.", ""] + blocks \
        if blocks else []


# ----------------------------------------------------------------------------------- sample generations
def held_out_examples(cfg: RunConfig, n: int) -> list[Any]:
    """``n`` held-out ``PromptExample`` rows (prompt + reference): the head of ``report.eval_data``, else of
    ``ppo.eval_data``, else the tail of ``ppo.data`` (prompts PPO may have trained on: the report says so)."""
    from data.formats import load_examples

    source = cfg.report.eval_data or cfg.ppo.eval_data or cfg.ppo.data
    if source is None:
        raise ValueError("none of report.eval_data, ppo.eval_data, ppo.data is set, so there are no prompts "
                         "to sample")
    examples, _ = load_examples(source, "prompt")
    held_out = cfg.report.eval_data is not None or cfg.ppo.eval_data is not None
    return examples[:n] if held_out else examples[-n:]


def held_out_prompts(cfg: RunConfig, n: int) -> list[list[dict[str, str]]]:
    """The prompts (message lists) of :func:`held_out_examples`."""
    return [ex.prompt for ex in held_out_examples(cfg, n)]


def _stage_tokenizer(cfg: RunConfig, stage: str):
    from .models import load_tokenizer

    return load_tokenizer(str(cfg.stage_dir(stage)), cfg.model, cfg.chat)


def _prompt_ids(cfg: RunConfig, tokenizer: Any, prompt: list[dict[str, str]]) -> list[int]:
    """The prompt in the PPO layout (``stages.chat.prompt_ids``), cut from the left."""
    from stages.chat import prompt_ids

    return prompt_ids(tokenizer, prompt, cfg.chat.system_prompt)[-cfg.ppo.max_prompt_length:]


def _generate(cfg: RunConfig, stage: str, prompts: list[list[dict[str, str]]], batch_size: int = 8,
              shots: list[dict[str, str]] | None = None):
    """Greedy responses of ``stage``'s policy: (texts, token id lists up to and including the first eos).

    ``stage`` "icl" is the base model (``prepare_base``) with ``shots`` (few-shot example turns) put before
    each prompt's messages; that prompt is not cut to ``ppo.max_prompt_length`` (the shots would be cut).
    ``stage`` "base" is the base model without shots; "teacher" is ``distill.teacher`` (hf / stage) with its
    own tokenizer and chat template, as the distill stage loads it (``_teacher_model``)."""
    import torch

    from stages.chat import prompt_ids as prompt_ids_of
    from stages.generation import neutral_generate, neutral_generation_config
    from stages.tuning import load_trained

    if stage == "teacher":
        model, tokenizer = _teacher_model(cfg)
    elif stage in ("icl", "base"):
        from .models import load_model, load_tokenizer, prepare_base

        base = prepare_base(cfg.model)
        tokenizer = load_tokenizer(base, cfg.model, cfg.chat)
        model = load_model(base, cfg.model, tokenizer, kind="causal_lm")
    else:
        tokenizer = _stage_tokenizer(cfg, stage)
        model = load_trained(cfg.stage_dir(stage), cfg.model, tokenizer, kind="causal_lm")
    model.eval()
    texts: list[str] = []
    ids: list[list[int]] = []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        enc = ([_prompt_ids(cfg, tokenizer, p) for p in batch] if shots is None else
               [prompt_ids_of(tokenizer, with_shots(shots, p), cfg.chat.system_prompt) for p in batch])
        width = max(len(e) for e in enc)
        input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])  # left padding
        attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
        with torch.no_grad():
            # greedy with no checkpoint generation_config defaults (repetition penalty ...) merged in
            out = neutral_generate(model, neutral_generation_config(tokenizer, cfg.ppo.max_new_tokens),
                                   input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device))
        for row in out[:, width:].tolist():
            row = row[: row.index(eos) + 1] if eos in row else [t for t in row if t != pad]
            ids.append(row)
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    del model
    return texts, ids


def _teacher_model(cfg: RunConfig) -> tuple[Any, Any]:
    """``distill.teacher`` as (model, tokenizer), loaded as the distill stage loads it (``build_teacher``)."""
    if cfg.distill.teacher.kind == "http":
        raise ValueError("distill.teacher is an http endpoint; the report answers held-out prompts with local "
                         "models only (kind hf or stage)")
    from stages.distill import build_teacher

    teacher, _ = build_teacher(cfg)
    return teacher.model, teacher.tokenizer


def score_responses(cfg: RunConfig, prompts: list[list[dict[str, str]]], responses: list[list[int]]) -> list[float]:
    """RM scores (the ``rm`` stage) of prompt + generated response ids, read at the response's eos.

    Uses the RM's loader and scorer (``stages.scoring``), so the layout is the one it was trained on:
    the prompt with the generation prompt, then the generated ids up to and including the first eos.
    """
    from stages.scoring import load_reward_model, score_token_ids

    model, tokenizer = load_reward_model(cfg.stage_dir("rm"), cfg.model)
    sequences = [_prompt_ids(cfg, tokenizer, p) + list(r) for p, r in zip(prompts, responses)]
    scores = score_token_ids(model, sequences, tokenizer.pad_token_id, batch_size=8)
    del model
    return [float(v) for v in scores]


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """Fraction of pairs where ``a`` beats ``b`` (ties count half)."""
    if not a:
        return float("nan")
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


Z95 = 1.959964  # two-sided 95% normal quantile


def wilson_interval(rate: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``rate`` observed on ``n`` trials.

    Used for win rates with ties counted half: a tie has less variance than a coin flip, so treating the
    rate as a plain proportion over ``n`` prompts gives an interval that is, if anything, too wide (never
    a win claimed too easily), and it stays inside [0, 1] for small ``n`` and rates near 0 or 1.
    """
    if n <= 0:
        return float("nan"), float("nan")
    denom = 1.0 + z * z / n
    centre = (rate + z * z / (2 * n)) / denom
    half = z * math.sqrt(rate * (1.0 - rate) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def verdict_of(low: float, high: float) -> str:
    """'policy better' / 'parent better' when the 95% interval of the win rate excludes 0.5."""
    if low > 0.5:
        return "policy better"
    if high < 0.5:
        return "parent better"
    return "no measurable difference"


def paired_comparison(policy: Sequence[str | float], parent: Sequence[str | float]) -> dict[str, Any]:
    """Per-prompt comparison of a policy against its parent, with a 95% interval.

    Args:
        policy, parent: (N,) scores of the same N prompts (higher is better).
    Returns:
        ``{n, wins, losses, ties, win_rate (ties count half), ci_low, ci_high (Wilson), verdict,
        mean_policy, mean_parent, mean_diff, diff_ci_low, diff_ci_high}``: the mean score difference with
        a normal 95% interval over prompts (paired).
    """
    n = len(policy)
    if n == 0 or n != len(parent):
        raise ValueError(f"paired_comparison needs two equally long, non-empty score lists ({n}, {len(parent)})")
    wins = sum(float(a) > float(b) for a, b in zip(policy, parent))
    losses = sum(float(a) < float(b) for a, b in zip(policy, parent))
    rate = (wins + 0.5 * (n - wins - losses)) / n
    low, high = wilson_interval(rate, n)
    diffs = [float(a) - float(b) for a, b in zip(policy, parent)]
    mean_diff = sum(diffs) / n
    _, diff_low, diff_high = mean_interval(diffs)
    half = mean_diff - diff_low
    return {"n": n, "wins": wins, "losses": losses, "ties": n - wins - losses, "win_rate": rate,
            "ci_low": low, "ci_high": high, "verdict": verdict_of(low, high),
            "mean_policy": sum(map(float, policy)) / n, "mean_parent": sum(map(float, parent)) / n,
            "mean_diff": mean_diff, "diff_ci_low": mean_diff - half, "diff_ci_high": mean_diff + half}


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` (N,) with a normal 95% interval, mean ± Z95 x sd / sqrt(N)
    (sample sd; a zero-width interval for N = 1)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = sum(map(float, values)) / n
    sd = math.sqrt(sum((float(v) - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = Z95 * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def outcome_comparison(outcomes: Sequence[str]) -> dict[str, Any]:
    """``paired_comparison`` from verdicts "policy" / "parent" / "tie" (a judge's), as 1 / 0 / 0.5 scores."""
    value = {"policy": 1.0, "parent": 0.0, "tie": 0.5}
    return paired_comparison([value[o] for o in outcomes], [0.5] * len(outcomes))


def verifier_scores(cfg: RunConfig, prompts: list[list[dict[str, str]]], responses: list[str],
                    references: list[Any]) -> tuple[list[float], dict[str, list[float | None]]]:
    """``report.verifier`` (reward-function signature) on the last user message of each prompt.

    Returns (scores, per-sample metrics): the verifier returns a list of scores, or ``{"scores": [...],
    "metrics": {name: [one number or None per response]}}`` (the reward-function form) whose metrics
    (e.g. "correct", "house_format") the report shows for each policy."""
    from stages.ppo.rewards import import_function

    fn = import_function(cfg.report.verifier)
    users = [next((m["content"] for m in reversed(p) if m.get("role") == "user"), "") for p in prompts]
    result = fn(users, list(responses), list(references))
    raw_metrics = result.get("metrics") or {} if isinstance(result, dict) else {}
    scores = [float(x) for x in (result["scores"] if isinstance(result, dict) else result)]
    metrics = {str(k): [None if v is None else float(v) for v in values] for k, values in raw_metrics.items()}
    for name, values in [("scores", scores), *metrics.items()]:
        if len(values) != len(responses):
            raise ValueError(f"report.verifier {cfg.report.verifier!r} returned {len(values)} {name} for "
                             f"{len(responses)} responses")
    return scores, metrics


def judge_win_rate(cfg: RunConfig, rows: list[dict[str, Any]], judge_name: str | None = None,
                   policy: str = "ppo", parent: str = "sft") -> dict[str, Any]:
    """The judge's verdicts of ``policy`` (PPO by default) against SFT on sample rows ``{prompt, sft, ppo}``.

    The judge is ``rlaif.judges[judge_name or rlaif_label.judge]`` (``stages.rlaif.judges.build_judge``,
    its cache included); every pair is asked in both orders (PPO's response shown first, then SFT's), and
    orders that disagree count as a tie. Sets ``row["judge"]`` to "ppo", "sft" or "tie" and returns
    ``{judge, judge_kind, judge_win_rate (ties count half), judge_wins, judge_losses, judge_ties,
    judge_inconsistent, judge_malformed, judge_prompts}``.
    """
    from stages.rlaif.judges import build_judge

    name = judge_name or cfg.rlaif_label.judge
    if not rows:
        raise ValueError("no sample rows to judge")
    judge = build_judge(cfg, name)
    try:
        verdicts = judge.judge_pairs([(r["prompt"], r[policy] or "", r[parent] or "") for r in rows])
        stats = judge.stats.as_dict()
    finally:
        judge.close()
    for row, verdict in zip(rows, verdicts):
        row["judge"] = {"A": policy, "B": parent}.get(verdict.choice, "tie")
    wins = sum(v.choice == "A" for v in verdicts)
    losses = sum(v.choice == "B" for v in verdicts)
    ties = len(verdicts) - wins - losses
    return {"judge": name, "judge_kind": judge.kind, "judge_win_rate": (wins + 0.5 * ties) / len(verdicts),
            "judge_wins": wins, "judge_losses": losses, "judge_ties": ties,
            "judge_inconsistent": stats["inconsistent"], "judge_malformed": stats["malformed"],
            "judge_prompts": len(verdicts)}


def _judge_or_reason(cfg: RunConfig, rows: list[dict[str, Any]], policy: str = "ppo",
                     parent: str = "sft") -> dict[str, Any]:
    """``judge_win_rate``, or ``{judge, judge_error}`` when the judge cannot be built or fails (the report
    must still be written; the reason is shown in it). A config that defines no ``rlaif`` section gets
    ``judge_error`` too rather than the built-in default (an HF judge on the base model, which costs
    minutes on a CPU and, for SmolLM2, only gives ties)."""
    name = cfg.rlaif_label.judge
    if "rlaif" not in cfg.model_fields_set:
        return {"judge": None, "judge_error": "no judge configured (define rlaif.judges and name one in "
                                              "rlaif_label.judge; see configs/demo.yaml)"}
    if name not in cfg.rlaif.judges:
        return {"judge": name, "judge_error": f"no judge named {name!r} under rlaif.judges"}
    try:
        return judge_win_rate(cfg, rows, name, policy, parent)
    except Exception as exc:  # noqa: BLE001 - any judge failure is reported, not fatal
        return {"judge": name, "judge_error": f"{type(exc).__name__}: {exc}"}


def sample_generations(cfg: RunConfig, prompts: list[list[dict[str, str]]] | None = None,
                       n: int | None = None, judge: bool = True, references: list[Any] | None = None,
                       policy: str = "ppo") -> dict[str, Any]:
    """Greedy generations of the SFT policy and ``policy`` (a stage in POLICY_STAGES: PPO by default) on the same
    held-out prompts, compared three ways; the row keys below name the policy ("ppo", "dpo").

    ``prompts``: message lists (or plain strings, taken as one user turn); None picks ``n`` (default
    ``report.n_prompts``) held-out prompts with their references (``held_out_examples``). Returns
    ``{"rows": [{prompt, reference, sft, ppo, rm_sft, rm_ppo, verifier_sft, verifier_ppo, judge}],
    "comparisons": {"verifier"|"judge"|"rm": paired_comparison(...)}, "rm_win_rate", "rm_mean_sft",
    "rm_mean_ppo", **judge_win_rate(...)}``; RM fields are absent without an RM stage, verifier fields
    without ``report.verifier``, judge fields with ``judge=False`` (a failing judge gives ``judge_error``).
    """
    import torch

    n = n or cfg.report.n_prompts
    if prompts is None:
        examples = held_out_examples(cfg, n)
        prompts, references = [ex.prompt for ex in examples], [ex.reference for ex in examples]
    prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts][:n]
    references = list(references or [None] * len(prompts))[:len(prompts)]
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.ppo.train.num_threads or threads)
    try:
        sft_texts, sft_ids = _generate(cfg, "sft", prompts, cfg.report.batch_size)
        ppo_texts, ppo_ids = _generate(cfg, policy, prompts, cfg.report.batch_size)
        rows: list[dict[str, Any]] = [
            {"prompt": p, "reference": r, "sft": s, policy: q}
            for p, r, s, q in zip(prompts, references, sft_texts, ppo_texts)
        ]
        result: dict[str, Any] = {"rows": rows}
        if cfg.report.verifier:
            (v_sft, m_sft), (v_ppo, m_ppo) = (verifier_scores(cfg, prompts, texts, references)
                                              for texts in (sft_texts, ppo_texts))
            for i, (row, a, b) in enumerate(zip(rows, v_sft, v_ppo)):
                row["verifier_sft"], row[f"verifier_{policy}"] = a, b
                if m_sft:
                    row["verifier_metrics_sft"] = {k: v[i] for k, v in m_sft.items()}
                    row[f"verifier_metrics_{policy}"] = {k: v[i] for k, v in m_ppo.items()}
        rm_manifest = read_manifest(cfg.stage_dir("rm"))
        if rm_manifest is not None and rm_manifest.get("status") == "complete":
            rm_sft = score_responses(cfg, prompts, sft_ids)
            rm_ppo = score_responses(cfg, prompts, ppo_ids)
            for row, a, b in zip(rows, rm_sft, rm_ppo):
                row["rm_sft"], row[f"rm_{policy}"] = a, b
            result.update({"rm_win_rate": win_rate(rm_ppo, rm_sft), "rm_mean_sft": sum(rm_sft) / len(rm_sft),
                           f"rm_mean_{policy}": sum(rm_ppo) / len(rm_ppo)})
        if judge:
            result.update(_judge_or_reason(cfg, rows, policy))
        return add_comparisons(cfg, result, policy)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ few-shot baseline
def with_shots(shots: Sequence[dict[str, str]], prompt: list[dict[str, str]]) -> list[dict[str, str]]:
    """``prompt`` with the few-shot example turns before it (a system message of the prompt stays first)."""
    head = [m for m in prompt[:1] if m.get("role") == "system"]
    return head + list(shots) + list(prompt[len(head):])


def _last_user(messages: list[dict[str, str]]) -> str:
    return next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")


def icl_shots(cfg: RunConfig, held_out: Sequence[list[dict[str, str]]]) -> list[dict[str, str]]:
    """The few-shot turns of the ICL baseline: ``report.icl_shots`` (user, assistant) pairs from ``sft.data``.

    Each SFT conversation offers its first user turn with the assistant turn answering it; conversations whose
    user turn is the last user turn of a ``held_out`` prompt are skipped (so are repeated user turns). The
    pairs are drawn by ``random.Random(seed)`` (the run's ``seed``): the same config gives the same shots.
    Returns the 2k messages, user/assistant alternating."""
    import random

    from data.formats import load_examples

    k = cfg.report.icl_shots
    if k <= 0:
        return []
    if cfg.sft.data is None:
        raise ValueError("report.icl_shots needs sft.data: the few-shot examples come from the run's SFT data")
    examples, _ = load_examples(cfg.sft.data, "sft")
    banned = {_last_user(p).strip() for p in held_out}
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for example in examples:
        msgs = example.messages
        turn = next((i for i in range(len(msgs) - 1)
                     if msgs[i].get("role") == "user" and msgs[i + 1].get("role") == "assistant"), None)
        if turn is None:
            continue
        user = str(msgs[turn]["content"]).strip()
        if user and user not in banned and user not in seen:
            seen.add(user)
            pairs.append((msgs[turn]["content"], msgs[turn + 1]["content"]))
    if len(pairs) < k:
        raise ValueError(f"report.icl_shots = {k}, but sft.data has only {len(pairs)} usable examples whose "
                         "prompt is not held out")
    shots: list[dict[str, str]] = []
    for i in random.Random(cfg.seed).sample(range(len(pairs)), k):
        shots += [{"role": "user", "content": pairs[i][0]}, {"role": "assistant", "content": pairs[i][1]}]
    return shots


def icl_generations(cfg: RunConfig, n: int | None = None, judge: bool = True,
                    policies: dict[str, dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """The few-shot (ICL) baseline: greedy answers of the base model prompted with :func:`icl_shots` before each
    held-out prompt, compared with SFT and with each policy by the same verifier, judge and RM as the verdict.

    ``policies``: policy stage -> its ``sample_generations`` result; its answers (and scores) are reused when
    its rows are the same held-out prompts, otherwise that policy is left out. Returns ``{"shots": k,
    "examples": the shot messages, "results": {"sft"|policy: {"rows": [{prompt, reference, icl, <who>,
    verifier_icl, verifier_<who>, rm_icl, rm_<who>, judge}], "policy": who, "parent": "icl", "comparisons",
    judge fields}}}`` (``add_comparisons(..., parent="icl")``).
    """
    import torch

    n = n or cfg.report.n_prompts
    examples = held_out_examples(cfg, n)
    prompts, references = [ex.prompt for ex in examples], [ex.reference for ex in examples]
    shots = icl_shots(cfg, prompts)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.ppo.train.num_threads or threads)
    try:
        icl_texts, icl_ids = _generate(cfg, "icl", prompts, cfg.report.batch_size, shots=shots)
        answers: dict[str, dict[str, Any]] = {}  # who -> {texts, ids or None, rm, verifier}
        for policy, result in (policies or {}).items():
            rows = (result or {}).get("rows") or []
            if [r.get("prompt") for r in rows] != prompts:
                continue
            for who in ("sft", policy):
                if who not in answers:
                    answers[who] = {"texts": [r[who] for r in rows], "ids": None,
                                    "rm": [r[f"rm_{who}"] for r in rows] if all(f"rm_{who}" in r for r in rows)
                                    else None}
        if "sft" not in answers:
            sft_texts, sft_ids = _generate(cfg, "sft", prompts, cfg.report.batch_size)
            answers = {"sft": {"texts": sft_texts, "ids": sft_ids, "rm": None}, **answers}
        has_rm = (read_manifest(cfg.stage_dir("rm")) or {}).get("status") == "complete"
        rm_icl = score_responses(cfg, prompts, icl_ids) if has_rm else None
        verifier_icl = verifier_scores(cfg, prompts, icl_texts, references) if cfg.report.verifier else None
        results: dict[str, Any] = {}
        for who, answer in answers.items():
            if has_rm and answer["rm"] is None and answer["ids"] is not None:
                answer["rm"] = score_responses(cfg, prompts, answer["ids"])
            rows = [{"prompt": p, "reference": r, "icl": a, who: b}
                    for p, r, a, b in zip(prompts, references, icl_texts, answer["texts"])]
            if verifier_icl is not None:
                (v_icl, m_icl), (v_who, m_who) = verifier_icl, verifier_scores(cfg, prompts, answer["texts"],
                                                                               references)
                for i, row in enumerate(rows):
                    row["verifier_icl"], row[f"verifier_{who}"] = v_icl[i], v_who[i]
                    if m_icl:
                        row["verifier_metrics_icl"] = {k: v[i] for k, v in m_icl.items()}
                        row[f"verifier_metrics_{who}"] = {k: v[i] for k, v in m_who.items()}
            if rm_icl is not None and answer["rm"] is not None:
                for row, a, b in zip(rows, rm_icl, answer["rm"]):
                    row["rm_icl"], row[f"rm_{who}"] = a, b
            result = {"rows": rows, "policy": who, "parent": "icl", "shots": cfg.report.icl_shots}
            if judge:
                result.update(_judge_or_reason(cfg, rows, who, "icl"))
            results[who] = add_comparisons(cfg, result, who, "icl")
        return {"shots": cfg.report.icl_shots, "examples": shots, "results": results}
    finally:
        torch.set_num_threads(threads)


def _load_icl(cfg: RunConfig, plots: Path, generate: bool, n: int, out: Printer,
              policies: dict[str, tuple[dict[str, Any] | None, str]]) -> tuple[dict[str, Any] | None, str]:
    """:func:`icl_generations` (cached in ``report/samples_icl.json``) and where it came from, or (None, why not)."""
    key = hash_json({"v": SAMPLES_VERSION, "sft": _samples_key(cfg, n, "sft"),
                     "model": cfg.model.model_dump(mode="json"), "seed": cfg.seed,
                     "policies": {p: _samples_key(cfg, n, p) for p in policies}})
    return _cached_or_generated(
        plots / "samples_icl.json", key, generate, out,
        f"generating {n} answers of the {cfg.report.icl_shots}-shot base model (ICL baseline)", "ICL baseline",
        lambda: icl_generations(cfg, n, policies={p: r for p, (r, _) in policies.items()}))


def _cached_or_generated(cache: Path, key: str, generate: bool, out: Printer, doing: str, what: str,
                         produce: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """The result cached under ``key`` in ``cache``, else ``produce()`` (when ``generate``) written there:
    -> (result or None, where it came from / why not). A failure is returned as the reason (the report must
    still be written)."""
    if cache.exists():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                return cached["result"], "greedy decoding (cached)"
        except (json.JSONDecodeError, KeyError):
            pass
    if not generate:
        return None, "not generated (run `python -m pipeline report CONFIG` to generate them)"
    out(f"report: {doing} ...")
    try:
        result = produce()
    except Exception as exc:  # the report must still be written; the reason is shown in it
        return None, f"{what} failed: {type(exc).__name__}: {exc}"
    atomic_write_json(cache, {"key": key, "result": result})
    return result, "greedy decoding"


def _icl_section(cfg: RunConfig, icl: dict[str, Any] | None, source: str) -> list[str]:
    k = cfg.report.icl_shots
    lines = [f"## Few-shot baseline: the base model with {k} examples (ICL)", ""]
    if icl is None:
        return lines + [source, ""]
    shots = icl["examples"]
    lines += [f"The base model answers each held-out prompt after {k} (user, assistant) examples drawn from "
              f"`sft.data` (seed {cfg.seed}; never a held-out prompt), {source}. The examples:", ""]
    lines += md_table(["user", "assistant"], [(shots[i]["content"], shots[i + 1]["content"])
                                              for i in range(0, len(shots), 2)]) + [""]
    sft = icl["results"].get("sft")
    if sft:
        lines += md_table(["prompt", f"ICL ({k}-shot base)", "SFT"],
                          [[_prompt_text(r["prompt"]), r["icl"], r["sft"]] for r in sft["rows"]]) + [""]
    return lines


# ------------------------------------------------------------------------------- distillation: three models
DISTILL_MODELS = {"teacher": "distill teacher", "base": "base model (student before)", "sft": "SFT (student after)"}


def distill_generations(cfg: RunConfig, n: int | None = None, judge: bool = True) -> dict[str, Any]:
    """Teacher, student before and student after on the same held-out prompts (greedy, ``_generate``): the
    ``distill.teacher``, the base model (where the sft stage starts) and the sft stage (trained on the teacher's
    answers), scored by ``report.verifier``; the student after is compared with each of the other two as the
    verdict compares a policy with its parent (``add_comparisons``, the judge too when one is configured).

    Returns ``{"rows": [{prompt, reference, teacher, base, sft, verifier_<who>, verifier_metrics_<who>}],
    "overlap": how many of the prompts are among distill.data's, "results": {"base"|"teacher": {"rows",
    "policy": "sft", "parent", "comparisons", judge fields}}}``."""
    import torch

    from data.formats import load_examples

    n = n or cfg.report.n_prompts
    examples = held_out_examples(cfg, n)
    prompts, references = [ex.prompt for ex in examples], [ex.reference for ex in examples]
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.ppo.train.num_threads or threads)
    try:
        answers = {who: _generate(cfg, who, prompts, cfg.report.batch_size)[0] for who in DISTILL_MODELS}
    finally:
        torch.set_num_threads(threads)
    rows = [{"prompt": p, "reference": r, **{who: texts[i] for who, texts in answers.items()}}
            for i, (p, r) in enumerate(zip(prompts, references))]
    if cfg.report.verifier:
        for who, texts in answers.items():
            scores, parts = verifier_scores(cfg, prompts, texts, references)
            for i, row in enumerate(rows):
                row[f"verifier_{who}"] = scores[i]
                if parts:
                    row[f"verifier_metrics_{who}"] = {k: v[i] for k, v in parts.items()}
    results: dict[str, Any] = {}
    for parent in ("base", "teacher"):
        result = {"rows": [dict(r) for r in rows], "policy": "sft", "parent": parent}  # the judge marks each row
        if judge:
            result.update(_judge_or_reason(cfg, result["rows"], "sft", parent))
        results[parent] = add_comparisons(cfg, result, "sft", parent)
    trained_on: set[str] = set()
    if cfg.distill.data is not None:
        trained_on = {_last_user(ex.prompt).strip() for ex in load_examples(cfg.distill.data, "prompt")[0]}
    overlap = sum(_last_user(p).strip() in trained_on for p in prompts)
    return {"rows": rows, "overlap": overlap, "results": results}


def _load_distill(cfg: RunConfig, plots: Path, generate: bool, n: int,
                  out: Printer) -> tuple[dict[str, Any] | None, str]:
    """:func:`distill_generations` (cached in ``report/samples_distill.json``) and where it came from, or (None,
    why not)."""
    teacher = cfg.distill.teacher
    teacher_manifest = Path(teacher.path or "") / MANIFEST if teacher.kind == "stage" else None
    key = hash_json({"v": SAMPLES_VERSION, "samples": _samples_key(cfg, n, "distill"),
                     "model": cfg.model.model_dump(mode="json"), "teacher": teacher.model_dump(mode="json"),
                     "teacher_manifest": hash_file(teacher_manifest) if teacher_manifest and teacher_manifest.exists()
                     else None, "distill_data": cfg.distill.data.model_dump(mode="json") if cfg.distill.data else None})
    return _cached_or_generated(
        plots / "samples_distill.json", key, generate, out,
        f"generating {n} answers each of the distill teacher, the base model and SFT", "distillation comparison",
        lambda: distill_generations(cfg, n))


def _distill_section(cfg: RunConfig, result: dict[str, Any] | None, source: str) -> list[str]:
    lines = ["## Distillation: teacher, student before, student after", ""]
    if result is None:
        return lines + [source, ""]
    rows, t = result["rows"], cfg.distill.teacher
    teacher = {"stage": t.path, "hf": t.model, "http": t.base_url}[t.kind]
    token_level = cfg.distill.token_level
    how = (f" with token-level distillation ({token_level.loss}, weight {token_level.weight}, temperature "
           f"{token_level.temperature})" if token_level.enabled else "")
    lines += [f"{len(rows)} held-out prompts ({result['overlap']} of them among distill.data's prompts), {source}. "
              f"Teacher: {t.kind} `{teacher}`; student before: the base model; student after: the sft stage, "
              f"trained on the teacher's answers{how}.", ""]
    if rows and all(f"verifier_{who}" in r for r in rows for who in DISTILL_MODELS):
        parts = list(rows[0].get("verifier_metrics_sft") or {})
        table = []
        for who, title in DISTILL_MODELS.items():
            mean, low, high = mean_interval([r[f"verifier_{who}"] for r in rows])
            means = [_mean_known([(r.get(f"verifier_metrics_{who}") or {}).get(p) for r in rows]) for p in parts]
            table.append([title, len(rows), f"**{mean:.3f}**", f"{low:.3f} to {high:.3f}",
                          *[f"{m:.3f}" if m is not None else "" for m in means]])
        lines += md_table(["model", "prompts", f"verifier {cfg.report.verifier}", "95% CI",
                           *[f"{p} (mean)" for p in parts]], table)
        lines += ["", "Interval: normal 95% over prompts (mean ± 1.96 sd/√n). The paired comparisons of the student "
                  "after against the other two are in the verdict.", ""]
    lines += md_table(["prompt", "teacher", "student before (base)", "student after (SFT)"],
                      [[_prompt_text(r["prompt"]), r["teacher"], r["base"], r["sft"]] for r in rows])
    return lines + [""]


def _mean_known(values: Sequence[float | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return sum(known) / len(known) if known else None


def add_comparisons(cfg: RunConfig, result: dict[str, Any], policy: str = "ppo", parent: str = "sft") -> dict[str, Any]:
    """``result["comparisons"]``: ``paired_comparison`` of ``policy`` against ``parent`` (SFT, or "icl": the
    few-shot base model) for each check the rows carry (``verifier_*``, ``rm_*`` scores; ``judge`` verdicts),
    keyed "verifier", "judge", "rm"."""
    rows = result["rows"]
    comparisons: dict[str, Any] = {}
    if rows and all(f"verifier_{parent}" in r and f"verifier_{policy}" in r for r in rows):
        comparisons["verifier"] = {"check": f"verifier {cfg.report.verifier}", **paired_comparison(
            [r[f"verifier_{policy}"] for r in rows], [r[f"verifier_{parent}"] for r in rows])}
        if all(f"verifier_metrics_{parent}" in r and f"verifier_metrics_{policy}" in r for r in rows):
            comparisons["verifier"]["metrics"] = {
                name: {side: _mean_known([r[f"verifier_metrics_{who}"].get(name) for r in rows])
                       for side, who in ((parent, parent), ("policy", policy))}
                for name in rows[0][f"verifier_metrics_{parent}"]}
    if "judge_win_rate" in result and all("judge" in r for r in rows):
        outcomes = [{policy: "policy", parent: "parent"}.get(r["judge"], "tie") for r in rows]
        comparisons["judge"] = {"check": f"judge {result['judge']} ({result.get('judge_kind')}), both orders",
                                **outcome_comparison(outcomes)}
    if rows and all(f"rm_{parent}" in r and f"rm_{policy}" in r for r in rows):
        comparisons["rm"] = {"check": "reward model (rm stage)", **paired_comparison(
            [r[f"rm_{policy}"] for r in rows], [r[f"rm_{parent}"] for r in rows])}
    result["comparisons"] = comparisons
    return result


def _samples_key(cfg: RunConfig, n: int, policy: str = "ppo") -> str:
    hashes = {s: hash_file(cfg.stage_dir(s) / MANIFEST) if (cfg.stage_dir(s) / MANIFEST).exists() else None
              for s in ("sft", "rm", policy)}
    judge = cfg.rlaif.judges.get(cfg.rlaif_label.judge)
    return hash_json({"v": SAMPLES_VERSION, "n": n, "manifests": hashes, "policy": policy,
                      "ppo": cfg.ppo.model_dump(mode="json"),
                      "report": cfg.report.model_dump(mode="json"),
                      "chat": cfg.chat.model_dump(mode="json"), "judge": cfg.rlaif_label.judge,
                      "judge_config": judge.model_dump(mode="json") if judge is not None else None})


def _load_samples(cfg: RunConfig, plots: Path, generate: bool, n: int,
                  out: Printer, policy: str = "ppo") -> tuple[dict[str, Any] | None, str]:
    """Sample rows of SFT and ``policy`` and where they came from, or (None, why not)."""
    ppo_file = cfg.stage_dir("ppo") / "samples.jsonl"
    if policy == "ppo" and ppo_file.exists():
        rows = [json.loads(line) for line in ppo_file.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if isinstance(r, dict) and "sft" in r and "ppo" in r]
        if rows:
            result: dict[str, Any] = {"rows": rows}
            if all("rm_ppo" in r and "rm_sft" in r for r in rows):
                result["rm_win_rate"] = win_rate([r["rm_ppo"] for r in rows], [r["rm_sft"] for r in rows])
            if generate:
                result.update(_judge_or_reason(cfg, rows))
            return add_comparisons(cfg, result), f"from {ppo_file.relative_to(cfg.run_dir())}"
    def has_model(stage: str) -> bool:
        folder = cfg.stage_dir(stage)
        return (folder / "model" / "config.json").exists() or (folder / "adapter" / "adapter_config.json").exists()

    if not (has_model("sft") and has_model(policy)):
        return None, f"the SFT or {STAGE_TITLES[policy]} stage has no model to sample from"
    suffix = "" if policy == "ppo" else f"_{policy}"
    result, source = _cached_or_generated(
        plots / f"samples{suffix}.json", _samples_key(cfg, n, policy), generate, out,
        f"generating {n} samples from the SFT and {STAGE_TITLES[policy]} policies", "sample generation",
        lambda: sample_generations(cfg, None, n, policy=policy))
    if result is not None and source == "greedy decoding":  # freshly generated: the rows as JSONL too
        with open(plots / f"samples{suffix}.jsonl", "w") as fh:
            for row in result["rows"]:
                fh.write(json.dumps(row) + "\n")
    return result, source


def _samples_section(cfg: RunConfig, result: dict[str, Any] | None, source: str, policy: str = "ppo") -> list[str]:
    title = STAGE_TITLES[policy]
    lines = [f"## Sample generations: SFT vs {title}", ""]
    ppo = _stage_manifest(cfg, policy)
    if result is None:
        return lines + [source, ""]
    rows = result["rows"]
    lines += [f"{len(rows)} held-out prompts, {source}.", ""]
    if "judge_error" in result:
        who = f"judge `{result['judge']}`: " if result.get("judge") else ""
        lines += [f"Judge: not computed ({who}{result['judge_error']}).", ""]
    judge = {k: v for k, v in (((ppo or {}).get("metrics") or {}).items()) if "win_rate" in k}
    if judge:
        rates = ", ".join(f"{k} = {md_cell(v)}" for k, v in judge.items())
        lines += [f"Win rates recorded by the {title} stage: {rates}", ""]
    lines += [f"The verdict's figures are in `{EVALUATION_FILE}`.", ""]
    has_scores = all("rm_sft" in r and f"rm_{policy}" in r for r in rows)
    has_verifier = all("verifier_sft" in r and f"verifier_{policy}" in r for r in rows)
    has_judge = all("judge" in r for r in rows)
    header = (["prompt", "SFT", title] + (["verifier SFT", f"verifier {title}"] if has_verifier else [])
              + (["RM SFT", f"RM {title}"] if has_scores else []) + (["judge"] if has_judge else []))
    table = [[_prompt_text(r.get("prompt")), r.get("sft"), r.get(policy)]
             + ([r["verifier_sft"], r[f"verifier_{policy}"]] if has_verifier else [])
             + ([r["rm_sft"], r[f"rm_{policy}"]] if has_scores else []) + ([r["judge"]] if has_judge else [])
             for r in rows]
    return lines + md_table(header, table) + [""]


def verdict_lines(results: dict[str, tuple[dict[str, Any] | None, str]]) -> list[str]:
    """The report's first answer, one table for every policy the run produced: did it beat its parent (SFT)
    on the same held-out prompts, check by check (verifier, judge, RM), with intervals.

    ``results``: policy stage -> (sample_generations result or None, where it came from / why not)."""
    lines = ["## Verdict: each policy against its parent (SFT) on held-out prompts", ""]
    table, notes, parts_lines = [], [], []
    for key, (result, source) in results.items():
        policy, parent = (result or {}).get("policy", key), (result or {}).get("parent", "sft")
        title, parent_title = STAGE_TITLES.get(policy, policy), "SFT"
        if parent == "icl" or key.startswith("icl_"):
            parent_title = f"ICL ({(result or {}).get('shots', '?')}-shot base)"
            title = f"{title} vs {parent_title}"
        elif key.startswith("distill_"):  # distillation: the student after (SFT) against the teacher / its start
            parent_title = DISTILL_MODELS[parent]
            title = f"{title} vs {parent_title}"
        comparisons = (result or {}).get("comparisons") or {}
        if not comparisons:
            notes.append(f"{title}: no comparison available ({source}).")
            continue
        for name in ("verifier", "judge", "rm"):
            c = comparisons.get(name)
            if c is None:
                continue
            mean = (f"{c['mean_parent']:.3f} -> {c['mean_policy']:.3f} (diff {c['mean_diff']:+.3f}, 95% CI "
                    f"{c['diff_ci_low']:+.3f} to {c['diff_ci_high']:+.3f})") if name != "judge" else ""
            table.append([title, c["check"], c["n"], c["wins"], c["losses"], c["ties"], f"{c['win_rate']:.3f}",
                          f"{c['ci_low']:.3f} to {c['ci_high']:.3f}", f"**{c['verdict']}**", mean])
        parts = (comparisons.get("verifier") or {}).get("metrics") or {}
        known = [f"{name} {m[parent]:.3f} -> {m['policy']:.3f}" for name, m in parts.items()
                 if m[parent] is not None and m["policy"] is not None]
        if known:
            who = title if parent == "sft" else STAGE_TITLES.get(policy, policy)
            parts_lines.append(f"Verifier parts, {title}, mean over the same prompts ({parent_title} -> {who}): "
                               + "; ".join(known) + ".")
    if table:
        lines += md_table(["policy", "check", "prompts", "policy wins", "parent wins", "ties", "win rate",
                           "95% CI", "verdict", "mean score parent -> policy"], table)
    for line in parts_lines + notes:
        lines += ["", line]
    if table:
        lines += ["", "Win rate: ties count half; the interval is Wilson's score interval over prompts; a result "
                  "whose interval includes 0.5 is \"no measurable difference\". The verifier and judge are checks "
                  "the reward model cannot see; the RM row is the reward PPO optimised."]
        if any(k.startswith("icl_") for k in results):
            lines += ["", "Rows \"X vs ICL (k-shot base)\": the fine-tuned model X (policy) against the base model "
                      "prompted with k examples from the run's SFT data (parent), on the same prompts: did "
                      "fine-tuning beat few-shot prompting?"]
        if any(k.startswith("distill_") for k in results):
            lines += ["", f"Rows \"SFT vs {DISTILL_MODELS['base']}\" and \"SFT vs {DISTILL_MODELS['teacher']}\": the "
                      "distillation student after its sft stage (policy) against itself before it and against the "
                      "teacher (parent), on the same prompts: how much of the teacher's skill moved over?"]
    return lines + [""]


def write_evaluation(cfg: RunConfig, result: dict[str, Any] | None, source: str,
                     others: dict[str, tuple[dict[str, Any] | None, str]] | None = None,
                     icl: tuple[dict[str, Any] | None, str] | None = None,
                 distill: tuple[dict[str, Any] | None, str] | None = None) -> Path:
    """``outputs/<run>/evaluation.json``: PPO vs SFT on held-out prompts, by the RM and by the judge; every
    other policy stage (``others``: DPO ...) under ``policies.<stage>`` with its source and comparisons.

    Keys: ``n_prompts``, ``source`` (where the generations came from), ``rm_win_rate``, ``rm_mean_sft``,
    ``rm_mean_ppo`` (when there is an RM), ``judge``, ``judge_kind``, ``judge_win_rate``, ``judge_wins``,
    ``judge_losses``, ``judge_ties``, ``judge_inconsistent``, ``judge_malformed`` (or ``judge_error``).
    With the few-shot baseline (``icl``: ``icl_generations`` result, source): ``icl`` = ``{shots, source,
    examples, policies: {sft|<policy>: {n_prompts, comparisons}}}``, each against the k-shot base model.
    """
    keys = ("rm_win_rate", "rm_mean_sft", "rm_mean_ppo", "judge", "judge_kind", "judge_win_rate", "judge_wins",
            "judge_losses", "judge_ties", "judge_inconsistent", "judge_malformed", "judge_error", "comparisons")
    result = result or {"rows": []}
    evaluation = {"run_name": cfg.run_name, "policy": "ppo", "baseline": "sft", "n_prompts": len(result["rows"]),
                  "source": source, **{k: result[k] for k in keys if k in result},
                  "policies": {stage: {"source": src, "n_prompts": len((res or {}).get("rows") or []),
                                       "comparisons": (res or {}).get("comparisons") or {}}
                               for stage, (res, src) in (others or {}).items()},
                  "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if icl is not None:
        icl_result, icl_source = icl
        evaluation["icl"] = {"shots": cfg.report.icl_shots, "source": icl_source,
                             "examples": (icl_result or {}).get("examples"),
                             "policies": {who: {"n_prompts": len(res["rows"]), "comparisons": res.get("comparisons")}
                                          for who, res in ((icl_result or {}).get("results") or {}).items()}}
    if distill is not None:  # distill_generations: the student after against the teacher and against its start
        distill_result, distill_source = distill
        against = ((distill_result or {}).get("results") or {}).items()
        evaluation["distill"] = {
            "source": distill_source, "overlap": (distill_result or {}).get("overlap"),
            "against": {parent: {"n_prompts": len(res["rows"]), "comparisons": res.get("comparisons")}
                        for parent, res in against}}
    path = cfg.run_dir() / EVALUATION_FILE
    atomic_write_json(path, evaluation)
    return path


# -------------------------------------------------------------------------------------------- write
def write_report(cfg: RunConfig, out: Printer = print, generate_samples: bool = True,
                 n_samples: int | None = None) -> Path:
    """Write ``outputs/<run>/report.md`` (+ ``report/*.png``) from whatever stages exist; return its path.

    The verdict (PPO against SFT on ``n_samples``, default ``report.n_prompts``, held-out prompts) comes
    first, with the RM's held-out accuracy and the PPO reward/KL trend under it, then each stage's section
    (plots), then the sample generations, then every stage's final metrics, collapsed. ``report.html`` beside
    it is the same report as one self-contained page (``pipeline.report_html``)."""
    run_dir = cfg.run_dir()
    plots = run_dir / "report"
    plots.mkdir(parents=True, exist_ok=True)
    stages = list(cfg.stages) + [s for s in STAGE_TITLES if s not in cfg.stages and cfg.stage_dir(s).exists()]
    results: dict[str, tuple[dict[str, Any] | None, str]] = {}
    for policy in POLICY_STAGES:
        manifest = _stage_manifest(cfg, policy)
        if policy not in stages:
            continue
        if manifest is None or manifest.get("status") != "complete":
            results[policy] = (None, f"not run (needs a complete {STAGE_TITLES[policy]} stage)")
            continue
        results[policy] = _load_samples(cfg, plots, generate_samples, n_samples or cfg.report.n_prompts, out, policy)
    icl: tuple[dict[str, Any] | None, str] | None = None
    if cfg.report.icl_shots > 0 and "sft" in stages:
        sft_manifest = _stage_manifest(cfg, "sft")
        if sft_manifest is None or sft_manifest.get("status") != "complete":
            icl = (None, "not run (needs a complete SFT stage)")
        else:
            icl = _load_icl(cfg, plots, generate_samples, n_samples or cfg.report.n_prompts, out, results)
    distill: tuple[dict[str, Any] | None, str] | None = None
    if "distill" in stages and "sft" in stages:
        complete = all((_stage_manifest(cfg, s) or {}).get("status") == "complete" for s in ("distill", "sft"))
        distill = (_load_distill(cfg, plots, generate_samples, n_samples or cfg.report.n_prompts, out) if complete
                   else (None, "not run (needs complete distill and SFT stages)"))
    if results or icl is not None or distill is not None:
        ppo_result, ppo_source = results.get("ppo", (None, "no PPO stage"))
        write_evaluation(cfg, ppo_result, ppo_source, {k: v for k, v in results.items() if k != "ppo"}, icl, distill)
    lines = [f"# alignpipe run report: {cfg.run_name}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from `{run_dir}`.", ""]
    verdict_rows = dict(results)
    if icl is not None:
        icl_rows = {f"icl_{who}": (res, icl[1]) for who, res in ((icl[0] or {}).get("results") or {}).items()}
        verdict_rows.update(icl_rows or {"icl_sft": (None, icl[1])})
    if distill is not None:
        distill_rows = {f"distill_{parent}": (res, distill[1])
                        for parent, res in ((distill[0] or {}).get("results") or {}).items()}
        verdict_rows.update(distill_rows or {"distillation": (None, distill[1])})
    if verdict_rows:
        lines += verdict_lines(verdict_rows)
    lines += training_summary_lines(cfg, stages)
    lines += standard_eval_lines(cfg)
    lines += ["## Stages", ""]
    lines += _overview(cfg, stages) + [""]
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
    for policy, (result, source) in results.items():
        lines += _samples_section(cfg, result, source, policy)
    if icl is not None:
        lines += _icl_section(cfg, *icl)
    if distill is not None:
        lines += _distill_section(cfg, *distill)
    lines += _full_metrics(cfg, stages)
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    try:
        from .report_html import write_html_report

        write_html_report(path)
    except Exception as exc:  # noqa: BLE001 - report.md stands on its own; say why there is no HTML copy
        out(f"report: report.html not written ({type(exc).__name__}: {exc})")
    return path


def report_for(config: str | os.PathLike, overrides: Sequence[str] = (), out: Printer = print,
               generate_samples: bool = True) -> Path:
    """``python -m pipeline report CONFIG``: load the config and write the report."""
    return write_report(load_config(config, list(overrides)), out=out, generate_samples=generate_samples)
