"""Pure checks of three rollout-side options of the RL stage: dynamic sampling (``ppo.filter_tied_groups``:
which groups tie, which fill the batch, where extra prompts come from), and when a run needs a reference
model at all (``PPOConfig.uses_reference``). Hand-worked numbers; no model is built."""

from __future__ import annotations

import pytest
import torch

from stages.ppo.core import group_rows, select_groups, tied_groups

REPO_TINY = "configs/tiny.yaml"
DIGITS = "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction'}]"


# ------------------------------------------------------------------------------------ tied groups
def test_tied_groups_by_hand():
    # K = 3: [1, 1, 1] ties, [0, 1, 0] does not, [0, 0, 0] ties, [2, 2, 2.0001] does not
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0001])
    assert tied_groups(rewards, 3).tolist() == [True, False, True, False]
    assert tied_groups(rewards, 1).all(), "a group of one always ties"
    assert tied_groups(torch.tensor([float("nan")] * 2 + [0.5, 0.5]), 2).tolist() == [False, True]


def test_tied_groups_refuses_a_batch_that_is_not_whole_groups():
    with pytest.raises(ValueError, match="group_size"):
        tied_groups(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="rewards"):
        tied_groups(torch.zeros(2, 2), 2)


def test_select_groups_takes_untied_groups_first_then_fills_with_tied_ones_in_sampling_order():
    tied = torch.tensor([True, False, True, False, False])
    assert select_groups(tied, 2).tolist() == [1, 3]
    assert select_groups(tied, 3).tolist() == [1, 3, 4]
    assert select_groups(tied, 4).tolist() == [0, 1, 3, 4], "three untied, then the first tied group"
    assert select_groups(tied, 5).tolist() == [0, 1, 2, 3, 4]
    assert select_groups(torch.tensor([True, True]), 1).tolist() == [0]
    assert select_groups(tied, 0).tolist() == []
    with pytest.raises(ValueError, match="n_groups"):
        select_groups(tied, 6)


def test_group_rows_are_whole_groups_in_order():
    assert group_rows(torch.tensor([1, 3]), 2).tolist() == [2, 3, 6, 7]
    assert group_rows(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]


def test_a_tied_group_has_no_grpo_or_rloo_advantage():
    """What makes a tied group worthless: both group estimators give it 0 (the filter's premise). GRPO's is
    exactly 0; RLOO's leave-one-out mean of 0.7s rounds in fp32, leaving 6e-8."""
    from stages.ppo.core import grpo_advantages, rloo_advantages

    rewards = torch.tensor([0.7, 0.7, 0.7, 0.0, 1.0, 1.0])
    mask = torch.ones(6, 4)
    assert tied_groups(rewards, 3).tolist() == [True, False]
    grpo, rloo = grpo_advantages(rewards, mask, 3), rloo_advantages(rewards, mask, 3)
    assert grpo[:3].abs().max() == 0 and rloo[:3].abs().max() < 1e-7
    assert grpo[3:].abs().min() > 0.5 and rloo[3:].abs().min() >= 0.5


# ---------------------------------------------------------------------------------- extra prompts
def test_refill_order_skips_the_steps_prompts_and_is_a_function_of_seed_and_step():
    from stages.ppo.rollout import refill_order

    order = refill_order(10, used=[1, 4, 7], seed=3, step=5)
    assert sorted(order) == [0, 2, 3, 5, 6, 8, 9]
    assert order == refill_order(10, used={7, 4, 1}, seed=3, step=5), "the same on every rank and on resume"
    assert order != refill_order(10, used=[1, 4, 7], seed=3, step=6)
    assert sorted(refill_order(4, used=range(4), seed=0, step=0)) == [0, 1, 2, 3], "all used: every prompt"


# ----------------------------------------------------------------------------------------- config
def _cfg(*overrides: str):
    from pipeline.config import load_config

    return load_config(REPO_TINY, ["stages=[ppo]", "ppo.policy_from=base", DIGITS, *overrides])


def test_filter_tied_groups_needs_a_group_estimator_with_groups():
    from pipeline.config import ConfigError

    grpo = ("ppo.advantage_estimator=grpo", "ppo.num_samples_per_prompt=4")
    assert _cfg("ppo.filter_tied_groups=true", *grpo).ppo.filter_tied_groups
    assert _cfg("ppo.filter_tied_groups=true", "ppo.advantage_estimator=reinforce_pp",
                "ppo.num_samples_per_prompt=2").ppo.max_sampling_rounds == 3
    with pytest.raises(ConfigError, match=r"ppo\.filter_tied_groups.*ppo\.advantage_estimator"):
        _cfg("ppo.filter_tied_groups=true", "ppo.num_samples_per_prompt=4")  # gae
    with pytest.raises(ConfigError, match=r"ppo\.filter_tied_groups.*ppo\.num_samples_per_prompt"):
        _cfg("ppo.filter_tied_groups=true", "ppo.advantage_estimator=reinforce_pp")  # K = 1
    with pytest.raises(ConfigError, match=r"ppo\.max_sampling_rounds.*ppo\.filter_tied_groups"):
        _cfg("ppo.max_sampling_rounds=5", *grpo)
    with pytest.raises(ConfigError, match="max_sampling_rounds"):
        _cfg("ppo.filter_tied_groups=true", "ppo.max_sampling_rounds=0", *grpo)


@pytest.mark.parametrize("overrides,expected", [
    ((), True),                                                          # kl_coef 0.05: KL in the reward
    (("ppo.kl_coef=0",), False),                                         # 0 x KL: nothing reads it
    (("ppo.kl_coef=0", "ppo.kl_in_loss=true", "ppo.kl_estimator=k3"), False),  # 0 x KL loss
    (("ppo.kl_coef=0", "ppo.adaptive_kl=true"), True),                   # the controller steers by the KL
    (("ppo.kl_coef=0", "ppo.max_kl=3"), True),                           # the KL budget reads it
    (("ppo.kl_coef=0.001", "ppo.kl_in_loss=true", "ppo.kl_estimator=k2"), True),
])
def test_uses_reference_exactly_when_something_reads_the_kl(overrides, expected):
    assert _cfg(*overrides).ppo.uses_reference is expected


def test_memory_plan_has_no_reference_at_kl_coef_0():
    from pipeline.memory import estimate

    assert "reference" in {r.role for r in estimate(_cfg(), "ppo").roles}
    plan = estimate(_cfg("ppo.kl_coef=0"), "ppo")
    assert "reference" not in {r.role for r in plan.roles}
    assert any("no reference" in note for note in plan.notes)


def test_new_keys_at_their_defaults_leave_the_ppo_stage_hash_alone():
    from pipeline.stage import stage_identity

    base = _cfg()
    assert stage_identity(_cfg("ppo.filter_tied_groups=false"), "ppo") == stage_identity(base, "ppo")
    grpo = ("ppo.advantage_estimator=grpo", "ppo.num_samples_per_prompt=4")
    assert stage_identity(_cfg("ppo.filter_tied_groups=true", *grpo), "ppo") != stage_identity(_cfg(*grpo), "ppo")
