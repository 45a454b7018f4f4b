"""Dynamic sampling (DAPO, Yu et al. 2025, "an open-source LLM reinforcement learning system at scale"):
which groups of a group estimator's batch carry a learning signal, and which groups make up the batch.

A group is the ``K`` samples of one prompt, ``K`` consecutive rows. When the K sequence rewards all tie
(every answer right, or every answer wrong, under a 0/1 verifier) the group-relative advantage is 0 for
every sample: the group costs a forward and backward pass and teaches nothing. ``ppo.filter_tied_groups``
drops such groups and samples more prompts until the batch is full (``stages.ppo.experience``).
"""

from __future__ import annotations

import torch

from stages.ppo.core.checks import _require_ndim, _require_tensor, _shape


def tied_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups' rewards all tie (exact equality: the case in which GRPO and RLOO give every sample of
    the group a task advantage of exactly 0).

    Args:
        rewards: ``(B,)`` sequence rewards, ``B = G * K``; rows ``g*K .. g*K + K - 1`` are group ``g``.
        group_size: ``K >= 1`` (a group of one always ties).

    Returns:
        ``(G,)`` bool, True where every reward of the group equals the group's first. A NaN never ties.
    """
    fn = "tied_groups"
    _require_tensor(fn, "rewards", rewards)
    _require_ndim(fn, "rewards", rewards, 1, "(batch,)")
    k = int(group_size)
    if k < 1 or rewards.numel() % k:
        raise ValueError(f"{fn}: `group_size` must be >= 1 and divide the batch; got group_size={group_size} "
                         f"for rewards {_shape(rewards)}")
    grouped = rewards.detach().view(-1, k)
    return (grouped == grouped[:, :1]).all(dim=1)


def select_groups(tied: torch.Tensor, n_groups: int) -> torch.Tensor:
    """The ``n_groups`` groups a batch trains on, in sampling order: the first ``n_groups`` groups that do
    not tie; when fewer than that do not tie, all of those and the first tied groups fill the rest.

    Args:
        tied: ``(G,)`` bool, every group sampled so far in sampling order (:func:`tied_groups`).
        n_groups: groups in the batch, ``0 <= n_groups <= G``.

    Returns:
        ``(n_groups,)`` long: indices into ``tied``, ascending.

    Example: ``tied = [T, F, T, F, F]``, ``n_groups = 2`` -> ``[1, 3]``; ``n_groups = 4`` -> ``[0, 1, 3, 4]``
    (three untied groups, then the first tied one).
    """
    fn = "select_groups"
    _require_tensor(fn, "tied", tied)
    _require_ndim(fn, "tied", tied, 1, "(groups,)")
    if not 0 <= n_groups <= tied.numel():
        raise ValueError(f"{fn}: `n_groups` must be between 0 and the {tied.numel()} groups sampled, got {n_groups}")
    tied = tied.bool()
    informative = (~tied).nonzero().flatten()[:n_groups]
    filler = tied.nonzero().flatten()[:n_groups - informative.numel()]
    return torch.cat([informative, filler]).sort().values


def group_rows(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Row indices of ``groups`` ((n,) group indices) with ``K = group_size`` rows each -> ``(n * K,)`` long,
    group by group: group ``g`` gives rows ``g*K .. g*K + K - 1``."""
    k = int(group_size)
    return (groups.long().unsqueeze(1) * k + torch.arange(k)).flatten()
