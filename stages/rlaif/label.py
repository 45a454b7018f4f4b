"""The ``rlaif_label`` stage: SFT policy samples -> AI-judged preference pairs (offline RLAIF, DESIGN §1).

For every prompt of ``rlaif_label.data`` the SFT policy (the ``sft`` stage's ``model/``, or the base
model when ``sft`` is not among the run's stages) samples ``num_responses`` responses with the run's
rollout backend (``rollout.backend``: HF ``generate`` by default, or a vLLM worker; ``stages.rollout_backend``):
temperature ``rlaif_label.temperature``, top-k 0, top-p 1, stop at eos; nothing from the checkpoint's
``generation_config``, see ``stages.generation``). Every pair of
distinct, non-empty responses is judged by ``build_judge(cfg, rlaif_label.judge)`` in both orders;
ties (including inconsistent and unreadable verdicts) are dropped and counted. The result is
``preferences.jsonl`` in the stage folder: one ``{"prompt", "chosen", "rejected", "judge": {...}}``
record per kept pair, the data contract's preference format, which the ``rm`` stage trains on as it is:
with ``rlaif_label`` among the run's stages, ``rm`` reads this file (``labelled_preferences``) instead of
``rm.data`` and records its path and hash in its manifest.

Judgments are cached (see ``stages.rlaif.judges``), so re-running or resuming the stage does not ask the
judge again. Manifest metrics: prompts, responses, pairs judged/kept, ties dropped (inconsistent,
malformed), cache hits, judge requests and throughput, mean lengths, eos rate.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from data.formats import DataError, load_examples
from pipeline.config import RunConfig
from pipeline.manifest import atomic_write_text
from pipeline.models import load_model
from pipeline.stage import StageRun
from stages.chat import prompt_ids_within
from stages.context import StageContext

from .judges import JudgeError, build_judge

OUTPUT_FILE = "preferences.jsonl"


def labelled_preferences(stage_dir: str | Path) -> Path:
    """The preference file a complete ``rlaif_label`` stage at ``stage_dir`` wrote (what ``rm`` trains on
    when ``rlaif_label`` is among the run's stages). Raises ``DataError`` when it is missing or empty."""
    path = Path(stage_dir) / OUTPUT_FILE
    if not path.is_file() or path.stat().st_size == 0:
        raise DataError(f"{path} is missing or empty although the rlaif_label stage at {stage_dir} is complete; "
                        "re-run it (python -m pipeline run CONFIG --stages rlaif_label --force)")
    return path


def _policy_dirs(ctx: StageContext) -> tuple[str, str, str]:
    """(model folder, tokenizer folder, what it is) of the policy that samples: the sft stage's when it is a
    parent, else the base model."""
    start = ctx.starting_model("sft" in ctx.run.parents)
    if start.from_sft and not (Path(start.model_dir) / "config.json").exists():
        raise JudgeError(f"the sft stage at {start.tokenizer_dir} is complete but has no model/config.json; re-run "
                         "it with --force")
    return start.model_dir, start.tokenizer_dir, "sft" if start.from_sft else "base"


def sample_responses(backend: Any, tokenizer: Any, prompts: list[list[int]], num_responses: int,
                     max_new_tokens: int, temperature: float, seed: int) -> list[list[tuple[str, bool]]]:
    """``num_responses`` samples per prompt (token id lists) from the rollout ``backend``
    (``stages.rollout_backend``): ``[[(text, ended_with_eos), ...], ...]``.

    hf: left-padded batches of ``batch_size`` prompts, batch ``b`` sampled under seed ``seed + b`` so a batch's
    samples do not depend on the batches before it; vllm: one random stream per sample. Plain sampling at
    ``temperature``: the checkpoint's generation_config adds nothing (DESIGN §4).
    """
    from stages.rollout_backend import Sampling

    groups = backend.generate(prompts, Sampling(max_new_tokens, temperature, n=num_responses, seed=seed))
    out: list[list[tuple[str, bool]]] = []
    for group in groups:
        out.append([(tokenizer.decode(g.token_ids[:-1] if g.finished else g.token_ids,
                                      skip_special_tokens=True).strip(), g.finished) for g in group])
    return out


def _encode_prompts(cfg: RunConfig, tokenizer: Any, examples: list[Any]) -> tuple[list[list[int]], list[Any], int]:
    """Prompt ids in the chat layout -> (ids, the examples kept, how many were too long)."""
    label_cfg = cfg.rlaif_label
    encoded, kept, too_long = prompt_ids_within(tokenizer, examples, cfg.chat.system_prompt,
                                                label_cfg.max_prompt_length)
    if not encoded:
        raise DataError(f"{label_cfg.data.path}: all {len(examples)} prompts are longer than "
                        f"rlaif_label.max_prompt_length={label_cfg.max_prompt_length} tokens; raise it")
    return encoded, kept, too_long


def _sample(cfg: RunConfig, run: StageRun, model_dir: str, tokenizer: Any, encoded: list[list[int]],
            policy: str) -> tuple[list, float]:
    """``num_responses`` samples per prompt from the policy -> (per prompt [(text, ended_with_eos)], seconds
    spent sampling), with the run's rollout backend (``rollout.backend``)."""
    import torch

    from stages.rollout_backend import open_backend

    label_cfg = cfg.rlaif_label
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"[alignpipe] rlaif_label: sampling {label_cfg.num_responses} responses for {len(encoded)} prompts "
          f"from the {policy} policy ({cfg.rollout.backend})", flush=True)
    with open_backend(cfg, model_dir, tokenizer, lambda: load_model(model_dir, cfg.model, tokenizer).to(device).eval(),
                      device, label_cfg.batch_size, max(map(len, encoded)) + label_cfg.max_new_tokens,
                      run.dir) as backend:
        started = time.time()
        samples = sample_responses(backend, tokenizer, encoded, label_cfg.num_responses, label_cfg.max_new_tokens,
                                   label_cfg.temperature, label_cfg.seed)
        seconds = time.time() - started
    if device == "cuda":
        torch.cuda.empty_cache()
    return samples, seconds


@dataclass
class CandidatePairs:
    """Every pair of distinct non-empty responses to one prompt, with where each came from."""

    items: list[tuple[Any, str, str]] = field(default_factory=list)  # (prompt, response a, response b)
    where: list[tuple[Any, int, int, bool, bool]] = field(default_factory=list)  # (example, i, j, a_eos, b_eos)
    empty: int = 0
    duplicate: int = 0
    ended: int = 0


def _distinct_pairs(examples: list[Any], samples: list[list[tuple[str, bool]]]) -> CandidatePairs:
    pairs = CandidatePairs()
    for ex, responses in zip(examples, samples):
        pairs.ended += sum(e for _, e in responses)
        unique: list[tuple[int, str]] = []
        for k, (text, _) in enumerate(responses):
            if not text:
                pairs.empty += 1
            elif any(text == u for _, u in unique):
                pairs.duplicate += 1
            else:
                unique.append((k, text))
        for (i, a), (j, b) in combinations(unique, 2):
            pairs.items.append((ex.prompt, a, b))
            pairs.where.append((ex, i, j, responses[i][1], responses[j][1]))
    return pairs


def _judge_all(cfg: RunConfig, run: StageRun, items: list[tuple[Any, str, str]]) -> tuple[list, dict, float, Any, int]:
    """Both-order verdicts on every pair, chunk by chunk (progress, cache) -> (verdicts, stats, seconds,
    the judge (closed), chunk size)."""
    label_cfg = cfg.rlaif_label
    judge = build_judge(cfg, label_cfg.judge)
    started = time.time()
    verdicts: list[Any] = []
    chunk = max(label_cfg.batch_size * 4, 16)  # report progress (and let the cache absorb work) chunk by chunk
    try:
        for start in range(0, len(items), chunk):
            verdicts.extend(judge.judge_pairs(items[start:start + chunk]))
            elapsed = time.time() - started
            if len(items) > chunk:
                print(f"[alignpipe] rlaif_label: judged {len(verdicts)}/{len(items)} pairs "
                      f"({len(verdicts) / max(elapsed, 1e-9):.2f} pairs/s)", flush=True)
            run.log(1 + start // chunk, {"pairs_judged": len(verdicts), "judge_s": round(elapsed, 3),
                                         **judge.stats.as_dict()})
    finally:
        seconds = time.time() - started
        stats = judge.stats.as_dict()
        judge.close()
    return verdicts, stats, seconds, judge, chunk


def _preference_records(cfg: RunConfig, pairs: CandidatePairs, verdicts: list[Any],
                        judge_kind: str) -> tuple[list, int]:
    """Decided pairs -> (preference records with the judge's metadata, ties dropped)."""
    records, ties = [], 0
    for (prompt, a, b), (ex, i, j, a_eos, b_eos), v in zip(pairs.items, pairs.where, verdicts):
        if v.choice not in ("A", "B"):
            ties += 1
            continue
        a_wins = v.choice == "A"
        chosen, rejected = (a, b) if a_wins else (b, a)
        records.append({
            "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "judge": {
                "name": cfg.rlaif_label.judge, "kind": judge_kind,
                "prob_chosen": v.prob_a if a_wins else 1.0 - v.prob_a,
                "principle": v.principle, "rationale": v.rationale,
                "responses": [i, j] if a_wins else [j, i],
                "eos": [a_eos, b_eos] if a_wins else [b_eos, a_eos],
            },
            "source": ex.where,
        })
    return records, ties


def _mean_chars(texts: list[str]) -> float | None:
    return round(sum(map(len, texts)) / len(texts), 2) if texts else None


def _metrics(policy: str, kept: int, too_long: int, pairs: CandidatePairs, records: list[dict[str, Any]], ties: int,
             stats: dict[str, Any], n_responses: int, sample_s: float, judge_s: float) -> dict[str, Any]:
    """The manifest's metrics: prompts, responses, pairs judged and kept, ties, the judge's counters, times."""
    n_items = len(pairs.items)
    return {
        "policy": policy, "prompts": kept, "prompts_too_long": too_long,
        "responses": n_responses, "empty_responses": pairs.empty, "duplicate_responses": pairs.duplicate,
        "eos_rate": round(pairs.ended / max(1, n_responses), 4),
        "pairs_judged": n_items, "pairs_kept": len(records), "ties_dropped": ties,
        "inconsistent": stats["inconsistent"], "malformed": stats["malformed"],
        "judge_cache_hits": stats["cache_hits"], "judge_requests": stats["requests"],
        "judge_retries": stats["retries"], "sample_s": round(sample_s, 3), "judge_s": round(judge_s, 3),
        "pair_judgments_per_s": round(n_items / judge_s, 3) if judge_s > 0 else None,
        "chosen_mean_chars": _mean_chars([r["chosen"] for r in records]),
        "rejected_mean_chars": _mean_chars([r["rejected"] for r in records]),
    }


def run(cfg: RunConfig) -> dict[str, Any]:
    """The ``rlaif_label`` stage: 1. encode the prompts, 2. sample responses from the policy, 3. pair the
    distinct ones, 4. judge every pair in both orders, 5. keep the decided pairs as preference data."""
    label_cfg = cfg.rlaif_label
    if label_cfg.data is None:
        raise DataError("rlaif_label.data is not set: point it at a prompt file (a 'prompt' per record), "
                        "e.g. data/demo/prompts.jsonl")
    with StageContext(cfg, "rlaif_label", distributed=False, num_threads=label_cfg.num_threads) as ctx:
        model_dir, tok_dir, policy = _policy_dirs(ctx)
        tokenizer = ctx.use_tokenizer(tok_dir)
        tokenizer.padding_side = "left"
        # 1. encode
        examples, report = load_examples(label_cfg.data, "prompt")
        encoded, kept_examples, too_long = _encode_prompts(cfg, tokenizer, examples)
        # 2. sample
        samples, sample_s = _sample(cfg, ctx.run, model_dir, tokenizer, encoded, policy)
        # 3. pair
        pairs = _distinct_pairs(kept_examples, samples)
        n_responses = len(kept_examples) * label_cfg.num_responses
        ctx.run.log(0, {"prompts": len(kept_examples), "responses": n_responses, "pairs": len(pairs.items),
                        "sample_s": round(sample_s, 3)})
        if not pairs.items:
            raise DataError(f"rlaif_label: no pair of distinct non-empty responses to judge ({pairs.empty} empty, "
                            f"{pairs.duplicate} duplicate responses); raise temperature, max_new_tokens or "
                            "num_responses")
        # 4. judge
        verdicts, stats, judge_s, judge, chunk = _judge_all(cfg, ctx.run, pairs.items)
        # 5. keep the decided pairs
        records, ties = _preference_records(cfg, pairs, verdicts, judge.kind)
        metrics = _metrics(policy, len(kept_examples), too_long, pairs, records, ties, stats, n_responses, sample_s,
                           judge_s)
        n_items = len(pairs.items)
        ctx.run.log(1 + (n_items - 1) // chunk + 1, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if not records:
            ctx.finish(metrics)
            raise DataError(
                f"rlaif_label: the judge {label_cfg.judge!r} kept no pair: all {n_items} were ties "
                f"({stats['inconsistent']} inconsistent across orders, {stats['malformed']} unreadable answers). "
                "A judge that always prefers one position gives only ties; use a stronger judge "
                "(rlaif.judges.<name>.model) or check its output")
        path = Path(ctx.dir) / OUTPUT_FILE
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        ctx.say(f"kept {len(records)} of {n_items} judged pairs ({ties} ties dropped) -> {path}")
        return ctx.finish(metrics, data=report.as_dict(), output=str(path), judge=repr(judge))
