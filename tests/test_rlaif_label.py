"""The rlaif_label stage on the tiny config: SFT samples -> judged pairs -> a data set the RM trains on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from data.formats import load_examples
from pipeline.config import DataSource, RunConfig, load_config
from pipeline.manifest import new_manifest, read_manifest, write_manifest
from pipeline.models import chat_fingerprint, chat_format, load_tokenizer, prepare_base, save_tokenizer
from pipeline.stage import stage_identity, stage_section
from stages import run_stage

torch.set_num_threads(1)


def prefers_shorter(prompt: str, first: str, second: str) -> float:
    """A consistent rule judge: the shorter response wins (equal lengths tie)."""
    return 1.0 if len(first) < len(second) else 0.0 if len(first) > len(second) else 0.5


def always_first(prompt: str, first: str, second: str) -> str:
    return "A"


def _config(tmp_path: Path, judge_fn: str = "prefers_shorter", extra: list[str] | None = None) -> RunConfig:
    return load_config("configs/tiny.yaml", [
        f"output_root={tmp_path}", "stages=[sft, rlaif_label, rm]",
        "rlaif_label.data.path=data/demo/prompts.jsonl", "rlaif_label.data.max_records=6",
        "rlaif_label.num_responses=3", "rlaif_label.max_new_tokens=12", "rlaif_label.batch_size=4",
        "rlaif.judges.default.kind=function", f"rlaif.judges.default.function={__name__}:{judge_fn}",
        *(extra or []),
    ])


def fake_sft(cfg: RunConfig) -> Path:
    """A complete sft stage folder made of the tiny base model (no training needed here)."""
    base = prepare_base(cfg.model)
    stage = cfg.stage_dir("sft")
    shutil.copytree(base, stage / "model")
    tokenizer = load_tokenizer(base, cfg.model, cfg.chat)
    save_tokenizer(tokenizer, stage)
    fmt = chat_format(tokenizer, cfg.chat)
    config_hash, input_hash = stage_identity(cfg, "sft")
    manifest = new_manifest("sft", stage_section(cfg, "sft"), config_hash, input_hash)
    manifest.update(status="complete", chat_format=fmt, chat_fingerprint=chat_fingerprint(fmt))
    write_manifest(stage, manifest)
    return stage


def test_rlaif_label_writes_preferences_and_rm_trains_on_them(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    fake_sft(cfg)
    metrics = run_stage("rlaif_label", cfg)
    stage = cfg.stage_dir("rlaif_label")
    manifest = read_manifest(stage)
    assert manifest["status"] == "complete" and manifest["chat_fingerprint"]
    assert manifest["chat_fingerprint"] == read_manifest(cfg.stage_dir("sft"))["chat_fingerprint"]
    assert metrics["prompts"] == 6 and metrics["responses"] == 18 and metrics["policy"] == "sft"
    assert metrics["pairs_kept"] > 0
    assert metrics["pairs_kept"] + metrics["ties_dropped"] == metrics["pairs_judged"]
    records = [json.loads(line) for line in (stage / "preferences.jsonl").read_text().splitlines()]
    assert len(records) == metrics["pairs_kept"]
    for r in records:
        assert len(r["chosen"]) < len(r["rejected"])  # the rule judge's verdict, in both orders
        assert r["judge"]["prob_chosen"] == 1.0 and r["judge"]["name"] == "default"
    # the data contract reads it as preference pairs
    pairs, report = load_examples(DataSource(path=str(stage / "preferences.jsonl")), "preference")
    assert len(pairs) == len(records) and report.skipped == 0

    # a re-run samples the same responses and asks the judge nothing new
    again = run_stage("rlaif_label", cfg)
    assert again["judge_requests"] == 0 and again["judge_cache_hits"] == 2 * metrics["pairs_judged"]
    assert again["pairs_kept"] == metrics["pairs_kept"]

    # the rm stage trains on the data set unchanged
    rm_cfg = _config(tmp_path, extra=[
        f"rm.data.path={stage / 'preferences.jsonl'}", "rm.train.max_steps=2", "rm.train.per_device_batch_size=4",
        "rm.eval_fraction=0.0",
    ])
    rm_metrics = run_stage("rm", rm_cfg)
    assert read_manifest(rm_cfg.stage_dir("rm"))["status"] == "complete"
    assert rm_metrics


def test_rlaif_label_refuses_a_judge_that_keeps_nothing(tmp_path: Path) -> None:
    cfg = _config(tmp_path, judge_fn="always_first")
    fake_sft(cfg)
    with pytest.raises(ValueError, match="kept no pair"):
        run_stage("rlaif_label", cfg)
    manifest = read_manifest(cfg.stage_dir("rlaif_label"))
    assert manifest["status"] == "failed" and "kept no pair" in manifest["error"]
    assert manifest["metrics"]["inconsistent"] == manifest["metrics"]["pairs_judged"]


def test_chain_sft_rlaif_label_rm_reads_the_labelled_file(tmp_path: Path) -> None:
    """sft -> rlaif_label (tiny.yaml's own rule-based default judge) -> rm, with rm.data unset: the rm
    stage trains on outputs/<run>/rlaif_label/preferences.jsonl and records the file and its hash."""
    from data.formats import DataError
    from pipeline.manifest import hash_file
    from pipeline.stage import data_hashes

    cfg = load_config("configs/tiny.yaml", [
        f"output_root={tmp_path}", "stages=[sft, rlaif_label, rm]", "rm.data=", "rlaif_label.data.max_records=8",
        "rm.train.max_steps=2", "rm.train.per_device_batch_size=4", "rm.eval_fraction=0.2",
    ])
    assert cfg.rm.data is None and cfg.rlaif.judges["default"].kind == "function"
    fake_sft(cfg)
    label_metrics = run_stage("rlaif_label", cfg)
    labelled = cfg.stage_dir("rlaif_label") / "preferences.jsonl"
    assert label_metrics["pairs_kept"] > 0 and labelled.exists()
    assert label_metrics["inconsistent"] == 0  # the rule judge is order-symmetric

    rm_metrics = run_stage("rm", cfg)
    manifest = read_manifest(cfg.stage_dir("rm"))
    assert manifest["status"] == "complete"
    assert manifest["preference_data"] == {"from": "rlaif_label", "path": str(labelled), "hash": hash_file(labelled)}
    assert manifest["data_files"] == {str(labelled): hash_file(labelled)}
    assert set(manifest["parents"]) == {"sft", "rlaif_label"}
    assert rm_metrics["train_pairs"] + rm_metrics["eval_pairs"] == label_metrics["pairs_kept"]

    # the identity does not hash an rm.data that is not read; the labelled file counts through its parent
    with_data = load_config("configs/tiny.yaml", [f"output_root={tmp_path}", "stages=[sft, rlaif_label, rm]"])
    assert data_hashes(with_data, "rm") == {}
    assert stage_identity(with_data, "rm")[1] == stage_identity(cfg, "rm")[1]

    # neither rm.data nor rlaif_label: a clear error before any model is loaded
    plain = load_config("configs/tiny.yaml", [f"output_root={tmp_path / 'plain'}", "stages=[sft, rm]", "rm.data="])
    with pytest.raises(DataError, match="rm.data is not set.*rlaif_label"):
        run_stage("rm", plain)
