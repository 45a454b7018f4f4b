"""An OpenAI-compatible chat server for any stage's policy (``make serve CHECKPOINT=outputs/<run>/<stage>``).

Endpoints (JSON, the subset of the OpenAI API that chat clients and our HTTP judge use):

- ``GET /v1/models``: the models served (one per checkpoint; a request's ``model`` picks one, the first by
  default).
- ``POST /v1/chat/completions``: ``messages``, ``max_tokens`` (or ``max_completion_tokens``),
  ``temperature`` (0 = greedy), ``top_p``, ``n``, ``stop``, ``seed``, ``stream`` (server-sent events,
  ``n=1``), ``logprobs`` + ``top_logprobs`` (log-probabilities of the model's own distribution, before
  temperature/top-p, at every generated token).

The checkpoint is a stage folder (``<dir>/model`` holds the weights, the tokenizer and chat template sit
in ``<dir>``) or a plain Hugging Face folder. Several stage folders trained with a PEFT method on the same
base (``serve outputs/run/sft outputs/run/dpo``: each has ``adapter/`` and its manifest's ``base_model``) are
served on one copy of the base, one adapter each, switched per request (``set_adapter``: no reload); other
sets of checkpoints are loaded as separate models (``load_chat_models``). The chat template saved with the
stage is applied to every request, and the stage's system prompt (from its manifest) is prepended when a
request has none.

Safety: binds 127.0.0.1 unless told otherwise; an optional bearer token is read from the environment
variable named by ``--api-key-env`` (never from the command line, never logged). Generation runs one
request at a time behind a lock, so concurrent clients queue rather than compete for memory.

Built on the standard library's ``ThreadingHTTPServer``: no web framework to install or pin.
``start_server_in_thread`` runs one in a background thread for tests and for the judge benchmark; its
``fail_first``/``fail_statuses``/``delay_s`` arguments inject faults for the judge's retry tests.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, Sequence

from .models import CheckpointError, resolve_checkpoint

logger = logging.getLogger("alignpipe.serve")

ServeError = CheckpointError  # what the server raises when a checkpoint cannot be served

MAX_BODY_BYTES = 8 << 20
MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit; clients written against it never ask for more
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class RequestError(ValueError):
    """A request is invalid; carries the HTTP status and an OpenAI-style error type."""

    def __init__(self, message: str, status: int = 400, err_type: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.param = param


# ------------------------------------------------------------------------------------ checkpoints
def stage_system_prompt(checkpoint: str | os.PathLike) -> str | None:
    """The system prompt the stage was trained with (its manifest's chat format), if any."""
    from .config import resolve_path

    path = resolve_path(checkpoint) / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return ((manifest.get("chat_format") or {}).get("system_prompt")) or None


# ------------------------------------------------------------------------------------------ model
@dataclass
class Choice:
    """One generated completion."""

    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[dict[str, Any]] | None = None


@dataclass
class GenerationParams:
    """Validated request parameters."""

    messages: list[dict[str, str]]
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


class BestOfN:
    """Inference-time best-of-N (rejection sampling): each choice a request gets is the best of ``n`` sampled
    candidates by a reward model, an ``rm`` stage folder (``--best-of N --best-of-rm outputs/<run>/rm``).

    Candidates are scored as text in the RM's own training layout (``stages.scoring.score_responses``, so an
    RM with another tokenizer works too); a candidate that ended with eos is preferred to one cut at the
    length limit, whatever their scores (a cut-off answer would be scored as if it had finished).
    """

    def __init__(self, rm_dir: str | os.PathLike, n: int):
        from stages.scoring import load_reward_model

        from .config import ModelConfig

        if n < 2:
            raise CheckpointError(f"--best-of {n}: best-of-N needs at least 2 candidates per choice")
        self.n = n
        self.rm_dir = str(rm_dir)
        try:
            self.model, self.tokenizer = load_reward_model(rm_dir, ModelConfig(source="local", path=str(rm_dir)))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"--best-of-rm {rm_dir}: {exc}") from exc
        self.system_prompt = stage_system_prompt(rm_dir)

    def scores(self, messages: list[dict[str, str]], texts: list[str]) -> list[float]:
        """(N,) RM scores of the candidate texts for one prompt."""
        import torch

        from stages.scoring import score_responses

        with torch.no_grad():
            values = score_responses(self.model, self.tokenizer, [messages] * len(texts), texts,
                                     system_prompt=self.system_prompt)
        return [float(v) for v in values]

    def pick(self, messages: list[dict[str, str]], candidates: list["Choice"]) -> "Choice":
        """The best candidate: finished before unfinished, then the highest RM score (first on ties)."""
        scores = self.scores(messages, [c.text for c in candidates])
        best = max(range(len(candidates)), key=lambda i: (candidates[i].finish_reason == "stop", scores[i], -i))
        return candidates[best]


class ChatModel:
    """A causal LM + tokenizer that answers chat requests, one generate at a time (optionally best-of-N)."""

    def __init__(self, checkpoint: str | os.PathLike, dtype: str = "auto", device: str | None = None,
                 trust_remote_code: bool = False, name: str | None = None, best_of: BestOfN | None = None):
        import torch

        from .config import ModelConfig
        from .models import load_model, load_tokenizer

        model_dir, tok_dir = resolve_checkpoint(checkpoint)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
        mcfg = ModelConfig(source="local", path=str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code)
        self.tokenizer = load_tokenizer(str(tok_dir), mcfg)
        self.tokenizer.padding_side = "left"
        self.model = load_model(str(model_dir), mcfg, self.tokenizer).to(self.device).eval()
        self.system_prompt = stage_system_prompt(checkpoint)
        root = model_dir.parent if model_dir.name == "model" and model_dir != tok_dir else model_dir
        if model_dir.name == "model" and (root / "manifest.json").exists():
            root = model_dir.parent
        # a stage folder is named after its run and stage ("tiny/sft"); a plain folder after itself
        self.name = name or (f"{root.parent.name}/{root.name}" if root != model_dir else root.name)
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.lock = threading.Lock()
        self.created = int(time.time())
        self.best_of = best_of

    # -------------------------------------------------------------------------------- prompting
    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The request's prompt in the training layout (``stages.chat.prompt_ids``, stage system prompt)."""
        from stages.chat import prompt_ids

        return prompt_ids(self.tokenizer, messages, self.system_prompt)

    def _limit_new_tokens(self, prompt_len: int, max_tokens: int) -> int:
        if self.max_positions:
            room = self.max_positions - prompt_len
            if room <= 0:
                raise RequestError(
                    f"the prompt is {prompt_len} tokens, the model's context is {self.max_positions}",
                    param="messages", err_type="context_length_exceeded")
            return min(max_tokens, room)
        return max_tokens

    def _gen_kwargs(self, p: GenerationParams, new_tokens: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            max_new_tokens=new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        if p.temperature > 0:
            kwargs.update(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    @staticmethod
    def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
        cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def _token_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    # ------------------------------------------------------------------------------- generation
    def generate(self, p: GenerationParams) -> tuple[list[Choice], int]:
        """All ``n`` choices for one request and the prompt length in tokens."""
        import torch

        ids = self.prompt_ids(p.messages)
        new_tokens = self._limit_new_tokens(len(ids), p.max_tokens)
        eos = self.tokenizer.eos_token_id
        with self.lock:
            if p.seed is not None:
                torch.manual_seed(p.seed)
            input_ids = torch.tensor([ids], device=self.device)
            # greedy decoding gives n identical choices: decode once and repeat it; best-of-N samples
            # best_of.n candidates for every choice (greedy would make them identical: no choice to make)
            per_choice = self.best_of.n if self.best_of is not None and p.temperature > 0 else 1
            samples = p.n * per_choice if p.temperature > 0 else 1
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                    num_return_sequences=samples, return_dict_in_generate=True,
                    output_logits=p.logprobs, **self._gen_kwargs(p, new_tokens),
                )
            sequences = out.sequences[:, len(ids):].tolist()
            logprob_steps = None
            if p.logprobs:
                logprob_steps = [torch.log_softmax(step.float(), dim=-1).cpu() for step in out.logits]
            if samples < p.n:
                sequences = sequences * p.n
                if logprob_steps is not None:
                    logprob_steps = [step.expand(p.n, -1) for step in logprob_steps]
        choices = []
        for row, seq in enumerate(sequences):
            tokens: list[int] = []
            finish = "length"
            for tok in seq:
                if tok == eos:
                    finish = "stop"
                    break
                if tok == self.tokenizer.pad_token_id:
                    continue
                tokens.append(tok)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            text, stopped = self._cut_at_stop(text, p.stop)
            if stopped:
                finish = "stop"
            entries = None
            if logprob_steps is not None:
                entries = []
                for step, tok in enumerate(tokens):
                    dist = logprob_steps[step][row]
                    entry = self._token_entry(tok, float(dist[tok]))
                    if p.top_logprobs:
                        values, indices = dist.topk(p.top_logprobs)
                        entry["top_logprobs"] = [self._token_entry(int(i), float(v))
                                                 for v, i in zip(values.tolist(), indices.tolist())]
                    else:
                        entry["top_logprobs"] = []
                    entries.append(entry)
            choices.append(Choice(text, finish, len(tokens), entries))
        if per_choice > 1:
            choices = [self.best_of.pick(p.messages, choices[i * per_choice:(i + 1) * per_choice])
                       for i in range(p.n)]
        return choices, len(ids)

    def stream(self, p: GenerationParams) -> Iterator[tuple[str, str | None]]:
        """Yield ``(text_delta, None)`` while generating and ``("", finish_reason)`` at the end (n=1)."""
        import torch
        from transformers import TextIteratorStreamer

        if self.best_of is not None:
            raise RequestError("streaming is not available on a server started with --best-of (the answer is "
                               "chosen after all candidates are generated); send stream: false", param="stream")
        ids = self.prompt_ids(p.messages)
        new_tokens = self._limit_new_tokens(len(ids), p.max_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                if p.seed is not None:
                    torch.manual_seed(p.seed)
                input_ids = torch.tensor([ids], device=self.device)
                with torch.no_grad():
                    result["out"] = self.model.generate(
                        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                        **self._gen_kwargs(p, new_tokens))
            except BaseException as exc:  # reported to the client below
                result["error"] = exc
                streamer.end()

        with self.lock:
            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            emitted = ""
            stopped = False
            try:
                for piece in streamer:
                    if stopped or not piece:
                        continue
                    candidate, stopped = self._cut_at_stop(emitted + piece, p.stop)
                    delta = candidate[len(emitted):]
                    emitted = candidate
                    if delta:
                        yield delta, None
            finally:
                # also when the client went away: the lock is released only once generate has returned
                worker.join()
        if "error" in result:
            raise result["error"]
        seq = result["out"][0, len(ids):].tolist()
        finish = "stop" if stopped or self.tokenizer.eos_token_id in seq else "length"
        yield "", finish


# ------------------------------------------------------------------------------- several adapters
def stage_adapter(checkpoint: str | os.PathLike) -> tuple[Path, str] | None:
    """(``adapter/`` folder, base model) of a stage folder trained with a PEFT method, else None.

    The base is the manifest's ``base_model`` (as ``stages.tuning.load_trained`` reads it), resolved to an
    absolute folder when it is a local path, so two stages of one run compare equal."""
    from .config import resolve_path

    folder = resolve_path(checkpoint)
    adapter = folder / "adapter"
    if not (adapter / "adapter_config.json").exists() or not (folder / "manifest.json").exists():
        return None
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except json.JSONDecodeError:
        return None
    base = (manifest.get("metrics") or {}).get("base_model") or manifest.get("base_model")
    if not base:
        return None
    local = resolve_path(base)
    return adapter, str(local.resolve()) if local.exists() else str(base)


def _stage_name(checkpoint: str | os.PathLike) -> str:
    from .config import resolve_path

    folder = resolve_path(checkpoint)
    return f"{folder.parent.name}/{folder.name}"


class _AdapterSwitch:
    """The ``model`` of one adapter's ChatModel: ``generate`` first makes this adapter the active one on the
    shared PEFT model. ChatModel calls it while holding the lock all the adapters share, so requests to
    different adapters never interleave, and a switch is a pointer change (no weights move)."""

    def __init__(self, peft_model: Any, adapter: str):
        self.peft_model = peft_model
        self.adapter = adapter
        self.config = peft_model.config

    def generate(self, **kwargs: Any) -> Any:
        if self.peft_model.active_adapter != self.adapter:
            self.peft_model.set_adapter(self.adapter)
        return self.peft_model.generate(**kwargs)


def load_adapter_models(checkpoints: Sequence[str | os.PathLike], dtype: str = "auto", device: str | None = None,
                        trust_remote_code: bool = False) -> list[ChatModel]:
    """One ChatModel per stage folder, all on one copy of their shared base with one adapter each
    (``stages.tuning.load_adapters``), named ``<run>/<stage>``. CheckpointError when a folder has no
    adapter + base_model or the bases differ."""
    import torch

    from stages.tuning import load_adapters

    from .config import ModelConfig, resolve_path
    from .models import load_model, load_tokenizer

    found = [stage_adapter(c) for c in checkpoints]
    for checkpoint, item in zip(checkpoints, found):
        if item is None:
            raise CheckpointError(f"{checkpoint}: no adapter/ with a base_model in its manifest, so it cannot "
                                  "share a base with the others")
    bases = sorted({item[1] for item in found if item is not None})
    if len(bases) != 1:
        raise CheckpointError(f"the adapters were trained on different bases ({', '.join(bases)})")
    names = [_stage_name(c) for c in checkpoints]
    if len(set(names)) != len(names):
        raise CheckpointError(f"two checkpoints have the same name <run>/<stage>: {names}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    mcfg = ModelConfig(source="local", path=bases[0], dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(str(resolve_path(checkpoints[0])), mcfg)  # a stage folder holds its tokenizer
    tokenizer.padding_side = "left"
    base = load_model(bases[0], mcfg, tokenizer)
    adapter_ids = {f"adapter_{i}": item[0] for i, item in enumerate(found) if item is not None}
    peft_model = load_adapters(base, adapter_ids).to(device).eval()
    lock = threading.Lock()
    models = []
    for checkpoint, name, adapter in zip(checkpoints, names, adapter_ids):
        model = ChatModel.__new__(ChatModel)
        model.device, model.tokenizer, model.model = device, tokenizer, _AdapterSwitch(peft_model, adapter)
        model.system_prompt = stage_system_prompt(checkpoint)
        model.name = name
        model.max_positions = int(getattr(peft_model.config, "max_position_embeddings", 0) or 0)
        model.lock, model.created, model.best_of = lock, int(time.time()), None
        models.append(model)
    return models


def load_chat_models(checkpoints: Sequence[str | os.PathLike], dtype: str = "auto",
                     best_of: BestOfN | None = None) -> list[ChatModel]:
    """The models of several checkpoints: adapters on one shared base when every checkpoint is a PEFT stage
    on the same base (``load_adapter_models``), else one full model each."""
    try:
        models = load_adapter_models(checkpoints, dtype=dtype)
        logger.info("serving %d adapters on one base", len(models))
    except CheckpointError as exc:
        logger.info("loading %d separate models (%s)", len(checkpoints), exc)
        models = [ChatModel(c, dtype=dtype) for c in checkpoints]
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise CheckpointError(f"two checkpoints are served under the same name: {names}")
    for model in models:
        model.best_of = best_of
    return models


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


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m pipeline.serve", description=__doc__.split("\n\n")[0])
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
