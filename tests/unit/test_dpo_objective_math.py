"""The DPO family's newer objectives (stages/dpo/core.py): SimPO, ORPO and KTO on hand-worked numbers, and their
settings (stages/dpo/config.py): the defaults that depend on the loss, and the combinations that are refused."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from stages.dpo.config import DPOConfig
from stages.dpo.core import kto_loss, log_odds, orpo_loss, simpo_loss


# --------------------------------------------------------------------------------------------- SimPO
def test_simpo_loss_hand_worked():
    """β = 2, γ = 0.5; per-token means m_c = (-1, -2), m_r = (-1.5, -1): β (m_c - m_r) - γ = 0.5 and -2.5, so the
    losses are -log σ(0.5) = log(1 + e^-0.5) = 0.474077 and -log σ(-2.5) = log(1 + e^2.5) = 2.578890; the
    rewards are β m."""
    mean_c, mean_r = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    losses, reward_c, reward_r = simpo_loss(mean_c, mean_r, beta=2.0, gamma=0.5)
    torch.testing.assert_close(losses, torch.tensor([0.4740770, 2.5788897]))
    torch.testing.assert_close(reward_c, torch.tensor([-2.0, -4.0]))
    torch.testing.assert_close(reward_r, torch.tensor([-3.0, -2.0]))
    # the SFT term adds w x the chosen response's per-token NLL (-m_c): 0.3 x 1 and 0.3 x 2
    with_sft, _, _ = simpo_loss(mean_c, mean_r, beta=2.0, gamma=0.5, sft_weight=0.3)
    torch.testing.assert_close(with_sft, torch.tensor([0.7740770, 3.1788897]))


def test_simpo_at_equal_means_is_log2_and_moves_both_responses_equally():
    """γ = 0 with equal means is -log σ(0) = log 2; the gradient raises m_c and lowers m_r by β σ(0) = 1 each."""
    mean_c = torch.tensor([-1.0], requires_grad=True)
    mean_r = torch.tensor([-1.0], requires_grad=True)
    losses, _, _ = simpo_loss(mean_c, mean_r, beta=2.0, gamma=0.0)
    assert float(losses.detach()) == pytest.approx(math.log(2))
    losses.sum().backward()
    assert float(mean_c.grad) == pytest.approx(-1.0) and float(mean_r.grad) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- ORPO
def test_log_odds_both_branches_and_the_edges():
    """p = 0.25 (below e^-log2, the log1p branch): odds 1/3; p = 0.75 (the expm1 branch): odds 3; p = 0.5: 0."""
    m = torch.log(torch.tensor([0.25, 0.75, 0.5]))
    torch.testing.assert_close(log_odds(m), torch.tensor([-math.log(3), math.log(3), 0.0]))
    # near certainty: exact where fp32 can say it; a mean of exactly 0 is capped (finite), far below 0 ~ m
    near = log_odds(torch.tensor([-1e-4, 0.0, -50.0]))
    assert float(near[0]) == pytest.approx(-1e-4 - math.log(-math.expm1(-1e-4)), rel=1e-4)
    assert math.isfinite(float(near[1])) and float(near[1]) == pytest.approx(-math.log(1e-6), rel=1e-3)
    assert float(near[2]) == pytest.approx(-50.0)


def test_orpo_loss_hand_worked():
    """m_c = (log 0.75, log 0.5), m_r = (log 0.25, log 0.75): log odds (log 3, 0) vs (-log 3, log 3), log odds
    ratios 2 log 3 and -log 3, so σ = 9/10 and 1/4. λ = 0.1: losses = -m_c - λ log σ =
    -log 0.75 + 0.1 log(10/9) = 0.298218 and -log 0.5 + 0.1 log 4 = 0.831777. Rewards: the log odds."""
    mean_c = torch.log(torch.tensor([0.75, 0.5]))
    mean_r = torch.log(torch.tensor([0.25, 0.75]))
    losses, reward_c, reward_r = orpo_loss(mean_c, mean_r, lam=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.2982181, 0.8317766]))
    torch.testing.assert_close(reward_c, torch.tensor([math.log(3), 0.0]))
    torch.testing.assert_close(reward_r, torch.tensor([-math.log(3), math.log(3)]))
    nll_only, _, _ = orpo_loss(mean_c, mean_r, lam=0.0)  # λ = 0: plain SFT on the chosen responses
    torch.testing.assert_close(nll_only, -mean_c)


# ----------------------------------------------------------------------------------------------- KTO
# three rows: r = logp - ref = (1, -1, 0), labels (desirable, undesirable, desirable); two mismatched sequences
# with log-ratios 1 and 0.5: z0 = 0.75
LOGP, REF = torch.tensor([-3.0, -5.0, -4.0]), torch.tensor([-4.0, -4.0, -4.0])
DESIRABLE = torch.tensor([True, False, True])
KL_LOGP, KL_REF = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -12.5])


def test_kto_loss_hand_worked():
    """β = 0.5, z0 = 0.75: desirable 1 - σ(0.5 (1 - 0.75)) = 1 - σ(0.125) = 0.468791; undesirable
    1 - σ(0.5 (0.75 + 1)) = 1 - σ(0.875) = 0.294215; desirable 1 - σ(0.5 (0 - 0.75)) = 0.592667."""
    losses, rewards, z0 = kto_loss(LOGP, REF, DESIRABLE, KL_LOGP, KL_REF, beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([0.4687906, 0.2942150, 0.5926666]))
    torch.testing.assert_close(rewards, torch.tensor([0.5, -0.5, 0.0]))
    assert float(z0) == pytest.approx(0.75)
    # λ_D = 2, λ_U = 0.5 scale each label's losses
    weighted, _, _ = kto_loss(LOGP, REF, DESIRABLE, KL_LOGP, KL_REF, beta=0.5, desirable_weight=2.0,
                              undesirable_weight=0.5)
    torch.testing.assert_close(weighted, torch.tensor([0.9375813, 0.1471075, 1.1853332]))


def test_kto_reference_point_is_clamped_at_zero_and_carries_no_gradient():
    """Mismatched log-ratios (-1, -3) average -2 < 0: z0 = 0, so the losses are 1 - σ(0.5 r) for the desirable
    rows and 1 - σ(-0.5 r) for the undesirable one: 0.377541, 0.377541, 0.5. No gradient reaches the mismatched
    sequences' log-probs (z0 is an estimate, not a target)."""
    kl_logp = torch.tensor([-12.0, -15.5], requires_grad=True)
    logp = LOGP.clone().requires_grad_(True)
    losses, _, z0 = kto_loss(logp, REF, DESIRABLE, kl_logp, torch.tensor([-11.0, -12.5]), beta=0.5)
    assert float(z0) == 0.0
    torch.testing.assert_close(losses.detach(), torch.tensor([0.3775407, 0.3775407, 0.5]))
    losses.sum().backward()
    assert kl_logp.grad is None and logp.grad is not None
    # desirable rows are pushed up, the undesirable one down
    assert float(logp.grad[0]) < 0 and float(logp.grad[2]) < 0 and float(logp.grad[1]) > 0


def test_kl_partners_pair_each_row_with_another_prompt_when_there_is_one():
    """KTO's mismatched sequences (stages/dpo/kto.py): each row's first candidate has another prompt, the choice is
    the seed's; with one prompt only, another row of it; a lone row is its own."""
    from stages.dpo.kto import kl_partners

    keys = ["a", "a", "b", "b", "c", "a"]
    first = {i: next(candidates) for i, candidates in kl_partners(keys, seed=3)}
    assert all(keys[j] != keys[i] for i, j in first.items())
    assert first == {i: next(candidates) for i, candidates in kl_partners(keys, seed=3)}
    assert first != {i: next(candidates) for i, candidates in kl_partners(keys, seed=4)}
    same = {i: next(candidates) for i, candidates in kl_partners(["x", "x", "x"], seed=0)}
    assert all(j != i for i, j in same.items())
    assert [next(candidates) for _, candidates in kl_partners(["x"], seed=0)] == [0]


# ----------------------------------------------------------------------------------------- settings
def test_defaults_that_depend_on_the_loss():
    assert DPOConfig().beta == 0.1 and DPOConfig(loss="kto").beta == 0.1
    simpo = DPOConfig(loss="simpo")
    assert (simpo.beta, simpo.simpo_gamma, simpo.simpo_sft_weight) == (2.0, 0.5, 0.0)
    orpo = DPOConfig(loss="orpo")
    assert (orpo.beta, orpo.orpo_lambda) == (None, 0.1) and not orpo.uses_reference
    assert DPOConfig(loss="simpo", beta=2.5).beta == 2.5
    # the resolved settings survive the round trip every stage process makes (config.resolved.json)
    for cfg in (simpo, orpo, DPOConfig(loss="kto", desirable_weight=1.2)):
        assert DPOConfig(**cfg.model_dump(mode="json")) == cfg
    assert DPOConfig(loss="orpo").objective() == {"loss": "orpo", "orpo_lambda": 0.1}


@pytest.mark.parametrize("settings, message", [
    ({"loss": "kto", "label_smoothing": 0.1}, r"dpo\.label_smoothing=0\.1 is only used by dpo\.loss='cdpo' \(got "
                                              r"dpo\.loss='kto'\)"),
    ({"loss": "orpo", "beta": 0.2}, r"dpo\.beta=0\.2 is not used by dpo\.loss='orpo'.*dpo\.orpo_lambda"),
    ({"loss": "orpo", "label_smoothing": 0.1}, r"dpo\.label_smoothing=0\.1 is only used by dpo\.loss='cdpo'"),
    ({"loss": "sigmoid", "simpo_gamma": 0.5}, r"dpo\.simpo_gamma=0\.5 is only used by dpo\.loss='simpo' \(got "
                                              r"dpo\.loss='sigmoid'\)"),
    ({"simpo_sft_weight": 1.0}, r"dpo\.simpo_sft_weight=1\.0 is only used by dpo\.loss='simpo'"),
    ({"loss": "simpo", "orpo_lambda": 0.2}, r"dpo\.orpo_lambda=0\.2 is only used by dpo\.loss='orpo' \(got "
                                            r"dpo\.loss='simpo'\)"),
    ({"loss": "ipo", "desirable_weight": 1.5}, r"dpo\.desirable_weight=1\.5 is only used by dpo\.loss='kto'"),
    ({"loss": "simpo", "undesirable_weight": 0.8}, r"dpo\.undesirable_weight=0\.8 is only used by dpo\.loss='kto'"),
    ({"loss": "kto", "simpo_gamma": 1.0}, r"dpo\.simpo_gamma=1\.0 is only used by dpo\.loss='simpo'"),
])
def test_a_setting_of_another_loss_is_refused_naming_both_keys(settings, message):
    with pytest.raises(ValidationError, match=message):
        DPOConfig(**settings)
