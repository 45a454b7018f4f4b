"""Reward scoring: what reads a reward model, kept apart from training one (``stages.rm``).

The score is read at the last real token of prompt + response (the response's eos; the position is
``stages.chat.last_token_index``), from the model's per-token head outputs captured in fp32
(``token_scores``), not from Hugging Face's sequence-classification pooling (which searches for pad
ids). Position ids follow the attention mask, so a left-padded row scores the same as a right-padded
one. The layout is recorded in an RM stage's manifest as ``reward_layout`` (``REWARD_LAYOUT``) and
checked by ``load_reward_model``.

What PPO feeds the RM has its one home here: ``reward_input_ids`` (same tokenizer: the prompt ids the
policy saw + the generated ids up to and including eos, nothing re-rendered, no eos appended),
``reward_input_from_text`` (an RM with its own tokenizer: text rendered in its template, closing eos
dropped for an unfinished response) and ``fit_reward_input`` (cut from the left to the RM's
max_length, keeping bos). Users: the RM stage (loss and eval), PPO (rewards, critic values), the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from pipeline.models import load_tokenizer
from stages.batching import right_pad_batch
from stages.chat import cut_prompt, encode_sequence, last_token_index, position_ids_from_mask
from stages.tuning import load_trained

REWARD_LAYOUT: dict[str, Any] = {"read_at": "eos", "padding_side": "right", "template": "chat",
                                 "strip_after_eos": True}


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


def reward_input_from_text(tokenizer: Any, messages: list[dict[str, str]], response: str, finished: bool,
                           max_length: int | None, system_prompt: str | None = None) -> list[int]:
    """The RM input for an RM with its own tokenizer / chat template: text rendered in *its* template.

    ``messages`` is the prompt conversation, ``response`` the decoded response text (special tokens
    removed). The layout is the RM stage's (:func:`encode_sequence`: ending at the assistant turn's
    closing eos), except that a response that did not finish (no eos generated) has that closing eos
    removed: its score is read at its last token, never as a finished answer. Cut by
    :func:`fit_reward_input` (not cut when ``max_length`` is None).
    """
    enc = encode_sequence(tokenizer, messages, [{"role": "assistant", "content": response}], system_prompt)
    ids = enc.ids if finished else enc.ids[:-1]
    return ids if max_length is None else fit_reward_input(ids, max_length, tokenizer.bos_token_id)


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
    layout = manifest.get("reward_layout")
    if layout != REWARD_LAYOUT:
        raise ValueError(f"{manifest_path}: reward_layout {layout!r} is not the layout this code scores "
                         f"({REWARD_LAYOUT!r})")
    tokenizer = load_tokenizer(str(stage_dir), model_cfg)
    model = load_trained(stage_dir, model_cfg, tokenizer, kind="seq_cls")
    model.eval()
    return model, tokenizer
