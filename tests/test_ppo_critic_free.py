"""Critic-free estimators of the RL stage (``ppo.advantage_estimator: grpo | rloo | reinforce_pp``) on the
tiny model: each learns a verifiable reward, no critic is built, groups of K samples per prompt, resume
equals an uninterrupted run, two DeepSpeed ranks equal one process, and the config refuses a group
estimator with fewer than 2 samples per prompt.

The reward is ``stages.ppo.rewards:digit_fraction`` (dense: the share of digits in the response), not
``gsm8k_correct``: a tiny random model never answers a gsm8k question right, so a 0/1 correctness reward
gives every group equal rewards (zero advantage) and nothing to learn from.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.common import saved_weights, train_rows

REPO = Path(__file__).resolve().parent.parent
DIGITS = "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction', weight: 10}]"


def _overrides(estimator: str, *extra: str) -> list[str]:
    return ["stages=[ppo]", "ppo.policy_from=base", DIGITS, f"ppo.advantage_estimator={estimator}",
            "ppo.num_samples_per_prompt=4", "ppo.missing_eos_penalty=0", *extra]


# ------------------------------------------------------------------------- advantages with the KL
def _advantages(estimator: str, reward, kl, mask, kl_coef: float, **ppo):
    """PPORollout.advantages on a stand-in trainer: one process, a fixed KL coefficient."""
    from types import SimpleNamespace

    from stages.ppo.core import FixedKLController
    from stages.ppo.distributed import Comm
    from stages.ppo.experience import PPORollout

    settings = dict(advantage_estimator=estimator, kl_in_loss=False, num_samples_per_prompt=4, group_std_eps=1e-6,
                    gamma=1.0, lam=0.95, whiten_advantages=False, scale_rewards="group")
    settings.update(ppo)
    trainer = SimpleNamespace(cfg=SimpleNamespace(ppo=SimpleNamespace(**settings)), kl_ctl=FixedKLController(kl_coef),
                              comm=Comm(SimpleNamespace(world_size=1)))
    return PPORollout.advantages(trainer, reward, kl, torch.zeros_like(kl), mask)[0]


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_tied_group_with_random_kl_has_no_task_advantage_and_kl_scales_with_kl_coef(estimator):
    """A group whose scores tie (a 0/1 verifier's usual case) gets zero task advantage: what is left is the
    KL's own reward-to-go, linear in kl_coef (before, the KL entered the score and was divided by the
    group's std: unit scale, the same advantages at 0.05 and 0.0005)."""
    from stages.ppo.core import kl_return

    g = torch.Generator().manual_seed(0)
    kl = torch.rand(4, 6, generator=g) * 0.3
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] * 2 + [0] * 4])
    tied = torch.ones(4)
    big, small = _advantages(estimator, tied, kl, mask, 0.05), _advantages(estimator, tied, kl, mask, 0.0005)
    torch.testing.assert_close(big, kl_return(kl, mask, 0.05), rtol=0, atol=1e-7)
    torch.testing.assert_close(big, 100 * small, rtol=1e-5, atol=1e-8)
    assert _advantages(estimator, tied, kl, mask, 0.0).abs().max() == 0
    assert big[~mask.bool()].abs().max() == 0


def test_grpo_task_advantage_equals_trl_group_normalisation():
    """The task part of GRPO's advantage is TRL 1.16's GRPOTrainer formula on the same scores
    (trl/trainer/grpo_trainer.py, scale_rewards='group': (r - group mean) / (nanstd(group) + 1e-4)); the
    KL part is added after it, unscaled."""
    from trl.trainer.utils import nanstd

    from stages.ppo.core import kl_return

    k = 4
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.2, 0.9, 0.4, 0.4, 1.0, 1.0, 1.0, 1.0])
    mask = torch.ones(12, 3)
    mask[3, 2] = mask[7, 1:] = 0
    kl = torch.rand(12, 3, generator=torch.Generator().manual_seed(1))
    mean = rewards.view(-1, k).mean(1).repeat_interleave(k)
    std = nanstd(rewards.view(-1, k), dim=1).repeat_interleave(k)
    trl_advantages = (rewards - mean) / (std + 1e-4)
    ours = _advantages("grpo", rewards, kl, mask, 0.05, group_std_eps=1e-4) - kl_return(kl, mask, 0.05)
    expected = torch.where(mask.bool(), trl_advantages.unsqueeze(1).expand(12, 3), torch.zeros(()))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("estimator,extra", [
    ("grpo", ()),
    ("rloo", ()),
    ("reinforce_pp", ()),
    ("grpo", ("ppo.kl_in_loss=true", "ppo.kl_estimator=k3")),  # the GRPO paper's KL: a k3 loss term
])
def test_critic_free_estimator_learns_without_a_critic(tiny_cfg, estimator, extra):
    """Reward rises (mean of the last 3 steps vs the first 3) with the KL bounded; no critic anywhere."""
    from stages.ppo import trainer

    cfg = tiny_cfg(*_overrides(estimator, "ppo.total_episodes=160", "ppo.train.learning_rate=5e-3",
                               "ppo.ppo_epochs=4", "ppo.train.save_steps=1000", "ppo.kl_coef=0.02", *extra))
    trainer.run(cfg)
    out = cfg.stage_dir("ppo")
    rows = train_rows(out, "score")
    first = sum(r["score"] for r in rows[:3]) / 3
    last = sum(r["score"] for r in rows[-3:]) / 3
    assert last > first + 0.5, (estimator, [round(r["score"], 2) for r in rows])
    assert 0 <= rows[-1]["kl"] < 40
    for key in ("score", "reward", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "ratio_max", "policy_loss",
                "response_length", "eos_rate", "episodes_per_s"):
        assert key in rows[-1], key
    assert not {"value_loss", "vf_clipfrac", "explained_variance", "critic_lr"} & set(rows[-1])
    if "ppo.kl_in_loss=true" in extra:
        assert "kl_loss" in rows[-1] and rows[-1]["non_score_reward"] == 0.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["advantage_estimator"] == estimator and manifest["critic_from"] is None
    assert manifest["critic_source"].startswith("none")


def test_groups_are_consecutive_and_the_trainer_builds_no_critic(tiny_cfg):
    from pipeline.stage import StageRun
    from stages.engine import init_distributed
    from stages.ppo.trainer import PPOTrainer

    cfg = tiny_cfg(*_overrides("rloo", "ppo.episodes_per_rollout=8", "ppo.mini_batch_size=4"))
    with StageRun(cfg, "ppo") as run:
        tr = PPOTrainer(cfg, run, init_distributed())
        assert tr.critic is None and tr.critic_opt is None and tr.critic_engine is None
        indices, positions = tr.step_prompts(0)
        assert len(indices) == 8 and indices[:4] == [indices[0]] * 4 and indices[4:] == [indices[4]] * 4
        assert indices[0] != indices[4] and positions == list(range(8)), "each sample has its own stream"
        rollout = tr.make_rollout(0, {})
        assert torch.equal(rollout.old_values, torch.zeros_like(rollout.old_logp))
        for g in range(2):  # each group's advantages sum to 0 on the first token (leave-one-out)
            assert abs(float(rollout.advantages[4 * g:4 * g + 4, 0].sum())) < 1e-5
        run.manifest["metrics"] = {}


def test_memory_plan_has_no_critic_for_critic_free(tiny_cfg):
    from pipeline.memory import estimate

    roles = {r.role for r in estimate(tiny_cfg(*_overrides("grpo")), "ppo").roles}
    assert "critic" not in roles and "actor" in roles
    assert "critic" in {r.role for r in estimate(tiny_cfg("stages=[ppo]", "ppo.policy_from=base", DIGITS), "ppo").roles}


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_estimator_needs_two_samples_per_prompt(tiny_cfg, estimator):
    from pipeline.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match=r"ppo\.num_samples_per_prompt"):
        tiny_cfg(*_overrides(estimator), "ppo.num_samples_per_prompt=1")
    with pytest.raises((ConfigError, ValueError), match=r"ppo\.critic_warmup_steps"):
        tiny_cfg(*_overrides(estimator), "ppo.critic_warmup_steps=1")
    with pytest.raises((ConfigError, ValueError), match=r"ppo\.episodes_per_rollout"):
        tiny_cfg(*_overrides(estimator), "ppo.num_samples_per_prompt=3")
    # the CLI's validate names the key too
    proc = subprocess.run([sys.executable, "-m", "pipeline", "validate", "configs/tiny.yaml", "stages=[ppo]",
                           "ppo.policy_from=base", DIGITS, f"ppo.advantage_estimator={estimator}"],
                          cwd=str(REPO), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0 and "ppo.num_samples_per_prompt" in proc.stdout + proc.stderr, proc.stderr[-2000:]


# --------------------------------------------------------------------------------------- resume
def test_grpo_resume_after_kill_equals_uninterrupted_run(tiny_cfg):
    """As tests/test_ppo.py's PPO resume test, for GRPO (no critic in the checkpoint)."""
    from stages.ppo import trainer

    overrides = _overrides(
        "grpo", "ppo.total_episodes=64", "ppo.train.save_steps=2", "ppo.ppo_epochs=2",
        "ppo.gradient_accumulation_steps=2", "ppo.train.learning_rate=5e-3", "ppo.adaptive_kl=true",
        "ppo.target_kl=0.5", "ppo.kl_horizon=100", "ppo.normalize_reward=true", "ppo.train.lr_scheduler=linear",
        "ppo.kl_in_loss=true", "ppo.kl_estimator=k2")
    straight = tiny_cfg(*overrides, "run_name=straight")
    trainer.run(straight)
    resumed = tiny_cfg(*overrides, "run_name=resumed")

    class Killed(RuntimeError):
        pass

    def kill(step: int) -> None:
        if step == 2:
            raise Killed("simulated kill after the step-2 checkpoint")

    with pytest.raises(Killed):
        trainer.run(resumed, on_step_end=kill)
    out = resumed.stage_dir("ppo")
    assert (out / "checkpoints" / "latest").read_text() == "step-2"
    assert not list((out / "checkpoints" / "step-2").glob("critic*")), "no critic in a critic-free checkpoint"
    torch.manual_seed(12345)
    trainer.run(resumed)
    assert json.loads((out / "manifest.json").read_text())["resumed"] is True
    a, b = saved_weights(straight.stage_dir("ppo") / "model"), saved_weights(out / "model")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7, msg=name)
    rows_a, rows_b = train_rows(straight.stage_dir("ppo"), "score"), train_rows(out, "score")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b):
        for key in ra:
            if key.startswith("time") or key == "episodes_per_s":
                continue
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["step"], key)
    assert rows_a[-1]["kl_coef"] != rows_a[0]["kl_coef"]


# ----------------------------------------------------------------------------------- DeepSpeed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_process_deepspeed_grpo_matches_one_process(tiny_cfg, tmp_path):
    """tests/test_ppo.py's torchrun worker with GRPO (K=2): two ZeRO-2 ranks, 2 groups each, end with the
    parameters of one process that takes the same 4 groups (groups never straddle ranks)."""
    from stages.ppo import trainer

    grpo = ["ppo.advantage_estimator=grpo", "ppo.num_samples_per_prompt=2"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(REPO / "tests" / "test_ppo.py"), "--worker", str(tmp_path / "ds"),
           "ppo.train.deepspeed=configs/deepspeed/zero2.json", "ppo.episodes_per_rollout=4", "ppo.mini_batch_size=4",
           *grpo]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [torch.load(tmp_path / "ds" / f"params-rank{r}.pt") for r in (0, 1)]
    one = tiny_cfg("stages=[ppo]", "ppo.policy_from=base", DIGITS, "ppo.max_new_tokens=16", "ppo.total_episodes=16",
                   "ppo.ppo_epochs=2", "ppo.train.learning_rate=1e-3", "ppo.train.precision=fp32",
                   "ppo.train.save_steps=1000", "ppo.adaptive_kl=true", "run_name=one", "ppo.episodes_per_rollout=8",
                   "ppo.mini_batch_size=8", "ppo.gradient_accumulation_steps=2", *grpo)
    trainer.run(one)
    single = {k: v.float() for k, v in saved_weights(one.stage_dir("ppo") / "model").items()}
    for r in ranks:
        diffs = {k: float((r[k] - single[k]).abs().max()) for k in single}
        assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
