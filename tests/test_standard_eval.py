"""``python -m pipeline eval`` (pipeline/standard_eval.py): lm-evaluation-harness on local task files, offline.

The shipped gsm8k task loads from ../shared/data/gsm8k (scored on test, few-shot examples from train);
a tiny run's base and SFT models are evaluated with limit 3 and the results file, the per-question answers
and the report section are checked; a bad task name, a bad limit, a missing data file and a hub dataset
are clear errors naming the key or file.
"""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError
from pipeline.report import standard_eval_lines, write_report
from pipeline.standard_eval import models_to_evaluate, run_eval, summarize_task, task_config

from conftest import shared_data

METRICS = ("exact_match,strict-match", "exact_match,flexible-extract")


def test_gsm8k_task_loads_from_the_local_files_offline(tiny_cfg):
    test_file = shared_data("gsm8k", "test.jsonl")
    from lm_eval.tasks import TaskManager

    spec, hashes = task_config(tiny_cfg(), "gsm8k")
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(test_file.resolve())
    assert set(hashes) == {"train", "test"} and all(len(h) == 64 for h in hashes.values())
    # built by lm-eval from the dict alone: no built-in (hub) task is indexed
    task = TaskManager(include_defaults=False).load([spec])["tasks"]["gsm8k"]
    test_docs, fewshot_docs = task.test_docs(), task.fewshot_docs()
    assert len(test_docs) == 1319 and len(fewshot_docs) == 7473  # scored on test, examples from train
    assert test_docs[0]["question"].startswith("Janet")
    assert task.doc_to_text(test_docs[0]).startswith("Question: Janet") and task.doc_to_text(test_docs[0]).endswith(
        "Answer:")
    assert task.doc_to_target(test_docs[0]).endswith("#### 18")


def test_unknown_task_and_bad_limit_are_config_errors(tiny_cfg):
    with pytest.raises(ConfigError) as err:
        tiny_cfg("eval.tasks=[gsm9k]")
    assert "eval.tasks" in str(err.value) and "unknown eval task 'gsm9k'" in str(err.value)
    assert "shipped tasks: gsm8k" in str(err.value)
    for bad in ("0", "-5", "many"):
        with pytest.raises(ConfigError, match="eval.limit"):
            tiny_cfg(f"eval.limit={bad}")
    with pytest.raises(ConfigError, match="eval.data.gsm8k2"):
        tiny_cfg("eval.data={gsm8k2: {test: x.jsonl}}")


def test_missing_data_file_names_the_key_and_the_path(tiny_cfg, tmp_path):
    cfg = tiny_cfg(f"eval.data={{gsm8k: {{test: {tmp_path / 'nowhere.jsonl'}}}}}")
    with pytest.raises(ConfigError) as err:
        run_eval(cfg, out=lambda line: None)
    assert "eval.data.gsm8k.test" in str(err.value) and "nowhere.jsonl" in str(err.value)
    cfg = tiny_cfg(f"eval.data={{gsm8k: {{dev: {tmp_path / 'x.jsonl'}}}}}")
    with pytest.raises(ConfigError, match=r"eval.data.gsm8k.dev: the task has no split 'dev'"):
        run_eval(cfg, out=lambda line: None)
    # a task file's own path that does not exist: named with the task file and its key
    task = tmp_path / "mytask.yaml"
    task.write_text("task: mytask\ndataset_path: json\ndataset_kwargs: {data_files: {test: missing/test.jsonl}}\n")
    with pytest.raises(ConfigError) as err:
        run_eval(tiny_cfg(f"eval.tasks=[{task}]"), out=lambda line: None)
    assert "mytask.yaml: dataset_kwargs.data_files.test" in str(err.value) and "missing/test.jsonl" in str(err.value)


def test_unset_data_dir_variable_is_named_in_the_error(tiny_cfg, monkeypatch):
    # the shipped task reads ${ALIGNPIPE_DATA_DIR}/gsm8k/...: without the variable the error says to set it
    monkeypatch.delenv("ALIGNPIPE_DATA_DIR", raising=False)
    with pytest.raises(ConfigError) as err:
        task_config(tiny_cfg(), "gsm8k")
    assert "set ALIGNPIPE_DATA_DIR (not set now) or point eval.data.gsm8k." in str(err.value)


def test_a_hub_dataset_is_refused(tiny_cfg, tmp_path):
    task = tmp_path / "hub_gsm8k.yaml"
    task.write_text("task: hub_gsm8k\ndataset_path: openai/gsm8k\ndataset_name: main\n")
    with pytest.raises(ConfigError, match="dataset_path 'openai/gsm8k'.*offline"):
        run_eval(tiny_cfg(f"eval.tasks=[{task}]"), out=lambda line: None)


def test_summarize_task_hand_worked():
    raw = {"results": {"t": {"alias": "t", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match":
                             0.2886751, "exact_match,flexible-extract": 0.0,
                             "exact_match_stderr,flexible-extract": 0.0}},
           "n-samples": {"t": {"original": 1319, "effective": 4}}, "n-shot": {"t": 5}}
    summary = summarize_task(raw, "t")
    assert (summary["n"], summary["n_total"], summary["num_fewshot"]) == (4, 1319, 5)
    strict = summary["metrics"]["exact_match,strict-match"]
    # 2 of 4: Wilson centre (0.5 + z^2/8) / (1 + z^2/4) = 0.5, half-width 1.96 * sqrt(1/16 + z^2/64) / 1.9604 = 0.350
    assert strict["correct"] == 2 and strict["stderr"] == pytest.approx(0.2886751)
    assert strict["ci_low"] == pytest.approx(0.150, abs=1e-3) and strict["ci_high"] == pytest.approx(0.850, abs=1e-3)
    none = summary["metrics"]["exact_match,flexible-extract"]
    # 0 of 4: the interval is [0, z^2 / (n + z^2)] = [0, 3.8415 / 7.8415] = [0, 0.490]
    assert none["correct"] == 0 and none["ci_low"] == 0.0 and none["ci_high"] == pytest.approx(0.490, abs=1e-3)


def test_eval_of_a_tiny_run_writes_results_and_the_report_shows_them(tiny_cfg):
    shared_data("gsm8k", "test.jsonl")
    from stages import sft

    cfg = tiny_cfg("sft.train.max_steps=2", "eval.limit=3", "eval.num_fewshot=1", "eval.max_gen_toks=8",
                   "eval.batch_size=3")
    assert models_to_evaluate(cfg) == ["base"]  # no complete stage yet
    sft.run(cfg)
    assert models_to_evaluate(cfg) == ["base", "sft"]
    with pytest.raises(ConfigError, match="eval --stages ppo"):
        models_to_evaluate(cfg, ["ppo"])
    lines: list[str] = []
    path = run_eval(cfg, out=lines.append)
    saved = json.loads(path.read_text())
    assert path == cfg.run_dir() / "standard_eval.json"
    assert saved["settings"]["limit"] == 3 and saved["settings"]["num_fewshot"] == 1
    assert saved["settings"]["data_sha256"]["gsm8k"].keys() == {"train", "test"}
    assert list(saved["models"]) == ["base", "sft"]
    for name in ("base", "sft"):
        entry = saved["models"][name]
        assert entry["identity"] and entry["wall_time_s"] > 0
        summary = entry["tasks"]["gsm8k"]
        assert (summary["n"], summary["n_total"], summary["num_fewshot"]) == (3, 1319, 1)
        for key in METRICS:
            m = summary["metrics"][key]
            assert 0.0 <= m["value"] <= 1.0 and m["ci_low"] <= m["value"] <= m["ci_high"]
            assert m["correct"] == round(m["value"] * 3) and m["stderr"] is not None
        answers = cfg.run_dir() / "standard_eval" / f"{name}-gsm8k.jsonl"
        rows = [json.loads(r) for r in answers.read_text().splitlines()]
        assert len(rows) == 3 and all(isinstance(r["response"], str) for r in rows)
        assert set(rows[0]["filters"]) == {"strict-match", "flexible-extract"}
        assert rows[0]["target"].endswith("#### 18") and "exact_match" in rows[0]["filters"]["strict-match"]
    # unchanged weights and settings: nothing is evaluated again
    lines.clear()
    run_eval(cfg, out=lines.append)
    assert sum("already in" in line for line in lines) == 2
    assert json.loads(path.read_text())["models"] == saved["models"]
    # the report reads the file: one row per model and metric, base before SFT
    section = "\n".join(standard_eval_lines(cfg))
    assert section.startswith("## Standard evaluation (lm-evaluation-harness)")
    strict_rows = [r for r in section.splitlines() if r.startswith("| gsm8k | exact_match,strict-match |")]
    assert [r.split("|")[3].strip() for r in strict_rows] == ["base", "SFT"]
    assert "Stale" not in section
    text = write_report(cfg, out=lambda line: None, generate_samples=False).read_text()
    assert text.index("## Standard evaluation") < text.index("## Stages")  # with the answers, before the details


def test_report_section_is_empty_without_results(tiny_cfg):
    assert standard_eval_lines(tiny_cfg()) == []
