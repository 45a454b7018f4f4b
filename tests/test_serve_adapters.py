"""``serve A B``: several LoRA stages on one copy of their base, one model name each, switched per request."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.serve import (
    ChatModel,
    GenerationParams,
    ServeError,
    _AdapterSwitch,
    load_chat_models,
    make_server,
    stage_adapter,
    start_server_in_thread,
)

MESSAGES = [{"role": "user", "content": "What is 6 times 7?"}]


def _lora_stage(root: Path, tiny_base: str, stage: str, seed: int) -> Path:
    """A stage folder as a LoRA stage writes it: adapter/, the merged model/, tokenizer, manifest with base_model.
    The adapter's B matrices are random (seeded), so each stage answers differently from the base."""
    from peft import LoraConfig, get_peft_model

    from pipeline.models import load_model, load_tokenizer, save_tokenizer

    folder = root / "run" / stage
    mcfg = ModelConfig(source="local", path=tiny_base, dtype="float32")
    tokenizer = load_tokenizer(tiny_base, mcfg)
    model = get_peft_model(load_model(tiny_base, mcfg, tokenizer),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(folder / "adapter", safe_serialization=True)
    model.merge_and_unload().save_pretrained(folder / "model", safe_serialization=True)
    save_tokenizer(tokenizer, folder)
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "status": "complete",
                                                      "metrics": {"base_model": tiny_base}}))
    return folder


def _answer(url: str, model: str | None, stream: bool = False) -> str:
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, **({"model": model} if model else {})}
    if not stream:
        reply = httpx.post(url + "/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert model is None or reply.json()["model"] == model
        return reply.json()["choices"][0]["message"]["content"]
    text = ""
    with httpx.stream("POST", url + "/chat/completions", json={**body, "stream": True}, timeout=60) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
    return text


def test_two_adapters_on_one_base(tmp_path: Path, tiny_base: str, monkeypatch) -> None:
    torch.set_num_threads(1)
    first, second = _lora_stage(tmp_path, tiny_base, "sft", 1), _lora_stage(tmp_path, tiny_base, "dpo", 2)
    assert stage_adapter(first)[1] == stage_adapter(second)[1] == str(Path(tiny_base).resolve())
    merged = {name: ChatModel(folder) for name, folder in (("run/sft", first), ("run/dpo", second))}
    server, url = start_server_in_thread([str(first), str(second)], quiet=True)
    try:
        models = list(server.chat_models.values())
        assert [m.name for m in models] == ["run/sft", "run/dpo"]
        assert all(isinstance(m.model, _AdapterSwitch) for m in models)
        assert models[0].model.peft_model is models[1].model.peft_model  # one copy of the base
        assert [m["id"] for m in httpx.get(url + "/models").json()["data"]] == ["run/sft", "run/dpo"]

        import pipeline.models

        def no_reload(*args, **kwargs):
            raise AssertionError("a request loaded a model")

        monkeypatch.setattr(pipeline.models, "load_model", no_reload)
        answers = {name: _answer(url, name) for name in ("run/sft", "run/dpo")}
        assert answers["run/sft"] != answers["run/dpo"]
        for name, chat_model in merged.items():  # each adapter answers as its merged model does
            params = GenerationParams(messages=MESSAGES, max_tokens=12, temperature=0)
            reference = chat_model.generate(params)[0][0].text
            assert answers[name] == reference, name
        # switching back and forth (and streaming) gives the same answers; no model names the first
        assert _answer(url, "run/sft") == answers["run/sft"] and _answer(url, "run/dpo") == answers["run/dpo"]
        assert _answer(url, "run/dpo", stream=True) == answers["run/dpo"]
        assert _answer(url, None) == answers["run/sft"]
        missing = httpx.post(url + "/chat/completions", json={"model": "run/ppo", "messages": MESSAGES})
        assert missing.status_code == 404 and "run/sft" in missing.json()["error"]["message"]
    finally:
        server.close()


def test_checkpoints_without_a_shared_base_load_separately(tmp_path: Path, tiny_base: str) -> None:
    torch.set_num_threads(1)
    stage = _lora_stage(tmp_path, tiny_base, "sft", 1)
    plain = tmp_path / "plain"
    ChatModel(tiny_base).model.save_pretrained(plain, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (Path(tiny_base) / name).exists():
            (plain / name).write_bytes((Path(tiny_base) / name).read_bytes())
    models = load_chat_models([str(stage), str(plain)])
    assert [type(m.model).__name__ for m in models] == ["LlamaForCausalLM", "LlamaForCausalLM"]
    assert [m.name for m in models] == ["run/sft", "plain"]
    with pytest.raises(ServeError, match="--model-name"):
        make_server([str(stage), str(plain)], port=0, model_name="x")
