"""Reward-model stage: preferences -> a scalar reward model (``AutoModelForSequenceClassification``, 1 label).

Loss (Bradley-Terry, fp32): ``-log σ(r_chosen - r_rejected - margin)`` averaged over the pairs of a
micro-batch (``margin`` is the optional data column, 0 where absent), plus the optional reward-centring
term ``center_rewards_coefficient · mean((r_chosen + r_rejected)²)`` that keeps rewards near zero.

Layout (recorded in the manifest as ``reward_layout``; PPO must score exactly this, see DESIGN §3):
the prompt and one response are rendered with the chat template in force
(``apply_chat_template(prompt + response, tokenize=False)``), everything the template appends after
the response's closing eos (e.g. ``"\\n"``) is stripped, so the sequence ends at that eos; batches are
right-padded with pad != eos and the score is read at the last real token (the eos). The score is not
taken from Hugging Face's sequence-classification pooling (which searches for pad ids): the model's
per-token head outputs are captured and gathered at the last attended position (``score_at_eos``).
Position ids follow the attention mask, so a left-padded row scores the same as a right-padded one.

Pairs longer than ``rm.max_length``: the shared prompt is cut from the left (the same number of
tokens for chosen and rejected; a leading bos is kept, the assistant header is never cut); a pair
whose responses do not fit even with the prompt reduced to the assistant header is skipped and
counted. Nothing is dropped silently: the counts go into the manifest and are printed.

K-wise rankings are expanded by ``data.formats`` to all K(K-1)/2 pairs that share a ``group`` id; the
Engine keeps a group in one micro-batch (InstructGPT), and the held-out split is made by prompt, so no
prompt is in both the training and the evaluation set.

Public helpers for other stages (PPO scores with these so it reads the same layout):
``encode_sequence``, ``token_scores``, ``score_at_eos``, ``score_sequences``, ``score_token_ids``,
``score_responses``, ``load_reward_model``, ``REWARD_LAYOUT``, and the one home of what PPO feeds the RM:
``reward_input_ids`` (same tokenizer: the prompt ids the policy saw + the generated ids up to and
including eos, nothing re-rendered, no eos appended), ``reward_input_from_text`` (an RM with its own
tokenizer: text rendered in its template, closing eos dropped for an unfinished response) and
``fit_reward_input`` (cut from the left to the RM's max_length, keeping bos).

Metrics
- metrics.jsonl, one row per logged optimizer step: ``loss`` (Bradley-Terry loss + centring term, mean
  over the step's micro-batches), ``accuracy`` (fraction of pairs with r_chosen > r_rejected),
  ``margin`` (mean r_chosen - r_rejected), ``reward_chosen``, ``reward_rejected`` (mean scores),
  ``center_loss`` (the centring term, before its coefficient), ``pairs`` (pairs per micro-batch),
  ``lr``, ``grad_norm``, ``tokens_per_s`` (non-pad tokens of both responses' sequences per second, all
  ranks), ``epoch``; eval rows (every ``train.eval_steps`` and at the end): ``eval_loss``,
  ``eval_accuracy``, ``eval_mean_margin``, ``eval_reward_chosen``, ``eval_reward_rejected``,
  ``eval_pairs``, ``accuracy_by_margin_bucket``.
- manifest ``metrics``: the last training row and the final eval row, plus ``steps``, ``train_pairs``,
  ``eval_pairs``, ``prompt_truncated`` / ``skipped_too_long`` (pairs, train + eval) and their per-split
  ``train_*`` / ``eval_*`` counts, ``skipped_records`` (bad records skipped under
  ``max_bad_fraction``), ``kwise_groups`` (groups with more than one pair), ``world_size``,
  ``accuracy_by_margin_bucket`` (a list of ``{lo, hi, count, accuracy}`` for quartiles of
  |r_chosen - r_rejected| on the held-out pairs: a calibrated RM is more accurate where it is more
  confident), ``score_histogram`` (the PNG's file name).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from data.formats import DataError, PreferencePair, load_examples
from pipeline.config import DataSource, RunConfig
from pipeline.models import chat_fingerprint, chat_format, load_model, load_tokenizer, prepare_base
from pipeline.stage import StageRun
from stages.engine import Engine, init_distributed, set_seed
from stages.sft import save_stage_model, split_eval
from stages.tuning import apply_tuning, load_trained, quantization_kwargs, trainable_summary
from stages.batching import right_pad

REWARD_LAYOUT: dict[str, Any] = {"read_at": "eos", "padding_side": "right", "template": "chat",
                                 "strip_after_eos": True}
HISTOGRAM_FILE = "score_histogram.png"


# ------------------------------------------------------------------------------------------ layout
@dataclass
class EncodedSequence:
    """Token ids of prompt + response ending at the response's eos.

    ``prompt_tokens`` tokens belong to the prompt (including the assistant header), of which the last
    ``header_tokens`` are the header the template puts before an assistant turn (never truncated).
    """

    ids: list[int]
    prompt_tokens: int
    header_tokens: int


@dataclass
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    margin: float
    group: int
    where: str
    truncated: int = 0  # prompt tokens removed from the left


def _with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt and messages and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + list(messages)
    return list(messages)


def render_sequence(tokenizer: Any, prompt: list[dict[str, str]], response: list[dict[str, str]],
                    system_prompt: str | None = None) -> tuple[str, int, int]:
    """Render prompt + response; return (text ending at the response's eos, prompt chars, header chars).

    ``prompt chars`` is where the response content starts (the end of the generation prompt);
    ``header chars`` is the length of the assistant header the template adds for generation.
    """
    eos = tokenizer.eos_token
    prompt = _with_system(prompt, system_prompt)
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


def encode_sequence(tokenizer: Any, prompt: list[dict[str, str]], response: list[dict[str, str]],
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


def _cut_prompt(seq: EncodedSequence, cut: int, keep_first: bool) -> list[int]:
    if cut <= 0:
        return list(seq.ids)
    first = 1 if keep_first else 0
    return seq.ids[:first] + seq.ids[first + cut:]


def encode_pair(tokenizer: Any, pair: PreferencePair, max_length: int,
                system_prompt: str | None = None) -> EncodedPair | None:
    """Encode one pair within ``max_length``; None when the responses do not fit (caller counts it).

    The prompt is cut from the left by the same number of tokens in both sequences, so chosen and
    rejected always see the same context.
    """
    c = encode_sequence(tokenizer, pair.prompt, pair.chosen, system_prompt)
    r = encode_sequence(tokenizer, pair.prompt, pair.rejected, system_prompt)
    overflow = max(len(c.ids), len(r.ids)) - max_length
    margin = float(pair.margin) if pair.margin is not None else 0.0
    if overflow <= 0:
        return EncodedPair(c.ids, r.ids, margin, pair.group, pair.where)
    bos = tokenizer.bos_token_id
    keep_first = bos is not None and c.ids[0] == bos and r.ids[0] == bos
    # what must stay: (bos) + assistant header + response
    cuttable = min(s.prompt_tokens - s.header_tokens for s in (c, r)) - (1 if keep_first else 0)
    if overflow > cuttable:
        return None
    return EncodedPair(_cut_prompt(c, overflow, keep_first), _cut_prompt(r, overflow, keep_first), margin,
                       pair.group, pair.where, truncated=overflow)


@dataclass
class EncodeReport:
    pairs: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    skipped_too_long: int = 0
    first_skipped: str | None = None


def encode_pairs(tokenizer: Any, pairs: Sequence[PreferencePair], max_length: int,
                 system_prompt: str | None = None) -> tuple[list[EncodedPair], EncodeReport]:
    """Encode many pairs; count truncated prompts and skipped (too long) pairs."""
    report = EncodeReport()
    rows: list[EncodedPair] = []
    for pair in pairs:
        report.pairs += 1
        try:
            row = encode_pair(tokenizer, pair, max_length, system_prompt)
        except ValueError as exc:
            raise DataError(f"{pair.where}: {exc}") from None
        if row is None:
            report.skipped_too_long += 1
            report.first_skipped = report.first_skipped or pair.where
            continue
        report.prompt_truncated += row.truncated > 0
        rows.append(row)
    report.kept = len(rows)
    return rows, report


def pair_collate(pad_id: int) -> Callable[[list[EncodedPair]], dict[str, torch.Tensor]]:
    """-> input_ids/attention_mask (2B, T): the B chosen rows, then the B rejected rows; margin (B,)."""

    def collate(rows: list[EncodedPair]) -> dict[str, torch.Tensor]:
        seqs = [r.chosen for r in rows] + [r.rejected for r in rows]
        batch = right_pad_batch(seqs, pad_id)
        batch["margin"] = torch.tensor([r.margin for r in rows], dtype=torch.float32)
        return batch

    return collate


def right_pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token id lists -> {"input_ids", "attention_mask"} (N, longest)."""
    ids, mask = right_pad(seqs, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------------------------------- scoring
def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B,) index of the last attended position (left, right or both-side padding)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seq), got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("a row of attention_mask has no real token; cannot read a score")
    T = mask.shape[1]
    return (T - 1) - mask.flip(1).int().argmax(dim=1)


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


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only: a left-padded row gets the same positions as unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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
            ids = _cut_prompt(enc, cut, keep_first)
        seqs.append(ids)
    return score_token_ids(model, seqs, tokenizer.pad_token_id, batch_size)


def load_reward_model(stage_dir: str | Path, model_cfg: Any) -> tuple[Any, Any]:
    """Load a finished RM stage -> (model in eval mode, tokenizer); checks the recorded layout."""
    import json

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


# ---------------------------------------------------------------------------------------------- loss
def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  center_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """(B,) rewards -> (scalar fp32 loss, metrics). loss = mean(-log σ(rc - rr - m)) + c·mean((rc + rr)²)."""
    rc, rr = r_chosen.float(), r_rejected.float()
    diff = rc - rr
    if margin is not None:
        diff = diff - margin.float().to(diff.device)
    loss = -F.logsigmoid(diff).mean()
    center = ((rc + rr) ** 2).mean()
    if center_coef:
        loss = loss + center_coef * center
    rc, rr, center_value = rc.detach(), rr.detach(), center.detach()
    metrics = {
        "accuracy": float((rc > rr).float().mean()),
        "margin": float((rc - rr).mean()),
        "reward_chosen": float(rc.mean()),
        "reward_rejected": float(rr.mean()),
        "center_loss": float(center_value),
        "pairs": float(rc.numel()),
    }
    return loss, metrics


def make_loss_fn(center_coef: float) -> Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]:
    def loss_fn(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        scores = score_sequences(model, batch["input_ids"], batch["attention_mask"])
        n = batch["margin"].shape[0]
        return pairwise_loss(scores[:n], scores[n:], batch["margin"], center_coef)

    return loss_fn


# ---------------------------------------------------------------------------------------------- eval
def margin_buckets(r_chosen: torch.Tensor, r_rejected: torch.Tensor, n_buckets: int = 4) -> list[dict[str, float]]:
    """Accuracy by quantile bucket of |r_chosen - r_rejected| -> [{lo, hi, count, accuracy}], low first."""
    if r_chosen.numel() == 0:
        return []
    gap = (r_chosen - r_rejected).abs().double()
    correct = (r_chosen > r_rejected).double()
    order = torch.argsort(gap)
    n = gap.numel()
    n_buckets = max(1, min(n_buckets, n))
    out = []
    for b in range(n_buckets):
        idx = order[b * n // n_buckets:(b + 1) * n // n_buckets]
        if idx.numel() == 0:
            continue
        out.append({"lo": round(float(gap[idx].min()), 6), "hi": round(float(gap[idx].max()), 6),
                    "count": int(idx.numel()), "accuracy": round(float(correct[idx].mean()), 6)})
    return out


def write_score_histogram(r_chosen: torch.Tensor, r_rejected: torch.Tensor, path: Path,
                          title: str = "reward model: held-out scores") -> None:
    """Overlaid histograms of chosen and rejected scores (matplotlib, Agg backend) -> PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen, rejected = r_chosen.double().numpy(), r_rejected.double().numpy()
    lo = float(min(chosen.min(), rejected.min()))
    hi = float(max(chosen.max(), rejected.max()))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    bins = [lo + (hi - lo) * i / 30 for i in range(31)]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.hist(chosen, bins=bins, alpha=0.6, label=f"chosen (mean {chosen.mean():.2f})", color="tab:green")
    ax.hist(rejected, bins=bins, alpha=0.6, label=f"rejected (mean {rejected.mean():.2f})", color="tab:red")
    acc = float((r_chosen > r_rejected).double().mean())
    ax.set_title(f"{title}\n{len(chosen)} pairs, accuracy {acc:.3f}")
    ax.set_xlabel("reward score")
    ax.set_ylabel("pairs")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)


def make_eval_fn(rows: list[EncodedPair], collate: Callable[[list[EncodedPair]], dict[str, torch.Tensor]],
                 batch_size: int, device: torch.device, center_coef: float,
                 keep: dict[str, torch.Tensor]) -> Callable[[Any], dict[str, Any]]:
    """Held-out metrics; the last scores are left in ``keep`` ("chosen", "rejected") for the histogram."""

    def evaluate(model: Any) -> dict[str, Any]:
        if not rows:
            return {}
        chosen, rejected, margins = [], [], []
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i:i + batch_size])
            scores = score_sequences(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            n = batch["margin"].shape[0]
            chosen.append(scores[:n].float().cpu())
            rejected.append(scores[n:].float().cpu())
            margins.append(batch["margin"])
        rc, rr, m = torch.cat(chosen), torch.cat(rejected), torch.cat(margins)
        keep["chosen"], keep["rejected"] = rc, rr
        loss, metrics = pairwise_loss(rc, rr, m, center_coef)
        return {"eval_loss": float(loss), "eval_accuracy": metrics["accuracy"],
                "eval_mean_margin": metrics["margin"], "eval_reward_chosen": metrics["reward_chosen"],
                "eval_reward_rejected": metrics["reward_rejected"], "eval_pairs": len(rows),
                "accuracy_by_margin_bucket": margin_buckets(rc, rr)}

    return evaluate


# ----------------------------------------------------------------------------------------------- run
def load_preferences(cfg: RunConfig, source: DataSource | None = None,
                     ) -> tuple[list[PreferencePair], list[PreferencePair], dict[str, Any]]:
    """``source`` (default rm.data) (+ rm.eval_data, or a held-out split by prompt of rm.eval_fraction)
    -> (train, eval, report)."""
    rm = cfg.rm
    source = source or rm.data
    if source is None:
        raise DataError("rm.data is not set: point it at a preference file (prompt/chosen/rejected, "
                        "HH transcripts, or prompt/responses/ranking) or hub:name")
    pairs, report = load_examples(source, "preference")
    info: dict[str, Any] = {"train": report.as_dict()}
    if rm.eval_data is not None:
        eval_pairs, eval_report = load_examples(rm.eval_data, "preference")
        info["eval"] = eval_report.as_dict()
        return pairs, eval_pairs, info
    # split by prompt: all pairs of one prompt (a K-wise ranking, several judged pairs from rlaif_label,
    # or a prompt repeated in the data) stay on one side, so held-out accuracy is on unseen prompts
    prompt_key = lambda pair: json.dumps(pair.prompt, sort_keys=True)
    prompts = list(dict.fromkeys(prompt_key(p) for p in pairs))
    _, eval_prompts = split_eval(prompts, rm.eval_fraction, cfg.seed)
    held = set(eval_prompts)
    return [p for p in pairs if prompt_key(p) not in held], [p for p in pairs if prompt_key(p) in held], info


def run(cfg: RunConfig) -> dict[str, Any]:
    rm = cfg.rm
    if rm.data is None and "rlaif_label" not in cfg.stages:
        raise DataError("rm.data is not set: point it at a preference file (prompt/chosen/rejected, "
                        "HH transcripts, or prompt/responses/ranking) or hub:name, or add rlaif_label to the "
                        "run's stages (make rlaif) to train on AI-judged pairs of SFT samples")
    dist = init_distributed()
    with StageRun(cfg, "rm", is_main=dist.is_main) as run:
        if rm.train.num_threads:
            torch.set_num_threads(rm.train.num_threads)
        if rm.init_from == "sft":
            sft_dir = run.parent_dir("sft")
            init_path = str(sft_dir / "model")
            if not (sft_dir / "model").exists():
                method = run.parents["sft"].get("tuning_method")
                raise FileNotFoundError(
                    f"{sft_dir}/model not found: the sft stage (tuning method {method!r}) saved only an "
                    "adapter, and a reward model needs a full or merged SFT model to start from. Re-run sft "
                    "with a mergeable method (full, lora, dora, ...) or set rm.init_from=base.")
            tokenizer = load_tokenizer(str(sft_dir), cfg.model, cfg.chat)
        else:
            base = prepare_base(cfg.model) if dist.is_main else None
            if dist.world_size > 1:  # rank 0 builds/converts the base once; the others wait for it
                holder = [base]
                torch.distributed.broadcast_object_list(holder, src=0)
                base = holder[0]
            init_path = base
            tokenizer = load_tokenizer(base, cfg.model, cfg.chat)
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("the tokenizer's pad must differ from eos for the reward model (set model.pad_token)")
        fmt = chat_format(tokenizer, cfg.chat)
        run.set_chat_format(fmt, chat_fingerprint(fmt))
        run.update(reward_layout=dict(REWARD_LAYOUT))

        # offline RLAIF: with rlaif_label among the stages, its labelled pairs replace rm.data
        source = rm.data
        if "rlaif_label" in run.parents:
            from pipeline.manifest import hash_file
            from stages.rlaif.label import labelled_preferences

            labelled = labelled_preferences(run.parent_dir("rlaif_label"))
            source, digest = DataSource(path=str(labelled)), hash_file(labelled)
            run.manifest["data_files"][str(labelled)] = digest
            run.update(preference_data={"from": "rlaif_label", "path": str(labelled), "hash": digest})
            if rm.data is not None and dist.is_main:
                print(f"[alignpipe] rm: training on {labelled} (rlaif_label is among the stages); "
                      f"rm.data ({rm.data.path}) is not used", flush=True)
        else:
            run.update(preference_data={"from": "rm.data", "path": rm.data.path})
        train_pairs, eval_pairs, data_info = load_preferences(cfg, source)
        system = cfg.chat.system_prompt
        train_rows, train_enc = encode_pairs(tokenizer, train_pairs, rm.max_length, system)
        eval_rows, eval_enc = encode_pairs(tokenizer, eval_pairs, rm.max_length, system)
        for split, enc in (("train", train_enc), ("eval", eval_enc)):
            if dist.is_main and (enc.skipped_too_long or enc.prompt_truncated):
                print(f"[alignpipe] rm: {split}: {enc.prompt_truncated} of {enc.pairs} pairs had their prompt cut "
                      f"from the left, {enc.skipped_too_long} skipped because the responses do not fit in "
                      f"rm.max_length={rm.max_length}" + (f" (first: {enc.first_skipped})" if enc.first_skipped else ""),
                      flush=True)
        if not train_rows:
            raise DataError(f"{source.path}: no training pairs fit in rm.max_length={rm.max_length} "
                            f"({train_enc.skipped_too_long} skipped as too long); raise max_length")
        if not eval_rows and dist.is_main:
            print("[alignpipe] rm: no held-out pairs (set rm.eval_data or rm.eval_fraction): no eval metrics "
                  "or histogram", flush=True)

        group_sizes: dict[int, int] = {}
        for row in train_rows:
            group_sizes[row.group] = group_sizes.get(row.group, 0) + 1
        kwise_groups = sum(1 for n in group_sizes.values() if n > 1)
        groups = [row.group for row in train_rows] if kwise_groups else None

        t = rm.train
        steps_guess = t.max_steps or max(1, math.ceil(
            t.epochs * len(train_rows) / (t.per_device_batch_size * dist.world_size * t.gradient_accumulation_steps)))
        set_seed(t.seed)  # the new score head's initialisation is reproducible
        model = load_model(init_path, cfg.model, tokenizer, kind="seq_cls", **quantization_kwargs(rm.tuning))
        model.config.use_cache = False
        model, unfreezer = apply_tuning(model, rm.tuning, "seq_cls", steps_guess)
        params = trainable_summary(model)
        if dist.is_main:
            print(f"[alignpipe] rm: {len(train_rows)} train pairs ({kwise_groups} K-wise groups), {len(eval_rows)} "
                  f"eval, init from {rm.init_from}, method {rm.tuning.method}, trainable "
                  f"{params['params_trainable']:,} / {params['params_total']:,}", flush=True)
        collate = pair_collate(tokenizer.pad_token_id)
        kept: dict[str, torch.Tensor] = {}
        engine = Engine(
            model, t, run, dist, train_rows, collate, make_loss_fn(rm.center_rewards_coefficient),
            groups=groups, unfreezer=unfreezer, desc="rm",
            eval_fn=make_eval_fn(eval_rows, collate, t.per_device_batch_size, dist.device,
                                 rm.center_rewards_coefficient, kept) if eval_rows else None,
        )
        result = engine.fit()
        save_stage_model(engine, tokenizer, run, rm.tuning, init_path, cfg, "seq_cls")

        metrics: dict[str, Any] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        if kept and dist.is_main:
            write_score_histogram(kept["chosen"], kept["rejected"], run.dir / HISTOGRAM_FILE)
            metrics["score_histogram"] = HISTOGRAM_FILE
        if "accuracy_by_margin_bucket" in result.metrics:
            metrics["accuracy_by_margin_bucket"] = result.metrics["accuracy_by_margin_bucket"]
        metrics.update(
            steps=result.global_step, train_pairs=len(train_rows), eval_pairs=len(eval_rows),
            prompt_truncated=train_enc.prompt_truncated + eval_enc.prompt_truncated,
            skipped_too_long=train_enc.skipped_too_long + eval_enc.skipped_too_long,
            train_prompt_truncated=train_enc.prompt_truncated, train_skipped_too_long=train_enc.skipped_too_long,
            eval_prompt_truncated=eval_enc.prompt_truncated, eval_skipped_too_long=eval_enc.skipped_too_long,
            skipped_records=sum(d.get("skipped", 0) for d in data_info.values()),
            kwise_groups=kwise_groups, world_size=dist.world_size,
        )
        run.update(data=data_info, params=params)
        run.manifest["metrics"] = metrics
        return metrics
