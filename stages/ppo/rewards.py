"""PPO reward sources and ready-made rule-based reward functions.

A PPO run's sequence score is ``sum_i weight_i * source_i`` over ``ppo.rewards``:

- ``kind: rm``: the reward model's score, read at the response's closing eos in the exact layout the
  RM stage trained on (``stages.rm.score_responses``: chat template re-rendered and cut at the eos, the
  prompt cut from the left to ``rm.max_length``, right-padded, pad != eos). A response too long for
  ``rm.max_length`` on its own keeps its last tokens (``rollout.rm_input_ids``).
- ``kind: function``: a Python function named ``module:function`` with the signature
  ``fn(prompts: list[str], responses: list[str], references: list) -> list[float]``, where ``prompts``
  holds the last user message of each prompt, ``responses`` the decoded response text (special tokens
  removed), ``references`` the data set's ``reference``/``answer`` column (None when absent).
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
import math
import re
from typing import Any, Callable, Sequence

import torch

from .rollout import rm_input_ids

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


class RewardSources:
    """The configured reward sources of a PPO run, scored together.

    Args:
        sources: ``cfg.ppo.rewards`` (RewardSourceConfig list).
        cfg: the RunConfig (judges are built from ``cfg.rlaif.judges``).
        tokenizer: the run's tokenizer (the RM shares it: the fingerprint check guarantees it).
        rm: the frozen reward model (AutoModelForSequenceClassification, num_labels=1) or None.
        rm_max_length: truncation length the RM stage trained with.
        device: where the RM runs. ``autocast_bf16``: run the RM under bf16 autocast.
        batch_size: RM forward batch size.
    """

    def __init__(self, sources: Sequence[Any], cfg: Any, tokenizer: Any, rm: Any | None, rm_max_length: int,
                 device: torch.device, autocast_bf16: bool = False, batch_size: int = 32):
        self.sources = list(sources)
        self.tokenizer, self.rm, self.rm_max_length = tokenizer, rm, rm_max_length
        self.device, self.bf16, self.batch_size = device, autocast_bf16, batch_size
        self.names: list[str] = []
        self._fns: list[Callable[..., list[float]] | None] = []
        self._judges: list[Any] = []
        for i, src in enumerate(self.sources):
            if src.kind == "rm":
                if rm is None:
                    raise ValueError("ppo.rewards has a 'rm' source but no reward model was loaded")
                name = "rm"
                self._fns.append(None)
                self._judges.append(None)
            elif src.kind == "function":
                name = src.function.split(":")[-1]
                self._fns.append(import_function(src.function))
                self._judges.append(None)
            else:
                try:
                    from stages.rlaif.judges import build_judge
                except ImportError as exc:
                    raise ImportError(f"reward source kind 'judge' needs stages.rlaif.judges ({exc})") from exc
                if src.judge not in cfg.rlaif.judges:
                    raise ValueError(f"ppo.rewards[{i}].judge={src.judge!r} is not defined under rlaif.judges "
                                     f"(defined: {', '.join(cfg.rlaif.judges) or 'none'})")
                name = f"judge_{src.judge}"
                self._fns.append(None)
                self._judges.append(build_judge(cfg, src.judge))
            while name in self.names:
                name += "_"
            self.names.append(name)

    @torch.no_grad()
    def rm_scores(self, messages: Sequence[list[dict[str, str]]], responses: Sequence[str]) -> torch.Tensor:
        """(B,) fp32 RM scores read at each response's closing eos, in the RM stage's own layout.

        Uses ``stages.rm.score_responses`` (chat template re-rendered, cut at the eos, prompt cut from the
        left to the RM's max_length, right padding, fp32 head). A response too long for the RM's
        max_length on its own keeps its last ``max_length`` tokens instead.
        """
        from stages.rm import score_responses, score_token_ids

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            try:
                return score_responses(self.rm, self.tokenizer, list(messages), list(responses),
                                       max_length=self.rm_max_length, batch_size=self.batch_size).float()
            except ValueError:
                pass  # some response does not fit on its own: score row by row
            out = []
            for m, r in zip(messages, responses):
                try:
                    out.append(score_responses(self.rm, self.tokenizer, [m], [r], max_length=self.rm_max_length))
                except ValueError:
                    ids = rm_input_ids(self.tokenizer, m, r, self.rm_max_length)
                    out.append(score_token_ids(self.rm, [ids], self.tokenizer.pad_token_id, 1, self.device))
            return torch.cat(out).float()

    def score(self, messages: Sequence[list[dict[str, str]]], responses: Sequence[str],
              references: Sequence[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (weighted total (B,), {source name: raw scores (B,)}); raises on non-finite scores."""
        prompts = [next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "") for msgs in messages]
        total = torch.zeros(len(responses), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for src, name, fn, judge in zip(self.sources, self.names, self._fns, self._judges):
            if src.kind == "rm":
                values = self.rm_scores(messages, responses)
            elif src.kind == "function":
                result = fn(list(prompts), list(responses), list(references))
                if len(result) != len(responses):
                    raise ValueError(f"reward function {src.function!r} returned {len(result)} scores "
                                     f"for {len(responses)} responses")
                values = torch.tensor([float(x) for x in result], dtype=torch.float32)
            else:
                judged = judge.score_many(list(zip(messages, responses)))
                values = torch.tensor([float(j.score) for j in judged], dtype=torch.float32)
            bad = (~torch.isfinite(values)).nonzero().flatten()
            if bad.numel():
                i = int(bad[0])
                raise FloatingPointError(
                    f"reward source {name!r} returned a non-finite score ({float(values[i])}) for response "
                    f"{i} ({responses[i][:80]!r}); fix the source (PPO cannot learn from NaN/inf rewards)")
            parts[name] = values
            total += src.weight * values
        return total, parts
