"""The report's answer, rendered from ``evaluation.json`` (``pipeline.evaluation``) and the answer rows it names:
the verdict table (each policy against its parent on held-out prompts), the sample generations, the few-shot
baseline and the distillation sections. Nothing here loads a model."""

from __future__ import annotations

from typing import Any

from ..config import RunConfig
from ..evaluation import EVALUATION_FILE, NO_PPO
from ..evaluation.baselines import DISTILL_MODELS
from ..evaluation.drift import EMPTY_WORDS, FORMAT_DRIFT, METRICS
from ..evaluation.runs import STAGE_TITLES, read_rows_file, rows_file, stage_manifest
from ..evaluation.stats import mean_interval, mean_known
from .markdown import md_cell, md_table, prompt_text

Entry = tuple[dict[str, Any] | None, str]  # ({policy, parent, comparisons, shots} or None, source / why not)
CHECKS = ("verifier", "judge", "rm")


def verdict_entries(evaluation: dict[str, Any]) -> dict[str, Entry]:
    """The comparisons of ``evaluation.json``, keyed as the verdict lists them: "ppo", each other policy stage,
    "icl_<who>" (against the few-shot base), "distill_<parent>" (the student after against a parent)."""
    entries: dict[str, Entry] = {}
    if evaluation.get("source", NO_PPO) != NO_PPO:
        entries["ppo"] = ({"policy": "ppo", "parent": "sft", "comparisons": evaluation.get("comparisons"),
                           "off_task": evaluation.get("off_task")}, evaluation["source"])
    for stage, entry in (evaluation.get("policies") or {}).items():
        entries[stage] = ({"policy": stage, "parent": "sft", "comparisons": entry.get("comparisons"),
                           "off_task": entry.get("off_task")}, entry.get("source", ""))
    if (icl := evaluation.get("icl")) is not None:
        rows = {f"icl_{who}": ({"policy": who, "parent": "icl", "shots": icl.get("shots"),
                                "comparisons": e.get("comparisons")}, icl.get("source", ""))
                for who, e in (icl.get("policies") or {}).items()}
        entries.update(rows or {"icl_sft": (None, icl.get("source", ""))})
    if (distill := evaluation.get("distill")) is not None:
        rows = {f"distill_{parent}": ({"policy": "sft", "parent": parent, "comparisons": e.get("comparisons")},
                                      distill.get("source", ""))
                for parent, e in (distill.get("against") or {}).items()}
        entries.update(rows or {"distillation": (None, distill.get("source", ""))})
    return entries


def _titles(key: str, result: dict[str, Any] | None) -> tuple[str, str, str, str]:
    """(policy, parent, row title, parent title) of one verdict entry."""
    policy, parent = (result or {}).get("policy", key), (result or {}).get("parent", "sft")
    title, parent_title = STAGE_TITLES.get(policy, policy), "SFT"
    if parent == "icl" or key.startswith("icl_"):
        parent_title = f"ICL ({(result or {}).get('shots', '?')}-shot base)"
        title = f"{title} vs {parent_title}"
    elif key.startswith("distill_"):  # distillation: the student after (SFT) against the teacher / its start
        parent_title = DISTILL_MODELS[parent]
        title = f"{title} vs {parent_title}"
    return policy, parent, title, parent_title


def _means(parent: float, policy: float, diff: float, low: float, high: float) -> str:
    return f"{parent:.3f} -> {policy:.3f} (diff {diff:+.3f}, 95% CI {low:+.3f} to {high:+.3f})"


def direction_of(low: float, high: float) -> str:
    """'policy higher' / 'parent higher' when the 95% interval of a mean difference excludes 0."""
    return "policy higher" if low > 0 else "parent higher" if high < 0 else "no measurable difference"


def _check_rows(title: str, comparisons: dict[str, Any]) -> list[list[Any]]:
    """One verdict-table row per check (verifier, judge, RM) the comparisons hold, and one per verifier part."""
    table = []
    for name in CHECKS:
        c = comparisons.get(name)
        if c is None:
            continue
        mean = (_means(c["mean_parent"], c["mean_policy"], c["mean_diff"], c["diff_ci_low"], c["diff_ci_high"])
                if name != "judge" else "")
        table.append([title, c["check"], c["n"], c["wins"], c["losses"], c["ties"], f"{c['win_rate']:.3f}",
                      f"{c['ci_low']:.3f} to {c['ci_high']:.3f}", f"**{c['verdict']}**", mean])
        for part, p in (c.get("parts") or {}).items() if name == "verifier" else ():
            table.append([title, f"verifier part {part}", p["n"], "", "", "", "", "",
                          f"**{direction_of(p['diff_ci_low'], p['diff_ci_high'])}**",
                          _means(p["mean_parent"], p["mean_policy"], p["diff"], p["diff_ci_low"], p["diff_ci_high"])])
    return table


def _off_task_row(title: str, off_task: dict[str, Any]) -> list[Any]:
    """The verdict-table row of a measured off-task drift: none / measurable, and why."""
    why = "; ".join(off_task.get("reasons") or []) or "no rule met (see Off-task drift below)"
    return [title, f"off-task drift ({off_task['n']} general prompts)", off_task["n"], "", "", "", "", "",
            f"**{'measurable' if off_task['drift'] else 'none'}**", why]


def _parts_line(key: str, result: dict[str, Any], comparisons: dict[str, Any]) -> str | None:
    """The verifier's parts, parent -> policy means, as one line under the table (None without parts)."""
    policy, parent, title, parent_title = _titles(key, result)
    if (comparisons.get("verifier") or {}).get("parts"):
        return None  # rows of the table instead
    parts = (comparisons.get("verifier") or {}).get("metrics") or {}
    known = [f"{name} {m[parent]:.3f} -> {m['policy']:.3f}" for name, m in parts.items()
             if m.get(parent) is not None and m.get("policy") is not None]
    if not known:
        return None
    who = title if parent == "sft" else STAGE_TITLES.get(policy, policy)
    return (f"Verifier parts, {title}, mean over the same prompts ({parent_title} -> {who}): "
            + "; ".join(known) + ".")


def _verdict_notes(keys: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["", "Win rate: ties count half; the interval is Wilson's score interval over prompts; a result "
             "whose interval includes 0.5 is \"no measurable difference\". The verifier and judge are checks "
             "the reward model cannot see; the RM row is the reward PPO optimised."]
    if any(str(row[1]).startswith("verifier part ") for row in rows):
        lines += ["", "Rows \"verifier part X\": one part of the verifier's score (e.g. correct, house_format), "
                  "its mean difference with a normal 95% interval over the same prompts (paired)."]
    if any(str(row[1]).startswith("off-task drift") for row in rows):
        lines += ["", f"Row \"off-task drift\": the policy and its parent on general prompts unlike the training "
                  f"tasks; \"measurable\" when the format share rises by more than {FORMAT_DRIFT:.2f}, the length or "
                  "the reference overlap falls (95% CI below 0) or the share of empty answers rises (95% CI "
                  "above 0); the figures are under *Off-task drift* below."]
    if any(k.startswith("icl_") for k in keys):
        lines += ["", "Rows \"X vs ICL (k-shot base)\": the fine-tuned model X (policy) against the base model "
                  "prompted with k examples from the run's SFT data (parent), on the same prompts: did "
                  "fine-tuning beat few-shot prompting?"]
    if any(k.startswith("distill_") for k in keys):
        lines += ["", f"Rows \"SFT vs {DISTILL_MODELS['base']}\" and \"SFT vs {DISTILL_MODELS['teacher']}\": the "
                  "distillation student after its sft stage (policy) against itself before it and against the "
                  "teacher (parent), on the same prompts: how much of the teacher's skill moved over?"]
    return lines


def verdict_lines(entries: dict[str, Entry]) -> list[str]:
    """The report's first answer, one table for every policy the run produced: did it beat its parent (SFT)
    on the same held-out prompts, check by check (verifier, judge, RM), with intervals.

    ``entries``: :func:`verdict_entries` (key -> ({policy, parent, comparisons}, source) or (None, why not))."""
    lines = ["## Verdict: each policy against its parent (SFT) on held-out prompts", ""]
    table, notes, parts_lines = [], [], []
    for key, (result, source) in entries.items():
        title = _titles(key, result)[2]
        comparisons = (result or {}).get("comparisons") or {}
        if not comparisons:
            notes.append(f"{title}: no comparison available ({source}).")
        table += _check_rows(title, comparisons)
        if (line := _parts_line(key, result or {}, comparisons)) is not None:
            parts_lines.append(line)
        off_task = (result or {}).get("off_task") or {}
        if "drift" in off_task:
            table.append(_off_task_row(title, off_task))
        elif off_task:
            notes.append(f"{title}, off-task drift: {off_task.get('source')}.")
    if table:
        lines += md_table(["policy", "check", "prompts", "policy wins", "parent wins", "ties", "win rate",
                           "95% CI", "verdict", "mean score parent -> policy"], table)
    for line in parts_lines + notes:
        lines += ["", line]
    if table:
        lines += _verdict_notes(list(entries), table)
    return lines + [""] + off_task_lines(entries)


OFF_TASK_LABELS = {"format_share": "format share (verifier's format part)", "length": "length (tokens)",
                   "eos_rate": "eos rate", "empty_share": f"empty share (< {EMPTY_WORDS} words)",
                   "kl": "KL to the parent (per token)", "reference_overlap": "reference overlap (ROUGE-L F1)"}
OFF_TASK_SHOWN = 8  # the off-task answers the report lists (all are in the rows file)


def off_task_lines(entries: dict[str, Entry]) -> list[str]:
    """``### Off-task drift``: every measured policy's metrics on the general prompts, parent -> policy."""
    table = []
    for key, (result, _) in entries.items():
        off_task = (result or {}).get("off_task") or {}
        for metric in METRICS if "diffs" in off_task else ():
            if (d := off_task["diffs"].get(metric)) is not None:
                table.append([_titles(key, result)[2], OFF_TASK_LABELS[metric], d["n"],
                              f"{off_task['parent'][metric]:.3f}", f"{off_task['policy'][metric]:.3f}",
                              f"{d['diff']:+.3f}", f"{d['ci_low']:+.3f} to {d['ci_high']:+.3f}"])
    if not table:
        return []
    return (["### Off-task drift: each policy against its parent on general prompts", ""]
            + md_table(["policy", "metric", "prompts", "parent", "policy", "diff", "95% CI (paired)"], table)
            + ["", f"Greedy answers to `report.general_prompts` (never trained on). Empty: fewer than {EMPTY_WORDS} "
               "words once a JSON object or code fence around the answer is stripped; reference overlap on the "
               "stripped answer; KL: mean over the policy's answer tokens of KL(policy || parent), both "
               "teacher-forced (the parent's is 0).", ""])


def saved_rows(cfg: RunConfig, evaluation: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The saved result (rows ...) of one comparison: the file ``evaluation.json`` names under ``samples``; an
    evaluation.json written before that key existed: the comparison's usual file, when there is one."""
    samples = evaluation.get("samples")
    if samples is None:
        default = rows_file(cfg, name)
        return read_rows_file(cfg, str(default.relative_to(cfg.run_dir()))) if default.exists() else None
    return read_rows_file(cfg, samples.get(name))


def samples_section(cfg: RunConfig, evaluation: dict[str, Any], policy: str, source: str) -> list[str]:
    """``## Sample generations: SFT vs <policy>``: the answers and their scores, prompt by prompt."""
    title = STAGE_TITLES[policy]
    lines = [f"## Sample generations: SFT vs {title}", ""]
    result = saved_rows(cfg, evaluation, policy)
    if result is None:
        return lines + [source, ""]
    rows = result["rows"]
    lines += [f"{len(rows)} held-out prompts, {source}.", ""]
    if "judge_error" in result:
        who = f"judge `{result['judge']}`: " if result.get("judge") else ""
        lines += [f"Judge: not computed ({who}{result['judge_error']}).", ""]
    judge = {k: v for k, v in (((stage_manifest(cfg, policy) or {}).get("metrics") or {}).items()) if "win_rate" in k}
    if judge:
        rates = ", ".join(f"{k} = {md_cell(v)}" for k, v in judge.items())
        lines += [f"Win rates recorded by the {title} stage: {rates}", ""]
    lines += [f"The verdict's figures are in `{EVALUATION_FILE}`.", ""]
    has_scores = all("rm_sft" in r and f"rm_{policy}" in r for r in rows)
    has_verifier = all("verifier_sft" in r and f"verifier_{policy}" in r for r in rows)
    has_judge = all("judge" in r for r in rows)
    header = (["prompt", "SFT", title] + (["verifier SFT", f"verifier {title}"] if has_verifier else [])
              + (["RM SFT", f"RM {title}"] if has_scores else []) + (["judge"] if has_judge else []))
    table = [[prompt_text(r.get("prompt")), r.get("sft"), r.get(policy)]
             + ([r["verifier_sft"], r[f"verifier_{policy}"]] if has_verifier else [])
             + ([r["rm_sft"], r[f"rm_{policy}"]] if has_scores else []) + ([r["judge"]] if has_judge else [])
             for r in rows]
    return lines + md_table(header, table) + [""]


def icl_section(cfg: RunConfig, evaluation: dict[str, Any]) -> list[str]:
    """``## Few-shot baseline``: the shots and the ICL base model's answers beside SFT's."""
    icl = evaluation["icl"]
    k = icl.get("shots")
    lines = [f"## Few-shot baseline: the base model with {k} examples (ICL)", ""]
    shots = icl.get("examples")
    if not shots:
        return lines + [icl.get("source", ""), ""]
    lines += [f"The base model answers each held-out prompt after {k} (user, assistant) examples drawn from "
              f"`sft.data` (seed {cfg.seed}; never a held-out prompt), {icl.get('source')}. The examples:", ""]
    lines += md_table(["user", "assistant"], [(shots[i]["content"], shots[i + 1]["content"])
                                              for i in range(0, len(shots), 2)]) + [""]
    sft = ((saved_rows(cfg, evaluation, "icl") or {}).get("results") or {}).get("sft")
    if sft:
        lines += md_table(["prompt", f"ICL ({k}-shot base)", "SFT"],
                          [[prompt_text(r["prompt"]), r["icl"], r["sft"]] for r in sft["rows"]]) + [""]
    return lines


def _distill_means(cfg: RunConfig, rows: list[dict[str, Any]]) -> list[str]:
    """Each distillation model's verifier mean with its interval, and the means of the verifier's parts."""
    parts = list(rows[0].get("verifier_metrics_sft") or {})
    table = []
    for who, title in DISTILL_MODELS.items():
        mean, low, high = mean_interval([r[f"verifier_{who}"] for r in rows])
        means = [mean_known([(r.get(f"verifier_metrics_{who}") or {}).get(p) for r in rows]) for p in parts]
        table.append([title, len(rows), f"**{mean:.3f}**", f"{low:.3f} to {high:.3f}",
                      *[f"{m:.3f}" if m is not None else "" for m in means]])
    lines = md_table(["model", "prompts", f"verifier {cfg.report.verifier}", "95% CI",
                      *[f"{p} (mean)" for p in parts]], table)
    return lines + ["", "Interval: normal 95% over prompts (mean ± 1.96 sd/√n). The paired comparisons of the "
                    "student after against the other two are in the verdict.", ""]


def distill_section(cfg: RunConfig, evaluation: dict[str, Any]) -> list[str]:
    """``## Distillation``: teacher, student before and student after on the same held-out prompts."""
    distill = evaluation["distill"]
    lines = ["## Distillation: teacher, student before, student after", ""]
    result = saved_rows(cfg, evaluation, "distill")
    if result is None:
        return lines + [distill.get("source", ""), ""]
    rows, t = result["rows"], cfg.distill.teacher
    teacher = {"stage": t.path, "hf": t.model, "http": t.base_url}[t.kind]
    token_level = cfg.distill.token_level
    how = (f" with token-level distillation ({token_level.loss}, weight {token_level.weight}, temperature "
           f"{token_level.temperature})" if token_level.enabled else "")
    lines += [f"{len(rows)} held-out prompts ({result['overlap']} of them among distill.data's prompts), "
              f"{distill.get('source')}. Teacher: {t.kind} `{teacher}`; student before: the base model; student "
              f"after: the sft stage, trained on the teacher's answers{how}.", ""]
    if rows and all(f"verifier_{who}" in r for r in rows for who in DISTILL_MODELS):
        lines += _distill_means(cfg, rows)
    lines += md_table(["prompt", "teacher", "student before (base)", "student after (SFT)"],
                      [[prompt_text(r["prompt"]), r["teacher"], r["base"], r["sft"]] for r in rows])
    return lines + [""]


def off_task_samples_section(cfg: RunConfig, evaluation: dict[str, Any], policy: str) -> list[str]:
    """``## Off-task answers``: the first general prompts with the parent's and the policy's answers."""
    result = saved_rows(cfg, evaluation, f"off_task_{policy}")
    if result is None:
        return []
    rows, title = result["rows"], STAGE_TITLES[policy]
    samples = (evaluation.get("samples") or {}).get(f"off_task_{policy}")
    lines = [f"## Off-task answers: SFT vs {title}", "",
             f"The first {min(OFF_TASK_SHOWN, len(rows))} of {len(rows)} general prompts (all in `{samples}`).", ""]
    return lines + md_table(["prompt", "SFT", title], [[prompt_text(r["prompt"]), r["parent"], r["policy"]]
                                                      for r in rows[:OFF_TASK_SHOWN]]) + [""]
