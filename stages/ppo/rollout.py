"""PPO rollout helpers: prompt encoding, per-episode seeded sampling inside HF ``generate``, masks,
sequence layout for forward passes, and the reward model's input layout.

Sampling. ``generate`` runs greedy decoding over logits that :class:`EpisodeSampler` has already
turned into a one-hot choice: it applies temperature, top-k and top-p itself and draws the token by
inverse-CDF from uniforms that belong to the *episode* (seeded by run seed, step and the episode's
global position in the step's batch), not to the process. So a rollout is the same whatever the
number of ranks, the batch it shares, or whether the run was resumed: this is what makes the
two-process run comparable to a one-process run on the same global batch, and resume exact.

Layout. Prompts are left-padded (``generate`` needs it), responses right-padded; the sequence fed to
the policy, the reference and the critic is ``[prompt (left-padded) | response (right-padded)]`` with
position ids from the attention mask (``stages.chat.position_ids_from_mask``), so padding never shifts
positions. The reward model scores the same ids, unpadded: the prompt ids followed by the response up
to and including its eos (:func:`response_rows`; the layout itself lives in
``stages.scoring.reward_input_ids``, DESIGN §3).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Collection, Sequence

import torch

from stages.chat import prompt_ids, with_system


# ----------------------------------------------------------------------------------------- prompts
@dataclass
class EncodedPrompt:
    """One prompt: its messages (system prompt applied), token ids after left truncation, reference."""

    messages: list[dict[str, str]]
    ids: list[int]
    reference: Any
    truncated: bool


def encode_prompts(tokenizer: Any, examples: Sequence[Any], max_prompt_length: int,
                   system_prompt: str | None) -> list[EncodedPrompt]:
    """Render each ``PromptExample`` with the chat template (generation prompt added) and tokenise.

    Prompts longer than ``max_prompt_length`` keep their *last* tokens (the generation prompt must
    stay at the end) and are flagged ``truncated``.
    """
    out = []
    for ex in examples:
        messages = with_system(ex.prompt, system_prompt)
        ids = prompt_ids(tokenizer, messages)
        truncated = len(ids) > max_prompt_length
        out.append(EncodedPrompt(messages, ids[-max_prompt_length:], ex.reference, truncated))
    return out


# ---------------------------------------------------------------------------------------- sampling
def episode_seed(seed: int, step: int, position: int) -> int:
    """A 63-bit seed for one episode from (run seed, PPO step, global position in the step's batch)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def episode_uniforms(seed: int, step: int, positions: Sequence[int], length: int) -> torch.Tensor:
    """(B, length) float64 uniforms in [0, 1), one independent stream per episode."""
    rows = []
    for pos in positions:
        g = torch.Generator().manual_seed(episode_seed(seed, step, pos))
        rows.append(torch.rand(length, generator=g, dtype=torch.float64))
    return torch.stack(rows)


def refill_order(n_prompts: int, used: Collection[int], seed: int, step: int) -> list[int]:
    """The prompts dynamic sampling draws when PPO step ``step`` needs more groups (``ppo.filter_tied_groups``):
    those not in ``used`` (the step's own prompts, every rank's) in an order seeded by (run seed, step), so
    every rank and a resumed run read the same list; every prompt in that order when the step used them all.
    The step's extra rounds read it in turn, so no prompt comes twice within a step until it runs out."""
    digest = hashlib.blake2b(f"refill/{seed}/{step}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    order = torch.randperm(n_prompts, generator=g).tolist()
    used = set(used)
    return [i for i in order if i not in used] or order


class EpisodeSampler:
    """A ``generate`` logits processor that samples the next token itself (see module docstring).

    ``uniforms`` (B, max_new_tokens); ``prompt_len`` the padded prompt length, so the decoding step is
    ``input_ids.shape[1] - prompt_len``. Returns logits that are 0 at the drawn token and -inf
    elsewhere, so greedy decoding picks exactly that token. ``top_k`` 0 and ``top_p`` 1 disable those
    filters (DESIGN §4 defaults: temperature 1, no filtering).
    """

    def __init__(self, uniforms: torch.Tensor, prompt_len: int, temperature: float, top_k: int, top_p: float):
        self.uniforms, self.prompt_len = uniforms, prompt_len
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        """Temperature, then top-k, then top-p (nucleus) filtering; (B, V) fp32 logits."""
        scores = scores.float() / self.temperature
        if self.top_k and self.top_k < scores.size(-1):
            kth = torch.topk(scores, self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            before = probs.cumsum(-1) - probs  # mass strictly before each token in sorted order
            drop_sorted = before > self.top_p
            drop_sorted[:, 0] = False  # always keep the most likely token
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        return scores

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1] - self.prompt_len
        probs = torch.softmax(self.warp(scores), dim=-1).double()
        cdf = probs.cumsum(-1)
        u = self.uniforms[:, t:t + 1].to(cdf.device) * cdf[:, -1:]
        choice = torch.searchsorted(cdf, u).clamp_(max=scores.size(-1) - 1)
        # never pick a zero-probability token because of rounding at the top of the CDF
        picked_prob = probs.gather(-1, choice)
        if bool((picked_prob == 0).any()):
            fallback = probs.argmax(-1, keepdim=True)
            choice = torch.where(picked_prob == 0, fallback, choice)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, choice, 0.0)


# ------------------------------------------------------------------------------------ responses
def response_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real response tokens: everything up to and including the first eos (all if none).

    Args:
        responses: (B, T) generated ids (HF fills rows that finished early with pad).
    Returns:
        (mask (B, T) long, has_eos (B,) bool).
    """
    is_eos = responses == eos_id
    has_eos = is_eos.any(dim=1)
    T = responses.size(1)
    first = torch.where(has_eos, is_eos.long().argmax(dim=1), torch.full_like(has_eos, T - 1, dtype=torch.long))
    positions = torch.arange(T, device=responses.device).unsqueeze(0)
    mask = (positions <= first.unsqueeze(1)).long()
    return mask, has_eos


def response_rows(responses: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """(B, T) responses and mask -> each row's real ids (up to and including the first eos), unpadded."""
    return [[t for t, keep in zip(ids, m) if keep] for ids, m in zip(responses.tolist(), mask.tolist())]


def decode_responses(tokenizer: Any, responses: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Response text without special tokens (the eos is dropped)."""
    return tokenizer.batch_decode(response_rows(responses, mask), skip_special_tokens=True)


def engine_logp_tensor(engine_logprobs: Sequence[Sequence[float]], like: torch.Tensor) -> torch.Tensor:
    """The engine's per-row log-probs as a (B, T) tensor of ``like``'s shape and dtype, 0 after each row.

    Args:
        engine_logprobs: per row, the engine's log-prob of each real response token (eos included).
        like: (B, T), e.g. the trainer's ``old_logp`` of the same tokens.
    """
    engine = torch.zeros_like(like)
    for i, row in enumerate(engine_logprobs):
        engine[i, :len(row)] = torch.tensor(list(row), dtype=like.dtype)
    return engine


def engine_logp_diff(engine_logprobs: Sequence[Sequence[float]], old_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |engine log-prob - trainer log-prob| over the real response tokens: how far a rollout engine's
    numbers are from the trainer's forward pass (the ratio uses the trainer's; with
    ``rollout.importance_sampling`` the engine's reweight each token's loss, ``core.truncated_importance_weights``).

    Args:
        engine_logprobs: per row, the engine's log-prob of each real response token (eos included).
        old_logp: (B, T) the trainer's log-probs of the same tokens; mask: (B, T) 1 on real tokens.
    """
    engine = engine_logp_tensor(engine_logprobs, old_logp)
    real = mask.bool()
    return float((engine - old_logp).abs()[real].mean()) if bool(real.any()) else 0.0

