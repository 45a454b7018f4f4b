"""One client for OpenAI-compatible ``/v1/chat/completions`` endpoints (our own ``pipeline serve``, vLLM, a
hosted API), shared by the HTTP judge (``stages.rlaif.judges.http``) and the distillation teacher
(``stages.distill``).

- ``base_url`` is the API base including the version (``http://127.0.0.1:8000/v1``); a bare
  ``http://host:port`` gets ``/v1`` appended.
- The API key comes from the environment variable named ``api_key_env`` and is held in a :class:`Secret`
  that prints as ``<hidden>``: it never appears in a repr, a log line, a cache or a manifest.
- :meth:`ChatClient.post` retries timeouts, transport errors, HTTP 408/409/425/429/5xx and a 200 whose
  body is not JSON, with exponential backoff and jitter (``Retry-After`` honoured, capped at
  ``backoff_max_s``); after ``max_retries`` retries it raises :class:`EndpointUnavailable`; any other
  HTTP status raises :class:`EndpointRefused` at once (a 401/403 names the key's variable, never the key).
- ``stop`` is an event other threads set to make every pending ``post`` give up before its next attempt.

Nothing here imports ``pipeline.serve``: a stage talks to a server, it does not start one.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
from typing import Any, Callable

RETRY_STATUSES = (408, 409, 425, 429, 500, 502, 503, 504)


class EndpointError(RuntimeError):
    """An endpoint is misconfigured or refused a request for a reason retrying cannot fix."""


class EndpointRefused(EndpointError):
    """The endpoint answered with a non-retryable HTTP status (``status``; ``body``: the start of its text)."""

    def __init__(self, message: str, status: int, body: str):
        super().__init__(message)
        self.status = status
        self.body = body


class EndpointUnavailable(EndpointError):
    """The endpoint stayed down (timeouts, 429/5xx, no connection) through every retry."""

    def __init__(self, message: str, url: str = "", attempts: int = 0):
        super().__init__(message)
        self.url = url
        self.attempts = attempts


class Secret:
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


def api_base(base_url: str | None, label: str) -> str:
    """``base_url`` checked and normalised to end with the API version (``/v1`` added to a bare host)."""
    if not base_url or not base_url.startswith(("http://", "https://")):
        raise EndpointError(f"{label}: base_url must be an http(s) URL, got {base_url!r}")
    base = base_url.rstrip("/")
    if re.fullmatch(r"https?://[^/]+", base):
        base += "/v1"
    return base


def api_key_from_env(api_key_env: str | None, label: str, base: str) -> Secret | None:
    """The key in the environment variable ``api_key_env`` (None when no variable is named)."""
    if not api_key_env:
        return None
    value = os.environ.get(api_key_env)
    if not value:
        raise EndpointError(f"{label}: the environment variable {api_key_env} (api_key_env) is not set or empty; "
                            f"export it with the API key for {base}")
    return Secret(value)


class ChatClient:
    """POSTs chat-completion requests with retries and backoff (see the module docstring).

    Args:
        base_url: the API base (``http://host:port/v1``; ``/v1`` is added to a bare host).
        label: how messages name the caller (``"judge 'remote'"``, ``"distill teacher"``).
        api_key_env: the environment variable holding the bearer token (None: no Authorization header).
        count: called with ``"requests"`` per HTTP answer and ``"retries"`` per retry (statistics).
        logger: where retry warnings go.
    """

    def __init__(self, base_url: str, label: str, api_key_env: str | None = None, timeout_s: float = 30.0,
                 max_retries: int = 4, backoff_s: float = 0.5, backoff_max_s: float = 30.0,
                 count: Callable[[str], Any] | None = None, logger: logging.Logger | None = None):
        import httpx

        self.label = label
        self.base_url = api_base(base_url, label)
        self.url = self.base_url + "/chat/completions"
        self.api_key_env = api_key_env
        self._key = api_key_from_env(api_key_env, label, self.base_url)
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self._count = count or (lambda name: None)
        self._logger = logger or logging.getLogger("alignpipe.http")
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s))
        self.stop = threading.Event()

    def __repr__(self) -> str:
        return f"ChatClient({self.url!r}, auth={'on' if self._key else 'off'})"

    def close(self) -> None:
        self._http.close()

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
        self.stop.wait(delay)

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """One chat completion (the parsed JSON answer). Raises EndpointUnavailable or EndpointRefused."""
        import httpx

        attempts = self.max_retries + 1
        last = ""
        for attempt in range(attempts):
            if self.stop.is_set():
                raise EndpointUnavailable(f"{self.label}: stopped after another request failed", self.url)
            retry_after = None
            try:
                response = self._http.post(self.url, json=body, headers=self._headers())
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout_s:g} s"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                self._count("requests")
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        last = "HTTP 200 with a body that is not JSON"
                elif response.status_code in RETRY_STATUSES:
                    last = f"HTTP {response.status_code}: {response.text[:200]}"
                    retry_after = response.headers.get("Retry-After")
                else:
                    hint = " (check the API key in the environment variable api_key_env names)" \
                        if response.status_code in (401, 403) else ""
                    raise EndpointRefused(f"{self.label}: {self.url} answered HTTP {response.status_code}: "
                                          f"{response.text[:300]}{hint}", response.status_code, response.text[:300])
            if attempt + 1 < attempts:
                self._count("retries")
                self._logger.warning("%s: %s on attempt %d of %d; retrying", self.label, last, attempt + 1, attempts)
                self._sleep_before_retry(attempt, retry_after)
        raise EndpointUnavailable(f"{self.label}: {self.url} did not answer after {attempts} attempts "
                                  f"(last: {last})", self.url, attempts)
