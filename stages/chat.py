"""The chat layout, in one place (DESIGN §3): every stage, the report, the judges and the server build
their token ids through here.

- the system prompt: :func:`with_system` prepends ``chat.system_prompt`` to a conversation that has none;
- prompts: :func:`render_prompt` / :func:`prompt_ids` render the chat template with the generation
  prompt (what PPO, RLAIF labelling, the report and the server feed to ``generate``);
- SFT targets: :func:`render_with_spans` / :func:`tokenize_sft` (assistant tokens and their closing eos
  are targets, located by character spans of prefix renders);
- the reward layout: :func:`render_sequence` / :func:`encode_sequence` (prompt + response ending at the
  response's closing eos) and :func:`cut_prompt` (left truncation that keeps bos and the assistant header);
- positions: :func:`position_ids_from_mask` (padding never shifts positions) and
  :func:`last_token_index`, the position the reward is read at (the last real token, its eos).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from stages.batching import IGNORE

Messages = list[dict[str, str]]


# ------------------------------------------------------------------------------------- system prompt
def with_system(messages: Messages, system_prompt: str | None) -> Messages:
    """``messages`` with the system prompt first, unless it is unset or the conversation has its own."""
    if system_prompt and (not messages or messages[0].get("role") != "system"):
        return [{"role": "system", "content": system_prompt}] + list(messages)
    return list(messages)


# -------------------------------------------------------------------------------------------- prompts
def render_prompt(tokenizer: Any, messages: Messages, system_prompt: str | None = None) -> str:
    """The prompt text: chat template over (system prompt +) ``messages`` with the generation prompt."""
    return tokenizer.apply_chat_template(with_system(messages, system_prompt), tokenize=False,
                                         add_generation_prompt=True)


def prompt_ids(tokenizer: Any, messages: Messages, system_prompt: str | None = None) -> list[int]:
    """Token ids of :func:`render_prompt` (no special tokens added: the template has them)."""
    return list(tokenizer(render_prompt(tokenizer, messages, system_prompt), add_special_tokens=False)["input_ids"])


def prompt_ids_within(tokenizer: Any, examples: list[Any], system_prompt: str | None,
                      max_prompt_length: int) -> tuple[list[list[int]], list[Any], int]:
    """:func:`prompt_ids` of each example's ``prompt`` -> (ids, the examples kept, how many were skipped for
    being longer than ``max_prompt_length`` tokens). The sampling stages skip such prompts (PPO instead keeps
    their last tokens, ``stages.ppo.rollout.encode_prompts``)."""
    encoded, kept, too_long = [], [], 0
    for ex in examples:
        ids = prompt_ids(tokenizer, ex.prompt, system_prompt)
        if len(ids) > max_prompt_length:
            too_long += 1
            continue
        encoded.append(ids)
        kept.append(ex)
    return encoded, kept, too_long


# ----------------------------------------------------------------------------------------- SFT targets
def render_with_spans(tokenizer: Any, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation with the chat template; return (text, character spans of assistant targets).

    Each span covers one assistant turn's content and its closing eos token text.
    """
    eos = tokenizer.eos_token
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise ValueError(
                "the chat template is not prefix-stable (rendering the first turns is not a prefix of the "
                "whole conversation), so assistant tokens cannot be located; use a ChatML-like template"
            )
        end = upto.rfind(eos, len(prefix))
        if end < 0:
            raise ValueError(f"the chat template does not close assistant turns with eos {eos!r}")
        spans.append((len(prefix), end + len(eos)))
    return full, spans


def tokenize_sft(tokenizer: Any, messages: Messages, max_length: int,
                 system_prompt: str | None = None) -> dict[str, Any]:
    """-> {"input_ids": list[int], "labels": list[int], "truncated": bool}; labels IGNORE off-target."""
    text, spans = render_with_spans(tokenizer, with_system(messages, system_prompt))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok, (start, _end) in zip(ids, offsets):
        inside = any(s <= start < e for s, e in spans)
        labels.append(tok if inside else IGNORE)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


# ------------------------------------------------------------------------------------- reward layout
@dataclass
class EncodedSequence:
    """Token ids of prompt + response ending at the response's eos.

    ``prompt_tokens`` tokens belong to the prompt (including the assistant header), of which the last
    ``header_tokens`` are the header the template puts before an assistant turn (never truncated).
    """

    ids: list[int]
    prompt_tokens: int
    header_tokens: int


def render_sequence(tokenizer: Any, prompt: Messages, response: Messages,
                    system_prompt: str | None = None) -> tuple[str, int, int]:
    """Render prompt + response; return (text ending at the response's eos, prompt chars, header chars).

    ``prompt chars`` is where the response content starts (the end of the generation prompt);
    ``header chars`` is the length of the assistant header the template adds for generation.
    """
    eos = tokenizer.eos_token
    prompt = with_system(prompt, system_prompt) if prompt else []
    full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    with_header = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    without_header = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=False)
    if not (full.startswith(with_header) and with_header.startswith(without_header)):
        raise ValueError(
            "the chat template is not prefix-stable (the rendered prompt is not a prefix of prompt + "
            "response), so the response cannot be located; use a ChatML-like template"
        )
    end = full.rfind(eos)
    if end < len(with_header):
        raise ValueError(f"the chat template does not close the assistant turn with eos {eos!r}")
    return full[: end + len(eos)], len(with_header), len(with_header) - len(without_header)


def encode_sequence(tokenizer: Any, prompt: Messages, response: Messages,
                    system_prompt: str | None = None) -> EncodedSequence:
    """Tokenize prompt + response in the reward layout (ends with the eos id; no special tokens added)."""
    text, prompt_chars, header_chars = render_sequence(tokenizer, prompt, response, system_prompt)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    if not ids or ids[-1] != tokenizer.eos_token_id:
        raise ValueError(f"the rendered response does not tokenize to a final eos id {tokenizer.eos_token_id}")
    prompt_tokens = sum(1 for start, _ in offsets if start < prompt_chars)
    header_start = prompt_chars - header_chars
    header_tokens = sum(1 for start, _ in offsets if header_start <= start < prompt_chars)
    return EncodedSequence(ids, prompt_tokens, header_tokens)


def cut_prompt(seq: EncodedSequence, cut: int, keep_first: bool) -> list[int]:
    """``seq.ids`` with ``cut`` prompt tokens removed from the left (after a kept first token, bos)."""
    if cut <= 0:
        return list(seq.ids)
    first = 1 if keep_first else 0
    return seq.ids[:first] + seq.ids[first + cut:]


# ----------------------------------------------------------------------------------------- positions
def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only (cumsum of the mask minus one, 0 on padding): a left-padded
    row gets the same positions as unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B,) index of the last attended position (left, right or both-side padding):
    where the reward is read (the response's eos, DESIGN §3)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seq), got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("a row of attention_mask has no real token; cannot read a score")
    T = mask.shape[1]
    return (T - 1) - mask.flip(1).int().argmax(dim=1)
