"""PPO's guards on the tiny model: a held-out verifier that disagrees with the reward (the reward pays for
digits, the verifier for their absence) makes keep_best save the starting policy back and early stopping end
the run; the KL budget stops a run; a run with the guards killed and resumed ends exactly as one straight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.common import saved_weights, train_rows

DIGITS = "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction', weight: 10}]"
EVAL = "ppo.eval_data={path: data/demo/prompts.jsonl, max_records: 16}"
COMMON = ["stages=[ppo]", "ppo.policy_from=base", DIGITS, "ppo.max_new_tokens=16", EVAL, "ppo.missing_eos_penalty=0",
          "ppo.train.learning_rate=5e-3", "ppo.ppo_epochs=4", "ppo.kl_coef=0.02"]
NO_DIGITS = "ppo.eval_verifier='tests.test_ppo_guards:digit_free'"


def digit_free(prompts, responses, references):
    """A verifier that wants what the reward punishes: 1 - the digit fraction, with the share that has any."""
    scores, has_digit = [], []
    for response in responses:
        chars = [c for c in response if not c.isspace()]
        digits = sum(c.isdigit() for c in chars)
        scores.append(1.0 - (digits / len(chars) if chars else 0.0))
        has_digit.append(float(digits > 0))
    return {"scores": scores, "metrics": {"has_digit": has_digit}}


def _manifest(cfg):
    return json.loads((cfg.stage_dir("ppo") / "manifest.json").read_text())


def test_keep_best_saves_the_starting_policy_back_when_the_verifier_only_falls(tiny_cfg):
    from stages.ppo import trainer

    cfg = tiny_cfg(*COMMON, NO_DIGITS, "ppo.total_episodes=160", "ppo.eval_every=2", "ppo.keep_best=true",
                   "ppo.early_stopping_patience=2", "ppo.train.save_steps=1000")
    trainer.run(cfg)
    rows = [json.loads(x) for x in (cfg.stage_dir("ppo") / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_verifier" in r]
    assert {"eval_verifier/has_digit", "best_eval_verifier", "evals_since_best"} <= set(evals[0])
    assert evals[-1]["eval_verifier"] < evals[0]["eval_verifier"], "the reward raised digits on held-out prompts"
    guards = _manifest(cfg)["guards"]
    assert guards["best_step"] == 0 and guards["kept_step"] == 0, guards
    assert guards["stop_reason"] == "early_stopping" and guards["stop_step"] < 10, guards  # 10 steps planned
    assert _manifest(cfg)["metrics"]["steps"] == guards["stop_step"]
    # the saved policy is the starting one: the base model's weights
    from pipeline.models import prepare_base

    start = saved_weights(Path(prepare_base(cfg.model)))
    saved = saved_weights(cfg.stage_dir("ppo") / "model")
    assert saved.keys() == start.keys()
    assert all(torch.equal(saved[name], start[name]) for name in start)
    final_rows = train_rows(cfg.stage_dir("ppo"), "score")
    assert final_rows[-1]["step"] == guards["stop_step"]


def test_the_kl_budget_stops_the_run(tiny_cfg):
    from stages.ppo import trainer

    cfg = tiny_cfg(*COMMON, "ppo.total_episodes=96", "ppo.max_kl=1e-6", "ppo.train.save_steps=1000")
    trainer.run(cfg)
    manifest = _manifest(cfg)
    rows = train_rows(cfg.stage_dir("ppo"), "score")
    # step 1 samples from the starting policy (KL 0); step 2's rollout comes after an update: over the budget
    assert rows[0]["kl"] == 0 and rows[1]["kl"] > 1e-6
    assert (manifest["guards"]["stop_reason"], manifest["guards"]["stop_step"]) == ("max_kl", 2)
    assert manifest["metrics"]["steps"] == 2 and [r["step"] for r in rows] == [1, 2]  # 6 steps planned


def test_guards_resume_exactly(tiny_cfg):
    from stages.ppo import trainer

    overrides = [*COMMON, NO_DIGITS, "ppo.total_episodes=96", "ppo.eval_every=1", "ppo.keep_best=true",
                 "ppo.early_stopping_patience=4", "ppo.train.save_steps=2"]
    straight = tiny_cfg(*overrides, "run_name=straight")
    trainer.run(straight)

    class Killed(RuntimeError):
        pass

    def kill(step: int) -> None:
        if step == 2:
            raise Killed("simulated kill after the step-2 checkpoint")

    resumed = tiny_cfg(*overrides, "run_name=resumed")
    with pytest.raises(Killed):
        trainer.run(resumed, on_step_end=kill)
    trainer.run(resumed)
    assert _manifest(resumed)["resumed"] is True
    assert _manifest(resumed)["guards"] == _manifest(straight)["guards"]
    a, b = saved_weights(straight.stage_dir("ppo") / "model"), saved_weights(resumed.stage_dir("ppo") / "model")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7, msg=name)
