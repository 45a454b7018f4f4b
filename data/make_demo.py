"""Write the project's own small demo data set (deterministic): ``python -m data.make_demo``.

Tasks are simple and checkable so that every stage has a real signal on a small model:
arithmetic, word reversal, upper-casing, counting letters, antonyms and capital cities.

Files (all JSONL, under data/demo/):
- ``sft.jsonl``          ``messages`` conversations (some with a system turn, some multi-turn).
- ``preferences.jsonl``  ``prompt`` + ``chosen`` + ``rejected``: chosen is correct, short and ends
                         cleanly; rejected is wrong, rambling or curt (a learnable preference).
- ``rankings.jsonl``     K-wise ``prompt`` + ``responses`` + ``ranking`` (best first).
- ``prompts.jsonl``      ``prompt`` (+ ``reference`` answer) for PPO and evaluation.

Two more demo tasks on the same questions, each in its own folder (see the sections below):
``house_format/`` (the house answer format always preferred: configs/examples/demo-reward-hacking.yaml) and
``format_on_request/`` (the house format wanted only where the prompt asks for it: configs/demo.yaml). Their
preference rows carry a ``kind`` column naming what each pair contrasts (the rm stage reports its held-out
accuracy per kind).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from data.demo_tasks import ANTONYMS, CAPITALS, FORMAT_REQUEST, VARIED_WORDS, WORDS

OUT = Path(__file__).resolve().parent / "demo"


def make_task(rng: random.Random) -> tuple[str, str, str]:
    """Return (prompt, correct short answer, a plausible wrong answer)."""
    kind = rng.choice(["add", "sub", "mul", "reverse", "upper", "count", "antonym", "capital"])
    if kind == "add":
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        return (f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.",
                f"{a} plus {b} is {a + b + rng.choice([-3, -1, 1, 2, 10])}.")
    if kind == "sub":
        a, b = rng.randint(20, 90), rng.randint(1, 19)
        return (f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.",
                f"{a} minus {b} is {a - b + rng.choice([-2, 1, 3])}.")
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return (f"What is {a} times {b}?", f"{a} times {b} is {a * b}.",
                f"{a} times {b} is {a * b + rng.choice([-1, 2, a])}.")
    if kind == "reverse":
        w = rng.choice(WORDS)
        wrong = w[1:] + w[0]
        return f"Reverse the word '{w}'.", f"The reversed word is '{w[::-1]}'.", f"The reversed word is '{wrong}'."
    if kind == "upper":
        w = rng.choice(WORDS)
        return f"Write '{w}' in capital letters.", f"{w.upper()}", f"{w.capitalize()}"
    if kind == "count":
        w = rng.choice(WORDS)
        return (f"How many letters are in the word '{w}'?", f"'{w}' has {len(w)} letters.",
                f"'{w}' has {len(w) + rng.choice([-1, 1, 2])} letters.")
    if kind == "antonym":
        a, b = rng.choice(ANTONYMS)
        wrong = rng.choice([x for x, _ in ANTONYMS if x != a])
        return (f"What is the opposite of '{a}'?", f"The opposite of '{a}' is '{b}'.",
                f"The opposite of '{a}' is '{wrong}'.")
    country, city = rng.choice(CAPITALS)
    wrong = rng.choice([c for _, c in CAPITALS if c != city])
    return (f"What is the capital of {country}?", f"The capital of {country} is {city}.",
            f"The capital of {country} is {wrong}.")


RAMBLE = [
    " Let me think about this for a while, there are many things to consider and I am not sure.",
    " Well, this is a hard question and people often disagree about it, so maybe.",
    " I guess so, but you should check it yourself somewhere else later on.",
]
CURT = ["No.", "Figure it out yourself.", "I do not want to answer that.", "Whatever."]


# ------------------------------------------------------------------------------ the house-format demo
# The embedded demo's task (configs/demo.yaml): the same checkable questions, but the assistant's house
# style is a one-line JSON object {"answer": "<the answer sentence>"}. The SFT demonstrations mix that
# house format with the plain sentences of an older data set (HOUSE_SHARE of them use it), so the SFT
# policy answers mostly in plain sentences; the preference labels prefer a correct answer in the house format,
# then a correct plain answer, then a wrong one. An RM can learn that, PPO can move the policy towards it, and a rule
# verifier of the ground truth (stages.rlaif.rules:house_format_verifier) measures the effect
# independently of the RM.
HOUSE = OUT / "house_format"
HOUSE_SHARE = 0.3


def house_answer(sentence: str) -> str:
    """The house format: one JSON object whose single key "answer" holds the answer sentence. (The
    sentence, not a bare value: a 135M model that restates "3 times 4 is" before the number answers
    more often correctly than one that must emit the number at once, so the format costs no accuracy.)"""
    return json.dumps({"answer": sentence})


HOUSE_KINDS = ("add", "sub", "mul", "reverse", "upper", "count", "antonym", "capital")
HOUSE_EVAL_PER_KIND = 12  # held-out prompts per task kind: 96 in all, every kind equally represented


def make_house_task(rng: random.Random, kind: str | None = None, words: list[str] = WORDS, echo: bool = False,
                    antonyms: list[tuple[str, str]] = ANTONYMS) -> tuple[str, str | int, str | int, str, str]:
    """(prompt, right answer value, a plausible wrong value, right plain sentence, wrong plain sentence); the
    word tasks draw from ``words``, the antonym task from the (word, opposite) pairs ``antonyms``. The wrong
    value is the task's typical slip (an arithmetic slip, a rotated word for a reversal, a capitalised word for
    upper-casing, a miscount, another antonym or capital), or with ``echo`` the question's own term parroted back
    (the first number, the word unchanged, the word itself, the country; counting keeps its miscount). Both draw
    the same random numbers, so ``echo`` changes nothing else."""
    kind = kind or rng.choice(HOUSE_KINDS)
    if kind in ("add", "sub", "mul"):
        if kind == "add":
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            op, value = "plus", a + b
        elif kind == "sub":
            a, b = rng.randint(20, 90), rng.randint(1, 19)
            op, value = "minus", a - b
        else:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            op, value = "times", a * b
        wrong = value + rng.choice([-3, -2, -1, 1, 2, 10])
        wrong = a if echo else wrong
        return (f"What is {a} {op} {b}?", value, wrong, f"{a} {op} {b} is {value}.", f"{a} {op} {b} is {wrong}.")
    if kind == "reverse":
        w = rng.choice(words)
        wrong = w if echo else w[1:] + w[0]
        return (f"Reverse the word '{w}'.", w[::-1], wrong, f"The reversed word is '{w[::-1]}'.",
                f"The reversed word is '{wrong}'.")
    if kind == "upper":
        w = rng.choice(words)
        wrong = w if echo else w.capitalize()
        return f"Write '{w}' in capital letters.", w.upper(), wrong, w.upper(), wrong
    if kind == "count":
        w = rng.choice(words)
        wrong = len(w) + rng.choice([-1, 1, 2])
        return (f"How many letters are in the word '{w}'?", len(w), wrong, f"'{w}' has {len(w)} letters.",
                f"'{w}' has {wrong} letters.")
    if kind == "antonym":
        a, b = rng.choice(antonyms)
        wrong = rng.choice([x for x, _ in antonyms if x not in (a, b)])
        wrong = a if echo else wrong
        return (f"What is the opposite of '{a}'?", b, wrong, f"The opposite of '{a}' is '{b}'.",
                f"The opposite of '{a}' is '{wrong}'.")
    country, city = rng.choice(CAPITALS)
    wrong = rng.choice([c for _, c in CAPITALS if c != city])
    wrong = country if echo else wrong
    return (f"What is the capital of {country}?", city, wrong, f"The capital of {country} is {city}.",
            f"The capital of {country} is {wrong}.")


def make_house(seed: int = 4321) -> dict[str, list[dict]]:
    """The house-format demo's files: sft, preferences, rankings, prompts (train) and eval_prompts."""
    rng = random.Random(seed)
    sft, prefs, ranks, prompts, eval_prompts = [], [], [], [], []
    systems = [None, None, None, "You are a concise and helpful assistant."]

    def reply(right_plain: str) -> str:
        return house_answer(right_plain) if rng.random() < HOUSE_SHARE else right_plain

    for i in range(400):
        prompt, value, _, plain, _ = make_house_task(rng)
        system = rng.choice(systems)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": reply(plain)}]
        if i % 10 == 0:  # a few two-turn conversations
            p2, _, _, plain2, _ = make_house_task(rng)
            messages += [{"role": "user", "content": p2}, {"role": "assistant", "content": reply(plain2)}]
        sft.append({"messages": messages})
    for _ in range(400):
        prompt, value, wrong, plain, wrong_plain = make_house_task(rng)
        style = rng.random()
        chosen = house_answer(plain)
        if style < 0.40:    # same answer, house format preferred
            rejected, kind = plain, "format"
        elif style < 0.70:  # same format, the correct answer preferred
            rejected, kind = house_answer(wrong_plain), "correctness_house"
        elif style < 0.85:  # plain and wrong
            rejected, kind = wrong_plain, "format_and_correctness"
        elif style < 0.95:  # correctness within the plain format
            chosen, rejected, kind = plain, wrong_plain, "correctness_plain"
        else:
            rejected, kind = rng.choice(CURT), "refusal"
        prefs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind})
    for _ in range(60):
        prompt, value, wrong, plain, wrong_plain = make_house_task(rng)
        responses = [house_answer(plain), plain, house_answer(wrong_plain), wrong_plain]  # best first
        order = list(range(4))
        rng.shuffle(order)
        ranks.append({"prompt": prompt, "responses": [responses[j] for j in order],
                      "ranking": sorted(range(4), key=lambda k: order[k])})
    # held-out prompts first, the same number of each kind (the word tasks have few distinct prompts, so
    # drawing them last would leave mostly arithmetic); PPO's training prompts never repeat one of them
    seen: set[str] = set()
    for kind in HOUSE_KINDS:
        drawn = 0
        while drawn < HOUSE_EVAL_PER_KIND:
            prompt, value, _, _, _ = make_house_task(rng, kind)
            if prompt not in seen:
                seen.add(prompt)
                eval_prompts.append({"prompt": prompt, "reference": value})
                drawn += 1
    while len(prompts) < 200:
        prompt, value, _, _, _ = make_house_task(rng)
        if prompt not in seen:
            seen.add(prompt)
            prompts.append({"prompt": prompt, "reference": value})
    return {"sft": sft, "preferences": prefs, "rankings": ranks, "prompts": prompts, "eval_prompts": eval_prompts}


# ----------------------------------------------------------------- the house format, where it is asked for
# configs/demo.yaml's task (data/demo/format_on_request/): the same questions, and the house format is wanted
# only where the user asks for it (FORMAT_REQUEST after the question); elsewhere a plain sentence is. The SFT
# demonstrations come from an older data set that often ignored the request (ASKED_COMPLIANCE of the asked
# answers use the house format), sometimes used it unasked (UNASKED_HOUSE), and in DEMO_ERRORS of its answers
# parroted the question's term instead of answering ("The capital of Chile is Chile.", "12 plus 7 is 12.", the
# word unchanged): the SFT policy imitates that habit, and a reward that checks the answer can undo it. The
# task kinds are ON_REQUEST_KINDS: reversing a word and counting its letters are left out because they are
# beyond the embedded 135M model (it sees tokens, not letters: 0 to 1 of 12 held-out prompts of each right,
# before PPO and after, in every seed measured), so those prompts could teach PPO only the format and would
# only dilute the measure of correctness. Upper-casing draws from VARIED_WORDS (3 to 11 letters); antonyms are
# asked both ways ("hot" -> "cold", "cold" -> "hot"), so that 16 held-out questions leave some for PPO. The
# preference pairs contrast correct and wrong answers in the same format, in both formats (most pairs), the
# format against the request (asked: house over plain; unasked: plain over house), and a correct plain answer
# over a wrong house one (correctness before format); each row says which in its ``kind`` column. The rule verifier
# (stages.rlaif.rules:format_on_request_verifier) scores the right answer and following the request.
ON_REQUEST = OUT / "format_on_request"
ASK_SHARE = 0.5          # prompts that ask for the house format (SFT, preferences, PPO and held-out prompts)
ASKED_COMPLIANCE = 0.25  # SFT answers to an asking prompt that use the house format
UNASKED_HOUSE = 0.15     # SFT answers to a prompt that does not ask that use it anyway
DEMO_ERRORS = 0.3        # SFT answers that parrot the question's term instead of answering (make_house_task's echo)
ON_REQUEST_KINDS = ("add", "sub", "mul", "upper", "antonym", "capital")
ON_REQUEST_EVAL_PER_KIND = 16  # held-out prompts per task kind: 96 in all, half of each kind asking for the format
BOTH_WAYS_ANTONYMS = ANTONYMS + [(b, a) for a, b in ANTONYMS]
ON_REQUEST_PAIRS = (     # (kind, share of the preference pairs)
    ("correctness_house", 0.25), ("correctness_plain", 0.25), ("correctness_over_format", 0.15),
    ("format_asked", 0.15), ("format_unasked", 0.15), ("refusal", 0.05))


def ask_house_format(question: str) -> str:
    """The question with the request for the house format after it."""
    return f"{question} {FORMAT_REQUEST}"


def on_request_task(rng: random.Random, kind: str | None = None, echo: bool = False
                    ) -> tuple[str, str | int, str | int, str, str]:
    """make_house_task for the format-on-request demo: its kinds, words and antonyms."""
    return make_house_task(rng, kind or rng.choice(ON_REQUEST_KINDS), VARIED_WORDS, echo, BOTH_WAYS_ANTONYMS)


def on_request_pair(rng: random.Random) -> dict:
    """One preference row of the format-on-request demo: its ``kind`` drawn by ON_REQUEST_PAIRS' shares."""
    kinds, shares = zip(*ON_REQUEST_PAIRS)
    question, _, _, plain, wrong_plain = on_request_task(rng)
    kind = rng.choices(kinds, shares)[0]
    asked = {"correctness_house": True, "correctness_plain": False, "format_asked": True,
             "format_unasked": False}.get(kind, rng.random() < ASK_SHARE)
    if kind == "correctness_house":
        chosen, rejected = house_answer(plain), house_answer(wrong_plain)
    elif kind == "correctness_plain":
        chosen, rejected = plain, wrong_plain
    elif kind == "correctness_over_format":  # the format a prompt asks for does not excuse a wrong answer
        chosen, rejected = (plain, house_answer(wrong_plain)) if asked else (house_answer(plain), wrong_plain)
    elif kind == "format_asked":
        chosen, rejected = house_answer(plain), plain
    elif kind == "format_unasked":
        chosen, rejected = plain, house_answer(plain)
    else:
        chosen, rejected = (house_answer(plain) if asked else plain), rng.choice(CURT)
    return {"prompt": ask_house_format(question) if asked else question, "chosen": chosen, "rejected": rejected,
            "kind": kind}


def make_format_on_request(seed: int = 8642) -> dict[str, list[dict]]:
    """The format-on-request demo's files: sft, preferences, prompts (train), val_prompts (PPO's own held-out
    check, ``ppo.eval_data``) and eval_prompts (the report's), each prompt asking for the house format with
    probability ASK_SHARE (eval_prompts: exactly half of each task kind); no question is in two of the three
    prompt files."""
    rng = random.Random(seed)
    sft, prompts, val_prompts, eval_prompts = [], [], [], []
    systems = [None, None, None, "You are a concise and helpful assistant."]

    def turn() -> tuple[str, str]:
        question, _, _, plain, wrong_plain = on_request_task(rng, echo=True)
        if rng.random() < DEMO_ERRORS:
            plain = wrong_plain
        if rng.random() < ASK_SHARE:
            return ask_house_format(question), house_answer(plain) if rng.random() < ASKED_COMPLIANCE else plain
        return question, house_answer(plain) if rng.random() < UNASKED_HOUSE else plain

    for i in range(400):
        system = rng.choice(systems)
        messages = [{"role": "system", "content": system}] if system else []
        for _ in range(2 if i % 10 == 0 else 1):  # a few two-turn conversations
            user, assistant = turn()
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        sft.append({"messages": messages})
    prefs = [on_request_pair(rng) for _ in range(400)]
    seen: set[str] = set()
    for kind in ON_REQUEST_KINDS:  # held-out first: 16 per task kind, 8 of them asking for the house format
        drawn = 0
        while drawn < ON_REQUEST_EVAL_PER_KIND:
            question, value, _, _, _ = on_request_task(rng, kind)
            if question not in seen:
                seen.add(question)
                asked = drawn % 2 == 0
                eval_prompts.append({"prompt": ask_house_format(question) if asked else question, "reference": value})
                drawn += 1
    for rows, n in ((prompts, 200), (val_prompts, 48)):  # never a held-out question, asked or not
        while len(rows) < n:
            question, value, _, _, _ = on_request_task(rng)
            if question not in seen:
                seen.add(question)
                rows.append({"prompt": ask_house_format(question) if rng.random() < ASK_SHARE else question,
                             "reference": value})
    return {"sft": sft, "preferences": prefs, "prompts": prompts, "val_prompts": val_prompts,
            "eval_prompts": eval_prompts}


def main(seed: int = 1234) -> None:
    rng = random.Random(seed)
    OUT.mkdir(parents=True, exist_ok=True)
    sft, prefs, ranks, prompts = [], [], [], []
    systems = [None, None, None, "You are a concise and helpful assistant."]
    for i in range(400):
        prompt, good, bad = make_task(rng)
        system = rng.choice(systems)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": good},
        ]
        if i % 10 == 0:  # a few two-turn conversations
            p2, g2, _ = make_task(rng)
            messages += [{"role": "user", "content": p2}, {"role": "assistant", "content": g2}]
        sft.append({"messages": messages})
    for _ in range(400):
        prompt, good, bad = make_task(rng)
        style = rng.random()
        if style < 0.5:
            rejected = bad
        elif style < 0.75:
            rejected = bad + rng.choice(RAMBLE)
        else:
            rejected = rng.choice(CURT)
        prefs.append({"prompt": prompt, "chosen": good, "rejected": rejected})
    for _ in range(60):
        prompt, good, bad = make_task(rng)
        responses = [good, bad + rng.choice(RAMBLE), rng.choice(CURT), bad]
        order = list(range(4))
        rng.shuffle(order)
        shuffled = [responses[j] for j in order]
        # ranking: indices into the shuffled list, best first (good, bad, bad+ramble, curt)
        quality = {0: 0, 3: 1, 1: 2, 2: 3}
        ranking = sorted(range(4), key=lambda k: quality[order[k]])
        ranks.append({"prompt": prompt, "responses": shuffled, "ranking": ranking})
    for _ in range(200):
        prompt, good, _ = make_task(rng)
        prompts.append({"prompt": prompt, "reference": good})
    for name, rows in (("sft", sft), ("preferences", prefs), ("rankings", ranks), ("prompts", prompts)):
        with open(OUT / f"{name}.jsonl", "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows):4d} records to {OUT / (name + '.jsonl')}")
    for folder, files in ((HOUSE, make_house()), (ON_REQUEST, make_format_on_request())):
        folder.mkdir(parents=True, exist_ok=True)
        for name, rows in files.items():
            with open(folder / f"{name}.jsonl", "w") as fh:
                for row in rows:
                    fh.write(json.dumps(row) + "\n")
            print(f"wrote {len(rows):4d} records to {folder / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
