"""The rule-based demo-task judge (stages/rlaif/rules.py) on hand-made cases, and as a FunctionJudge."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from data.demo_tasks import ANTONYMS
from stages.rlaif.judges import FunctionJudge, interpret_pair_value
from stages.rlaif.rules import (
    UNKNOWN_SCORE,
    demo_task_judge,
    demo_task_score,
    parse_task,
    score_response,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("prompt, kind, answer", [
    ("What is 5 plus 12?", "arith", 17.0),
    ("What is 46 minus 14?", "arith", 32.0),
    ("What is 7 times 8?", "arith", 56.0),
    ("Reverse the word 'apple'.", "reverse", "elppa"),
    ("Write 'candle' in capital letters.", "upper", "CANDLE"),
    ("How many letters are in the word 'thunder'?", "count", 7.0),
    ("What is the opposite of 'hot'?", "antonym", "cold"),
    ("What is the opposite of 'cold'?", "antonym", "hot"),
    ("What is the capital of India?", "capital", "New Delhi"),
])
def test_parse_task(prompt: str, kind: str, answer: object) -> None:
    task = parse_task(prompt)
    assert task is not None and task.kind == kind and task.answer == answer


def test_parse_task_takes_the_last_question_and_knows_unknown_prompts() -> None:
    transcript = "User: What is 2 plus 3?\n\nAssistant: 2 plus 3 is 5.\n\nUser: What is the capital of Peru?"
    assert parse_task(transcript).answer == "Lima"
    assert parse_task("Tell me a joke.") is None
    assert parse_task("What is the capital of Atlantis?") is None  # not in the demo's table


@pytest.mark.parametrize("prompt, right, wrong", [
    ("What is 5 times 12?", "5 times 12 is 60.", "5 times 12 is 62."),
    ("What is 30 minus 4?", "30 minus 4 is 26.", "30 minus 4 is 27."),
    ("What is 9 plus 9?", "18", "9 plus 9 is 18 or maybe 19."),  # a hedged second answer is not correct
    ("Reverse the word 'river'.", "The reversed word is 'revir'.", "The reversed word is 'iverr'."),
    ("Write 'garden' in capital letters.", "GARDEN", "Garden"),
    ("How many letters are in the word 'apple'?", "'apple' has 5 letters.", "'apple' has 6 letters."),
    ("How many letters are in the word 'apple'?", "It has five letters.", "It has six letters."),
    ("What is the opposite of 'fast'?", "The opposite of 'fast' is 'slow'.", "The opposite of 'fast' is 'big'."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "The capital of Japan is Paris."),
    ("What is the capital of India?", "New Delhi.", "Delhi or Mumbai, or Beijing."),
])
def test_correct_beats_wrong(prompt: str, right: str, wrong: str) -> None:
    good, bad = score_response(prompt, right), score_response(prompt, wrong)
    assert good.correct and not bad.correct, (good, bad)
    assert good.score > bad.score
    prob, rationale = demo_task_judge(prompt, right, wrong)
    assert prob > 0.5 and rationale.startswith("first: correct")
    prob_swapped, _ = demo_task_judge(prompt, wrong, right)
    assert prob_swapped == pytest.approx(1.0 - prob)  # symmetric: the order swap never disagrees


def test_the_demo_quality_order() -> None:
    """correct & concise > correct & rambling > wrong & clean > wrong & rambling > curt refusal > empty."""
    prompt = "What is 6 times 7?"
    ramble = " Let me think about this for a while, there are many things to consider and I am not sure."
    responses = ["6 times 7 is 42.", "6 times 7 is 42." + ramble, "6 times 7 is 44.", "6 times 7 is 44." + ramble,
                 "Whatever.", ""]
    scores = [demo_task_score(prompt, r) for r in responses]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores), scores
    assert scores[0] > 0.95 and scores[-1] == 0.0
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_repetition_and_length_are_penalised() -> None:
    prompt = "What is 2 plus 2?"
    assert demo_task_score(prompt, "4") > demo_task_score(prompt, "4 4 4 4 4 4 4 4 4 4 4 4 4 4")
    # off-task answers of different lengths are still ordered (shorter wins), so they do not tie
    assert demo_task_score(prompt, "hello") > demo_task_score(prompt, "hello there my friend")


def test_unknown_prompts_are_neutral_ties() -> None:
    assert demo_task_score("Write a poem.", "Roses are red.") == UNKNOWN_SCORE
    assert demo_task_judge("Write a poem.", "Roses are red.", "x")[0] == 0.5


def test_values_are_what_the_function_judge_reads() -> None:
    raw = interpret_pair_value(demo_task_judge("What is 1 plus 1?", "2", "3"))
    assert raw.error is None and raw.prob_first > 0.5 and raw.rationale
    judge = FunctionJudge("stages.rlaif.rules:demo_task_judge")
    verdict = judge.judge_pair("What is 1 plus 1?", "1 plus 1 is 3.", "1 plus 1 is 2.")
    assert verdict.choice == "B" and verdict.consistent and judge.stats.inconsistent == 0
    point = judge.score("What is 1 plus 1?", "1 plus 1 is 2.")
    assert point.score == pytest.approx(demo_task_score("What is 1 plus 1?", "1 plus 1 is 2.")) and not point.malformed
    # a message-list prompt (as PPO passes it): the user's turn is what the rule reads
    messages = [{"role": "system", "content": "Be concise."}, {"role": "user", "content": "What is 1 plus 1?"}]
    assert judge.score(messages, "2").score == pytest.approx(demo_task_score("What is 1 plus 1?", "2"))


def test_agrees_with_the_demo_preferences_and_rankings() -> None:
    prefs = [json.loads(line) for line in (REPO / "data/demo/preferences.jsonl").read_text().splitlines()]
    assert all(demo_task_judge(r["prompt"], r["chosen"], r["rejected"])[0] > 0.5 for r in prefs)
    for line in (REPO / "data/demo/rankings.jsonl").read_text().splitlines():
        r = json.loads(line)
        scores = [demo_task_score(r["prompt"], x) for x in r["responses"]]
        assert sorted(range(len(scores)), key=lambda k: -scores[k]) == r["ranking"]
    for line in (REPO / "data/demo/prompts.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert score_response(r["prompt"], r["reference"]).correct, r


# ------------------------------------------------------------------------------- house-format demo
from stages.rlaif.rules import (  # noqa: E402
    house_format_judge,
    house_format_score,
    house_format_value,
    house_format_verifier,
)

HOUSE = REPO / "data/demo/house_format"


@pytest.mark.parametrize("response, ok, value", [
    ('{"answer": "3 times 4 is 12."}', True, "3 times 4 is 12."),
    ('  {"answer": 12}\n', True, 12),
    ('{"answer": "x", "note": "y"}', False, None),   # another key
    ('```json\n{"answer": "x"}\n```', False, None),  # fenced
    ('{"answer": "x"', False, None),                 # cut off
    ('{"answer": ["x"]}', False, None),
    ("The answer is 12.", False, None),
])
def test_house_format_value(response: str, ok: bool, value: object) -> None:
    assert house_format_value(response) == (ok, value)


def test_house_format_verifier_scores_correctness_then_format() -> None:
    responses = ['{"answer": "3 times 4 is 12."}', "3 times 4 is 12.", '{"answer": "3 times 4 is 13."}',
                 "3 times 4 is 13.", '{"answer": "12"}', "", '{"answer": "3 times 4 is 12']
    result = house_format_verifier(["What is 3 times 4?"] * len(responses), responses, [12] * len(responses))
    assert result["scores"] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0, 1.0, 0.0, 2 / 3])
    assert result["metrics"] == {"correct": [1, 1, 0, 0, 1, 0, 1], "house_format": [1, 0, 1, 0, 1, 0, 0]}
    # words: case-insensitive, except an all-capitals reference (the capital-letters task)
    assert house_format_verifier(["q"] * 4, ['{"answer": "The capital of Peru is lima."}', "CANDLE", "Candle",
                                             '{"answer": "Lisbon"}'], ["Lima", "CANDLE", "CANDLE", "Lima"])["scores"] \
        == pytest.approx([1.0, 2 / 3, 0.0, 1 / 3])
    assert house_format_verifier(["q"], ["anything"], [None])["scores"] == [0.0]  # no ground truth, no credit


def test_house_format_judge_orders_format_and_correctness() -> None:
    prompt = "What is the capital of France?"
    ranked = ['{"answer": "The capital of France is Paris."}', "The capital of France is Paris.",
              '{"answer": "The capital of France is Rome."}', "The capital of France is Rome.", "Whatever."]
    scores = [house_format_score(prompt, r) for r in ranked]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    prob, why = house_format_judge(prompt, ranked[1], ranked[0])
    assert prob < 0.5 and "prose" in why and "house format" in why
    assert house_format_judge("Tell me a joke.", "a", "b")[0] == 0.5


def test_house_format_data_agrees_with_its_verifier_and_judge() -> None:
    """data/demo/house_format (data/make_demo.py): the labels are the judge's order; eval prompts are held out."""
    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (HOUSE / f"{name}.jsonl").read_text().splitlines()]

    assert all(house_format_judge(r["prompt"], r["chosen"], r["rejected"])[0] > 0.5 for r in rows("preferences"))
    for r in rows("rankings"):
        scores = [house_format_score(r["prompt"], x) for x in r["responses"]]
        assert sorted(range(len(scores)), key=lambda k: -scores[k]) == r["ranking"]
    train, held_out = rows("prompts"), rows("eval_prompts")
    assert len(held_out) >= 64 and not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    for r in train + held_out:  # the reference is the ground truth the verifier checks
        task = parse_task(r["prompt"])
        assert task is not None and house_format_verifier([r["prompt"]], [str(r["reference"])], [r["reference"]])[
            "scores"] == pytest.approx([2 / 3]), r
    shares = [m["content"].startswith("{") for r in rows("sft") for m in r["messages"] if m["role"] == "assistant"]
    assert 0.2 < sum(shares) / len(shares) < 0.4  # the SFT demonstrations mostly answer in prose


# ---------------------------------------------------------------------- format-on-request demo, RLVR reward
from stages.rlaif.rules import (  # noqa: E402
    asks_house_format,
    demo_task_correct,
    format_on_request_judge,
    format_on_request_score,
    format_on_request_verifier,
    format_request_followed,
)

ON_REQUEST = REPO / "data/demo/format_on_request"


def test_format_request_followed_rewards_the_format_asked_for_only() -> None:
    asked, unasked = "What is 2 plus 3? Answer in the house format.", "What is 2 plus 3?"
    house, plain, shell = '{"answer": "2 plus 3 is 5."}', "2 plus 3 is 5.", '{"answer": ""}'
    out = format_request_followed([asked, asked, asked, unasked, unasked, unasked],
                                  [house, plain, shell, plain, house, ""], [5] * 6)
    assert out["scores"] == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # an empty shell or answer follows nothing
    assert out["metrics"] == {"follows_request": out["scores"]}
    # a wrong answer in the asked format still follows the request: correctness is another reward's
    assert format_request_followed([asked], ['{"answer": "2 plus 3 is 6."}'], [5])["scores"] == [1.0]


def test_demo_task_correct_scores_the_answer_in_any_format() -> None:
    prompts = (["What is 3 times 4?"] * 6 + ["What is the capital of France?"] * 3
               + ["Write 'apple' in capital letters."])
    responses = ["3 times 4 is 12.", '{"answer": "3 times 4 is 12."}', "3 times 4 is 11 or 12", '{"answer": ""}', "",
                 "12", "The capital of France is Paris.", "Paris or Berlin", '{"answer": "Paris"}', "Apple or APPLE"]
    references = [12] * 6 + ["Paris"] * 3 + ["APPLE"]
    result = demo_task_correct(prompts, responses, references)
    # a competing answer ("11 or 12", "Paris or Berlin", "Apple" beside "APPLE") earns nothing; the format neither
    assert result["scores"] == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert result["metrics"]["correct"] == result["scores"]
    assert result["metrics"]["house_format"] == [0, 1, 0, 1, 0, 0, 0, 0, 1, 0]
    # the reference decides too: a rule-right answer that the row's reference contradicts earns nothing
    assert demo_task_correct(["What is 3 times 4?"], ["12"], [13])["scores"] == [0.0]
    # no demo task: the reference alone; neither: nothing
    assert demo_task_correct(["Name a colour."] * 2, ["Blue.", "Blue."], ["blue", None])["scores"] == [1.0, 0.0]


def test_format_on_request_verifier_scores_correctness_then_following_the_request() -> None:
    asked, plain = "What is 3 times 4? Answer in the house format.", "What is 3 times 4?"
    assert asks_house_format(asked) and not asks_house_format(plain)
    right_house, right_plain = '{"answer": "3 times 4 is 12."}', "3 times 4 is 12."
    wrong_house, wrong_plain = '{"answer": "3 times 4 is 13."}', "3 times 4 is 13."
    prompts = [asked] * 5 + [plain] * 5
    responses = [right_house, right_plain, wrong_house, wrong_plain, '{"answer": ""}'] * 2
    result = format_on_request_verifier(prompts, responses, [12] * 10)
    assert result["scores"] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0, 0.0, 2 / 3, 1.0, 0.0, 1 / 3, 0.0])
    assert result["metrics"]["correct"] == [1, 1, 0, 0, 0, 1, 1, 0, 0, 0]
    assert result["metrics"]["house_format"] == [1, 0, 1, 0, 1, 1, 0, 1, 0, 1]
    # an empty shell follows no request; nor does an empty answer
    assert result["metrics"]["follows_request"] == [1, 0, 1, 0, 0, 0, 1, 0, 1, 0]
    assert format_on_request_verifier([plain], [""], [12])["scores"] == [0.0]


def test_format_on_request_judge_orders_by_the_request() -> None:
    asked, plain = "What is the capital of France? Answer in the house format.", "What is the capital of France?"
    house, prose = '{"answer": "The capital of France is Paris."}', "The capital of France is Paris."
    wrong_house, wrong_prose = '{"answer": "The capital of France is Rome."}', "The capital of France is Rome."
    for prompt, ranked in ((asked, [house, prose, wrong_house, wrong_prose, "Whatever."]),
                           (plain, [prose, house, wrong_prose, wrong_house, "Whatever."])):
        scores = [format_on_request_score(prompt, r) for r in ranked]
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores), prompt
    assert format_on_request_judge(asked, prose, house)[0] < 0.5 < format_on_request_judge(plain, prose, house)[0]
    assert format_on_request_judge("Tell me a joke.", "a", "b")[0] == 0.5


def test_format_on_request_data_agrees_with_its_verifier_and_judge() -> None:
    """data/demo/format_on_request (data/make_demo.py): labels in the judge's order, kinds as labelled, half the
    held-out prompts of each task kind ask for the house format, none of them among PPO's prompts."""
    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (ON_REQUEST / f"{name}.jsonl").read_text().splitlines()]

    prefs = rows("preferences")
    assert all(format_on_request_judge(r["prompt"], r["chosen"], r["rejected"])[0] > 0.5 for r in prefs)
    for r in prefs:
        house = [house_format_value(r[side])[0] for side in ("chosen", "rejected")]
        if r["kind"].startswith("correctness_"):  # same format, or the right answer in the unwanted one
            assert house[0] == house[1] or r["kind"] == "correctness_over_format", r
        if r["kind"].startswith("format_"):  # the same answer in both formats
            assert house[0] != house[1] and (r["chosen"] in r["rejected"] or r["rejected"] in r["chosen"]), r
    assert {r["kind"] for r in prefs} == {"correctness_house", "correctness_plain", "correctness_over_format",
                                          "format_asked", "format_unasked", "refusal"}
    train, val, held_out = rows("prompts"), rows("val_prompts"), rows("eval_prompts")
    assert len(held_out) == 96 and sum(asks_house_format(r["prompt"]) for r in held_out) == 48
    # the kinds within the model's reach, 16 held-out prompts each (the three arithmetic kinds parse as "arith");
    # antonyms are asked both ways
    kinds = collections.Counter(parse_task(r["prompt"]).kind for r in held_out)
    assert kinds == {"arith": 48, "upper": 16, "antonym": 16, "capital": 16}, kinds
    antonym_subjects = {parse_task(r["prompt"]).subject for r in held_out + train if "opposite" in r["prompt"]}
    assert antonym_subjects & {a for a, _ in ANTONYMS} and antonym_subjects & {b for _, b in ANTONYMS}

    def questions(records: list[dict]) -> set[str]:
        return {r["prompt"].replace(" Answer in the house format.", "") for r in records}

    # three disjoint sets: PPO's prompts, PPO's own held-out check (ppo.eval_data), the report's
    assert not questions(train) & questions(held_out) and not questions(val) & (questions(train) | questions(held_out))
    # the SFT demonstrations make the task's typical mistake in about DEMO_ERRORS (0.3) of their answers
    answers = [(user["content"], reply["content"]) for r in rows("sft") for user, reply in
               zip(r["messages"][-2::-2], r["messages"][::-2]) if user["role"] == "user"]
    wrong = [1.0 - demo_task_correct([p], [a], [None])["scores"][0] for p, a in answers]
    assert 0.22 < sum(wrong) / len(wrong) < 0.38, sum(wrong) / len(wrong)
    for r in train + val + held_out:
        assert parse_task(r["prompt"]) is not None
        assert format_on_request_verifier([r["prompt"]], [str(r["reference"])], [r["reference"]])["metrics"][
            "correct"] == [1.0], r
