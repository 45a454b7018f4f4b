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
from pipeline.models import chat_fingerprint, chat_format, load_model, load_tokenizer, prepare_base
from pipeline.stage import StageRun

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


def run(cfg: RunConfig) -> dict[str, Any]:
    import torch

    from stages.chat import prompt_ids_within, with_system
    from stages.ppo.rewards import Responses, RewardSources
    from stages.rollout_backend import open_backend

    bon = cfg.best_of_n
    if bon.data is None:
        raise DataError("best_of_n.data is not set: point it at a prompt file (a 'prompt' per record)")
    if bon.num_threads:
        torch.set_num_threads(bon.num_threads)
    with StageRun(cfg, "best_of_n") as run:
        if bon.policy_from == "sft":
            stage = run.parent_dir("sft")
            model_dir, tok_dir, policy = str(stage / "model"), str(stage), f"sft stage ({stage})"
        else:
            base = prepare_base(cfg.model)
            model_dir, tok_dir, policy = base, base, f"base model ({base})"
        tokenizer = load_tokenizer(tok_dir, cfg.model, cfg.chat)
        fmt = chat_format(tokenizer, cfg.chat)
        run.set_chat_format(fmt, chat_fingerprint(fmt))
        examples, report = load_examples(bon.data, "prompt")
        encoded, kept, too_long = prompt_ids_within(tokenizer, examples, cfg.chat.system_prompt,
                                                    bon.max_prompt_length)
        if not encoded:
            raise DataError(f"{bon.data.path}: every prompt is longer than best_of_n.max_prompt_length="
                            f"{bon.max_prompt_length} tokens; raise it")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

        def load_policy() -> Any:
            return load_model(model_dir, cfg.model, tokenizer).to(device).eval()

        with open_backend(cfg, model_dir, tokenizer, load_policy, device, bon.batch_size,
                          max(map(len, encoded)) + bon.max_new_tokens, run.dir) as backend:
            started = time.perf_counter()
            samples = _sample(backend, encoded, bon.n, bon.max_new_tokens, bon.temperature, bon.seed)
            sample_s = time.perf_counter() - started

        rm = None
        if any(r.kind == "rm" for r in bon.rewards):
            from stages.scoring import load_reward_model

            rm, _ = load_reward_model(run.parent_dir("rm"), cfg.model)
            rm = rm.to(device).eval()
        sources = RewardSources(bon.rewards, cfg, tokenizer, rm, cfg.rm.max_length, device, batch_size=bon.batch_size)
        eos = tokenizer.eos_token_id
        flat = [(k, rows) for k, group in enumerate(samples) for rows in group]
        batch = Responses(
            messages=[with_system(kept[k].prompt, cfg.chat.system_prompt) for k, _ in flat],
            prompt_ids=[encoded[k] for k, _ in flat], response_ids=[r for _, r in flat],
            has_eos=[bool(r) and r[-1] == eos for _, r in flat],
            texts=tokenizer.batch_decode([r for _, r in flat], skip_special_tokens=True),
            references=[kept[k].reference for k, _ in flat])
        started = time.perf_counter()
        scores = sources.score(batch).total.view(len(kept), bon.n)
        score_s = time.perf_counter() - started

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
                "n": bon.n, "policy": policy, "reward_sources": sources.names, "source": ex.where})
        if not records:
            raise DataError(f"best_of_n: no prompt kept ({below} below best_of_n.threshold={bon.threshold}, "
                            f"{unfinished} without a finished response); lower the threshold, raise max_new_tokens "
                            "or n, or set best_of_n.require_eos: false")
        path = best_of_n_data(run.dir)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        metrics = {
            "prompts": len(kept), "prompts_too_long": too_long, "responses": len(flat), "kept": len(records),
            "below_threshold": below, "no_finished_response": unfinished,
            "eos_rate": sum(batch.has_eos) / len(flat),
            "score_mean_all": float(scores.mean()), "score_mean_kept": sum(r["score"] for r in records) / len(records),
            "sample_s": sample_s, "score_s": score_s,
        }
        run.log(0, metrics)
        run.update(data=report.as_dict(), output=str(path), policy_source=policy, reward_sources=sources.names)
        run.manifest["metrics"] = metrics
        print(f"[alignpipe] best_of_n: kept {len(records)} of {len(kept)} prompts (best of {bon.n}) -> {path}",
              flush=True)
        return metrics
