"""AI judges: the feedback a human labeller would give, from a model or a rule (issue 5, DESIGN §1, §6).

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
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import random
import re
import sqlite3
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

from pipeline.config import RunConfig, resolve_path

logger = logging.getLogger("alignpipe.judges")

LABELS = ("A", "B")
TEMPLATE_VERSION = 1  # bump when the judge prompts below change: it is part of every cache key
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


# ------------------------------------------------------------------------------------- constitution
@dataclass(frozen=True)
class Principle:
    name: str
    compare: str
    rate: str


@dataclass
class Constitution:
    """The rubric: principles, the judge's system message and the score scale."""

    name: str
    principles: list[Principle]
    system: str = "You are a careful, impartial evaluator of AI assistant responses."
    score_min: int = 1
    score_max: int = 10
    mode: str = "sample"  # "sample": one principle per prompt; "all": every principle
    seed: int = 0
    version: int = 1
    source: str = "<built-in>"

    @classmethod
    def load(cls, path: str | os.PathLike | None, mode: str = "sample", seed: int = 0) -> "Constitution":
        """Read a constitution YAML (``None``: a single built-in helpfulness/harmlessness principle)."""
        if mode not in ("sample", "all"):
            raise JudgeError(f"principles must be 'sample' or 'all', got {mode!r}")
        if path is None:
            general = Principle("general", "Which response is more helpful, honest and harmless?",
                                "The response is helpful, honest and harmless.")
            return cls("built-in", [general], mode=mode, seed=seed)
        file = resolve_path(path)
        if not file.exists():
            raise JudgeError(f"constitution file not found: {path} (looked at {file}); see "
                             "configs/constitutions/default.yaml for the format")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise JudgeError(f"{path}: invalid YAML: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("principles"), list) or not data["principles"]:
            raise JudgeError(f"{path}: expected a mapping with a non-empty 'principles' list")
        principles = []
        for i, item in enumerate(data["principles"]):
            missing = [k for k in ("name", "compare", "rate") if not isinstance(item, dict) or not item.get(k)]
            if missing:
                raise JudgeError(f"{path}: principles[{i}] needs {', '.join(missing)} (strings)")
            principles.append(Principle(str(item["name"]), str(item["compare"]).strip(), str(item["rate"]).strip()))
        scale = data.get("score_scale") or {}
        lo, hi = int(scale.get("min", 1)), int(scale.get("max", 10))
        if not 0 <= lo < hi <= 100:
            raise JudgeError(f"{path}: score_scale must have 0 <= min < max <= 100, got {lo}..{hi}")
        return cls(
            name=str(data.get("name", file.stem)), principles=principles,
            system=str(data.get("system") or cls.system).strip(), score_min=lo, score_max=hi, mode=mode,
            seed=seed, version=int(data.get("version", 1)), source=str(path),
        )

    def principles_for(self, prompt: Prompt) -> list[Principle]:
        """The principle(s) for a prompt: all, or one drawn deterministically from (seed, prompt)."""
        if self.mode == "all" or len(self.principles) == 1:
            return list(self.principles)
        digest = hashlib.sha256(f"{self.seed}\0{canonical(prompt)}".encode()).hexdigest()
        return [random.Random(int(digest[:16], 16)).choice(self.principles)]

    def rubric_key(self, principles: Sequence[Principle]) -> dict[str, Any]:
        """What the rubric contributes to a cache key (texts, not file names)."""
        return {"system": self.system, "principles": [asdict(p) for p in principles],
                "scale": [self.score_min, self.score_max], "template": TEMPLATE_VERSION}


# ------------------------------------------------------------------------------------------ prompts
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


def _criteria(principles: Sequence[Principle], kind: str) -> str:
    if len(principles) == 1:
        p = principles[0]
        return p.compare if kind == "pair" else f"Criterion: {p.rate}"
    if kind == "pair":
        lines = "\n".join(f"- {p.name}: {p.compare}" for p in principles)
        return f"Weigh all of these principles together:\n{lines}\nWhich response is better overall?"
    lines = "\n".join(f"- {p.name}: {p.rate}" for p in principles)
    return f"Criteria (weigh them together):\n{lines}"


def pair_messages(constitution: Constitution, principles: Sequence[Principle], prompt: Prompt, first: str,
                  second: str, style: str) -> list[dict[str, str]]:
    """The judge's chat for one order. style "label": answer one letter; "json": a JSON object."""
    if style == "label":
        answer = 'Answer with a single letter, "A" or "B", and nothing else.'
    else:
        answer = ('Reply with only a JSON object, the choice first: {"choice": "A" or "B", '
                  '"rationale": "<one short sentence>"}.')
    user = (f"Compare two responses of an AI assistant to the same conversation.\n\n"
            f"[Conversation]\n{prompt_text(prompt)}\n\n[Response A]\n{first}\n\n[Response B]\n{second}\n\n"
            f"{_criteria(principles, 'pair')}\n{answer}")
    return [{"role": "system", "content": constitution.system}, {"role": "user", "content": user}]


def score_messages(constitution: Constitution, principles: Sequence[Principle], prompt: Prompt, response: str,
                   style: str) -> list[dict[str, str]]:
    lo, hi = constitution.score_min, constitution.score_max
    if style == "label":
        answer = f"Answer with a single integer from {lo} (worst) to {hi} (best) and nothing else."
    else:
        answer = (f'Reply with only a JSON object, the score first: {{"score": <integer {lo} (worst) to {hi} '
                  f'(best)>, "rationale": "<one short sentence>"}}.')
    user = (f"Rate a response of an AI assistant.\n\n[Conversation]\n{prompt_text(prompt)}\n\n"
            f"[Response]\n{response}\n\n{_criteria(principles, 'point')}\n{answer}")
    return [{"role": "system", "content": constitution.system}, {"role": "user", "content": user}]


# -------------------------------------------------------------------------------------------- cache
class JudgmentCache:
    """Raw judge answers on disk (sqlite, safe across threads and processes), keyed by a sha256."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                             "created REAL NOT NULL)")
            self._db.commit()

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        return hashlib.sha256(canonical(parts).encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM judgments WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO judgments (key, value, created) VALUES (?, ?, ?)",
                             (key, json.dumps(value), time.time()))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"JudgmentCache({str(self.path)!r})"


# ------------------------------------------------------------------------------------------- judges
@dataclass
class _Job:
    """One backend question: a pair in one order, or one response to score."""

    kind: str  # "pair" | "point"
    prompt: Prompt
    responses: tuple[str, ...]
    principles: list[Principle]
    key: str = ""


class Judge(abc.ABC):
    """The judge interface. Subclasses answer single questions (``_answer``); this class handles the
    order swap, principle sampling, caching, tie/malformed bookkeeping and statistics."""

    kind = "judge"

    def __init__(self, constitution: Constitution | None = None, cache: JudgmentCache | None = None,
                 name: str = "judge", swap: bool = True):
        self.constitution = constitution or Constitution.load(None)
        self.cache = cache
        self.name = name
        self.swap = swap
        self.stats = JudgeStats()

    # ------------------------------------------------------------------------- to implement
    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """What makes two judges give the same answers (never a secret)."""

    @abc.abstractmethod
    def _answer(self, job: _Job) -> RawPair | RawScore:
        """Ask the backend one question."""

    def _answer_many(self, jobs: list[_Job], done: Callable[[_Job, RawPair | RawScore], None]) -> None:
        """Answer jobs, calling ``done`` as each finishes (backends override to batch or parallelise)."""
        for job in jobs:
            done(job, self._answer(job))

    # ------------------------------------------------------------------------------- public
    def judge_pair(self, prompt: Prompt, a: Response, b: Response) -> PairJudgment:
        return self.judge_pairs([(prompt, a, b)])[0]

    def score(self, prompt: Prompt, response: Response) -> PointJudgment:
        return self.score_many([(prompt, response)])[0]

    def judge_pairs(self, items: Iterable[tuple[Prompt, Response, Response]]) -> list[PairJudgment]:
        """Judge many pairs, each in both orders (cached answers are reused)."""
        items = list(items)
        jobs: list[list[_Job]] = []
        for prompt, a, b in items:
            principles = self.constitution.principles_for(prompt)
            ta, tb = response_text(a), response_text(b)
            orders = [(ta, tb), (tb, ta)] if self.swap else [(ta, tb)]
            jobs.append([self._job("pair", prompt, order, principles) for order in orders])
        answers = self._resolve([job for group in jobs for job in group])
        out = [self._combine([answers[job.key] for job in group], group[0].principles) for group in jobs]
        return out

    def score_many(self, items: Iterable[tuple[Prompt, Response]]) -> list[PointJudgment]:
        items = list(items)
        jobs = [self._job("point", p, (response_text(r),), self.constitution.principles_for(p)) for p, r in items]
        answers = self._resolve(jobs)
        out = []
        lo, hi = self.constitution.score_min, self.constitution.score_max
        for job in jobs:
            raw = answers[job.key]
            self.stats.add("point_judgments")
            names = ",".join(p.name for p in job.principles)
            if raw.score is None:
                self.stats.add("malformed")
                out.append(PointJudgment((lo + hi) / 2, raw.raw, True, names))
            else:
                out.append(PointJudgment(float(raw.score), raw.raw, False, names))
        return out

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> "Judge":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, identity={self.identity()!r})"

    # ----------------------------------------------------------------------------- internals
    def _job(self, kind: str, prompt: Prompt, responses: tuple[str, ...], principles: list[Principle]) -> _Job:
        job = _Job(kind, prompt, tuple(responses), principles)
        job.key = JudgmentCache.key({
            "judge": self.identity(), "rubric": self.constitution.rubric_key(principles), "kind": kind,
            "prompt": as_messages(prompt), "responses": list(responses),
        })
        return job

    def _resolve(self, jobs: list[_Job]) -> dict[str, RawPair | RawScore]:
        answers: dict[str, RawPair | RawScore] = {}
        unique: dict[str, _Job] = {}  # the same question twice in one call is asked once
        for job in jobs:
            if job.key in answers or job.key in unique:
                continue
            hit = self.cache.get(job.key) if self.cache is not None else None
            if hit is not None:
                self.stats.add("cache_hits")
                answers[job.key] = (RawPair if job.kind == "pair" else RawScore)(**hit)
            else:
                unique[job.key] = job

        def done(job: _Job, raw: RawPair | RawScore) -> None:
            answers[job.key] = raw
            if self.cache is not None:
                self.cache.put(job.key, asdict(raw))

        self._answer_many(list(unique.values()), done)
        return answers

    def _combine(self, raws: list[RawPair], principles: list[Principle]) -> PairJudgment:
        """Both orders -> one verdict. Disagreeing orders are a tie; an unreadable order makes a tie too."""
        self.stats.add("pair_judgments")
        names = ",".join(p.name for p in principles)
        orders = [asdict(r) for r in raws]
        malformed = [r for r in raws if r.prob_first is None]
        if malformed:
            self.stats.add("malformed", len(malformed))
            self.stats.add("ties")
            return PairJudgment(0.5, "tie", None, False, True, names, orders)
        # probability that a is better, from each order: first order shows a first, the second shows b first
        probs_a = [raws[0].prob_first] + ([1.0 - raws[1].prob_first] if len(raws) > 1 else [])
        verdicts = ["A" if p > 0.5 else "B" if p < 0.5 else "tie" for p in probs_a]
        rationale = next((r.rationale for r in raws if r.rationale), None)
        if len(set(verdicts)) > 1:
            self.stats.add("inconsistent")
            self.stats.add("ties")
            return PairJudgment(0.5, "tie", rationale, False, False, names, orders)
        prob_a = sum(probs_a) / len(probs_a)
        if verdicts[0] == "tie":
            self.stats.add("ties")
        return PairJudgment(prob_a, verdicts[0], rationale, True, False, names, orders)


# ------------------------------------------------------------------------------------- function judge
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


# --------------------------------------------------------------------------------------- HF judge
def _weights_fingerprint(model_dir: Path) -> str:
    """A content fingerprint of a model folder: config, tokenizer files and (sampled) weights."""
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        path = model_dir / name
        if path.exists():
            digest.update(name.encode() + path.read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as fh:
            if size <= 16 << 20:
                digest.update(fh.read())
            else:  # sample the head (header + first tensors) and the tail
                digest.update(fh.read(4 << 20))
                fh.seek(size - (4 << 20))
                digest.update(fh.read())
    return digest.hexdigest()[:24]


class LabelScorer:
    """Exact probabilities of short label strings as the model's next output, by the chain rule.

    Each label is considered with and without a leading space; each variant is a token sequence, and
    P(variant) = prod_j P(t_j | prompt, t_<j) x P(the sequence ends there), where "ends there" removes
    the mass of continuing into a longer label (so "1" does not also count "10").
    """

    def __init__(self, tokenizer: Any, labels: Sequence[str]):
        self.labels = list(labels)
        self.seqs: dict[tuple[int, ...], int] = {}
        for index, label in enumerate(self.labels):
            for variant in (label, " " + label):
                ids = tuple(tokenizer.encode(variant, add_special_tokens=False))
                if ids and ids not in self.seqs:
                    self.seqs[ids] = index
        if not self.seqs:
            raise JudgeError(f"the judge's tokenizer cannot encode the labels {labels}")
        self.prefixes = sorted({seq[:j] for seq in self.seqs for j in range(len(seq))}, key=len)
        # which next tokens matter after each prefix
        self.next_tokens = {p: sorted({s[len(p)] for s in self.seqs if len(s) > len(p) and s[:len(p)] == p})
                            for p in self.prefixes}
        # the longest prefixes: one forward pass over prompt + chain gives the distributions after every
        # prefix of the chain (causal attention), so only these need their own sequences
        self.chains = [p for p in self.prefixes
                       if not any(len(q) > len(p) and q[:len(p)] == p for q in self.prefixes)]

    def probabilities(self, next_logprobs: dict[tuple[int, ...], dict[int, float]]) -> tuple[list[float], float]:
        """From {prefix: {token: logprob}}, the label distribution (normalised) and its raw mass."""
        mass = [0.0] * len(self.labels)
        for seq, index in self.seqs.items():
            logp = sum(next_logprobs[seq[:j]][seq[j]] for j in range(len(seq)))
            p = math.exp(logp)
            if seq in next_logprobs:  # a longer label continues this one: keep only "stops here"
                p *= max(0.0, 1.0 - sum(math.exp(v) for v in next_logprobs[seq].values()))
            mass[index] += p
        total = sum(mass)
        if total <= 0 or not math.isfinite(total):
            return [1.0 / len(mass)] * len(mass), 0.0
        return [m / total for m in mass], total


class HFJudge(Judge):
    """A local causal LM as judge: label probabilities, never parsed text (see ``LabelScorer``)."""

    kind = "hf"

    def __init__(self, model_path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
                 constitution: Constitution | None = None, cache: JudgmentCache | None = None,
                 name: str = "hf", swap: bool = True, batch_size: int = 8, device: str | None = None,
                 dtype: str = "auto", trust_remote_code: bool = False):
        super().__init__(constitution, cache, name, swap)
        import torch

        from pipeline.config import ModelConfig
        from pipeline.models import load_model, load_tokenizer

        self.model_path = str(model_path)
        tokenizer_path = str(tokenizer_path or model_path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
        mcfg = ModelConfig(source="local", path=self.model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        self.tokenizer = load_tokenizer(tokenizer_path, mcfg)
        self.model = load_model(self.model_path, mcfg, self.tokenizer).to(self.device).eval()
        self.batch_size = batch_size
        self._lock = threading.Lock()
        c = self.constitution
        self.pair_scorer = LabelScorer(self.tokenizer, LABELS)
        self.score_values = list(range(c.score_min, c.score_max + 1))
        self.score_scorer = LabelScorer(self.tokenizer, [str(v) for v in self.score_values])
        folder = Path(self.model_path)
        self._fingerprint = _weights_fingerprint(folder) if folder.is_dir() else self.model_path
        self._template_hash = hashlib.sha256((self.tokenizer.chat_template or "").encode()).hexdigest()[:16]

    def identity(self) -> dict[str, Any]:
        return {"kind": "hf", "weights": self._fingerprint, "chat_template": self._template_hash}

    def _prompt_ids(self, job: _Job) -> list[int]:
        c = self.constitution
        if job.kind == "pair":
            messages = pair_messages(c, job.principles, job.prompt, job.responses[0], job.responses[1], "label")
        else:
            messages = score_messages(c, job.principles, job.prompt, job.responses[0], "label")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    def _tail_logprobs(self, sequences: list[list[int]], tails: list[int]) -> list[Any]:
        """For each sequence, log-softmax of the next token at its last ``tail + 1`` positions
        (a ``(tail + 1, vocab)`` tensor, oldest first); left-padded batches of ``batch_size``."""
        import torch

        from stages.batching import left_pad

        pad = self.tokenizer.pad_token_id
        out = []
        for start in range(0, len(sequences), self.batch_size):
            ids, mask = left_pad(sequences[start:start + self.batch_size], pad)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            longest = max(tails[start:start + self.batch_size]) + 1
            inputs = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                          position_ids=position_ids.to(self.device))
            with torch.no_grad():
                try:  # only the last positions' logits: saves a (batch, width, vocab) tensor
                    logits = self.model(**inputs, logits_to_keep=longest).logits
                except TypeError:  # an architecture without logits_to_keep
                    logits = self.model(**inputs).logits[:, -longest:, :]
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, tail in enumerate(tails[start:start + self.batch_size]):
                out.append(logprobs[row, longest - tail - 1:])
        return out

    def _answer(self, job: _Job) -> RawPair | RawScore:
        result: list[RawPair | RawScore] = []
        self._answer_many([job], lambda _job, raw: result.append(raw))
        return result[0]

    def _answer_many(self, jobs: list[_Job], done: Callable[[_Job, RawPair | RawScore], None]) -> None:
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            prompts = [self._prompt_ids(job) for job in chunk]
            requests: list[tuple[int, tuple[int, ...]]] = []
            for i, job in enumerate(chunk):
                scorer = self.pair_scorer if job.kind == "pair" else self.score_scorer
                requests.extend((i, chain) for chain in scorer.chains)
            with self._lock:
                dists = self._tail_logprobs([prompts[i] + list(chain) for i, chain in requests],
                                            [len(chain) for _, chain in requests])
            self.stats.add("requests", len(chunk))
            per_job: list[dict[tuple[int, ...], dict[int, float]]] = [{} for _ in chunk]
            for (i, chain), rows in zip(requests, dists):
                scorer = self.pair_scorer if chunk[i].kind == "pair" else self.score_scorer
                for j in range(len(chain) + 1):
                    prefix = chain[:j]
                    per_job[i][prefix] = {t: float(rows[j][t]) for t in scorer.next_tokens[prefix]}
            for job, logprobs in zip(chunk, per_job):
                if job.kind == "pair":
                    probs, mass = self.pair_scorer.probabilities(logprobs)
                    raw = json.dumps({"A": probs[0], "B": probs[1], "label_mass": mass})
                    done(job, RawPair(probs[0], None, raw, "probs") if mass > 0
                         else RawPair(None, None, raw, "probs", "no probability on the labels"))
                else:
                    probs, mass = self.score_scorer.probabilities(logprobs)
                    expected = sum(p * v for p, v in zip(probs, self.score_values))
                    raw = json.dumps({"expected": expected, "label_mass": mass,
                                      "probs": {str(v): p for v, p in zip(self.score_values, probs)}})
                    done(job, RawScore(expected, raw, "probs") if mass > 0
                         else RawScore(None, raw, "probs", "no probability on the score labels"))


# ------------------------------------------------------------------------------------- HTTP judge
class _Secret:
    """Holds an API key; prints as ``<hidden>`` so no repr, f-string or log line can leak it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<hidden>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("an API key is not picklable")


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


class HTTPJudge(Judge):
    """A judge behind an OpenAI-compatible chat-completions endpoint.

    ``base_url`` is the API base including the version (``http://127.0.0.1:8000/v1``); a bare
    ``http://host:port`` gets ``/v1`` appended. Requests ask for greedy decoding (temperature 0) with
    logprobs; a server that refuses logprobs is asked again without them.
    """

    kind = "http"
    RETRY_STATUSES = (408, 409, 425, 429, 500, 502, 503, 504)

    def __init__(self, base_url: str, model: str | None, constitution: Constitution | None = None,
                 cache: JudgmentCache | None = None, name: str = "http", swap: bool = True,
                 api_key_env: str | None = None, timeout_s: float = 30.0, max_retries: int = 4,
                 concurrency: int = 4, max_tokens: int = 96, backoff_s: float = 0.5, backoff_max_s: float = 30.0,
                 top_logprobs: int = 20):
        super().__init__(constitution, cache, name, swap)
        import httpx

        if not base_url or not base_url.startswith(("http://", "https://")):
            raise JudgeError(f"judge {name!r}: base_url must be an http(s) URL, got {base_url!r}")
        base = base_url.rstrip("/")
        if re.fullmatch(r"https?://[^/]+", base):
            base += "/v1"
        self.base_url = base
        self.url = base + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self._key: _Secret | None = None
        if api_key_env:
            value = os.environ.get(api_key_env)
            if not value:
                raise JudgeError(f"judge {name!r}: the environment variable {api_key_env} (api_key_env) is not set "
                                 f"or empty; export it with the API key for {self.base_url}")
            self._key = _Secret(value)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.top_logprobs = top_logprobs
        self.use_logprobs = True
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s))
        self._stop = threading.Event()

    def identity(self) -> dict[str, Any]:
        return {"kind": "http", "base_url": self.base_url, "model": self.model, "max_tokens": self.max_tokens,
                "temperature": 0}

    def close(self) -> None:
        self._client.close()
        super().close()

    # ------------------------------------------------------------------------------- requests
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._key is not None:
            headers["Authorization"] = "Bearer " + self._key.reveal()
        return headers

    def _sleep_before_retry(self, attempt: int, retry_after: str | None) -> None:
        delay = min(self.backoff_max_s, self.backoff_s * (2 ** attempt)) * (0.5 + random.random() / 2)
        if retry_after:
            try:
                delay = max(delay, min(self.backoff_max_s, float(retry_after)))
            except ValueError:
                pass
        self._stop.wait(delay)

    def post(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """One chat completion with retries. Raises JudgeUnavailable or JudgeError (non-retryable 4xx)."""
        import httpx

        attempts = self.max_retries + 1
        last = ""
        attempt = -1
        while attempt + 1 < attempts:
            attempt += 1
            if self._stop.is_set():
                raise JudgeUnavailable(f"judge {self.name!r}: stopped after another request failed", self.url)
            body: dict[str, Any] = {"messages": messages, "max_tokens": self.max_tokens, "temperature": 0}
            if self.model:
                body["model"] = self.model
            if self.use_logprobs:
                body.update(logprobs=True, top_logprobs=self.top_logprobs)
            retry_after = None
            try:
                response = self._client.post(self.url, json=body, headers=self._headers())
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout_s:g} s"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                self.stats.add("requests")
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        last = "HTTP 200 with a body that is not JSON"
                elif response.status_code == 400 and self.use_logprobs and "logprob" in response.text.lower():
                    logger.info("judge %r: the endpoint refuses logprobs; reading labels from text", self.name)
                    self.use_logprobs = False
                    attempt -= 1  # asking again without logprobs is not a retry
                    continue
                elif response.status_code in self.RETRY_STATUSES:
                    last = f"HTTP {response.status_code}: {response.text[:200]}"
                    retry_after = response.headers.get("Retry-After")
                else:
                    hint = " (check the API key in the environment variable api_key_env names)" \
                        if response.status_code in (401, 403) else ""
                    raise JudgeError(f"judge {self.name!r}: {self.url} answered HTTP {response.status_code}: "
                                     f"{response.text[:300]}{hint}")
            if attempt + 1 < attempts:
                self.stats.add("retries")
                logger.warning("judge %r: %s on attempt %d of %d; retrying", self.name, last, attempt + 1, attempts)
                self._sleep_before_retry(attempt, retry_after)
        raise JudgeUnavailable(f"judge {self.name!r}: {self.url} did not answer after {attempts} attempts "
                               f"(last: {last})", self.url, attempts)

    def _answer(self, job: _Job) -> RawPair | RawScore:
        c = self.constitution
        if job.kind == "pair":
            messages = pair_messages(c, job.principles, job.prompt, job.responses[0], job.responses[1], "json")
        else:
            messages = score_messages(c, job.principles, job.prompt, job.responses[0], "json")
        data = self.post(messages)
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content")
            logprobs = (choice.get("logprobs") or {}).get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            bad = json.dumps(data)[:500]
            return (RawPair(None, None, bad, "text", "no choices in the response") if job.kind == "pair"
                    else RawScore(None, bad, "text", "no choices in the response"))
        if job.kind == "pair":
            return parse_pair_response(content, logprobs)
        return parse_score_response(content, logprobs, c.score_min, c.score_max)

    def _answer_many(self, jobs: list[_Job], done: Callable[[_Job, RawPair | RawScore], None]) -> None:
        if not jobs:
            return
        self._stop.clear()
        finished = 0
        lock = threading.Lock()

        def work(job: _Job) -> None:
            nonlocal finished
            raw = self._answer(job)
            with lock:
                done(job, raw)
                finished += 1

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs)),
                                thread_name_prefix=f"judge-{self.name}") as pool:
            futures = [pool.submit(work, job) for job in jobs]
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            error = next((f.exception() for f in futures if f.done() and f.exception() is not None), None)
            if error is not None:
                self._stop.set()
                for future in pending:
                    future.cancel()
        if error is None:
            return
        if isinstance(error, JudgeUnavailable):
            kept = (f"; the {finished} answers received before are kept in the cache {self.cache.path}"
                    if self.cache is not None else f"; {finished} answers were received (the cache is off)")
            raise JudgeUnavailable(str(error) + kept, error.url or self.url, error.attempts, finished) from error
        raise error


# ---------------------------------------------------------------------------------------- factory
def default_cache_path(cfg: RunConfig) -> Path:
    """``<output_root>/.judge_cache/judgments.sqlite``: shared by the runs under one output root (keys
    hold the judge's identity and rubric, so different judges never collide)."""
    return resolve_path(cfg.output_root) / ".judge_cache" / "judgments.sqlite"


def resolve_judge_model(cfg: RunConfig, model: str | None) -> tuple[str, str]:
    """An hf judge's ``model``: 'base' (the run's base model), a stage name ('sft', ...), or a folder."""
    from pipeline.models import prepare_base
    from pipeline.serve import ServeError, resolve_checkpoint

    if model in (None, "", "base"):
        folder = prepare_base(cfg.model)  # a folder, or a hub name for model.source 'hub'
        return folder, folder
    if model in ("sft", "rm", "ppo"):
        try:
            model_dir, tok_dir = resolve_checkpoint(cfg.stage_dir(model))
        except ServeError as exc:
            raise JudgeError(f"judge model {model!r}: {exc}. Run the '{model}' stage first.") from exc
        return str(model_dir), str(tok_dir)
    path = resolve_path(model)
    if path.exists():
        try:
            model_dir, tok_dir = resolve_checkpoint(path)
        except ServeError as exc:
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
