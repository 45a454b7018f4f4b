"""DPO math: pure functions of tensors, shapes in the docstrings, no model and no config.

Notation for a batch of B preference pairs: ``logp_c`` / ``logp_r`` the policy's log-probability of the
chosen / rejected response given the prompt, ``ref_c`` / ``ref_r`` the same under the reference, β the
inverse temperature. The implicit reward of a response is ``β (logp - ref)``, and every loss is a
function of the reward margin's un-scaled form

    h = (logp_c - ref_c) - (logp_r - ref_r)        # (B,)

- ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log σ(β h)``;
- ``cdpo`` (conservative DPO, labels flipped with probability ε = ``label_smoothing``):
  ``-(1 - ε) log σ(β h) - ε log σ(-β h)``;
- ``ipo`` (IPO, Azar et al. 2023): ``(h - 1 / (2β))²``. As in TRL, IPO is given *per-token mean*
  log-probs (``sequence_logprobs(...)[0] / count``), the others per-sequence sums.

All in fp32 whatever the model computes in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "cdpo")


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor,
                      response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token) over the response tokens of each row.

    Args:
        logits: ``(N, T, V)`` the model's output for ``input_ids`` (position t predicts token t + 1).
        input_ids: ``(N, T)`` token ids (padding anywhere outside the mask).
        response_mask: ``(N, T)`` 1 where the *token* at t is a response token (its log-prob counts),
            0 on the prompt and padding. Position 0 is never a target.
    Returns:
        ``(logp_sum (N,) fp32, count (N,) fp32)``: summed log-probs and how many tokens were summed.
    """
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = response_mask[:, 1:].float()
    token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logp * mask).sum(-1), mask.sum(-1)


def preference_loss(logp_c: torch.Tensor, logp_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
                    beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO / IPO / cDPO losses and implicit rewards.

    Args:
        logp_c, logp_r: ``(B,)`` policy log-probs of the chosen / rejected responses (sums; per-token
            means for ``ipo``). Gradients flow through these.
        ref_c, ref_r: ``(B,)`` the reference's, in the same form (no gradient needed).
        beta: β > 0. loss_type: one of ``LOSS_TYPES``. label_smoothing: ε of ``cdpo`` (0 otherwise).
    Returns:
        ``(losses (B,), reward_chosen (B,), reward_rejected (B,))``, fp32; the rewards ``β (logp - ref)``
        are detached.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    pc, pr, rc, rr = (x.float() for x in (logp_c, logp_r, ref_c, ref_r))
    h = (pc - rc) - (pr - rr)
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        eps = label_smoothing if loss_type == "cdpo" else 0.0
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    return losses, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def preference_metrics(reward_c: torch.Tensor, reward_r: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(B,)`` implicit rewards -> scalar tensors: ``reward_chosen``, ``reward_rejected``, ``margin``
    (mean chosen minus rejected) and ``accuracy`` (fraction with chosen strictly above rejected)."""
    return {"reward_chosen": reward_c.mean(), "reward_rejected": reward_r.mean(),
            "margin": (reward_c - reward_r).mean(), "accuracy": (reward_c > reward_r).float().mean()}
