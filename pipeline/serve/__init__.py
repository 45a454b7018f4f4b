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

Modules: ``chat`` (the models and generation), ``server`` (HTTP, validation, the entry point).

Built on the standard library's ``ThreadingHTTPServer``: no web framework to install or pin.
``start_server_in_thread`` runs one in a background thread for tests and for the judge benchmark; its
``fail_first``/``fail_statuses``/``delay_s`` arguments inject faults for the judge's retry tests.
"""

from ..models import resolve_checkpoint
from .chat import (
    BestOfN,
    ChatModel,
    Choice,
    GenerationParams,
    RequestError,
    ServeError,
    _AdapterSwitch,
    load_adapter_models,
    load_chat_models,
    stage_adapter,
    stage_system_prompt,
)
from .server import (
    LOOPBACK_HOSTS,
    MAX_BODY_BYTES,
    MAX_TOP_LOGPROBS,
    ChatHandler,
    ChatServer,
    Faults,
    add_arguments,
    main,
    make_server,
    parse_request,
    start_server_in_thread,
)

__all__ = [
    "BestOfN",
    "ChatHandler",
    "ChatModel",
    "ChatServer",
    "Choice",
    "Faults",
    "GenerationParams",
    "LOOPBACK_HOSTS",
    "MAX_BODY_BYTES",
    "MAX_TOP_LOGPROBS",
    "RequestError",
    "ServeError",
    "_AdapterSwitch",
    "add_arguments",
    "load_adapter_models",
    "load_chat_models",
    "main",
    "make_server",
    "parse_request",
    "resolve_checkpoint",
    "stage_adapter",
    "stage_system_prompt",
    "start_server_in_thread",
]
