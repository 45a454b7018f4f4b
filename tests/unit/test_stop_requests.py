"""Stop requests without a model (pipeline/preemption.py, the launch side of pipeline/launch.py): time limits,
deadlines, the margin, the signal handler's two modes, the stop file, Slurm host lists and the rendezvous a
node of a Slurm job derives from its environment."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from pipeline import preemption
from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.launch import node_command, parse_hostlist, rendezvous, slurm_port
from pipeline.preemption import (
    STOP_FILE,
    StageInterrupted,
    StopRequest,
    deadline_from,
    format_time_limit,
    parse_time_limit,
    stop_margin,
)


# ------------------------------------------------------------------------------------------ time limits
@pytest.mark.parametrize("value, seconds", [
    ("01:30:00", 5400), ("1:30:00", 5400), (90, 5400), ("90", 5400), ("90:30", 5430), ("1-12", 129600),
    ("1-12:30", 131400), ("2-00:00:05", 172805), ("0:45", 45),
])
def test_time_limit_forms_are_slurms(value, seconds):
    assert parse_time_limit(value) == seconds


@pytest.mark.parametrize("value", ["1:2:3:4", "abc", "01:30:00x", 0, "00:00", -5, True, "1-", ""])
def test_bad_time_limits_say_the_forms(value):
    with pytest.raises(ValueError, match="time limit"):
        parse_time_limit(value)


def test_format_time_limit_round_trips():
    for seconds in (45, 5400, 93784, 172805):
        assert parse_time_limit(format_time_limit(seconds)) == seconds
    assert format_time_limit(5400) == "01:30:00" and format_time_limit(93784) == "1-02:03:04"


def test_time_limit_config_key(tmp_path):
    """Validated with the key named; a mapping per stage; one limit and slurm.time together are refused; and
    a YAML ``1:30:00`` is the time it looks like, not YAML 1.1's base-60 integer 5400."""
    cfg = load_config("configs/tiny.yaml", ["launch.time_limit=1:30:00"])
    assert cfg.launch.time_limit == "1:30:00" and cfg.launch.time_limit_for("sft") == 5400
    per_stage = load_config("configs/tiny.yaml", ["launch.time_limit={sft: 10, ppo: '1-2'}"])
    assert [per_stage.launch.time_limit_for(s) for s in ("sft", "rm", "ppo")] == [600, None, 93600]
    with pytest.raises(ConfigError, match="launch.time_limit: time limit '1:2:3:4' is not a Slurm time"):
        load_config("configs/tiny.yaml", ["launch.time_limit=1:2:3:4"])
    with pytest.raises(ConfigError, match="launch.time_limit names 'dpo2', not among the run's stages"):
        load_config("configs/tiny.yaml", ["launch.time_limit={sft: 10, dpo2: 3}"])
    with pytest.raises(ConfigError, match="launch.time_limit=90 and slurm.time='02:00:00' both set"):
        load_config("configs/tiny.yaml", ["launch.time_limit=90", "slurm.time=02:00:00"])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("launch: {time_limit: 1:30:00}\n")
    assert RunConfig.model_validate({"launch": {"time_limit": "1:30:00"}}).launch.time_limit_for("sft") == 5400
    assert load_config(yaml_file).launch.time_limit == "1:30:00"


# --------------------------------------------------------------------------------------- deadline, margin
def test_deadline_comes_from_the_job_then_the_limit():
    env = {"ALIGNPIPE_DEADLINE": "2000.5", "SLURM_JOB_END_TIME": "3000"}
    assert deadline_from(env, 60, started=100.0) == (2000.5, "ALIGNPIPE_DEADLINE")
    assert deadline_from({"SLURM_JOB_END_TIME": "3000"}, 60, started=100.0) == (3000.0, "SLURM_JOB_END_TIME")
    assert deadline_from({}, 60, started=100.0) == (160.0, "launch.time_limit")
    assert deadline_from({}, None, started=100.0) == (None, "")
    with pytest.raises(ValueError, match="ALIGNPIPE_DEADLINE='soon' must be epoch seconds"):
        deadline_from({"ALIGNPIPE_DEADLINE": "soon"}, None, 0.0)


def test_margin_is_a_step_and_a_checkpoint_with_half_again_never_below_the_floor():
    assert stop_margin(60, 10, 20) == 60  # 1.5 x 30 = 45 < the floor
    assert stop_margin(60, 30, 20) == 75  # 1.5 x (30 + 20)
    assert stop_margin(0, 4, None) == 12  # no checkpoint timed yet: taken to cost a step


# ---------------------------------------------------------------------------------------- the request
def test_signal_interrupts_until_a_loop_polls_then_waits_for_the_boundary(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    request = StopRequest(tmp_path)
    request.install()
    try:
        with pytest.raises(StageInterrupted, match="SIGUSR1"):  # loading: nothing to save, stop at once
            os.kill(os.getpid(), signal.SIGUSR1)
        assert request.received is None
        request.begin_graceful()
        os.kill(os.getpid(), signal.SIGTERM)  # training: recorded, acted on at the step boundary
        assert request.received == "SIGTERM" and request.pending(60.0) == (3, "SIGTERM")
    finally:
        request.restore()
    assert {s: signal.getsignal(s) for s in before} == before


def test_stop_file_and_deadline_urgencies(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(preemption, "clock", lambda: now[0])
    request = StopRequest(tmp_path, deadline=1100.0, deadline_source="launch.time_limit", margin_floor_s=30)
    assert request.pending(60.0) == (0, "")
    now[0] = 1050.0  # 50 s left, margin 60
    assert request.pending(60.0) == (1, "time limit (50 s left by launch.time_limit, margin 60 s)")
    (tmp_path / STOP_FILE).write_text("SIGUSR1 to the batch script of job 7\n")
    assert request.pending(60.0) == (2, "stop request (SIGUSR1 to the batch script of job 7)")
    request.clear_file()
    assert not (tmp_path / STOP_FILE).exists() and request.pending(10.0) == (0, "")


# ------------------------------------------------------------------------------------ Slurm host lists
HOSTLISTS = {
    "node[01-03,07]": ["node01", "node02", "node03", "node07"],
    "a1,b[2-3]": ["a1", "b2", "b3"],
    "x[9-11],y": ["x9", "x10", "x11", "y"],
    "rack[1-2]-n[08-09]": ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"],
    "gpu-a100-[1-2]": ["gpu-a100-1", "gpu-a100-2"],
    "solo": ["solo"],
}


@pytest.mark.parametrize("hostlist", list(HOSTLISTS))
def test_hostlist_parser(hostlist):
    assert parse_hostlist(hostlist) == HOSTLISTS[hostlist]


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="no scontrol on PATH to compare with")
def test_hostlist_parser_agrees_with_scontrol():
    for hostlist, hosts in HOSTLISTS.items():
        done = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and done.stdout.split() == hosts, hostlist


@pytest.mark.parametrize("bad", ["node[01-", "node[a-b]", "node[3-1]", ""])
def test_bad_hostlists(bad):
    with pytest.raises(ConfigError, match="host list"):
        parse_hostlist(bad)


# ------------------------------------------------------------------------------- a node of a Slurm job
TWO_NODES = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NODEID": "1"}


def _cfg(launcher: str, **slurm) -> RunConfig:
    return RunConfig.model_validate({"run_name": "r", "launch": {"launcher": launcher, "nproc_per_node": 4},
                                     "slurm": {"nodes": 2, **slurm}})


def test_torchrun_command_on_the_second_node_of_a_simulated_two_node_job(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no scontrol: the host list parser
    cmd = node_command(_cfg("torchrun"), "ppo", "/runs/c.json", TWO_NODES, python="/py")
    assert cmd == ["/py", "-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "2",
                   "--rdzv_backend", "c10d", "--rdzv_endpoint", "node1:24242", "--rdzv_id", "r-ppo",
                   "-m", "stages", "ppo", "--config", "/runs/c.json"]
    static = RunConfig.model_validate({"run_name": "r", "launch": {"launcher": "torchrun", "nproc_per_node": 4,
                                                                   "rdzv_backend": "static"}})
    assert node_command(static, "sft", "/c.json", TWO_NODES, python="/py") == [
        "/py", "-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "2", "--node_rank", "1",
        "--master_addr", "node1", "--master_port", "24242", "-m", "stages", "sft", "--config", "/c.json"]
    assert node_command(_cfg("deepspeed"), "rm", "/c.json", TWO_NODES, python="/py") == [
        "/py", "-m", "deepspeed.launcher.runner", "--num_gpus", "4", "--master_addr", "node1", "--master_port",
        "24242", "--num_nodes", "2", "--node_rank", "1", "--no_ssh", "--no_local_rank", "--module", "stages", "rm",
        "--config", "/c.json"]


def test_rendezvous_precedence_inside_a_job():
    """config > MASTER_ADDR/MASTER_PORT > the job (first host, port from the id) > defaults; one node keeps
    torchrun's --standalone but takes the job's port (deepspeed: two jobs on one node must not collide)."""
    job = rendezvous(_cfg("torchrun"), TWO_NODES)
    assert (job.master_addr, job.master_port, job.nnodes, job.node_rank, job.explicit_addr) == (
        "node1", 24242, 2, 1, True)
    exported = rendezvous(_cfg("torchrun"), {**TWO_NODES, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "31000"})
    assert (exported.master_addr, exported.master_port) == ("10.0.0.9", 31000)
    pinned = RunConfig.model_validate({"run_name": "r", "launch": {"launcher": "torchrun", "master_addr": "head",
                                                                   "master_port": 1234}})
    assert (rendezvous(pinned, TWO_NODES).master_addr, rendezvous(pinned, TWO_NODES).master_port) == ("head", 1234)
    one_node = rendezvous(_cfg("torchrun"), {"SLURM_JOB_ID": "17", "SLURM_JOB_NODELIST": "vm",
                                             "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0"})
    assert (one_node.explicit_addr, one_node.master_port) == (False, slurm_port(17))
    assert [slurm_port(j) for j in (0, 4242, 14242, 9999)] == [20000, 24242, 24242, 29999]
