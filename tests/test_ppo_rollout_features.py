"""Rollout-side features of the RL stage on the tiny model: no reference at ``kl_coef`` 0 (the reference is
neither loaded nor run, no KL is logged, and the weights equal those of a run that computes the KL and
multiplies it by 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.common import saved_weights, train_rows

REPO = Path(__file__).resolve().parent.parent
DIGITS = "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction', weight: 10}]"
GRPO2 = ("ppo.advantage_estimator=grpo", "ppo.num_samples_per_prompt=2")
TIMING = ("time", "episodes_per_s", "step_seconds")


def _base(*extra: str) -> list[str]:
    return ["stages=[ppo]", "ppo.policy_from=base", "ppo.max_new_tokens=16", "ppo.missing_eos_penalty=0",
            "ppo.train.save_steps=1000", *extra]


def _trainer(cfg):
    from pipeline.stage import StageRun
    from stages.engine import init_distributed
    from stages.ppo.trainer import PPOTrainer

    run = StageRun(cfg, "ppo")
    run.__enter__()
    return run, PPOTrainer(cfg, run, init_distributed())


def _close(run) -> None:
    run.manifest["metrics"] = {}
    run.__exit__(None, None, None)


def _same_rows(rows_a, rows_b, ignore=()):
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for key in ra.keys() | rb.keys():
            if key.startswith(TIMING) or key in ignore:
                continue
            assert ra.get(key) == rb.get(key), (ra["step"], key, ra.get(key), rb.get(key))


# ---------------------------------------------------------------------------------- no reference
@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_kl_coef_0_neither_loads_nor_runs_a_reference(tiny_cfg, monkeypatch, tuning):
    import stages.ppo.setup as setup
    from stages.ppo.models import PPOModels

    loads, reference_passes = [], []
    load_model = setup.load_model
    monkeypatch.setattr(setup, "load_model", lambda *a, **k: loads.append(a[0]) or load_model(*a, **k))
    reference_logits = PPOModels.reference_logits
    monkeypatch.setattr(PPOModels, "reference_logits",
                        lambda self, *a: reference_passes.append(1) or reference_logits(self, *a))
    counts = {}
    for kl_coef in ("0", "0.05"):
        loads.clear()
        reference_passes.clear()
        cfg = tiny_cfg(*_base(DIGITS, *GRPO2, "ppo.episodes_per_rollout=4", "ppo.mini_batch_size=4",
                              f"ppo.kl_coef={kl_coef}", f"ppo.tuning.method={tuning}", f"run_name=kl{kl_coef}"))
        run, tr = _trainer(cfg)
        try:
            rollout = tr.make_rollout(0, {})
            assert tr.models.has_reference is (kl_coef != "0")
            assert (rollout.ref_logp is None) is (kl_coef == "0") and (rollout.kl is None) is (kl_coef == "0")
            counts[kl_coef] = (len(loads), len(reference_passes))
            assert run.manifest["reference"].startswith("none") is (kl_coef == "0")
        finally:
            _close(run)
    models_with = 1 if tuning == "lora" else 2  # the LoRA reference is the actor with its adapter off
    assert counts == {"0": (1, 0), "0.05": (models_with, 1)}


@pytest.mark.parametrize("extra", [
    (),                                                                              # gae, KL in the reward
    (*GRPO2, "ppo.kl_in_loss=true", "ppo.kl_estimator=k3"),                          # KL as a loss term
    ("ppo.tuning.method=lora",),                                                     # adapter-off reference
])
def test_kl_coef_0_trains_bit_identically_to_a_run_that_computes_the_kl(tiny_cfg, monkeypatch, extra):
    """The old path (reference loaded and run, KL multiplied by 0) and the new one (no reference) end with the
    same weights bit for bit and log the same numbers, less the KL that was never measured."""
    from stages.ppo import trainer
    from stages.ppo.config import PPOConfig

    overrides = _base(DIGITS, "ppo.kl_coef=0", "ppo.total_episodes=24", "ppo.episodes_per_rollout=8",
                      "ppo.mini_batch_size=4", "ppo.ppo_epochs=2", "ppo.train.learning_rate=5e-3", *extra)
    without = tiny_cfg(*overrides, "run_name=without")
    trainer.run(without)
    with monkeypatch.context() as patch:
        patch.setattr(PPOConfig, "uses_reference", property(lambda self: True))
        computed = tiny_cfg(*overrides, "run_name=computed")
        trainer.run(computed)
    a, b = saved_weights(without.stage_dir("ppo") / "model"), saved_weights(computed.stage_dir("ppo") / "model")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows_without = train_rows(without.stage_dir("ppo"), "score")
    rows_computed = train_rows(computed.stage_dir("ppo"), "score")
    assert not {"kl", "non_score_reward", "kl_loss"} & set(rows_without[-1])
    assert "kl" in rows_computed[-1] and rows_computed[-1]["kl"] != 0, "the old path measured a KL"
    _same_rows(rows_without, rows_computed, ignore={"kl", "non_score_reward", "kl_loss"})
