"""A rule-based judge for the project's demo tasks (``data/make_demo.py``): it computes the right answer.

The demo prompts are procedural: arithmetic (``What is 5 plus 12?``, ``minus``, ``times``), reversing a
word, writing a word in capital letters, counting a word's letters, the opposite of a word and the
capital city of a country. For these a rule knows the right answer, so it can give the feedback a
careful human labeller would, on any machine and in microseconds. It is the default judge of
``configs/demo.yaml`` and ``configs/tiny.yaml`` because the embedded SmolLM2-135M judge has a measured
position bias that makes every verdict a tie after the order swap (see ``docs/RESULTS.md``, "Judges").

Use it as a ``function`` judge (``rlaif.judges.<name>: {kind: function, function: ...}``):

- ``stages.rlaif.rules:demo_task_judge`` — pairwise, ``demo_task_judge(prompt, first, second)``;
- ``stages.rlaif.rules:demo_task_score`` — pointwise, ``demo_task_score(prompt, response)`` in [0, 1].
  ``FunctionJudge`` calls the pairwise callable for pairs and the same callable with two arguments
  for scores, so ``demo_task_judge`` answers both (its ``second`` argument is optional).

Score of a response (``score_response`` explains it in a ``DemoScore``), in [0, 1]:

- ``0.60`` if the answer is correct: the computed answer is in the response and no competing answer is
  (``"60"`` and nothing but the operands for arithmetic; ``"Paris"`` and no other capital city; ...);
- ``0.15`` if the response is on task (it gives a number for arithmetic and counting, mentions the word
  or a candidate answer for the others), so a wrong attempt beats a refusal such as "Whatever.";
- ``0.20`` x cleanliness, only when on task: 1 for at most ``CONCISE_WORDS`` words, ``CONCISE_WORDS /
  words`` beyond; halved per hedge ("I think", "not sure", "let me think" ...); scaled down when the
  response repeats itself (distinct words / words below one half);
- ``0.05 / (1 + chars / 80)``: a small brevity term, strictly decreasing in length, so two different
  off-task responses of different lengths are still ordered (the shorter wins) instead of tying.

So a correct, concise answer scores about 1.0, a correct answer that rambles about 0.8, a wrong but
clean attempt about 0.4, a wrong rambling one about 0.2 and a curt refusal under 0.05 (the order of
``data/demo/rankings.jsonl``). A prompt that is not a demo task scores a neutral ``0.5`` and its pairs
are ties (this rule does not pretend to judge what it cannot check).

The pairwise verdict is ``(prob_first, rationale)`` with ``prob_first = 0.5 + (score_first -
score_second) / 2``: exactly 0.5 (a tie) for equal scores, and symmetric in the order of the two
responses, so the order swap of ``Judge.judge_pairs`` never finds it inconsistent.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from data.demo_tasks import ANTONYMS, CAPITALS

CONCISE_WORDS = 12  # the demo's reference answers have 1-8 words
UNKNOWN_SCORE = 0.5
W_CORRECT, W_ON_TASK, W_CLEAN, W_BREVITY = 0.60, 0.15, 0.20, 0.05

HEDGES = ("i think", "not sure", "maybe", "i guess", "let me think", "check it yourself", "hard question",
          "people often disagree", "i am not certain", "probably", "perhaps")
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}

_OPPOSITE = {**{a: b for a, b in ANTONYMS}, **{b: a for a, b in ANTONYMS}}
_ANTONYM_WORDS = sorted({w for pair in ANTONYMS for w in pair})
_CAPITAL_OF = {country.lower(): city for country, city in CAPITALS}
_CITIES = sorted({city for _, city in CAPITALS})

# (kind, pattern); the task asked last in a (multi-turn) prompt wins
_TASKS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("arith", re.compile(r"(-?\d+)\s+(plus|minus|times)\s+(-?\d+)", re.I)),
    ("reverse", re.compile(r"reverse the word\s+'([^']+)'", re.I)),
    ("upper", re.compile(r"write\s+'([^']+)'\s+in capital letters", re.I)),
    ("count", re.compile(r"how many letters are in the word\s+'([^']+)'", re.I)),
    ("antonym", re.compile(r"opposite of\s+'([^']+)'", re.I)),
    ("capital", re.compile(r"capital of\s+([A-Za-z][A-Za-z .'-]*?)\s*\?", re.I)),
)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")  # quotes around a word are not part of it


@dataclass
class DemoTask:
    """A parsed demo task: its kind, the subject it is about and the right answer."""

    kind: str  # arith, reverse, upper, count, antonym, capital
    subject: str
    answer: str | float
    operands: tuple[float, ...] = ()


@dataclass
class DemoScore:
    """A response's score and why (see the module docstring for the weights)."""

    score: float
    task: DemoTask | None
    correct: bool = False
    on_task: bool = False
    words: int = 0
    hedges: int = 0
    notes: list[str] = field(default_factory=list)

    def explain(self) -> str:
        if self.task is None:
            return "not a demo task"
        verdict = "correct" if self.correct else "wrong" if self.on_task else "off task"
        return f"{verdict} ({', '.join(self.notes)}; {self.words} words, score {self.score:.3f})"


def parse_task(prompt: str) -> DemoTask | None:
    """The demo task a prompt asks (the last one asked, for a multi-turn transcript), or None."""
    best: tuple[int, str, re.Match[str]] | None = None
    for kind, pattern in _TASKS:
        for match in pattern.finditer(prompt or ""):
            if best is None or match.start() > best[0]:
                best = (match.start(), kind, match)
    if best is None:
        return None
    _, kind, m = best
    if kind == "arith":
        a, op, b = float(m.group(1)), m.group(2).lower(), float(m.group(3))
        value = a + b if op == "plus" else a - b if op == "minus" else a * b
        return DemoTask(kind, f"{m.group(1)} {op} {m.group(3)}", value, (a, b))
    word = m.group(1).strip()
    if kind == "reverse":
        return DemoTask(kind, word, word[::-1])
    if kind == "upper":
        return DemoTask(kind, word, word.upper())
    if kind == "count":
        return DemoTask(kind, word, float(len(word)))
    if kind == "antonym":
        opposite = _OPPOSITE.get(word.lower())
        return DemoTask(kind, word, opposite) if opposite else None
    city = _CAPITAL_OF.get(word.lower())
    return DemoTask(kind, word, city) if city else None


def _numbers(text: str) -> list[float]:
    values = [float(x) for x in _NUMBER.findall(text)]
    values += [float(NUMBER_WORDS[w.lower()]) for w in _WORD.findall(text) if w.lower() in NUMBER_WORDS]
    return values


def _has_phrase(text: str, phrase: str, case: bool = False) -> bool:
    flags = 0 if case else re.I
    return re.search(r"(?<![A-Za-z])" + re.escape(phrase) + r"(?![A-Za-z])", text, flags) is not None


def _check(task: DemoTask, response: str) -> tuple[bool, bool, list[str]]:
    """(correct, on_task, notes) of a response to a task."""
    notes: list[str] = []
    if task.kind in ("arith", "count"):
        numbers = _numbers(response)
        target = float(task.answer)
        allowed = {target, *task.operands}
        others = sorted({n for n in numbers if not any(math.isclose(n, x) for x in allowed)})
        has = any(math.isclose(n, target) for n in numbers)
        if has and not others:
            notes.append(f"says {target:g}")
        elif has:
            notes.append(f"says {target:g} but also {', '.join(f'{n:g}' for n in others)}")
        else:
            notes.append(f"expected {target:g}" + (f", got {', '.join(f'{n:g}' for n in others)}" if others else ""))
        return has and not others, bool(numbers), notes
    answer = str(task.answer)
    if task.kind == "upper":
        occurrences = re.findall(r"(?<![A-Za-z])" + re.escape(task.subject) + r"(?![A-Za-z])", response, re.I)
        correct = bool(occurrences) and all(o == answer for o in occurrences)
        notes.append(f"writes {answer}" if correct else f"expected {answer}")
        return correct, bool(occurrences), notes
    if task.kind == "reverse":
        correct = _has_phrase(response, answer)
        on_task = correct or any(len(w) == len(answer) and sorted(w.lower()) == sorted(answer.lower())
                                 for w in _WORD.findall(response))
        notes.append(f"writes '{answer}'" if correct else f"expected '{answer}'")
        return correct, on_task, notes
    candidates = _ANTONYM_WORDS if task.kind == "antonym" else _CITIES
    mentioned = [c for c in candidates if _has_phrase(response, c)]
    # "New Delhi" also mentions no other city; the subject word itself ("hot") is not a competing answer
    others = [c for c in mentioned if c.lower() not in (answer.lower(), task.subject.lower())]
    has = answer in mentioned or _has_phrase(response, answer)
    if has and not others:
        notes.append(f"says {answer}")
    elif has:
        notes.append(f"says {answer} but also {', '.join(others)}")
    else:
        notes.append(f"expected {answer}" + (f", got {', '.join(others)}" if others else ""))
    return has and not others, has or bool(others), notes


def score_response(prompt: str, response: str) -> DemoScore:
    """Score one response to a demo prompt, with the reasons (see the module docstring)."""
    task = parse_task(prompt)
    text = (response or "").strip()
    words = _WORD.findall(text) + _NUMBER.findall(text)
    n_words = len(words)
    if task is None:
        return DemoScore(UNKNOWN_SCORE, None, words=n_words)
    brevity = W_BREVITY / (1.0 + len(text) / 80.0)
    if not text:
        return DemoScore(0.0, task, notes=["empty"])
    correct, on_task, notes = _check(task, text)
    lowered = text.lower()
    hedges = sum(lowered.count(h) for h in HEDGES)
    clean = 0.0
    if on_task:
        clean = 1.0 if n_words <= CONCISE_WORDS else CONCISE_WORDS / n_words
        if n_words > CONCISE_WORDS:
            notes.append("rambles")
        clean *= 0.5 ** hedges
        if hedges:
            notes.append(f"{hedges} hedge{'s' if hedges > 1 else ''}")
        distinct = len({w.lower() for w in words}) / max(1, n_words)
        if n_words >= 6 and distinct < 0.5:
            clean *= distinct / 0.5
            notes.append("repeats itself")
    score = W_CORRECT * correct + W_ON_TASK * on_task + W_CLEAN * clean + brevity
    return DemoScore(round(score, 6), task, correct, on_task, n_words, hedges, notes)


def demo_task_score(prompt: str, response: str) -> float:
    """Pointwise score of ``response`` to a demo prompt, in [0, 1] (0.5 for a prompt that is no demo task)."""
    return score_response(prompt, response).score


def demo_task_judge(prompt: str, first: str, second: str | None = None) -> tuple[float, str] | float:
    """Pairwise: ``(probability that first is better, rationale)``; with one response, its score.

    ``prob_first = 0.5 + (score(first) - score(second)) / 2`` (0.5, a tie, when the scores are equal or
    the prompt is no demo task). The return value is what ``interpret_pair_value`` accepts.
    """
    if second is None:
        return demo_task_score(prompt, first)
    a, b = score_response(prompt, first), score_response(prompt, second)
    prob = min(1.0, max(0.0, 0.5 + (a.score - b.score) / 2))
    if a.task is None:
        return 0.5, "not a demo task: no verdict"
    return prob, f"first: {a.explain()}; second: {b.explain()}"


# ---------------------------------------------------------------------------- the house-format demo
# configs/demo.yaml's task (data/demo/house_format/, written by data/make_demo.py): the same questions,
# answered in the assistant's house format, one JSON object ``{"answer": <value>}``.
HOUSE_FORMAT_WEIGHT = 0.35  # the judge's share for the format; the rest is score_response on the answer
VERIFIER_CORRECT, VERIFIER_FORMAT = 2.0 / 3.0, 1.0 / 3.0


def house_format_value(response: str) -> tuple[bool, object]:
    """``(True, value)`` when the whole response is a JSON object whose only key is ``answer``, else
    ``(False, None)``. Whitespace around the object is allowed; anything else (prose, code fences, other
    keys, a list) is not the house format."""
    import json

    text = (response or "").strip()
    if not (text.startswith("{") and text.endswith("}")):
        return False, None
    try:
        obj = json.loads(text)
    except ValueError:
        return False, None
    if not isinstance(obj, dict) or set(obj) != {"answer"} or isinstance(obj["answer"], (dict, list)):
        return False, None
    return True, obj["answer"]


def matches_reference(response: str, reference: object) -> bool:
    """Whether a (plain-text) answer states the reference: a number's last number equals it; a word or
    phrase appears with word boundaries, case-sensitively when the reference is all capitals (the
    capital-letters task) and case-insensitively otherwise. No reference: False."""
    if reference is None or response is None:
        return False
    text = str(response)
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        numbers = _numbers(text)
        return bool(numbers) and math.isclose(numbers[-1], float(reference))
    ref = str(reference).strip()
    if not ref:
        return False
    case = ref.isupper()
    return _has_phrase(text, ref, case=case)


def house_format_check(response: str, reference: object) -> tuple[bool, bool]:
    """``(in_house_format, correct)`` of one response against the ground-truth ``reference``."""
    ok, value = house_format_value(response)
    answer = value if ok else response
    if ok and isinstance(reference, (int, float)) and isinstance(value, str):
        answer = value  # "12" for 12 is still the right number, just a string
    return ok, matches_reference("" if answer is None else str(answer), reference)


def house_format_verifier(prompts: list[str], responses: list[str], references: list[object]) -> dict:
    """The demo's rule verifier of the ground truth, in the reward-function signature (``ppo.rewards``
    ``kind: function`` and ``report.verifier`` both take it).

    Score per response in [0, 1]: ``2/3`` for the right answer (the data set's ``reference``), ``1/3`` for
    the house format. So: right in the house format 1, right in prose 2/3, wrong in the house format 1/3,
    wrong in prose 0 — correctness first, then the format. Returns ``{"scores": [...], "metrics":
    {"correct": [0/1 ...], "house_format": [0/1 ...]}}`` so a report (or a PPO log) shows both parts.
    """
    scores, correct_flags, format_flags = [], [], []
    for response, reference in zip(responses, references):
        in_format, correct = house_format_check(response, reference)
        scores.append(VERIFIER_CORRECT * correct + VERIFIER_FORMAT * in_format)
        correct_flags.append(float(correct))
        format_flags.append(float(in_format))
    return {"scores": scores, "metrics": {"correct": correct_flags, "house_format": format_flags}}


def demo_task_correct(prompts: list[str], responses: list[str], references: list[object]) -> dict:
    """A verifiable reward (RLVR) of the demo tasks, in the reward-function signature (``ppo.rewards``
    ``kind: function``): 1 for the right answer whatever its format, else 0; the format earns nothing.

    The answer is the house format's value when the response is in it, else the whole response. It is
    right when the rule check of the task the prompt asks (:func:`parse_task`, ``_check``) finds the right
    answer and no competing one, so listing candidates ("Paris or Berlin", "11 or 12") earns nothing, and,
    when the row has a ``reference``, :func:`matches_reference` agrees (the report's verifier's test). A
    prompt that is no demo task is judged by the reference alone; no task and no reference: 0. Returns
    ``{"scores": [...], "metrics": {"correct": [...], "house_format": [...]}}``, so a PPO log follows the
    format share that this reward does not push."""
    scores, format_flags = [], []
    for prompt, response, reference in zip(prompts, responses, references):
        in_format, value = house_format_value(response)
        answer = str(value) if in_format else (response or "")
        task = parse_task(prompt)
        correct = bool(answer.strip())
        if task is not None:
            correct = correct and _check(task, answer)[0]
        elif reference is None:
            correct = False
        if reference is not None:
            correct = correct and matches_reference(answer, reference)
        scores.append(float(correct))
        format_flags.append(float(in_format))
    return {"scores": scores, "metrics": {"correct": list(scores), "house_format": format_flags}}


def house_format_score(prompt: str, response: str) -> float:
    """Pointwise judge score in [0, 1]: ``HOUSE_FORMAT_WEIGHT`` for the house format plus the rest times
    :func:`score_response` of the answer (its value when in the house format, else the whole text), so
    the judge still weighs correctness, staying on task and conciseness, and knows no reference."""
    ok, value = house_format_value(response)
    inner = score_response(prompt, str(value) if ok else response)
    if inner.task is None:
        return UNKNOWN_SCORE
    return round(HOUSE_FORMAT_WEIGHT * ok + (1.0 - HOUSE_FORMAT_WEIGHT) * inner.score, 6)


def house_format_judge(prompt: str, first: str, second: str | None = None) -> tuple[float, str] | float:
    """Pairwise judge of the house-format demo, like :func:`demo_task_judge` (both orders agree by
    construction); with one response, its :func:`house_format_score`."""
    if second is None:
        return house_format_score(prompt, first)
    if parse_task(prompt) is None:
        return 0.5, "not a demo task: no verdict"
    a, b = house_format_score(prompt, first), house_format_score(prompt, second)
    prob = min(1.0, max(0.0, 0.5 + (a - b) / 2))
    fa, fb = house_format_value(first)[0], house_format_value(second)[0]
    return prob, (f"first: {'house format' if fa else 'prose'}, score {a:.3f}; "
                  f"second: {'house format' if fb else 'prose'}, score {b:.3f}")


# ---------------------------------------------------------------------- the house format, where it is asked
# configs/demo.yaml's task (data/demo/format_on_request/): the same questions; the house format is wanted only
# where the prompt asks for it (data.demo_tasks.FORMAT_REQUEST), a plain answer everywhere else.
def asks_house_format(prompt: str) -> bool:
    """Whether a prompt asks for the house format: it says "house format" (in any case), as
    ``data.demo_tasks.FORMAT_REQUEST`` does."""
    return "house format" in (prompt or "").lower()


def follows_format_request(prompt: str, response: str) -> bool:
    """A non-empty answer in the house format where the prompt asks for it, in anything but it where the
    prompt does not (an empty response or an empty ``{"answer": ""}`` shell follows nothing)."""
    ok, value = house_format_value(response)
    answer = str(value) if ok else (response or "")
    return bool(answer.strip()) and ok == asks_house_format(prompt)


def format_request_followed(prompts: list[str], responses: list[str], references: list[object]) -> dict:
    """A verifiable reward of the instruction "Answer in the house format." (an IFEval-style checkable
    instruction), in the reward-function signature: 1 where the response follows the prompt's format request
    (:func:`follows_format_request`: a non-empty answer in the house format where the prompt asks for it, a
    plain one where it does not), else 0. The answer's correctness earns nothing (:func:`demo_task_correct`
    scores that). Returns ``{"scores": [...], "metrics": {"follows_request": [...]}}``."""
    scores = [float(follows_format_request(p, r)) for p, r in zip(prompts, responses)]
    return {"scores": scores, "metrics": {"follows_request": list(scores)}}


def format_on_request_verifier(prompts: list[str], responses: list[str], references: list[object]) -> dict:
    """The format-on-request demo's rule verifier of the ground truth, in the reward-function signature (as
    :func:`house_format_verifier`, which it follows except for the format part).

    Score per response in [0, 1]: ``2/3`` for the right answer (the data set's ``reference``; the house
    format's value or the whole text), ``1/3`` for following the request (:func:`follows_format_request`:
    a non-empty answer in the house format where the prompt asks for it, a plain one where it does not).
    Returns ``{"scores":
    [...], "metrics": {"correct", "house_format", "follows_request": [0/1 ...]}}``."""
    scores, correct_flags, format_flags, follows = [], [], [], []
    for prompt, response, reference in zip(prompts, responses, references):
        in_format, correct = house_format_check(response, reference)
        followed = follows_format_request(prompt, response)
        scores.append(VERIFIER_CORRECT * correct + VERIFIER_FORMAT * followed)
        correct_flags.append(float(correct))
        format_flags.append(float(in_format))
        follows.append(float(followed))
    return {"scores": scores,
            "metrics": {"correct": correct_flags, "house_format": format_flags, "follows_request": follows}}


def format_on_request_score(prompt: str, response: str) -> float:
    """Pointwise judge score in [0, 1], as :func:`house_format_score` with following the request
    (:func:`follows_format_request`) in place of the house format: ``HOUSE_FORMAT_WEIGHT`` for it plus the
    rest times :func:`score_response` of the answer (the house format's value, else the whole text). Only an
    answer on task earns the format part, so a plain refusal of an unasked question earns nothing for it."""
    ok, value = house_format_value(response)
    inner = score_response(prompt, str(value) if ok else response)
    if inner.task is None:
        return UNKNOWN_SCORE
    followed = inner.on_task and follows_format_request(prompt, response)
    return round(HOUSE_FORMAT_WEIGHT * followed + (1.0 - HOUSE_FORMAT_WEIGHT) * inner.score, 6)


def format_on_request_judge(prompt: str, first: str, second: str | None = None) -> tuple[float, str] | float:
    """Pairwise judge of the format-on-request demo, like :func:`house_format_judge` (both orders agree by
    construction); with one response, its :func:`format_on_request_score`."""
    if second is None:
        return format_on_request_score(prompt, first)
    if parse_task(prompt) is None:
        return 0.5, "not a demo task: no verdict"
    a, b = format_on_request_score(prompt, first), format_on_request_score(prompt, second)
    prob = min(1.0, max(0.0, 0.5 + (a - b) / 2))
    wanted = "house format asked" if asks_house_format(prompt) else "no format asked"
    return prob, (f"{wanted}; first: {'house format' if house_format_value(first)[0] else 'prose'}, score {a:.3f}; "
                  f"second: {'house format' if house_format_value(second)[0] else 'prose'}, score {b:.3f}")
