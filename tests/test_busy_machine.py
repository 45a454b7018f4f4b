"""CPU stage processes get OpenMP settings that stay fast on a machine whose cores are shared
(pipeline.launch.cpu_thread_env; measured by bench/busy.py)."""

from __future__ import annotations

from pathlib import Path

from pipeline import launch
from pipeline.config import load_config
from pipeline.launch import _cgroup_cpu_quota, cpu_thread_env, stage_env

REPO = Path(__file__).resolve().parent.parent


def _cfg(*overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", list(overrides))


def test_cpu_stage_processes_wait_passively_on_the_available_cores(monkeypatch):
    monkeypatch.setattr(launch, "available_cpus", lambda: 6)
    env = stage_env(_cfg(), {}, cpu=True)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["KMP_BLOCKTIME"] == "0" and env["OMP_NUM_THREADS"] == "6"
    shared = stage_env(_cfg("launch.launcher=torchrun", "launch.nproc_per_node=4"), {}, cpu=True)
    assert shared["OMP_NUM_THREADS"] == "1", "the available cores are shared by the processes of a node"
    gpu = stage_env(_cfg(), {}, cpu=False)
    assert not {"OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS"} & set(gpu)


def test_the_environment_and_the_config_override_the_default():
    env = stage_env(_cfg(), {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}, cpu=True)
    assert env["OMP_NUM_THREADS"] == "3" and env["OMP_WAIT_POLICY"] == "ACTIVE"
    env = stage_env(_cfg("launch.cpu_wait_policy=inherit", "launch.cpu_threads=inherit"), {}, cpu=True)
    assert not {"OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS"} & set(env)
    assert cpu_thread_env("inherit", 5) == {"OMP_NUM_THREADS": "5"}


def test_cgroup_cpu_quota(tmp_path):
    assert _cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_cpu_quota(tmp_path) == 1.5
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_cpu_quota(v1) == 2.0
    assert launch.available_cpus() >= 1


def test_a_thread_count_below_one_is_refused():
    import pytest

    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="launch.cpu_threads"):
        stage_env(_cfg("launch.cpu_threads=0"), {}, cpu=True)
