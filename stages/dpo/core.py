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

Three more objectives of the family, each in a function of its own (docs/DPO.md gives sources and when to
use which):

- ``simpo_loss`` (SimPO, Meng et al. 2024): no reference; per-token mean log-probs ``m_c`` / ``m_r``:
  ``-log σ(β (m_c - m_r) - γ)`` (+ an optional SFT term ``-w m_c``);
- ``orpo_loss`` (ORPO, Hong et al. 2024): no reference; ``-m_c - λ log σ(log odds(m_c) - log odds(m_r))``
  with ``log odds(m) = m - log(1 - e^m)``, the odds of the response's per-token mean probability;
- ``kto_loss`` (KTO, Ethayarajh et al. 2024): *unpaired* rows, each desirable or not, with the reference
  point ``z0`` estimated from mismatched prompt/completion sequences.

All in fp32 whatever the model computes in.
"""

from __future__ import annotations

import math

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



def logp_agreement(logp_c: torch.Tensor, logp_r: torch.Tensor) -> dict[str, float]:
    """``(B,)`` a model's own log-probs of the chosen / rejected responses -> how often and by how much it prefers
    the chosen one: ``logp_margin`` (mean difference) and ``logp_accuracy`` (fraction > 0). Length-biased for
    sums: a check of what training moved, not a metric to optimise."""
    diff = (logp_c - logp_r).double()
    return {"logp_margin": float(diff.mean()), "logp_accuracy": float((diff > 0).double().mean())}


# ------------------------------------------------------------------------------ reference-free, paired
def simpo_loss(mean_c: torch.Tensor, mean_r: torch.Tensor, beta: float, gamma: float, sft_weight: float = 0.0,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO losses ``-log σ(β (m_c - m_r) - γ) - w m_c`` and its implicit rewards ``β m``.

    Args:
        mean_c, mean_r: ``(B,)`` the policy's *per-token mean* log-probs of the chosen / rejected responses
            (the length normalisation is SimPO's; no reference). Gradients flow through these.
        beta: β > 0, the reward scale. gamma: γ >= 0, the target margin between the two rewards.
        sft_weight: w >= 0 of the optional SFT term (the chosen response's per-token NLL ``-m_c``; 0: off).
    Returns:
        ``(losses (B,), reward_chosen (B,), reward_rejected (B,))`` fp32; rewards ``β m`` detached.
    """
    mc, mr = mean_c.float(), mean_r.float()
    losses = -F.logsigmoid(beta * (mc - mr) - gamma)
    if sft_weight:
        losses = losses - sft_weight * mc
    return losses, (beta * mc).detach(), (beta * mr).detach()


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """``(B,)`` per-token mean log-probs ``m`` -> ``(B,)`` log odds ``log(p / (1 - p))`` of ``p = e^m``, i.e.
    ``m - log(1 - e^m)``, fp32. ``log(1 - e^m)`` is taken as ``log1p(-e^m)`` below ``m = -log 2`` and
    ``log(-expm1(m))`` above it (no cancellation either side); ``m`` is capped at -1e-6 because a mean
    log-prob of exactly 0 (every token certain) has infinite odds."""
    m = mean_logp.float().clamp(max=-1e-6)
    log_one_minus_p = torch.where(m < -math.log(2), torch.log1p(-torch.exp(m)), torch.log(-torch.expm1(m)))
    return m - log_one_minus_p


def orpo_loss(mean_c: torch.Tensor, mean_r: torch.Tensor, lam: float,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ORPO losses ``-m_c - λ log σ(log odds(m_c) - log odds(m_r))`` and the log odds as rewards.

    Args:
        mean_c, mean_r: ``(B,)`` the policy's per-token mean log-probs of the chosen / rejected responses (no
            reference). ``-m_c`` is the SFT term: the chosen response's per-token negative log-likelihood.
        lam: λ >= 0, the weight of the odds-ratio term (TRL's ``ORPOConfig.beta``).
    Returns:
        ``(losses (B,), reward_chosen (B,), reward_rejected (B,))`` fp32; the rewards are the detached log
        odds, so their difference is the log odds ratio the loss raises.
    """
    odds_c, odds_r = log_odds(mean_c), log_odds(mean_r)
    losses = -mean_c.float() - lam * F.logsigmoid(odds_c - odds_r)
    return losses, odds_c.detach(), odds_r.detach()


# ------------------------------------------------------------------------------------------ unpaired
def kto_loss(logp: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl_logp: torch.Tensor,
             kl_ref: torch.Tensor, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row KTO losses on N unpaired rows, their implicit rewards and the reference point.

    With ``r = logp - ref`` and ``z0 = max(0, mean(kl_logp - kl_ref))`` (no gradient: KTO's estimate of
    KL(policy || reference), from the policy's and the reference's log-probs of *mismatched* sequences, a
    row's prompt with another row's completion):

    - a desirable row: ``λ_D (1 - σ(β (r - z0)))``;
    - an undesirable row: ``λ_U (1 - σ(β (z0 - r)))``.

    Args:
        logp, ref: ``(N,)`` the policy's / the reference's summed log-probs of each row's completion given its
            prompt. Gradients flow through ``logp``.
        desirable: ``(N,)`` bool, the rows' labels.
        kl_logp, kl_ref: ``(M,)`` the policy's / the reference's summed log-probs of the mismatched sequences
            (M >= 1; no gradient needed).
        beta: β > 0. desirable_weight, undesirable_weight: λ_D, λ_U > 0.
    Returns:
        ``(losses (N,), rewards (N,), z0 ())`` fp32; the rewards ``β r`` and ``z0`` detached.
    """
    z0 = (kl_logp.detach().float() - kl_ref.float()).mean().clamp(min=0)
    r = logp.float() - ref.float()
    losses = torch.where(desirable.bool(), desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return losses, (beta * r).detach(), z0
