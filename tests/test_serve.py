"""The OpenAI-compatible server (pipeline/serve/) on the tiny model, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from pipeline.serve import ChatModel, ServeError, main, resolve_checkpoint, start_server_in_thread

torch.set_num_threads(1)

MESSAGES = [{"role": "user", "content": "What is 6 times 7?"}]


@pytest.fixture(scope="module")
def chat_model(tiny_base: str) -> ChatModel:
    return ChatModel(tiny_base, name="tiny")


@pytest.fixture(scope="module")
def server(tiny_base: str, chat_model: ChatModel):
    srv, url = start_server_in_thread(tiny_base, chat_model=chat_model, quiet=True)
    yield srv, url
    srv.close()


def test_models_and_health(server) -> None:
    srv, url = server
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    data = httpx.get(url + "/models").json()
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == ["tiny"]
    assert httpx.get(url.removesuffix("/v1") + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/nope").status_code == 404


def test_chat_completion_greedy_is_deterministic(server) -> None:
    _, url = server
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "n": 2}
    first = httpx.post(url + "/chat/completions", json=body).json()
    second = httpx.post(url + "/chat/completions", json=body).json()
    assert first["object"] == "chat.completion" and len(first["choices"]) == 2
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts[0] == texts[1] == second["choices"][0]["message"]["content"]
    assert first["choices"][0]["finish_reason"] in ("stop", "length")
    usage = first["usage"]
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 16


def test_sampling_with_seed_and_n(server) -> None:
    _, url = server
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 1.0, "top_p": 0.9, "n": 3, "seed": 7}
    a = httpx.post(url + "/chat/completions", json=body).json()
    b = httpx.post(url + "/chat/completions", json=body).json()
    assert len(a["choices"]) == 3
    assert [c["message"]["content"] for c in a["choices"]] == [c["message"]["content"] for c in b["choices"]]


def test_logprobs(server) -> None:
    _, url = server
    body = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 5}
    data = httpx.post(url + "/chat/completions", json=body).json()
    content = data["choices"][0]["logprobs"]["content"]
    assert content, "greedy decoding of 4 tokens returned no logprobs"
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 5
        # greedy: the chosen token is the most likely one
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"], abs=1e-5)
    assert len(content) == data["usage"]["completion_tokens"]


def test_stream_matches_non_stream(server) -> None:
    _, url = server
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    full = httpx.post(url + "/chat/completions", json=body).json()["choices"][0]
    pieces, finish = [], None
    with httpx.stream("POST", url + "/chat/completions", json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        assert chunk["object"] == "chat.completion.chunk"
        delta = chunk["choices"][0]["delta"]
        pieces.append(delta.get("content", ""))
        finish = chunk["choices"][0]["finish_reason"] or finish
    assert "".join(pieces) == full["message"]["content"]
    assert finish == full["finish_reason"]


@pytest.mark.parametrize("body, status, fragment", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ({"messages": MESSAGES, "temperature": 5}, 400, "temperature"),
    ({"messages": MESSAGES, "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs"),
    ({"messages": MESSAGES, "model": "gpt-9"}, 404, "serves 'tiny'"),
    ({"messages": MESSAGES, "stream": True, "n": 2}, 400, "stream"),
])
def test_bad_requests(server, body, status, fragment) -> None:
    _, url = server
    response = httpx.post(url + "/chat/completions", json=body)
    assert response.status_code == status
    assert fragment in response.json()["error"]["message"]


def test_invalid_json_body(server) -> None:
    _, url = server
    response = httpx.post(url + "/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_bearer_auth_and_key_never_logged(tiny_base, chat_model, caplog, capsys) -> None:
    key = "sk-serve-test-SECRET-4242"
    caplog.set_level(logging.DEBUG)
    srv, url = start_server_in_thread(tiny_base, chat_model=chat_model, api_key=key)
    try:
        body = {"messages": MESSAGES, "max_tokens": 2, "temperature": 0}
        assert httpx.post(url + "/chat/completions", json=body).status_code == 401
        wrong = httpx.post(url + "/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = httpx.post(url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
        assert srv.stats["unauthorized"] == 3
        assert key not in repr(srv)
    finally:
        srv.close()
    captured = capsys.readouterr()
    assert key not in caplog.text and key not in captured.out and key not in captured.err
    assert "POST /v1/chat/completions" in caplog.text  # the access log is on, and it holds no key


def test_fault_injection_fails_first_requests(tiny_base, chat_model) -> None:
    srv, url = start_server_in_thread(tiny_base, chat_model=chat_model, quiet=True, fail_first=2,
                                      fail_statuses=(500, 429))
    try:
        body = {"messages": MESSAGES, "max_tokens": 2}
        codes = [httpx.post(url + "/chat/completions", json=body).status_code for _ in range(3)]
        assert codes == [500, 429, 200]
        assert srv.stats["failed_injected"] == 2 and srv.stats["completions"] == 3
    finally:
        srv.close()


def test_stage_folder_layout(tmp_path: Path, tiny_base: str) -> None:
    stage = tmp_path / "myrun" / "sft"
    shutil.copytree(tiny_base, stage / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(tiny_base) / name).exists():
            shutil.copy(Path(tiny_base) / name, stage / name)
    (stage / "manifest.json").write_text(json.dumps({"stage": "sft", "status": "complete",
                                                     "chat_format": {"system_prompt": "Be brief."}}))
    model_dir, tok_dir = resolve_checkpoint(stage)
    assert model_dir == stage / "model" and tok_dir == stage
    model = ChatModel(stage)
    assert model.name == "myrun/sft" and model.system_prompt == "Be brief."
    text = model.tokenizer.decode(model.prompt_ids(MESSAGES))
    assert "Be brief." in text and text.rstrip().endswith("assistant")
    with pytest.raises(ServeError, match="holds no model"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(ServeError, match="not found"):
        resolve_checkpoint(tmp_path / "missing")


def test_main_requires_the_key_env_var(tiny_base, monkeypatch) -> None:
    monkeypatch.delenv("ALIGNPIPE_TEST_UNSET_KEY", raising=False)
    args = argparse.Namespace(checkpoint=tiny_base, host="127.0.0.1", port=0, api_key_env="ALIGNPIPE_TEST_UNSET_KEY")
    with pytest.raises(SystemExit, match="ALIGNPIPE_TEST_UNSET_KEY"):
        main(args)


def _rm_stage(tmp_path: Path, tiny_base: str) -> Path:
    """A complete rm stage folder whose model is the tiny base with a fresh one-label head."""
    from pipeline.config import ModelConfig
    from pipeline.models import load_model, load_tokenizer, save_tokenizer
    from stages.scoring import REWARD_LAYOUT

    stage = tmp_path / "run" / "rm"
    cfg = ModelConfig(source="local", path=tiny_base)
    tokenizer = load_tokenizer(tiny_base, cfg)
    torch.manual_seed(0)
    load_model(tiny_base, cfg, tokenizer, kind="seq_cls").save_pretrained(stage / "model", safe_serialization=True)
    save_tokenizer(tokenizer, stage)
    save_tokenizer(tokenizer, stage / "model")
    (stage / "manifest.json").write_text(json.dumps({"stage": "rm", "status": "complete",
                                                     "reward_layout": REWARD_LAYOUT}))
    return stage


def test_best_of_n_returns_the_best_candidate_by_the_rm(tmp_path: Path, tiny_base: str) -> None:
    """--best-of 4: each choice is the RM's best of the 4 candidates the same seed samples without it."""
    from pipeline.serve import BestOfN, GenerationParams

    reranker = BestOfN(_rm_stage(tmp_path, tiny_base), 4)
    plain, best = ChatModel(tiny_base, name="tiny"), ChatModel(tiny_base, name="tiny", best_of=reranker)
    params = dict(messages=MESSAGES, max_tokens=6, temperature=1.0, top_p=1.0, seed=11)
    candidates, _ = plain.generate(GenerationParams(**params, n=4))
    chosen, _ = best.generate(GenerationParams(**params, n=1))
    scores = reranker.scores(MESSAGES, [c.text for c in candidates])
    finished = [c.finish_reason == "stop" for c in candidates]
    expected = max(range(4), key=lambda i: (finished[i], scores[i], -i))
    assert len(chosen) == 1 and chosen[0].text == candidates[expected].text
    assert len(set(scores)) > 1  # the RM does tell the candidates apart
    # two choices: each the best of its own 4 (8 samples in all, in order)
    eight, _ = plain.generate(GenerationParams(**params, n=8))
    two, _ = best.generate(GenerationParams(**params, n=2))
    for k in range(2):
        group = eight[4 * k:4 * (k + 1)]
        s = reranker.scores(MESSAGES, [c.text for c in group])
        pick = max(range(4), key=lambda i: (group[i].finish_reason == "stop", s[i], -i))
        assert two[k].text == group[pick].text
    with pytest.raises(Exception, match="streaming is not available"):
        next(best.stream(GenerationParams(**params, n=1, stream=True)))
    with pytest.raises(ServeError, match="at least 2"):
        BestOfN(tmp_path / "run" / "rm", 1)
