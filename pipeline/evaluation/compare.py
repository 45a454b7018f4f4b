"""A policy against its parent on the same held-out prompts, three ways: the rule verifier of the task's ground
truth (``report.verifier``), the judge (``rlaif_label.judge``, both orders) and the reward model (the ``rm``
stage). Rows ``{prompt, reference, <parent>, <policy>, verifier_<who>, verifier_metrics_<who>, rm_<who>,
judge}`` carry the answers and their scores; :func:`add_comparisons` turns them into paired comparisons."""

from __future__ import annotations

from typing import Any

from ..config import RunConfig
from .generate import Messages, generate, generation_threads, held_out_examples, last_user, prompt_ids
from .runs import is_complete
from .stats import mean_known, outcome_comparison, paired_comparison, paired_difference_known, win_rate


def score_responses(cfg: RunConfig, prompts: list[Messages], responses: list[list[int]]) -> list[float]:
    """RM scores (the ``rm`` stage) of prompt + generated response ids, read at the response's eos.

    Uses the RM's loader and scorer (``stages.scoring``), so the layout is the one it was trained on:
    the prompt with the generation prompt, then the generated ids up to and including the first eos.
    """
    from stages.scoring import load_reward_model, score_token_ids

    model, tokenizer = load_reward_model(cfg.stage_dir("rm"), cfg.model)
    sequences = [prompt_ids(cfg, tokenizer, p) + list(r) for p, r in zip(prompts, responses)]
    scores = score_token_ids(model, sequences, tokenizer.pad_token_id, batch_size=8)
    del model
    return [float(v) for v in scores]


def verifier_scores(cfg: RunConfig, prompts: list[Messages], responses: list[str],
                    references: list[Any]) -> tuple[list[float], dict[str, list[float | None]]]:
    """``report.verifier`` (reward-function signature) on the last user message of each prompt.

    Returns (scores, per-sample metrics): the verifier returns a list of scores, or ``{"scores": [...],
    "metrics": {name: [one number or None per response]}}`` (the reward-function form) whose metrics
    (e.g. "correct", "house_format") the report shows for each policy."""
    from stages.ppo.rewards import import_function

    fn = import_function(cfg.report.verifier)
    result = fn([last_user(p) for p in prompts], list(responses), list(references))
    raw_metrics = result.get("metrics") or {} if isinstance(result, dict) else {}
    scores = [float(x) for x in (result["scores"] if isinstance(result, dict) else result)]
    metrics = {str(k): [None if v is None else float(v) for v in values] for k, values in raw_metrics.items()}
    for name, values in [("scores", scores), *metrics.items()]:
        if len(values) != len(responses):
            raise ValueError(f"report.verifier {cfg.report.verifier!r} returned {len(values)} {name} for "
                             f"{len(responses)} responses")
    return scores, metrics


def add_verifier_columns(rows: list[dict[str, Any]], who: str,
                         scored: tuple[list[float], dict[str, list[float | None]]]) -> None:
    """``row["verifier_<who>"]`` (and ``verifier_metrics_<who>`` when the verifier returns parts) from
    :func:`verifier_scores`'s (scores, parts) of ``who``'s answers, one per row."""
    scores, parts = scored
    for i, row in enumerate(rows):
        row[f"verifier_{who}"] = scores[i]
        if parts:
            row[f"verifier_metrics_{who}"] = {k: v[i] for k, v in parts.items()}


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


def judge_or_reason(cfg: RunConfig, rows: list[dict[str, Any]], policy: str = "ppo",
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


def _verifier_comparison(cfg: RunConfig, rows: list[dict[str, Any]], policy: str, parent: str) -> dict[str, Any]:
    comparison = {"check": f"verifier {cfg.report.verifier}", **paired_comparison(
        [r[f"verifier_{policy}"] for r in rows], [r[f"verifier_{parent}"] for r in rows])}
    if all(f"verifier_metrics_{parent}" in r and f"verifier_metrics_{policy}" in r for r in rows):
        names = list(rows[0][f"verifier_metrics_{parent}"])
        values = {who: {name: [r[f"verifier_metrics_{who}"].get(name) for r in rows] for name in names}
                  for who in (parent, policy)}
        comparison["metrics"] = {name: {parent: mean_known(values[parent][name]),
                                        "policy": mean_known(values[policy][name])} for name in names}
        # each part paired over the prompts where both have it: the mean difference with its interval
        parts = {name: paired_difference_known(values[policy][name], values[parent][name]) for name in names}
        comparison["parts"] = {name: part for name, part in parts.items() if part is not None}
    return comparison


def add_comparisons(cfg: RunConfig, result: dict[str, Any], policy: str = "ppo", parent: str = "sft") -> dict[str, Any]:
    """``result["comparisons"]``: ``paired_comparison`` of ``policy`` against ``parent`` (SFT, or "icl": the
    few-shot base model) for each check the rows carry (``verifier_*``, ``rm_*`` scores; ``judge`` verdicts),
    keyed "verifier", "judge", "rm"."""
    rows = result["rows"]
    comparisons: dict[str, Any] = {}
    if rows and all(f"verifier_{parent}" in r and f"verifier_{policy}" in r for r in rows):
        comparisons["verifier"] = _verifier_comparison(cfg, rows, policy, parent)
    if "judge_win_rate" in result and all("judge" in r for r in rows):
        outcomes = [{policy: "policy", parent: "parent"}.get(r["judge"], "tie") for r in rows]
        comparisons["judge"] = {"check": f"judge {result['judge']} ({result.get('judge_kind')}), both orders",
                                **outcome_comparison(outcomes)}
    if rows and all(f"rm_{parent}" in r and f"rm_{policy}" in r for r in rows):
        comparisons["rm"] = {"check": "reward model (rm stage)", **paired_comparison(
            [r[f"rm_{policy}"] for r in rows], [r[f"rm_{parent}"] for r in rows])}
    result["comparisons"] = comparisons
    return result


def sample_generations(cfg: RunConfig, prompts: list[Messages] | None = None,
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
    n = n or cfg.report.n_prompts
    if prompts is None:
        examples = held_out_examples(cfg, n)
        prompts, references = [ex.prompt for ex in examples], [ex.reference for ex in examples]
    prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts][:n]
    references = list(references or [None] * len(prompts))[:len(prompts)]
    with generation_threads(cfg):
        answers = {who: generate(cfg, who, prompts, cfg.report.batch_size) for who in ("sft", policy)}
        rows: list[dict[str, Any]] = [
            {"prompt": p, "reference": r, "sft": s, policy: q}
            for p, r, s, q in zip(prompts, references, answers["sft"][0], answers[policy][0])]
        result: dict[str, Any] = {"rows": rows}
        for who, (texts, _) in answers.items():
            if cfg.report.verifier:
                add_verifier_columns(rows, who, verifier_scores(cfg, prompts, texts, references))
        if is_complete(cfg, "rm"):
            rm = {who: score_responses(cfg, prompts, ids) for who, (_, ids) in answers.items()}
            for row, a, b in zip(rows, rm["sft"], rm[policy]):
                row["rm_sft"], row[f"rm_{policy}"] = a, b
            result.update({"rm_win_rate": win_rate(rm[policy], rm["sft"]), "rm_mean_sft": sum(rm["sft"]) / len(rows),
                           f"rm_mean_{policy}": sum(rm[policy]) / len(rows)})
        if judge:
            result.update(judge_or_reason(cfg, rows, policy))
        return add_comparisons(cfg, result, policy)
