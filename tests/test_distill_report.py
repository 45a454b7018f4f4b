"""The distillation rows of the run report (teacher, student before, student after on the same held-out prompts
and verifier, in the verdict table with intervals) after a tiny distill -> sft run, and the pre-flight of the
teacher (``python -m pipeline validate`` names distill.teacher.path / distill.teacher.model)."""

from __future__ import annotations

import json
from pathlib import Path

VERIFIER = "tests.test_icl_baseline:longer_is_better"


def _teacher_folder() -> str:
    from pipeline.config import ModelConfig, TinyModelConfig
    from pipeline.models import prepare_base

    return prepare_base(ModelConfig(source="tiny", tiny=TinyModelConfig(seed=1)))  # the student's tokenizer


def test_report_shows_teacher_student_before_and_after(tiny_cfg):
    from pipeline.report import write_report
    from stages import run_stage

    cfg = tiny_cfg("stages=[distill, sft]", "distill.data={path: data/demo/prompts.jsonl, max_records: 6}",
                   f"distill.teacher={{kind: hf, model: '{_teacher_folder()}'}}", "distill.max_new_tokens=8",
                   "distill.num_threads=1", "distill.token_level.enabled=true", "sft.train.max_steps=2",
                   "sft.eval_fraction=0", "ppo.max_new_tokens=8",
                   "report={eval_data: {path: data/demo/prompts.jsonl}, n_prompts: 4, verifier: '%s'}" % VERIFIER)
    run_stage("distill", cfg)
    run_stage("sft", cfg)
    printed: list[str] = []
    path = write_report(cfg, out=printed.append)
    text = path.read_text()
    verdict = text.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    for row in ("| SFT vs base model (student before) | verifier tests.test_icl_baseline:longer_is_better | 4 |",
                "| SFT vs distill teacher | verifier tests.test_icl_baseline:longer_is_better | 4 |"):
        assert row in verdict
    assert "95% CI" in verdict and "how much of the teacher's skill moved over" in verdict
    section = text.split("## Distillation: teacher, student before, student after", 1)[1]
    assert "4 held-out prompts (4 of them among distill.data's prompts)" in section  # the same file: all 4 overlap
    for title in ("| distill teacher | 4 |", "| base model (student before) | 4 |", "| SFT (student after) | 4 |"):
        assert title in section
    assert "token-level distillation (forward_kl" in section

    cached = json.loads((cfg.run_dir() / "report" / "samples_distill.json").read_text())["result"]
    rows = cached["rows"]
    assert len(rows) == 4 and all({"teacher", "base", "sft", "verifier_teacher", "verifier_base", "verifier_sft"}
                                  <= set(r) for r in rows)
    assert all(r["verifier_sft"] == float(len(r["sft"])) for r in rows)  # the verifier scored each model's answer
    evaluation = json.loads((cfg.run_dir() / "evaluation.json").read_text())["distill"]
    for parent in ("base", "teacher"):
        comparison = evaluation["against"][parent]["comparisons"]["verifier"]
        assert comparison["n"] == 4
        assert comparison["mean_parent"] == sum(r[f"verifier_{parent}"] for r in rows) / 4
        assert comparison["mean_policy"] == sum(r["verifier_sft"] for r in rows) / 4
        assert comparison["diff_ci_low"] <= comparison["mean_diff"] <= comparison["diff_ci_high"]

    # a second report reads the cache: nothing generated again
    printed.clear()
    again = write_report(cfg, out=printed.append, generate_samples=False).read_text()
    assert "(cached)" in again.split("## Distillation", 1)[1] and not any("generating" in p for p in printed)


def _validate(config: Path, capsys, *overrides: str) -> tuple[int, str]:
    """``python -m pipeline validate CONFIG OVERRIDES`` in this process -> (exit code, stderr)."""
    from pipeline.cli import main

    capsys.readouterr()
    code = main(["validate", str(config), *overrides])
    return code, capsys.readouterr().err


def test_validate_checks_the_teacher(tmp_path, capsys):
    config = tmp_path / "d.yaml"
    config.write_text(f"run_name: d\noutput_root: {tmp_path / 'out'}\nmodel: {{source: tiny}}\nstages: [distill, sft]\n"
                      "distill: {data: {path: data/demo/prompts.jsonl}}\n")
    code, err = _validate(config, capsys, f"distill.teacher={{kind: stage, path: {tmp_path / 'nowhere'}}}")
    assert code == 2 and "distill.teacher.path: folder not found" in err

    half = tmp_path / "half"
    (half / "model").mkdir(parents=True)
    (half / "manifest.json").write_text(json.dumps({"stage": "ppo", "status": "running"}))
    code, err = _validate(config, capsys, f"distill.teacher={{kind: stage, path: {half}}}")
    assert code == 2 and "is not a complete stage folder (status: running)" in err

    (half / "manifest.json").write_text(json.dumps({"stage": "ppo", "status": "complete"}))
    code, err = _validate(config, capsys, f"distill.teacher={{kind: stage, path: {half}}}")
    assert code == 2 and "distill.teacher.path" in err and "has no config.json" in err

    code, err = _validate(config, capsys, f"distill.teacher={{kind: hf, model: {tmp_path / 'no-model'}}}")
    assert code == 2 and "distill.teacher.model: folder not found" in err

    code, err = _validate(config, capsys, f"distill.teacher={{kind: hf, model: '{_teacher_folder()}'}}",
                          "distill.token_level.enabled=true")
    assert code == 0, err
