"""A stage process reads the run's resolved config (every key written out, ``pipeline.plan.write_resolved_config``):
each shipped config, and one with the PPO and DPO objective variants set, must validate again from its own
dump and come back equal. A validator that asks "was this key given" instead of "is it at its default" breaks
here, as every key is given in a resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")
                 if not {"deepspeed", "constitutions"} & set(p.parts))
VARIANT = ["ppo.advantage_estimator=grpo", "ppo.num_samples_per_prompt=4", "ppo.filter_tied_groups=true",
           "ppo.loss_aggregation=seq-mean-token-sum", "ppo.scale_rewards=none", "ppo.cliprange_high=0.28",
           "ppo.eval_data={path: data/demo/prompts.jsonl}", "ppo.keep_best=true", "dpo.loss=simpo"]


@pytest.mark.parametrize("config, overrides", [(c, []) for c in CONFIGS] + [("configs/tiny.yaml", VARIANT)])
def test_a_resolved_config_validates_again_unchanged(config, overrides):
    from pipeline.config import config_from_dict, load_config

    cfg = load_config(REPO / config, overrides)
    again = config_from_dict(cfg.to_dict(), "resolved")
    assert again.to_dict() == cfg.to_dict()
