"""The GPU check's own bookkeeping (bench/gpu_check.py): which runs fit its time budget, and the ops it finds
compiled. Its steps themselves run in `make gpu-check-dry` (CI: .ci/run)."""

from __future__ import annotations

import time
from pathlib import Path

from bench import gpu_check


def test_a_run_starts_only_with_room_for_it() -> None:
    first = gpu_check.FIRST_RUN_S[True]
    assert gpu_check.room_for_run(first, [], dry=True)
    assert not gpu_check.room_for_run(first - 1, [], dry=True)  # a cold first run: imports, no estimate yet
    assert gpu_check.room_for_run(40.0, [20.0, 32.0], dry=True)  # 1.25 x the slowest so far
    assert not gpu_check.room_for_run(39.0, [20.0, 32.0], dry=True)


def test_dry_run_out_of_time_skips_and_fails_without_starting_anything(tmp_path: Path) -> None:
    result: dict = {"failures": [], "runs": {}}
    gpu_check.run_all(True, "", tmp_path, result, deadline=time.time() + 10)
    assert set(result["runs"]) == {"tiny-lora", "tiny-full", "tiny-zero2"}
    assert all("time budget" in run["skipped"] for run in result["runs"].values())
    assert len(result["failures"]) == 3 and "GPU_CHECK_BUDGET_S" in result["failures"][0]
    assert not (tmp_path / "outputs").exists()


def test_compiled_ops_lists_what_torch_extensions_holds(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "unused"))  # restored after the test
    folder = gpu_check.fresh_extensions_dir(tmp_path)
    assert gpu_check.compiled_ops(folder) == []
    (folder / "py311_cpu" / "deepspeed_shm_comm").mkdir(parents=True)
    assert gpu_check.compiled_ops(folder) == ["py311_cpu/deepspeed_shm_comm"]
    assert gpu_check.compiled_ops(gpu_check.fresh_extensions_dir(tmp_path)) == []  # emptied for the next check
