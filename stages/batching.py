"""Padding token-id lists into batches: left padding for generation, right padding for scoring.

One place for it, because every stage pads (PPO rollouts and scoring, the RM, the judges, rlaif_label)
and the side matters: decoder-only generation needs left padding, the RM reads its score at the last
real token of a right-padded row (DESIGN §3).
"""

from __future__ import annotations

from typing import Sequence

import torch


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
