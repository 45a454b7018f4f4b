"""Token-level (logit) distillation: the divergences of stages/kd.py on hand-worked numbers, and the sft stage
with ``distill.token_level`` on the tiny model (it trains, logs kd_loss / ce_loss, resumes like plain SFT),
with a teacher of another vocabulary refused at validate time and at load time, and an http teacher refused
by the config."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stages.kd import distillation_loss, token_divergence, trained_positions
from tests.helpers.common import read_jsonl

LN2 = math.log(2.0)

# Two positions, three tokens, as probabilities (logits = log p, so softmax gives p back exactly).
TEACHER = torch.tensor([[0.5, 0.25, 0.25], [0.8, 0.1, 0.1]])
STUDENT = torch.tensor([[0.25, 0.5, 0.25], [0.4, 0.4, 0.2]])


def test_forward_and_reverse_kl_by_hand():
    # position 1: KL(p||q) = .5 ln(.5/.25) + .25 ln(.25/.5) + .25 ln 1 = .25 ln2; KL(q||p) = .25 ln2 as well
    # position 2: KL(p||q) = .8 ln2 + .1 ln(1/4) + .1 ln(1/2) = .5 ln2; KL(q||p) = .4 ln(1/2) + .4 ln4 + .2 ln2 = .6 ln2
    s, t = STUDENT.log(), TEACHER.log()
    assert torch.allclose(token_divergence(s, t, "forward_kl"), torch.tensor([0.25 * LN2, 0.5 * LN2]), atol=1e-6)
    assert torch.allclose(token_divergence(s, t, "reverse_kl"), torch.tensor([0.25 * LN2, 0.6 * LN2]), atol=1e-6)
    mask = torch.tensor([[True, True]])
    loss = distillation_loss(s[None], t[None], mask, "forward_kl")
    assert loss.item() == pytest.approx(0.375 * LN2, abs=1e-6)  # the mean over the two positions
    assert distillation_loss(s[None], t[None], mask, "reverse_kl").item() == pytest.approx(0.425 * LN2, abs=1e-6)


def test_jsd_by_hand():
    # position 1, beta .5: m = (.375, .375, .25); KL(p||m) = .5 ln(4/3) + .25 ln(2/3) and KL(q||m) the same
    s, t = STUDENT.log(), TEACHER.log()
    expected_1 = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3)
    assert token_divergence(s, t, "jsd", beta=0.5)[0].item() == pytest.approx(expected_1, abs=1e-6)
    # beta .25 on position 2: m = .25 p + .75 q = (.5, .325, .175)
    m = [0.5, 0.325, 0.175]
    kl_p = sum(p * math.log(p / x) for p, x in zip([0.8, 0.1, 0.1], m))
    kl_q = sum(q * math.log(q / x) for q, x in zip([0.4, 0.4, 0.2], m))
    assert token_divergence(s, t, "jsd", beta=0.25)[1].item() == pytest.approx(0.25 * kl_p + 0.75 * kl_q, abs=1e-6)
    with pytest.raises(ValueError, match="0 < beta < 1"):
        token_divergence(s, t, "jsd", beta=1.0)


def test_zero_when_teacher_is_student_and_temperature_squared():
    logits = torch.randn(2, 5, 7)
    mask = torch.ones(2, 5, dtype=torch.bool)
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        assert distillation_loss(logits, logits.clone(), mask, loss, temperature=3.0).abs().item() < 1e-6
    # logits 2 ln p at temperature 2 are the distributions p, q again: the forward KL, times T**2 = 4
    s, t = (2 * STUDENT.log())[None], (2 * TEACHER.log())[None]
    both = torch.tensor([[True, True]])
    assert distillation_loss(s, t, both, "forward_kl", temperature=2.0).item() == pytest.approx(4 * 0.375 * LN2,
                                                                                                abs=1e-5)


def test_positions_outside_the_mask_are_never_read():
    # labels: prompt, prompt, response, response, pad -> logits at 1 and 2 predict the response tokens
    labels = torch.tensor([[-100, -100, 5, 6, -100]])
    mask = trained_positions(labels)
    assert mask.tolist() == [[False, True, True, False, False]]
    student = torch.zeros(1, 5, 3)
    student[0, 1:3] = STUDENT.log()
    teacher = torch.full((1, 5, 3), float("nan"))  # garbage everywhere else
    teacher[0, 1:3] = TEACHER.log()
    student.requires_grad_(True)
    loss = distillation_loss(student, teacher, mask, "forward_kl")
    loss.backward()
    assert loss.item() == pytest.approx(0.375 * LN2, abs=1e-6)
    assert torch.isfinite(student.grad).all() and student.grad[0, [0, 3, 4]].abs().sum() == 0
    empty = distillation_loss(student, teacher, torch.zeros(1, 5, dtype=torch.bool))
    assert empty.item() == 0.0


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same vocabulary"):
        token_divergence(torch.zeros(2, 3), torch.zeros(2, 4))


# ------------------------------------------------------------------------------------- the sft stage
KD = ["stages=[sft]", "sft.eval_fraction=0", "sft.train.max_steps=4", "sft.train.save_steps=2",
      "sft.train.logging_steps=1", "sft.data={path: data/demo/sft.jsonl, max_records: 24}"]


def _teacher_folder(**tiny) -> str:
    """Another tiny model (same tokenizer unless vocab_size changes) as an hf teacher folder."""
    from pipeline.config import ModelConfig, TinyModelConfig
    from pipeline.models import prepare_base

    return prepare_base(ModelConfig(source="tiny", tiny=TinyModelConfig(**tiny)))


def test_sft_with_token_level_distillation_trains_logs_and_resumes(tiny_cfg, monkeypatch, capsys):
    from stages import run_stage
    from stages.engine import Engine

    teacher = _teacher_folder(seed=1)
    kd = [*KD, f"distill.teacher={{kind: hf, model: '{teacher}'}}",
          "distill.token_level={enabled: true, loss: forward_kl, weight: 0.5, temperature: 2.0}"]
    cfg = tiny_cfg(*kd)
    run_stage("sft", cfg)
    rows = [r for r in read_jsonl(cfg.stage_dir("sft") / "metrics.jsonl") if "kd_loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:  # one micro-batch per step: the logged loss is exactly the mixture of its parts
        assert r["kd_loss"] > 0 and r["ce_loss"] > 0
        assert r["loss"] == pytest.approx(0.5 * r["ce_loss"] + 0.5 * r["kd_loss"], rel=1e-5)
    manifest = json.loads((cfg.stage_dir("sft") / "manifest.json").read_text())
    assert manifest["token_level"]["loss"] == "forward_kl" and manifest["token_level"]["teacher"]["kind"] == "hf"

    # killed after the step-2 checkpoint, the resumed run logs and ends like the straight one
    killed = tiny_cfg(*kd, "run_name=killed")
    original = Engine.save_checkpoint

    def save_then_die(self):
        path = original(self)
        if self.global_step == 2:
            raise KeyboardInterrupt("simulated kill after a checkpoint")
        return path

    monkeypatch.setattr(Engine, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stage("sft", killed)
    monkeypatch.setattr(Engine, "save_checkpoint", original)
    capsys.readouterr()
    run_stage("sft", killed)
    out = capsys.readouterr().out
    assert "resumed sft from" in out and "(step 2)" in out
    resumed = [r for r in read_jsonl(killed.stage_dir("sft") / "metrics.jsonl") if "kd_loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(rows, resumed):
        assert b["kd_loss"] == pytest.approx(a["kd_loss"], rel=1e-4) and b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_weight_zero_is_plain_sft(tiny_cfg):
    """weight 0: the loss is the cross-entropy sft_loss computes (same batches, same numbers)."""
    from pipeline.models import load_model, load_tokenizer, prepare_base
    from stages.batching import pad_collate
    from stages.chat import tokenize_sft
    from stages.sft import distillation_sft_loss, sft_loss

    cfg = tiny_cfg("distill.token_level={enabled: true, weight: 0.0}")
    base = prepare_base(cfg.model)
    tokenizer = load_tokenizer(base, cfg.model, cfg.chat)
    model = load_model(base, cfg.model, tokenizer)
    teacher = load_model(_teacher_folder(seed=1), cfg.model, tokenizer)
    messages = [[{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
                [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]]
    batch = pad_collate(tokenizer.pad_token_id)([tokenize_sft(tokenizer, m, 64) for m in messages])
    plain, _ = sft_loss(model, batch)
    mixed, metrics = distillation_sft_loss(teacher, cfg.distill.token_level)(model, batch)
    assert mixed.item() == pytest.approx(plain.item(), rel=1e-5) and metrics["ce_loss"] == pytest.approx(plain.item())
    assert metrics["kd_loss"] > 0


def test_a_teacher_of_another_vocabulary_is_refused(tiny_cfg):
    from data.formats import DataError
    from pipeline.config import ConfigError
    from pipeline.models import model_source_problems, prepare_base
    from stages import run_stage

    other = _teacher_folder(vocab_size=600)
    cfg = tiny_cfg(*KD, f"distill.teacher={{kind: hf, model: '{other}'}}", "distill.token_level.enabled=true")
    prepare_base(cfg.model)
    problems = model_source_problems(cfg, ["sft"])
    assert len(problems) == 1 and problems[0].startswith("distill.teacher.model: the teacher's tokenizer differs")
    with pytest.raises(DataError, match="distill.teacher.model: the teacher's tokenizer differs"):
        run_stage("sft", cfg)  # the stage checks too (validate skips the check when the base is not built yet)
    same = tiny_cfg(*KD, f"distill.teacher={{kind: hf, model: '{_teacher_folder(seed=1)}'}}",
                    "distill.token_level.enabled=true")
    assert model_source_problems(same, ["sft"]) == []
    with pytest.raises(ConfigError, match="'http'"):
        tiny_cfg(*KD, "distill.teacher={kind: http, base_url: 'http://127.0.0.1:9'}",
                 "distill.token_level.enabled=true")
    with pytest.raises(ConfigError, match="do not include 'sft'"):
        tiny_cfg("stages=[distill]", "distill.data={path: data/demo/prompts.jsonl}", "distill.token_level.enabled=true")
    with pytest.raises(ConfigError, match="distill.token_level.loss"):
        tiny_cfg("distill.token_level={enabled: true, loss: kl}")


def test_memory_plan_counts_the_teacher(tiny_cfg):
    from pipeline.memory import estimate

    plain = estimate(tiny_cfg(*KD), "sft")
    with_teacher = estimate(tiny_cfg(*KD, "distill.token_level.enabled=true"), "sft")
    def own(plan):  # the process's runtime and glibc's heap come with every plan
        return [r.role for r in plan.roles if r.role not in ("runtime", "cpu_heap")]

    assert own(plain) == ["policy"]
    assert own(with_teacher) == ["policy", "teacher"]


def test_memory_plan_of_a_stage_teacher_not_made_yet(tiny_cfg, tmp_path):
    """A config naming a teacher stage folder that does not exist yet (a fresh clone) still plans."""
    from pipeline.memory import estimate

    cfg = tiny_cfg("stages=[distill, sft]", "distill.data={path: data/demo/prompts.jsonl}",
                   f"distill.teacher={{kind: stage, path: {tmp_path / 'later' / 'ppo'}}}")
    plan = estimate(cfg, "distill")
    assert plan.total_bytes > 0 and any("does not exist yet" in note for note in plan.notes)
