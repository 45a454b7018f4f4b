"""Hand-worked checks of the pure PPO math in stages/ppo/core/ (DESIGN §4)."""

import math

import pytest
import torch

from stages.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    discounted_returns,
    entropy_from_logits,
    explained_variance,
    grpo_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
    kl_return,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    rloo_advantages,
    truncated_importance_weights,
)

torch.set_num_threads(1)


def T(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def close(a, b, atol=1e-6):
    b = b if isinstance(b, torch.Tensor) else torch.tensor(b, dtype=a.dtype)
    assert torch.allclose(a, b.to(a.dtype), atol=atol), f"{a} != {b}"


# ---------------------------------------------------------------------------------------------
# GAE


def test_gae_hand_example_gamma_half_lam_half_with_early_end():
    # gamma = lam = 0.5, so gamma * lam = 0.25.
    # Row 0 (mask ends after 3 tokens; position 3 holds garbage that must not leak):
    #   r = [1, 0, 2], V = [1, 2, 1], V after the last real token = 0 (terminal)
    #   t=2: delta = 2 + 0.5*0 - 1 = 1               A2 = 1
    #   t=1: delta = 0 + 0.5*1 - 2 = -1.5            A1 = -1.5 + 0.25*1     = -1.25
    #   t=0: delta = 1 + 0.5*2 - 1 = 1               A0 = 1 + 0.25*(-1.25)  = 0.6875
    #   returns = A + V = [1.6875, 0.75, 2, 0]
    # Row 1 (full length): r = [0, 1, 0, 1], V = 0.5 everywhere
    #   t=3: delta = 1 - 0.5 = 0.5                   A3 = 0.5
    #   t=2: delta = 0 + 0.25 - 0.5 = -0.25          A2 = -0.25 + 0.25*0.5      = -0.125
    #   t=1: delta = 1 + 0.25 - 0.5 = 0.75           A1 = 0.75 + 0.25*(-0.125)  = 0.71875
    #   t=0: delta = 0 + 0.25 - 0.5 = -0.25          A0 = -0.25 + 0.25*0.71875  = -0.0703125
    #   returns = [0.4296875, 1.21875, 0.375, 1.0]
    rewards = T([[1, 0, 2, 100.0], [0, 1, 0, 1]])
    values = T([[1, 2, 1, -50.0], [0.5, 0.5, 0.5, 0.5]])
    mask = T([[1, 1, 1, 0], [1, 1, 1, 1]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.5, lam=0.5)
    close(adv, [[0.6875, -1.25, 1.0, 0.0], [-0.0703125, 0.71875, -0.125, 0.5]])
    close(ret, [[1.6875, 0.75, 2.0, 0.0], [0.4296875, 1.21875, 0.375, 1.0]])
    assert adv.dtype == torch.float32 and not adv.requires_grad
    # returns = advantages + values on real tokens; both 0 after the mask ends.
    m = mask.bool()
    close(ret[m], (adv + values)[m])
    assert adv[~m].eq(0).all() and ret[~m].eq(0).all()


def test_gae_gamma1_lam1_is_reward_to_go():
    # Row 0: r = [1, 2, 3] -> reward-to-go [6, 5, 3]; adv = rtg - V = [5.5, 4, 1.5]
    # Row 1: mask [1, 1, 0]: r = [1, 1] -> rtg [2, 1]; V = 0 -> adv = [2, 1]; garbage at t=2 ignored.
    rewards = T([[1, 2, 3], [1, 1, 99]])
    values = T([[0.5, 1, 1.5], [0, 0, -7]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(ret, [[6, 5, 3], [2, 1, 0]])
    close(adv, [[5.5, 4, 1.5], [2, 1, 0]])


def test_gae_lam0_is_one_step_td():
    # gamma = 1, lam = 0: A_t = r_t + V_{t+1} - V_t with V_3 = 0.
    # r = [1, 2, 3], V = [0.5, 1, 1.5]:
    #   A0 = 1 + 1 - 0.5 = 1.5;  A1 = 2 + 1.5 - 1 = 2.5;  A2 = 3 + 0 - 1.5 = 1.5
    #   returns = [2, 3.5, 3]
    adv, ret = compute_gae(T([[1, 2, 3]]), T([[0.5, 1, 1.5]]), T([[1, 1, 1]]), gamma=1.0, lam=0.0)
    close(adv, [[1.5, 2.5, 1.5]])
    close(ret, [[2, 3.5, 3]])


def test_gae_gamma0_is_immediate_reward():
    # gamma = 0: A_t = r_t - V_t whatever lam is, and returns = r_t.
    r, v = T([[1, 2, 3]]), T([[0.5, 1, 1.5]])
    for lam in (0.0, 0.95, 1.0):
        adv, ret = compute_gae(r, v, T([[1, 1, 1]]), gamma=0.0, lam=lam)
        close(adv, [[0.5, 1, 1.5]])
        close(ret, [[1, 2, 3]])


def test_gae_padding_never_leaks_and_matches_scalar_reference():
    g = torch.Generator().manual_seed(0)
    B, L = 4, 6
    rewards = torch.randn(B, L, generator=g)
    values = torch.randn(B, L, generator=g)
    lengths = [6, 3, 1, 4]
    mask = torch.zeros(B, L)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    gamma, lam = 0.9, 0.8
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)

    # Scalar reference, one row at a time, touching only the real tokens.
    for i, n in enumerate(lengths):
        a_next, expected = 0.0, [0.0] * L
        for t in reversed(range(n)):
            v_next = values[i, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[i, t].item() + gamma * v_next - values[i, t].item()
            a_next = delta + gamma * lam * a_next
            expected[t] = a_next
        close(adv[i], expected, atol=1e-5)

    # Changing anything in the padding changes nothing.
    pad = mask == 0
    adv2, ret2 = compute_gae(rewards.masked_fill(pad, 1e6), values.masked_fill(pad, -1e6), mask, gamma, lam)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_gae_rejects_bad_inputs_with_helpful_messages():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"`values`.*\(2, 3\).*\(2, 4\)"):
        compute_gae(r, torch.zeros(2, 4), torch.ones(2, 3), 1.0, 0.95)
    with pytest.raises(ValueError, match=r"`mask`.*\(2, 3\).*\(3, 3\)"):
        compute_gae(r, r, torch.ones(3, 3), 1.0, 0.95)
    with pytest.raises(ValueError, match=r"2-D.*\(3,\)"):
        compute_gae(torch.zeros(3), torch.zeros(3), torch.ones(3), 1.0, 0.95)
    with pytest.raises(ValueError, match="gamma"):
        compute_gae(r, r, torch.ones(2, 3), 1.5, 0.95)
    with pytest.raises(ValueError, match="lam"):
        compute_gae(r, r, torch.ones(2, 3), 1.0, -0.1)
    with pytest.raises(ValueError, match=r"1s followed by 0s.*rows \[1\]"):
        compute_gae(r, r, torch.tensor([[1, 1, 1], [0, 1, 1]]), 1.0, 0.95)
    with pytest.raises(ValueError, match="only 0 and 1"):
        compute_gae(r, r, torch.full((2, 3), 0.5), 1.0, 0.95)


# ---------------------------------------------------------------------------------------------
# masked statistics


# ---------------------------------------------------------------------------------------------
# critic-free estimators (GRPO, RLOO, REINFORCE++)


def test_grpo_hand_example_equal_group_is_zero_and_padding_stays_zero():
    # K = 3, two groups. Group 0: r = [1, 2, 3], mean 2, unbiased std sqrt(((1)+(0)+(1))/2) = 1
    #   A = [-1, 0, 1] / (1 + eps)
    # Group 1: r = [5, 5, 5]: all equal -> A = 0 (no NaN)
    scores = T([1, 2, 3, 5, 5, 5])
    mask = T([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    adv = grpo_advantages(scores, mask, group_size=3, eps=0.0)
    close(adv, [[-1, -1, 0], [0, 0, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    assert torch.isfinite(grpo_advantages(scores, mask, 3)).all() and not adv.requires_grad
    # K = 2: r = [0, 4]: mean 2, std sqrt((4 + 4) / 1) = 2.828..., A = -+2 / 2.828 = -+0.7071
    adv2 = grpo_advantages(T([0.0, 4.0]), T([[1, 0], [1, 1]]), group_size=2, eps=0.0)
    close(adv2, [[-1 / math.sqrt(2), 0.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]])


def test_rloo_leave_one_out_hand_example():
    # K = 3, r = [1, 2, 6]: baselines (mean of the others) = [4, 3.5, 1.5] -> A = [-3, -1.5, 4.5]
    # = K/(K-1) * (r - mean) = 1.5 * ([1, 2, 6] - 3) (sum of a group's advantages is 0)
    # group 2: r = [7, 7, 7] -> 0
    scores = T([1, 2, 6, 7, 7, 7])
    mask = T([[1, 1], [1, 0], [1, 1], [1, 1], [1, 1], [1, 0]])
    adv = rloo_advantages(scores, mask, group_size=3)
    close(adv, [[-3, -3], [-1.5, 0], [4.5, 4.5], [0, 0], [0, 0], [0, 0]])
    # no std normalisation: scaling the rewards scales the advantages
    close(rloo_advantages(scores * 10, mask, 3), adv * 10, atol=1e-5)


def test_group_estimators_reject_bad_groups():
    mask = T([[1], [1], [1]])
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(T([1, 2, 3]), mask, group_size=1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        rloo_advantages(T([1, 2, 3]), mask, group_size=2)
    with pytest.raises(ValueError, match="batch size"):
        rloo_advantages(T([1, 2]), mask, group_size=2)


def test_kl_return_hand_example_is_linear_in_kl_coef():
    # beta = 0.1, KL = [1, 2, 3] on a row that ends after 3 tokens (garbage 9 in the padding):
    #   per-token -beta*KL = [-0.1, -0.2, -0.3] ; reward-to-go (gamma 1) = [-0.6, -0.5, -0.3, 0]
    # row 1: KL = [4, -2] (k1 can be negative), gamma 0.5: [-0.4 + 0.5 * 0.2, 0.2] = [-0.3, 0.2]
    kl = T([[1, 2, 3, 9], [4, -2, 7, 7]])
    mask = T([[1, 1, 1, 0], [1, 1, 0, 0]])
    close(kl_return(kl, mask, 0.1)[0], [-0.6, -0.5, -0.3, 0], atol=1e-6)
    close(kl_return(kl, mask, 0.1, gamma=0.5)[1], [-0.3, 0.2, 0, 0], atol=1e-6)
    close(kl_return(kl, mask, 0.0), torch.zeros(2, 4))
    close(kl_return(kl, mask, 0.3), 3 * kl_return(kl, mask, 0.1), atol=1e-6)


def test_discounted_returns_reinforce_pp_token_level_kl():
    # REINFORCE++ per-token rewards, beta = 0.1, KL = [1, 2, 3] on a row that ends after 3 tokens, score 5:
    #   r = [-0.1, -0.2, 5 - 0.3] ; G (gamma 1) = [4.4, 4.5, 4.7, 0]  (garbage in padding ignored)
    kl = T([[1, 2, 3, 9], [0, 0, 0, 0]])
    mask = T([[1, 1, 1, 0], [1, 1, 0, 0]])
    rewards = per_token_rewards(T([5, 1]), kl, mask, 0.1)
    rewards[0, 3] = 123.0
    ret = discounted_returns(rewards, mask, gamma=1.0)
    close(ret, [[4.4, 4.5, 4.7, 0], [1, 1, 0, 0]], atol=1e-5)
    # gamma = 0.5 on row 1 (r = [0, 1]): G = [0.5, 1]
    close(discounted_returns(rewards, mask, 0.5)[1], [0.5, 1, 0, 0])
    # equal to GAE with zero values and lam = 1
    adv, _ = compute_gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    close(ret, adv, atol=1e-6)


def test_masked_mean_and_var_hand_values():
    x = T([[1, 2, float("nan")], [4, float("inf"), 6]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # Real entries 1, 2, 4: mean 7/3; deviations -4/3, -1/3, 5/3; sum of squares 42/9.
    close(masked_mean(x, mask), 7 / 3)
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    close(masked_var(x, mask), (42 / 9) / 2)  # unbiased
    close(masked_var(x, mask, unbiased=False), (42 / 9) / 3)
    # A fully padded row gives 0 along dim, not NaN.
    close(masked_mean(T([[1, 2], [3, 4]]), torch.tensor([[1, 1], [0, 0]]), dim=1), [1.5, 0.0])
    with pytest.raises(ValueError, match="no real entries"):
        masked_mean(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"`mask`.*\(2, 3\).*\(2, 2\)"):
        masked_mean(x, torch.ones(2, 2))


def test_masked_whiten_mean0_var1_and_zero_padding():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, generator=g) * 4 + 3
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    x = x.masked_fill(mask == 0, float("nan"))  # padding garbage must not matter
    w = masked_whiten(x, mask)
    real = w[mask.bool()]
    assert abs(real.mean().item()) < 1e-5
    assert abs(real.var(unbiased=True).item() - 1.0) < 1e-4
    assert w[~mask.bool()].eq(0).all()

    # shift_mean=False keeps the original mean, still unit variance.
    w2 = masked_whiten(x, mask, shift_mean=False)
    orig_mean = x[mask.bool()].mean().item()
    assert abs(w2[mask.bool()].mean().item() - orig_mean) < 1e-4
    assert abs(w2[mask.bool()].var().item() - 1.0) < 1e-4
    assert w2[~mask.bool()].eq(0).all()

    # A constant batch gives zeros rather than NaN.
    assert masked_whiten(torch.full((2, 2), 7.0), torch.ones(2, 2)).eq(0).all()


# ---------------------------------------------------------------------------------------------
# KL and per-token rewards


def test_kl_estimators_signs_and_zero():
    logp, ref = T([[-1.0, -2.0]]), T([[-2.0, -1.0]])
    # k1 = logp - ref: positive where the policy is more likely than the reference.
    close(kl_k1(logp, ref), [[1.0, -1.0]])
    # k3 with d = ref - logp: d = -1 -> e^-1 + 1 - 1 = e^-1; d = +1 -> e - 1 - 1 = e - 2.
    close(kl_k3(logp, ref), [[math.exp(-1), math.e - 2]])
    same = T([[-0.3, -5.0, -1e-4]])
    assert kl_k1(same, same).eq(0).all()
    assert kl_k3(same, same).eq(0).all()
    close(kl_penalty(logp, ref, "k1"), kl_k1(logp, ref))
    close(kl_penalty(logp, ref, "k3"), kl_k3(logp, ref))
    close(kl_penalty(logp, ref, "k2"), kl_k2(logp, ref))
    with pytest.raises(ValueError, match="'k1', 'k2' or 'k3'"):
        kl_penalty(logp, ref, "k4")
    with pytest.raises(ValueError, match=r"`ref_logp`.*\(1, 2\).*\(2, 1\)"):
        kl_k1(logp, torch.zeros(2, 1))


def test_kl_k2_hand_values_and_its_gradient_depends_on_the_reference():
    # k2 = 0.5 * (logp - ref)^2: d = +1 and -1 -> 0.5 each; d = 1.5 -> 1.125; d = 0 -> 0.
    logp, ref = T([[-1.0, -2.0, -0.5, -3.0]]), T([[-2.0, -1.0, -2.0, -3.0]])
    close(kl_k2(logp, ref), [[0.5, 0.5, 1.125, 0.0]])
    assert kl_k2(logp.bfloat16(), ref.bfloat16()).dtype == torch.float32
    # As a loss: d k2 / d logp = logp - ref (pulls towards the reference); d k1 / d logp = 1 whatever
    # the reference is, which is why kl_in_loss refuses k1.
    for estimator, expected in (("k2", [[1.0, -1.0, 1.5, 0.0]]), ("k1", [[1.0, 1.0, 1.0, 1.0]])):
        x = logp.clone().requires_grad_(True)
        kl_penalty(x, ref, estimator).sum().backward()
        close(x.grad, expected)


def test_kl_k3_nonnegative_on_random_inputs():
    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(64, 32, generator=g) * 10
    ref = -torch.rand(64, 32, generator=g) * 10
    k3 = kl_k3(logp, ref)
    assert (k3 >= 0).all()
    # Tiny differences: k3 ~ d^2 / 2 = 5e-9. exp(d) - d - 1 in fp32 would round to 0 or ~1e-7
    # (fp32 eps is 1.2e-7); expm1 keeps it within a fraction of a percent.
    d = torch.full((1, 4), 1e-4)
    tiny = kl_k3(torch.zeros(1, 4), d)
    assert torch.allclose(tiny, torch.full((1, 4), 5e-9), rtol=1e-3, atol=0)
    assert kl_k3(logp.bfloat16(), ref.bfloat16()).dtype == torch.float32


def test_per_token_rewards_hand_example():
    # kl_coef 0.1: row 0 = [-0.01, -0.02, -0.03 + 1]; row 1 (2 real tokens) = [-0.05, -0.05 + 2, 0].
    scores = T([1.0, 2.0])
    kl = T([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = per_token_rewards(scores, kl, mask, kl_coef=0.1)
    close(rewards, [[-0.01, -0.02, 0.97], [-0.05, 1.95, 0.0]])
    # beta = 0: only the score at the last real token.
    close(per_token_rewards(scores, kl, mask, torch.tensor(0.0)), [[0, 0, 1], [0, 2, 0]])


def test_per_token_rewards_errors():
    kl = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"rows \[1\].*no real tokens"):
        per_token_rewards(T([1.0, 2.0]), kl, torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1)
    with pytest.raises(ValueError, match=r"`scores`.*batch size 2.*\(3,\)"):
        per_token_rewards(T([1.0, 2.0, 3.0]), kl, torch.ones(2, 3), 0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        per_token_rewards(T([1.0, 2.0]), kl, torch.ones(2, 3), -1.0)


# ---------------------------------------------------------------------------------------------
# losses


def test_policy_loss_ratio_one_is_minus_mean_advantage():
    logp = T([[-1.0, -2.0, -3.0], [-0.5, -0.7, 123.0]]).requires_grad_()
    adv = T([[1.0, -2.0, 4.0], [3.0, 0.5, 1000.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, stats = clipped_policy_loss(logp, logp.detach().clone(), adv, mask, cliprange=0.2)
    # -mean over real tokens of (1, -2, 4, 3, 0.5) = -6.5 / 5
    close(loss, -6.5 / 5)
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)
    close(stats["ratio_max"], 1.0)
    close(stats["ratio_mean"], 1.0)
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in stats.values())
    loss.backward()
    # d loss / d logp_t = -A_t / n at ratio 1 (no clipping active); padding gets no gradient.
    close(logp.grad, [[-0.2, 0.4, -0.8], [-0.6, -0.1, 0.0]])


def test_policy_loss_clipping_hand_example():
    # eps = 0.2; ratios [1.5, 1.5, 0.5, 0.5]; advantages [1, -1, 1, -1]
    # tok0 A=+1 r=1.5: -1.5 vs -1.2 -> max -1.2 (clipped)
    # tok1 A=-1 r=1.5:  1.5 vs  1.2 -> max  1.5 (unclipped)
    # tok2 A=+1 r=0.5: -0.5 vs -0.8 -> max -0.5 (unclipped)
    # tok3 A=-1 r=0.5:  0.5 vs  0.8 -> max  0.8 (clipped)
    # loss = (-1.2 + 1.5 - 0.5 + 0.8) / 4 = 0.15; clipfrac = 2/4
    old = torch.zeros(1, 4)
    logp = torch.log(T([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    adv = T([[1.0, -1.0, 1.0, -1.0]])
    loss, stats = clipped_policy_loss(logp, old, adv, torch.ones(1, 4), cliprange=0.2)
    close(loss, 0.15)
    close(stats["clipfrac"], 0.5)
    close(stats["ratio_max"], 1.5)
    close(stats["ratio_mean"], 1.0)
    # approx_kl = 0.5 * mean(log_ratio^2) = 0.5 * (2 ln(1.5)^2 + 2 ln(0.5)^2) / 4
    close(stats["approx_kl"], 0.25 * (math.log(1.5) ** 2 + math.log(0.5) ** 2))
    loss.backward()
    # Clipped tokens have zero gradient; unclipped: d/dlogp (-A * ratio) / 4 = -A * ratio / 4.
    close(logp.grad, [[0.0, 1.5 / 4, -0.5 / 4, 0.0]])


@pytest.mark.gpu
def test_policy_loss_bf16_inputs_give_fp32_and_shape_errors():
    logp = torch.zeros(2, 3, dtype=torch.bfloat16)
    loss, stats = clipped_policy_loss(logp, logp, torch.ones(2, 3), torch.ones(2, 3), 0.2)
    assert loss.dtype == torch.float32 and stats["clipfrac"].dtype == torch.float32
    with pytest.raises(ValueError, match=r"`advantages`.*\(2, 3\).*\(2, 4\)"):
        clipped_policy_loss(logp, logp, torch.ones(2, 4), torch.ones(2, 3), 0.2)
    with pytest.raises(ValueError, match="cliprange"):
        clipped_policy_loss(logp, logp, torch.ones(2, 3), torch.ones(2, 3), 0.0)


def test_value_loss_clipping_hand_example():
    # eps_v = 0.2, old values 0.
    # tok0: V=1,   R=1 -> unclipped 0,    V_clip=0.2 -> (0.2-1)^2 = 0.64  -> max 0.64 (clipped)
    # tok1: V=0.1, R=1 -> unclipped 0.81, V_clip=0.1 -> 0.81              -> max 0.81 (not clipped)
    # tok2: padding, ignored.
    # loss = 0.5 * (0.64 + 0.81) / 2 = 0.3625; vf_clipfrac = 1/2
    values = T([[1.0, 0.1, 55.0]]).requires_grad_()
    loss, stats = clipped_value_loss(values, torch.zeros(1, 3), T([[1.0, 1.0, -9.0]]), T([[1, 1, 0]]), 0.2)
    close(loss, 0.3625)
    close(stats["vf_clipfrac"], 0.5)
    loss.backward()
    # tok0: clipped branch is constant in V -> 0; tok1: 0.5 * 2 * (0.1 - 1) / 2 = -0.45.
    close(values.grad, [[0.0, -0.45, 0.0]])
    # Inside the clip range it is plain 0.5 * MSE.
    loss2, stats2 = clipped_value_loss(T([[0.1, -0.1]]), torch.zeros(1, 2), T([[1.0, 0.0]]), torch.ones(1, 2), 0.2)
    close(loss2, 0.5 * (0.81 + 0.01) / 2)
    close(stats2["vf_clipfrac"], 0.0)
    with pytest.raises(ValueError, match=r"`returns`.*\(1, 2\).*\(2, 1\)"):
        clipped_value_loss(T([[0.1, -0.1]]), torch.zeros(1, 2), torch.zeros(2, 1), torch.ones(1, 2), 0.2)


def test_truncated_importance_weights_hand_example_and_the_weighted_loss():
    # row 0: old - engine = (0, ln 1.5, ln 3, -ln 2) -> raw ratios (1, 1.5, 3, 0.5) -> cap 2 -> (1, 1.5, 2, 0.5)
    # row 1: one real token whose engine log-prob is NaN (none given) -> weight 1; padding (garbage) -> 1
    old = T([[-1.0, -2.0, -1.0, -3.0], [-0.5, 99.0, 99.0, 99.0]])
    engine = T([[-1.0, -2.0 - math.log(1.5), -1.0 - math.log(3.0), -3.0 + math.log(2.0)],
                [float("nan"), -99.0, float("inf"), float("nan")]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    weights, stats = truncated_importance_weights(old, engine, mask, cap=2.0)
    close(weights, [[1.0, 1.5, 2.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    close(stats["is_weight_mean"], (1 + 1.5 + 2 + 0.5 + 1) / 5)  # over the 5 real tokens
    close(stats["is_capped_frac"], 1 / 5)
    assert not weights.requires_grad and weights.dtype == torch.float32
    # at ratio 1 (logp = old) the loss is -mean(w * A): (-1*1 + 1.5*2 - 2*4 - 0.5*3 - 1*2) / 5 = -9.5 / 5
    logp = old.clone().requires_grad_()
    adv = T([[1.0, -2.0, 4.0, 3.0], [2.0, 1e6, -1e6, 5.0]])
    loss, _ = clipped_policy_loss(logp, old, adv, mask, cliprange=0.2, token_weights=weights)
    close(loss, -9.5 / 5)
    loss.backward()
    # d loss / d logp_t = -w_t * A_t / 5 (ratio 1, nothing clipped); padding gets no gradient
    close(logp.grad, [[-0.2, 0.6, -1.6, -0.3], [-0.4, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(old, engine, mask, cap=0.5)
    with pytest.raises(ValueError, match=r"`engine_logp`"):
        truncated_importance_weights(old, engine[:, :3], mask, cap=2.0)


def test_truncated_importance_weighted_loss_equals_trls_token_truncate_formula():
    """TRL 1.16 computes the same thing inline in GRPOTrainer (no function to call), so its formula is
    reproduced here from trl/trainer/grpo_trainer.py: the vLLM IS ratio at lines 2662-2684
    (``exp(nan_to_num((old - sampling) * mask))`` clamped at ``vllm_importance_sampling_clip_max`` for
    ``token_truncate``), the per-token loss ``-min(coef_1 * A, clamp(coef_1, 1 - eps, 1 + eps) * A)`` at
    3113-3120, multiplied by the ratio at 3147, aggregated as ``loss_type='bnpo'`` at 3158 (the token mean
    over the batch, our masked mean). Padding holds finite garbage (TRL multiplies by the mask)."""
    g = torch.Generator().manual_seed(0)
    B, L, eps, cap = 3, 6, 0.2, 2.0
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    old = -torch.rand(B, L, generator=g) * 3
    engine = old + torch.randn(B, L, generator=g) * 0.8  # some ratios far above the cap
    engine[0, 2] = float("nan")
    logp0 = old + torch.randn(B, L, generator=g) * 0.3
    adv = torch.randn(B, L, generator=g)
    garbage = ~mask.bool()
    old, engine, logp0 = (x.masked_fill(garbage, 5.0) for x in (old, engine, logp0))

    def trl(logp):
        is_ratio = torch.exp(torch.nan_to_num((old - engine) * mask, nan=0.0)).clamp(max=cap)
        coef_1 = torch.exp(logp - old)
        coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv) * is_ratio
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)

    ours_logp, trl_logp = logp0.clone().requires_grad_(), logp0.clone().requires_grad_()
    weights, stats = truncated_importance_weights(old, engine, mask, cap)
    ours, _ = clipped_policy_loss(ours_logp, old, adv, mask, eps, token_weights=weights)
    want = trl(trl_logp)
    close(ours, want.detach())
    ours.backward()
    want.backward()
    close(ours_logp.grad, trl_logp.grad)
    assert 0 < float(stats["is_capped_frac"]) < 1, "the example must cap some tokens and not others"


# ---------------------------------------------------------------------------------------------
# logits


def test_logprobs_from_logits_matches_log_softmax_in_fp32():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 5), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(logits, labels), expected, atol=1e-5)

    lb = logits.bfloat16().requires_grad_()
    out = logprobs_from_logits(lb, labels)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    ref = torch.log_softmax(lb.detach().float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(out.detach(), ref, atol=1e-5)
    out.sum().backward()  # differentiable through the per-row loop
    assert lb.grad is not None and lb.grad.shape == lb.shape

    with pytest.raises(ValueError, match=r"\[0, 11\).*-100"):
        logprobs_from_logits(logits, labels.masked_fill(labels == labels[0, 0], -100))
    with pytest.raises(ValueError, match=r"`labels`.*\(3, 5\).*\(3, 4\)"):
        logprobs_from_logits(logits, labels[:, :4])


def test_entropy_from_logits_uniform_and_peaked():
    V = 8
    logits = torch.zeros(2, 3, V)
    logits[1, :, 0] = 1e4  # row 1 is (numerically) deterministic: entropy 0
    # Real tokens: 3 uniform tokens (entropy ln 8 each) + 1 peaked token (0) -> 3 ln 8 / 4.
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(entropy_from_logits(logits, mask), 3 * math.log(V) / 4, atol=1e-5)
    close(entropy_from_logits(logits, torch.tensor([[1, 1, 1], [0, 0, 0]])), math.log(V), atol=1e-5)
    with pytest.raises(ValueError, match=r"`mask`.*\(2, 3\).*\(2, 4\)"):
        entropy_from_logits(logits, torch.ones(2, 4))


def test_explained_variance():
    returns = T([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    close(explained_variance(returns.clone(), returns, mask), 1.0)
    # Predicting the mean (3) explains nothing.
    close(explained_variance(torch.full((2, 3), 3.0), returns, mask), 0.0)
    # values = returns - [1, -1, 1, -1, 1]: Var(residual) with mean 0.2 = 0.96; Var(returns) = 2 -> 1 - 0.48
    values = returns - T([[1, -1, 1], [-1, 1, 0]])
    close(explained_variance(values, returns, mask), 1 - 0.96 / 2.0, atol=1e-6)
    assert math.isnan(explained_variance(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2)).item())


# ---------------------------------------------------------------------------------------------
# controllers and running moments


def test_adaptive_kl_controller_moves_in_the_right_direction():
    # beta = 0.2, target 6, horizon 10000, n_steps 256 -> n/h = 0.0256
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 12: err = 1 clipped to 0.2 -> 0.2 * (1 + 0.2 * 0.0256) = 0.201024
    assert ctl.update(12.0, 256) == pytest.approx(0.201024)
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 3: err = -0.5 clipped to -0.2 -> 0.2 * (1 - 0.00512)
    assert ctl.update(3.0, 256) == pytest.approx(0.2 * (1 - 0.00512))
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 6.6: err = 0.1 (inside the clip) -> 0.2 * (1 + 0.00256)
    assert ctl.update(torch.tensor(6.6), 256) == pytest.approx(0.2 * 1.00256)
    # At the target it stays put.
    assert ctl.update(6.0, 256) == pytest.approx(ctl.value)

    # Round-trip through state_dict; the restored controller continues identically.
    ctl2 = AdaptiveKLController(0.05, target=6.0, horizon=10000)
    ctl2.load_state_dict(ctl.state_dict())
    assert ctl2.update(9.0, 64) == ctl.update(9.0, 64)
    with pytest.raises(ValueError, match="adaptive_kl"):
        FixedKLController(0.1).load_state_dict(ctl.state_dict())
    with pytest.raises(ValueError, match="current_kl"):
        ctl.update(float("nan"), 1)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 256) == 0.05 and ctl.value == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05
    with pytest.raises(ValueError, match="coef"):
        FixedKLController(-1.0)


def test_running_moments_match_concatenated_batches():
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(5, generator=g) * 3 + 1, torch.randn(1, generator=g), torch.randn(4, 4, generator=g) - 2]
    rm = RunningMoments()
    for b in batches:
        rm.update(b)
    allx = torch.cat([b.flatten() for b in batches]).double()
    assert rm.count == 22
    assert rm.mean == pytest.approx(allx.mean().item(), abs=1e-9)
    assert rm.std == pytest.approx(allx.std().item(), abs=1e-9)

    x = T([0.0, 10.0, -10.0])
    expected = (x.double() - allx.mean()) / allx.std()
    close(rm.normalize(x), expected.float(), atol=1e-5)
    close(rm.normalize(x, clip=1.0), expected.clamp(-1, 1).float(), atol=1e-5)

    # The state round-trips and the restored copy continues identically.
    rm2 = RunningMoments()
    rm2.load_state_dict(rm.state_dict())
    extra = torch.randn(7, generator=g)
    assert rm.update(extra) == rm2.update(extra)
    assert (rm.mean, rm.std, rm.count) == (rm2.mean, rm2.std, rm2.count)


def test_running_moments_edge_cases():
    rm = RunningMoments()
    with pytest.raises(ValueError, match="update"):
        rm.normalize(torch.zeros(2))
    rm.update(torch.tensor([4.0]))
    # One value seen: spread unknown, only the mean is subtracted.
    close(rm.normalize(torch.tensor([5.0])), [1.0])
    with pytest.raises(ValueError, match="NaN"):
        rm.update(torch.tensor([1.0, float("nan")]))
    assert rm.count == 1  # the rejected batch left the stats untouched
