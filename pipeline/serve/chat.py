"""The models a chat server serves: one checkpoint's chat model, best-of-N reranking, adapters on one base.

Generation only: nothing here speaks HTTP (``pipeline.serve.server`` does).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..models import CheckpointError, resolve_checkpoint

logger = logging.getLogger("alignpipe.serve")

ServeError = CheckpointError  # what the server raises when a checkpoint cannot be served


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
    from ..config import resolve_path

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

        from ..config import ModelConfig

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

        from ..config import ModelConfig
        from ..models import load_model, load_tokenizer

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
        choices = [self._choice(p, row, seq, eos, logprob_steps) for row, seq in enumerate(sequences)]
        if per_choice > 1:
            choices = [self.best_of.pick(p.messages, choices[i * per_choice:(i + 1) * per_choice])
                       for i in range(p.n)]
        return choices, len(ids)

    def _choice(self, p: GenerationParams, row: int, seq: list[int], eos: int | None,
                logprob_steps: list[Any] | None) -> Choice:
        """One generated row -> its Choice: tokens up to eos (pads dropped), cut at a stop string, and the
        log-probs of its tokens when asked for."""
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
        return Choice(text, finish, len(tokens), entries)

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
    from ..config import resolve_path

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
    from ..config import resolve_path

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

    from ..config import ModelConfig, resolve_path
    from ..models import load_model, load_tokenizer

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
