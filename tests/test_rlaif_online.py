"""Online (direct) RLAIF: the judge's pointwise score as a PPO reward source, alone and weighted with the RM.

The judge is configs/tiny.yaml's ``default``: the rule-based demo-task judge (stages/rlaif/rules.py), asked
pointwise (``demo_task_judge(prompt, response)`` = ``demo_task_score``). Short tiny runs (2 PPO steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.rlaif.rules import demo_task_score
from tests.helpers.common import read_jsonl


def _check_samples_scored_by_the_rule(stage_dir: Path) -> list[dict]:
    """Every logged sample's judge score is the rule's score of that (prompt, response)."""
    samples = read_jsonl(stage_dir / "samples.jsonl")
    assert samples
    for s in samples:
        assert s["score/judge_default"] == pytest.approx(demo_task_score(s["prompt"], s["response"]), abs=1e-6)
    return samples


def test_judge_alone_is_the_ppo_reward(tiny_cfg) -> None:
    from stages.ppo import trainer

    cfg = tiny_cfg("stages=[ppo]", "ppo.policy_from=base", "ppo.total_episodes=32", "ppo.max_new_tokens=12",
                   "ppo.rewards=[{kind: judge, judge: default, weight: 1.0}]")
    assert cfg.rlaif.judges["default"].function == "stages.rlaif.rules:demo_task_judge"
    final = trainer.run(cfg)
    stage = cfg.stage_dir("ppo")
    rows = [r for r in read_jsonl(stage / "metrics.jsonl") if "score" in r]
    assert len(rows) == 2 and final["steps"] == 2
    for row in rows:
        assert 0.0 <= row["score/judge_default"] <= 1.0
        assert row["score"] == pytest.approx(row["score/judge_default"], rel=1e-6)
    assert final["score/judge_default"] == pytest.approx(rows[-1]["score/judge_default"])
    assert json.loads((stage / "manifest.json").read_text())["reward_sources"] == ["judge_default"]
    samples = _check_samples_scored_by_the_rule(stage)
    assert all(s["score"] == pytest.approx(s["score/judge_default"], rel=1e-6) for s in samples)


def test_judge_weighted_with_the_rm(tiny_cfg) -> None:
    from stages import run_stage
    from stages.ppo import trainer

    cfg = tiny_cfg("stages=[rm, ppo]", "rm.init_from=base", "rm.train.max_steps=2", "rm.eval_fraction=0.0",
                   "rm.data.max_records=32", "ppo.policy_from=base", "ppo.total_episodes=32", "ppo.max_new_tokens=12",
                   "ppo.rewards=[{kind: rm, weight: 0.5}, {kind: judge, judge: default, weight: 2.0}]")
    run_stage("rm", cfg)
    trainer.run(cfg)
    stage = cfg.stage_dir("ppo")
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["reward_sources"] == ["rm", "judge_default"] and set(manifest["parents"]) == {"rm"}
    rows = [r for r in read_jsonl(stage / "metrics.jsonl") if "score" in r]
    assert len(rows) == 2
    for row in rows:
        assert 0.0 <= row["score/judge_default"] <= 1.0 and row["score/rm"] != 0.0
        assert row["score"] == pytest.approx(0.5 * row["score/rm"] + 2.0 * row["score/judge_default"], rel=1e-5)
    samples = _check_samples_scored_by_the_rule(stage)
    for s in samples:
        assert s["score"] == pytest.approx(0.5 * s["score/rm"] + 2.0 * s["score/judge_default"], rel=1e-5, abs=1e-6)
