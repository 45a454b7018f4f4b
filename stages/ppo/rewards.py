"""PPO reward sources and ready-made rule-based reward functions.

A PPO run's sequence score is ``sum_i weight_i * source_i`` over ``ppo.rewards``:

- ``kind: rm``: the reward model's score. Where it is read (``RewardSources.rm_read``, recorded in the
  manifest as ``reward_model_read``; ``stages.scoring.reward_reading`` decides):

  - ``trained_position``, an RM our ``rm`` stage trained (the run's, or a ``ppo.reward_model`` folder
    it wrote): at the last token of the sequence it is given (a finished response's eos), as trained.
    What it is given (``RewardSources.rm_scoring``, recorded in the manifest): ``token_ids`` when it
    shares the policy's tokenizer and chat format (equal chat-format fingerprints, always so for the run's
    ``rm`` stage): the prompt ids the policy saw followed by the generated ids up to and including the
    first eos (``stages.scoring.reward_input_ids``). Nothing is decoded or re-rendered, so special tokens
    the policy emits are seen, tokenisation cannot drift, and a response cut off at ``max_new_tokens`` is
    scored at its last token, not as if it had finished. ``text`` for one with its own tokenizer or
    template: the decoded response rendered in its own chat template
    (``stages.scoring.reward_input_from_text``), with the closing eos dropped for a response that did
    not finish.
  - ``transformers_last_non_pad``, any other RM (``ppo.reward_model`` trained by TRL, taken from the
    hub, ...), even with the policy's tokenizer: exactly as transformers reads it, ``text`` always: the
    decoded response with the prompt in the RM's ``apply_chat_template`` render, whole
    (``stages.scoring.transformers_reward_input``; an unfinished response ends at its last token, nothing
    of the template after it), through the model's own forward, which pools at the last non-pad token.

  Either way the sequence is cut from the left (keeping bos) to the RM's max_length
  (``stages.scoring.fit_reward_input``); how many were cut is logged as ``rm_truncated``.
- ``kind: function``: a Python function named ``module:function``, called as
  ``fn(prompts: list[str], responses: list[str], references: list, **optional)``, where ``prompts``
  holds the last user message of each prompt, ``responses`` the decoded response text (special tokens
  removed), ``references`` the data set's ``reference``/``answer`` column (None when absent). A function
  that names them (or takes ``**kwargs``) also gets ``has_eos`` (list[bool]: did the response end with
  eos) and ``response_ids`` (list[list[int]]: the generated ids up to and including eos). It returns
  a list of floats, or ``{"scores": [...], "metrics": {name: [one number or None per response]}}``;
  each metric's mean over the step (None ignored) is logged as ``reward_metric/<name>``.
- ``kind: judge``: an AI judge from ``rlaif.judges`` (``stages.rlaif.judges.build_judge``), scored per
  (prompt, response) pair.

Functions shipped here (use them as ``stages.ppo.rewards:<name>``):

- :func:`gsm8k_correct`: 1.0 when the response's final number equals the reference's (``#### 42``
  gsm8k style or the last number in the reference), else 0.0.
- :func:`contains_reference_number`: same check, but any number in the response counts (lenient).
- :func:`digit_fraction`: fraction of non-space characters that are digits (a dense toy reward the
  tiny tests and benchmark learn in a few steps).
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from data.formats import last_user

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _numbers(text: str) -> list[float]:
    out = []
    for match in _NUMBER.findall(text or ""):
        try:
            out.append(float(match.replace(",", "")))
        except ValueError:
            continue
    return out


def reference_answer(reference: Any) -> float | None:
    """The reference's final answer: the number after ``####`` (gsm8k) or its last number."""
    if reference is None:
        return None
    if isinstance(reference, (int, float)):
        return float(reference)
    text = str(reference)
    if "####" in text:
        text = text.split("####")[-1]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def gsm8k_correct(prompts: list[str], responses: list[str], references: list[Any]) -> list[float]:
    """1.0 where the response's final number (after ``####`` if present) equals the reference answer."""
    scores = []
    for response, reference in zip(responses, references):
        target = reference_answer(reference)
        text = response.split("####")[-1] if "####" in response else response
        numbers = _numbers(text)
        scores.append(1.0 if target is not None and numbers and math.isclose(numbers[-1], target) else 0.0)
    return scores


def contains_reference_number(prompts: list[str], responses: list[str], references: list[Any]) -> list[float]:
    """1.0 where any number in the response equals the reference answer."""
    scores = []
    for response, reference in zip(responses, references):
        target = reference_answer(reference)
        hit = target is not None and any(math.isclose(n, target) for n in _numbers(response))
        scores.append(1.0 if hit else 0.0)
    return scores


def digit_fraction(prompts: list[str], responses: list[str], references: list[Any]) -> list[float]:
    """Fraction of the response's non-space characters that are digits (0 for an empty response)."""
    scores = []
    for response in responses:
        chars = [c for c in response if not c.isspace()]
        scores.append(sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0)
    return scores


def import_function(spec: str) -> Callable[..., list[float]]:
    """``module:function`` -> the callable, with an actionable error."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"reward function {spec!r}: cannot import module {module_name!r} ({exc}); "
                          "the module must be importable from the repository root or installed") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise AttributeError(f"reward function {spec!r}: module {module_name!r} has no callable {attr!r}")
    return fn


@dataclass
class Responses:
    """One batch of episodes to score, one row per episode (B rows)."""

    messages: list[list[dict[str, str]]]  # the prompt conversation (system prompt applied)
    prompt_ids: list[list[int]]           # ids the policy was prompted with (unpadded, after left truncation)
    response_ids: list[list[int]]         # generated ids up to and including the first eos (unpadded)
    has_eos: list[bool]                   # whether the response ended with eos (False: cut at max_new_tokens)
    texts: list[str]                      # decoded responses, special tokens removed
    references: list[Any]                 # the data set's reference/answer column (None where absent)


@dataclass
class Scores:
    """What :meth:`RewardSources.score` returns."""

    total: torch.Tensor                   # (B,) fp32 weighted sum of the sources
    parts: dict[str, torch.Tensor]        # source name -> (B,) raw scores
    metrics: dict[str, torch.Tensor]      # extra per-sample metrics of reward functions: name -> (B,) (NaN: none)
    rm_truncated: int = 0                 # RM inputs cut to the RM's max_length in this batch

    @staticmethod
    def rows_of(batches: Sequence[Scores], rows: torch.Tensor) -> Scores:
        """Rows ``rows`` ((n,) indices into the batches' rows, batch after batch) of several batches' scores
        (same sources and metrics in each) as one; ``rm_truncated`` counts every batch's inputs."""
        def pick(values: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(values)[rows]

        first = batches[0]
        return Scores(pick([b.total for b in batches]), {k: pick([b.parts[k] for b in batches]) for k in first.parts},
                      {k: pick([b.metrics[k] for b in batches]) for k in first.metrics},
                      sum(b.rm_truncated for b in batches))


OPTIONAL_KEYWORDS = ("has_eos", "response_ids")


def _accepted_keywords(fn: Callable[..., Any]) -> set[str]:
    """Which of the optional keyword arguments (``has_eos``, ``response_ids``) a reward function takes."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return set(OPTIONAL_KEYWORDS)
    return {p.name for p in params if p.name in OPTIONAL_KEYWORDS}


class RewardSources:
    """The configured reward sources of a PPO run, scored together.

    Args:
        sources: ``cfg.ppo.rewards`` (RewardSourceConfig list).
        cfg: the RunConfig (judges are built from ``cfg.rlaif.judges``; ``cfg.chat`` for fingerprints).
        tokenizer: the policy's tokenizer.
        rm: the frozen reward model (AutoModelForSequenceClassification, num_labels=1) or None.
        rm_max_length: the longest sequence the RM scores (its training max_length).
        device: where the RM runs. ``autocast_bf16``: run the RM under bf16 autocast.
        batch_size: RM forward batch size.
        rm_tokenizer: the RM's tokenizer when it was loaded separately (an RM you bring), else None
            (the rm stage's RM: same tokenizer and chat format, the stage fingerprint check guarantees it).
        rm_read: where the RM is read, ``stages.scoring.READ_TRAINED`` (an RM our rm stage trained) or
            ``READ_TRANSFORMERS`` (any other; ``stages.scoring.reward_reading`` decides which).

    ``rm_scoring`` says what the RM is given: ``"token_ids"`` when it is read at its trained position and
    shares the policy's tokenizer and chat format (equal chat-format fingerprints;
    :func:`stages.scoring.reward_input_ids`), else ``"text"`` (:func:`stages.scoring.reward_input`: in the
    RM's own template, in its training layout or as transformers renders it).
    """

    def __init__(self, sources: Sequence[Any], cfg: Any, tokenizer: Any, rm: Any | None, rm_max_length: int,
                 device: torch.device, autocast_bf16: bool = False, batch_size: int = 32,
                 rm_tokenizer: Any | None = None, rm_read: str = "trained_position"):
        from stages.scoring import READ_TRAINED, READINGS

        if rm_read not in READINGS:
            raise ValueError(f"rm_read={rm_read!r}; expected one of {', '.join(READINGS)}")
        self.sources = list(sources)
        self.tokenizer, self.rm, self.rm_max_length = tokenizer, rm, rm_max_length
        self.device, self.bf16, self.batch_size = device, autocast_bf16, batch_size
        self.cfg = cfg
        self.rm_tokenizer = rm_tokenizer if rm_tokenizer is not None else tokenizer
        self.rm_read = rm_read
        same_ids = rm_tokenizer is None or same_chat_format(tokenizer, rm_tokenizer, cfg)
        self.rm_scoring = "token_ids" if rm_read == READ_TRAINED and same_ids else "text"
        self.names: list[str] = []
        self._fns: list[Callable[..., Any] | None] = []
        self._keywords: list[set[str]] = []
        self._judges: list[Any] = []
        for i, src in enumerate(self.sources):
            fn, judge = None, None
            if src.kind == "rm":
                if rm is None:
                    raise ValueError("ppo.rewards has a 'rm' source but no reward model was loaded")
                name = "rm"
            elif src.kind == "function":
                name = src.function.split(":")[-1]
                fn = import_function(src.function)
            else:
                try:
                    from stages.rlaif.judges import build_judge
                except ImportError as exc:
                    raise ImportError(f"reward source kind 'judge' needs stages.rlaif.judges ({exc})") from exc
                if src.judge not in cfg.rlaif.judges:
                    raise ValueError(f"ppo.rewards[{i}].judge={src.judge!r} is not defined under rlaif.judges "
                                     f"(defined: {', '.join(cfg.rlaif.judges) or 'none'})")
                name = f"judge_{src.judge}"
                judge = build_judge(cfg, src.judge)
            while name in self.names:
                name += "_"
            self.names.append(name)
            self._fns.append(fn)
            self._keywords.append(_accepted_keywords(fn) if fn is not None else set())
            self._judges.append(judge)

    def rm_inputs(self, batch: Responses) -> tuple[list[list[int]], int]:
        """-> (the token ids the RM scores for each row, how many were cut to the RM's max_length)."""
        from stages.scoring import fit_reward_input, reward_input, reward_input_ids

        if self.rm_scoring == "token_ids":
            bos = self.tokenizer.bos_token_id
            seqs = [reward_input_ids(p, r, self.rm_max_length, bos)
                    for p, r in zip(batch.prompt_ids, batch.response_ids)]
            cut = sum(len(p) + len(r) > self.rm_max_length for p, r in zip(batch.prompt_ids, batch.response_ids))
            return seqs, cut
        full = [reward_input(self.rm_tokenizer, self.rm_read, m, t, bool(e))
                for m, t, e in zip(batch.messages, batch.texts, batch.has_eos)]
        bos = self.rm_tokenizer.bos_token_id
        return [fit_reward_input(ids, self.rm_max_length, bos) for ids in full], \
            sum(len(ids) > self.rm_max_length for ids in full)

    @torch.no_grad()
    def rm_scores(self, batch: Responses) -> tuple[torch.Tensor, int]:
        """-> ((B,) fp32 RM scores read where ``rm_read`` says, rows cut to the RM's max_length)."""
        from stages.scoring import score_reward_inputs

        seqs, cut = self.rm_inputs(batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            scores = score_reward_inputs(self.rm, seqs, self.rm_read, self.rm_tokenizer.pad_token_id,
                                         self.batch_size, self.device)
        return scores.float(), cut

    def _function_scores(self, i: int, batch: Responses, prompts: list[str]
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        spec, fn, keywords = self.sources[i].function, self._fns[i], self._keywords[i]
        n = len(batch.texts)
        extra: dict[str, Any] = {}
        if "has_eos" in keywords:
            extra["has_eos"] = [bool(e) for e in batch.has_eos]
        if "response_ids" in keywords:
            extra["response_ids"] = [list(r) for r in batch.response_ids]
        result = fn(list(prompts), list(batch.texts), list(batch.references), **extra)
        metrics: dict[str, torch.Tensor] = {}
        if isinstance(result, dict):
            if "scores" not in result:
                raise ValueError(f"reward function {spec!r} returned a dict without 'scores' "
                                 "(expected {'scores': [...], 'metrics': {name: [...]}})")
            for name, values in (result.get("metrics") or {}).items():
                values = list(values)
                if len(values) != n:
                    raise ValueError(f"reward function {spec!r}: metric {name!r} has {len(values)} values for "
                                     f"{n} responses")
                metrics[str(name)] = torch.tensor([math.nan if v is None else float(v) for v in values],
                                                  dtype=torch.float32)
            result = result["scores"]
        result = list(result)
        if len(result) != n:
            raise ValueError(f"reward function {spec!r} returned {len(result)} scores for {n} responses")
        return torch.tensor([float(x) for x in result], dtype=torch.float32), metrics

    def score(self, batch: Responses) -> Scores:
        """Score every source on ``batch``; raises on non-finite scores (naming the source)."""
        prompts = [last_user(msgs) for msgs in batch.messages]
        responses = batch.texts
        total = torch.zeros(len(responses), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        rm_truncated = 0
        for i, (src, name, judge) in enumerate(zip(self.sources, self.names, self._judges)):
            if src.kind == "rm":
                values, rm_truncated = self.rm_scores(batch)
            elif src.kind == "function":
                values, extra = self._function_scores(i, batch, prompts)
                for key, per_sample in extra.items():
                    if key in metrics:
                        raise ValueError(f"reward function {src.function!r}: metric {key!r} is also returned by "
                                         "another reward function; give it another name")
                    metrics[key] = per_sample
            else:
                judged = judge.score_many(list(zip(batch.messages, responses)))
                values = torch.tensor([float(j.score) for j in judged], dtype=torch.float32)
            bad = (~torch.isfinite(values)).nonzero().flatten()
            if bad.numel():
                j = int(bad[0])
                raise FloatingPointError(
                    f"reward source {name!r} returned a non-finite score ({float(values[j])}) for response "
                    f"{j} ({responses[j][:80]!r}); fix the source (PPO cannot learn from NaN/inf rewards)")
            parts[name] = values
            total += src.weight * values
        return Scores(total, parts, metrics, rm_truncated)


def same_chat_format(tokenizer: Any, other: Any, cfg: Any) -> bool:
    """Whether two tokenizers have the same chat-format fingerprint (vocabulary, special ids, template)."""
    from pipeline.models import chat_fingerprint, chat_format

    chat = getattr(cfg, "chat", None)
    return chat_fingerprint(chat_format(tokenizer, chat)) == chat_fingerprint(chat_format(other, chat))
