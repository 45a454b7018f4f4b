"""The ``best_of_n`` stage: rejection sampling into SFT data (DESIGN §7).

1. For every prompt of ``best_of_n.data`` the policy (the ``sft`` stage's model, or the base with
   ``policy_from: base``) samples ``n`` responses with the run's rollout backend (``rollout.backend``,
   ``stages.rollout_backend``): temperature ``best_of_n.temperature``, top-k 0, top-p 1, stop at eos,
   nothing from the checkpoint's ``generation_config`` (``stages.generation``). hf (the default): HF
   ``generate``, left padding, batch ``b`` sampled under seed ``seed + b``; vllm: one stream per sample.
2. Every reward source of ``best_of_n.rewards`` scores them (``stages.ppo.rewards.RewardSources``: the
   rm stage's RM on the prompt ids + response ids up to and including eos, functions, judges), summed
   with their weights.
3. Per prompt the best candidate is kept (candidates: responses that ended with eos when
   ``require_eos``), and only when its score is >= ``threshold`` if one is set.
4. ``data.jsonl`` in the stage folder: one ``{"messages": [...prompt, {"role": "assistant", ...}],
   "score", "scores", "best_index", "n", "policy", "source"}`` record per kept prompt: the SFT data
   contract, so ``sft.data: {path: outputs/<run>/best_of_n/data.jsonl}`` trains on it (RAFT / ReST:
   docs/PPO.md).

One process; a killed stage re-runs from the start (same seeds, same output).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from data.formats import DataError, load_examples
from pipeline.config import RunConfig
from pipeline.manifest import atomic_write_text
from pipeline.models import load_model
from stages.context import StageContext

OUTPUT_FILE = "data.jsonl"


def best_of_n_data(stage_dir: str | Path) -> Path:
    """The SFT data file a complete ``best_of_n`` stage at ``stage_dir`` wrote."""
    return Path(stage_dir) / OUTPUT_FILE


def _sample(backend: Any, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float,
            seed: int) -> list[list[list[int]]]:
    """``n`` sampled responses per prompt (token ids up to and including the first eos, or all of them) from the
    rollout ``backend`` (``stages.rollout_backend``)."""
    from stages.rollout_backend import Sampling

    groups = backend.generate(prompts, Sampling(max_new_tokens, temperature, n=n, seed=seed))
    return [[g.token_ids for g in group] for group in groups]


def _samples(ctx: StageContext, model_dir: str, tokenizer: Any, prompts: list[list[int]]) -> tuple[list, float]:
    """``n`` responses per prompt from the policy at ``model_dir`` with the run's rollout backend -> (responses,
    seconds spent sampling)."""
    from stages.rollout_backend import open_backend

    bon = ctx.settings

    def load_policy() -> Any:
        return load_model(model_dir, ctx.cfg.model, tokenizer).to(ctx.device).eval()

    with open_backend(ctx.cfg, model_dir, tokenizer, load_policy, ctx.device, bon.batch_size,
                      max(map(len, prompts)) + bon.max_new_tokens, ctx.dir) as backend:
        started = time.perf_counter()
        samples = _sample(backend, prompts, bon.n, bon.max_new_tokens, bon.temperature, bon.seed)
        return samples, time.perf_counter() - started


def _scored(ctx: StageContext, tokenizer: Any, kept: list[Any], prompts: list[list[int]], samples: list
            ) -> tuple[Any, Any, Any, float]:
    """Every response as a ``Responses`` row, scored by the reward sources -> (rows, scores (prompts, n), the
    sources, seconds spent scoring)."""
    from stages.chat import with_system
    from stages.ppo.rewards import Responses, RewardSources

    cfg, bon = ctx.cfg, ctx.settings
    rm = None
    if any(r.kind == "rm" for r in bon.rewards):
        from stages.scoring import load_reward_model

        rm = load_reward_model(ctx.run.parent_dir("rm"), cfg.model)[0].to(ctx.device).eval()
    sources = RewardSources(bon.rewards, cfg, tokenizer, rm, cfg.rm.max_length, ctx.device, batch_size=bon.batch_size)
    eos = tokenizer.eos_token_id
    flat = [(k, rows) for k, group in enumerate(samples) for rows in group]
    batch = Responses(
        messages=[with_system(kept[k].prompt, cfg.chat.system_prompt) for k, _ in flat],
        prompt_ids=[prompts[k] for k, _ in flat], response_ids=[r for _, r in flat],
        has_eos=[bool(r) and r[-1] == eos for _, r in flat],
        texts=tokenizer.batch_decode([r for _, r in flat], skip_special_tokens=True),
        references=[kept[k].reference for k, _ in flat])
    started = time.perf_counter()
    scores = sources.score(batch).total.view(len(kept), bon.n)
    return batch, scores, sources, time.perf_counter() - started


def _best(bon: Any, kept: list[Any], batch: Any, scores: Any, policy: str, sources: list[str]
          ) -> tuple[list[dict[str, Any]], int, int]:
    """The best candidate of each prompt as an SFT record -> (records, prompts below the threshold, prompts
    without a finished response)."""
    records, below, unfinished = [], 0, 0
    for k, ex in enumerate(kept):
        finished = [j for j in range(bon.n) if batch.has_eos[k * bon.n + j]]
        candidates = finished if bon.require_eos else list(range(bon.n))
        if not candidates:
            unfinished += 1
            continue
        best = max(candidates, key=lambda j: float(scores[k, j]))
        if bon.threshold is not None and float(scores[k, best]) < bon.threshold:
            below += 1
            continue
        text = batch.texts[k * bon.n + best].strip()
        records.append({
            "messages": [*ex.prompt, {"role": "assistant", "content": text}],
            "score": float(scores[k, best]), "scores": [float(x) for x in scores[k]], "best_index": best,
            "n": bon.n, "policy": policy, "reward_sources": sources, "source": ex.where})
    return records, below, unfinished


def run(cfg: RunConfig) -> dict[str, Any]:
    """The ``best_of_n`` stage: 1. sample n responses per prompt, 2. score them, 3. keep the best of each prompt,
    4. write them as SFT data (see the module doc)."""
    from stages.chat import prompt_ids_within

    bon = cfg.best_of_n
    if bon.data is None:
        raise DataError("best_of_n.data is not set: point it at a prompt file (a 'prompt' per record)")
    with StageContext(cfg, "best_of_n", distributed=False, num_threads=bon.num_threads) as ctx:
        start = ctx.starting_model(bon.policy_from == "sft")
        tokenizer = ctx.use_tokenizer(start.tokenizer_dir)
        examples, report = load_examples(bon.data, "prompt")
        prompts, kept, too_long = prompt_ids_within(tokenizer, examples, cfg.chat.system_prompt,
                                                    bon.max_prompt_length)
        if not prompts:
            raise DataError(f"{bon.data.path}: every prompt is longer than best_of_n.max_prompt_length="
                            f"{bon.max_prompt_length} tokens; raise it")
        samples, sample_s = _samples(ctx, start.model_dir, tokenizer, prompts)
        batch, scores, sources, score_s = _scored(ctx, tokenizer, kept, prompts, samples)
        records, below, unfinished = _best(bon, kept, batch, scores, start.description, sources.names)
        if not records:
            raise DataError(f"best_of_n: no prompt kept ({below} below best_of_n.threshold={bon.threshold}, "
                            f"{unfinished} without a finished response); lower the threshold, raise max_new_tokens "
                            "or n, or set best_of_n.require_eos: false")
        path = best_of_n_data(ctx.dir)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        metrics = {
            "prompts": len(kept), "prompts_too_long": too_long, "responses": len(batch.texts), "kept": len(records),
            "below_threshold": below, "no_finished_response": unfinished,
            "eos_rate": sum(batch.has_eos) / len(batch.texts), "score_mean_all": float(scores.mean()),
            "score_mean_kept": sum(r["score"] for r in records) / len(records), "sample_s": sample_s,
            "score_s": score_s,
        }
        ctx.run.log(0, metrics)
        ctx.say(f"kept {len(records)} of {len(kept)} prompts (best of {bon.n}) -> {path}")
        return ctx.finish(metrics, data=report.as_dict(), output=str(path), policy_source=start.description,
                          reward_sources=sources.names)
