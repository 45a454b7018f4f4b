"""Every tuning method: one short SFT run, save, reload, generate; adapters switch on one base."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.models import load_tokenizer
from stages import sft
from stages.tuning import MERGEABLE, load_adapters, load_trained

pytestmark = pytest.mark.gpu  # bench/gpu_check.sh runs these on the GPU (QLoRA needs CUDA there)

METHODS = ["full", "freeze", "gradual_unfreeze", "lora", "dora", "rslora", "qlora", "adalora", "ia3",
           "prefix", "prompt", "ptuning", "llama_adapter"]


def _generate(model, tok) -> list[int]:
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 4?"}],
                                     add_generation_prompt=True, tokenize=False)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_saves_reloads_and_generates(tiny_cfg, method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    cfg = tiny_cfg(f"run_name={method}", f"sft.tuning.method={method}", "sft.train.max_steps=3",
                   "sft.train.learning_rate=1e-2", "sft.tuning.unfreeze_every_steps=1",
                   "sft.tuning.trainable_layers=1", "sft.eval_fraction=0")
    metrics = sft.run(cfg)
    out = cfg.stage_dir("sft")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and metrics["steps"] == 3
    assert manifest["tuning_method"] == method
    params = manifest["params"]
    if method == "full":
        assert params["params_trainable"] == params["params_total"]
    else:
        assert 0 < params["params_trainable"] < params["params_total"]
    if method in MERGEABLE:
        assert manifest["model_format"] == "merged"
        assert (out / "adapter" / "adapter_config.json").exists()
        assert (out / "model" / "model.safetensors").exists()
    elif method in ("full", "freeze", "gradual_unfreeze"):
        assert manifest["model_format"] == "full" and not (out / "adapter").exists()
    else:
        assert manifest["model_format"] == "adapter_on_base" and not (out / "model").exists()
    tok = load_tokenizer(str(out), cfg.model)
    model = load_trained(out, cfg.model, tok).eval()
    new_tokens = _generate(model, tok)
    assert 1 <= len(new_tokens) <= 5


def test_merged_lora_matches_base_plus_adapter(tiny_cfg):
    cfg = tiny_cfg("run_name=merge", "sft.tuning.method=lora", "sft.train.max_steps=3",
                   "sft.train.learning_rate=5e-2", "sft.eval_fraction=0")
    sft.run(cfg)
    out = cfg.stage_dir("sft")
    tok = load_tokenizer(str(out), cfg.model)
    merged = load_trained(out, cfg.model, tok).eval()
    manifest = json.loads((out / "manifest.json").read_text())
    from peft import PeftModel

    from pipeline.models import load_model

    unmerged = PeftModel.from_pretrained(load_model(manifest["base_model"], cfg.model, tok),
                                         str(out / "adapter")).eval()
    ids = torch.tensor([tok("What is 3 plus 4?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, atol=1e-4, rtol=1e-4)
        base_logits = load_model(manifest["base_model"], cfg.model, tok)(ids).logits
    assert not torch.allclose(base_logits, merged(ids).logits, atol=1e-4), "the adapter changed nothing"


def test_several_adapters_on_one_base_switch(tiny_cfg):
    from pipeline.models import load_model

    outs = {}
    for name, seed, lr in (("one", 0, 5e-2), ("two", 7, 2e-2)):
        overrides = [f"run_name=adapter-{name}", "sft.tuning.method=lora", "sft.train.max_steps=3",
                     "sft.eval_fraction=0", f"sft.train.seed={seed}", f"sft.train.learning_rate={lr}"]
        cfg = tiny_cfg(*overrides)
        sft.run(cfg)
        outs[name] = cfg.stage_dir("sft")
    manifest = json.loads((outs["one"] / "manifest.json").read_text())
    tok = load_tokenizer(str(outs["one"]), cfg.model)
    model = load_adapters(load_model(manifest["base_model"], cfg.model, tok),
                          {"one": outs["one"] / "adapter", "two": outs["two"] / "adapter"}).eval()
    ids = torch.tensor([tok("Reverse the word 'apple'.")["input_ids"]])
    with torch.no_grad():
        model.set_adapter("one")
        logits_one = model(ids).logits
        model.set_adapter("two")
        logits_two = model(ids).logits
        model.set_adapter("one")
        again_one = model(ids).logits
    assert not torch.allclose(logits_one, logits_two, atol=1e-4)
    torch.testing.assert_close(logits_one, again_one)
    for name in ("one", "two"):
        merged = load_trained(outs[name], cfg.model, tok).eval()
        with torch.no_grad():
            model.set_adapter(name)
            torch.testing.assert_close(model(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
