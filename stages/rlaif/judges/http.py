"""``HTTPJudge``: any OpenAI-compatible ``/v1/chat/completions`` endpoint (our own ``pipeline.serve``,
vLLM, a hosted API). The label is read from the returned logprobs when there are any, else from the
text. Timeouts, retries with exponential backoff on 429/5xx/timeouts, a thread pool of ``concurrency``
requests, and ``JudgeUnavailable`` (with what was judged kept in the cache) when the endpoint stays
down. The API key comes from the environment variable named in the config and never appears in a repr,
a log line, the cache or a manifest."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Callable

from .cache import JudgmentCache
from .constitution import Constitution, pair_messages, score_messages
from .interface import JudgeError, JudgeUnavailable, RawPair, RawScore, parse_pair_response, parse_score_response
from .judge import Judge, _Job

logger = logging.getLogger("alignpipe.judges")


class _Secret:
    """Holds an API key; prints as ``<hidden>`` so no repr, f-string or log line can leak it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<hidden>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("an API key is not picklable")


class HTTPJudge(Judge):
    """A judge behind an OpenAI-compatible chat-completions endpoint.

    ``base_url`` is the API base including the version (``http://127.0.0.1:8000/v1``); a bare
    ``http://host:port`` gets ``/v1`` appended. Requests ask for greedy decoding (temperature 0) with
    logprobs; a server that refuses logprobs is asked again without them.
    """

    kind = "http"
    RETRY_STATUSES = (408, 409, 425, 429, 500, 502, 503, 504)

    def __init__(self, base_url: str, model: str | None, constitution: Constitution | None = None,
                 cache: JudgmentCache | None = None, name: str = "http", swap: bool = True,
                 api_key_env: str | None = None, timeout_s: float = 30.0, max_retries: int = 4,
                 concurrency: int = 4, max_tokens: int = 96, backoff_s: float = 0.5, backoff_max_s: float = 30.0,
                 top_logprobs: int = 20):
        super().__init__(constitution, cache, name, swap)
        import httpx

        if not base_url or not base_url.startswith(("http://", "https://")):
            raise JudgeError(f"judge {name!r}: base_url must be an http(s) URL, got {base_url!r}")
        base = base_url.rstrip("/")
        if re.fullmatch(r"https?://[^/]+", base):
            base += "/v1"
        self.base_url = base
        self.url = base + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self._key: _Secret | None = None
        if api_key_env:
            value = os.environ.get(api_key_env)
            if not value:
                raise JudgeError(f"judge {name!r}: the environment variable {api_key_env} (api_key_env) is not set "
                                 f"or empty; export it with the API key for {self.base_url}")
            self._key = _Secret(value)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.top_logprobs = top_logprobs
        self.use_logprobs = True
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s))
        self._stop = threading.Event()

    def identity(self) -> dict[str, Any]:
        return {"kind": "http", "base_url": self.base_url, "model": self.model, "max_tokens": self.max_tokens,
                "temperature": 0}

    def close(self) -> None:
        self._client.close()
        super().close()

    # ------------------------------------------------------------------------------- requests
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._key is not None:
            headers["Authorization"] = "Bearer " + self._key.reveal()
        return headers

    def _sleep_before_retry(self, attempt: int, retry_after: str | None) -> None:
        delay = min(self.backoff_max_s, self.backoff_s * (2 ** attempt)) * (0.5 + random.random() / 2)
        if retry_after:
            try:
                delay = max(delay, min(self.backoff_max_s, float(retry_after)))
            except ValueError:
                pass
        self._stop.wait(delay)

    def post(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """One chat completion with retries. Raises JudgeUnavailable or JudgeError (non-retryable 4xx)."""
        import httpx

        attempts = self.max_retries + 1
        last = ""
        attempt = -1
        while attempt + 1 < attempts:
            attempt += 1
            if self._stop.is_set():
                raise JudgeUnavailable(f"judge {self.name!r}: stopped after another request failed", self.url)
            body: dict[str, Any] = {"messages": messages, "max_tokens": self.max_tokens, "temperature": 0}
            if self.model:
                body["model"] = self.model
            if self.use_logprobs:
                body.update(logprobs=True, top_logprobs=self.top_logprobs)
            retry_after = None
            try:
                response = self._client.post(self.url, json=body, headers=self._headers())
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout_s:g} s"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                self.stats.add("requests")
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        last = "HTTP 200 with a body that is not JSON"
                elif response.status_code == 400 and self.use_logprobs and "logprob" in response.text.lower():
                    logger.info("judge %r: the endpoint refuses logprobs; reading labels from text", self.name)
                    self.use_logprobs = False
                    attempt -= 1  # asking again without logprobs is not a retry
                    continue
                elif response.status_code in self.RETRY_STATUSES:
                    last = f"HTTP {response.status_code}: {response.text[:200]}"
                    retry_after = response.headers.get("Retry-After")
                else:
                    hint = " (check the API key in the environment variable api_key_env names)" \
                        if response.status_code in (401, 403) else ""
                    raise JudgeError(f"judge {self.name!r}: {self.url} answered HTTP {response.status_code}: "
                                     f"{response.text[:300]}{hint}")
            if attempt + 1 < attempts:
                self.stats.add("retries")
                logger.warning("judge %r: %s on attempt %d of %d; retrying", self.name, last, attempt + 1, attempts)
                self._sleep_before_retry(attempt, retry_after)
        raise JudgeUnavailable(f"judge {self.name!r}: {self.url} did not answer after {attempts} attempts "
                               f"(last: {last})", self.url, attempts)

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
