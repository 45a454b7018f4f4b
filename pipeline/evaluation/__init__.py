"""The held-out evaluation of a run: each policy against its parent on the same prompts, written to
``outputs/<run>/evaluation.json`` for the report (``pipeline.report``) to render.

- every policy stage (PPO, DPO) against SFT: greedy answers on ``report.n_prompts`` held-out prompts (PPO's
  own ``ppo/samples.jsonl`` when it wrote one), compared by the rule verifier (``report.verifier``), the
  judge (``rlaif_label.judge``, both orders) and the reward model, each a paired comparison with intervals
  (``compare.py``, ``stats.py``);
- with ``report.icl_shots``, the few-shot base model against SFT and each policy; with a distill stage, the
  student after against the teacher and against the student before (``baselines.py``).

Each comparison's answer rows are cached in ``report/samples*.json`` (``cache.py``): a report generates again
only what changed. With ``report.general_prompts``, each policy and SFT also answer prompts unlike the training
tasks, and ``drift.py`` measures off-task drift (format share, length, eos rate, empty answers, KL, reference
overlap). Modules: ``stats`` (pure), ``generate`` (models answering prompts), ``compare``, ``baselines``,
``drift``, ``cache``, ``runs`` (the run folder). torch and transformers are imported inside the functions
that load models.
"""

from __future__ import annotations

import time
from typing import Any

from ..config import RunConfig
from ..manifest import atomic_write_json
from .cache import Outcome, Printer, load_distill, load_icl, load_off_task, load_samples
from .runs import EVALUATION_FILE, POLICY_STAGES, STAGE_TITLES, is_complete, rows_file, run_stages

NO_PPO = "no PPO stage"  # evaluation.json's source when the run has no PPO stage
TOP_LEVEL_KEYS = ("rm_win_rate", "rm_mean_sft", "rm_mean_ppo", "judge", "judge_kind", "judge_win_rate",
                  "judge_wins", "judge_losses", "judge_ties", "judge_inconsistent", "judge_malformed", "judge_error",
                  "comparisons")


def evaluate(cfg: RunConfig, out: Printer = print, generate: bool = True,
             n: int | None = None) -> dict[str, Any] | None:
    """Run the comparisons the run's stages allow (each from its cache when that is fresh; nothing is generated
    when ``generate`` is False), write ``evaluation.json`` and return what it holds; None (no file) when the run
    has no policy stage, ICL baseline or distillation to evaluate. ``n``: prompts, default ``report.n_prompts``."""
    stages = run_stages(cfg)
    n = n or cfg.report.n_prompts
    results: dict[str, Outcome] = {}
    off_task: dict[str, Outcome] = {}
    for policy in POLICY_STAGES:
        if policy not in stages:
            continue
        if not is_complete(cfg, policy):
            results[policy] = (None, f"not run (needs a complete {STAGE_TITLES[policy]} stage)")
            continue
        results[policy] = load_samples(cfg, generate, n, out, policy)
        off_task[policy] = load_off_task(cfg, generate, out, policy)
    icl: Outcome | None = None
    if cfg.report.icl_shots > 0 and "sft" in stages:
        icl = (load_icl(cfg, generate, n, out, results) if is_complete(cfg, "sft")
               else (None, "not run (needs a complete SFT stage)"))
    distill: Outcome | None = None
    if "distill" in stages and "sft" in stages:
        distill = (load_distill(cfg, generate, n, out) if is_complete(cfg, "distill") and is_complete(cfg, "sft")
                   else (None, "not run (needs complete distill and SFT stages)"))
    if not results and icl is None and distill is None:
        return None
    return write_evaluation(cfg, results, icl, distill, off_task)


def off_task_block(outcome: Outcome) -> dict[str, Any]:
    """evaluation.json's ``off_task`` of one policy: ``{source, n, parent, policy, diffs, drift, reasons}``
    (``drift.summarise``), or ``{source}`` (why it was not measured)."""
    result, source = outcome
    keys = ("n", "parent", "policy", "diffs", "drift", "reasons")
    return {"source": source, **{k: result[k] for k in keys if k in result}} if result else {"source": source}


def write_evaluation(cfg: RunConfig, results: dict[str, Outcome], icl: Outcome | None = None,
                     distill: Outcome | None = None, off_task: dict[str, Outcome] | None = None) -> dict[str, Any]:
    """``outputs/<run>/evaluation.json``: PPO vs SFT on held-out prompts at the top level, every other policy
    stage (DPO ...) under ``policies.<stage>`` with its source and comparisons; returns what it wrote.

    Keys: ``n_prompts``, ``source`` (where the generations came from), ``rm_win_rate``, ``rm_mean_sft``,
    ``rm_mean_ppo`` (when there is an RM), ``judge``, ``judge_kind``, ``judge_win_rate``, ``judge_wins``,
    ``judge_losses``, ``judge_ties``, ``judge_inconsistent``, ``judge_malformed`` (or ``judge_error``),
    ``comparisons`` (the verifier's with ``parts``: each part's paired mean difference with its interval).
    Off-task drift (``off_task``: policy -> ``drift.off_task_generations`` outcome): ``off_task`` (PPO) and
    ``policies.<stage>.off_task``, each :func:`off_task_block`. With the few-shot baseline (``icl``:
    ``icl_generations`` result, source): ``icl`` = ``{shots, source, examples, policies: {sft|<policy>:
    {n_prompts, comparisons}}}``, each against the k-shot base model. With distillation: ``distill`` =
    ``{source, overlap, against: {base|teacher: {n_prompts, comparisons}}}``. ``samples``: the run-relative file
    of each comparison's answer rows ("ppo", "dpo", "icl", "distill", "off_task_<policy>"), for the report.
    """
    ppo_result, ppo_source = results.get("ppo", (None, NO_PPO))
    ppo = ppo_result or {"rows": []}
    evaluation = {"run_name": cfg.run_name, "policy": "ppo", "baseline": "sft", "n_prompts": len(ppo["rows"]),
                  "source": ppo_source, **{k: ppo[k] for k in TOP_LEVEL_KEYS if k in ppo},
                  "policies": {stage: {"source": src, "n_prompts": len((res or {}).get("rows") or []),
                                       "comparisons": (res or {}).get("comparisons") or {}}
                               for stage, (res, src) in results.items() if stage != "ppo"},
                  "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for stage, outcome in (off_task or {}).items():
        (evaluation if stage == "ppo" else evaluation["policies"][stage])["off_task"] = off_task_block(outcome)
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
    outcomes = {**results, **({"icl": icl} if icl else {}), **({"distill": distill} if distill else {}),
                **{f"off_task_{stage}": outcome for stage, outcome in (off_task or {}).items()}}
    evaluation["samples"] = {name: str(rows_file(cfg, name).relative_to(cfg.run_dir()))
                             for name, (result, _) in outcomes.items() if result is not None}
    atomic_write_json(cfg.run_dir() / EVALUATION_FILE, evaluation)
    return evaluation


__all__ = ["EVALUATION_FILE", "NO_PPO", "evaluate", "write_evaluation"]
