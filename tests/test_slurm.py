"""Slurm: sbatch script content (always), and a real one-node Slurm run of fake stages (``-m slurm``).

The real-cluster test starts Slurm with ``../shared/tools/slurm/start_slurm.sh`` (needs root; skipped
with the reason otherwise), submits two chains of fake stages (``tests/fake_stages.py``, a second or so
each), one of them with a failing middle stage, and checks that the good chain completed in order and
that the failure cancelled the stage after it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.launch import ENTRY_ENV
from pipeline.manifest import read_manifest, write_manifest
from pipeline.slurm import (
    TERMINAL_STATES,
    parse_scontrol,
    plan_submission,
    read_jobs,
    sbatch_script,
    slurm_pipeline,
)
from tests.helpers.common import write_config

REPO = Path(__file__).resolve().parent.parent

START_SLURM = REPO.parent / "shared" / "tools" / "slurm" / "start_slurm.sh"


# ------------------------------------------------------------------------------------ script content
def test_sbatch_script_multi_node_torchrun(tmp_path):
    config = write_config(tmp_path, run_name="s", extra=(
        "launch: {launcher: torchrun, nproc_per_node: 4, master_port: 29555}\n"
        "slurm:\n  nodes: 2\n  gpus_per_node: 4\n  cpus_per_task: 16\n  mem: 200G\n  time: '12:00:00'\n"
        "  partition: gpu\n  account: alignment\n  extra_sbatch: ['--qos=high', '#SBATCH --exclusive']\n"
        "  setup: ['module load cuda/12.4', 'source ~/venv/bin/activate']\n"))
    cfg = load_config(config)
    text, log = sbatch_script(cfg, "ppo", Path("/runs/config.resolved.json"), python="/py", env={})
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for expected in ("#SBATCH --job-name=alignpipe-s-ppo", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                     "#SBATCH --gres=gpu:4", "#SBATCH --cpus-per-task=16", "#SBATCH --mem=200G",
                     "#SBATCH --time=12:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=alignment",
                     "#SBATCH --qos=high", "#SBATCH --exclusive", "#SBATCH --kill-on-invalid-dep=yes",
                     f"#SBATCH --output={cfg.run_dir() / 'slurm' / 'ppo-%j.log'}", f"#SBATCH --chdir={REPO}",
                     "module load cuda/12.4", "source ~/venv/bin/activate", "export MASTER_PORT=29555"):
        assert expected in lines, expected
    assert log == cfg.run_dir() / "slurm" / "ppo-%j.log"
    # every #SBATCH line comes before the first command (sbatch stops reading directives there)
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert lines.index("module load cuda/12.4") < next(i for i, line in enumerate(lines) if line.startswith("srun"))
    assert 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in lines
    assert "DS_ACCELERATOR" not in text  # GPUs requested
    srun = next(line for line in lines if line.startswith("srun"))
    assert srun.startswith("srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=16 --kill-on-bad-exit=1 bash -c '")
    assert srun.endswith('2>&1 | tee -a "$STAGE_LOG"')
    # the launcher command, with the rendezvous expanded per node
    assert ("/py -m torch.distributed.run --nproc_per_node 4 --nnodes 2 --rdzv_backend c10d "
            '--rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id s-ppo -m stages ppo '
            "--config /runs/config.resolved.json") in srun
    check = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


def test_sbatch_script_single_node_cpu_and_deepspeed(tmp_path):
    cfg = load_config(write_config(tmp_path, run_name="s"))
    text, _ = sbatch_script(cfg, "sft", Path("/c.json"), python="/py", env={ENTRY_ENV: "tests.fake_stages"})
    assert "export DS_ACCELERATOR=cpu" in text and "--gres" not in text and "--partition" not in text
    assert ("srun --nodes=1 --ntasks-per-node=1 --cpus-per-task=1 --kill-on-bad-exit=1 "
            "/py -m tests.fake_stages sft --config /c.json 2>&1") in text
    ds = load_config(write_config(tmp_path, "launch: {launcher: deepspeed, nproc_per_node: 2}\n"
                                            "slurm: {nodes: 2, gpus_per_node: 2}\n", run_name="d"))
    text, _ = sbatch_script(ds, "rm", Path("/c.json"), python="/py", env={})
    srun = next(line for line in text.splitlines() if line.startswith("srun"))
    assert "-m deepspeed.launcher.runner --num_gpus 2" in srun and "--no_ssh" in srun
    assert '--node_rank "$SLURM_NODEID"' in srun and "--no_local_rank --module stages rm" in srun
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_sbatch_resource_mismatches_are_config_errors(tmp_path):
    local_multi = load_config(write_config(tmp_path, run_name="a", extra="slurm: {nodes: 2}\n"))
    with pytest.raises(ConfigError, match="slurm.nodes=2 but launch.launcher='local'"):
        sbatch_script(local_multi, "sft", Path("/c.json"))
    too_many = load_config(write_config(tmp_path, "launch: {launcher: torchrun, nproc_per_node: 8}\n"
                                                  "slurm: {gpus_per_node: 4}\n", run_name="b"))
    with pytest.raises(ConfigError, match="nproc_per_node=8"):
        sbatch_script(too_many, "sft", Path("/c.json"))


def test_plan_submission_skips_complete_leading_stages(tmp_path, monkeypatch):
    monkeypatch.setenv(ENTRY_ENV, "tests.fake_stages")
    config = write_config(tmp_path, run_name="s")
    from pipeline.orchestrator import run_pipeline

    run_pipeline(config, stages=["sft"], echo=False, report=False, out=lambda line: None)
    cfg = load_config(config)
    assert plan_submission(cfg, ["sft", "rm", "ppo"], force=False, out=lambda line: None) == ["rm", "ppo"]
    assert plan_submission(cfg, ["sft", "rm", "ppo"], force=True, out=lambda line: None) == ["sft", "rm", "ppo"]
    lines: list[str] = []
    assert slurm_pipeline(config, out=lines.append) == []  # written, not submitted
    assert (cfg.run_dir() / "slurm" / "rm.sbatch").exists() and not (cfg.run_dir() / "slurm" / "sft.sbatch").exists()
    assert any("not submitted" in line for line in lines)
    # a parent outside the submission must be complete
    manifest = read_manifest(cfg.stage_dir("sft"))
    write_manifest(cfg.stage_dir("sft"), {**manifest, "status": "failed"})
    from pipeline.manifest import ManifestError

    with pytest.raises(ManifestError, match="cannot submit stage 'rm'"):
        plan_submission(cfg, ["rm", "ppo"], force=False, out=lambda line: None)
    # --stages ppo brings the failed sft and the missing rm into the chain, as `pipeline run` does ...
    lines.clear()
    slurm_pipeline(config, stages=["ppo"], force=True, out=lines.append)
    assert [p.name for p in sorted((cfg.run_dir() / "slurm").glob("*.sbatch"))] == ["ppo.sbatch", "rm.sbatch",
                                                                                    "sft.sbatch"]
    assert any(line.startswith("[sft] added:") and "failed" in line for line in lines)
    # ... and --no-parents refuses
    with pytest.raises(ManifestError, match="cannot submit stage 'ppo'"):
        slurm_pipeline(config, stages=["ppo"], parents=False, out=lambda line: None)


def test_parse_scontrol():
    text = ("JobId=7 JobName=alignpipe-s-rm UserId=root(0) JobState=CANCELLED Reason=DependencyNeverSatisfied "
            "Dependency=afterok:6(failed) ExitCode=0:0 RunTime=00:00:00 NodeList=(null)")
    fields = parse_scontrol(text)
    assert fields["JobState"] == "CANCELLED" and fields["Reason"] == "DependencyNeverSatisfied"
    assert fields["ExitCode"] == "0:0"


# ------------------------------------------------------------------------------------- real Slurm
@pytest.fixture(scope="module")
def slurm_cluster():
    if not START_SLURM.exists():
        pytest.skip(f"{START_SLURM} not found: no way to start a local Slurm")
    if os.geteuid() != 0:
        pytest.skip("starting the local Slurm needs root (start_slurm.sh runs the daemons as root)")
    done = subprocess.run(["bash", str(START_SLURM)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SLURM_LOCAL_SMOKE": "0"})
    if done.returncode != 0:
        pytest.skip(f"start_slurm.sh failed (exit {done.returncode}): {(done.stderr or done.stdout)[-500:]}")
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch is not on PATH after start_slurm.sh")
    return True


def _wait(job_ids: list[str], timeout: float) -> dict[str, dict[str, str]]:
    from pipeline.slurm import job_state

    deadline = time.time() + timeout
    while True:
        states = {j: job_state(j) for j in job_ids}
        if all(s["JobState"] in TERMINAL_STATES for s in states.values()) or time.time() > deadline:
            return states
        time.sleep(0.5)


@pytest.mark.slurm
def test_real_slurm_chain_runs_in_order_and_failure_cancels(slurm_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv(ENTRY_ENV, "tests.fake_stages")
    for knob in ("FAKE_FAIL", "FAKE_CRASH", "FAKE_SLEEP"):
        monkeypatch.delenv(knob, raising=False)
    good, bad = write_config(tmp_path, run_name="good"), write_config(tmp_path, run_name="bad")
    quiet = lambda line: None  # noqa: E731
    good_jobs = slurm_pipeline(good, do_submit=True, env=dict(os.environ), out=quiet)
    bad_jobs = slurm_pipeline(bad, do_submit=True, env={**os.environ, "FAKE_FAIL": "rm"}, out=quiet)
    assert [j["stage"] for j in good_jobs] == ["sft", "rm", "ppo"]
    assert good_jobs[1]["dependency"] == good_jobs[0]["job_id"]
    assert read_jobs(load_config(good)) == good_jobs
    states = _wait([j["job_id"] for j in good_jobs + bad_jobs], timeout=60)

    good_states = [states[j["job_id"]]["JobState"] for j in good_jobs]
    assert good_states == ["COMPLETED"] * 3, states
    cfg = load_config(good)
    ms = {s: read_manifest(cfg.stage_dir(s)) for s in ("sft", "rm", "ppo")}
    assert all(m["status"] == "complete" for m in ms.values())
    assert ms["sft"]["metrics"]["finished_at"] <= ms["rm"]["started_at"]
    assert ms["rm"]["metrics"]["finished_at"] <= ms["ppo"]["started_at"]
    assert "[fake rm]" in (cfg.stage_dir("rm") / "stage.log").read_text()
    assert Path(good_jobs[0]["log"]).exists()

    bad_states = [states[j["job_id"]] for j in bad_jobs]
    assert [s["JobState"] for s in bad_states] == ["COMPLETED", "FAILED", "CANCELLED"], bad_states
    assert bad_states[1]["ExitCode"].startswith("1:")
    bad_cfg = load_config(bad)
    assert read_manifest(bad_cfg.stage_dir("rm"))["status"] == "failed"
    assert read_manifest(bad_cfg.stage_dir("ppo")) is None

    from pipeline.orchestrator import format_status

    status = format_status(bad_cfg)
    assert "slurm jobs:" in status and "FAILED" in status and "CANCELLED" in status


@pytest.mark.slurm
@pytest.mark.slow
def test_real_slurm_tiny_pipeline(slurm_cluster, tmp_path, monkeypatch):
    """The real stages of configs/tiny.yaml as a chain of Slurm jobs: all complete, in order, with a report."""
    monkeypatch.delenv(ENTRY_ENV, raising=False)
    overrides = [f"output_root={tmp_path}", "sft.train.max_steps=4", "rm.train.max_steps=4", "ppo.total_episodes=32",
                 "slurm.cpus_per_task=2", "slurm.time=00:10:00"]
    jobs = slurm_pipeline("configs/tiny.yaml", overrides, do_submit=True, env=dict(os.environ), out=lambda line: None)
    assert [j["stage"] for j in jobs] == ["sft", "rm", "ppo"]
    states = _wait([j["job_id"] for j in jobs], timeout=400)
    logs = {j["stage"]: Path(j["log"]).read_text()[-2000:] if Path(j["log"]).exists() else "" for j in jobs}
    assert [states[j["job_id"]]["JobState"] for j in jobs] == ["COMPLETED"] * 3, (states, logs)
    cfg = load_config("configs/tiny.yaml", overrides)
    ms = {s: read_manifest(cfg.stage_dir(s)) for s in ("sft", "rm", "ppo")}
    assert all(m["status"] == "complete" for m in ms.values())
    for parent, child in (("sft", "rm"), ("rm", "ppo")):
        assert ms[parent]["started_at"] + ms[parent]["wall_time_s"] <= ms[child]["started_at"]
        assert ms[child]["parents"][parent]["hash"]
    from pipeline.report import write_report

    assert "## PPO" in write_report(cfg, out=lambda line: None, generate_samples=False).read_text()
