"""Off-task drift (pipeline/evaluation/drift.py): the per-answer metrics and the drift rule on hand-worked
numbers, the teacher-forced KL against torch's own kl_div, and a tiny-model report run on general prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.evaluation.drift import (
    answer_values,
    content_text,
    content_words,
    drift_reasons,
    format_part,
    rouge_l,
    summarise,
)
from pipeline.evaluation.stats import paired_difference_known
from tests.helpers.common import write_config

REPO = Path(__file__).resolve().parent.parent

HALF = 1.959964 / 2  # Z95 / sqrt(4): the interval's half-width per unit of sample sd, over 4 prompts


def test_content_strips_format_wrappers():
    assert content_text('{"answer": "Paris"}') == "Paris" and content_words('{"answer": "Paris"}') == 1
    assert content_text('```json\n{"answer": "the big red dog"}\n```') == "the big red dog"
    assert content_text('{"answer": ""}') == "" and content_words('{"answer": ""}') == 0  # an empty shell
    assert content_text('{"a": [1, {"b": "two words"}]}') == "1 two words"
    assert content_text("{not json") == "{not json" and content_words("It is 42, sir.") == 4


def test_rouge_l_hand_worked():
    # LCS "the cat on the mat" = 5 of 6 tokens on each side: precision = recall = F1 = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("", "anything") == 0.0


def test_answer_values_hand_worked():
    eos = 2
    values = answer_values(["one two three", '{"answer": "x"}'], [[5, 6, 7, eos], [8, 9, 10]], eos,
                           ["one two four", None], [0.0, 1.0])
    assert values["length"] == [3.0, 3.0]  # the eos is not counted
    assert values["eos_rate"] == [1.0, 0.0]  # the second ran out of tokens
    assert values["empty_share"] == [0.0, 1.0]  # "x": one word
    assert values["reference_overlap"][0] == pytest.approx(2 / 3) and values["reference_overlap"][1] is None
    assert values["format_share"] == [0.0, 1.0]
    assert "format_share" not in answer_values(["a"], [[eos]], eos, [None], None)  # no format part: not measured
    assert format_part({"correct": [1.0], "house_format": [0.0]}) == [0.0] and format_part({"correct": [1.0]}) is None


def test_paired_difference_over_known_values():
    d = paired_difference_known([0.5, None, 0.2, 0.4], [0.6, 0.3, None, 0.5])  # pairs 1 and 4 only
    assert d["n"] == 2 and d["diff"] == pytest.approx(-0.1)
    assert (d["diff_ci_low"], d["diff_ci_high"]) == pytest.approx((-0.1, -0.1))  # sd 0
    assert paired_difference_known([None], [1.0]) is None


def test_drift_rule_hand_worked():
    parent = {"format_share": [0, 0, 0, 0], "length": [10, 10, 10, 10], "empty_share": [0, 0, 0, 0],
              "eos_rate": [1, 1, 1, 1], "kl": [0, 0, 0, 0], "reference_overlap": [0.6, 0.3, None, 0.5]}
    policy = {"format_share": [1, 1, 0, 0], "length": [6, 7, 5, 6], "empty_share": [0, 1, 1, 1],
              "eos_rate": [1, 1, 1, 0], "kl": [0.1, 0.2, 0.3, 0.4], "reference_overlap": [0.5, None, 0.2, 0.4]}
    s = summarise(parent, policy)
    assert s["n"] == 4 and set(s["diffs"]) == {"format_share", "length", "empty_share", "eos_rate", "kl",
                                                "reference_overlap"}
    # format: diffs 1, 1, 0, 0: mean 0.5, sd sqrt(1/3)
    assert s["diffs"]["format_share"]["diff"] == pytest.approx(0.5)
    assert s["diffs"]["format_share"]["ci_low"] == pytest.approx(0.5 - HALF * (1 / 3) ** 0.5)
    # length: diffs -4, -3, -5, -4: mean -4, sd sqrt(2/3); the interval is below 0
    assert s["diffs"]["length"]["ci_high"] == pytest.approx(-4 + HALF * (2 / 3) ** 0.5)
    # empty: diffs 0, 1, 1, 1: mean 0.75, sd 0.5, interval 0.75 ± 0.49: above 0
    assert s["diffs"]["empty_share"]["ci_low"] == pytest.approx(0.75 - HALF * 0.5)
    assert s["parent"]["kl"] == 0 and s["policy"]["kl"] == pytest.approx(0.25)
    assert s["diffs"]["reference_overlap"]["n"] == 2
    assert s["drift"] is True and len(s["reasons"]) == 4  # format, length, reference overlap, empty
    # the boundaries: a format rise of exactly 0.10 and intervals touching 0 are no drift
    assert drift_reasons({"format_share": {"diff": 0.10, "ci_low": -0.2, "ci_high": 0.4},
                          "length": {"diff": -1.0, "ci_low": -2.0, "ci_high": 0.0},
                          "empty_share": {"diff": 0.1, "ci_low": 0.0, "ci_high": 0.2}}) == []
    assert summarise(parent, parent)["drift"] is False


def _tiny_policy_and_parent(cfg, tmp_path):
    """SFT = the tiny base; PPO = the tiny base with its weights perturbed (so the two answer differently)."""
    from pipeline.models import load_tokenizer, prepare_base
    from tests.test_evaluation import _fake_model_stage, perturbed_model

    base = prepare_base(cfg.model)
    tokenizer = load_tokenizer(base, cfg.model, cfg.chat)
    _fake_model_stage(cfg, "sft", base, tokenizer, "causal_lm")
    _fake_model_stage(cfg, "ppo", perturbed_model(cfg, base, tokenizer, tmp_path / "perturbed"), tokenizer,
                      "causal_lm")


def test_answer_kl_matches_torch_kl_div(tmp_path):
    """The batched, left-padded KL equals torch's kl_div on each sequence alone, unpadded."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    from pipeline.evaluation.drift import answer_kl
    from pipeline.evaluation.generate import greedy_answers, held_out_prompts, load_answerer, prompt_ids

    cfg = load_config(write_config(tmp_path, "  max_new_tokens: 6\n"))
    _tiny_policy_and_parent(cfg, tmp_path)
    prompts = held_out_prompts(cfg, 3)
    parent, _ = load_answerer(cfg, "sft")
    policy, tokenizer = load_answerer(cfg, "ppo")
    _, answers = greedy_answers(cfg, policy, tokenizer, prompts)
    kl = answer_kl(cfg, policy, parent, tokenizer, prompts, answers, batch_size=3)
    for prompt, answer, got in zip(prompts, answers, kl):
        ids = torch.tensor([prompt_ids(cfg, tokenizer, prompt) + answer])
        with torch.no_grad():
            log_p = torch.log_softmax(policy(ids).logits[0, -len(answer) - 1:-1].float(), -1)
            log_q = torch.log_softmax(parent(ids).logits[0, -len(answer) - 1:-1].float(), -1)
        want = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean().item()  # KL(p || q)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6) and got > 0
    assert answer_kl(cfg, parent, parent, tokenizer, prompts, answers) == pytest.approx([0.0] * 3, abs=1e-6)


def test_report_run_with_general_prompts(tmp_path):
    """A tiny run with report.general_prompts: evaluation.json's off_task block has every metric, the verdict
    an off-task row and the verifier's parts rows; a second report reads the cache."""
    import torch

    torch.set_num_threads(1)
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt": "Name three colours.", "reference": "Red, green and blue."},
        {"prompt": "Write a haiku about rain.", "reference": "Soft rain on the roof"},
        {"prompt": "Why is the sky blue?"},
        {"prompt": "Give me a synonym for happy.", "reference": "Joyful."},
        {"prompt": "Ignored: beyond n_general.", "reference": "x"}]))
    extra = ("  max_new_tokens: 8\nreport: {verifier: 'stages.rlaif.rules:house_format_verifier', n_prompts: 4, "
             f"general_prompts: {{path: {general}}}, n_general: 4}}\n")
    cfg = load_config(write_config(tmp_path, extra))
    _tiny_policy_and_parent(cfg, tmp_path)
    printed: list[str] = []
    from pipeline.report import write_report

    text = write_report(cfg, out=printed.append).read_text()
    off_task = json.loads((cfg.run_dir() / "evaluation.json").read_text())["off_task"]
    assert off_task["n"] == 4 and off_task["source"] == "greedy decoding"
    metrics = {"format_share", "length", "eos_rate", "empty_share", "kl", "reference_overlap"}
    assert set(off_task["diffs"]) == set(off_task["parent"]) == set(off_task["policy"]) == metrics
    assert off_task["diffs"]["reference_overlap"]["n"] == 3  # one row has no reference
    assert off_task["parent"]["kl"] == 0 and off_task["policy"]["kl"] > 0  # the perturbed policy differs
    assert off_task["drift"] == bool(off_task["reasons"])
    rows = json.loads((cfg.run_dir() / "report" / "samples_off_task_ppo.json").read_text())["result"]["rows"]
    assert len(rows) == 4 and all({"prompt", "reference", "parent", "policy"} <= set(r) for r in rows)
    verdict = text.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    assert "| PPO | off-task drift (4 general prompts) | 4 |" in verdict
    assert f"**{'measurable' if off_task['drift'] else 'none'}**" in verdict
    for part in ("correct", "house_format"):
        assert f"| PPO | verifier part {part} | 4 |" in verdict
    assert "### Off-task drift: each policy against its parent on general prompts" in verdict
    assert "## Off-task answers: SFT vs PPO" in text
    printed.clear()
    again = write_report(cfg, out=printed.append, generate_samples=False)
    assert json.loads((cfg.run_dir() / "evaluation.json").read_text())["off_task"]["source"] == \
        "greedy decoding (cached)" and not any("general prompts" in line for line in printed)
    assert "off-task drift (4 general prompts)" in again.read_text()
