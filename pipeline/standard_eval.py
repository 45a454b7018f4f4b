"""``python -m pipeline eval CONFIG``: lm-evaluation-harness tasks on the base model and on each complete
policy stage of the run (sft, ppo, dpo), offline.

1. Tasks: each ``eval.tasks`` entry is an lm-eval task YAML (``pipeline/eval_tasks/<name>.yaml``, or a
   path) whose data are local files (``dataset_path: json|csv|parquet|text`` with
   ``dataset_kwargs.data_files``; a hub dataset is refused). ``eval.data.<task>.<split>`` replaces a
   file; paths are relative to the repository root, and environment variables in them are expanded (the
   shipped gsm8k task reads ``$ALIGNPIPE_DATA_DIR/gsm8k/``: the public data sets are not in the repository).
   Every file must exist (the error names the key, the path looked at and any variable left unset); its
   SHA-256 goes into the results.
2. Models: ``base`` (the run's base model, ``prepare_base``) and every complete stage among
   ``EVAL_STAGES`` (its ``model/``, or base + ``adapter/`` for adapter-only PEFT stages), loaded by us with
   the run's tokenizer settings (pad != eos) and wrapped in lm-eval's ``HFLM``: no hub access, no remote
   code. Generation uses greedy decoding with the checkpoint's ``generation_config`` switched off, so every
   model answers under the same settings.
3. Results: ``outputs/<run>/standard_eval.json`` (``STANDARD_EVAL_FILE``): the settings, and per model
   and task the sample size, lm-eval's metrics with their stderr and a Wilson 95% interval, the wall time;
   the per-question answers go to ``outputs/<run>/standard_eval/<model>-<task>.jsonl``. The file is
   rewritten after each model; a model whose weights and settings are unchanged is not evaluated again
   (``--force`` does). The run report shows it (``pipeline.report``; the report never runs lm-eval).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, RunConfig, eval_task_file, load_config, resolve_path
from .evaluation.stats import wilson_interval
from .manifest import MANIFEST, atomic_write_json, atomic_write_text, hash_file, hash_json, read_manifest
from .report import STANDARD_EVAL_FILE, STANDARD_EVAL_SAMPLES

Printer = Callable[[str], None]
EVAL_STAGES = ("sft", "ppo", "dpo")  # stages whose model/ is a policy (a causal LM) to evaluate
BASE = "base"
LOCAL_BUILDERS = ("json", "csv", "parquet", "text")  # datasets' builders that read local files
RESULTS_FORMAT = 1
FEWSHOT_SEED = 1234  # lm-eval's default few-shot sampler seed, kept so figures compare with other lm-eval runs


# --------------------------------------------------------------------------------------------- tasks
def task_config(cfg: RunConfig, task: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The lm-eval task config of ``task`` with its data files resolved, and ``{split: sha256}`` of them.

    Raises ConfigError naming the task file / ``eval.data`` key when the YAML is unreadable, reads from the
    hub, or names a file that does not exist."""
    path = eval_task_file(task)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"eval task {task!r}: cannot read {path}: {exc}") from exc
    if not isinstance(spec, dict) or "task" not in spec:
        raise ConfigError(f"eval task {task!r}: {path} is not an lm-eval task config (a mapping with 'task')")
    if spec.get("dataset_path") not in LOCAL_BUILDERS:
        raise ConfigError(f"eval task {task!r}: {path} has dataset_path {spec.get('dataset_path')!r}; alignpipe's "
                          f"eval is offline and reads local files only: use one of {', '.join(LOCAL_BUILDERS)} "
                          "with dataset_kwargs.data_files")
    kwargs = dict(spec.get("dataset_kwargs") or {})
    files = dict(kwargs.get("data_files") or {})
    if not isinstance(kwargs.get("data_files"), dict) or not files:
        raise ConfigError(f"eval task {task!r}: {path} needs dataset_kwargs.data_files as {{split: file}}")
    overrides = cfg.eval.data.get(task, {})
    for split in overrides:
        if split not in files:
            raise ConfigError(f"eval.data.{task}.{split}: the task has no split {split!r} (its splits: "
                              f"{', '.join(files)})")
    hashes: dict[str, str] = {}
    for split, value in files.items():
        key = (f"eval.data.{task}.{split}" if split in overrides
               else f"{path}: dataset_kwargs.data_files.{split}")
        given = overrides.get(split, value)
        location = resolve_path(os.path.expandvars(given))
        if not location.is_file():
            unset = sorted(set(re.findall(r"\$\{?(\w+)", os.path.expandvars(given))))
            hint = f"set {', '.join(unset)} (not set now) or " if unset else ""
            raise ConfigError(f"{key}: data file not found: {given} (looked at {location}); "
                              f"{hint}point eval.data.{task}.{split} at the file")
        files[split] = str(location.resolve())
        hashes[split] = hash_file(location)
    kwargs["data_files"] = files
    return {**spec, "dataset_kwargs": kwargs}, hashes


def eval_settings(cfg: RunConfig, specs: dict[str, dict[str, Any]], data: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Everything that changes the figures, recorded with them (and hashed to tell whether a model's saved
    results are still current)."""
    from importlib.metadata import version

    ev = cfg.eval
    return {"tasks": list(specs), "limit": ev.limit, "num_fewshot": ev.num_fewshot, "batch_size": ev.batch_size,
            "max_gen_toks": ev.max_gen_toks, "apply_chat_template": ev.apply_chat_template,
            "system_instruction": cfg.chat.system_prompt if ev.apply_chat_template else None,
            "fewshot_seed": FEWSHOT_SEED, "decoding": "greedy", "lm_eval_version": version("lm_eval"),
            "task_config_hashes": {task: hash_json(spec) for task, spec in specs.items()}, "data_sha256": data}


# -------------------------------------------------------------------------------------------- models
def models_to_evaluate(cfg: RunConfig, requested: Sequence[str] | None = None) -> list[str]:
    """``base`` and the complete policy stages of the run, in stage order; ``requested`` picks among them
    (a requested stage that is not complete is an error)."""
    stages = [s for s in EVAL_STAGES if s in cfg.stages or cfg.stage_dir(s).exists()]
    complete = [s for s in stages if (read_manifest(cfg.stage_dir(s)) or {}).get("status") == "complete"]
    if not requested:
        return [BASE] + complete
    valid = (BASE,) + EVAL_STAGES
    for name in requested:
        if name not in valid:
            raise ConfigError(f"eval --stages: {name!r} is not a model to evaluate; choose from {', '.join(valid)}")
        if name != BASE and name not in complete:
            raise ConfigError(f"eval --stages {name}: {cfg.stage_dir(name)} is not a complete stage (run "
                              f"'python -m pipeline run CONFIG --stages {name}' first)")
    return [name for name in [BASE, *EVAL_STAGES] if name in requested]


def model_identity(cfg: RunConfig, name: str) -> str:
    """What the weights of ``name`` are: the stage manifest's hash (it changes when the stage re-runs), or
    for the base model the hash of the ``model`` config section."""
    if name == BASE:
        return hash_json(cfg.to_dict()["model"])
    return hash_file(cfg.stage_dir(name) / MANIFEST)


def load_policy(cfg: RunConfig, name: str) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of ``base`` or a stage, as the run's stages load them."""
    from stages.tuning import load_trained

    from .models import load_model, load_tokenizer, prepare_base

    if name == BASE:
        base = prepare_base(cfg.model)
        tokenizer = load_tokenizer(base, cfg.model, cfg.chat)
        model = load_model(base, cfg.model, tokenizer, kind="causal_lm")
    else:
        tokenizer = load_tokenizer(str(cfg.stage_dir(name)), cfg.model, cfg.chat)
        model = load_trained(cfg.stage_dir(name), cfg.model, tokenizer, kind="causal_lm")
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------------------- results
def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summarize_task(raw: dict[str, Any], task: str) -> dict[str, Any]:
    """One task's figures from lm-eval's ``simple_evaluate`` output.

    ``raw["results"][task]`` holds ``"<metric>,<filter>"`` values and ``"<metric>_stderr,<filter>"``;
    ``raw["n-samples"][task]`` the effective and original sample counts. Returns ``{n, n_total, num_fewshot,
    metrics: {"<metric>,<filter>": {value, stderr, correct, ci_low, ci_high}}}``; ``correct`` and the Wilson
    95% interval only for metrics in [0, 1] (a proportion over ``n`` questions)."""
    results = raw["results"][task]
    counts = raw.get("n-samples", {}).get(task, {})
    n = int(counts.get("effective", results.get("sample_len", 0)))
    metrics: dict[str, dict[str, Any]] = {}
    for key, value in results.items():
        if "," not in key or "_stderr," in key or _number(value) is None:
            continue
        name, filt = key.split(",", 1)
        entry: dict[str, Any] = {"value": float(value), "stderr": _number(results.get(f"{name}_stderr,{filt}"))}
        if 0.0 <= value <= 1.0 and n > 0:
            low, high = wilson_interval(float(value), n)
            entry.update(correct=round(float(value) * n), ci_low=low, ci_high=high)
        metrics[key] = entry
    return {"n": n, "n_total": counts.get("original"), "num_fewshot": raw.get("n-shot", {}).get(task),
            "metrics": metrics}


def sample_rows(samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """lm-eval's logged samples (one per question and filter) -> one row per question: the question's
    record, the reference, the raw answer, and per filter the extracted answer and the metric values."""
    rows: dict[Any, dict[str, Any]] = {}
    for sample in samples:
        row = rows.setdefault(sample["doc_id"], {
            "doc_id": sample["doc_id"], "doc": sample.get("doc"), "target": sample.get("target"),
            "response": (sample.get("resps") or [[None]])[0][0], "filters": {}})
        filtered = sample.get("filtered_resps") or [None]
        row["filters"][sample.get("filter", "none")] = {
            "extracted": filtered[0], **{m: sample.get(m) for m in sample.get("metrics", [])}}
    return list(rows.values())


def _read_results(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("format") == RESULTS_FORMAT else {}


def evaluate_model(cfg: RunConfig, name: str, specs: dict[str, dict[str, Any]]
                   ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Run lm-eval's ``simple_evaluate`` on one model: ({task: summarize_task}, {task: sample_rows})."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from stages.generation import checkpoint_generation_defaults_off

    ev = cfg.eval
    if ev.num_threads:
        torch.set_num_threads(ev.num_threads)
    model, tokenizer = load_policy(cfg, name)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=ev.batch_size, max_gen_toks=ev.max_gen_toks)
    # only our own task configs, handed over as dicts: the built-in (hub) tasks are never indexed
    manager = TaskManager(include_defaults=False)
    # lm-eval stops a sequence at the task's `until` strings and cuts the text there; it relies on generate
    # stopping at eos (the answer's end in chat format), which the blanked generation_config no longer says
    stop_at_eos = {"eos_token_id": tokenizer.eos_token_id}
    with torch.no_grad(), checkpoint_generation_defaults_off(model):
        raw = simple_evaluate(
            model=lm, tasks=[dict(spec) for spec in specs.values()], num_fewshot=ev.num_fewshot, limit=ev.limit,
            gen_kwargs=stop_at_eos,
            task_manager=manager, log_samples=True, apply_chat_template=ev.apply_chat_template,
            fewshot_as_multiturn=ev.apply_chat_template,
            system_instruction=cfg.chat.system_prompt if ev.apply_chat_template else None,
            fewshot_random_seed=FEWSHOT_SEED)
    del lm, model
    tasks = {task: summarize_task(raw, task) for task in specs}
    samples = {task: sample_rows(raw.get("samples", {}).get(task, [])) for task in specs}
    return tasks, samples


def run_eval(cfg: RunConfig, models: Sequence[str] | None = None, force: bool = False,
             out: Printer = print) -> Path:
    """Evaluate ``models`` (default: base + every complete policy stage) on ``cfg.eval.tasks`` and write
    ``outputs/<run>/standard_eval.json``; return its path."""
    specs, data = {}, {}
    for task in cfg.eval.tasks:  # every file checked before any model loads
        specs[task], data[task] = task_config(cfg, task)
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise ConfigError("python -m pipeline eval needs lm-evaluation-harness: pip install -e '.[eval]' "
                          f"(or make install) ({exc})") from exc
    names = models_to_evaluate(cfg, models)
    settings = eval_settings(cfg, specs, data)
    settings_hash = hash_json(settings)
    path = cfg.run_dir() / STANDARD_EVAL_FILE
    saved = _read_results(path)
    current = saved.get("models", {}) if saved.get("settings_hash") == settings_hash else {}
    results = {"format": RESULTS_FORMAT, "run_name": cfg.run_name, "settings": settings,
               "settings_hash": settings_hash, "models": dict(current)}
    samples_dir = cfg.run_dir() / STANDARD_EVAL_SAMPLES
    for name in names:
        identity = model_identity(cfg, name)
        previous = current.get(name) or {}
        if not force and previous.get("identity") == identity:
            out(f"eval: {name}: results for these weights and settings already in {path} (--force re-runs)")
            continue
        out(f"eval: {name}: {', '.join(specs)} (limit {cfg.eval.limit}, few-shot "
            f"{cfg.eval.num_fewshot if cfg.eval.num_fewshot is not None else 'task default'})")
        start = time.monotonic()
        tasks, samples = evaluate_model(cfg, name, specs)
        wall = time.monotonic() - start
        for task, rows in samples.items():
            samples_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(samples_dir / f"{name}-{task}.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
        results["models"][name] = {"identity": identity, "wall_time_s": round(wall, 1), "tasks": tasks,
                                   "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        results["models"] = {k: results["models"][k] for k in [BASE, *EVAL_STAGES] if k in results["models"]}
        atomic_write_json(path, results)
        for task, summary in tasks.items():
            figures = ", ".join(f"{key} {m['value']:.3f}" for key, m in summary["metrics"].items())
            out(f"eval: {name}: {task}: n={summary['n']}: {figures} ({wall:.0f} s)")
    return path


def eval_for(config: str | os.PathLike, overrides: Sequence[str] = (), models: Sequence[str] | None = None,
             force: bool = False, out: Printer = print) -> Path:
    """``python -m pipeline eval CONFIG``: load the config and evaluate."""
    return run_eval(load_config(config, list(overrides)), models=models, force=force, out=out)
