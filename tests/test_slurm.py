"""Slurm: sbatch script content (always), and a real one-node Slurm run of fake stages (``-m slurm``).

The real-cluster tests start Slurm with ``../shared/tools/slurm/start_slurm.sh`` (needs root; skipped
with the reason otherwise). One submits two chains of fake stages (``tests/fake_stages.py``, a second or so
each), one of them with a failing middle stage, and checks that the good chain completed in order and
that the failure cancelled the stage after it. The slow ones run the tiny model's real stages: a whole
chain, and a chain whose stages are requeued mid-run (from outside, and by the time-limit warning to the
batch script) and still end with the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.launch import ENTRY_ENV
from pipeline.manifest import read_manifest, write_manifest
from pipeline.preemption import STOP_EXIT_CODE, STOP_FILE
from pipeline.slurm import (
    TERMINAL_STATES,
    parse_scontrol,
    plan_submission,
    read_jobs,
    sbatch_script,
    slurm_pipeline,
)
from tests.helpers.common import saved_weights, write_config

REPO = Path(__file__).resolve().parent.parent

START_SLURM = REPO.parent / "shared" / "tools" / "slurm" / "start_slurm.sh"


# ------------------------------------------------------------------------------------ script content
def test_sbatch_script_multi_node_torchrun(tmp_path):
    config = write_config(tmp_path, run_name="s", extra=(
        "launch: {launcher: torchrun, nproc_per_node: 4}\n"
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
                     "#SBATCH --open-mode=append", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120",
                     "module load cuda/12.4", "source ~/venv/bin/activate", "trap 'stop_stage USR1' USR1",
                     "trap 'stop_stage TERM' TERM", f'STOP_FILE="$STAGE_DIR/{STOP_FILE}"'):
        assert expected in lines, expected
    assert log == cfg.run_dir() / "slurm" / "ppo-%j.log"
    # every #SBATCH line comes before the first command (sbatch stops reading directives there)
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    srun_at = next(i for i, line in enumerate(lines) if line.startswith("srun"))
    assert lines.index("module load cuda/12.4") < srun_at
    assert lines.index("trap 'stop_stage TERM' TERM") < srun_at  # the trap is in place before the stage starts
    assert "DS_ACCELERATOR" not in text  # GPUs requested
    # one task per node, each building its launcher's rendezvous from the job's environment (pipeline.launch)
    assert lines[srun_at] == ("srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=16 --kill-on-bad-exit=1 /py -m "
                              "pipeline.launch ppo --config /runs/config.resolved.json "
                              '> >(trap "" TERM USR1; exec tee -a "$STAGE_LOG") 2>&1 &')
    check = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


def test_sbatch_script_single_node_cpu_and_deepspeed(tmp_path):
    cfg = load_config(write_config(tmp_path, run_name="s"))
    text, _ = sbatch_script(cfg, "sft", Path("/c.json"), python="/py", env={ENTRY_ENV: "tests.fake_stages"})
    assert "export DS_ACCELERATOR=cpu" in text and "--gres" not in text and "--partition" not in text
    assert ("srun --nodes=1 --ntasks-per-node=1 --cpus-per-task=1 --kill-on-bad-exit=1 "
            "/py -m pipeline.launch sft --config /c.json --entry tests.fake_stages > >(") in text
    ds = load_config(write_config(tmp_path, "launch: {launcher: deepspeed, nproc_per_node: 2}\n"
                                            "slurm: {nodes: 2, gpus_per_node: 2}\n", run_name="d"))
    text, _ = sbatch_script(ds, "rm", Path("/c.json"), python="/py", env={})
    assert "/py -m pipeline.launch rm --config /c.json > >(" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_sbatch_script_time_limit_signal_and_requeue_settings(tmp_path):
    """launch.time_limit becomes the job's --time (per stage when a mapping) and the deadline's fallback;
    slurm.signal_seconds and slurm.requeue shape the warning, the watchdog and the requeue."""
    cfg = load_config(write_config(tmp_path, "launch: {time_limit: {sft: '1-02:03:04', rm: 90}}\n", run_name="t"))
    sft, _ = sbatch_script(cfg, "sft", Path("/c.json"), python="/py", env={})
    rm, _ = sbatch_script(cfg, "rm", Path("/c.json"), python="/py", env={})
    ppo, _ = sbatch_script(cfg, "ppo", Path("/c.json"), python="/py", env={})
    assert "#SBATCH --time=1-02:03:04" in sft.splitlines() and "echo $(( $(date +%s) + 93784 ))" in sft
    assert "#SBATCH --time=01:30:00" in rm.splitlines()
    assert "#SBATCH --time=01:00:00" in ppo.splitlines()  # no limit of its own: slurm.time
    assert 'export ALIGNPIPE_DEADLINE="${SLURM_JOB_END_TIME:-$(job_end_epoch)}"' in sft
    assert "( sleep 105;" in sft and 'scontrol requeue "$SLURM_JOB_ID"' in sft  # the watchdog after the warning
    off = load_config(write_config(tmp_path, "slurm: {signal_seconds: 0, requeue: false}\n", run_name="o"))
    text, _ = sbatch_script(off, "sft", Path("/c.json"), python="/py", env={})
    lines = text.splitlines()
    assert "#SBATCH --no-requeue" in lines and not any(line.startswith("#SBATCH --signal") for line in lines)
    assert "scontrol requeue" not in text and "slurm.requeue is off" in text and "exit 75" in lines[-3:][0] + text
    with pytest.raises(ConfigError, match="launch.time_limit=.* and slurm.time="):
        load_config(write_config(tmp_path, "launch: {time_limit: 30}\nslurm: {time: '02:00:00'}\n", run_name="x"))


FAKE_STAGE = """#!/bin/bash
# stands in for the python of the sbatch script: `-c` runs the real one (the manifest check); else it is a
# stage that starts, then (FAKE_MODE) stops with 75 on the stop file, stops as torchrun reports it (1, with an
# interrupted manifest), ignores the request, or fails
if [ "$1" = -c ]; then exec {python} "$@"; fi
echo "$ALIGNPIPE_DEADLINE" > "$FAKE_DIR/deadline"
touch "$FAKE_DIR/started"
while [ ! -e "$FAKE_STAGE_DIR/stop-request" ] || [ "$FAKE_MODE" = ignore ]; do sleep 0.05; done
cp "$FAKE_STAGE_DIR/stop-request" "$FAKE_DIR/request"
case "$FAKE_MODE" in
  fail) exit 3 ;;
  torchrun) echo '{{"status": "interrupted", "started_at": '"$(date +%s)"'}}' > "$FAKE_STAGE_DIR/manifest.json"
            exit 1 ;;
  *) exit 75 ;;
esac
"""


def _fake_slurm_bin(folder: Path) -> Path:
    """srun that runs its command, scontrol that records its arguments, squeue with a fixed end time."""
    folder.mkdir()
    (folder / "srun").write_text('#!/bin/bash\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
    (folder / "scontrol").write_text('#!/bin/bash\necho "$@" >> "$FAKE_DIR/scontrol"\n')
    (folder / "squeue").write_text("#!/bin/bash\necho 2030-01-01T00:00:00\n")
    for tool in folder.iterdir():
        tool.chmod(0o755)
    return folder


@pytest.mark.parametrize("mode, requeued", [("stop", True), ("torchrun", True), ("fail", False),
                                            ("ignore", True)])
def test_batch_script_forwards_the_warning_and_requeues(tmp_path, mode, requeued):
    """The generated script run by bash with stand-ins for srun, scontrol, squeue and the stage: SIGUSR1 to the
    batch shell (what --signal=B:USR1 sends) reaches the stage as the stop file; a stage that stopped with a
    checkpoint (exit 75, or torchrun's 1 with an interrupted manifest) gets `scontrol requeue <job>` and the
    script exits 75; a failure does not; a stage that ignores the request is requeued by the watchdog."""
    cfg = load_config(write_config(tmp_path, "slurm: {signal_seconds: 4}\n", run_name="b"))
    stage_dir = cfg.stage_dir("sft")
    python = tmp_path / "python"
    python.write_text(FAKE_STAGE.format(python=sys.executable))
    python.chmod(0o755)
    text, _ = sbatch_script(cfg, "sft", Path("/c.json"), python=str(python), env={})
    (tmp_path / "job.sh").write_text(text)
    fake_bin = _fake_slurm_bin(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "vm", "FAKE_DIR": str(tmp_path), "FAKE_STAGE_DIR": str(stage_dir),
           "FAKE_MODE": mode}
    env.pop("SLURM_JOB_END_TIME", None)
    job = subprocess.Popen(["bash", str(tmp_path / "job.sh")], env=env, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _when(lambda: (tmp_path / "started").exists(), 30, "the stage to start")
        job.send_signal(signal.SIGUSR1)
        if mode == "ignore":  # grace max(4 - 15, 4 // 2) = 2 s, then the watchdog requeues
            _when(lambda: (tmp_path / "scontrol").exists(), 30, "the watchdog")
            time.sleep(0.5)
            assert job.poll() is None  # Slurm's requeue would end the job now; here the stage still runs
            return
        out, _ = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert (tmp_path / "request").read_text() == "SIGUSR1 to the batch script of job 77\n"
    assert int((tmp_path / "deadline").read_text()) == int(datetime(2030, 1, 1).timestamp())
    recorded = (tmp_path / "scontrol").read_text() if (tmp_path / "scontrol").exists() else ""
    assert ("requeue 77" in recorded) is requeued, (recorded, out)
    assert job.returncode == (STOP_EXIT_CODE if requeued else 3), out
    log = (stage_dir / "stage.log").read_text()
    assert "SIGUSR1: the stage checkpoints and stops at its next step boundary" in log
    assert ("requeueing job 77" in log) is requeued


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


def _job(job_id: str) -> dict[str, str]:
    done = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    return parse_scontrol(done.stdout)


def _when(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _steps_logged(stage_dir: Path) -> int:
    path = stage_dir / "metrics.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def _interrupt_and_requeue(job_id: str, stage_dir: Path, how: list[str]) -> None:
    """Once the stage has trained a few steps, interrupt its job with ``how``; wait until the job is requeued
    (pending again, same id) and its old run has left the node, then let it start now: Slurm holds a requeued
    job back for about two minutes, and one restarted within the second of its requeue is refused by slurmd
    (its credential counts as revoked)."""
    _when(lambda: _steps_logged(stage_dir) >= 3, 180, f"job {job_id} to train")
    subprocess.run(how, check=True, timeout=30)
    _when(lambda: _job(job_id).get("Restarts") == "1" and _job(job_id).get("JobState") == "PENDING", 60,
          f"job {job_id} to be requeued")
    _when(lambda: "completing" not in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                                                     timeout=30).stdout, 60, f"job {job_id}'s old run to end")
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)


@pytest.mark.slurm
@pytest.mark.slow
def test_real_slurm_requeued_stages_finish_the_chain_with_the_uninterrupted_weights(slurm_cluster, tmp_path,
                                                                                    monkeypatch):
    """sft -> rm on the tiny model as a chain of real Slurm jobs. sft is requeued from outside mid-run
    (``scontrol requeue``: Slurm sends SIGTERM, the stage checkpoints at its step, Slurm requeues it); rm gets
    the time-limit warning (SIGUSR1 to its batch shell, as ``--signal=B:USR1@N`` sends it: the script's trap
    writes the stop file, the stage checkpoints at its step and exits 75, the script requeues the job). rm's
    afterok dependency holds through sft's requeue; both resume, the chain completes, and the weights equal
    an uninterrupted local run's bit for bit."""
    monkeypatch.delenv(ENTRY_ENV, raising=False)
    steps = ["stages=[sft,rm]", "sft.train.max_steps=60", "sft.train.save_steps=1000", "rm.train.max_steps=40",
             "rm.train.save_steps=1000", "logging.progress_bar=false"]
    interrupted = [f"output_root={tmp_path / 'slurm'}", "run_name=c", *steps]
    jobs = slurm_pipeline("configs/tiny.yaml", interrupted, do_submit=True, env=dict(os.environ), out=lambda line: None)
    sft_job, rm_job = (j["job_id"] for j in jobs)
    cfg = load_config("configs/tiny.yaml", interrupted)
    _interrupt_and_requeue(sft_job, cfg.stage_dir("sft"), ["scontrol", "requeue", sft_job])
    assert _job(rm_job)["JobState"] == "PENDING" and _job(rm_job)["Dependency"].startswith(f"afterok:{sft_job}")
    sft_stop = read_manifest(cfg.stage_dir("sft"))
    assert sft_stop["status"] == "interrupted" and sft_stop["interrupted_by"] == "SIGTERM"
    assert sft_stop["stopped_at_step"] == sft_stop["resume_step"] >= 3
    _interrupt_and_requeue(rm_job, cfg.stage_dir("rm"), ["scancel", "--signal=USR1", "--batch", rm_job])
    rm_stop = read_manifest(cfg.stage_dir("rm"))
    assert rm_stop["interrupted_by"] == f"stop request (SIGUSR1 to the batch script of job {rm_job})", rm_stop
    states = _wait([sft_job, rm_job], timeout=300)
    logs = {j["stage"]: Path(j["log"]).read_text()[-3000:] for j in jobs if Path(j["log"]).exists()}
    assert [states[j]["JobState"] for j in (sft_job, rm_job)] == ["COMPLETED"] * 2, (states, logs)
    assert f"requeueing job {rm_job}" in (cfg.stage_dir("rm") / "stage.log").read_text()
    for stage, stop in (("sft", sft_stop), ("rm", rm_stop)):
        manifest = read_manifest(cfg.stage_dir(stage))
        assert manifest["status"] == "complete" and manifest["resumed"] is True
        rows = [json.loads(line) for line in (cfg.stage_dir(stage) / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == list(range(1, (60 if stage == "sft" else 40) + 1))
        assert stop["stopped_at_step"] < len([r for r in rows if "loss" in r])

    from pipeline.orchestrator import run_pipeline

    straight = [f"output_root={tmp_path / 'local'}", "run_name=c", *steps]
    run_pipeline("configs/tiny.yaml", straight, echo=False, report=False, out=lambda line: None)
    straight_cfg = load_config("configs/tiny.yaml", straight)
    for stage in ("sft", "rm"):
        a = saved_weights(cfg.stage_dir(stage) / "model")
        b = saved_weights(straight_cfg.stage_dir(stage) / "model")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage


@pytest.mark.slurm
@pytest.mark.slow
def test_real_slurm_torchrun_stage_stops_on_both_ranks_and_is_requeued(slurm_cluster, tmp_path, monkeypatch):
    """sft under torchrun with 2 ranks in a real Slurm job (srun -> pipeline.launch -> torchrun): SIGUSR1 to the
    batch shell reaches both ranks through the stop file, both stop at one step; torchrun reports 1, not 75,
    and the script requeues on the stage's manifest instead; the job resumes and ends with the weights of an
    uninterrupted local torchrun run."""
    monkeypatch.delenv(ENTRY_ENV, raising=False)
    steps = ["stages=[sft]", "sft.train.max_steps=40", "sft.train.save_steps=1000", "logging.progress_bar=false",
             "launch.launcher=torchrun", "launch.nproc_per_node=2", "sft.train.per_device_batch_size=4",
             "slurm.cpus_per_task=2"]
    interrupted = [f"output_root={tmp_path / 'slurm'}", "run_name=t", *steps]
    (job,) = slurm_pipeline("configs/tiny.yaml", interrupted, do_submit=True, env=dict(os.environ),
                            out=lambda line: None)
    cfg = load_config("configs/tiny.yaml", interrupted)
    _interrupt_and_requeue(job["job_id"], cfg.stage_dir("sft"), ["scancel", "--signal=USR1", "--batch", job["job_id"]])
    stop = read_manifest(cfg.stage_dir("sft"))
    assert stop["interrupted_by"] == f"stop request (SIGUSR1 to the batch script of job {job['job_id']})", stop
    assert stop["stopped_at_step"] == stop["resume_step"] >= 3
    log = Path(job["log"]).read_text()
    assert "-m torch.distributed.run --nproc_per_node 2 --standalone" in log
    stage_log = (cfg.stage_dir("sft") / "stage.log").read_text()
    assert "the stage stopped with a checkpoint (exit 1): requeueing" in stage_log
    states = _wait([job["job_id"]], timeout=300)
    assert states[job["job_id"]]["JobState"] == "COMPLETED", (states, Path(job["log"]).read_text()[-3000:])
    manifest = read_manifest(cfg.stage_dir("sft"))
    assert manifest["status"] == "complete" and manifest["resumed"] is True and manifest["metrics"]["world_size"] == 2

    from pipeline.orchestrator import run_pipeline

    straight = [f"output_root={tmp_path / 'local'}", "run_name=t", *steps]
    run_pipeline("configs/tiny.yaml", straight, echo=False, report=False, out=lambda line: None)
    a = saved_weights(cfg.stage_dir("sft") / "model")
    b = saved_weights(load_config("configs/tiny.yaml", straight).stage_dir("sft") / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
