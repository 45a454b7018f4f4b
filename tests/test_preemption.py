"""Stopping a training stage on request (pipeline/preemption.py, stages/stopping.py) on the tiny model: a
real SIGTERM or SIGUSR1 mid-run makes SFT and PPO finish the step they are in, checkpoint at that step
(``save_steps`` is larger than the run, so that checkpoint is the only one), record ``interrupted`` and exit
with code 75; started again they resume from it and end with the weights of an uninterrupted run, bit for
bit. A time limit near its end does the same, in as many pieces as it takes; two ranks stop at one step
when only one of them is told. The real-Slurm version of this is in tests/test_slurm.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import preemption
from pipeline.manifest import read_manifest
from pipeline.preemption import STOP_EXIT_CODE, STOP_FILE, StageStopped
from tests.helpers.common import saved_weights, train_rows

REPO = Path(__file__).resolve().parent.parent
SFT_STEPS = ("sft.train.max_steps=12", "sft.train.save_steps=1000")
PPO_ARGS = ("stages=[ppo]", "ppo.policy_from=base", "ppo.max_new_tokens=8", "ppo.total_episodes=64",
            "ppo.train.save_steps=1000",
            "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction'}]")


def _bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differing, f"weights differ from the uninterrupted run's: {differing[:5]}"


def _stopped_manifest(stage_dir: Path, step: int, reason: str, earlier: tuple[int, ...] = ()) -> dict:
    """The manifest of a stage stopped after ``step``: interrupted, resumable from a checkpoint at that step;
    besides it only the checkpoints of ``earlier`` stops (save_steps is larger than the run)."""
    manifest = read_manifest(stage_dir)
    assert manifest["status"] == "interrupted" and manifest["interrupted_by"].startswith(reason), manifest
    assert manifest["stopped_at_step"] == manifest["resume_step"] == step
    kept = sorted(p.name for p in (stage_dir / "checkpoints").iterdir())
    assert kept == sorted(["latest", f"step-{step}", *(f"step-{s}" for s in earlier[-1:])]), kept
    assert (stage_dir / "checkpoints" / "latest").read_text() == f"step-{step}"
    return manifest


@pytest.fixture(scope="module")
def straight_sft(tmp_path_factory):
    """Weights of the uninterrupted 12-step SFT run (in this process)."""
    from pipeline.config import load_config
    from stages import sft

    root = tmp_path_factory.mktemp("straight")
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"output_root={root}", "logging.progress_bar=false", "run_name=straight", *SFT_STEPS])
    sft.run(cfg)
    return saved_weights(cfg.stage_dir("sft") / "model")


def _signal_after_step(monkeypatch, step: int, signum: int) -> None:
    """Send ``signum`` to this process once the engine has finished optimizer step ``step`` (its log row)."""
    from stages.engine import Engine

    original = Engine._after_step

    def after_step(self, row, bar):
        original(self, row, bar)
        if self.global_step == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(Engine, "_after_step", after_step)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_stops_sft_at_the_step_and_resume_is_bit_equal(signum, tiny_cfg, monkeypatch, straight_sft):
    from stages import sft

    cfg = tiny_cfg("run_name=signalled", *SFT_STEPS)
    before = signal.getsignal(signum)
    with monkeypatch.context() as patch:
        _signal_after_step(patch, 5, signum)
        with pytest.raises(StageStopped) as stopped:
            sft.run(cfg)
    assert stopped.value.step == 5
    _stopped_manifest(cfg.stage_dir("sft"), 5, signal.Signals(signum).name)
    assert signal.getsignal(signum) == before  # the stage's handler is gone: the one before it is back
    sft.run(cfg)
    manifest = read_manifest(cfg.stage_dir("sft"))
    assert manifest["status"] == "complete" and manifest["resumed"] is True
    assert [r["step"] for r in train_rows(cfg.stage_dir("sft"), "loss")] == list(range(1, 13))
    _bit_equal(saved_weights(cfg.stage_dir("sft") / "model"), straight_sft)


def test_stop_file_stops_sft_like_a_signal(tiny_cfg, monkeypatch, straight_sft):
    """The batch script's way of asking (the file in the stage folder): the same stop, and the file is gone."""
    from stages import sft
    from stages.engine import Engine

    cfg = tiny_cfg("run_name=file", *SFT_STEPS)
    original = Engine._after_step

    def after_step(self, row, bar):
        original(self, row, bar)
        if self.global_step == 3:
            (cfg.stage_dir("sft") / STOP_FILE).write_text("SIGUSR1 to the batch script of job 7\n")

    monkeypatch.setattr(Engine, "_after_step", after_step)
    with pytest.raises(StageStopped):
        sft.run(cfg)
    _stopped_manifest(cfg.stage_dir("sft"), 3, "stop request (SIGUSR1 to the batch script of job 7)")
    assert not (cfg.stage_dir("sft") / STOP_FILE).exists()
    monkeypatch.undo()
    sft.run(cfg)
    _bit_equal(saved_weights(cfg.stage_dir("sft") / "model"), straight_sft)


def test_sigterm_stops_ppo_after_the_rollout_and_update_and_resume_is_bit_equal(tiny_cfg):
    from stages.ppo import trainer

    straight = tiny_cfg(*PPO_ARGS, "run_name=straight")
    trainer.run(straight)
    cfg = tiny_cfg(*PPO_ARGS, "run_name=signalled")

    def sigterm_at_step_2(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # during step 4 (bookkeeping) of PPO step 2

    with pytest.raises(StageStopped) as stopped:
        trainer.run(cfg, on_step_end=sigterm_at_step_2)
    assert stopped.value.step == 2
    _stopped_manifest(cfg.stage_dir("ppo"), 2, "SIGTERM")
    torch.manual_seed(12345)  # the resumed run must not depend on the process's RNG
    trainer.run(cfg)
    assert read_manifest(cfg.stage_dir("ppo"))["resumed"] is True
    assert [r["step"] for r in train_rows(cfg.stage_dir("ppo"), "score")] == [1, 2, 3, 4]
    _bit_equal(saved_weights(cfg.stage_dir("ppo") / "model"), saved_weights(straight.stage_dir("ppo") / "model"))


def test_time_limit_stops_before_the_deadline_and_the_pieces_add_up(tiny_cfg, monkeypatch, straight_sft):
    """A fake clock on which every reading takes a second: with a 14 s limit and a 6 s floor each run trains a
    few steps, checkpoints when less than the margin is left, and stops; restarted until complete, the
    pieces end with the uninterrupted run's weights."""
    from stages import sft

    now = [1_000_000.0]

    def clock() -> float:
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(preemption, "clock", clock)
    monkeypatch.delenv(preemption.DEADLINE_ENV, raising=False)
    monkeypatch.delenv("SLURM_JOB_END_TIME", raising=False)
    cfg = tiny_cfg("run_name=limited", *SFT_STEPS, "launch.time_limit=00:14", "launch.time_limit_margin_s=6")
    stops = []
    for _ in range(12):
        try:
            sft.run(cfg)
            break
        except StageStopped as stopped:
            manifest = _stopped_manifest(cfg.stage_dir("sft"), stopped.step, "time limit", tuple(stops))
            assert "left by launch.time_limit" in manifest["interrupted_by"]
            stops.append(stopped.step)
    assert read_manifest(cfg.stage_dir("sft"))["status"] == "complete"
    assert len(stops) >= 2 and stops == sorted(set(stops)) and stops[-1] < 12, stops
    _bit_equal(saved_weights(cfg.stage_dir("sft") / "model"), straight_sft)


def test_deadline_already_past_stops_after_one_step(tiny_cfg, monkeypatch):
    """``ALIGNPIPE_DEADLINE`` (what the batch script exports) wins over launch.time_limit."""
    from stages import sft

    monkeypatch.setenv(preemption.DEADLINE_ENV, str(time.time() + 30))  # 30 s left, the floor is 60
    cfg = tiny_cfg("run_name=late", *SFT_STEPS, "launch.time_limit=10:00:00")
    with pytest.raises(StageStopped) as stopped:
        sft.run(cfg)
    assert stopped.value.step == 1
    assert "left by ALIGNPIPE_DEADLINE" in _stopped_manifest(cfg.stage_dir("sft"), 1, "time limit")["interrupted_by"]


@pytest.mark.slow
def test_external_sigterm_to_the_stage_process_exits_75_and_resumes(tmp_path):
    """The stage as a launcher starts it (``python -m stages``), SIGTERM from outside while it trains: exit code
    75, a checkpoint at the step it stopped at; started again, it completes with the uninterrupted weights."""
    steps = ["sft.train.max_steps=150", "sft.train.save_steps=1000", "sft.train.logging_steps=1",
             "logging.progress_bar=false"]

    def command(run_name: str) -> list[str]:
        return [sys.executable, "-m", "stages", "sft", "--config", str(REPO / "configs" / "tiny.yaml"),
                f"output_root={tmp_path}", f"run_name={run_name}", *steps]

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    straight = subprocess.run(command("straight"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    stage = tmp_path / "stopped" / "sft"
    proc = subprocess.Popen(command("stopped"), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(train_rows(stage, "loss") if (stage / "metrics.jsonl").exists() else []) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == STOP_EXIT_CODE, out[-3000:]
    manifest = read_manifest(stage)
    step = manifest["stopped_at_step"]
    assert 3 <= step < 150, out[-2000:]
    _stopped_manifest(stage, step, "SIGTERM")
    resumed = subprocess.run(command("stopped"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_manifest(stage)["resumed"] is True
    _bit_equal(saved_weights(stage / "model"), saved_weights(tmp_path / "straight" / "sft" / "model"))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_stop_at_the_same_step_when_one_is_told(tmp_path):
    """torchrun, 2 ranks (DDP on gloo): only rank 1 gets SIGUSR1, after step 4. The all-reduced stop flag makes
    both stop after step 4 (one checkpoint, both ranks' shares in it); the relaunch completes with the weights
    of an uninterrupted 2-rank run."""
    def launch(run_name: str, signal_at: str | None) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        env.pop("STOP_TEST_SIGNAL_AT", None)
        if signal_at:
            env["STOP_TEST_SIGNAL_AT"] = signal_at
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "tests.helpers.stop_driver", "sft", "--config", str(REPO / "configs" / "tiny.yaml"),
               f"output_root={tmp_path}", f"run_name={run_name}", *SFT_STEPS, "logging.progress_bar=false",
               "launch.launcher=torchrun", "launch.nproc_per_node=2", "sft.train.per_device_batch_size=4"]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    straight = launch("straight", None)
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = launch("stopped", "1:4:SIGUSR1")
    # torchrun reports a failed worker (1), not the 75 of the ranks; the first rank to exit makes it SIGTERM the
    # others, which may have left the stage by then (their part of the checkpoint is written: it ends at a barrier)
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    exit_codes = re.findall(r"exitcode  : (-?\d+)", stopped.stderr)
    assert "75" in exit_codes and set(exit_codes) <= {"75", "-15"}, stopped.stderr[-3000:]
    stage = tmp_path / "stopped" / "sft"
    manifest = _stopped_manifest(stage, 4, "a stop request on another rank")  # rank 0 writes the manifest
    assert manifest["stopped_at_step"] == 4
    resumed = launch("stopped", None)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_manifest(stage)["resumed"] is True
    _bit_equal(saved_weights(stage / "model"), saved_weights(tmp_path / "straight" / "sft" / "model"))
    assert json.loads((stage / "manifest.json").read_text())["status"] == "complete"


def test_orchestrator_reports_a_stopped_stage_and_resumes_it(tmp_path, monkeypatch, capsys):
    """A stage that stops on request under `pipeline run` (fake stages: rm stops after step 2): the run ends
    with exit code 75 and says where the stage stopped; the same command again resumes it and completes."""
    from pipeline.cli import main
    from pipeline.launch import ENTRY_ENV
    from tests.helpers.common import write_config

    monkeypatch.setenv(ENTRY_ENV, "tests.fake_stages")
    monkeypatch.setenv("FAKE_STOP", "rm:2")
    config = write_config(tmp_path, run_name="f")
    assert main(["run", str(config), "--no-report"]) == STOP_EXIT_CODE
    err = capsys.readouterr().err
    assert "stage 'rm' stopped with a checkpoint: by SIGTERM at step 2" in err and "re-run the same command" in err
    monkeypatch.delenv("FAKE_STOP")
    assert main(["run", str(config), "--no-report"]) == 0
    manifest = read_manifest(tmp_path / "out" / "f" / "rm")
    assert manifest["status"] == "complete" and manifest["metrics"]["resumed_from"] == 2
