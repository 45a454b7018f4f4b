"""KTO's rows (data/formats.py ``"labelled"``): TRL's unpaired format ``{prompt, completion, label}`` and its
variants, preference pairs unpaired into a desirable and an undesirable row, and bad records named by file:line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from data.formats import DataError, load_examples, to_labelled
from pipeline.config import DataSource


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _texts(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages]


def test_unpaired_rows_in_their_three_layouts():
    """prompt + completion (TRL's), prompt + response, and a messages conversation whose last turn is the
    completion; the label as JSON true/false, CSV text, or 0/1."""
    plain = to_labelled({"prompt": "Hi", "completion": "Hello.", "label": True}, 0)
    response = to_labelled({"prompt": "Hi", "response": "Go away.", "label": "False"}, 1)
    conversation = to_labelled({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                                             {"role": "user", "content": "And?"},
                                             {"role": "assistant", "content": "Bye."}], "label": 0}, 2)
    assert [len(x) for x in (plain, response, conversation)] == [1, 1, 1]
    assert (_texts(plain[0].prompt), _texts(plain[0].completion), plain[0].desirable) == (["Hi"], ["Hello."], True)
    assert response[0].desirable is False and _texts(response[0].completion) == ["Go away."]
    assert _texts(conversation[0].prompt) == ["Hi", "Yo", "And?"] and _texts(conversation[0].completion) == ["Bye."]
    assert conversation[0].desirable is False and conversation[0].pair is None


def test_a_preference_pair_is_unpaired_into_a_desirable_and_an_undesirable_row():
    """As TRL's KTOTrainer does with paired data: chosen -> desirable, rejected -> undesirable, same prompt; both
    rows remember the record (for held-out accuracy on pairs) and its kind."""
    rows = to_labelled({"prompt": "2+2?", "chosen": "4", "rejected": "5", "kind": "math"}, 7)
    assert [(r.desirable, _texts(r.completion), r.pair, r.kind) for r in rows] == [
        (True, ["4"], 7, "math"), (False, ["5"], 7, "math")]
    assert rows[0].prompt == rows[1].prompt == [{"role": "user", "content": "2+2?"}]


def test_a_file_mixing_labelled_rows_and_pairs_loads_with_both(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "a?", "completion": "A.", "label": True},
        {"prompt": "b?", "chosen": "B.", "rejected": "C."},
    ])
    rows, report = load_examples(DataSource(path=str(path)), "labelled")
    assert [r.desirable for r in rows] == [True, True, False] and report.kept == 2
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:2", f"{path}:2"]


def test_labels_from_a_csv_file(tmp_path):
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["prompt", "completion", "label"], ["a?", "A.", "true"], ["b?", "B.", "FALSE"]])
    rows, _ = load_examples(DataSource(path=str(path)), "labelled")
    assert [r.desirable for r in rows] == [True, False]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "completion": "a", "label": "yes"}, r"rows\.jsonl:2: 'label' must be true \(desirable\) or false"),
    ({"prompt": "q", "label": True}, r"rows\.jsonl:2: missing column\(s\): an unpaired record needs 'prompt' \+ "
                                     r"'completion' \(or 'response'\), or 'messages', beside 'label'"),
    ({"prompt": "", "completion": "a", "label": True}, r"rows\.jsonl:2: empty prompt"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [1, 0]},
     r"rows\.jsonl:2: a K-wise ranking cannot be unpaired for dpo\.loss=kto"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, r"rows\.jsonl:2: 'chosen' and 'rejected' are identical"),
])
def test_bad_labelled_record_is_named_by_file_and_line(tmp_path, record, message):
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "ok", "completion": "fine", "label": True}, record])
    with pytest.raises(DataError, match=message):
        load_examples(DataSource(path=str(path)), "labelled")


def test_an_unpaired_file_given_to_a_paired_objective_says_which_loss_reads_it(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "q", "completion": "a", "label": True}])
    with pytest.raises(DataError, match=r"rows\.jsonl:1: an unpaired record \(prompt, completion, label\): only "
                                        r"dpo\.loss=kto trains on"):
        load_examples(DataSource(path=str(path)), "preference")


def test_rows_are_held_out_by_prompt_so_both_rows_of_a_pair_stay_together(tmp_path):
    from types import SimpleNamespace

    from stages.preferences import load_preference_split

    records = [{"prompt": f"q{i}?", "chosen": f"right {i}", "rejected": f"wrong {i}"} for i in range(20)]
    records += [{"prompt": f"q{i}?", "completion": f"more {i}", "label": i % 2 == 0} for i in range(10)]
    source = DataSource(path=str(_write_jsonl(tmp_path / "rows.jsonl", records)))
    section = SimpleNamespace(data=source, eval_data=None, eval_fraction=0.3)
    train, held, _ = load_preference_split(section, 0, source, "dpo", kind="labelled")
    assert len(train) + len(held) == 50 and held
    prompts = {side: {r.prompt[0]["content"] for r in rows} for side, rows in (("train", train), ("eval", held))}
    assert not prompts["train"] & prompts["eval"]
    pairs_held = {r.pair for r in held if r.pair is not None}
    assert all(r.pair not in pairs_held for r in train if r.pair is not None)
