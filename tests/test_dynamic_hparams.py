"""Dynamic hyper-parameters of the shared engine (stages/engine.py): reduce-on-plateau of the learning rate,
early stopping with the best weights restored, batch-size ramp-up through gradient accumulation. Each is
logged per step and a run killed after a checkpoint resumes to the same result as one never interrupted."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from pipeline.config import TrainConfig
from stages.engine import DistInfo, Engine, epoch_order


class FakeRun:
    """What the engine needs of a StageRun: a folder, checkpoints/ and a metrics log."""

    def __init__(self, folder: Path):
        self.dir = folder
        self.checkpoints = folder / "checkpoints"
        self.cfg = types.SimpleNamespace(logging=types.SimpleNamespace(progress_bar=False))
        self.rows: list[dict] = []
        folder.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, row: dict) -> None:
        self.rows = [r for r in self.rows if not (r["step"] > step)]  # as trim_logs_after does on resume
        self.rows.append({"step": step, **row})


ITEMS = [{"x": torch.randn(4, generator=torch.Generator().manual_seed(i)), "y": torch.tensor([float(i % 3)])}
         for i in range(20)]


def _engine(folder: Path, script: dict[int, float] | None = None, seen: list | None = None,
            run: FakeRun | None = None, **train) -> tuple[Engine, FakeRun]:
    """A linear model on 20 items; the held-out metric follows ``script`` (step -> eval_loss)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    run = run or FakeRun(folder)
    holder: dict = {}

    def collate(items):
        if seen is not None:
            seen.append([float(i["x"][0]) for i in items])
        return {"x": torch.stack([i["x"] for i in items]), "y": torch.stack([i["y"] for i in items])}

    def loss_fn(m, batch):
        return torch.nn.functional.mse_loss(m(batch["x"]), batch["y"]), {}

    def eval_fn(m):
        return {"eval_loss": script[holder["engine"].global_step]} if script is not None else {}

    cfg = TrainConfig(**{"per_device_batch_size": 2, "learning_rate": 0.1, "warmup_ratio": 0.0,
                         "lr_scheduler": "constant", "max_grad_norm": None, **train})
    engine = Engine(model, cfg, run, DistInfo(), ITEMS, collate, loss_fn, count_tokens=lambda b: len(b["x"]),
                    eval_fn=eval_fn if script is not None else None)
    holder["engine"] = engine
    return engine, run


def _killed_then_resumed(tmp_path: Path, kill_at: int, monkeypatch, **kwargs) -> tuple[Engine, FakeRun]:
    original = Engine.save_checkpoint

    def save_then_die(self):
        folder = original(self)
        if self.global_step == kill_at:
            raise KeyboardInterrupt("simulated kill after a checkpoint")
        return folder

    monkeypatch.setattr(Engine, "save_checkpoint", save_then_die)
    engine, run = _engine(tmp_path / "killed", **kwargs)
    with pytest.raises(KeyboardInterrupt):
        engine.fit()
    monkeypatch.setattr(Engine, "save_checkpoint", original)
    seen = kwargs.pop("seen", None)
    engine, run = _engine(tmp_path / "killed", run=run, seen=seen, **kwargs)
    engine.fit()
    return engine, run


def _same_weights(a: Engine, b: Engine) -> None:
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(x, y, atol=0, rtol=0, msg=name)


def _train_rows(run: FakeRun) -> list[dict]:
    return [r for r in run.rows if "loss" in r]


def test_reduce_on_plateau_scales_the_lr_and_survives_resume(tmp_path, monkeypatch):
    script = {2: 1.0, 4: 0.9, 6: 0.95, 8: 0.96, 10: 0.8, 12: 0.85}
    train = dict(max_steps=12, eval_steps=2, save_steps=4, lr_plateau_factor=0.5, lr_plateau_patience=1)
    straight, run = _engine(tmp_path / "straight", script, **train)
    straight.fit()
    lrs = [round(r["lr"], 6) for r in _train_rows(run)]
    assert lrs == [0.1] * 6 + [0.05] * 2 + [0.025] * 4  # halved after the evaluations at steps 6 and 8
    assert [r["lr_scale"] for r in _train_rows(run)][-1] == 0.25
    assert straight.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.125)  # and after step 12's
    evals = [r for r in run.rows if "eval_loss" in r]
    assert [r["best_eval_loss"] for r in evals[:6]] == [1.0, 0.9, 0.9, 0.9, 0.8, 0.8]
    resumed, run2 = _killed_then_resumed(tmp_path, 8, monkeypatch, script=script, **train)
    _same_weights(straight, resumed)
    assert [round(r["lr"], 6) for r in _train_rows(run2)] == lrs
    assert resumed.watch == straight.watch


def test_plateau_floor(tmp_path):
    engine, run = _engine(tmp_path, {s: 1.0 for s in range(1, 9)}, max_steps=8, eval_steps=1,
                          lr_plateau_factor=0.1, lr_plateau_patience=1, lr_plateau_min_scale=0.05)
    engine.fit()
    assert [r["lr_scale"] for r in _train_rows(run)] == [1.0, 1.0, 0.1, 0.05, 0.05, 0.05, 0.05, 0.05]


def test_early_stopping_restores_the_best_weights_and_survives_resume(tmp_path, monkeypatch):
    script = {2: 1.0, 4: 0.5, 6: 0.6, 8: 0.7, 10: 0.1, 12: 0.1}
    train = dict(max_steps=12, eval_steps=2, save_steps=3, early_stopping_patience=2)
    stopped, run = _engine(tmp_path / "straight", script, **train)
    result = stopped.fit()
    assert result.global_step == 8 and stopped.watch["stopped"] and stopped.watch["best_step"] == 4
    assert any(r.get("early_stopped") == 1 and r["step"] == 8 for r in run.rows)
    # the weights it ends with are those after step 4 (the best evaluation)
    at_four, _ = _engine(tmp_path / "four", max_steps=4)
    at_four.fit()
    _same_weights(stopped, at_four)
    assert result.metrics["eval_loss"] == 0.7  # the final evaluation runs at the stopping step's script value
    resumed, _ = _killed_then_resumed(tmp_path, 6, monkeypatch, script=script, **train)
    assert resumed.global_step == 8
    _same_weights(stopped, resumed)


def test_batch_ramp_keeps_the_data_order_and_survives_resume(tmp_path, monkeypatch):
    seen: list = []
    train = dict(max_steps=7, save_steps=4, batch_ramp={3: 2, 0: 1, 5: 4})
    ramped, run = _engine(tmp_path / "straight", seen=seen, **train)
    ramped.fit()
    assert [r["grad_accum_steps"] for r in _train_rows(run)] == [1, 1, 1, 2, 2, 4, 4]
    assert [r["global_batch_size"] for r in _train_rows(run)] == [2, 2, 2, 4, 4, 8, 8]
    assert len(seen) == 15  # micro-batches: 3x1 + 2x2 + 2x4
    # the same micro-batch sequence as a run without the ramp
    plain_seen: list = []
    _engine(tmp_path / "plain", seen=plain_seen, max_steps=15)[0].fit()
    assert seen == plain_seen
    expected = [b for epoch in (0, 1) for b in epoch_order(20, epoch, 0, 0, 1, 2)][:15]
    assert seen == [[float(ITEMS[i]["x"][0]) for i in b] for b in expected]
    resumed_seen: list = []
    resumed, run2 = _killed_then_resumed(tmp_path, 4, monkeypatch, seen=resumed_seen, **train)
    _same_weights(ramped, resumed)
    assert [r["grad_accum_steps"] for r in _train_rows(run2)] == [1, 1, 1, 2, 2, 4, 4]
    assert resumed_seen == seen  # 5 micro-batches before the kill at step 4, the other 10 after the resume


def test_ramp_sets_the_steps_of_an_epoch_budget(tmp_path):
    engine, _ = _engine(tmp_path, epochs=2.0, batch_ramp={0: 1, 4: 2})  # 20 micro-batches: 4x1 + 8x2
    assert engine.total_steps == 12
    assert _engine(tmp_path, epochs=2.0)[0].total_steps == 20


def test_config_checks():
    with pytest.raises(ValueError, match="eval_steps"):
        TrainConfig(early_stopping_patience=2)
    with pytest.raises(ValueError, match="eval_steps"):
        TrainConfig(lr_plateau_factor=0.5)
    with pytest.raises(ValueError, match="batch_ramp"):
        TrainConfig(batch_ramp={0: 0})
    assert TrainConfig(batch_ramp={10: 4, 0: 1}).accumulation_at(9) == 1
    assert TrainConfig(batch_ramp={10: 4, 0: 1}).accumulation_at(10) == 4
    assert TrainConfig(gradient_accumulation_steps=3, batch_ramp={5: 1}).accumulation_at(0) == 3


def test_sft_stage_with_plateau_and_early_stopping(tiny_cfg):
    """The real SFT stage: the watch reads its eval_loss, logs per step, keeps checkpoints/best/."""
    import json

    from stages import sft

    cfg = tiny_cfg("sft.train.max_steps=6", "sft.train.eval_steps=1", "sft.train.lr_plateau_factor=0.5",
                   "sft.train.lr_plateau_patience=1", "sft.train.early_stopping_patience=3",
                   "sft.train.batch_ramp={0: 1, 3: 2}")
    sft.run(cfg)
    rows = [json.loads(line) for line in (cfg.stage_dir("sft") / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["grad_accum_steps"] for r in train_rows][:4] == [1, 1, 1, 2]
    assert all("lr_scale" in r for r in train_rows)
    watched = [r for r in rows if "best_eval_loss" in r]
    assert len(watched) == min(6, watched[-1]["step"]) and all("evals_since_best" in r for r in watched)
    assert json.loads((cfg.stage_dir("sft") / "manifest.json").read_text())["status"] == "complete"


def test_dynamic_hparams_under_deepspeed_zero2_match_the_plain_engine(tmp_path, one_rank_process_group):
    """The three together under DeepSpeed ZeRO-2 take the same decisions, log the same learning rates and
    batch sizes, and end with the same weights as the plain loop: the plateau scale reaches DeepSpeed's
    optimiser, the ramp its accumulation (and loss scaling), early stopping its module."""
    pytest.importorskip("deepspeed")
    script = {2: 1.0, 4: 0.9, 6: 0.95, 8: 0.96, 10: 0.97, 12: 0.5}
    train = dict(max_steps=12, eval_steps=2, lr_plateau_factor=0.5, lr_plateau_patience=1,
                 early_stopping_patience=3, batch_ramp={0: 1, 3: 2, 6: 4})
    plain, plain_run = _engine(tmp_path / "plain", script, **train)
    plain.fit()
    ds, ds_run = _engine(tmp_path / "ds", script, deepspeed="configs/deepspeed/zero2.json", **train)
    ds.fit()
    assert ds.ds_engine is not None
    assert ds.watch == plain.watch and ds.watch["stopped"] and ds.watch["best_step"] == 4
    keys = ("lr", "lr_scale", "grad_accum_steps", "global_batch_size")
    assert [[r[k] for k in keys] for r in _train_rows(ds_run)] == [[r[k] for k in keys] for r in _train_rows(plain_run)]
    assert [r["lr_scale"] for r in _train_rows(ds_run)] == [1.0] * 6 + [0.5] * 2 + [0.25] * 2
    for a, b in zip(_train_rows(ds_run), _train_rows(plain_run)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for (name, x), y in zip(ds.model.state_dict().items(), plain.model.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=name)
