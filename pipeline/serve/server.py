"""The HTTP side of the chat server: request validation, the handler, ``make_server`` and the CLI entry."""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

from ..models import CheckpointError
from .chat import BestOfN, ChatModel, GenerationParams, RequestError, ServeError, load_chat_models

logger = logging.getLogger("alignpipe.serve")

MAX_BODY_BYTES = 8 << 20
MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit; clients written against it never ask for more
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


# ------------------------------------------------------------------------------------ validation
def _num(body: dict[str, Any], key: str, default: Any, kind: type, lo: float | None = None,
         hi: float | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise RequestError(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", param=key)
    value = kind(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RequestError(f"'{key}' must be between {lo} and {hi}, got {value}", param=key)
    return value


def parse_request(body: Any, default_max_tokens: int = 256) -> GenerationParams:
    """Validate a chat-completions body into GenerationParams (RequestError with the offending field)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content}", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}] must have role system, user or assistant", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # the content-parts form: keep the text parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", param="messages")
        clean.append({"role": m["role"], "content": content})
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _num({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, int, 1, 1 << 20)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise RequestError("'logprobs' must be true or false", param="logprobs")
    top = _num(body, "top_logprobs", 0, int, 0, MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    params = GenerationParams(
        messages=clean,
        max_tokens=max_tokens,
        temperature=_num(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_num(body, "top_p", 1.0, float, 0.0, 1.0),
        n=_num(body, "n", 1, int, 1, 16),
        stop=stop,
        seed=_num(body, "seed", None, int),
        stream=bool(body.get("stream", False)),
        logprobs=logprobs,
        top_logprobs=top,
    )
    if params.top_p == 0:
        raise RequestError("'top_p' must be greater than 0", param="top_p")
    if params.stream and (params.n > 1 or params.logprobs):
        raise RequestError("streaming supports n=1 without logprobs on this server", param="stream")
    return params


# ---------------------------------------------------------------------------------------- server
@dataclass
class Faults:
    """Test-only fault injection: fail the first ``fail_first`` completion requests, then answer."""

    fail_first: int = 0
    fail_statuses: tuple[int, ...] = (500,)
    delay_s: float = 0.0


class ChatServer(ThreadingHTTPServer):
    """The HTTP server: holds the model, the expected key, request counters and test faults."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], chat_model: ChatModel | Sequence[ChatModel],
                 api_key: str | None = None, faults: Faults | None = None, quiet: bool = False):
        models = list(chat_model) if isinstance(chat_model, (list, tuple)) else [chat_model]
        self.chat_models = {m.name: m for m in models}  # a request's "model" picks one; the first by default
        self.chat_model = models[0]
        self._api_key = api_key
        self.faults = faults or Faults()
        self.quiet = quiet
        self.stats = {"requests": 0, "completions": 0, "failed_injected": 0, "unauthorized": 0}
        self._stats_lock = threading.Lock()
        super().__init__(address, ChatHandler)

    def __repr__(self) -> str:
        host, port = self.server_address[:2]
        return (f"ChatServer(model={self.chat_model.name!r}, url=http://{host}:{port}/v1, "
                f"auth={'on' if self._api_key else 'off'})")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def pick(self, asked: Any) -> ChatModel:
        """The model a request names (``model``); the first served when it names none."""
        if asked in (None, ""):
            return self.chat_model
        if asked not in self.chat_models:
            served = ", ".join(repr(n) for n in self.chat_models)
            raise RequestError(f"model {asked!r} is not served here; this server serves {served}",
                               status=404, err_type="model_not_found", param="model")
        return self.chat_models[asked]

    def count(self, key: str) -> int:
        with self._stats_lock:
            self.stats[key] += 1
            return self.stats[key]

    def authorized(self, header: str | None) -> bool:
        if not self._api_key:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[7:].strip().encode(), self._api_key.encode())

    def close(self) -> None:
        """Stop serving (when started with ``start_server_in_thread``) and free the socket."""
        self.shutdown()
        self.server_close()


class ChatHandler(BaseHTTPRequestHandler):
    """Routes ``/v1/models`` and ``/v1/chat/completions``; never logs headers or bodies."""

    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if not self.server.quiet:
            logger.info("%s %s", self.address_string(), format % args)

    # ---------------------------------------------------------------------------------- replies
    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, err_type: str, param: str | None = None,
               headers: dict[str, str] | None = None) -> None:
        self._json(status, {"error": {"message": message, "type": err_type, "param": param, "code": None}}, headers)

    def _check_auth(self) -> bool:
        if self.server.authorized(self.headers.get("Authorization")):
            return True
        self.server.count("unauthorized")
        self._error(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", "authentication_error",
                    headers={"WWW-Authenticate": "Bearer"})
        return False

    # ----------------------------------------------------------------------------------- routes
    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self.server.count("requests")
        path = self.path.split("?")[0].rstrip("/")
        if path in ("/health", "/v1/health"):
            self._json(200, {"status": "ok"})
            return
        if not self._check_auth():
            return
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": m.name, "object": "model", "created": m.created, "owned_by": "alignpipe"}
                for m in self.server.chat_models.values()]})
            return
        self._error(404, f"unknown path {path!r}; try /v1/models or POST /v1/chat/completions", "not_found")

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        self.server.count("requests")
        path = self.path.split("?")[0].rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._error(413, f"request body over {MAX_BODY_BYTES} bytes", "invalid_request_error")
            return
        raw = self.rfile.read(length) if length else b""
        if not self._check_auth():
            return
        if path != "/v1/chat/completions":
            self._error(404, f"unknown path {path!r}; POST /v1/chat/completions", "not_found")
            return
        number = self.server.count("completions")
        faults = self.server.faults
        if faults.delay_s:
            time.sleep(faults.delay_s)
        if number <= faults.fail_first:
            self.server.count("failed_injected")
            status = faults.fail_statuses[(number - 1) % len(faults.fail_statuses)]
            headers = {"Retry-After": "0"} if status == 429 else None
            self._error(status, f"injected failure {number} of {faults.fail_first} (test fault)",
                        "rate_limit_error" if status == 429 else "server_error", headers=headers)
            return
        try:
            body = json.loads(raw or b"null")
        except json.JSONDecodeError as exc:
            self._error(400, f"the request body is not valid JSON ({exc.msg})", "invalid_request_error")
            return
        model = self.server.chat_model
        try:
            params = parse_request(body)
            model = self.server.pick(body.get("model"))
            if params.stream:
                self._stream(params, model)
                return
            choices, prompt_tokens = model.generate(params)
        except RequestError as exc:
            self._error(exc.status, str(exc), exc.err_type, exc.param)
            return
        except Exception as exc:  # a model failure must not kill the server
            logger.exception("generation failed")
            self._error(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")
            return
        completion_tokens = sum(c.completion_tokens for c in choices)
        self._json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model.name,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": c.text},
                 "logprobs": {"content": c.logprobs} if c.logprobs is not None else None,
                 "finish_reason": c.finish_reason}
                for i, c in enumerate(choices)
            ],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    def _stream(self, params: GenerationParams, model: ChatModel | None = None) -> None:
        model = model or self.server.chat_model
        stream_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        gen = model.stream(params)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def event(delta: dict[str, Any], finish: str | None) -> None:
            chunk = {"id": stream_id, "object": "chat.completion.chunk", "created": created, "model": model.name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        try:
            event({"role": "assistant", "content": ""}, None)
            for text, finish in gen:
                if finish is None:
                    event({"content": text}, None)
                else:
                    event({}, finish)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            logger.info("client closed the stream early")
        except Exception as exc:
            logger.exception("generation failed while streaming")
            self.wfile.write(f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
                             .encode())
        finally:
            gen.close()


# ----------------------------------------------------------------------------------------- entry
def make_server(checkpoint: str | os.PathLike | Sequence[str | os.PathLike], host: str = "127.0.0.1",
                port: int = 8000,
                api_key: str | None = None, *, chat_model: ChatModel | None = None, model_name: str | None = None,
                dtype: str = "auto", fail_first: int = 0, fail_statuses: Sequence[int] = (500,),
                delay_s: float = 0.0, quiet: bool = False, best_of: int = 0,
                best_of_rm: str | os.PathLike | None = None) -> ChatServer:
    """Load the checkpoint (unless ``chat_model`` is given) and bind a server (not yet serving).

    ``best_of`` > 1 with ``best_of_rm`` (an rm stage folder): every choice is the best of that many samples.
    ``checkpoint`` may be a list: every one is served (``load_chat_models``: adapters on one base when they
    share it), each under its ``<run>/<stage>`` name.

    ``fail_first``/``fail_statuses``/``delay_s`` are fault injection for tests only.
    """
    if best_of and not best_of_rm:
        raise CheckpointError("--best-of needs --best-of-rm outputs/<run>/rm (the reward model that picks)")
    reranker = BestOfN(best_of_rm, best_of) if best_of else None
    several = isinstance(checkpoint, (list, tuple)) and len(checkpoint) > 1
    if several and model_name and chat_model is None:
        raise CheckpointError("--model-name names one model; several checkpoints are served as <run>/<stage>")
    if isinstance(checkpoint, (list, tuple)) and not several:
        checkpoint = checkpoint[0]
    model: ChatModel | list[ChatModel] = chat_model or (
        load_chat_models(checkpoint, dtype=dtype, best_of=reranker) if several
        else ChatModel(checkpoint, dtype=dtype, name=model_name, best_of=reranker))
    faults = Faults(fail_first=fail_first, fail_statuses=tuple(fail_statuses) or (500,), delay_s=delay_s)
    return ChatServer((host, port), model, api_key=api_key, faults=faults, quiet=quiet)


def start_server_in_thread(checkpoint: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
                           api_key: str | None = None, **kwargs: Any) -> tuple[ChatServer, str]:
    """Serve in a daemon thread; returns ``(server, base_url)`` with base_url like ``http://127.0.0.1:PORT/v1``.

    ``port=0`` picks a free port. Stop with ``server.close()``. Keyword arguments go to ``make_server``.
    """
    server = make_server(checkpoint, host, port, api_key, **kwargs)
    thread = threading.Thread(target=server.serve_forever, name="alignpipe-serve", daemon=True)
    thread.start()
    return server, server.url


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` command's arguments (shared with ``python -m pipeline serve``)."""
    parser.add_argument("checkpoint", nargs="+", help="a stage folder (outputs/<run>/<stage>) or a Hugging Face "
                        "folder; several: each served as its own model (adapters on one base when they share it)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-env", default=None,
                        help="name of an environment variable holding the bearer token clients must send")
    parser.add_argument("--model-name", default=None, help="the model id to serve under (default <run>/<stage>)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--best-of", type=int, default=0, metavar="N",
                        help="answer each choice with the best of N samples by --best-of-rm (sampled requests only)")
    parser.add_argument("--best-of-rm", default=None, metavar="DIR", help="the rm stage folder that picks")


def main(args: argparse.Namespace) -> int:
    """Serve until interrupted. ``args``: checkpoint, host, port, api_key_env (+ optional model_name, dtype)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    api_key = None
    env_name = getattr(args, "api_key_env", None)
    if env_name:
        api_key = os.environ.get(env_name)
        if not api_key:
            raise SystemExit(f"error: --api-key-env {env_name}: the environment variable {env_name} is not set "
                             "or empty; export it first (the key is never taken from the command line)")
    if args.host not in LOOPBACK_HOSTS and not api_key:
        logger.warning("serving on %s without an API key: anyone who can reach this port can use the model "
                       "(set --api-key-env)", args.host)
    try:
        server = make_server(args.checkpoint, args.host, args.port, api_key,
                             model_name=getattr(args, "model_name", None), dtype=getattr(args, "dtype", "auto"),
                             best_of=getattr(args, "best_of", 0) or 0, best_of_rm=getattr(args, "best_of_rm", None))
    except ServeError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"[alignpipe] serving {', '.join(repr(n) for n in server.chat_models)} at {server.url} "
          f"(auth {'on' if api_key else 'off'}; Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
