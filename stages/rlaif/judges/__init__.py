"""AI judges: the feedback a human labeller would give, from a model or a rule (RLAIF; DESIGN §1, §6).

One interface, two kinds of question:

- pairwise ``judge_pair(prompt, a, b) -> PairJudgment(prob_a, choice, rationale, consistent)``: the
  probability that response ``a`` is better. Always asked in both orders, (a, b) and (b, a), to cancel
  position bias: when the two orders disagree the verdict is a tie (``prob_a = 0.5``) and is counted
  in ``stats.inconsistent``;
- pointwise ``score(prompt, response) -> PointJudgment(score, raw)`` on the constitution's scale.

Backends:

- ``HFJudge``: a local causal LM (a base/stage/HF folder). The choice is read from the next-token
  probabilities of the answer labels ("A"/"B") and the score is the expected value over the score
  labels ("1".."10"); labels that tokenise into several tokens ("10", " A") are scored exactly by the
  chain rule. Free text is never parsed.
- ``HTTPJudge``: any OpenAI-compatible ``/v1/chat/completions`` endpoint (our own ``pipeline.serve``,
  vLLM, a hosted API). The label is read from the returned logprobs when there are any, else from the
  text (a JSON object ``{"choice": "A", "rationale": ...}`` or a bare label). Timeouts, retries with
  exponential backoff on 429/5xx/timeouts, a thread pool of ``concurrency`` requests, and
  ``JudgeUnavailable`` (with what was judged kept in the cache) when the endpoint stays down. The API
  key comes from the environment variable named in the config and never appears in a repr, a log
  line, the cache or a manifest.
- ``FunctionJudge``: a Python callable ``module:function`` (rule-based judges).

The rubric is a constitution file (``configs/constitutions/default.yaml``): one principle sampled per
prompt (seeded, deterministic) as in Constitutional AI, or all of them. Judgments are cached on disk
(sqlite) keyed by the judge's identity, the rubric, the prompt and the responses in the order asked,
so a re-run or a resumed stage does not ask again (``stats.cache_hits``). Output that cannot be read
(no label, invalid JSON, a score out of range) is counted in ``stats.malformed`` and judged a tie (or
the middle of the scale), never a crash.

Modules: ``interface`` (questions, answers, interpret functions, errors), ``constitution`` (the rubric
and the judge prompts), ``cache``, ``judge`` (the ``Judge`` base: order swap, caching, ties), one module
per kind (``hf``, ``http``, ``function``); ``build_judge`` here builds one from the run config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, resolve_path
from pipeline.paths import output_path

from .cache import JudgmentCache
from .constitution import TEMPLATE_VERSION, Constitution, Principle, pair_messages, score_messages
from .function import FunctionJudge, load_callable
from .hf import HFJudge, LabelScorer
from .http import HTTPJudge
from .interface import (
    LABELS,
    JudgeError,
    JudgeStats,
    JudgeUnavailable,
    PairJudgment,
    PointJudgment,
    Prompt,
    RawPair,
    RawScore,
    Response,
    as_messages,
    canonical,
    interpret_pair_value,
    parse_pair_response,
    parse_score_response,
    prompt_text,
    response_text,
)
from .judge import Judge

__all__ = [
    "LABELS", "TEMPLATE_VERSION", "Constitution", "FunctionJudge", "HFJudge", "HTTPJudge", "Judge", "JudgeError",
    "JudgeStats", "JudgeUnavailable", "JudgmentCache", "LabelScorer", "PairJudgment", "PointJudgment", "Principle",
    "Prompt", "RawPair", "RawScore", "Response", "as_messages", "build_judge", "canonical", "default_cache_path",
    "interpret_pair_value", "load_callable", "pair_messages", "parse_pair_response", "parse_score_response",
    "prompt_text", "resolve_judge_model", "response_text", "score_messages",
]


def default_cache_path(cfg: RunConfig) -> Path:
    """``<output_root>/.judge_cache/judgments.sqlite``: shared by the runs under one output root (keys
    hold the judge's identity and rubric, so different judges never collide)."""
    return output_path(cfg.output_root) / ".judge_cache" / "judgments.sqlite"


def _adapter_stage(folder: Path) -> bool:
    """A PEFT stage folder that saved only its adapter (no merged ``model/``): loaded as base + adapter."""
    return (folder / "adapter" / "adapter_config.json").exists() and (folder / "manifest.json").exists() \
        and not (folder / "model").exists()


def resolve_judge_model(cfg: RunConfig, model: str | None) -> tuple[str, str]:
    """An hf judge's ``model``: 'base' (the run's base model), a stage name ('sft', ...), or a folder. A stage
    with only ``adapter/`` (a PEFT method that cannot be merged) is returned as the stage folder itself:
    ``HFJudge`` loads its base with the adapter on top."""
    from pipeline.models import CheckpointError, prepare_base, resolve_checkpoint

    if model in (None, "", "base"):
        folder = prepare_base(cfg.model)  # a folder, or a hub name for model.source 'hub'
        return folder, folder
    if model in ("sft", "rm", "ppo") and _adapter_stage(cfg.stage_dir(model)):
        return str(cfg.stage_dir(model)), str(cfg.stage_dir(model))
    if model in ("sft", "rm", "ppo"):
        try:
            model_dir, tok_dir = resolve_checkpoint(cfg.stage_dir(model))
        except CheckpointError as exc:
            raise JudgeError(f"judge model {model!r}: {exc}. Run the '{model}' stage first.") from exc
        return str(model_dir), str(tok_dir)
    path = resolve_path(model)
    if _adapter_stage(path):
        return str(path), str(path)
    if path.exists():
        try:
            model_dir, tok_dir = resolve_checkpoint(path)
        except CheckpointError as exc:
            raise JudgeError(f"judge model {model!r}: {exc}") from exc
        return str(model_dir), str(tok_dir)
    raise JudgeError(f"judge model {model!r}: not 'base', a stage name (sft) or an existing folder "
                     f"(looked at {path})")


def build_judge(cfg: RunConfig, name: str, cache_path: str | os.PathLike | None = None, **kwargs: Any) -> Judge:
    """The judge ``cfg.rlaif.judges[name]``. The cache lives at ``default_cache_path(cfg)`` unless
    ``cache_path`` says otherwise; extra keyword arguments go to the backend's constructor."""
    judges = cfg.rlaif.judges
    if name not in judges:
        raise JudgeError(f"no judge named {name!r} under rlaif.judges (defined: {', '.join(sorted(judges)) or 'none'})")
    jc = judges[name]
    constitution = Constitution.load(jc.constitution, jc.principles, cfg.seed)
    cache = JudgmentCache(cache_path or default_cache_path(cfg)) if jc.cache else None
    common = dict(constitution=constitution, cache=cache, name=name)
    if jc.kind == "function":
        if not jc.function:
            raise JudgeError(f"rlaif.judges.{name}: kind 'function' needs function: 'module:function'")
        return FunctionJudge(jc.function, **common, **kwargs)
    if jc.kind == "http":
        if not jc.base_url:
            raise JudgeError(f"rlaif.judges.{name}: kind 'http' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        return HTTPJudge(jc.base_url, jc.model, api_key_env=jc.api_key_env, timeout_s=jc.timeout_s,
                         max_retries=jc.max_retries, concurrency=jc.concurrency, **common, **kwargs)
    model_dir, tok_dir = resolve_judge_model(cfg, jc.model)
    return HFJudge(model_dir, tok_dir, trust_remote_code=cfg.model.trust_remote_code, **common, **kwargs)
