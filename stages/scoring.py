"""Reward scoring: what reads a reward model, kept apart from training one (``stages.rm``).

Where a reward model is read depends on who trained it (DESIGN §3; :func:`reward_reading` decides,
the PPO manifest records it as ``reward_model_read``):

- ``trained_position`` (``READ_TRAINED``): an RM our ``rm`` stage trained (its manifest, or the
  ``reward_reading.json`` it writes into ``model/``, says so; an rm stage folder written before that
  field existed is recognised by its manifest's stage name). The score is read at the last real token
  of prompt + response (the response's eos; the position is ``stages.chat.last_token_index``), from the
  model's per-token head outputs captured in fp32 (``token_scores``), not from Hugging Face's
  sequence-classification pooling (which searches for pad ids). Position ids follow the attention mask,
  so a left-padded row scores the same as a right-padded one. The layout is recorded in an RM stage's
  manifest as ``reward_layout`` (``REWARD_LAYOUT``) and checked by ``load_reward_model``.
- ``transformers_last_non_pad`` (``READ_TRANSFORMERS``): any other RM (TRL's RewardTrainer, the hub,
  OpenRLHF exports). It is read exactly as transformers reads it: the full ``apply_chat_template``
  render of the conversation, through the model's own forward, which pools at the last token that is
  not its config's pad id (for a ChatML template, the newline after ``<|im_end|>``, one past the eos);
  model and tokenizer are loaded as saved (``load_transformers_reward_model``: no pad token added, the
  config's pad id untouched), batches are right-padded with that pad id (``score_as_transformers``).

What PPO feeds the RM has its one home here: ``reward_input_ids`` (an RM of ours sharing the policy's
tokenizer: the prompt ids the policy saw + the generated ids up to and including eos, nothing
re-rendered, no eos appended), ``reward_input`` on text (``reward_input_from_text``: an RM of ours with
another tokenizer, text rendered in its template with the closing eos dropped for an unfinished
response; ``transformers_reward_input``: an RM trained elsewhere) and ``fit_reward_input`` (cut from the
left to the RM's max_length, keeping bos). ``load_reward`` + ``score_file`` are ``python -m pipeline
score``. Users: the RM stage (loss and eval), PPO (rewards, critic values), the report, the server,
best-of-N, the ``score`` command.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

import torch

from pipeline.models import load_tokenizer
from stages.batching import right_pad_batch
from stages.chat import (
    Messages,
    cut_prompt,
    encode_sequence,
    last_token_index,
    position_ids_from_mask,
    render_prompt,
)
from stages.tuning import load_trained

REWARD_LAYOUT: dict[str, Any] = {"read_at": "eos", "padding_side": "right", "template": "chat",
                                 "strip_after_eos": True}

# where a reward model is read (recorded as ``reward_model_read`` in the rm and ppo manifests)
READ_TRAINED = "trained_position"                # our rm stage's RMs: the response's closing eos
READ_TRANSFORMERS = "transformers_last_non_pad"  # any other RM: transformers' own pooling of the full render
READINGS = (READ_TRAINED, READ_TRANSFORMERS)
READING_FILE = "reward_reading.json"             # written by the rm stage into model/: the folder says so too


# ------------------------------------------------------------------------------------------- scoring
def score_at_eos(per_token_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token scores, (B, T) mask -> (B,) the score at each row's last real token (its eos)."""
    if per_token_scores.shape != attention_mask.shape:
        raise ValueError(f"scores {tuple(per_token_scores.shape)} and mask {tuple(attention_mask.shape)} differ")
    index = last_token_index(attention_mask).to(per_token_scores.device)
    return per_token_scores.gather(1, index[:, None]).squeeze(1)


def find_score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The sequence classifier's head (``score``), through DDP / DeepSpeed / PEFT wrappers."""
    best: tuple[int, torch.nn.Module] | None = None
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "score" and (best is None or len(name) < best[0]):
            best = (len(name), module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no 'score' head; the RM needs an "
                         "AutoModelForSequenceClassification whose head is called 'score' (Llama, Qwen, Mistral ...)")
    return best[1]


class _HeadCapture:
    """Capture the head's per-token output (B, T, 1) during one forward; run the head in fp32.

    Under autocast the head's input is cast to fp32 and autocast is paused inside the head when the
    head's weights are fp32, so the scores (and the loss) are computed in fp32 (DESIGN §5.2).
    """

    def __init__(self, head: torch.nn.Module):
        self.head = head
        self.output: torch.Tensor | None = None
        self.calls = 0
        self._autocast_off: Any = None
        self._handles: list[Any] = []

    def _pre(self, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hidden = args[0]
        param = next(module.parameters(), None)
        if (param is not None and param.dtype == torch.float32
                and torch.is_autocast_enabled(hidden.device.type)):
            self._autocast_off = torch.autocast(hidden.device.type, enabled=False)
            self._autocast_off.__enter__()
            return (hidden.float(), *args[1:])
        return None

    def _post(self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        self._close()
        self.output = output
        self.calls += 1

    def _close(self) -> None:
        if self._autocast_off is not None:
            self._autocast_off.__exit__(None, None, None)
            self._autocast_off = None

    def __enter__(self) -> "_HeadCapture":
        self._handles = [self.head.register_forward_pre_hook(self._pre),
                         self.head.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close()
        for handle in self._handles:
            handle.remove()


def token_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) ids and mask -> (B, T) fp32 head outputs at every position (the critic's values, too).

    ``model`` is the sequence classifier, possibly wrapped (PEFT, DDP, DeepSpeed). Gradients flow.
    """
    head = find_score_head(model)
    with _HeadCapture(head) as capture:
        model(input_ids=input_ids, attention_mask=attention_mask,
              position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    if capture.calls != 1 or capture.output is None:
        raise RuntimeError(f"the score head ran {capture.calls} times in one forward; expected once")
    out = capture.output
    if out.dim() != 3 or out.shape[-1] != 1:
        raise RuntimeError(f"the score head returned shape {tuple(out.shape)}; expected (batch, seq, 1)")
    return out[..., 0].float()


def score_sequences(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) ids and mask of prompt + response sequences -> (B,) fp32 rewards read at each eos."""
    return score_at_eos(token_scores(model, input_ids, attention_mask), attention_mask)


def _has_score_head(model: torch.nn.Module) -> bool:
    return any(name.rsplit(".", 1)[-1] == "score" for name, _ in model.named_modules())


@torch.no_grad()
def score_token_ids(model: torch.nn.Module, sequences: Sequence[Sequence[int]], pad_token_id: int,
                    batch_size: int = 16, device: torch.device | str | None = None) -> torch.Tensor:
    """Score token-id lists of prompt + response (each ending at the response's eos) -> (N,) fp32.

    For PPO: build each sequence with :func:`reward_input_ids` (same tokenizer) or
    :func:`reward_input_from_text` (an RM with another tokenizer). A model without a ``score`` head (an
    external RM such as DeBERTa's ``classifier`` on a pooled first token) is scored by its own forward
    (``logits[:, 0]``), i.e. with the pooling it was trained with.
    """
    if device is None:
        device = next(model.parameters()).device
    own_head = _has_score_head(model)
    out = []
    for i in range(0, len(sequences), batch_size):
        batch = right_pad_batch(sequences[i:i + batch_size], pad_token_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if own_head:
            out.append(score_sequences(model, ids, mask).cpu())
        else:
            out.append(model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


# ------------------------------------------------------------------------- what PPO's RM scores
def fit_reward_input(ids: Sequence[int], max_length: int, bos_token_id: int | None) -> list[int]:
    """Cut a prompt + response sequence from the left to ``max_length`` tokens, keeping a leading bos.

    The end (the response and the position the score is read at) is never cut; a response longer than
    ``max_length`` on its own keeps its last tokens.
    """
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    if bos_token_id is not None and ids and ids[0] == bos_token_id and max_length > 1:
        return ids[:1] + ids[len(ids) - (max_length - 1):]
    return ids[len(ids) - max_length:]


def reward_input_ids(prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int,
                     bos_token_id: int | None) -> list[int]:
    """The RM input for a policy that shares the RM's tokenizer and chat format (DESIGN §3).

    ``prompt_ids``: the ids the policy was prompted with (chat template with the generation prompt,
    unpadded); ``response_ids``: the generated ids up to and including the first eos, unpadded. The
    sequence is their concatenation, cut by :func:`fit_reward_input`: nothing is re-rendered, and no eos
    is appended to a response that has none, so the score is read at its last real token and an answer
    cut off at the length limit is not scored as if it had finished.
    """
    return fit_reward_input(list(prompt_ids) + list(response_ids), max_length, bos_token_id)


def _reply(response: str | Messages) -> Messages:
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)


def reward_input_from_text(tokenizer: Any, messages: Messages, response: str | Messages, finished: bool,
                           max_length: int | None, system_prompt: str | None = None) -> list[int]:
    """The input of an RM our ``rm`` stage trained, from text rendered in *its* template (its tokenizer).

    ``messages`` is the prompt conversation, ``response`` the decoded response text (special tokens
    removed) or its assistant message(s). The layout is the RM stage's (:func:`encode_sequence`: ending
    at the assistant turn's closing eos), except that a response that did not finish (no eos generated)
    has that closing eos removed: its score is read at its last token, never as a finished answer. Cut
    by :func:`fit_reward_input` (not cut when ``max_length`` is None).
    """
    enc = encode_sequence(tokenizer, messages, _reply(response), system_prompt)
    ids = enc.ids if finished else enc.ids[:-1]
    return ids if max_length is None else fit_reward_input(ids, max_length, tokenizer.bos_token_id)


def transformers_reward_input(tokenizer: Any, messages: Messages, response: str | Messages,
                              finished: bool = True) -> list[int]:
    """The input of an RM trained elsewhere: what transformers gives it for the conversation.

    A finished response: the ids of ``tokenizer.apply_chat_template(messages + [assistant response])``,
    exactly (the template's whole render, trailing newline included, no special tokens added). A
    response that did not finish: the prompt rendered with the generation prompt, then the response
    text, with nothing after it (the template would close the turn as if it had finished).
    """
    reply = _reply(response)
    if finished:
        enc = tokenizer.apply_chat_template(list(messages) + reply, tokenize=True, return_dict=True)
        return list(enc["input_ids"])
    text = render_prompt(tokenizer, messages) + "".join(m["content"] for m in reply)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def reward_input(tokenizer: Any, read: str, messages: Messages, response: str | Messages, finished: bool = True,
                 system_prompt: str | None = None) -> list[int]:
    """The RM input from text for reading ``read`` (``READ_TRAINED``: :func:`reward_input_from_text` with
    ``system_prompt`` added as in training; ``READ_TRANSFORMERS``: :func:`transformers_reward_input`, the
    conversation as given). Not cut to a max length."""
    if read == READ_TRAINED:
        return reward_input_from_text(tokenizer, messages, response, finished, None, system_prompt)
    if read == READ_TRANSFORMERS:
        return transformers_reward_input(tokenizer, messages, response, finished)
    raise ValueError(f"unknown reward model reading {read!r}; expected one of {', '.join(READINGS)}")


@torch.no_grad()
def score_as_transformers(model: torch.nn.Module, sequences: Sequence[Sequence[int]], batch_size: int = 16,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """Token-id lists -> (N,) fp32 scores from the model's own forward, pooled as transformers pools.

    Batches are right-padded with the config's pad id, so transformers' "last token that is not pad"
    is the same position as for the sequence alone (trailing real tokens equal to the pad id are
    skipped either way, as transformers does). Without a pad id transformers reads the last token of a
    lone sequence and refuses batches, so each sequence then runs alone.
    """
    if device is None:
        device = next(model.parameters()).device
    config = model.config
    pad = (config.get_text_config() if hasattr(config, "get_text_config") else config).pad_token_id
    step = batch_size if pad is not None else 1
    out = []
    for i in range(0, len(sequences), step):
        batch = right_pad_batch(sequences[i:i + step], pad if pad is not None else 0)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits
        out.append(logits[:, 0].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def score_reward_inputs(model: torch.nn.Module, sequences: Sequence[Sequence[int]], read: str, pad_token_id: int,
                        batch_size: int = 16, device: torch.device | str | None = None) -> torch.Tensor:
    """Score RM inputs (:func:`reward_input_ids` / :func:`reward_input`) for reading ``read`` -> (N,) fp32:
    :func:`score_token_ids` at the trained position, :func:`score_as_transformers` otherwise."""
    if read == READ_TRAINED:
        return score_token_ids(model, sequences, pad_token_id, batch_size, device)
    if read == READ_TRANSFORMERS:
        return score_as_transformers(model, sequences, batch_size, device)
    raise ValueError(f"unknown reward model reading {read!r}; expected one of {', '.join(READINGS)}")


@torch.no_grad()
def score_responses(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Any], responses: Sequence[Any],
                    system_prompt: str | None = None, max_length: int | None = None,
                    batch_size: int = 16) -> torch.Tensor:
    """Score text (prompt, response) pairs in the training layout -> (N,) fp32.

    A prompt is a string or a message list; a response a string or a list of assistant messages.
    With ``max_length`` the prompt is cut from the left as in training (a response that does not fit
    raises ValueError).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    seqs = []
    for prompt, response in zip(prompts, responses):
        p = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        r = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
        enc = encode_sequence(tokenizer, p, r, system_prompt)
        ids = enc.ids
        if max_length is not None and len(ids) > max_length:
            bos = tokenizer.bos_token_id
            keep_first = bos is not None and ids[0] == bos
            cut = len(ids) - max_length
            if cut > enc.prompt_tokens - enc.header_tokens - (1 if keep_first else 0):
                raise ValueError(f"response does not fit in max_length={max_length} ({len(ids)} tokens)")
            ids = cut_prompt(enc, cut, keep_first)
        seqs.append(ids)
    return score_token_ids(model, seqs, tokenizer.pad_token_id, batch_size)


def load_reward_model(stage_dir: str | Path, model_cfg: Any) -> tuple[Any, Any]:
    """Load a finished RM stage -> (model in eval mode, tokenizer); checks the recorded layout."""
    stage_dir = Path(stage_dir)
    manifest_path = stage_dir / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path} not found: run the rm stage first (make rm CONFIG=...)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("status") != "complete":
        raise ValueError(f"{manifest_path}: status={manifest.get('status')!r}, not complete")
    # a manifest of the rm stage without the field predates it: that stage has always trained this layout
    layout = manifest.get("reward_layout", REWARD_LAYOUT if manifest.get("stage") == "rm" else None)
    if layout != REWARD_LAYOUT:
        raise ValueError(f"{manifest_path}: reward_layout {layout!r} is not the layout this code scores "
                         f"({REWARD_LAYOUT!r})")
    tokenizer = load_tokenizer(str(stage_dir), model_cfg)
    model = load_trained(stage_dir, model_cfg, tokenizer, kind="seq_cls")
    model.eval()
    return model, tokenizer


# -------------------------------------------------------------------- where an RM is read, loading it
@dataclass
class RewardReading:
    """Where a reward model is read (:func:`reward_reading`) and what its training recorded."""

    read: str                          # READ_TRAINED | READ_TRANSFORMERS
    why: str                           # one line: what decided it
    stage_dir: Path | None = None      # an rm stage folder (loaded by :func:`load_reward_model`)
    max_length: int | None = None      # READ_TRAINED: the rm stage's max_length
    system_prompt: str | None = None   # READ_TRAINED: the system prompt it was trained with


def _json_object(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else None


def _trained_reading(record: dict[str, Any], where: Path, why: str, stage_dir: Path | None = None) -> RewardReading:
    """The reading an rm manifest or a ``reward_reading.json`` records. A record without
    ``reward_model_read`` was written before the field existed, by an rm stage that always read at eos."""
    read = record.get("reward_model_read", READ_TRAINED)
    if read not in READINGS:
        raise ValueError(f"{where}: reward_model_read={read!r}; expected one of {', '.join(READINGS)}")
    layout = record.get("reward_layout", REWARD_LAYOUT)
    if read == READ_TRAINED and layout != REWARD_LAYOUT:
        raise ValueError(f"{where}: reward_layout {layout!r} is not the layout this code scores ({REWARD_LAYOUT!r})")
    max_length = record.get("max_length", ((record.get("config") or {}).get("rm") or {}).get("max_length"))
    system_prompt = record.get("system_prompt", (record.get("chat_format") or {}).get("system_prompt"))
    return RewardReading(read, why, stage_dir, max_length, system_prompt or None)


def _hub_reading_file(name: str) -> Path | None:
    """The ``reward_reading.json`` of a hub model (an rm stage's model/ pushed whole), or None without one."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(name, READING_FILE))
    except (EntryNotFoundError, RepositoryNotFoundError):  # offline and not cached is an EntryNotFoundError too
        return None


def reward_reading(location: str | Path) -> RewardReading:
    """Where the reward model at ``location`` (a folder or a hub name) is read.

    At its trained position (``READ_TRAINED``) when our rm stage trained it: an rm stage folder (its
    manifest), a folder holding ``reward_reading.json`` (the rm stage's ``model/``, also once copied or
    pushed), or ``model/`` inside an rm stage folder written before that file existed. Any other
    reward model is read as transformers reads it (``READ_TRANSFORMERS``). The folder of another stage
    is refused (ValueError): it holds no reward model.
    """
    folder = Path(location)
    if not folder.is_dir():
        marker = _hub_reading_file(str(location))
        if marker is not None:
            return _trained_reading(_json_object(marker) or {}, marker,
                                    f"{location}: trained by the rm stage ({READING_FILE})")
        return RewardReading(READ_TRANSFORMERS, f"{location}: a hub model without {READING_FILE}, not trained by "
                                                "the rm stage")
    manifest = _json_object(folder / "manifest.json")
    if manifest is not None:
        stage = manifest.get("stage")
        if stage != "rm":
            raise ValueError(f"{folder} is the {stage!r} stage's folder, not a reward model; give an rm stage folder "
                             "(outputs/<run>/rm) or the folder of a sequence classifier with one label")
        return _trained_reading(manifest, folder / "manifest.json", f"{folder}: an rm stage folder", stage_dir=folder)
    marker = _json_object(folder / READING_FILE)
    if marker is not None:
        return _trained_reading(marker, folder / READING_FILE, f"{folder}: trained by the rm stage ({READING_FILE})")
    parent = _json_object(folder.parent / "manifest.json") if folder.name == "model" else None
    if parent is not None and parent.get("stage") == "rm":
        return _trained_reading(parent, folder.parent / "manifest.json", f"{folder}: model/ of an rm stage folder")
    return RewardReading(READ_TRANSFORMERS, f"{folder}: no manifest or {READING_FILE}, not trained by the rm stage")


def write_reading_file(model_dir: str | Path, max_length: int, system_prompt: str | None) -> Path:
    """Record in an rm stage's ``model/`` that it is read at its trained position (:func:`reward_reading`)."""
    from pipeline.manifest import atomic_write_json

    path = Path(model_dir) / READING_FILE
    atomic_write_json(path, {
        "reward_model_read": READ_TRAINED, "reward_layout": dict(REWARD_LAYOUT), "max_length": max_length,
        "system_prompt": system_prompt,
        "note": "trained by alignpipe's rm stage: the score is the head's output at the response's closing eos "
                "(the prompt rendered with the chat template and the generation prompt, then the response and "
                "its eos), not at transformers' pooled position; python -m pipeline score reads it there"})
    return path


def load_transformers_reward_model(location: str, model_cfg: Any, tokenizer_location: str | None = None,
                                   chat_template: str | None = None,
                                   template_key: str = "ppo.reward_model.chat_template") -> tuple[Any, Any]:
    """A reward model trained elsewhere, loaded as saved -> (model in eval mode, tokenizer).

    Nothing is changed (no pad token added, the config's pad id kept), so its forward pools where
    transformers pools. ``chat_template`` (Jinja text, a file, ``chatml``, ``raw``) replaces the
    tokenizer's own; a tokenizer without one raises ConfigError naming ``template_key``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.config import ConfigError
    from pipeline.models import missing_template_message, resolve_template, torch_dtype

    trust = model_cfg.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_location or location, trust_remote_code=trust)
    if chat_template:
        tokenizer.chat_template = resolve_template(chat_template)
    if not tokenizer.chat_template:
        raise ConfigError(missing_template_message(tokenizer_location or location, template_key))
    model = AutoModelForSequenceClassification.from_pretrained(location, trust_remote_code=trust, use_safetensors=True,
                                                               dtype=torch_dtype(model_cfg.dtype))
    if model.config.num_labels != 1:
        raise ValueError(f"{location} has num_labels={model.config.num_labels}: a reward model is a sequence "
                         "classifier with one label (one scalar score per sequence)")
    return model.eval(), tokenizer


@dataclass
class LoadedRewardModel:
    """A reward model and where it is read (:func:`load_reward`)."""

    model: Any
    tokenizer: Any
    reading: RewardReading
    location: str

    @property
    def read(self) -> str:
        return self.reading.read

    def input_ids(self, prompt: Messages, response: str | Messages, add_system: bool = True) -> tuple[list[int], bool]:
        """-> (the ids it scores for a finished response, whether they were cut to its trained max_length).

        ``add_system``: an RM of ours gets the system prompt it was trained with (a conversation given
        whole passes False); an RM trained elsewhere reads the conversation as given, always.
        """
        trained = self.read == READ_TRAINED
        system = self.reading.system_prompt if trained and add_system else None
        ids = reward_input(self.tokenizer, self.read, prompt, response, True, system)
        limit = self.reading.max_length if trained else None
        if limit is None or len(ids) <= limit:
            return ids, False
        return fit_reward_input(ids, limit, self.tokenizer.bos_token_id), True

    def score(self, sequences: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
        """(N,) fp32 scores of :meth:`input_ids` sequences, shortest first (less padding), in their order."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        scores = score_reward_inputs(self.model, [sequences[i] for i in order], self.read,
                                     self.tokenizer.pad_token_id, batch_size)
        out = torch.empty(len(sequences), dtype=torch.float32)
        out[torch.tensor(order, dtype=torch.long)] = scores
        return out


def load_reward(location: str, model_cfg: Any | None = None, chat_template: str | None = None) -> LoadedRewardModel:
    """Load any reward model (an rm stage folder, its ``model/``, another folder, a hub name) with the
    reading :func:`reward_reading` decides, on the GPU when there is one. ``chat_template`` replaces the
    tokenizer's own, for an RM trained elsewhere only (ours are read in the template they were trained
    with)."""
    from pipeline.config import ConfigError, ModelConfig
    from pipeline.models import load_model

    reading = reward_reading(location)
    folder = Path(location)
    if chat_template and reading.read == READ_TRAINED:
        raise ConfigError(f"{location}: trained by the rm stage, so it is read in the chat template it was trained "
                          "with; drop --chat-template")
    if model_cfg is None:
        stage_dir = reading.stage_dir or (folder.parent if folder.is_dir() and folder.name == "model" else None)
        recorded = (_json_object(stage_dir / "manifest.json") or {}) if stage_dir else {}
        model_section = (recorded.get("config") or {}).get("model") or {}
        model_cfg = ModelConfig(source="local" if folder.is_dir() else "hub", path=str(location),
                                trust_remote_code=bool(model_section.get("trust_remote_code", False)),
                                pad_token=model_section.get("pad_token"))
    if reading.stage_dir is not None:
        model, tokenizer = load_reward_model(reading.stage_dir, model_cfg)
    elif reading.read == READ_TRAINED:
        tokenizer = load_tokenizer(str(location), model_cfg)
        model = load_model(str(location), model_cfg, tokenizer, kind="seq_cls").eval()
    else:
        model, tokenizer = load_transformers_reward_model(str(location), model_cfg, chat_template=chat_template,
                                                          template_key="--chat-template")
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return LoadedRewardModel(model, tokenizer, reading, str(location))


# ------------------------------------------------------------------------------ python -m pipeline score
def score_file(rm_location: str, data: str, out: str | None = None, batch_size: int = 16,
               chat_template: str | None = None, stdout: TextIO | None = None,
               stderr: TextIO | None = None) -> dict[str, Any]:
    """Score every row of ``data`` with the reward model at ``rm_location`` -> the summary.

    Rows (``data.formats.to_scoring_row``): ``{"messages"}`` (rendered as given), ``{"prompt", "response"}``
    or ``{"prompt", "chosen", "rejected"}``. Each input row is written as JSONL to ``out`` (default
    ``stdout``) with ``score`` added (``chosen_score`` and ``rejected_score`` for a preference row); one
    summary line goes to ``stderr``. Every row is checked before the model loads: a bad one raises
    DataError naming its file and line and what was expected. ``chat_template``: see :func:`load_reward`.
    """
    from pipeline.manifest import atomic_write_text

    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    rows = _scoring_rows(data)
    reward = load_reward(rm_location, chat_template=chat_template)
    sequences, cut = [], 0
    for _, row in rows:
        for response in row.responses:
            ids, was_cut = reward.input_ids(row.prompt, response, add_system=not row.as_given)
            sequences.append(ids)
            cut += was_cut
    scores = reward.score(sequences, batch_size).tolist()
    lines, position, pairs, correct, ties = [], 0, 0, 0, 0
    for data_row, row in rows:
        values = scores[position:position + len(row.keys)]
        position += len(row.keys)
        lines.append(json.dumps({**data_row, **dict(zip(row.keys, values))}, ensure_ascii=False))
        if len(values) == 2:
            pairs += 1
            correct += values[0] > values[1]
            ties += values[0] == values[1]
    text = "".join(line + "\n" for line in lines)
    if out is None:
        (stdout or sys.stdout).write(text)
    else:
        atomic_write_text(out, text)
    summary, line = _score_summary(rm_location, reward, len(rows), scores, pairs, correct, ties, cut)
    if out is not None:
        line += f" -> {out}"
    print(line, file=stderr or sys.stderr, flush=True)
    return summary


def _scoring_rows(data: str) -> list[tuple[dict[str, Any], Any]]:
    """Every row of ``data`` as (the record, its scoring row), all checked before any model loads."""
    from data.formats import SCORING_ROWS, DataError, iter_records, to_scoring_row

    rows = []
    for record in iter_records(data):
        try:
            if "__error__" in record.data:
                raise ValueError(record.data["__error__"])
            rows.append((record.data, to_scoring_row(record.data)))
        except ValueError as exc:
            raise DataError(f"{record.where}: {exc}; {SCORING_ROWS}") from None
    if not rows:
        raise DataError(f"{data}: no rows to score; {SCORING_ROWS}")
    return rows


def _score_summary(rm_location: str, reward: Any, n_rows: int, scores: list[float], pairs: int, correct: int,
                   ties: int, cut: int) -> tuple[dict[str, Any], str]:
    """-> (the summary dict, its one line for stderr)."""
    mean = sum(scores) / len(scores)
    summary: dict[str, Any] = {
        "rows": n_rows, "responses": len(scores), "reward_model": str(rm_location),
        "reward_model_read": reward.read, "why": reward.reading.why, "score_mean": mean,
        "score_std": math.sqrt(sum((v - mean) ** 2 for v in scores) / len(scores)),
        "score_min": min(scores), "score_max": max(scores), "cut_to_max_length": cut}
    line = (f"score: {n_rows} rows ({len(scores)} responses) scored by {rm_location}, read at {reward.read} "
            f"({reward.reading.why}); score mean {mean:.4f}, std {summary['score_std']:.4f}, min "
            f"{summary['score_min']:.4f}, max {summary['score_max']:.4f}")
    if pairs:
        summary.update(pairs=pairs, preference_accuracy=correct / pairs, ties=ties)
        line += (f"; preference accuracy {correct / pairs:.3f} ({correct} of {pairs} pairs with chosen_score > "
                 f"rejected_score, {ties} ties)")
    if cut:
        line += f"; {cut} cut from the left to its max_length {reward.reading.max_length}"
    return summary, line
