"""Two runs of one config and seed on one machine end with the same bits: weights and metrics.

The pipeline test runs the real stages (each its own process, as ``python -m pipeline run`` does) twice with
2 torch threads. SFT trains LoRA there: its A matrices are new weights drawn from torch's generator, and
torch starts every process from a different seed, so without ``stages.training.start_reproducibly`` and
the seeding before SFT builds its model the two runs part at SFT's first step (the failure the demo showed).
The tiny model's full fine-tuning draws nothing new, so the LoRA setting is what makes the test sensitive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.orchestrator import run_pipeline
from pipeline.stage import stage_identity
from stages.training import CUBLAS_DETERMINISTIC_WORKSPACE, start_reproducibly

REPO = Path(__file__).resolve().parent.parent
STAGES = ("sft", "rm", "ppo")
TWO_THREADS = [f"{stage}.train.num_threads=2" for stage in STAGES]
SHORT = ["sft.train.max_steps=6", "sft.train.save_steps=3", "rm.train.max_steps=6", "rm.train.save_steps=3",
         "ppo.total_episodes=32", "sft.tuning.method=lora", "logging.progress_bar=false"]


def _is_wall_clock(key: str) -> bool:
    """Metrics that time the run (``time``, ``time_generate``, ``tokens_per_s``): never the same twice."""
    return "time" in key or key.endswith("_per_s")


def _metrics(stage_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not _is_wall_clock(k)} for row in rows]


def _tensors(stage_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the safetensors files the stage left (model, adapter; checkpoints if any are kept)."""
    out = {}
    for path in sorted(stage_dir.rglob("*.safetensors")):
        for key, value in load_file(path).items():
            out[f"{path.relative_to(stage_dir)}:{key}"] = value
    return out


@pytest.mark.parametrize("stages", [("sft",), pytest.param(STAGES, marks=pytest.mark.slow)], ids="+".join)
def test_two_runs_with_two_threads_end_with_the_same_bits(stages, tmp_path):
    runs = {}
    for name in ("first", "second"):
        overrides = [f"output_root={tmp_path / name}", *SHORT, *TWO_THREADS, f"stages=[{','.join(stages)}]"]
        run_pipeline(REPO / "configs" / "tiny.yaml", overrides, echo=False, report=False, out=lambda line: None)
        runs[name] = load_config(REPO / "configs" / "tiny.yaml", overrides)
    first, second = runs["first"], runs["second"]
    for stage in stages:
        a, b = _tensors(first.stage_dir(stage)), _tensors(second.stage_dir(stage))
        assert any("adapter" in key for key in a) or stage != "sft", "SFT was to train LoRA"
        assert a.keys() == b.keys(), stage
        differing = [key for key in a if not torch.equal(a[key], b[key])]
        assert not differing, f"{stage}: {len(differing)} of {len(a)} tensors differ, e.g. {differing[:3]}"
        rows_a, rows_b = _metrics(first.stage_dir(stage)), _metrics(second.stage_dir(stage))
        assert any("loss" in row or "policy_loss" in row for row in rows_a), stage
        assert rows_a == rows_b, stage
    # the runs trained: SFT's adapter moved away from its initialisation (B starts at zero)
    adapter = load_file(first.stage_dir("sft") / "adapter" / "adapter_model.safetensors")
    assert any(key.endswith("lora_B.weight") and value.abs().sum() > 0 for key, value in adapter.items())


def test_torch_starts_each_process_from_another_seed_and_start_reproducibly_fixes_it():
    """Why the stages must seed at start: two fresh processes draw different numbers (measured with this
    torch build), and the same numbers after ``start_reproducibly``."""
    def draw(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=REPO).stdout.strip()

    plain = "import torch; print(torch.rand(3).tolist())"
    seeded = "from stages.training import start_reproducibly; import torch; start_reproducibly(0, False); " + plain
    if draw(plain) == draw(plain):
        pytest.skip("this torch build starts every process from one fixed seed")
    reference = torch.rand(3, generator=torch.Generator().manual_seed(0)).tolist()
    assert draw(seeded) == str(reference)


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # recorded, so the variable is put back as it was
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.get_rng_state(),
              torch.utils.deterministic.fill_uninitialized_memory)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]
    torch.set_rng_state(before[4])
    torch.utils.deterministic.fill_uninitialized_memory = before[5]


def test_determinism_on_asks_torch_for_deterministic_kernels(restore_determinism):
    torch.use_deterministic_algorithms(False)
    start_reproducibly(7, True)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC_WORKSPACE == ":4096:8"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.utils.deterministic.fill_uninitialized_memory
    assert torch.initial_seed() == 7


def test_determinism_off_leaves_torch_as_it_is(restore_determinism, monkeypatch):
    torch.use_deterministic_algorithms(False)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    start_reproducibly(3, False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert torch.initial_seed() == 3


def test_determinism_is_not_part_of_the_stage_hashes():
    """It changes no result on CPU (only whether a GPU run repeats bit for bit): flipping it must not make a
    complete stage stale."""
    on = load_config(REPO / "configs" / "tiny.yaml", [])
    off = load_config(REPO / "configs" / "tiny.yaml", ["determinism=false"])
    assert on.determinism is True and off.determinism is False
    for stage in STAGES:
        assert stage_identity(on, stage)[0] == stage_identity(off, stage)[0]
