"""AI judges (stages/rlaif/judges/): order swap, constitution, cache, malformed output, the HTTP judge
against our own server on 127.0.0.1 (retries, timeouts, auth, no key leaks) and the HF judge on the tiny
model."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.serve import ChatModel, start_server_in_thread
from stages.rlaif.judges import (
    Constitution,
    FunctionJudge,
    HFJudge,
    HTTPJudge,
    JudgeError,
    JudgeUnavailable,
    JudgmentCache,
    build_judge,
    interpret_pair_value,
    parse_pair_response,
    parse_score_response,
)

torch.set_num_threads(1)

PAIRS = [
    ("What is 6 times 7?", "6 times 7 is 42.", "6 times 7 is 44, I think, but let me ramble on for a while."),
    ([{"role": "user", "content": "Say hi."}], "Hi!", "No."),
]
CONSTITUTION = "configs/constitutions/default.yaml"


# ------------------------------------------------------------------------------------ rule judges
def always_first(prompt: str, first: str, second: str) -> str:
    """A judge with a pure position bias: whatever is shown first wins."""
    return "A"


def prefers_shorter(prompt: str, first: str, second: str, principle: str = "") -> tuple[float, str]:
    assert principle, "the principle text is passed to callables that accept it"
    return (1.0 if len(first) < len(second) else 0.0 if len(first) > len(second) else 0.5), "shorter is better"


def length_score(prompt: str, response: str) -> float:
    return float(len(response))


def unreadable(prompt: str, *responses: str) -> str:
    return "maybe"


def test_position_bias_becomes_ties() -> None:
    judge = FunctionJudge(always_first, Constitution.load(CONSTITUTION))
    results = judge.judge_pairs(PAIRS)
    assert [r.choice for r in results] == ["tie", "tie"]
    assert all(r.prob_a == 0.5 and not r.consistent and not r.malformed for r in results)
    # the raw orders show the bias: the first-shown response always won
    assert all(o["prob_first"] == 1.0 for r in results for o in r.orders)
    assert judge.stats.inconsistent == 2 and judge.stats.ties == 2 and judge.stats.pair_judgments == 2
    assert judge.stats.requests == 4  # both orders asked


def test_consistent_rule_judge_and_spec_string() -> None:
    cfg = load_config("configs/tiny.yaml", [
        "rlaif.judges.rule.kind=function", f"rlaif.judges.rule.function={__name__}:prefers_shorter",
        "rlaif.judges.rule.cache=false",
    ])
    judge = build_judge(cfg, "rule")
    assert isinstance(judge, FunctionJudge) and judge.cache is None
    first, second = judge.judge_pairs(PAIRS)
    assert (first.choice, first.prob_a, first.consistent) == ("A", 1.0, True)
    # "Hi!" and "No." are the same length: a tie in both orders, which is consistent
    assert (second.choice, second.prob_a, second.consistent) == ("tie", 0.5, True)
    assert first.rationale == "shorter is better"
    assert judge.stats.inconsistent == 0


def test_function_scores_and_malformed() -> None:
    scorer = FunctionJudge(length_score)
    assert [p.score for p in scorer.score_many([("q", "abc"), ("q", "abcdef")])] == [3.0, 6.0]
    bad = FunctionJudge(unreadable)
    verdict = bad.judge_pair("q", "x", "y")
    assert verdict.malformed and verdict.choice == "tie" and verdict.prob_a == 0.5
    point = bad.score("q", "x")
    assert point.malformed and point.score == 5.5  # the middle of the 1..10 scale
    assert bad.stats.malformed == 3  # two orders + one score
    assert interpret_pair_value(1.5).prob_first is None and interpret_pair_value(True).prob_first is None
    assert interpret_pair_value({"choice": "b", "rationale": "r"}).prob_first == 0.0


def test_function_spec_errors() -> None:
    with pytest.raises(JudgeError, match="module:function"):
        FunctionJudge("no_colon_here")
    with pytest.raises(JudgeError, match="cannot import"):
        FunctionJudge("not_a_module_xyz:f")
    with pytest.raises(JudgeError, match="no attribute"):
        FunctionJudge("math:not_there")


def test_constitution_sampling_is_deterministic() -> None:
    c = Constitution.load(CONSTITUTION, "sample", seed=3)
    assert len(c.principles) >= 6 and (c.score_min, c.score_max) == (1, 10)
    names = {c.principles_for(f"prompt {i}")[0].name for i in range(60)}
    assert len(names) >= 4  # principles vary across prompts
    again = Constitution.load(CONSTITUTION, "sample", seed=3)
    assert all(c.principles_for(f"p{i}") == again.principles_for(f"p{i}") for i in range(20))
    everything = Constitution.load(CONSTITUTION, "all")
    assert everything.principles_for("x") == everything.principles
    with pytest.raises(JudgeError, match="not found"):
        Constitution.load("configs/constitutions/missing.yaml")


def test_cache_skips_asked_questions(tmp_path: Path) -> None:
    calls = []

    def counting(prompt: str, first: str, second: str) -> float:
        calls.append(1)
        return 0.9 if len(first) < len(second) else 0.1

    cache_path = tmp_path / "cache.sqlite"
    judge = FunctionJudge(counting, cache=JudgmentCache(cache_path))
    first = judge.judge_pairs(PAIRS)
    again = FunctionJudge(counting, cache=JudgmentCache(cache_path))
    second = again.judge_pairs(PAIRS)
    assert len(calls) == 4 and again.stats.cache_hits == 4 and again.stats.requests == 0
    assert [r.prob_a for r in first] == [r.prob_a for r in second]
    # a different rubric is a different question
    other = FunctionJudge(counting, Constitution.load(CONSTITUTION, "all"), cache=JudgmentCache(cache_path))
    other.judge_pairs(PAIRS[:1])
    assert len(calls) == 6


# ----------------------------------------------------------------------------------------- parsing
def test_parse_pair_text_and_json() -> None:
    assert parse_pair_response('{"choice": "B", "rationale": "more accurate"}', None).prob_first == 0.0
    assert parse_pair_response('{"choice": "B", "rationale": "more accurate"}', None).rationale == "more accurate"
    assert parse_pair_response("```json\n{\"choice\": \"Response A\"}\n```", None).prob_first == 1.0
    assert parse_pair_response("A", None).prob_first == 1.0
    assert parse_pair_response("**B** is better", None).prob_first == 0.0
    invalid = parse_pair_response('{"choice": "A", "rationale": ', None)
    assert invalid.prob_first is None and "invalid JSON" in invalid.error
    nolabel = parse_pair_response("Both are fine.", None)
    assert nolabel.prob_first is None and "no label" in nolabel.error
    assert parse_pair_response('{"choice": "C"}', None).prob_first is None
    assert parse_pair_response("", None).prob_first is None


def test_parse_pair_from_logprobs() -> None:
    logprobs = [
        {"token": '{"', "logprob": -0.01, "top_logprobs": []},
        {"token": "choice", "logprob": -0.01, "top_logprobs": []},
        {"token": '": "', "logprob": -0.01, "top_logprobs": []},
        {"token": "A", "logprob": math.log(0.6), "top_logprobs": [
            {"token": "A", "logprob": math.log(0.6)}, {"token": "B", "logprob": math.log(0.3)},
            {"token": " A", "logprob": math.log(0.1)}]},
    ]
    raw = parse_pair_response('{"choice": "A", "rationale": "r"}', logprobs)
    assert raw.source == "logprobs" and raw.prob_first == pytest.approx(0.7) and raw.rationale == "r"


def test_parse_score() -> None:
    assert parse_score_response('{"score": 7, "rationale": "ok"}', None, 1, 10).score == 7
    assert parse_score_response("8/10", None, 1, 10).score == 8
    out_of_range = parse_score_response('{"score": 11}', None, 1, 10)
    assert out_of_range.score is None and "outside" in out_of_range.error
    assert parse_score_response('{"score": ', None, 1, 10).score is None
    assert parse_score_response("great answer", None, 1, 10).score is None
    logprobs = [{"token": "8", "logprob": math.log(0.5), "top_logprobs": [
        {"token": "8", "logprob": math.log(0.5)}, {"token": "6", "logprob": math.log(0.5)},
        {"token": "x", "logprob": math.log(0.1)}]}]
    expected = parse_score_response("8", logprobs, 1, 10)
    assert expected.source == "logprobs" and expected.score == pytest.approx(7.0)
    # "10" split over two tokens: the first token "1" is not the score, keep the text's value
    split = [{"token": "1", "logprob": -0.1, "top_logprobs": []}, {"token": "0", "logprob": -0.1, "top_logprobs": []}]
    assert parse_score_response("10", split, 1, 10).score == 10


# --------------------------------------------------------------------------------------- HTTP judge
@pytest.fixture(scope="module")
def chat_model(tiny_base: str) -> ChatModel:
    return ChatModel(tiny_base, name="tiny")


def _http_judge(url: str, cache_path: Path | None, **kwargs) -> HTTPJudge:
    kwargs.setdefault("max_tokens", 6)
    kwargs.setdefault("backoff_s", 0.01)
    cache = JudgmentCache(cache_path) if cache_path is not None else None
    return HTTPJudge(url, "tiny", Constitution.load(CONSTITUTION), cache=cache, **kwargs)


def test_http_judge_real_requests_and_cache(tmp_path, tiny_base, chat_model) -> None:
    server, url = start_server_in_thread(tiny_base, chat_model=chat_model, quiet=True)
    try:
        judge = _http_judge(url, tmp_path / "c.sqlite", concurrency=3)
        results = judge.judge_pairs(PAIRS)
        scores = judge.score_many([(p, a) for p, a, _ in PAIRS])
        assert server.stats["completions"] == 6  # 2 pairs x 2 orders + 2 scores
        assert judge.stats.requests == 6 and judge.stats.pair_judgments == 2
        for r in results:
            assert 0.0 <= r.prob_a <= 1.0 and r.choice in ("A", "B", "tie") and len(r.orders) == 2
            for order in r.orders:  # each order was read (from logprobs or text) or counted malformed
                assert order["source"] in ("logprobs", "text")
        for s in scores:
            assert 1 <= s.score <= 10
        malformed = sum(o["prob_first"] is None for r in results for o in r.orders) + sum(s.malformed for s in scores)
        assert judge.stats.malformed == malformed
        # a re-run asks nothing: every answer comes from the cache
        rerun = _http_judge(url, tmp_path / "c.sqlite")
        again = rerun.judge_pairs(PAIRS)
        rerun.score_many([(p, a) for p, a, _ in PAIRS])
        assert server.stats["completions"] == 6 and rerun.stats.cache_hits == 6 and rerun.stats.requests == 0
        assert [r.prob_a for r in again] == [r.prob_a for r in results]
    finally:
        server.close()


def test_http_judge_retries_500_then_429(tmp_path, tiny_base, chat_model, caplog) -> None:
    server, url = start_server_in_thread(tiny_base, chat_model=chat_model, quiet=True, fail_first=2,
                                         fail_statuses=(500, 429))
    try:
        judge = _http_judge(url, None, max_retries=3, concurrency=1)
        with caplog.at_level(logging.WARNING, logger="alignpipe.judges"):
            point = judge.score("What is 6 times 7?", "42")
        assert 1 <= point.score <= 10
        assert server.stats["failed_injected"] == 2 and server.stats["completions"] == 3
        assert judge.stats.retries == 2
        assert "HTTP 500" in caplog.text and "HTTP 429" in caplog.text
    finally:
        server.close()


def test_http_judge_timeout_then_unavailable(tmp_path, tiny_base, chat_model) -> None:
    server, url = start_server_in_thread(tiny_base, chat_model=chat_model, quiet=True, delay_s=1.0)
    try:
        judge = _http_judge(url, tmp_path / "c.sqlite", timeout_s=0.2, max_retries=1, concurrency=1)
        started = time.time()
        with pytest.raises(JudgeUnavailable) as info:
            judge.score("q", "r")
        assert time.time() - started < 5
        message = str(info.value)
        assert url in message and "2 attempts" in message and "timed out" in message
        assert info.value.attempts == 2
    finally:
        server.close()


def test_http_judge_down_keeps_what_was_judged(tmp_path, tiny_base, chat_model) -> None:
    server, url = start_server_in_thread(tiny_base, chat_model=chat_model, quiet=True)
    cache_path = tmp_path / "c.sqlite"
    judge = _http_judge(url, cache_path)
    first = judge.judge_pair(*PAIRS[0])
    server.close()  # the endpoint goes away
    down = _http_judge(url, cache_path, max_retries=1, timeout_s=1.0)
    with pytest.raises(JudgeUnavailable, match="kept in the cache"):
        down.judge_pairs(PAIRS)
    assert len(JudgmentCache(cache_path)) == 2  # the first pair's two orders survived
    assert down.judge_pair(*PAIRS[0]).prob_a == first.prob_a  # and are served from the cache
    assert down.stats.cache_hits >= 2


def test_http_judge_api_key_never_leaks(tmp_path, tiny_base, chat_model, monkeypatch, caplog, capsys) -> None:
    key = "sk-judge-test-SECRET-9876"
    monkeypatch.setenv("ALIGNPIPE_TEST_JUDGE_KEY", key)
    caplog.set_level(logging.DEBUG)
    server, url = start_server_in_thread(tiny_base, chat_model=chat_model, api_key=key)
    cache_dir = tmp_path / "cache"
    try:
        cfg = load_config("configs/tiny.yaml", [
            "rlaif.judges.remote.kind=http", f"rlaif.judges.remote.base_url={url}", "rlaif.judges.remote.model=tiny",
            "rlaif.judges.remote.api_key_env=ALIGNPIPE_TEST_JUDGE_KEY", "rlaif.judges.remote.max_retries=0",
        ])
        judge = build_judge(cfg, "remote", cache_path=cache_dir / "judgments.sqlite", max_tokens=4)
        verdict = judge.judge_pair(*PAIRS[0])
        assert 0 <= verdict.prob_a <= 1 and server.stats["completions"] == 2
        texts = [repr(judge), str(judge), repr(judge.__dict__), repr(verdict), str(cfg.to_dict())]
        assert not any(key in t for t in texts)
        # a wrong key is refused (401), not retried, and the error names neither key
        monkeypatch.setenv("ALIGNPIPE_TEST_JUDGE_KEY", "sk-wrong-OTHER-1111")
        wrong = build_judge(cfg, "remote", cache_path=cache_dir / "judgments.sqlite", max_tokens=4)
        with pytest.raises(JudgeError, match="401") as info:
            wrong.score("q", "r")
        assert key not in str(info.value) and "sk-wrong-OTHER-1111" not in str(info.value)
        judge.close()
        wrong.close()
    finally:
        server.close()
    captured = capsys.readouterr()
    assert key not in caplog.text and key not in captured.out and key not in captured.err
    for file in cache_dir.rglob("*"):
        if file.is_file():
            assert key.encode() not in file.read_bytes(), f"the key leaked into {file}"
    monkeypatch.delenv("ALIGNPIPE_TEST_JUDGE_KEY")
    with pytest.raises(JudgeError, match="ALIGNPIPE_TEST_JUDGE_KEY"):
        build_judge(cfg, "remote", cache_path=cache_dir / "judgments.sqlite")


# ----------------------------------------------------------------------------------------- HF judge
@pytest.fixture(scope="module")
def hf_judge(tiny_base: str) -> HFJudge:
    return HFJudge(tiny_base, constitution=Constitution.load(CONSTITUTION), batch_size=8)


def test_hf_judge_probabilities(hf_judge: HFJudge) -> None:
    results = hf_judge.judge_pairs(PAIRS)
    for r in results:
        assert 0.0 <= r.prob_a <= 1.0 and not r.malformed
        first, swapped = (o["prob_first"] for o in r.orders)
        assert 0.0 <= first <= 1.0 and 0.0 <= swapped <= 1.0
        # prob_a averages "a first" with "a second" (1 - P(first wins) when b is shown first) when they agree
        probs_a = [first, 1.0 - swapped]
        if r.consistent:
            assert r.prob_a == pytest.approx(sum(probs_a) / 2)
            assert (r.prob_a > 0.5) == (r.choice == "A")
        else:
            assert r.prob_a == 0.5 and r.choice == "tie"
    scores = hf_judge.score_many([(p, a) for p, a, _ in PAIRS])
    for s in scores:
        assert 1.0 <= s.score <= 10.0 and not s.malformed


def test_hf_judge_batching_matches_single(tiny_base: str, hf_judge: HFJudge) -> None:
    single = HFJudge(tiny_base, constitution=Constitution.load(CONSTITUTION), batch_size=1)
    batched = hf_judge.judge_pairs(PAIRS)
    alone = single.judge_pairs(PAIRS)
    for b, s in zip(batched, alone):
        for ob, os_ in zip(b.orders, s.orders):
            assert ob["prob_first"] == pytest.approx(os_["prob_first"], abs=1e-4)
    bs = hf_judge.score_many([(p, a) for p, a, _ in PAIRS])
    ss = single.score_many([(p, a) for p, a, _ in PAIRS])
    assert [x.score for x in bs] == pytest.approx([x.score for x in ss], abs=1e-3)


def test_hf_judge_multi_token_labels(hf_judge: HFJudge) -> None:
    # "10" is two tokens in the tiny tokenizer: the scorer chains them and keeps "1" from counting "10"
    scorer = hf_judge.score_scorer
    ten = [seq for seq, index in scorer.seqs.items() if index == 9]
    assert any(len(seq) == 2 for seq in ten) and () in scorer.prefixes
    assert any(len(p) == 1 for p in scorer.prefixes)
    assert () not in scorer.chains  # covered by the longer chains' forward passes


def test_hf_judge_score_matches_a_direct_computation(hf_judge: HFJudge) -> None:
    """The expected score equals the chain rule done by hand with one forward pass per prefix."""
    from stages.rlaif.judges import score_messages

    c = hf_judge.constitution
    prompt, response = "What is 6 times 7?", "42"
    point = hf_judge.score(prompt, response)
    messages = score_messages(c, c.principles_for(prompt), prompt, response, "label")
    ids = hf_judge.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def next_logprobs(extra: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = hf_judge.model(input_ids=torch.tensor([list(ids) + extra])).logits[0, -1]
        return torch.log_softmax(logits.float(), -1)

    cache: dict[tuple[int, ...], torch.Tensor] = {}
    mass = {}
    for seq, index in hf_judge.score_scorer.seqs.items():
        logp = 0.0
        for j in range(len(seq)):
            prefix = seq[:j]
            if prefix not in cache:
                cache[prefix] = next_logprobs(list(prefix))
            logp += float(cache[prefix][seq[j]])
        p = math.exp(logp)
        longer = [s for s in hf_judge.score_scorer.seqs if len(s) > len(seq) and s[:len(seq)] == seq]
        if longer:
            dist = next_logprobs(list(seq))
            p *= 1 - sum(math.exp(float(dist[s[len(seq)]])) for s in {x[:len(seq) + 1] for x in longer})
        mass[index] = mass.get(index, 0.0) + p
    total = sum(mass.values())
    expected = sum(hf_judge.score_values[i] * m / total for i, m in mass.items())
    assert point.score == pytest.approx(expected, abs=1e-4)


def test_build_hf_judge_from_config(tmp_path: Path) -> None:
    cfg = load_config("configs/tiny.yaml")  # its "default" judge is the rule-based one; "hf" the tiny base
    judge = build_judge(cfg, "hf", cache_path=tmp_path / "j.sqlite")
    assert isinstance(judge, HFJudge)
    judge.judge_pairs(PAIRS[:1])
    assert judge.stats.requests == 2
    judge.judge_pairs(PAIRS[:1])
    assert judge.stats.requests == 2 and judge.stats.cache_hits == 2
    with pytest.raises(JudgeError, match="no judge named"):
        build_judge(cfg, "nope")


# ------------------------------------------------------------------- HTTP judge vs. a scripted endpoint
class _Scripted:
    """A minimal OpenAI-style endpoint that answers with scripted texts and refuses logprobs."""

    def __init__(self, answers: list[str]):
        import json as _json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.answers = list(answers)
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = _json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                if body.get("logprobs"):
                    status, payload = 400, {"error": {"message": "logprobs are not supported by this model"}}
                else:
                    status = 200
                    payload = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                                    "content": outer.answers.pop(0)}}]}
                data = _json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"  # no /v1: the judge appends it

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_http_judge_text_answers_and_malformed_counts() -> None:
    endpoint = _Scripted([
        '{"choice": "A", "rationale": "correct"}', '{"choice": "B", "rationale": "correct"}',  # consistent: a wins
        '{"choice": "A", "rationale": ',  # invalid JSON
        "I cannot decide.",  # no label
        '{"score": 11}',  # out of range
        '{"score": 8, "rationale": "fine"}',
    ])
    try:
        judge = HTTPJudge(endpoint.url, "m", max_retries=0, concurrency=1, backoff_s=0.01)
        good, bad = judge.judge_pairs(PAIRS)
        assert (good.choice, good.prob_a, good.consistent, good.rationale) == ("A", 1.0, True, "correct")
        assert bad.malformed and bad.choice == "tie" and bad.prob_a == 0.5
        errors = [o["error"] for o in bad.orders]
        assert "invalid JSON" in errors[0] and "no label" in errors[1]
        out_of_range, fine = judge.score_many([("q", "r1"), ("q", "r2")])
        assert out_of_range.malformed and out_of_range.score == 5.5 and fine.score == 8.0
        assert judge.stats.malformed == 3 and judge.stats.ties == 1
        # the refusal of logprobs cost one request and no retry; later requests do not ask for them
        assert judge.use_logprobs is False and judge.stats.retries == 0
        assert endpoint.bodies[0].get("logprobs") and not any(b.get("logprobs") for b in endpoint.bodies[1:])
        assert all(b["model"] == "m" and b["temperature"] == 0 for b in endpoint.bodies)
    finally:
        endpoint.close()
