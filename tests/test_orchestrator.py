"""Orchestrator, CLI and launcher tests.

Chaining, skip/force/resume and the parent checks run fake stages (``tests/fake_stages.py``: real
config loading and StageRun manifests, no torch) through the real launcher in separate processes. The
end-to-end test at the bottom chains the real stages on configs/tiny.yaml.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.launch import (
    ENTRY_ENV,
    Rendezvous,
    deepspeed_command,
    local_command,
    rendezvous,
    stage_command,
    stage_env,
    torchrun_command,
)
from pipeline.manifest import ManifestError, read_manifest, write_manifest
from pipeline.orchestrator import StageFailed, format_status, run_pipeline
from pipeline.plan import decide
from pipeline.procs import process_state
from tests.helpers.common import write_config

REPO = Path(__file__).resolve().parent.parent

FAKE_KNOBS = ("FAKE_STEPS", "FAKE_SLEEP", "FAKE_FAIL", "FAKE_CRASH", "FAKE_FINGERPRINT_SFT", "FAKE_FINGERPRINT_RM",
              "FAKE_FINGERPRINT_PPO")


@pytest.fixture
def fake(monkeypatch):
    """Stage processes run tests/fake_stages.py; no fake knob leaks in from the environment."""
    monkeypatch.setenv(ENTRY_ENV, "tests.fake_stages")
    for knob in FAKE_KNOBS:
        monkeypatch.delenv(knob, raising=False)
    return monkeypatch


def run(config: Path, *overrides: str, **kwargs):
    kwargs.setdefault("echo", False)
    kwargs.setdefault("report", False)
    kwargs.setdefault("out", lambda line: None)
    return run_pipeline(config, list(overrides), **kwargs)


def actions(result) -> dict[str, str]:
    return {d.stage: d.action for d in result.decisions}


def manifest(config: Path, stage: str) -> dict:
    cfg = load_config(config)
    return read_manifest(cfg.stage_dir(stage))


# ------------------------------------------------------------------------------------------ chaining
def test_chain_skip_and_force(fake, tmp_path):
    config = write_config(tmp_path)
    first = run(config)
    assert actions(first) == {"sft": "run", "rm": "run", "ppo": "run"}
    cfg = load_config(config)
    for stage in ("sft", "rm", "ppo"):
        m = read_manifest(cfg.stage_dir(stage))
        assert m["status"] == "complete"
        assert (cfg.stage_dir(stage) / "model" / "weights.txt").exists()
        assert "[fake " + stage + "]" in (cfg.stage_dir(stage) / "stage.log").read_text()
    resolved = json.loads((cfg.run_dir() / "config.resolved.json").read_text())
    assert resolved["run_name"] == "r" and resolved["stages"] == ["sft", "rm", "ppo"]
    # stages ran in order: each child started after its parent finished
    ms = {s: read_manifest(cfg.stage_dir(s)) for s in ("sft", "rm", "ppo")}
    assert ms["sft"]["metrics"]["finished_at"] <= ms["rm"]["started_at"]
    assert ms["rm"]["metrics"]["finished_at"] <= ms["ppo"]["started_at"]

    second = run(config)
    assert actions(second) == {"sft": "skip", "rm": "skip", "ppo": "skip"}
    assert read_manifest(cfg.stage_dir("sft"))["started_at"] == ms["sft"]["started_at"]

    # --force re-runs only what is asked; the children see new inputs and re-run on the next plain run
    forced = run(config, stages=["rm"], force=True)
    assert actions(forced) == {"rm": "run"}
    assert read_manifest(cfg.stage_dir("rm"))["started_at"] > ms["rm"]["started_at"]
    third = run(config)
    assert actions(third) == {"sft": "skip", "rm": "skip", "ppo": "run"}
    assert "inputs changed" in third.decisions[2].reason


def test_config_change_reruns_stage_and_children(fake, tmp_path):
    config = write_config(tmp_path)
    run(config)
    changed = run(config, "sft.train.learning_rate=0.5")
    assert actions(changed) == {"sft": "run", "rm": "run", "ppo": "run"}
    assert "config changed" in changed.decisions[0].reason
    assert "inputs changed" in changed.decisions[1].reason
    # a change in the rm section leaves sft alone
    again = run(config, "sft.train.learning_rate=0.5", "rm.train.learning_rate=0.01")
    assert actions(again) == {"sft": "skip", "rm": "run", "ppo": "run"}


def test_resume_after_hard_crash(fake, tmp_path):
    config = write_config(tmp_path)
    fake.setenv("FAKE_STEPS", "4")
    fake.setenv("FAKE_CRASH", "rm:3")
    with pytest.raises(StageFailed) as err:
        run(config)
    assert err.value.stage == "rm" and err.value.returncode == 3
    assert str(err.value.log_path).endswith("rm/stage.log") and "crashing hard" in err.value.log_path.read_text()
    m = manifest(config, "rm")
    assert m["status"] == "running" and process_state(m) == "dead"
    assert manifest(config, "ppo") is None  # the chain stopped

    fake.delenv("FAKE_CRASH")
    cfg = load_config(config)
    assert decide(cfg, "rm").action == "resume"
    result = run(config)
    assert actions(result) == {"sft": "skip", "rm": "resume", "ppo": "run"}
    m = manifest(config, "rm")
    assert m["status"] == "complete" and m["resumed"] is True
    assert m["metrics"]["resumed_from"] == 2  # steps 1-2 were checkpointed before the crash
    log = (cfg.stage_dir("rm") / "stage.log").read_text()
    assert "crashing hard" in log and "starting at step 2 (resuming=True)" in log  # appended, not truncated


def test_ctrl_c_then_resume(fake, tmp_path):
    """Ctrl-C (SIGINT to the process group) during a stage: exit 130, then the same command resumes it."""
    import signal

    config = write_config(tmp_path)
    env = {**os.environ, "FAKE_STEPS": "6", "FAKE_SLEEP": "0.5"}
    # as from a terminal: a test run started in the background (`make test &`) inherits SIGINT ignored, which
    # Python and every child would keep
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config), "--no-report"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    rm_log = load_config(config).stage_dir("rm") / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (rm_log.exists() and len(rm_log.read_text().splitlines()) >= 2):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "interrupted: re-run the same command to resume" in err
    m = manifest(config, "rm")
    assert m["status"] in ("interrupted", "running")  # Ctrl-C is an interruption, not a failure of the stage
    result = run(config)
    assert actions(result)["sft"] == "skip" and actions(result)["rm"] in ("rerun", "resume")
    assert manifest(config, "rm")["metrics"]["resumed_from"] >= 2


def test_failed_stage_stops_chain_and_reruns(fake, tmp_path):
    config = write_config(tmp_path)
    fake.setenv("FAKE_FAIL", "rm")
    with pytest.raises(StageFailed) as err:
        run(config)
    message = str(err.value)
    assert "stage 'rm' failed" in message and "fake failure in stage rm" in message
    assert str(load_config(config).stage_dir("rm") / "stage.log") in message
    assert manifest(config, "rm")["status"] == "failed" and manifest(config, "ppo") is None
    fake.delenv("FAKE_FAIL")
    result = run(config)
    assert actions(result) == {"sft": "skip", "rm": "rerun", "ppo": "run"}


def test_refuses_stage_running_in_live_process(fake, tmp_path):
    config = write_config(tmp_path)
    cfg = load_config(config)
    write_manifest(cfg.stage_dir("sft"), {"stage": "sft", "status": "running", "pid": os.getpid(),
                                          "host": socket.gethostname(), "started_at": time.time()})
    with pytest.raises(ManifestError, match=r"stage 'sft' is already running \(pid"):
        run(config)
    # another host's running stage cannot be checked: refused unless --force
    write_manifest(cfg.stage_dir("sft"), {"stage": "sft", "status": "running", "pid": 1, "host": "elsewhere",
                                          "started_at": time.time()})
    with pytest.raises(ManifestError, match="on another host"):
        run(config)
    assert decide(cfg, "sft", force=True).action == "run"


def test_second_orchestrator_on_same_run_is_refused(fake, tmp_path):
    from pipeline.procs import RunLock

    config = write_config(tmp_path)
    with RunLock(load_config(config).run_dir()):
        with pytest.raises(ManifestError, match=r"another `pipeline run` is driving .* \(pid "):
            run(config)
    assert actions(run(config, stages=["sft"])) == {"sft": "run"}  # released


def test_pid_reuse_counts_as_dead(tmp_path):
    # pid 1 exists but started long before this manifest was written
    m = {"status": "running", "pid": 1, "host": socket.gethostname(), "started_at": time.time()}
    assert process_state(m) in ("dead", "alive")  # pid 1 may be older than the manifest: alive is fine
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        old = {"status": "running", "pid": proc.pid, "host": socket.gethostname(), "started_at": time.time() - 3600}
        assert process_state(old) == "dead"  # a process younger than the manifest is not the stage
        fresh = {**old, "started_at": time.time()}
        assert process_state(fresh) == "alive"
    finally:
        proc.kill()
        proc.wait()
    assert process_state({**fresh}) == "dead"


def test_refuses_incomplete_parent(fake, tmp_path):
    """Strict mode (``--no-parents``, ``ONLY=1``): a stage whose parent is not complete is refused."""
    config = write_config(tmp_path)
    with pytest.raises(ManifestError) as err:
        run(config, stages=["rm"], parents=False)
    assert "cannot start stage 'rm'" in str(err.value) and "'sft'" in str(err.value)
    assert "does not exist" in str(err.value)
    cfg = load_config(config)
    write_manifest(cfg.stage_dir("sft"), {"stage": "sft", "status": "failed", "pid": 0, "host": "x"})
    with pytest.raises(ManifestError, match="status='failed'"):
        run(config, stages=["rm"], parents=False)
    assert main(["run", str(config), "--no-report", "--quiet", "--no-parents", "--stages", "rm"]) == 2


def test_requested_stage_runs_missing_parents_first(fake, tmp_path):
    """``make ppo`` on a fresh run builds sft and rm first, says so; complete parents are skipped, an
    interrupted one resumes, and ``--force`` re-runs only what was asked."""
    config = write_config(tmp_path)
    lines: list[str] = []
    first = run(config, stages=["ppo"], out=lines.append)
    assert [d.stage for d in first.decisions] == ["sft", "rm", "ppo"]
    assert actions(first) == {"sft": "run", "rm": "run", "ppo": "run"}
    assert any(line.startswith("[sft] added: 'ppo' needs it and it is not run") for line in lines)
    assert any(line.startswith("[rm] added: 'ppo' needs it and it is not run") for line in lines)
    # everything complete: only the requested stage is looked at
    assert actions(run(config, stages=["ppo"])) == {"ppo": "skip"}
    # rm interrupted by a hard crash: `make ppo` resumes rm (not forced, even with --force), then re-runs ppo
    fake.setenv("FAKE_STEPS", "4")
    fake.setenv("FAKE_CRASH", "rm:3")
    with pytest.raises(StageFailed):
        run(config, stages=["rm"], force=True)
    fake.delenv("FAKE_CRASH")
    again = run(config, stages=["ppo"], force=True)
    assert actions(again) == {"rm": "resume", "ppo": "run"}
    assert manifest(config, "rm")["metrics"]["resumed_from"] == 2
    assert "--force" in again.decisions[1].reason
    # the CLI does the same
    (tmp_path / "cli").mkdir()
    config2 = write_config(tmp_path / "cli")
    assert main(["run", str(config2), "--no-report", "--quiet", "--stages", "rm"]) == 0
    assert manifest(config2, "sft")["status"] == "complete" and manifest(config2, "ppo") is None


def test_refuses_fingerprint_mismatch(fake, tmp_path):
    config = write_config(tmp_path)
    run(config, stages=["sft", "rm"])
    cfg = load_config(config)
    # the orchestrator's own pre-check: ppo's two parents disagree
    rm_manifest = read_manifest(cfg.stage_dir("rm"))
    rm_manifest["chat_fingerprint"] = "a-different-tokenizer"
    write_manifest(cfg.stage_dir("rm"), rm_manifest)
    with pytest.raises(ManifestError) as err:
        run(config, stages=["ppo"])
    assert "cannot start stage 'ppo'" in str(err.value) and "fingerprints differ" in str(err.value)
    assert manifest(config, "ppo") is None  # never launched
    # the stage's own check (StageRun.set_chat_format): rm's chat format differs from sft's
    fake.setenv("FAKE_FINGERPRINT_RM", "changed-template")
    with pytest.raises(StageFailed) as failed:
        run(config, stages=["rm"], force=True)
    assert "chat format in force differs from the 'sft' stage" in str(failed.value)


def test_stages_outside_config_are_added(fake, tmp_path):
    config = write_config(tmp_path, "stages: [sft, rm]\n")
    cfg = load_config(config)
    from pipeline.plan import select_stages

    assert select_stages(cfg, ["ppo", "sft"]) == ["sft", "ppo"]
    assert cfg.stages == ["sft", "rm", "ppo"]
    with pytest.raises(ConfigError, match="unknown stage"):
        select_stages(cfg, ["no_such_stage"])


def test_status_shows_state_and_staleness(fake, tmp_path):
    config = write_config(tmp_path)
    fake.setenv("FAKE_FAIL", "ppo")
    with pytest.raises(StageFailed):
        run(config)
    text = format_status(load_config(config))
    assert "sft          complete" in text and "up to date" in text and "loss=1" in text
    assert "ppo          failed" in text and "fake failure" in text
    stale = format_status(load_config(config, ["sft.train.learning_rate=0.3"]))
    assert "stale: config changed" in stale and "stale: parent sft will re-run" in stale


def test_run_writes_report(fake, tmp_path):
    config = write_config(tmp_path)
    lines: list[str] = []
    result = run(config, report=True, out=lines.append)
    assert result.report == load_config(config).run_dir() / "report.md" and result.report.exists()
    assert any(line.startswith("report: ") for line in lines)
    assert any("memory" in line.lower() or "per device" in line for line in lines)  # the plan is printed


def test_real_launch_under_torchrun(fake, tmp_path):
    """torchrun with 2 ranks really starts the stage twice; rank 0 owns the manifest."""
    config = write_config(tmp_path, "stages: [sft]\nlaunch: {launcher: torchrun, nproc_per_node: 2}\n")
    result = run(config)
    assert actions(result) == {"sft": "run"}
    log = (load_config(config).stage_dir("sft") / "stage.log").read_text()
    assert "rank 0/2" in log and "rank 1/2" in log
    assert manifest(config, "sft")["status"] == "complete"


@pytest.mark.distributed
def test_real_launch_under_deepspeed_launcher(fake, tmp_path):
    """The deepspeed launcher (--module, --no_local_rank) starts 2 ranks on CPU (DS_ACCELERATOR=cpu)."""
    config = write_config(tmp_path, "stages: [sft]\nlaunch: {launcher: deepspeed, nproc_per_node: 2}\n")
    result = run(config)
    assert actions(result) == {"sft": "run"}
    log = (load_config(config).stage_dir("sft") / "stage.log").read_text()
    assert "rank 0/2" in log and "rank 1/2" in log and "--no_local_rank" in log
    assert manifest(config, "sft")["status"] == "complete"


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_config_errors_are_clear(fake, tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["run", str(config), "sft.train.learing_rate=1e-4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown key 'sft.train.learing_rate'" in err
    assert "did you mean 'sft.train.learning_rate'" in err and "Traceback" not in err

    assert main(["run", str(config), "sft.train.max_steps=lots"]) == 2
    assert "sft.train.max_steps" in capsys.readouterr().err

    assert main(["status", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err

    assert main(["run", str(config), "--stages", "no_such_stage"]) == 2
    assert "unknown stage(s) no_such_stage" in capsys.readouterr().err

    assert main(["run", str(config), "not-an-override"]) == 2
    assert "override 'not-an-override' is not of the form key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(config), "--force", "not-an-override"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: not-an-override" in capsys.readouterr().err


def test_cli_overrides_anywhere_and_exit_codes(fake, tmp_path, capsys):
    config = write_config(tmp_path)
    # overrides after --stages and after options
    assert main(["run", str(config), "--no-report", "--quiet", "--stages", "sft", "run_name=cli"]) == 0
    out = capsys.readouterr().out
    assert "[sft] run" in out and str(tmp_path / "out" / "cli") in out
    assert main(["status", str(config), "run_name=cli"]) == 0
    assert "sft          complete" in capsys.readouterr().out
    fake.setenv("FAKE_FAIL", "rm")
    assert main(["run", str(config), "--no-report", "--quiet", "run_name=cli"]) == 1
    err = capsys.readouterr().err
    assert "error: stage 'rm' failed" in err and "stage.log" in err


def test_cli_entry_point_exit_code(tmp_path):
    """`python -m pipeline` exits 2 with one line for a bad config, no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: {trian: {}}\n")
    done = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "error:" in done.stderr and "unknown key 'sft.trian'" in done.stderr and "Traceback" not in done.stderr


def test_cli_validate_prints_memory_plan(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["validate", str(config)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "per device" in out and out.strip().endswith("ok")


def test_cli_validate_refuses_infeasible_memory_plan(tmp_path, capsys):
    config = write_config(tmp_path, "launch: {gpu_memory_gib: 0.001}\n")
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not fit" in err


def test_cli_serve_needs_checkpoint(capsys):
    assert main(["serve"]) == 2
    assert "serve needs a checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ launchers
def _cfg(**launch) -> RunConfig:
    return RunConfig.model_validate({"run_name": "r", "launch": launch})


def test_local_command():
    cmd = local_command("sft", "/x/config.resolved.json", python="/py", env={})
    assert cmd == ["/py", "-m", "stages", "sft", "--config", "/x/config.resolved.json"]
    assert stage_command(_cfg(), "rm", "c.json", python="/py", env={})[:4] == ["/py", "-m", "stages", "rm"]
    assert local_command("sft", "c.json", python="/py", env={ENTRY_ENV: "tests.fake_stages"})[2] == "tests.fake_stages"
    with pytest.raises(ConfigError, match="launch.launcher='local' starts one process"):
        stage_command(_cfg(nproc_per_node=2), "sft", "c.json", env={})
    with pytest.raises(ConfigError, match="not a Python module name"):
        local_command("sft", "c.json", env={ENTRY_ENV: "rm -rf /"})


def test_torchrun_command_single_and_multi_node():
    single = torchrun_command(_cfg(launcher="torchrun", nproc_per_node=4), "sft", "c.json", python="/py", env={})
    assert single == ["/py", "-m", "torch.distributed.run", "--nproc_per_node", "4", "--standalone",
                      "-m", "stages", "sft", "--config", "c.json"]
    multi = torchrun_command(_cfg(launcher="torchrun", nproc_per_node=8, nnodes=2, master_addr="node1",
                                  master_port=1234), "ppo", "c.json", python="/py", env={})
    assert multi == ["/py", "-m", "torch.distributed.run", "--nproc_per_node", "8", "--nnodes", "2",
                     "--rdzv_backend", "c10d", "--rdzv_endpoint", "node1:1234", "--rdzv_id", "r-ppo",
                     "-m", "stages", "ppo", "--config", "c.json"]
    # from the environment (inside a Slurm allocation): config defaults give way to the env
    env = {"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29600", "SLURM_JOB_NUM_NODES": "3", "SLURM_NODEID": "2"}
    from_env = torchrun_command(_cfg(launcher="torchrun", nproc_per_node=2), "sft", "c.json", python="/py", env=env)
    assert from_env[from_env.index("--nnodes") + 1] == "3"
    assert from_env[from_env.index("--rdzv_endpoint") + 1] == "10.0.0.5:29600"
    static = torchrun_command(_cfg(launcher="torchrun", nproc_per_node=2, rdzv_backend="static"), "sft", "c.json",
                              python="/py", env=env)
    assert static[static.index("--node_rank") + 1] == "2" and static[static.index("--master_addr") + 1] == "10.0.0.5"
    # explicit config beats the environment
    pinned = rendezvous(_cfg(nnodes=2, master_port=1111), env)
    assert (pinned.nnodes, pinned.master_port, pinned.node_rank) == (2, 1111, 2)
    with pytest.raises(ConfigError, match="MASTER_PORT"):
        rendezvous(_cfg(), {"MASTER_PORT": "abc"})


def test_deepspeed_command():
    single = deepspeed_command(_cfg(launcher="deepspeed", nproc_per_node=2), "sft", "c.json", python="/py", env={})
    assert single == ["/py", "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1",
                      "--master_port", "29500", "--no_local_rank", "--module", "stages", "sft", "--config", "c.json"]
    rdzv = Rendezvous("$MASTER_ADDR", "$MASTER_PORT", 2, "$SLURM_NODEID", True)
    multi = deepspeed_command(_cfg(launcher="deepspeed", nproc_per_node=4, nnodes=2), "rm", "c.json", python="/py",
                              env={}, rdzv=rdzv)
    assert multi[multi.index("--num_nodes") + 1] == "2" and "--no_ssh" in multi
    assert multi[multi.index("--node_rank") + 1] == "$SLURM_NODEID"


def test_stage_env():
    env = stage_env(_cfg(), {"PYTHONPATH": "/other"}, cpu=True)
    assert env["DS_ACCELERATOR"] == "cpu"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/other"]
    assert "DS_ACCELERATOR" not in stage_env(_cfg(), {}, cpu=False)


# ------------------------------------------------------------------------------------ real stages (e2e)
@pytest.mark.slow
def test_end_to_end_tiny(tmp_path, monkeypatch):
    """The real stages on configs/tiny.yaml, each in its own process: chain, skip, report."""
    import importlib.util

    monkeypatch.delenv(ENTRY_ENV, raising=False)
    stages = [s for s, mod in (("sft", "stages.sft"), ("rm", "stages.rm"), ("ppo", "stages.ppo.trainer"))
              if importlib.util.find_spec(mod) is not None]
    assert stages[:2] == ["sft", "rm"], "stages/sft.py and stages/rm.py are needed"
    overrides = [f"output_root={tmp_path}", "sft.train.max_steps=6", "rm.train.max_steps=6",
                 "ppo.total_episodes=32", f"stages=[{','.join(stages)}]"]
    started = time.time()
    result = run_pipeline("configs/tiny.yaml", overrides, echo=False, report=True, out=lambda line: None)
    assert [d.action for d in result.decisions] == ["run"] * len(stages)
    cfg = load_config("configs/tiny.yaml", overrides)
    for stage in stages:
        m = read_manifest(cfg.stage_dir(stage))
        assert m["status"] == "complete", (stage, m.get("error"))
    assert read_manifest(cfg.stage_dir("rm"))["parents"]["sft"]["hash"]
    again = run_pipeline("configs/tiny.yaml", overrides, echo=False, report=False, out=lambda line: None)
    assert [d.action for d in again.decisions] == ["skip"] * len(stages)
    report = result.report.read_text()
    assert "![SFT loss]" in report and "## Reward model" in report and "not run" not in report
    if "ppo" in stages:
        assert "![PPO curves]" in report and "reward model (rm stage)" in report
    print(f"end-to-end {stages}: {time.time() - started:.1f} s")
