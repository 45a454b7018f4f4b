"""``Judge``, the base every judge kind derives from: it asks pairs in both orders (ties when they
disagree), samples the principles, reads and fills the cache, and keeps the statistics; a kind only
answers single questions (``_answer``, or ``_answer_many`` to batch or parallelise)."""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

from .cache import JudgmentCache
from .constitution import Constitution, Principle
from .interface import (
    JudgeStats,
    PairJudgment,
    PointJudgment,
    Prompt,
    RawPair,
    RawScore,
    Response,
    as_messages,
    response_text,
)


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
