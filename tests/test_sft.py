"""SFT stage on the tiny model: learning, masking, eos/pad, packing, resume, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.models import load_model, load_tokenizer, prepare_base
from stages import sft
from stages.sft import IGNORE, pack_rows, packed_collate, tokenize_sft

REPO = Path(__file__).resolve().parent.parent


def _metrics(stage_dir):
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from pipeline.config import load_config


    cfg = load_config(REPO / "configs" / "tiny.yaml")
    base = prepare_base(cfg.model)
    return load_tokenizer(base, cfg.model, cfg.chat), base, cfg


@pytest.mark.gpu
def test_loss_goes_down_and_outputs_follow_the_contract(tiny_cfg):
    cfg = tiny_cfg("sft.train.max_steps=40")
    metrics = sft.run(cfg)
    out = cfg.stage_dir("sft")
    rows = [r for r in _metrics(out) if "loss" in r]
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert metrics["eval_loss"] < rows[0]["loss"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["chat_fingerprint"] and manifest["chat_format"]["chat_template"]
    assert manifest["data_files"] and manifest["libraries"]["torch"]
    assert (out / "model" / "model.safetensors").exists()
    assert (out / "chat_template.jinja").read_text() == manifest["chat_format"]["chat_template"]
    assert not (out / "checkpoints").exists(), "training state is removed once the stage completes"
    # pad != eos after save and reload, in the tokenizer and in the model's config
    tok = load_tokenizer(str(out), cfg.model)
    model = load_model(str(out / "model"), cfg.model, tok)
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id != model.config.eos_token_id
    assert model.generation_config.pad_token_id != model.generation_config.eos_token_id


def test_prompt_tokens_masked_and_final_eos_is_a_target(tiny_tokenizer):
    tok, _, _ = tiny_tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 plus 3?"},
        {"role": "assistant", "content": "6."},
    ]
    row = tokenize_sft(tok, messages, max_length=256)
    ids, labels = row["input_ids"], row["labels"]
    targets = [t for t, label in zip(ids, labels) if label != IGNORE]
    # exactly the two assistant turns, each closed by eos; no prompt, role header or trailing newline
    assert tok.decode(targets) == "4.<|im_end|>6.<|im_end|>"
    assert targets.count(tok.eos_token_id) == 2
    last_target = max(i for i, label in enumerate(labels) if label != IGNORE)
    assert ids[last_target] == tok.eos_token_id
    user_text = tok.decode([t for t, label in zip(ids, labels) if label == IGNORE])
    assert "What is 2 plus 2?" in user_text and "Be brief." in user_text
    assert tok.pad_token_id not in ids


def test_packed_rows_keep_conversations_separate(tiny_tokenizer):
    tok, base, cfg = tiny_tokenizer
    model = load_model(base, cfg.model, tok).eval()
    a = tokenize_sft(tok, [{"role": "user", "content": "Reverse 'apple'."},
                           {"role": "assistant", "content": "elppa"}], 128)
    b = tokenize_sft(tok, [{"role": "user", "content": "What is 5 times 6?"},
                           {"role": "assistant", "content": "30."}], 128)
    packed = pack_rows([a, b], 128)
    assert len(packed) == 1
    batch = packed_collate(tok.pad_token_id)(packed)
    with torch.no_grad():
        logits_packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              use_cache=False).logits[0]
        # whichever conversation was placed second must see only itself
        first_len = len(a["input_ids"]) if packed[0]["input_ids"][: len(a["input_ids"])] == a["input_ids"] \
            else len(b["input_ids"])
        second = a if first_len != len(a["input_ids"]) else b
        alone = model(input_ids=torch.tensor([second["input_ids"]])).logits[0]
    torch.testing.assert_close(logits_packed[first_len: first_len + len(second["input_ids"])], alone,
                               atol=1e-4, rtol=1e-4)
    assert batch["labels"][0, first_len] == IGNORE


def test_interrupted_stage_resumes_to_the_same_weights(tiny_cfg, monkeypatch):
    from safetensors.torch import load_file

    from stages.engine import Engine

    straight = tiny_cfg("run_name=straight", "sft.train.max_steps=12", "sft.train.save_steps=6")
    sft.run(straight)

    cfg = tiny_cfg("run_name=killed", "sft.train.max_steps=12", "sft.train.save_steps=6")
    original = Engine.save_checkpoint

    def save_then_die(self):
        original(self)
        raise KeyboardInterrupt("simulated kill after the first checkpoint")

    monkeypatch.setattr(Engine, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg)
    manifest = json.loads((cfg.stage_dir("sft") / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["resume_step"] == 6
    assert (cfg.stage_dir("sft") / "checkpoints" / "latest").read_text() == "step-6"
    monkeypatch.setattr(Engine, "save_checkpoint", original)
    sft.run(cfg)
    manifest = json.loads((cfg.stage_dir("sft") / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed"] is True
    a = load_file(straight.stage_dir("sft") / "model" / "model.safetensors")
    b = load_file(cfg.stage_dir("sft") / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    steps = [r["step"] for r in _metrics(cfg.stage_dir("sft")) if "loss" in r]
    assert steps == list(range(1, 13)), "metrics continue after resume, no step logged twice"


def test_packing_and_grad_accumulation_run(tiny_cfg):
    cfg = tiny_cfg("sft.packing=true", "sft.train.max_steps=4", "sft.train.gradient_accumulation_steps=2")
    metrics = sft.run(cfg)
    assert metrics["packing"] is True and metrics["train_rows"] < 380
    assert metrics["steps"] == 4


def test_gradual_unfreeze_opens_layers_on_schedule(tiny_cfg):
    from stages.tuning import GradualUnfreezer, decoder_layers


    cfg = tiny_cfg()
    base = prepare_base(cfg.model)
    tok = load_tokenizer(base, cfg.model)
    model = load_model(base, cfg.model, tok)
    unfreezer = GradualUnfreezer(model, start_layers=0, every=2, extra_modules=[])
    layers = decoder_layers(model)

    def trainable() -> list[bool]:
        return [all(p.requires_grad for p in layer.parameters()) for layer in layers]

    assert trainable() == [False, False] and model.lm_head.weight.requires_grad
    unfreezer.step(2)
    assert trainable() == [False, True]
    unfreezer.step(4)
    assert trainable() == [True, True]


@pytest.mark.gpu
def test_gradient_checkpointing_gives_the_same_loss(tiny_cfg):
    plain = sft.run(tiny_cfg("run_name=plain", "sft.train.max_steps=3", "sft.eval_fraction=0"))
    ckpt = sft.run(tiny_cfg("run_name=ckpt", "sft.train.max_steps=3", "sft.eval_fraction=0",
                            "sft.train.gradient_checkpointing=true"))
    assert abs(plain["loss"] - ckpt["loss"]) < 1e-4


def test_tensorboard_and_offline_wandb_logging(tiny_cfg, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg("sft.train.max_steps=3", "sft.eval_fraction=0", "logging.tensorboard=true",
                   "logging.wandb=true")
    sft.run(cfg)
    out = cfg.stage_dir("sft")
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("sft/loss")] == [1, 2, 3]
    offline_runs = list((out / "wandb").glob("offline-run-*"))
    assert offline_runs, "wandb logs offline unless the user configures it"
