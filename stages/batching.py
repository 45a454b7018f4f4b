"""Padding token-id lists into batches: left padding for generation, right padding for scoring.

One place for it, because every stage pads (PPO rollouts and scoring, the RM, the judges, rlaif_label)
and the side matters: decoder-only generation needs left padding, the RM reads its score at the last
real token of a right-padded row (DESIGN §3). Also the SFT batch (``pad_collate``, labels padded with
``IGNORE``) and the count of its target tokens (``target_tokens``), shared by SFT and PPO's pretraining
mix, and the seeded held-out split (``split_eval``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

IGNORE = -100  # label of a token that is not a target (the loss skips it)


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids (B, P), attention_mask (B, P)), left-padded to ``length`` (default: the longest row)."""
    longest = max(max(len(r) for r in rows), length or 0)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, longest - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, longest - len(r):] = 1
    return ids, mask


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids (B, L), attention_mask (B, L)), right-padded to the longest row."""
    longest = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def right_pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token id lists -> {"input_ids", "attention_mask"} (N, longest)."""
    ids, mask = right_pad(seqs, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def pad_collate(pad_id: int):
    """SFT rows ({"input_ids", "labels"}) -> right-padded input_ids / attention_mask / labels (IGNORE)."""
    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = right_pad([r["input_ids"] for r in rows], pad_id)
        labels, _ = right_pad([r["labels"] for r in rows], IGNORE)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens an SFT-style loss (``labels``, HF causal-LM convention) is a mean over: labelled positions
    after the first of their row (token t + 1 is predicted from the tokens up to t, so a label at position
    0 is never scored; ``stages.kd.trained_positions``)."""
    from stages.kd import trained_positions

    return int(trained_positions(batch["labels"], IGNORE).sum())


def split_eval(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded held-out split -> (train, eval); ``eval`` has round(len * fraction) items (at least one)."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(items), generator=g).tolist()
    n_eval = max(1, int(round(len(items) * fraction)))
    return [items[i] for i in perm[n_eval:]], [items[i] for i in perm[:n_eval]]
