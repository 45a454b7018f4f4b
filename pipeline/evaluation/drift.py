"""Off-task drift: how a policy answers prompts unlike its training tasks (``report.general_prompts``), against
its parent on the same prompts.

Both models answer the head ``report.n_general`` prompts greedily (``ppo.max_new_tokens``, as the held-out
comparison). Per answer (:func:`answer_values`):

- ``format_share``: 1 when the run's verifier flags the answer's format, from the verifier's part whose name
  ends in "format" (the demo's ``house_format``); absent when the verifier has no such part;
- ``length``: generated tokens, the eos not counted;
- ``eos_rate``: 1 when the answer ended with eos within the token budget;
- ``empty_share``: 1 when the answer has fewer than ``EMPTY_WORDS`` words once format wrappers (a JSON object,
  a code fence) are stripped (:func:`content_text`);
- ``reference_overlap``: ROUGE-L F1 (``rouge-score``) of the stripped answer against the row's reference, where
  the row has one;
- ``kl`` (policy only; the parent's is 0): the mean over the policy's answer tokens of KL(policy || parent)
  of the next-token distributions, both models teacher-forced on the policy's answer (:func:`answer_kl`).

Each metric's mean policy - parent difference comes with a paired normal 95% interval over prompts
(``stats.paired_difference``). The policy drifted (:func:`drift_reasons`) when any of: the format share rises
by more than ``FORMAT_DRIFT`` (the point estimate), the length or the reference overlap falls (interval
entirely below 0), or the empty share rises (interval entirely above 0).
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..config import RunConfig
from .compare import verifier_scores
from .generate import Messages, generation_threads, greedy_answers, load_answerer, prompt_ids
from .stats import paired_difference_known

EMPTY_WORDS = 3  # an answer with fewer content words than this counts as empty
FORMAT_DRIFT = 0.10  # a rise of the format share above this is drift
METRICS = ("format_share", "length", "eos_rate", "empty_share", "kl", "reference_overlap")
_FENCE = re.compile(r"^```[\w-]*\s*|\s*```$")


def _leaves(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [text for v in value.values() for text in _leaves(v)]
    if isinstance(value, list):
        return [text for v in value for text in _leaves(v)]
    return [] if value is None else [str(value)]


def content_text(answer: str) -> str:
    """The answer without format wrappers: a code fence around it is dropped, and an answer that is one JSON
    object or list becomes its values (keys dropped), space-joined: ``{"answer": "Paris"}`` -> ``Paris``."""
    text = _FENCE.sub("", (answer or "").strip()).strip()
    if text[:1] in "{[":
        try:
            return " ".join(_leaves(json.loads(text)))
        except ValueError:
            pass
    return text


def content_words(answer: str) -> int:
    """Words (runs of letters, digits or _) of :func:`content_text`."""
    return len(re.findall(r"\w+", content_text(answer)))


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 of ``answer`` against ``reference`` (``rouge_score``'s tokenizer: lower case, alphanumerics)."""
    from rouge_score import rouge_scorer

    return float(rouge_scorer.RougeScorer(["rougeL"]).score(reference, answer)["rougeL"].fmeasure)


def format_part(parts: dict[str, list[float | None]]) -> list[float | None] | None:
    """The verifier's format part: the first part whose name ends in "format" (None when there is none)."""
    return next((values for name, values in parts.items() if name.endswith("format")), None)


def answer_values(texts: list[str], ids: list[list[int]], eos_id: int, references: list[Any],
                  formats: list[float | None] | None) -> dict[str, list[float | None]]:
    """Per-answer values of every metric but ``kl`` (see the module doc).

    Args:
        texts, ids: (N,) decoded answers and their token ids (up to and including the first eos).
        references: (N,) the rows' references; None or "" where a row has none.
        formats: (N,) the verifier's format flags, or None (no format part: ``format_share`` is left out).
    Returns:
        metric -> (N,) values, None where a value is undefined (an answer with no reference).
    """
    ended = [float(bool(row) and row[-1] == eos_id) for row in ids]
    values: dict[str, list[float | None]] = {
        "length": [float(len(row)) - e for row, e in zip(ids, ended)],
        "eos_rate": ended,
        "empty_share": [float(content_words(t) < EMPTY_WORDS) for t in texts],
        "reference_overlap": [None if ref is None or str(ref).strip() == "" else rouge_l(content_text(t), str(ref))
                              for t, ref in zip(texts, references)]}
    if formats is not None:
        values["format_share"] = list(formats)
    return values


def drift_reasons(diffs: dict[str, dict[str, float]]) -> list[str]:
    """Why the policy drifted (empty: it did not), from :func:`summarise`'s ``diffs`` (see the module doc)."""
    reasons = []
    if "format_share" in diffs and diffs["format_share"]["diff"] > FORMAT_DRIFT:
        reasons.append(f"format share rose by {diffs['format_share']['diff']:+.3f} (more than {FORMAT_DRIFT})")
    for metric in ("length", "reference_overlap"):
        if metric in diffs and diffs[metric]["ci_high"] < 0:
            reasons.append(f"{metric.replace('_', ' ')} fell ({diffs[metric]['diff']:+.3f}, 95% CI entirely below 0)")
    if "empty_share" in diffs and diffs["empty_share"]["ci_low"] > 0:
        reasons.append(f"empty share rose ({diffs['empty_share']['diff']:+.3f}, 95% CI entirely above 0)")
    return reasons


def summarise(parent: dict[str, list[float | None]], policy: dict[str, list[float | None]]) -> dict[str, Any]:
    """``{n, parent: {metric: mean}, policy: {metric: mean}, diffs: {metric: {diff, ci_low, ci_high, n}}, drift,
    reasons}`` from per-answer values of the same N prompts; each metric over the prompts where both sides have
    a value (a metric with none is left out)."""
    summary: dict[str, Any] = {"n": len(next(iter(policy.values()), [])), "parent": {}, "policy": {}, "diffs": {}}
    for metric in METRICS:
        d = paired_difference_known(policy.get(metric) or [], parent.get(metric) or [])
        if d is None:
            continue
        summary["parent"][metric], summary["policy"][metric] = d["mean_parent"], d["mean_policy"]
        summary["diffs"][metric] = {"diff": d["diff"], "ci_low": d["diff_ci_low"], "ci_high": d["diff_ci_high"],
                                    "n": d["n"]}
    summary["reasons"] = drift_reasons(summary["diffs"])
    summary["drift"] = bool(summary["reasons"])
    return summary


def answer_kl(cfg: RunConfig, policy: Any, parent: Any, tokenizer: Any, prompts: list[Messages],
              answers: list[list[int]], batch_size: int = 8) -> list[float | None]:
    """Per answer, the mean over its tokens of KL(policy || parent) of the next-token distributions, both models
    teacher-forced on prompt + the policy's answer ids (N,); None for an answer with no token."""
    import torch

    from stages.batching import left_pad
    from stages.chat import position_ids_from_mask
    from stages.kd import kl_divergence

    result: list[float | None] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(zip(prompts[start:start + batch_size], answers[start:start + batch_size]))
        ids, mask = left_pad([prompt_ids(cfg, tokenizer, p) + list(a) for p, a in batch], tokenizer.pad_token_id)
        keep = max(len(a) for _, a in batch) + 1  # logits of the last positions only: those predicting answers
        inputs = {"input_ids": ids.to(policy.device), "attention_mask": mask.to(policy.device),
                  "position_ids": position_ids_from_mask(mask).to(policy.device), "use_cache": False,
                  "logits_to_keep": keep}
        with torch.no_grad():
            log_p = torch.log_softmax(policy(**inputs).logits.float(), dim=-1)  # (B, keep, V)
            log_q = torch.log_softmax(parent(**inputs).logits.float(), dim=-1)
        for i, (_, answer) in enumerate(batch):
            # logits at t predict token t + 1: an answer of n tokens (at the end) is predicted by kept rows
            # keep - n - 1 ... keep - 2
            rows = slice(keep - len(answer) - 1, keep - 1)
            result.append(kl_divergence(log_p[i, rows], log_q[i, rows]).mean().item() if answer else None)
    return result


def general_examples(cfg: RunConfig) -> list[Any]:
    """The head ``report.n_general`` rows of ``report.general_prompts`` (``PromptExample``: prompt, reference)."""
    from data.formats import load_examples

    if cfg.report.general_prompts is None:
        raise ValueError("report.general_prompts is not set")
    return load_examples(cfg.report.general_prompts, "prompt")[0][:cfg.report.n_general]


def off_task_generations(cfg: RunConfig, policy: str, parent: str = "sft") -> dict[str, Any]:
    """``policy`` against ``parent`` (stage names, or "base") on the general prompts: ``{"rows": [{prompt,
    reference, parent, policy}], "policy_name", "parent_name", **summarise(...)}`` (see the module doc)."""
    examples = general_examples(cfg)
    prompts, references = [ex.prompt for ex in examples], [ex.reference for ex in examples]
    with generation_threads(cfg):
        parent_model, tokenizer = load_answerer(cfg, parent)
        parent_answers = greedy_answers(cfg, parent_model, tokenizer, prompts, cfg.report.batch_size)
        policy_model, tokenizer = load_answerer(cfg, policy)
        policy_answers = greedy_answers(cfg, policy_model, tokenizer, prompts, cfg.report.batch_size)
        kl = answer_kl(cfg, policy_model, parent_model, tokenizer, prompts, policy_answers[1], cfg.report.batch_size)
        del parent_model, policy_model
    values = {}
    for side, (texts, ids) in (("parent", parent_answers), ("policy", policy_answers)):
        formats = format_part(verifier_scores(cfg, prompts, texts, references)[1]) if cfg.report.verifier else None
        values[side] = answer_values(texts, ids, tokenizer.eos_token_id, references, formats)
    values["policy"]["kl"], values["parent"]["kl"] = kl, [0.0 if v is not None else None for v in kl]
    rows = [{"prompt": p, "reference": r, "parent": a, "policy": b}
            for p, r, a, b in zip(prompts, references, parent_answers[0], policy_answers[0])]
    return {"rows": rows, "policy_name": policy, "parent_name": parent, **summarise(values["parent"], values["policy"])}
