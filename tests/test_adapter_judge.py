"""An adapter where a model is expected: an hf judge on a PEFT stage folder that saved only adapter/ loads its
base with the adapter on top, answers as the merged model does, and has its own identity (cache keys)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from stages.rlaif.judges import Constitution, HFJudge, resolve_judge_model
from tests.test_judges import CONSTITUTION, PAIRS
from tests.test_serve_adapters import _lora_stage


def test_hf_judge_on_an_adapter_only_stage(tmp_path: Path, tiny_base: str) -> None:
    torch.set_num_threads(1)
    stages = []
    for name, seed in (("sft", 1), ("dpo", 2)):
        folder = _lora_stage(tmp_path, tiny_base, name, seed)
        shutil.copytree(folder / "model", tmp_path / f"merged_{name}")
        for file in folder.glob("*"):
            if file.is_file() and file.name != "manifest.json":
                shutil.copy(file, tmp_path / f"merged_{name}" / file.name)
        shutil.rmtree(folder / "model")  # as a method that cannot be merged leaves it: adapter/ only
        stages.append(folder)
    cfg = load_config("configs/tiny.yaml")
    assert resolve_judge_model(cfg, str(stages[0])) == (str(stages[0]), str(stages[0]))
    constitution = Constitution.load(CONSTITUTION)
    on_adapter = HFJudge(stages[0], constitution=constitution)
    assert type(on_adapter.model).__name__.startswith("Peft")
    merged = HFJudge(tmp_path / "merged_sft", constitution=constitution)
    for a, b in zip(on_adapter.judge_pairs(PAIRS), merged.judge_pairs(PAIRS)):
        assert a.prob_a == pytest.approx(b.prob_a, abs=1e-4)
    other = HFJudge(stages[1], constitution=constitution)
    assert on_adapter.identity()["weights"] != other.identity()["weights"]  # the adapter is part of the key
