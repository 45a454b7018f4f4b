"""Checkpoints you can trust (stages/training.py): JSON + safetensors state (nothing unpickled), an index
of checksums verified on resume with fallback to the previous checkpoint, a kill at every point of a
save, and a full disk during a save. The SFT stage on the tiny model stands in for every trainer."""

from __future__ import annotations

import errno
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from stages import engine as engine_module
from stages import sft, training
from stages.training import CheckpointWriteError, load_state, save_state, verify_checkpoint

REPO = Path(__file__).resolve().parent.parent
# 12 steps, checkpoints at 4 and 8: every fault below strikes the save at step 8
STEPS = ("sft.train.max_steps=12", "sft.train.save_steps=4")


class Killed(BaseException):
    """A kill: not an Exception, so nothing on the way up may swallow it."""


@pytest.fixture(scope="module")
def straight_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"output_root={root}", "logging.progress_bar=false", "run_name=straight", *STEPS])
    sft.run(cfg)
    return load_file(cfg.stage_dir("sft") / "model" / "model.safetensors")


def _finish_and_compare(cfg, straight_weights, capsys) -> str:
    """Resume ``cfg`` to the end; its weights and metrics must equal the uninterrupted run's. -> stdout."""
    capsys.readouterr()
    sft.run(cfg)
    out = capsys.readouterr().out
    manifest = json.loads((cfg.stage_dir("sft") / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed"] is True
    weights = load_file(cfg.stage_dir("sft") / "model" / "model.safetensors")
    assert weights.keys() == straight_weights.keys()
    for key in weights:
        torch.testing.assert_close(weights[key], straight_weights[key], atol=1e-6, rtol=0, msg=key)
    rows = [json.loads(line) for line in (cfg.stage_dir("sft") / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    return out


def _strike_on_second_call(monkeypatch, owner, name: str, before: bool = True) -> None:
    """Replace ``owner.name`` so that its second call (the save at step 8) is killed before/after it runs."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 and before:
            raise Killed(f"killed before {name}")
        result = original(*args, **kwargs)
        if calls["n"] == 2:
            raise Killed(f"killed after {name}")
        return result

    monkeypatch.setattr(owner, name, wrapped)


# where the kill strikes -> the checkpoint the resumed run must start from
KILL_POINTS = {
    "between the model and the state": (engine_module, "save_state", True, "step-4"),
    "after the temp files, before the index": (training, "_write_index", True, "step-4"),
    "after the index, before the rename": (training, "_rename", True, "step-4"),
    "after the rename, before latest": (training, "_rename", False, "step-8"),
    "after latest, before pruning": (training, "_prune", True, "step-8"),
    "after the save": (training, "_prune", False, "step-8"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_at_every_point_of_a_save_resumes_to_the_uninterrupted_result(point, tiny_cfg, monkeypatch, capsys,
                                                                          straight_weights):
    owner, name, before, resume_from = KILL_POINTS[point]
    cfg = tiny_cfg("run_name=killed", *STEPS)
    with monkeypatch.context() as patch:
        _strike_on_second_call(patch, owner, name, before)
        with pytest.raises(Killed):
            sft.run(cfg)
    assert json.loads((cfg.stage_dir("sft") / "manifest.json").read_text())["status"] in ("failed", "interrupted")
    out = _finish_and_compare(cfg, straight_weights, capsys)
    assert re.search(rf"resumed .* from \S*/{resume_from} ", out), out


@pytest.mark.parametrize("damage", ["truncated weights", "flipped byte in the state", "no index"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(damage, tiny_cfg, monkeypatch, capsys,
                                                                  straight_weights):
    cfg = tiny_cfg("run_name=damaged", *STEPS)
    with monkeypatch.context() as patch:
        _strike_on_second_call(patch, training, "_prune", before=False)  # killed just after the step-8 save
        with pytest.raises(Killed):
            sft.run(cfg)
    newest = cfg.stage_dir("sft") / "checkpoints" / "step-8"
    assert verify_checkpoint(newest) is None
    if damage == "truncated weights":
        path = newest / "weights.safetensors"
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "flipped byte in the state":
        path = newest / "state.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        (newest / "index.json").unlink()
    assert verify_checkpoint(newest) is not None
    out = _finish_and_compare(cfg, straight_weights, capsys)
    assert "step-8 is incomplete or damaged" in out
    assert re.search(r"resumed .* from \S*/step-4 ", out), out


@pytest.mark.parametrize("during", ["state", "index"])
def test_full_disk_during_a_save_keeps_the_previous_checkpoint_and_stops_clearly(during, tiny_cfg, monkeypatch,
                                                                                 capsys, straight_weights):
    cfg = tiny_cfg("run_name=full", *STEPS)
    victim = "_write_tensors" if during == "state" else "_write_json"
    original = getattr(training, victim)

    def no_space(path, obj):
        if path.parent.name == ".tmp-step-8" and (during == "state" or path.name == "index.json"):
            path.write_bytes(b"partial")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, obj)

    with monkeypatch.context() as patch:
        patch.setattr(training, victim, no_space)
        with pytest.raises(CheckpointWriteError) as info:
            sft.run(cfg)
    message = str(info.value)
    assert "No space left on device" in message and "step-8" in message
    assert "previous checkpoint step-4 is kept" in message
    folder = cfg.stage_dir("sft") / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-4"], "staged folder removed"
    assert verify_checkpoint(folder / "step-4") is None
    manifest = json.loads((cfg.stage_dir("sft") / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "No space left on device" in manifest["error"]
    out = _finish_and_compare(cfg, straight_weights, capsys)
    assert re.search(r"resumed .* from \S*/step-4 ", out), out


def test_state_round_trips_through_json_and_safetensors_without_pickle(tmp_path):
    """Optimiser + schedule state (int keys, tuples, 0-d tensors) and RNG states come back exactly."""
    model = torch.nn.Linear(3, 2)
    opt, sched = training.build_optimizer(list(model.parameters()), 1e-2, 0.1, "cosine", 2, 10)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    random.random()
    np.random.rand()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": training.rng_state(),
             "odd keys": {1: "one", (2, 3): [None, 1.5, float("inf")], "__x": True}}
    save_state(tmp_path, "state", state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    back = load_state(tmp_path, "state")
    assert back["odd keys"] == state["odd keys"]
    assert back["scheduler"] == state["scheduler"]
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for pid, slots in state["optimizer"]["state"].items():
        for key, value in slots.items():
            torch.testing.assert_close(back["optimizer"]["state"][pid][key], value, rtol=0, atol=0)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    training.set_rng_state(back["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    opt2, _ = training.build_optimizer(list(model.parameters()), 1e-2, 0.1, "cosine", 2, 10)
    opt2.load_state_dict(back["optimizer"])
    with pytest.raises(TypeError, match="cannot be written"):
        save_state(tmp_path, "bad", {"x": object()})


def test_no_pickle_loads_in_the_project():
    """The project's own state never goes through ``torch.load(weights_only=False)`` / pickle."""
    offenders = []
    for folder in ("stages", "pipeline", "data"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            if re.search(r"weights_only\s*=\s*False|pickle\.loads?\(|import pickle", text):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
