"""Each comparison's answer rows, cached in ``report/samples*.json`` under a key of everything they depend on
(the manifests of the stages that answered and scored, the ppo/report/chat settings, the judge): a report
generates again only what a re-run stage or a changed setting made stale."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..manifest import MANIFEST, atomic_write_json, hash_file, hash_json
from .baselines import distill_generations, icl_generations
from .compare import add_comparisons, judge_or_reason, sample_generations
from .drift import off_task_generations
from .runs import STAGE_TITLES, rows_file
from .stats import win_rate

Printer = Callable[[str], None]
Outcome = tuple[dict[str, Any] | None, str]  # (result or None, where it came from / why there is none)
SAMPLES_VERSION = 4  # 4: the verifier's per-sample parts (3: verifier, judge and RM comparisons with intervals)
NOT_GENERATED = "not generated (run `python -m pipeline report CONFIG` to generate them)"


def samples_key(cfg: RunConfig, n: int, policy: str = "ppo") -> str:
    """The cache key of SFT-against-``policy`` rows on ``n`` prompts."""
    hashes = {s: hash_file(cfg.stage_dir(s) / MANIFEST) if (cfg.stage_dir(s) / MANIFEST).exists() else None
              for s in ("sft", "rm", policy)}
    judge = cfg.rlaif.judges.get(cfg.rlaif_label.judge)
    return hash_json({"v": SAMPLES_VERSION, "n": n, "manifests": hashes, "policy": policy,
                      "ppo": cfg.ppo.model_dump(mode="json"),
                      "report": cfg.report.model_dump(mode="json"),
                      "chat": cfg.chat.model_dump(mode="json"), "judge": cfg.rlaif_label.judge,
                      "judge_config": judge.model_dump(mode="json") if judge is not None else None})


def cached_or_generated(cache: Path, key: str, generate: bool, out: Printer, doing: str, what: str,
                        produce: Callable[[], dict[str, Any]]) -> Outcome:
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
        return None, NOT_GENERATED
    out(f"report: {doing} ...")
    try:
        result = produce()
    except Exception as exc:  # the report must still be written; the reason is shown in it
        return None, f"{what} failed: {type(exc).__name__}: {exc}"
    atomic_write_json(cache, {"key": key, "result": result})
    return result, "greedy decoding"


def has_model(cfg: RunConfig, stage: str) -> bool:
    folder = cfg.stage_dir(stage)
    return (folder / "model" / "config.json").exists() or (folder / "adapter" / "adapter_config.json").exists()


def _from_ppo_samples(cfg: RunConfig, ppo_file: Path, judge: bool) -> dict[str, Any] | None:
    """The rows the PPO stage wrote (``ppo/samples.jsonl``: ``{prompt, sft, ppo}``, RM scores when it had
    them), with the judge's verdicts when ``judge``; None when it holds no such row."""
    rows = [json.loads(line) for line in ppo_file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if isinstance(r, dict) and "sft" in r and "ppo" in r]
    if not rows:
        return None
    result: dict[str, Any] = {"rows": rows}
    if all("rm_ppo" in r and "rm_sft" in r for r in rows):
        result["rm_win_rate"] = win_rate([r["rm_ppo"] for r in rows], [r["rm_sft"] for r in rows])
    if judge:
        result.update(judge_or_reason(cfg, rows))
    return add_comparisons(cfg, result)


def load_samples(cfg: RunConfig, generate: bool, n: int, out: Printer, policy: str = "ppo") -> Outcome:
    """Sample rows of SFT and ``policy`` and where they came from, or (None, why not): PPO's own
    ``ppo/samples.jsonl`` when it wrote one, else :func:`sample_generations` cached in :func:`rows_file`."""
    cache = rows_file(cfg, policy)
    ppo_file = cfg.stage_dir("ppo") / "samples.jsonl"
    if policy == "ppo" and ppo_file.exists():
        result = _from_ppo_samples(cfg, ppo_file, judge=generate)
        if result is not None:
            atomic_write_json(cache, {"key": None, "result": result})  # the rows the report shows
            return result, f"from {ppo_file.relative_to(cfg.run_dir())}"
    if not (has_model(cfg, "sft") and has_model(cfg, policy)):
        return None, f"the SFT or {STAGE_TITLES[policy]} stage has no model to sample from"
    result, source = cached_or_generated(
        cache, samples_key(cfg, n, policy), generate, out,
        f"generating {n} samples from the SFT and {STAGE_TITLES[policy]} policies", "sample generation",
        lambda: sample_generations(cfg, None, n, policy=policy))
    if result is not None and source == "greedy decoding":  # freshly generated: the rows as JSONL too
        with open(cache.with_suffix(".jsonl"), "w") as fh:
            for row in result["rows"]:
                fh.write(json.dumps(row) + "\n")
    return result, source


def load_icl(cfg: RunConfig, generate: bool, n: int, out: Printer, policies: dict[str, Outcome]) -> Outcome:
    """:func:`icl_generations` (cached in ``report/samples_icl.json``) and where it came from, or (None, why not)."""
    key = hash_json({"v": SAMPLES_VERSION, "sft": samples_key(cfg, n, "sft"),
                     "model": cfg.model.model_dump(mode="json"), "seed": cfg.seed,
                     "policies": {p: samples_key(cfg, n, p) for p in policies}})
    return cached_or_generated(
        rows_file(cfg, "icl"), key, generate, out,
        f"generating {n} answers of the {cfg.report.icl_shots}-shot base model (ICL baseline)", "ICL baseline",
        lambda: icl_generations(cfg, n, policies={p: r for p, (r, _) in policies.items()}))


def load_distill(cfg: RunConfig, generate: bool, n: int, out: Printer) -> Outcome:
    """:func:`distill_generations` (cached in ``report/samples_distill.json``) and where it came from, or (None,
    why not)."""
    teacher = cfg.distill.teacher
    teacher_manifest = Path(teacher.path or "") / MANIFEST if teacher.kind == "stage" else None
    key = hash_json({"v": SAMPLES_VERSION, "samples": samples_key(cfg, n, "distill"),
                     "model": cfg.model.model_dump(mode="json"), "teacher": teacher.model_dump(mode="json"),
                     "teacher_manifest": hash_file(teacher_manifest) if teacher_manifest and teacher_manifest.exists()
                     else None, "distill_data": cfg.distill.data.model_dump(mode="json") if cfg.distill.data else None})
    return cached_or_generated(
        rows_file(cfg, "distill"), key, generate, out,
        f"generating {n} answers each of the distill teacher, the base model and SFT", "distillation comparison",
        lambda: distill_generations(cfg, n))


def load_off_task(cfg: RunConfig, generate: bool, out: Printer, policy: str) -> Outcome:
    """:func:`off_task_generations` of ``policy`` against SFT on ``report.general_prompts`` (cached in
    ``report/samples_off_task_<policy>.json``) and where it came from, or (None, why not)."""
    if cfg.report.general_prompts is None:
        return None, "not measured (report.general_prompts is not set)"
    n = cfg.report.n_general
    return cached_or_generated(
        rows_file(cfg, f"off_task_{policy}"), hash_json({"off_task": samples_key(cfg, n, policy)}), generate, out,
        f"answering {n} general prompts with SFT and {STAGE_TITLES[policy]} (off-task drift)", "off-task drift",
        lambda: off_task_generations(cfg, policy))
