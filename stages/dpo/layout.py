"""The ``dpo`` stage's rows and their token layout: a pair (or a KTO row) as two sequences, a micro-batch as the
first sequences of its B rows then their second ones, and the policy's log-probs of a laid-out batch.

Shared by the stage (``stages.dpo.trainer``) and KTO's unpaired rows (``stages.dpo.kto``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from stages.batching import right_pad
from stages.dpo.core import sequence_logprobs
from stages.preferences import EncodedPair


@dataclass
class DPORow:
    """One encoded pair, its position in its split (the reference cache's key) and the reference's
    log-probs of its two responses (in the loss's form)."""

    pair: EncodedPair
    index: int = 0
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


def response_mask(rows: list[list[int]], prompt_lengths: list[int], width: int) -> torch.Tensor:
    """(N, width) 1 on response tokens (after each row's prompt, up to its end), 0 on prompt and padding."""
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, start) in enumerate(zip(rows, prompt_lengths)):
        mask[i, start:len(ids)] = 1
    return mask


def dpo_collate(pad_id: int) -> Callable[[list[DPORow]], dict[str, torch.Tensor]]:
    """-> input_ids / attention_mask / response_mask (2B, T): the B chosen rows then the B rejected rows,
    right-padded; ref_chosen / ref_rejected (B,) fp32; pair_index (B,) the pairs' positions in their split."""

    def collate(rows: list[DPORow]) -> dict[str, torch.Tensor]:
        seqs = [r.pair.chosen for r in rows] + [r.pair.rejected for r in rows]
        starts = [r.pair.chosen_prompt for r in rows] + [r.pair.rejected_prompt for r in rows]
        ids, att = right_pad(seqs, pad_id)
        return {"input_ids": ids, "attention_mask": att, "response_mask": response_mask(seqs, starts, ids.shape[1]),
                "ref_chosen": torch.tensor([r.ref_chosen for r in rows], dtype=torch.float32),
                "ref_rejected": torch.tensor([r.ref_rejected for r in rows], dtype=torch.float32),
                "pair_index": torch.tensor([r.index for r in rows], dtype=torch.long)}

    return collate


def policy_logps(model: Any, batch: dict[str, torch.Tensor], mean: bool) -> torch.Tensor:
    """(2B,) fp32 log-probs of each row's response: sums, or per-token means when ``mean`` (IPO, ORPO, SimPO)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    total, count = sequence_logprobs(out.logits, batch["input_ids"], batch["response_mask"])
    return total / count.clamp(min=1) if mean else total


@dataclass
class StageRows:
    """The stage's rows under its objective, and what the engine needs of them: ``train`` / ``eval`` rows (pairs,
    or KTO's rows), their ``collate``, the micro-batch ``loss_fn``, the held-out ``evaluate`` (None without
    held-out rows), the data report (``info``) and manifest counts, the ``unit`` the rows are counted in
    (``pairs``, ``rows``), and ``reference_eval()``: what the starting policy scored on the held-out pairs
    (called once their reference log-probs are in; {} when there are none)."""

    train: list[Any]
    eval: list[Any]
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
    evaluate: Callable[[Any], dict[str, float]] | None
    info: dict[str, Any]
    counts: dict[str, int]
    unit: str = "pairs"
    reference_eval: Callable[[], dict[str, float]] = field(default=lambda: {})
