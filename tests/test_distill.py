"""distill stage on the tiny model: an HF teacher answers, the cache makes a re-run ask nothing, a
verifier filters (counts and rejected.jsonl), the HTTP teacher against our own server on 127.0.0.1 retries
injected 500/429s, stops clearly on timeouts keeping what it received and resumes from the cache, and an
sft stage in the same run trains on the teacher's answers."""

from __future__ import annotations

import json

import pytest

from tests.helpers.common import read_jsonl

PROMPTS = "distill.data={path: data/demo/prompts.jsonl, max_records: %d}"
COMMON = ["distill.max_new_tokens=8", "distill.num_threads=1", "distill.batch_size=4"]


def test_hf_teacher_cache_filter_and_sft_trains_on_it(tiny_cfg):
    from stages import run_stage

    cfg = tiny_cfg("stages=[distill, sft]", PROMPTS % 6, *COMMON, "sft.train.max_steps=2", "sft.eval_fraction=0")
    m = run_stage("distill", cfg)
    out = cfg.stage_dir("distill")
    rows = read_jsonl(out / "data.jsonl")
    assert m["prompts"] == 6 and m["asked"] == 6 and m["from_cache"] == 0 and m["failed"] == 0
    assert m["kept"] == len(rows) and m["kept"] + m["empty"] == 6 and m["filtered_out"] == 0
    for r in rows:
        assert r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"]
        assert r["teacher"]["kind"] == "hf" and r["sampling"]["max_new_tokens"] == 8 and r["answered_at"]
        assert r["from_cache"] is False
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["kept"] == len(rows)

    # a re-run (another config: the cache key is the teacher, sampling and prompt) asks the teacher nothing
    again = tiny_cfg("stages=[distill, sft]", PROMPTS % 6, *COMMON, "distill.batch_size=2",
                     "sft.train.max_steps=2", "sft.eval_fraction=0")
    m2 = run_stage("distill", again)
    assert m2["asked"] == 0 and m2["from_cache"] == 6 and m2["kept"] == m["kept"]
    assert [r["messages"] for r in read_jsonl(out / "data.jsonl")] == [r["messages"] for r in rows]

    # sft in the same run trains on distill/data.jsonl, not sft.data
    assert run_stage("sft", again)
    sft_manifest = json.loads((again.stage_dir("sft") / "manifest.json").read_text())
    assert sft_manifest["sft_data"]["from"] == "distill" and str(out / "data.jsonl") in sft_manifest["data_files"]

    # a verifier filters: every answer is kept or counted (and written to rejected.jsonl with its reason)
    filtered = tiny_cfg("stages=[distill]", PROMPTS % 6, *COMMON, "distill.threshold=0.05",
                        "distill.filter=[{kind: function, function: 'stages.ppo.rewards:digit_fraction'}]")
    m3 = run_stage("distill", filtered)
    assert m3["asked"] == 0 and m3["kept"] + m3["filtered_out"] + m3["empty"] == 6
    rejected = read_jsonl(out / "rejected.jsonl", missing_ok=True)
    assert sum(r["rejected"] == "filtered_out" for r in rejected) == m3["filtered_out"]
    assert all(r["score"] < 0.05 for r in rejected if r["rejected"] == "filtered_out")
    assert all(r["score"] >= 0.05 and "digit_fraction" in r["scores"] for r in read_jsonl(out / "data.jsonl"))


def test_distill_validation_order_and_plan(tiny_cfg):
    from pipeline.config import ConfigError
    from pipeline.memory import estimate
    from pipeline.stage import parents_of

    with pytest.raises((ConfigError, ValueError), match="distill must come before sft"):
        tiny_cfg("stages=[sft, distill]", PROMPTS % 2)
    with pytest.raises((ConfigError, ValueError), match="needs base_url"):
        tiny_cfg("stages=[distill]", PROMPTS % 2, "distill.teacher={kind: http}")
    cfg = tiny_cfg("stages=[distill, sft]", PROMPTS % 2)
    assert parents_of(cfg, "sft") == ["distill"] and parents_of(cfg, "distill") == []
    # the stage's own roles (the process's runtime and, on a CPU, glibc's heap come with every plan)
    assert {r.role for r in estimate(cfg, "distill").roles} - {"runtime", "cpu_heap"} == {"teacher", "kv_cache"}
    remote = tiny_cfg("stages=[distill]", PROMPTS % 2, "distill.teacher={kind: http, base_url: 'http://127.0.0.1:9'}")
    assert [r.role for r in estimate(remote, "distill").roles] == ["runtime"]  # no model in this process


@pytest.fixture(scope="module")
def served_tiny():
    from pipeline.config import load_config
    from pipeline.models import prepare_base
    from pipeline.serve import ChatModel

    base = prepare_base(load_config("configs/tiny.yaml").model)
    return base, ChatModel(base, name="tiny")


def _http(url: str, n: int, *extra: str) -> list[str]:
    return ["stages=[distill]", PROMPTS % n, *COMMON, "distill.teacher.kind=http", f"distill.teacher.base_url={url}",
            "distill.teacher.model=tiny", "distill.teacher.backoff_s=0.01", "distill.teacher.concurrency=1", *extra]


def test_http_teacher_retries_stops_clearly_and_resumes(tiny_cfg, served_tiny):
    from pipeline.serve import start_server_in_thread
    from stages import run_stage
    from stages.distill import TeacherUnavailable
    from stages.rlaif.judges import JudgmentCache

    base, chat_model = served_tiny
    # 500 then 429 on the first two requests: retried, then every prompt answered
    server, url = start_server_in_thread(base, chat_model=chat_model, quiet=True, fail_first=2,
                                         fail_statuses=(500, 429))
    try:
        cfg = tiny_cfg(*_http(url, 3, "distill.teacher.max_retries=3"))
        m = run_stage("distill", cfg)
        assert server.stats["failed_injected"] == 2 and server.stats["completions"] == 5
        assert m["asked"] == 3 and m["kept"] + m["empty"] == 3
        row = read_jsonl(cfg.stage_dir("distill") / "data.jsonl")[0]
        assert row["teacher"] == {"kind": "http", "model": "tiny", "base_url": url}
    finally:
        server.close()

    # an endpoint that times out: retried, then a clear stop that keeps the 3 answers already received
    slow, slow_url = start_server_in_thread(base, chat_model=chat_model, quiet=True, delay_s=1.0)
    try:
        down = tiny_cfg(*_http(slow_url, 5, "distill.teacher.max_retries=1", "distill.teacher.timeout_s=0.2"))
        with pytest.raises(TeacherUnavailable) as info:
            run_stage("distill", down)
    finally:
        slow.close()
    message = str(info.value)
    assert slow_url in message and "2 attempts" in message and "timed out" in message
    assert "3 answers received so far" in message and "re-run to resume" in message
    out = down.stage_dir("distill")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["counts"]["failed"] == 2
    assert len(JudgmentCache(out / "answers.sqlite")) == 3

    # the endpoint is back (on another port): only the 2 missing prompts are asked
    server, url = start_server_in_thread(base, chat_model=chat_model, quiet=True)
    try:
        m = run_stage("distill", tiny_cfg(*_http(url, 5)))
        assert m["from_cache"] == 3 and m["asked"] == 2 and server.stats["completions"] == 2
    finally:
        server.close()


def test_http_teacher_malformed_answers_are_retried_then_stop(tiny_cfg, monkeypatch):
    from stages import run_stage
    from stages.distill import TeacherUnavailable
    from stages.http_client import ChatClient

    calls = []

    def malformed(self, body):
        calls.append(body)
        return {"choices": []} if len(calls) > 1 else {"choices": [{"message": {"content": "4"},
                                                                    "finish_reason": "stop"}]}

    monkeypatch.setattr(ChatClient, "post", malformed)
    cfg = tiny_cfg(*_http("http://127.0.0.1:9", 2, "distill.teacher.max_retries=2"))
    with pytest.raises(TeacherUnavailable, match="malformed output 3 times") as info:
        run_stage("distill", cfg)
    assert "1 answers received so far" in str(info.value) and len(calls) == 4
