"""``HTTPJudge``: any OpenAI-compatible ``/v1/chat/completions`` endpoint (our own ``pipeline.serve``,
vLLM, a hosted API). The label is read from the returned logprobs when there are any, else from the
text. Timeouts, retries with exponential backoff on 429/5xx/timeouts, a thread pool of ``concurrency``
requests, and ``JudgeUnavailable`` (with what was judged kept in the cache) when the endpoint stays
down. The API key comes from the environment variable named in the config and never appears in a repr,
a log line, the cache or a manifest."""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Callable

from stages.http_client import ChatClient, EndpointError, EndpointRefused, EndpointUnavailable

from .cache import JudgmentCache
from .constitution import Constitution, pair_messages, score_messages
from .interface import JudgeError, JudgeUnavailable, RawPair, RawScore, parse_pair_response, parse_score_response
from .judge import Judge, _Job

logger = logging.getLogger("alignpipe.judges")


class HTTPJudge(Judge):
    """A judge behind an OpenAI-compatible chat-completions endpoint.

    ``base_url`` is the API base including the version (``http://127.0.0.1:8000/v1``); a bare
    ``http://host:port`` gets ``/v1`` appended. Requests ask for greedy decoding (temperature 0) with
    logprobs; a server that refuses logprobs is asked again without them.
    """

    kind = "http"

    def __init__(self, base_url: str, model: str | None, constitution: Constitution | None = None,
                 cache: JudgmentCache | None = None, name: str = "http", swap: bool = True,
                 api_key_env: str | None = None, timeout_s: float = 30.0, max_retries: int = 4,
                 concurrency: int = 4, max_tokens: int = 96, backoff_s: float = 0.5, backoff_max_s: float = 30.0,
                 top_logprobs: int = 20):
        super().__init__(constitution, cache, name, swap)
        try:
            self._http = ChatClient(base_url, f"judge {name!r}", api_key_env=api_key_env, timeout_s=timeout_s,
                                    max_retries=max_retries, backoff_s=backoff_s, backoff_max_s=backoff_max_s,
                                    count=self.stats.add, logger=logger)
        except EndpointError as exc:
            raise JudgeError(str(exc)) from None
        self.base_url = self._http.base_url
        self.url = self._http.url
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.top_logprobs = top_logprobs
        self.use_logprobs = True
        self._stop = self._http.stop

    def identity(self) -> dict[str, Any]:
        return {"kind": "http", "base_url": self.base_url, "model": self.model, "max_tokens": self.max_tokens,
                "temperature": 0}

    def close(self) -> None:
        self._http.close()
        super().close()

    # ------------------------------------------------------------------------------- requests
    def post(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """One chat completion with retries (``stages.http_client.ChatClient``). Raises JudgeUnavailable or
        JudgeError (non-retryable 4xx). A server that refuses logprobs is asked again without them (not a
        retry) and is not asked for them again."""
        while True:
            body: dict[str, Any] = {"messages": messages, "max_tokens": self.max_tokens, "temperature": 0}
            if self.model:
                body["model"] = self.model
            if self.use_logprobs:
                body.update(logprobs=True, top_logprobs=self.top_logprobs)
            try:
                return self._http.post(body)
            except EndpointUnavailable as exc:
                raise JudgeUnavailable(str(exc), exc.url, exc.attempts) from None
            except EndpointRefused as exc:
                if exc.status == 400 and self.use_logprobs and "logprob" in exc.body.lower():
                    logger.info("judge %r: the endpoint refuses logprobs; reading labels from text", self.name)
                    self.use_logprobs = False
                    continue
                raise JudgeError(str(exc)) from None

    def _answer(self, job: _Job) -> RawPair | RawScore:
        c = self.constitution
        if job.kind == "pair":
            messages = pair_messages(c, job.principles, job.prompt, job.responses[0], job.responses[1], "json")
        else:
            messages = score_messages(c, job.principles, job.prompt, job.responses[0], "json")
        data = self.post(messages)
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content")
            logprobs = (choice.get("logprobs") or {}).get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            bad = json.dumps(data)[:500]
            return (RawPair(None, None, bad, "text", "no choices in the response") if job.kind == "pair"
                    else RawScore(None, bad, "text", "no choices in the response"))
        if job.kind == "pair":
            return parse_pair_response(content, logprobs)
        return parse_score_response(content, logprobs, c.score_min, c.score_max)

    def _answer_many(self, jobs: list[_Job], done: Callable[[_Job, RawPair | RawScore], None]) -> None:
        if not jobs:
            return
        self._stop.clear()
        finished = 0
        lock = threading.Lock()

        def work(job: _Job) -> None:
            nonlocal finished
            raw = self._answer(job)
            with lock:
                done(job, raw)
                finished += 1

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs)),
                                thread_name_prefix=f"judge-{self.name}") as pool:
            futures = [pool.submit(work, job) for job in jobs]
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            error = next((f.exception() for f in futures if f.done() and f.exception() is not None), None)
            if error is not None:
                self._stop.set()
                for future in pending:
                    future.cancel()
        if error is None:
            return
        if isinstance(error, JudgeUnavailable):
            kept = (f"; the {finished} answers received before are kept in the cache {self.cache.path}"
                    if self.cache is not None else f"; {finished} answers were received (the cache is off)")
            raise JudgeUnavailable(str(error) + kept, error.url or self.url, error.attempts, finished) from error
        raise error
