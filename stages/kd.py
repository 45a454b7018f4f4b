"""Token-level (logit) knowledge distillation: the divergence between a teacher's and a student's next-token
distributions, the one home of that math (the ``sft`` stage adds it to its loss when
``distill.token_level.enabled``; see docs/DISTILL.md).

With ``p`` the teacher's and ``q`` the student's distribution over the vocabulary at one position, both from
logits divided by the temperature ``T``:

- ``forward_kl``: KL(p || q) = sum_v p_v (log p_v - log q_v): mass-covering (the student spreads over every
  token the teacher finds likely); the classic distillation loss (Hinton et al. 2015);
- ``reverse_kl``: KL(q || p) = sum_v q_v (log q_v - log p_v): mode-seeking (MiniLLM, Gu et al. 2023);
- ``jsd``: the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2023, eq. 1), with the mixture
  m = beta p + (1 - beta) q: beta KL(p || m) + (1 - beta) KL(q || m); beta -> 0 behaves like forward KL
  scaled by beta, beta -> 1 like reverse KL scaled by 1 - beta; 0 and 1 themselves are refused (the
  divergence is 0 there): use forward_kl / reverse_kl.

TRL 1.16 has the same divergence (``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss``), but inside an
HF ``Trainer`` subclass, which our engine (``stages.engine``) does not use; this module is the math alone.
The per-position divergence is multiplied by ``T**2`` (Hinton et al.) so that its gradients keep their size
as the temperature changes, and averaged over the positions that are trained (response tokens).
"""

from __future__ import annotations

import torch

KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities.

    Args:
        log_p, log_q: (N, V) log-probabilities (each row sums to 1 after exp).
    Returns:
        (N,) sum_v p_v (log p_v - log q_v); a token with p_v = 0 contributes 0 (``xlogy`` convention).
    """
    p = log_p.exp()
    return (p * (log_p - log_q)).sum(-1)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss: str = "forward_kl",
                     beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """The per-position divergence between teacher and student.

    Args:
        student_logits: (N, V) the student's next-token logits at N positions (gradients flow).
        teacher_logits: (N, V) the teacher's logits at the same positions (no gradient needed).
        loss: ``forward_kl`` | ``reverse_kl`` | ``jsd`` (see the module docstring).
        beta: the teacher's weight in the JSD mixture, 0 < beta < 1 (``jsd`` only).
        temperature: T > 0; both logit sets are divided by it.
    Returns:
        (N,) divergence per position, in nats, not yet multiplied by T**2.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"token-level distillation: student logits {tuple(student_logits.shape)} and teacher "
                         f"logits {tuple(teacher_logits.shape)} differ; the two models need the same vocabulary")
    if temperature <= 0:
        raise ValueError(f"token-level distillation: temperature must be > 0, got {temperature}")
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if loss == "forward_kl":
        return kl_divergence(log_p, log_q)
    if loss == "reverse_kl":
        return kl_divergence(log_q, log_p)
    if loss == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"token-level distillation: jsd needs 0 < beta < 1, got {beta} (beta 0 or 1 gives a "
                             "divergence of 0; use forward_kl or reverse_kl)")
        log_m = torch.logsumexp(torch.stack([log_p + torch.log(torch.tensor(beta)),
                                             log_q + torch.log(torch.tensor(1.0 - beta))]), dim=0)
        return beta * kl_divergence(log_p, log_m) + (1.0 - beta) * kl_divergence(log_q, log_m)
    raise ValueError(f"token-level distillation: unknown loss {loss!r}; expected one of {', '.join(KD_LOSSES)}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                      loss: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Mean divergence over the trained positions of a batch, times T**2.

    Args:
        student_logits: (B, L, V) the student's logits; position t predicts token t + 1.
        teacher_logits: (B, L, V) the teacher's logits on the same input ids.
        mask: (B, L) bool, True where position t's next token is trained (a response token); positions
            outside it (prompt, padding) are never read, whatever they hold.
    Returns:
        () the mean over the True positions of ``token_divergence`` x T**2; 0 (with a gradient path) when no
        position is True.
    """
    student = student_logits[mask]  # (N, V): only the trained positions, so padding garbage never enters
    teacher = teacher_logits[mask].detach()
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0
    per_position = token_divergence(student, teacher, loss, beta, temperature)
    return per_position.mean() * temperature ** 2


def trained_positions(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Which logit positions predict a trained token.

    Args:
        labels: (B, L) token ids, ``ignore_index`` where not trained (the HF causal-LM convention: the model
            shifts them, logits[:, t] is scored against labels[:, t + 1]).
    Returns:
        (B, L) bool: True at t when labels[:, t + 1] is trained; the last position is always False.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask
