"""The run report, rendered from files only: sections, valid PNG plots, "not run" for missing stages, and the
verdict, samples, few-shot and distillation sections from a hand-written evaluation.json (no model is loaded;
the evaluation itself is tested in tests/test_evaluation.py)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.report import render_report, write_report
from pipeline.report.markdown import md_cell
from pipeline.report.plots import series
from tests import fake_stages
from tests.helpers.common import write_config

REPO = Path(__file__).resolve().parent.parent

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def linked_images(report: Path) -> list[Path]:
    return [report.parent / link for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())]


@pytest.fixture
def quiet_env(monkeypatch):
    for knob in ("FAKE_STEPS", "FAKE_FAIL", "FAKE_CRASH", "FAKE_SLEEP"):
        monkeypatch.delenv(knob, raising=False)
    monkeypatch.setenv("FAKE_STEPS", "5")


def test_full_report_sections_and_pngs(tmp_path, quiet_env):
    cfg = load_config(write_config(tmp_path))
    for stage in ("sft", "rm", "ppo"):
        fake_stages.run_fake(cfg, stage)
    # the RM stage saves its score histogram next to its model
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.hist([0.1, 0.5, 0.7], bins=3)
    fig.savefig(cfg.stage_dir("rm") / "score_histogram.png")
    plt.close(fig)

    report = write_report(cfg, out=lambda line: None)
    text = report.read_text()
    assert report == cfg.run_dir() / "report.md"
    for heading in ("# alignpipe run report: r", "## Stages", "## SFT", "## Reward model", "## PPO",
                    "## Sample generations: SFT vs PPO"):
        assert heading in text
    assert "not run" not in text
    assert "Held-out accuracy: **0.75**" in text and "| small | 0.6 |" in text
    # samples from ppo/samples.jsonl, with the RM comparison first (3 of 3 prompts: PPO scored higher, but
    # 3 prompts cannot show a difference: the interval includes 0.5)
    assert text.index("## Verdict") < text.index("## Stages")
    assert ("| PPO | reward model (rm stage) | 3 | 3 | 0 | 0 | 1.000 | 0.439 to 1.000 | "
            "**no measurable difference** |") in text
    assert "question 0 \\| with pipe" in text and "ppo answer 0<br>line two" in text
    images = linked_images(report)
    names = {p.name for p in images}
    assert {"sft_loss.png", "rm_accuracy.png", "rm_score_histogram.png", "ppo_curves.png"} <= names
    for image in images:
        assert image.exists(), image
        assert_valid_png(image)


def test_missing_and_failed_stages_say_so(tmp_path, quiet_env, monkeypatch):
    cfg = load_config(write_config(tmp_path))
    fake_stages.run_fake(cfg, "sft")
    monkeypatch.setenv("FAKE_FAIL", "rm")
    with pytest.raises(RuntimeError):
        fake_stages.run_fake(cfg, "rm")
    text = write_report(cfg, out=lambda line: None).read_text()
    rm_part = text.split("## Reward model")[1].split("## PPO")[0]
    assert "status: **failed**" in rm_part and "fake failure in stage rm" in rm_part
    ppo_part = text.split("## PPO")[1]
    assert "not run" in ppo_part
    assert "| ppo | not run |" in text
    for image in linked_images(cfg.run_dir() / "report.md"):
        assert_valid_png(image)


def test_report_of_empty_run(tmp_path):
    cfg = load_config(write_config(tmp_path, "stages: [sft, rlaif_label, rm, ppo]\n"))
    text = write_report(cfg, out=lambda line: None).read_text()
    for section in ("## SFT", "## RLAIF labels", "## Reward model", "## PPO"):
        assert text.split(section)[1].lstrip().startswith("not run")


def test_helpers():
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 1.5}, {"step": 3, "loss": float("nan")},
            {"step": 4, "loss": True}, {"step": 5, "loss": 1.0}]
    assert series(rows, "loss") == ([1.0, 5.0], [2.0, 1.0])
    assert md_cell("a|b\nc") == "a\\|b<br>c"
    assert md_cell("x" * 1000).endswith("…") and len(md_cell("x" * 1000)) == 400


def test_report_without_a_configured_judge_says_so(tmp_path, quiet_env):
    cfg = load_config(write_config(tmp_path))
    for stage in ("sft", "rm", "ppo"):
        fake_stages.run_fake(cfg, stage)
    text = write_report(cfg, out=lambda line: None).read_text()
    assert "Judge: not computed (no judge configured" in text
    evaluation = json.loads((cfg.run_dir() / "evaluation.json").read_text())
    assert evaluation["rm_win_rate"] == 1.0 and "judge_win_rate" not in evaluation and evaluation["judge_error"]


# ------------------------------------------------------------------- rendering a hand-written evaluation.json
def comparison(check: str, n: int, wins: int, losses: int, **extra) -> dict:
    """A comparison as evaluation.json holds it (the figures are hand-picked, not computed)."""
    return {"check": check, "n": n, "wins": wins, "losses": losses, "ties": n - wins - losses,
            "win_rate": (wins + 0.5 * (n - wins - losses)) / n, "ci_low": 0.25, "ci_high": 0.75,
            "verdict": "no measurable difference", "mean_parent": 0.5, "mean_policy": 1.0, "mean_diff": 0.5,
            "diff_ci_low": -0.25, "diff_ci_high": 1.25, **extra}


def write_rows(cfg, name: str, result: dict) -> str:
    """An answer-rows file under report/ as the evaluation writes it; its run-relative path."""
    path = cfg.run_dir() / "report" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": "hand-written", "result": result}))
    return str(path.relative_to(cfg.run_dir()))


@pytest.fixture
def no_model(monkeypatch):
    """Rendering must not load a model: any attempt fails the test."""
    from pipeline.evaluation import generate

    def refuse(*args, **kwargs):
        raise AssertionError("the report loaded a model")

    monkeypatch.setattr(generate, "load_answerer", refuse)
    monkeypatch.setattr(generate, "teacher_model", refuse)


def test_render_from_hand_written_evaluation(tmp_path, no_model):
    """Every verdict row, the verifier's parts, the sample/ICL/distillation tables from evaluation.json and
    the rows files it names."""
    cfg = load_config(write_config(tmp_path, "stages: [distill, sft, rm, ppo, dpo]\n"
                                             "distill: {data: {path: data/demo/prompts.jsonl}, "
                                             "teacher: {kind: hf, model: teacher}}\n"
                                             "dpo: {data: {path: data/demo/preferences.jsonl}}\n"))
    prompt = [{"role": "user", "content": "what is 2+2?"}]
    samples = {
        "ppo": write_rows(cfg, "samples", {"rows": [{"prompt": prompt, "sft": "four", "ppo": '{"answer": 4}',
                                                     "verifier_sft": 0.5, "verifier_ppo": 1.0}],
                                           "judge": "short", "judge_error": "RuntimeError: judge down"}),
        "icl": write_rows(cfg, "samples_icl", {"results": {"sft": {"rows": [{"prompt": prompt, "icl": "4?",
                                                                                 "sft": "four"}]}}}),
        "distill": write_rows(cfg, "samples_distill", {"overlap": 0, "rows": [
            {"prompt": prompt, "teacher": "T says 4", "base": "B says 5", "sft": "S says 4", "verifier_teacher": 1.0,
             "verifier_base": 0.0, "verifier_sft": 1.0}]}),
        "off_task_ppo": write_rows(cfg, "samples_off_task_ppo", {"rows": [
            {"prompt": [{"role": "user", "content": "Name a colour."}], "reference": "Red.", "parent": "Red is one.",
             "policy": '{"answer": ""}'}]})}
    diff = {"diff": -2.5, "ci_low": -4.0, "ci_high": -1.0, "n": 4}
    off_task = {"source": "greedy decoding", "n": 4, "drift": True, "reasons": ["length fell (-2.500, 95% CI "
                                                                                 "entirely below 0)"],
                "parent": {"length": 10.0, "kl": 0.0}, "policy": {"length": 7.5, "kl": 0.25},
                "diffs": {"length": diff, "kl": {"diff": 0.25, "ci_low": 0.125, "ci_high": 0.375, "n": 4}}}
    parts = {"house_format": {"n": 4, "mean_parent": 0.25, "mean_policy": 1.0, "diff": 0.75, "diff_ci_low": 0.25,
                              "diff_ci_high": 1.25}}
    evaluation = {
        "run_name": "r", "policy": "ppo", "baseline": "sft", "n_prompts": 4, "source": "greedy decoding (cached)",
        "comparisons": {"verifier": comparison("verifier v:f", 4, 3, 0, metrics={"correct": {"sft": 0.25,
                                                                                              "policy": 0.75}}),
                        "rm": comparison("reward model (rm stage)", 4, 1, 2)},
        "off_task": off_task,
        "policies": {"dpo": {"source": "not run (needs a complete DPO stage)", "n_prompts": 0, "comparisons": {},
                             "off_task": {"source": "not measured (report.general_prompts is not set)"}}},
        "icl": {"shots": 1, "source": "greedy decoding", "examples": [{"role": "user", "content": "1+1?"},
                                                                      {"role": "assistant", "content": "2"}],
                "policies": {"sft": {"n_prompts": 4, "comparisons": {"rm": comparison("reward model (rm stage)",
                                                                                      4, 0, 4)}}}},
        "distill": {"source": "greedy decoding", "overlap": 0,
                    "against": {"teacher": {"n_prompts": 4, "comparisons": {"verifier": comparison(
                        "verifier v:f", 4, 0, 0, parts=parts)}}}},
        "samples": samples}
    text = render_report(cfg, evaluation, out=lambda line: None).read_text()
    verdict = text.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    assert ("| PPO | verifier v:f | 4 | 3 | 0 | 1 | 0.875 | 0.250 to 0.750 | **no measurable difference** | "
            "0.500 -> 1.000 (diff +0.500, 95% CI -0.250 to +1.250) |") in verdict
    assert "| PPO | reward model (rm stage) | 4 | 1 | 2 | 1 | 0.375 |" in verdict
    assert "| SFT vs ICL (1-shot base) | reward model (rm stage) | 4 | 0 | 4 | 0 | 0.000 |" in verdict
    assert "| SFT vs distill teacher | verifier v:f | 4 | 0 | 0 | 4 | 0.500 |" in verdict
    assert "Verifier parts, PPO, mean over the same prompts (SFT -> PPO): correct 0.250 -> 0.750." in verdict
    assert "DPO: no comparison available (not run (needs a complete DPO stage))." in verdict
    # the verifier's parts as rows (the distillation row has parts; PPO's older "metrics" form stays a line)
    assert ("| SFT vs distill teacher | verifier part house_format | 4 |  |  |  |  |  | **policy higher** | "
            "0.250 -> 1.000 (diff +0.750, 95% CI +0.250 to +1.250) |") in verdict
    # off-task drift: the verdict row, the figures, the note of a policy without general prompts
    assert ("| PPO | off-task drift (4 general prompts) | 4 |  |  |  |  |  | **measurable** | length fell (-2.500, "
            "95% CI entirely below 0) |") in verdict
    assert "| PPO | length (tokens) | 4 | 10.000 | 7.500 | -2.500 | -4.000 to -1.000 |" in verdict
    assert "| PPO | KL to the parent (per token) | 4 | 0.000 | 0.250 | +0.250 | +0.125 to +0.375 |" in verdict
    assert "DPO, off-task drift: not measured (report.general_prompts is not set)." in verdict
    off = text.split("## Off-task answers: SFT vs PPO", 1)[1].split("\n## ", 1)[0]
    assert "The first 1 of 1 general prompts (all in `report/samples_off_task_ppo.json`)." in off
    assert '| user: Name a colour. | Red is one. | {"answer": ""} |' in off
    ppo = text.split("## Sample generations: SFT vs PPO", 1)[1].split("\n## ", 1)[0]
    assert "1 held-out prompts, greedy decoding (cached)." in ppo
    assert "Judge: not computed (judge `short`: RuntimeError: judge down)." in ppo
    assert '| user: what is 2+2? | four | {"answer": 4} | 0.5 | 1 |' in ppo
    assert "not run (needs a complete DPO stage)" in text.split("## Sample generations: SFT vs DPO", 1)[1]
    icl = text.split("## Few-shot baseline: the base model with 1 examples (ICL)", 1)[1]
    assert "| 1+1? | 2 |" in icl and "| user: what is 2+2? | 4? | four |" in icl
    distill = text.split("## Distillation: teacher, student before, student after", 1)[1]
    assert ("1 held-out prompts (0 of them among distill.data's prompts), greedy decoding. Teacher: hf `teacher`"
            in distill)
    assert "| distill teacher | 1 | **1.000** | 1.000 to 1.000 |" in distill  # one prompt: a zero-width interval
    assert "| user: what is 2+2? | T says 4 | B says 5 | S says 4 |" in distill


def test_evaluation_json_without_new_keys_still_renders(tmp_path, no_model):
    """An evaluation.json written before it named its rows files: the rows are read from their usual file."""
    cfg = load_config(write_config(tmp_path))
    write_rows(cfg, "samples", {"rows": [{"prompt": "hello", "sft": "hi", "ppo": "hey", "rm_sft": 0.0,
                                          "rm_ppo": 1.0}]})
    evaluation = {"run_name": "r", "policy": "ppo", "baseline": "sft", "n_prompts": 1, "source": "greedy decoding",
                  "rm_win_rate": 1.0, "comparisons": {"rm": comparison("reward model (rm stage)", 1, 1, 0)},
                  "policies": {}}
    (cfg.run_dir() / "evaluation.json").write_text(json.dumps(evaluation))
    text = render_report(cfg, json.loads((cfg.run_dir() / "evaluation.json").read_text())).read_text()
    assert "| PPO | reward model (rm stage) | 1 | 1 | 0 | 0 | 1.000 |" in text
    assert "| hello | hi | hey | 0 | 1 |" in text.split("## Sample generations: SFT vs PPO", 1)[1]
    assert render_report(cfg, None).read_text().count("## Verdict") == 0  # no evaluation: no verdict


def test_report_and_evaluation_modules_import_no_torch():
    """Rendering needs no model library: importing the report (and the evaluation it calls) loads neither torch
    nor transformers; the evaluation imports them inside the functions that load models."""
    import subprocess

    code = ("import sys, pipeline.report, pipeline.evaluation, pipeline.report_html; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
