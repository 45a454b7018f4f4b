"""What a judge is asked and what it answers: the interface every judge kind shares.

- the questions: a ``Prompt`` (a user string or a message list) and ``Response`` s, and the text helpers
  that read them (``as_messages``, ``response_text``, ``prompt_text``, ``canonical`` for cache keys);
- the answers: ``PairJudgment`` / ``PointJudgment`` (the verdicts callers get) and ``RawPair`` /
  ``RawScore`` (one backend answer, what the cache stores), ``JudgeStats``;
- the interpret functions that turn a backend's raw output into a ``RawPair`` / ``RawScore``:
  ``interpret_pair_value`` (a rule's return value), ``parse_pair_response`` / ``parse_score_response``
  (a chat completion's text and logprobs);
- the errors, ``JudgeError`` and ``JudgeUnavailable``.

The judging protocol itself (order swap, principles, cache, ties) is ``judge.Judge``.
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

LABELS = ("A", "B")
Prompt = str | list[dict[str, str]]
Response = str | list[dict[str, str]]


class JudgeError(RuntimeError):
    """A judge is misconfigured or its backend refused a request for a reason retrying cannot fix."""


class JudgeUnavailable(JudgeError):
    """The judge's endpoint stayed down through every retry. Judgments finished before are cached."""

    def __init__(self, message: str, url: str = "", attempts: int = 0, completed: int = 0):
        super().__init__(message)
        self.url = url
        self.attempts = attempts
        self.completed = completed


# ------------------------------------------------------------------------------------------ results
@dataclass
class PairJudgment:
    """A pairwise verdict over both orders.

    ``prob_a``: probability that response a is better (0.5 for ties); ``choice``: "A", "B" or "tie";
    ``consistent``: both orders agreed (False for an inconsistent or malformed verdict);
    ``orders``: the raw result of each order (first = a, then first = b), for the data set's metadata.
    """

    prob_a: float
    choice: str
    rationale: str | None = None
    consistent: bool = True
    malformed: bool = False
    principle: str | None = None
    orders: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PointJudgment:
    """A pointwise score. ``malformed`` scores are set to the middle of the scale."""

    score: float
    raw: str | None = None
    malformed: bool = False
    principle: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RawPair:
    """One order's answer: the probability that the response shown first is better."""

    prob_first: float | None
    rationale: str | None = None
    raw: str | None = None
    source: str = ""  # "probs", "logprobs", "text", "function"
    error: str | None = None  # why it is malformed


@dataclass
class RawScore:
    score: float | None
    raw: str | None = None
    source: str = ""
    error: str | None = None


_STAT_FIELDS = ("pair_judgments", "point_judgments", "requests", "cache_hits", "malformed", "inconsistent",
                "ties", "retries")


class JudgeStats:
    """Thread-safe counters: judgments, backend requests, cache hits, malformed, inconsistent, ties, retries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(_STAT_FIELDS, 0)

    def add(self, name: str, value: int = 1) -> None:
        with self._lock:
            self._values[name] += value

    def __getattr__(self, name: str) -> int:
        values = self.__dict__.get("_values")
        if values is not None and name in values:
            return values[name]
        raise AttributeError(name)

    def __getitem__(self, name: str) -> int:
        return self._values[name]

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)

    def __repr__(self) -> str:
        return f"JudgeStats({self.as_dict()})"


# --------------------------------------------------------------------------------- prompt text
def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def response_text(response: Response) -> str:
    if isinstance(response, str):
        return response
    return "\n".join(m["content"] for m in response)


def prompt_text(prompt: Prompt) -> str:
    """A single-turn prompt's user text, or a multi-turn conversation as a "User:/Assistant:" transcript."""
    messages = as_messages(prompt)
    body = [m for m in messages if m["role"] != "system"]
    if len(body) == 1 and body[0]["role"] == "user":
        return body[0]["content"]
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in messages)


def interpret_pair_value(value: Any) -> RawPair:
    """A rule's pairwise answer -> RawPair. Accepted: a probability that the first response is better
    (a number in [0, 1]), a label "A" / "B" / "tie", a (label or probability, rationale) tuple, or a
    dict with "choice" or "prob" and an optional "rationale". Anything else is malformed."""
    rationale = None
    if isinstance(value, tuple) and len(value) == 2:
        value, rationale = value
    if isinstance(value, dict):
        rationale = value.get("rationale", rationale)
        value = value.get("prob", value.get("choice"))
    raw = repr(value)
    if isinstance(value, bool):
        return RawPair(None, rationale, raw, "function", "a bool is not a verdict (return 'A', 'B' or a probability)")
    if isinstance(value, (int, float)):
        if math.isfinite(value) and 0.0 <= value <= 1.0:
            return RawPair(float(value), rationale, raw, "function")
        return RawPair(None, rationale, raw, "function", f"probability {value!r} is outside [0, 1]")
    if isinstance(value, str):
        label = value.strip().upper()
        if label in ("A", "B", "TIE"):
            return RawPair({"A": 1.0, "B": 0.0, "TIE": 0.5}[label], rationale, raw, "function")
    return RawPair(None, rationale, raw, "function", f"unreadable verdict {raw[:80]}")


_LABEL_CLEAN = re.compile(r"^[\s\"'`*(\[{:]*|[\s\"'`*)\]}:.,]*$")


def _norm_token(token: str) -> str:
    return _LABEL_CLEAN.sub("", token)


def _find_json(text: str) -> tuple[Any, str | None]:
    """(object, None) for the JSON object in ``text``; (None, reason) when there is one but it is invalid;
    (None, None) when there is none."""
    start = text.find("{")
    if start < 0:
        return None, None
    end = text.rfind("}")
    if end < start:
        return None, "invalid JSON (unterminated object)"
    try:
        return json.loads(text[start:end + 1]), None
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc.msg})"


def _label_from(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    text = value.strip().upper().removeprefix("RESPONSE").strip()
    text = _norm_token(text)
    return text if text in ("A", "B", "TIE") else None


def parse_pair_response(content: str | None, logprobs: list[dict[str, Any]] | None) -> RawPair:
    """Read a pairwise verdict: from the logprobs at the first generated label token when the server
    returned them, else from the text (a JSON ``{"choice": ...}`` or a leading bare label)."""
    text = content or ""
    obj, json_error = _find_json(text)
    rationale = None
    if isinstance(obj, dict):
        r = obj.get("rationale", obj.get("reason", obj.get("explanation")))
        rationale = r if isinstance(r, str) else None
    for entry in logprobs or []:
        if _norm_token(entry.get("token", "")) not in LABELS:
            continue
        mass = {"A": 0.0, "B": 0.0}
        seen = set()
        for alt in [entry, *(entry.get("top_logprobs") or [])]:
            tok = alt.get("token", "")
            label = _norm_token(tok)
            if label in mass and tok not in seen and alt.get("logprob") is not None:
                seen.add(tok)
                mass[label] += math.exp(float(alt["logprob"]))
        total = mass["A"] + mass["B"]
        if total > 0:
            return RawPair(mass["A"] / total, rationale, text[:2000], "logprobs")
        break
    if json_error:
        return RawPair(None, None, text[:2000], "text", json_error)
    if obj is not None:
        if not isinstance(obj, dict):
            return RawPair(None, None, text[:2000], "text", "the JSON is not an object")
        label = _label_from(obj.get("choice", obj.get("answer", obj.get("preferred"))))
        if label is None:
            return RawPair(None, rationale, text[:2000], "text", "the JSON has no choice 'A' or 'B'")
        return RawPair({"A": 1.0, "B": 0.0, "TIE": 0.5}[label], rationale, text[:2000], "text")
    match = re.match(r"^\W*(?:[Rr]esponse\s+)?([AB])(?![A-Za-z0-9])", text.strip())
    if match:
        return RawPair(1.0 if match.group(1) == "A" else 0.0, None, text[:2000], "text")
    return RawPair(None, None, text[:2000], "text", "no label 'A' or 'B' in the answer")


def parse_score_response(content: str | None, logprobs: list[dict[str, Any]] | None, lo: int, hi: int) -> RawScore:
    """Read a score: the text's integer (JSON ``{"score": n}`` or a leading number), refined into an
    expected value from the logprobs at that token when they hold whole score labels."""
    text = content or ""
    obj, json_error = _find_json(text)
    if json_error:
        return RawScore(None, text[:2000], "text", json_error)
    if obj is not None:
        value = obj.get("score", obj.get("rating")) if isinstance(obj, dict) else None
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", value):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return RawScore(None, text[:2000], "text", "the JSON has no numeric 'score'")
    else:
        match = re.match(r"^\W*?(-?\d+(?:\.\d+)?)", text.strip())
        if not match:
            return RawScore(None, text[:2000], "text", "no score in the answer")
        value = float(match.group(1))
    if not lo <= value <= hi:
        return RawScore(None, text[:2000], "text", f"score {value} is outside {lo}..{hi}")
    for entry in logprobs or []:
        token = _norm_token(entry.get("token", ""))
        if not token.isdigit():
            continue
        if int(token) != value:  # the number spans several tokens ("1", "0"): keep the text's value
            break
        weights: dict[int, float] = {}
        for alt in [entry, *(entry.get("top_logprobs") or [])]:
            t = _norm_token(alt.get("token", ""))
            if t.isdigit() and lo <= int(t) <= hi and alt.get("logprob") is not None:
                weights[int(t)] = max(weights.get(int(t), 0.0), math.exp(float(alt["logprob"])))
        total = sum(weights.values())
        if total > 0:
            return RawScore(sum(v * w for v, w in weights.items()) / total, text[:2000], "logprobs")
        break
    return RawScore(float(value), text[:2000], "text")
