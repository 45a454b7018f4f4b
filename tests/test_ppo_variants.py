"""The PPO / critic-free objective variants (docs/PPO.md, "Objective variants") against TRL 1.16's GRPOTrainer on
identical tensors, through the trainer's update (micro-batch split, overlong filtering), and learning on the tiny
task. Hand-worked checks of the same math are in tests/unit/test_ppo_objectives.py.

TRL's policy loss lives inside ``GRPOTrainer._compute_loss`` (no free function): :func:`_trl_loss` calls that
method on an object made with ``GRPOTrainer.__new__`` that holds only the attributes the method reads, with the
model's forward replaced by the given log-probs. ``model.training`` is False, so TRL applies no gradient
accumulation divisor (its "eval" path): the loss is one micro-batch's.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stages.ppo.core import clipped_policy_loss
from tests.helpers.common import saved_weights, train_rows

DIGITS = "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction', weight: 10}]"
GRPO = ["stages=[ppo]", "ppo.policy_from=base", DIGITS, "ppo.advantage_estimator=grpo", "ppo.num_samples_per_prompt=4",
        "ppo.missing_eos_penalty=0"]


def _trl_loss(logp, old, adv, mask, loss_type, eps=0.2, eps_high=None, delta=None, level="token", max_len=None,
              num_items=None):
    """TRL 1.16's ``GRPOTrainer._compute_loss`` on these tensors -> (loss, TRL's logged metrics). ``adv`` (B,)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    trainer = GRPOTrainer.__new__(GRPOTrainer)
    accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction="sum": x,
                                  gather_for_metrics=lambda x: x, sync_gradients=True)
    attributes = dict(
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=0.0, loss_type=loss_type, epsilon_low=eps,
        epsilon_high=eps if eps_high is None else eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=False), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=accelerator, _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list),
                                                                        "eval": defaultdict(list)},
        args=SimpleNamespace(delta=delta, use_bias_correction_kl=False, steps_per_generation=1))
    for name, value in attributes.items():
        object.__setattr__(trainer, name, value)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logp, torch.zeros_like(logp), None)
    B, T = logp.shape
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask, advantages=adv,
                  old_per_token_logps=old,
                  num_items_in_batch=torch.tensor(float(mask.sum() if num_items is None else num_items)))
    return trainer._compute_loss(None, inputs), trainer._metrics["eval"]


def _tensors(seed: int, spread: float = 0.4):
    """(logp, old, adv (B,), mask) with unequal lengths and finite garbage in the padding (TRL multiplies by
    the mask, so its padding must be finite; ours ignores it)."""
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 7
    mask = torch.ones(B, T, dtype=torch.long)
    for row, length in enumerate([7, 3, 5, 1, 6, 4]):
        mask[row, length:] = 0
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + torch.randn(B, T, generator=g) * spread
    adv = torch.randn(B, generator=g)
    pad = ~mask.bool()
    return logp.masked_fill(pad, 2.0), old.masked_fill(pad, -7.0), adv, mask


def _compare(trl_kwargs: dict, ours_kwargs: dict, seed: int = 0, spread: float = 0.4):
    logp0, old, adv, mask = _tensors(seed, spread)
    trl_logp, ours_logp = logp0.clone().requires_grad_(), logp0.clone().requires_grad_()
    want, metrics = _trl_loss(trl_logp, old, adv, mask, **trl_kwargs)
    got, stats = clipped_policy_loss(ours_logp, old, adv.unsqueeze(1).expand_as(mask), mask, **ours_kwargs)
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-6)
    want.backward()
    got.backward()
    torch.testing.assert_close(ours_logp.grad, trl_logp.grad, rtol=0, atol=1e-7)
    return stats, metrics


# --------------------------------------------------------------------------------------- vs TRL 1.16
@pytest.mark.parametrize("loss_type,aggregation", [
    ("bnpo", "token-mean"), ("grpo", "seq-mean-token-mean"), ("dr_grpo", "seq-mean-token-sum")])
def test_aggregation_and_clip_higher_equal_trl_loss_types(loss_type, aggregation):
    """Our aggregation modes are TRL's loss types on one micro-batch; cliprange/cliprange_high are TRL's
    epsilon/epsilon_high; clipfrac_low/high are TRL's clip_ratio/low_mean and high_mean."""
    stats, metrics = _compare(dict(loss_type=loss_type, eps=0.2, eps_high=0.28, max_len=7),
                              dict(cliprange=0.2, cliprange_high=0.28, aggregation=aggregation, max_length=7))
    assert 0 < float(stats["clipfrac"]) < 1, "the example must clip some tokens and not others"
    assert float(stats["clipfrac_low"]) == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=1e-7)
    assert float(stats["clipfrac_high"]) == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=1e-7)


def test_dual_clip_equals_trl_two_sided_clip_delta():
    """TRL's ``delta`` caps the unclipped ratio at delta (INTELLECT-2's two-sided clip); for A < 0 that bounds
    the loss at -A * delta, which is the dual clip with c = delta (for A > 0 the PPO clip is below delta)."""
    stats, _ = _compare(dict(loss_type="bnpo", delta=1.5), dict(cliprange=0.2, clip_ratio_c=1.5), seed=1, spread=1.0)
    assert float(stats["clipfrac_dual"]) > 0, "the example must reach the dual bound"


@pytest.mark.parametrize("low,high", [(3e-4, 4e-4), (0.2, 0.2)])
def test_sequence_level_ratio_equals_trl_importance_sampling_level_sequence(low, high):
    """GSPO: TRL's importance_sampling_level='sequence' with loss_type 'grpo' (the GSPO paper's setup) equals
    importance_level sequence with seq-mean-token-mean, in value and gradient, at GSPO's clip ranges and wider."""
    _compare(dict(loss_type="grpo", level="sequence", eps=low, eps_high=high),
             dict(cliprange=low, cliprange_high=high, importance_level="sequence", aggregation="seq-mean-token-mean"),
             seed=2, spread=0.05)


def test_token_mean_over_micro_batches_equals_trl_dapo_global_token_normalisation():
    """TRL's 'dapo' divides each micro-batch's token sum by the tokens of the whole batch (num_items_in_batch):
    the sum over micro-batches equals our token-mean loss weighted by each micro-batch's share of the tokens
    (``stages.training.loss_weight`` at world 1, accumulation 1)."""
    from stages.training import loss_weight

    logp, old, adv, mask = _tensors(3)
    total = float(mask.sum())
    trl, ours = 0.0, 0.0
    for rows in (slice(0, 2), slice(2, 6)):
        trl = trl + _trl_loss(logp[rows], old[rows], adv[rows], mask[rows], "dapo", num_items=total)[0]
        part, _ = clipped_policy_loss(logp[rows], old[rows], adv[rows].unsqueeze(1).expand_as(mask[rows]), mask[rows],
                                      0.2)
        ours = ours + part * loss_weight(float(mask[rows].sum()), total, 1, 1)
    torch.testing.assert_close(ours, trl, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", ["batch", "none"])
def test_grpo_scale_rewards_equals_trl_formula(scale):
    """TRL 1.16 computes the advantages inline in ``_generate_and_score_completions`` (it needs generation), so
    its formula is reproduced from trl/trainer/grpo_trainer.py lines 2762-2787: ``(r - group mean)``, divided by
    ``nanstd(all rewards) + 1e-4`` for 'batch' and by nothing for 'none'. Ours through PPORollout.advantages
    (one process: the batch is this rank's rewards)."""
    from trl.trainer.utils import nanstd

    from tests.test_ppo_critic_free import _advantages

    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.2, 0.9, 0.4, 0.4, 1.0, 1.0, 1.0, 1.0])
    mask = torch.ones(12, 3)
    mask[3, 2] = mask[7, 1:] = 0
    centred = rewards - rewards.view(-1, 4).mean(1).repeat_interleave(4)
    trl = centred / (nanstd(rewards) + 1e-4) if scale == "batch" else centred
    ours = _advantages("grpo", rewards, torch.zeros(12, 3), mask, 0.0, group_std_eps=1e-4, scale_rewards=scale)
    expected = torch.where(mask.bool(), trl.unsqueeze(1).expand(12, 3), torch.zeros(()))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_overlong_penalty_equals_trl_soft_overlong_punishment():
    """TRL 1.16's ``trl.rewards.get_soft_overlong_punishment`` (DAPO eq. 13, a reward function on the completion
    ids) equals ours at factor 1 for every length up to past the limit."""
    from trl.rewards import get_soft_overlong_punishment

    from stages.ppo.core import overlong_penalty

    for max_len, buffer in [(20, 4), (20, 20), (7, 1)]:
        lengths = list(range(0, max_len + 3))
        punish = get_soft_overlong_punishment(max_completion_len=max_len, soft_punish_cache=buffer)
        trl = torch.tensor(punish([[1] * n for n in lengths]), dtype=torch.float32)
        ours = overlong_penalty(torch.tensor(lengths), max_len, buffer, 1.0)
        torch.testing.assert_close(ours, trl, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- through the update
def _one_step(tiny_cfg, name: str, *extra: str):
    from stages.ppo import trainer

    cfg = tiny_cfg(*GRPO, "ppo.total_episodes=8", "ppo.episodes_per_rollout=8", "ppo.mini_batch_size=8",
                   "ppo.max_new_tokens=6", "ppo.train.learning_rate=1e-2", "ppo.train.precision=fp32",
                   "ppo.train.save_steps=1000", f"run_name={name}", *extra)
    trainer.run(cfg)
    return saved_weights(cfg.stage_dir("ppo") / "model"), train_rows(cfg.stage_dir("ppo"), "score")[-1]


def _finish_every_other_response(monkeypatch) -> None:
    """The tiny random model practically never samples eos (1 token in 512), so every response is cut at
    max_new_tokens: put eos into every other sampled response (after 2, 4, 6, ... tokens, within the limit) so a
    rollout has finished responses of several lengths and truncated ones. The log-probs are taken afterwards
    on these tokens, so the update sees a consistent rollout."""
    from stages.ppo.experience import PPORollout

    sample = PPORollout._hf_responses

    def with_eos(self, *args, **kwargs):
        out = sample(self, *args, **kwargs).clone()
        for row in range(0, out.size(0), 2):
            out[row, min(out.size(1) - 1, row % 5 + 1)] = self.models.tokenizer.eos_token_id
        return out

    monkeypatch.setattr(PPORollout, "_hf_responses", with_eos)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "seq-mean-token-sum"])
def test_sequence_aggregation_with_mask_truncated_does_not_depend_on_the_micro_batch_split(tiny_cfg, monkeypatch,
                                                                                        aggregation):
    """One minibatch of 8 episodes (half truncated, dropped by mask_truncated) as 1 micro-batch or 4: the
    weights after the step are equal, because each micro-batch's loss is weighted by its share of the global
    units (responses left after the filter). Negative control: weighing every micro-batch the same differs."""
    _finish_every_other_response(monkeypatch)
    # Adam's first step is about lr * sign(grad): rounding in near-zero gradients moves weights by ~1e-4 lr
    settings = [f"ppo.loss_aggregation={aggregation}", "ppo.mask_truncated=true", "ppo.importance_level=sequence",
                "ppo.train.learning_rate=1e-3"]
    one, row = _one_step(tiny_cfg, "one", *settings)
    assert row["truncated_masked_frac"] == 0.5 and row["response_length"] < 6
    four, _ = _one_step(tiny_cfg, "four", *settings, "ppo.gradient_accumulation_steps=4")
    same = _max_diff(one, four)
    monkeypatch.setattr("stages.ppo.update.loss_weight", lambda units, total, world, accum: 1.0)
    naive, _ = _one_step(tiny_cfg, "naive", *settings, "ppo.gradient_accumulation_steps=4")
    assert same < 2e-6 and _max_diff(one, naive) > 1e-4  # measured: <= 8.3e-7 and 2.0e-3


def test_mask_truncated_drops_truncated_responses_from_the_policy_loss(tiny_cfg):
    """The tiny random model never samples eos in 6 tokens, so every response is cut at the limit: with
    mask_truncated nothing reaches the policy loss and the actor does not move at all; without it, it does."""
    from pipeline.models import prepare_base

    base = saved_weights(Path(prepare_base(tiny_cfg().model)))
    dropped, row = _one_step(tiny_cfg, "dropped", "ppo.mask_truncated=true")
    assert row["truncated_masked_frac"] == 1.0 and row["policy_loss"] == 0.0
    assert _max_diff(base, dropped) == 0.0
    kept, _ = _one_step(tiny_cfg, "kept")
    assert _max_diff(base, kept) > 1e-4


def test_overlong_penalty_is_added_to_the_reward_and_logged(tiny_cfg):
    """buffer = max_new_tokens = 6: every response is penalised by length / 6 (a truncated one by the whole
    factor), so the logged reward is the score plus the logged mean penalty (grpo, no normalisation)."""
    _, row = _one_step(tiny_cfg, "overlong", "ppo.overlong_penalty={buffer: 6, factor: 2.0}")
    assert row["overlong_penalised_frac"] == 1.0 and -2.0 <= row["overlong_penalty"] < 0
    assert row["reward"] == pytest.approx(row["score"] + row["overlong_penalty"], abs=1e-5)


# ------------------------------------------------------------------------------------------ learning
@pytest.mark.parametrize("recipe,settings,max_kl", [
    # without mask_truncated: the tiny model never samples eos, every response would be dropped (tested above)
    ("dapo", ("ppo.cliprange_low=0.2", "ppo.cliprange_high=0.28", "ppo.overlong_penalty={buffer: 8, factor: 1.0}"),
     40),
    ("dr_grpo", ("ppo.scale_rewards=none", "ppo.loss_aggregation=seq-mean-token-sum"), 40),
    # GSPO goes much further in 10 steps here (measured: score 0.3 -> 8.1 of 10, kl 67): its tiny clip decides
    # which sequences get a gradient, not how far Adam steps, and the reward pulls the policy far from the start
    ("gspo", ("ppo.importance_level=sequence", "ppo.loss_aggregation=seq-mean-token-mean",
              "ppo.cliprange_low=3e-4", "ppo.cliprange_high=4e-4"), 100),
    ("grpo_dual_clip_batch_scale", ("ppo.loss_aggregation=seq-mean-token-mean", "ppo.clip_ratio_c=3.0",
                                    "ppo.scale_rewards=batch"), 40),
])
def test_objective_variant_learns_the_tiny_task(tiny_cfg, recipe, settings, max_kl):
    """As tests/test_ppo_critic_free.py's learning test: the dense digit reward rises (mean of the last 3 steps
    vs the first 3) with the KL bounded, under each recipe's settings."""
    from stages.ppo import trainer

    cfg = tiny_cfg(*GRPO, "ppo.total_episodes=160", "ppo.train.learning_rate=5e-3", "ppo.ppo_epochs=4",
                   "ppo.train.save_steps=1000", "ppo.kl_coef=0.02", *settings)
    trainer.run(cfg)
    rows = train_rows(cfg.stage_dir("ppo"), "score")
    first = sum(r["score"] for r in rows[:3]) / 3
    last = sum(r["score"] for r in rows[-3:]) / 3
    assert last > first + 0.5, (recipe, [round(r["score"], 2) for r in rows])
    assert 0 <= rows[-1]["kl"] < max_kl
    assert {"clipfrac", "clipfrac_low", "clipfrac_high"} <= set(rows[-1])


@pytest.mark.distributed
def test_two_process_deepspeed_variants_match_one_process(tiny_cfg, tmp_path):
    """tests/test_ppo_critic_free.py's 2-rank ZeRO-2 GRPO check with the variants on: the batch std of
    scale_rewards batch is over both ranks' rewards and the seq-mean units are summed over both ranks, so two
    ranks end with the parameters of one process that takes the same 4 groups."""
    import os
    import subprocess
    import sys

    from stages.ppo import trainer
    from tests.test_ppo_critic_free import REPO, _free_port

    variants = ["ppo.advantage_estimator=grpo", "ppo.num_samples_per_prompt=2", "ppo.scale_rewards=batch",
                "ppo.loss_aggregation=seq-mean-token-mean", "ppo.importance_level=sequence",
                "ppo.cliprange_high=0.28", "ppo.clip_ratio_c=3.0"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(REPO / "tests" / "test_ppo.py"), "--worker", str(tmp_path / "ds"),
           "ppo.train.deepspeed=configs/deepspeed/zero2.json", "ppo.episodes_per_rollout=4", "ppo.mini_batch_size=4",
           *variants]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [torch.load(tmp_path / "ds" / f"params-rank{r}.pt") for r in (0, 1)]
    one = tiny_cfg("stages=[ppo]", "ppo.policy_from=base", DIGITS, "ppo.max_new_tokens=16", "ppo.total_episodes=16",
                   "ppo.ppo_epochs=2", "ppo.train.learning_rate=1e-3", "ppo.train.precision=fp32",
                   "ppo.train.save_steps=1000", "ppo.adaptive_kl=true", "run_name=one", "ppo.episodes_per_rollout=8",
                   "ppo.mini_batch_size=8", "ppo.gradient_accumulation_steps=2", *variants)
    trainer.run(one)
    single = {k: v.float() for k, v in saved_weights(one.stage_dir("ppo") / "model").items()}
    for r in ranks:
        diffs = {k: float((r[k] - single[k]).abs().max()) for k in single}
        assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
