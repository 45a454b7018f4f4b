"""Baselines on the held-out prompts: the few-shot (ICL) base model against SFT and each policy, and the three
models of a distillation run (teacher, student before, student after)."""

from __future__ import annotations

from typing import Any

from ..config import RunConfig
from .compare import add_comparisons, add_verifier_columns, judge_or_reason, score_responses, verifier_scores
from .generate import Messages, generate, generation_threads, held_out_examples, last_user
from .runs import is_complete

DISTILL_MODELS = {"teacher": "distill teacher", "base": "base model (student before)", "sft": "SFT (student after)"}


# ------------------------------------------------------------------------------------ few-shot baseline
def icl_shots(cfg: RunConfig, held_out: list[Messages]) -> list[dict[str, str]]:
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
    banned = {last_user(p).strip() for p in held_out}
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


def _reused_answers(prompts: list[Messages], policies: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
    """who ("sft" or a policy) -> ``{texts, ids: None, rm}`` from the policies' sample rows when those rows
    are the same prompts (RM scores only when every row has one)."""
    answers: dict[str, dict[str, Any]] = {}
    for policy, result in policies.items():
        rows = (result or {}).get("rows") or []
        if [r.get("prompt") for r in rows] != prompts:
            continue
        for who in ("sft", policy):
            if who not in answers:
                has_rm = all(f"rm_{who}" in r for r in rows)
                answers[who] = {"texts": [r[who] for r in rows], "ids": None,
                                "rm": [r[f"rm_{who}"] for r in rows] if has_rm else None}
    return answers


def _against_icl(cfg: RunConfig, prompts: list[Messages], references: list[Any], icl: dict[str, Any], who: str,
                 answer: dict[str, Any], judge: bool) -> dict[str, Any]:
    """``who``'s answers against the ICL baseline's (``icl``: texts, verifier (scores, parts) or None, rm)."""
    rows = [{"prompt": p, "reference": r, "icl": a, who: b}
            for p, r, a, b in zip(prompts, references, icl["texts"], answer["texts"])]
    if icl["verifier"] is not None:
        add_verifier_columns(rows, "icl", icl["verifier"])
        add_verifier_columns(rows, who, verifier_scores(cfg, prompts, answer["texts"], references))
    if icl["rm"] is not None and answer["rm"] is not None:
        for row, a, b in zip(rows, icl["rm"], answer["rm"]):
            row["rm_icl"], row[f"rm_{who}"] = a, b
    result = {"rows": rows, "policy": who, "parent": "icl", "shots": cfg.report.icl_shots}
    if judge:
        result.update(judge_or_reason(cfg, rows, who, "icl"))
    return add_comparisons(cfg, result, who, "icl")


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
    n = n or cfg.report.n_prompts
    examples = held_out_examples(cfg, n)
    prompts, references = [ex.prompt for ex in examples], [ex.reference for ex in examples]
    shots = icl_shots(cfg, prompts)
    with generation_threads(cfg):
        icl_texts, icl_ids = generate(cfg, "icl", prompts, cfg.report.batch_size, shots=shots)
        answers = _reused_answers(prompts, policies or {})
        if "sft" not in answers:
            sft_texts, sft_ids = generate(cfg, "sft", prompts, cfg.report.batch_size)
            answers = {"sft": {"texts": sft_texts, "ids": sft_ids, "rm": None}, **answers}
        has_rm = is_complete(cfg, "rm")
        icl = {"texts": icl_texts, "rm": score_responses(cfg, prompts, icl_ids) if has_rm else None,
               "verifier": verifier_scores(cfg, prompts, icl_texts, references) if cfg.report.verifier else None}
        for answer in answers.values():
            if has_rm and answer["rm"] is None and answer["ids"] is not None:
                answer["rm"] = score_responses(cfg, prompts, answer["ids"])
        results = {who: _against_icl(cfg, prompts, references, icl, who, answer, judge)
                   for who, answer in answers.items()}
    return {"shots": cfg.report.icl_shots, "examples": shots, "results": results}


# ------------------------------------------------------------------------------- distillation: three models
def distill_generations(cfg: RunConfig, n: int | None = None, judge: bool = True) -> dict[str, Any]:
    """Teacher, student before and student after on the same held-out prompts (greedy, ``generate``): the
    ``distill.teacher``, the base model (where the sft stage starts) and the sft stage (trained on the teacher's
    answers), scored by ``report.verifier``; the student after is compared with each of the other two as the
    verdict compares a policy with its parent (``add_comparisons``, the judge too when one is configured).

    Returns ``{"rows": [{prompt, reference, teacher, base, sft, verifier_<who>, verifier_metrics_<who>}],
    "overlap": how many of the prompts are among distill.data's, "results": {"base"|"teacher": {"rows",
    "policy": "sft", "parent", "comparisons", judge fields}}}``."""
    from data.formats import load_examples

    n = n or cfg.report.n_prompts
    examples = held_out_examples(cfg, n)
    prompts, references = [ex.prompt for ex in examples], [ex.reference for ex in examples]
    with generation_threads(cfg):
        answers = {who: generate(cfg, who, prompts, cfg.report.batch_size)[0] for who in DISTILL_MODELS}
    rows = [{"prompt": p, "reference": r, **{who: texts[i] for who, texts in answers.items()}}
            for i, (p, r) in enumerate(zip(prompts, references))]
    if cfg.report.verifier:
        for who, texts in answers.items():
            add_verifier_columns(rows, who, verifier_scores(cfg, prompts, texts, references))
    results: dict[str, Any] = {}
    for parent in ("base", "teacher"):
        result = {"rows": [dict(r) for r in rows], "policy": "sft", "parent": parent}  # the judge marks each row
        if judge:
            result.update(judge_or_reason(cfg, result["rows"], "sft", parent))
        results[parent] = add_comparisons(cfg, result, "sft", parent)
    trained_on: set[str] = set()
    if cfg.distill.data is not None:
        trained_on = {last_user(ex.prompt).strip() for ex in load_examples(cfg.distill.data, "prompt")[0]}
    overlap = sum(last_user(p).strip() in trained_on for p in prompts)
    return {"rows": rows, "overlap": overlap, "results": results}
