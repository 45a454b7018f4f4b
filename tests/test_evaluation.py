"""The held-out evaluation (pipeline.evaluation): the statistics on hand-worked numbers, and SFT against each
policy on tiny models (greedy answers, RM scores, the judge in both orders, the verifier's parts), written
to evaluation.json and reused from the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.manifest import read_manifest, write_manifest
from pipeline.report import write_report
from tests.helpers.common import write_config

REPO = Path(__file__).resolve().parent.parent


def _fake_model_stage(cfg, stage: str, src: str, tokenizer, kind: str) -> None:
    """A complete stage folder whose model is the tiny base (what the report loads)."""
    from pipeline.models import chat_fingerprint, chat_format, load_model, save_tokenizer

    out = cfg.stage_dir(stage)
    model = load_model(src, cfg.model, tokenizer, kind=kind)
    model.save_pretrained(out / "model", safe_serialization=True)
    save_tokenizer(tokenizer, out)
    save_tokenizer(tokenizer, out / "model")
    fmt = chat_format(tokenizer, cfg.chat)
    manifest = {"stage": stage, "status": "complete", "chat_fingerprint": chat_fingerprint(fmt), "metrics": {}}
    if stage == "rm":
        from stages.scoring import REWARD_LAYOUT

        manifest["reward_layout"] = REWARD_LAYOUT
    write_manifest(out, manifest)


def perturbed_model(cfg, base: str, tokenizer, folder: Path) -> str:
    """The tiny base with every weight perturbed (seeded), saved in ``folder``: a policy that answers otherwise."""
    import torch

    from pipeline.models import load_model

    model = load_model(base, cfg.model, tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5 * torch.randn_like(param) * param.std().clamp(min=1e-3))
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def test_sample_generations_with_tiny_models(tmp_path):
    """Identical SFT and PPO policies: same greedy outputs, same RM scores, so a 50% win rate (all ties)."""
    import torch

    torch.set_num_threads(1)
    from pipeline.evaluation.compare import sample_generations
    from pipeline.evaluation.generate import held_out_prompts
    from pipeline.models import load_tokenizer, prepare_base

    cfg = load_config(write_config(tmp_path, "ppo:\n  data: {path: data/demo/prompts.jsonl}\n  max_new_tokens: 8\n"))
    base = prepare_base(cfg.model)
    tokenizer = load_tokenizer(base, cfg.model, cfg.chat)
    for stage, kind in (("sft", "causal_lm"), ("ppo", "causal_lm"), ("rm", "seq_cls")):
        _fake_model_stage(cfg, stage, base, tokenizer, kind)

    prompts = held_out_prompts(cfg, 3)
    from data.formats import load_examples

    all_prompts, _ = load_examples(cfg.ppo.data, "prompt")
    assert prompts == [ex.prompt for ex in all_prompts[-3:]]  # the tail of ppo.data

    result = sample_generations(cfg, None, n=3)
    assert len(result["rows"]) == 3
    for row in result["rows"]:
        assert row["sft"] == row["ppo"] and row["rm_sft"] == row["rm_ppo"]
    assert result["rm_win_rate"] == 0.5

    text = write_report(cfg, out=lambda line: None).read_text()
    assert "| PPO | reward model (rm stage) | 8 | 0 | 0 | 8 | 0.500 |" in text and "greedy decoding" in text
    assert result["comparisons"]["rm"]["verdict"] == "no measurable difference"
    cache = json.loads((cfg.run_dir() / "report" / "samples.json").read_text())
    rows = cache["result"]["rows"]  # the report samples 8 prompts by default
    assert len(rows) == 8 and all(r["sft"] == r["ppo"] for r in rows)
    assert [r["sft"] for r in rows[-3:]] == [r["sft"] for r in result["rows"]]
    assert [r["rm_sft"] for r in rows[-3:]] == pytest.approx([r["rm_sft"] for r in result["rows"]], abs=1e-5)
    # a second report reuses the cached generations
    assert "greedy decoding (cached)" in write_report(cfg, out=lambda line: None).read_text()
    assert read_manifest(cfg.stage_dir("ppo"))["status"] == "complete"


def prefers_shorter(prompt: str, first: str, second: str) -> float:
    """A consistent rule judge for the test below: the shorter response wins (equal lengths tie)."""
    return 1.0 if len(first) < len(second) else 0.0 if len(first) > len(second) else 0.5


def always_first(prompt: str, first: str, second: str) -> str:
    """A judge with total position bias: every pair is inconsistent across the two orders."""
    return "A"


def test_judge_win_rate_in_report_and_evaluation_json(tmp_path):
    """PPO (a perturbed tiny model) vs SFT (the tiny base) on held-out prompts: the RM win rate and the
    judge win rate (function judge, both orders) go into report.md and outputs/<run>/evaluation.json."""
    import torch

    torch.set_num_threads(1)
    from pipeline.evaluation.compare import judge_win_rate, sample_generations
    from pipeline.models import load_tokenizer, prepare_base

    judges = ("rlaif:\n  judges:\n"
              "    short: {kind: function, function: 'tests.test_evaluation:prefers_shorter'}\n"
              "    biased: {kind: function, function: 'tests.test_evaluation:always_first'}\n"
              "rlaif_label: {judge: short}\n")
    cfg = load_config(write_config(tmp_path, "  max_new_tokens: 12\n" + judges))
    base = prepare_base(cfg.model)
    tokenizer = load_tokenizer(base, cfg.model, cfg.chat)
    for stage, kind in (("sft", "causal_lm"), ("rm", "seq_cls")):
        _fake_model_stage(cfg, stage, base, tokenizer, kind)
    _fake_model_stage(cfg, "ppo", perturbed_model(cfg, base, tokenizer, tmp_path / "perturbed"), tokenizer,
                      "causal_lm")

    result = sample_generations(cfg, None, n=6)
    rows = result["rows"]
    expected = [1.0 if len(r["ppo"]) < len(r["sft"]) else 0.0 if len(r["ppo"]) > len(r["sft"]) else 0.5 for r in rows]
    assert any(r["sft"] != r["ppo"] for r in rows)
    assert result["judge"] == "short" and result["judge_kind"] == "function"
    assert result["judge_win_rate"] == pytest.approx(sum(expected) / len(rows))
    assert result["judge_wins"] == expected.count(1.0) and result["judge_ties"] == expected.count(0.5)
    assert result["judge_inconsistent"] == 0 and result["judge_prompts"] == 6
    assert [r["judge"] for r in rows] == [{1.0: "ppo", 0.0: "sft", 0.5: "tie"}[e] for e in expected]
    assert "rm_win_rate" in result

    # a judge with total position bias: both orders disagree on every pair of different responses
    biased = judge_win_rate(cfg, [dict(r) for r in rows], "biased")
    assert biased["judge_wins"] == biased["judge_losses"] == 0 and biased["judge_win_rate"] == 0.5
    assert biased["judge_inconsistent"] == biased["judge_ties"] == 6

    text = write_report(cfg, out=lambda line: None, n_samples=6).read_text()
    evaluation = json.loads((cfg.run_dir() / "evaluation.json").read_text())
    assert evaluation["n_prompts"] == 6 and evaluation["judge"] == "short"
    assert evaluation["judge_win_rate"] == pytest.approx(result["judge_win_rate"])
    assert evaluation["judge_ties"] == result["judge_ties"]
    assert evaluation["rm_win_rate"] == pytest.approx(result["rm_win_rate"])
    judged = evaluation["comparisons"]["judge"]
    assert judged["win_rate"] == pytest.approx(result["judge_win_rate"])
    assert (judged["wins"], judged["ties"]) == (result["judge_wins"], result["judge_ties"])
    assert f"| PPO | judge short (function), both orders | 6 | {judged['wins']} | {judged['losses']} |" in text
    assert "evaluation.json" in text


def test_wilson_interval_and_paired_comparison_hand_worked():
    """Hand-worked: Wilson's interval at 0.5 of 100 and at 3 of 3; wins/losses/ties and the verdict."""
    from pipeline.evaluation.stats import outcome_comparison, paired_comparison, wilson_interval

    low, high = wilson_interval(0.5, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    low, high = wilson_interval(1.0, 3)  # centre 1.640/2.280 = 0.7193, half 0.2807
    assert (low, high) == pytest.approx((0.4385, 1.0), abs=1e-4)
    c = paired_comparison([1.0, 0.5, 0.0, 1.0], [0.0, 0.5, 1.0, 0.0])  # win, tie, loss, win
    assert (c["n"], c["wins"], c["losses"], c["ties"]) == (4, 2, 1, 1)
    assert c["win_rate"] == pytest.approx(0.625) and c["verdict"] == "no measurable difference"
    assert c["mean_diff"] == pytest.approx(0.25)  # diffs 1, 0, -1, 1: sd 0.9574, half 1.96 * 0.9574 / 2
    assert (c["diff_ci_low"], c["diff_ci_high"]) == pytest.approx((0.25 - 0.93825, 0.25 + 0.93825), abs=1e-4)
    many = outcome_comparison(["policy"] * 50 + ["tie"] * 40 + ["parent"] * 6)
    assert many["win_rate"] == pytest.approx((50 + 20) / 96) and many["verdict"] == "policy better"
    assert outcome_comparison(["parent"] * 20)["verdict"] == "parent better"
    with pytest.raises(ValueError):
        paired_comparison([], [])


def test_win_rate_counts_ties_half():
    from pipeline.evaluation.stats import win_rate

    assert win_rate([1.0, 2.0, 3.0, 0.0], [0.5, 2.0, 4.0, -1.0]) == pytest.approx(2.5 / 4)  # win, tie, loss, win


def verifier_with_parts(prompts, responses, references):
    """A verifier in the reward-function form with per-sample parts (for the test below)."""
    correct = [float(r == ref) for r, ref in zip(responses, references)]
    short = [float(len(r) < 4) for r in responses]
    return {"scores": [c + 0.5 * s for c, s in zip(correct, short)], "metrics": {"correct": correct, "short": short}}


def test_verifier_parts_are_averaged_per_policy(tmp_path):
    """report.verifier may return parts; add_comparisons averages them per policy (the verdict shows them)."""
    from pipeline.evaluation.compare import add_comparisons, verifier_scores

    cfg = load_config(write_config(tmp_path, "report: {verifier: 'tests.test_evaluation:verifier_with_parts'}\n"))
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    scores, parts = verifier_scores(cfg, prompts, ["a", "bbbb", "c", "dddd"], ["a", "x", "x", "dddd"])
    assert scores == [1.5, 0.0, 0.5, 1.0] and parts == {"correct": [1, 0, 0, 1], "short": [1, 0, 1, 0]}
    rows = [{"verifier_sft": 0.0, "verifier_ppo": s, "verifier_metrics_sft": {"correct": 0.0, "short": 0.0},
             "verifier_metrics_ppo": {"correct": c, "short": h}}
            for s, c, h in zip(scores, parts["correct"], parts["short"])]
    result = add_comparisons(cfg, {"rows": rows})
    verifier = result["comparisons"]["verifier"]
    assert verifier["wins"] == 3 and verifier["ties"] == 1
    assert verifier["metrics"] == {"correct": {"sft": 0.0, "policy": 0.5}, "short": {"sft": 0.0, "policy": 0.5}}
    # each part paired: diffs 1, 0, 0, 1 (correct): mean 0.5, sd sqrt(1/3), half-width 1.96 * sd / 2
    correct = verifier["parts"]["correct"]
    assert (correct["n"], correct["mean_parent"], correct["mean_policy"]) == (4, 0.0, 0.5)
    assert (correct["diff_ci_low"], correct["diff_ci_high"]) == pytest.approx(
        (0.5 - 0.979982 * (1 / 3) ** 0.5, 0.5 + 0.979982 * (1 / 3) ** 0.5))


def test_one_verdict_table_for_every_policy(tmp_path):
    """A run with PPO and DPO: both are compared with SFT on the same held-out prompts, in one table."""
    import torch

    torch.set_num_threads(1)
    from pipeline.models import load_tokenizer, prepare_base

    extra = "  max_new_tokens: 8\nstages: [sft, rm, ppo, dpo]\ndpo: {data: {path: data/demo/preferences.jsonl}}\n"
    cfg = load_config(write_config(tmp_path, extra))
    base = prepare_base(cfg.model)
    tokenizer = load_tokenizer(base, cfg.model, cfg.chat)
    for stage, kind in (("sft", "causal_lm"), ("ppo", "causal_lm"), ("dpo", "causal_lm"), ("rm", "seq_cls")):
        _fake_model_stage(cfg, stage, base, tokenizer, kind)
    text = write_report(cfg, out=lambda line: None, n_samples=4).read_text()
    verdict = text.split("## Verdict")[1].split("## Stages")[0]
    # identical policies: every prompt a tie, for PPO and for DPO alike
    assert "| PPO | reward model (rm stage) | 4 | 0 | 0 | 4 | 0.500 |" in verdict
    assert "| DPO | reward model (rm stage) | 4 | 0 | 0 | 4 | 0.500 |" in verdict
    assert "## Sample generations: SFT vs DPO" in text and "## DPO" in text
    evaluation = json.loads((cfg.run_dir() / "evaluation.json").read_text())
    assert evaluation["policies"]["dpo"]["comparisons"]["rm"]["ties"] == 4
    assert evaluation["comparisons"]["rm"]["ties"] == 4  # PPO stays at the top level
