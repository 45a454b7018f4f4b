"""``FunctionJudge``: a rule-based judge from a Python callable (``module:function``)."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
from typing import Any, Callable

from .cache import JudgmentCache
from .constitution import Constitution
from .interface import JudgeError, RawPair, RawScore, interpret_pair_value, prompt_text
from .judge import Judge, _Job


def load_callable(spec: str) -> Callable[..., Any]:
    """``module:function`` (dotted attribute paths allowed after the colon) -> the callable."""
    if ":" not in spec:
        raise JudgeError(f"judge function {spec!r} must look like 'module:function'")
    module_name, attr = spec.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise JudgeError(f"judge function {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise JudgeError(f"judge function {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise JudgeError(f"judge function {spec!r} is not callable")
    return obj


class FunctionJudge(Judge):
    """A rule-based judge from Python callables.

    The callable (``module:function`` or a function) is called as ``fn(prompt, first, second)`` for a
    pairwise question (see ``interpret_pair_value`` for what it may return) and ``fn(prompt, response)``
    for a score (a finite number). ``prompt`` is the user's text (a transcript for multi-turn prompts);
    a ``principle`` keyword argument (the principle's text) is passed when the callable accepts one.
    Exceptions raised by the callable propagate (a rule that crashes is a bug, not a judgment).
    """

    kind = "function"

    def __init__(self, function: str | Callable[..., Any], constitution: Constitution | None = None,
                 cache: JudgmentCache | None = None, name: str = "function", swap: bool = True):
        super().__init__(constitution, cache, name, swap)
        self.spec = function if isinstance(function, str) else f"{function.__module__}:{function.__qualname__}"
        self.fn = load_callable(function) if isinstance(function, str) else function
        try:
            params = inspect.signature(self.fn).parameters
            self._takes_principle = "principle" in params or any(
                p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):
            self._takes_principle = False
        try:
            self._source_hash = hashlib.sha256(inspect.getsource(self.fn).encode()).hexdigest()[:16]
        except (OSError, TypeError):
            self._source_hash = None

    def identity(self) -> dict[str, Any]:
        return {"kind": "function", "function": self.spec, "source": self._source_hash}

    def _answer(self, job: _Job) -> RawPair | RawScore:
        kwargs = {}
        if self._takes_principle:
            kwargs["principle"] = "\n".join(p.compare if job.kind == "pair" else p.rate for p in job.principles)
        value = self.fn(prompt_text(job.prompt), *job.responses, **kwargs)
        self.stats.add("requests")
        if job.kind == "pair":
            return interpret_pair_value(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return RawScore(None, repr(value), "function", f"score {value!r} is not a finite number")
        return RawScore(float(value), repr(value), "function")
