"""Hand-worked checks of the PPO / critic-free objective options (docs/PPO.md, "Objective variants"): loss
aggregation, GRPO's reward scale, clip-higher, dual clip, GSPO's sequence ratio, DAPO's overlong penalty, and
the config's refusals. TRL comparisons are in tests/test_ppo_variants.py (importing GRPOTrainer is slow)."""

import math

import pytest
import torch

from stages.ppo.core import (
    aggregate_loss,
    clipped_policy_loss,
    grpo_advantages,
    importance_log_ratio,
    loss_units,
    overlong_penalty,
)

torch.set_num_threads(1)
NAN, INF = float("nan"), float("inf")


def close(a, b, atol=1e-6):
    b = b if isinstance(b, torch.Tensor) else torch.tensor(b, dtype=a.dtype)
    assert torch.allclose(a, b.to(a.dtype), atol=atol), f"{a} != {b}"


# ---------------------------------------------------------------------------------------------
# aggregation

# rows: (1, 2, 3 | pad), (4 | pad pad pad), (no real token); NaN / inf in the padding must not leak
PER_TOKEN = [[1.0, 2.0, 3.0, NAN], [4.0, INF, NAN, -INF], [NAN, NAN, NAN, NAN]]
MASK = [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("aggregation,value,grad", [
    # token-mean: (1 + 2 + 3 + 4) / 4 real tokens; each token 1/4
    ("token-mean", 2.5, [[0.25] * 3 + [0.0], [0.25, 0, 0, 0], [0.0] * 4]),
    # seq-mean-token-mean: (6/3 + 4/1) / 2 sequences (the empty row is not one); row 0's tokens 1/6, row 1's 1/2
    ("seq-mean-token-mean", 3.0, [[1 / 6] * 3 + [0.0], [0.5, 0, 0, 0], [0.0] * 4]),
    # seq-mean-token-sum, L = 4: (6/4 + 4/4) / 2 = 1.25; every token 1/(2*4)
    ("seq-mean-token-sum", 1.25, [[0.125] * 3 + [0.0], [0.125, 0, 0, 0], [0.0] * 4]),
])
def test_aggregate_loss_hand_values_and_gradients(aggregation, value, grad):
    per_token = torch.tensor(PER_TOKEN).requires_grad_()
    loss = aggregate_loss(per_token, torch.tensor(MASK), aggregation, max_length=4)
    close(loss, value)
    loss.backward()
    close(per_token.grad, grad)
    assert int(loss_units(torch.tensor(MASK), aggregation)) == (4 if aggregation == "token-mean" else 2)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregation_over_micro_batches_weighted_by_units_is_the_whole_batch(aggregation):
    """Each micro-batch's loss x its units / the batch's units (``stages.training.loss_weight`` at world 1,
    accumulation 1) sums to the loss of the whole batch: the global normalisation composes with every mode."""
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(6, 5, generator=g)
    mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0], [1] * 4 + [0], [1, 0, 0, 0, 0], [1] * 3 + [0] * 2, [0] * 5])
    whole = aggregate_loss(per_token, mask, aggregation, max_length=5)
    total = float(loss_units(mask, aggregation))
    parts = [(per_token[i:i + 2], mask[i:i + 2]) for i in (0, 2, 4)]
    summed = sum(aggregate_loss(x, m, aggregation, max_length=5) * float(loss_units(m, aggregation)) / total
                 for x, m in parts)
    close(summed, whole)


def test_aggregate_loss_refuses_bad_arguments():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="max_length"):
        aggregate_loss(x, m, "seq-mean-token-sum")
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_loss(x, m, "seq-sum")
    with pytest.raises(ValueError, match="no real entries"):
        aggregate_loss(x, torch.zeros(2, 3), "seq-mean-token-mean")


# ---------------------------------------------------------------------------------------------
# clip-higher and dual clip


def test_clip_higher_hand_example():
    # eps_low 0.2, eps_high 0.28; ratios (1.25, 1.3, 0.75, 0.7), advantages (1, 1, -1, -1)
    # tok0 A=+1 r=1.25: -1.25 vs -1.25 (1.25 < 1.28)  -> -1.25 (a symmetric 0.2 clip would give -1.2)
    # tok1 A=+1 r=1.3:  -1.3  vs -1.28                -> -1.28 (clipped high)
    # tok2 A=-1 r=0.75:  0.75 vs  0.8                 ->  0.8  (clipped low)
    # tok3 A=-1 r=0.7:   0.7  vs  0.8                 ->  0.8  (clipped low)
    # loss = (-1.25 - 1.28 + 0.8 + 0.8) / 4 = -0.2325; clipfrac 3/4 = low 2/4 + high 1/4
    logp = torch.log(torch.tensor([[1.25, 1.3, 0.75, 0.7]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, stats = clipped_policy_loss(logp, torch.zeros(1, 4), adv, torch.ones(1, 4), 0.2, cliprange_high=0.28)
    close(loss, -0.2325)
    close(stats["clipfrac"], 0.75)
    close(stats["clipfrac_low"], 0.5)
    close(stats["clipfrac_high"], 0.25)
    assert "clipfrac_dual" not in stats
    loss.backward()
    # only tok0 is unclipped: d(-A * r)/dlogp / 4 = -1.25 / 4
    close(logp.grad, [[-0.3125, 0.0, 0.0, 0.0]])


def test_dual_clip_hand_example():
    # eps 0.2, c = 3; ratios (4, 2, 4, 0.5), advantages (-1, -1, +1, -2)
    # tok0 A=-1 r=4:   max(4, 1.2) = 4     -> min(4, 3) = 3     (dual bound, no gradient)
    # tok1 A=-1 r=2:   max(2, 1.2) = 2     -> min(2, 3) = 2     (unclipped)
    # tok2 A=+1 r=4:   max(-4, -1.2) = -1.2                     (clipped high; the dual clip is for A < 0 only)
    # tok3 A=-2 r=0.5: max(1, 1.6) = 1.6   -> min(1.6, 6) = 1.6 (clipped low)
    # loss = (3 + 2 - 1.2 + 1.6) / 4 = 1.35 (without the dual clip: (4 + 2 - 1.2 + 1.6) / 4 = 1.6)
    logp = torch.log(torch.tensor([[4.0, 2.0, 4.0, 0.5]])).requires_grad_()
    adv = torch.tensor([[-1.0, -1.0, 1.0, -2.0]])
    loss, stats = clipped_policy_loss(logp, torch.zeros(1, 4), adv, torch.ones(1, 4), 0.2, clip_ratio_c=3.0)
    close(loss, 1.35)
    close(stats["clipfrac"], 0.5)
    close(stats["clipfrac_low"], 0.25)
    close(stats["clipfrac_high"], 0.25)
    close(stats["clipfrac_dual"], 0.25)
    loss.backward()
    # only tok1 has a gradient: d(-A * r)/dlogp / 4 = 2 / 4
    close(logp.grad, [[0.0, 0.5, 0.0, 0.0]])
    plain, _ = clipped_policy_loss(logp.detach(), torch.zeros(1, 4), adv, torch.ones(1, 4), 0.2)
    close(plain, 1.6)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        clipped_policy_loss(logp, torch.zeros(1, 4), adv, torch.ones(1, 4), 0.2, clip_ratio_c=1.0)


def test_policy_loss_defaults_are_the_symmetric_token_mean():
    """The new arguments at their defaults give exactly the former loss (cliprange_high = cliprange)."""
    g = torch.Generator().manual_seed(3)
    logp, old, adv = (torch.randn(4, 6, generator=g) * 0.3 for _ in range(3))
    mask = torch.ones(4, 6)
    mask[1, 3:] = mask[3, 1:] = 0
    a, sa = clipped_policy_loss(logp, old, adv, mask, 0.2)
    b, sb = clipped_policy_loss(logp, old, adv, mask, 0.2, cliprange_high=0.2, importance_level="token",
                                aggregation="token-mean")
    assert torch.equal(a, b) and all(torch.equal(sa[k], sb[k]) for k in sa)
    close(sa["clipfrac"], sa["clipfrac_low"] + sa["clipfrac_high"])


def test_policy_loss_over_no_real_token_is_zero_with_a_graph():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = clipped_policy_loss(logp, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3), 0.2)
    assert float(loss.detach()) == 0.0 and all(float(v) == 0.0 for v in stats.values())
    loss.backward()
    assert float(logp.grad.abs().sum()) == 0.0


# ---------------------------------------------------------------------------------------------
# GSPO: sequence-level ratio


def test_sequence_ratio_value_and_gradient_hand_example():
    # row 0: log-ratios (0.3, -0.1, 0.1) -> mean 0.1, s0 = e^0.1 on its 3 tokens; row 1: one token, 0.2 -> s1 = e^0.2
    old = torch.tensor([[-1.0, -2.0, -0.5, 7.0], [-0.3, 9.0, 9.0, 9.0]])
    logp = (old + torch.tensor([[0.3, -0.1, 0.1, 50.0], [0.2, NAN, INF, 1.0]])).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    log_ratio, token_log_ratio = importance_log_ratio(logp, old, mask.bool(), "sequence")
    close(log_ratio, [[0.1, 0.1, 0.1, 0.0], [0.2, 0.0, 0.0, 0.0]])
    close(token_log_ratio, [[0.3, -0.1, 0.1, 0.0], [0.2, 0.0, 0.0, 0.0]])
    # A = +1 on row 0, -1 on row 1, wide clip (nothing clipped), seq-mean-token-mean:
    # loss = (-e^0.1 + e^0.2) / 2; d/dlogp_t = -A_i * s_i / |y_i| / 2: row 0 -e^0.1/6 per token, row 1 +e^0.2/2
    adv = torch.tensor([[1.0, 1.0, 1.0, 5.0], [-1.0, 5.0, 5.0, 5.0]])
    loss, stats = clipped_policy_loss(logp, old, adv, mask, 0.5, importance_level="sequence",
                                      aggregation="seq-mean-token-mean")
    close(loss, (-math.exp(0.1) + math.exp(0.2)) / 2)
    close(stats["ratio_max"], math.exp(0.2))
    close(stats["ratio_mean"], (3 * math.exp(0.1) + math.exp(0.2)) / 4)
    close(stats["approx_kl"], 0.5 * (0.09 + 0.01 + 0.01 + 0.04) / 4)  # per-token log-ratios
    loss.backward()
    close(logp.grad, [[-math.exp(0.1) / 6] * 3 + [0.0], [math.exp(0.2) / 2, 0.0, 0.0, 0.0]])


def test_sequence_ratio_is_clipped_as_a_whole():
    # clip 0.05: s0 = e^0.1 = 1.105 > 1.05 with A > 0 -> every token of row 0 clipped (no gradient);
    # s1 = e^0.2 with A < 0 -> unclipped. loss = (-1.05 + e^0.2) / 2
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.3, -0.1, 0.1], [0.2, 0.0, 0.0]]).requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3])
    loss, stats = clipped_policy_loss(logp, old, adv, mask, 0.05, importance_level="sequence",
                                      aggregation="seq-mean-token-mean")
    close(loss, (-1.05 + math.exp(0.2)) / 2)
    close(stats["clipfrac"], 3 / 4)
    loss.backward()
    close(logp.grad, [[0.0] * 3, [math.exp(0.2) / 2, 0.0, 0.0]])


# ---------------------------------------------------------------------------------------------
# GRPO's reward scale


def test_grpo_scale_group_batch_none_hand_example():
    # K = 2: groups (1, 3), (2, 2), (0, 4); every group mean 2 -> centred (-1, 1, 0, 0, -2, 2)
    # group: stds sqrt(2), 0, sqrt(8) -> (-1/sqrt2, 1/sqrt2, 0, 0, -1/sqrt2, 1/sqrt2)
    # batch: unbiased var of all six = (1 + 1 + 0 + 0 + 4 + 4) / 5 = 2 -> centred / sqrt2
    # none:  centred (Dr. GRPO)
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0])
    mask = torch.ones(6, 2)
    mask[2, 1] = 0
    r2 = math.sqrt(2)
    expected = {"group": [-1 / r2, 1 / r2, 0, 0, -1 / r2, 1 / r2], "batch": [-1 / r2, 1 / r2, 0, 0, -r2, r2],
                "none": [-1.0, 1.0, 0.0, 0.0, -2.0, 2.0]}
    for scale, want in expected.items():
        adv = grpo_advantages(scores, mask, 2, eps=0.0, scale=scale)
        close(adv[:, 0], want)
        assert adv[2, 1] == 0  # padding
    # batch std over the global batch: two more ranks' rewards (2, 2) -> sum of squares 10 over n - 1 = 7
    adv = grpo_advantages(scores, mask, 2, eps=0.0, scale="batch", batch_scores=torch.cat([scores, scores.new([2, 2])]))
    close(adv[:, 0], torch.tensor(expected["none"]) / math.sqrt(10 / 7))
    with pytest.raises(ValueError, match="scale"):
        grpo_advantages(scores, mask, 2, scale="std")


# ---------------------------------------------------------------------------------------------
# DAPO's overlong penalty


def test_overlong_penalty_hand_example():
    # L_max 10, buffer 4: no penalty up to 6; then -(L - 6) / 4: 7 -> -0.25, 9 -> -0.75, 10 -> -1; beyond: -1
    lengths = torch.tensor([3, 6, 7, 9, 10, 12])
    close(overlong_penalty(lengths, 10, 4, 1.0), [0.0, 0.0, -0.25, -0.75, -1.0, -1.0])
    close(overlong_penalty(lengths, 10, 4, 0.5), [0.0, 0.0, -0.125, -0.375, -0.5, -0.5])
    close(overlong_penalty(lengths, 10, 10, 1.0), [-0.3, -0.6, -0.7, -0.9, -1.0, -1.0])  # the whole range
    for buffer in (0, 11):
        with pytest.raises(ValueError, match="buffer"):
            overlong_penalty(lengths, 10, buffer, 1.0)


# ---------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("settings,keys", [
    ({"cliprange_low": 1.0}, ["ppo.cliprange_low"]),
    ({"clip_ratio_c": 1.0}, ["ppo.clip_ratio_c", "ppo.cliprange_high"]),
    ({"clip_ratio_c": 1.25, "cliprange_high": 0.28}, ["ppo.clip_ratio_c", "ppo.cliprange_high"]),
    ({"scale_rewards": "batch"}, ["ppo.scale_rewards", "ppo.advantage_estimator"]),
    ({"scale_rewards": "none", "advantage_estimator": "rloo", "num_samples_per_prompt": 2},
     ["ppo.scale_rewards", "ppo.advantage_estimator"]),
    ({"overlong_penalty": {"buffer": 33}}, ["ppo.overlong_penalty.buffer", "ppo.max_new_tokens"]),
    ({"mask_truncated": True}, ["ppo.mask_truncated", "ppo.missing_eos_penalty"]),
])
def test_config_refuses_incompatible_objective_settings_naming_both_keys(settings, keys):
    from pydantic import ValidationError

    from stages.ppo.config import PPOConfig

    with pytest.raises(ValidationError) as err:
        PPOConfig(**settings)
    for key in keys:
        assert key in str(err.value), (key, str(err.value))


def test_config_accepts_the_recipes():
    from stages.ppo.config import PPOConfig

    dapo = PPOConfig(advantage_estimator="grpo", num_samples_per_prompt=4, cliprange_low=0.2, cliprange_high=0.28,
                     scale_rewards="group", mask_truncated=True, missing_eos_penalty=0,
                     overlong_penalty={"buffer": 8, "factor": 1.0})
    assert (dapo.clip_low, dapo.clip_high) == (0.2, 0.28)
    gspo = PPOConfig(advantage_estimator="grpo", num_samples_per_prompt=4, importance_level="sequence",
                     loss_aggregation="seq-mean-token-mean", cliprange_low=3e-4, cliprange_high=4e-4, clip_ratio_c=3.0)
    assert gspo.clip_low == 3e-4
    dr_grpo = PPOConfig(advantage_estimator="grpo", num_samples_per_prompt=4, scale_rewards="none",
                        loss_aggregation="seq-mean-token-sum")
    assert dr_grpo.scale_rewards == "none"
    # importance_level sequence with a critic: GSPO-token's per-token advantages (allowed)
    assert PPOConfig(importance_level="sequence").uses_critic


@pytest.mark.parametrize("override", [
    "ppo.loss_aggregation=seq-mean-token-mean", "ppo.cliprange_low=0.1", "ppo.cliprange_high=0.28",
    "ppo.clip_ratio_c=3.0", "ppo.importance_level=sequence", "ppo.overlong_penalty={buffer: 8}",
    "ppo.mask_truncated=true",
])
def test_each_objective_setting_changes_the_ppo_stage_identity_only_when_set(override):
    from pathlib import Path

    from pipeline.config import load_config
    from pipeline.stage import stage_identity

    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    digits = "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction'}]"
    base = ["output_root=/nonexistent/pin-outputs", "stages=[ppo]", "ppo.policy_from=base", "ppo.missing_eos_penalty=0",
            digits]
    default = stage_identity(load_config(tiny, base), "ppo")
    assert stage_identity(load_config(tiny, [*base, override]), "ppo")[0] != default[0]
    key = override.split("=")[0]
    defaults = {"ppo.loss_aggregation": "token-mean", "ppo.importance_level": "token", "ppo.mask_truncated": "false"}
    explicit_default = f"{key}={defaults.get(key, 'null')}"
    assert stage_identity(load_config(tiny, [*base, explicit_default]), "ppo") == default
