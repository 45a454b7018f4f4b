"""best_of_n stage on the tiny model: sample N, score, keep the best as SFT data an sft stage trains on;
validation without a reward source; the planner knows the stage."""

from __future__ import annotations

import json

import pytest

DIGITS = "best_of_n.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction'}]"
COMMON = ["stages=[best_of_n]", "best_of_n.policy_from=base", "best_of_n.data={path: data/demo/prompts.jsonl, "
          "max_records: 12}", "best_of_n.n=4", "best_of_n.max_new_tokens=12", "best_of_n.require_eos=false",
          "best_of_n.num_threads=1"]


def test_best_of_n_keeps_the_best_and_sft_trains_on_it(tiny_cfg):
    from data.formats import load_examples
    from stages import run_stage

    cfg = tiny_cfg(*COMMON, DIGITS)
    metrics = run_stage("best_of_n", cfg)
    out = cfg.stage_dir("best_of_n")
    rows = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert metrics["prompts"] == 12 and metrics["kept"] == len(rows) == 12 and metrics["responses"] == 48
    for r in rows:
        assert len(r["scores"]) == 4 and r["score"] == max(r["scores"]) == r["scores"][r["best_index"]]
        assert r["messages"][-1]["role"] == "assistant" and r["policy"].startswith("base")
        assert r["reward_sources"] == ["digit_fraction"]
    assert metrics["score_mean_kept"] >= metrics["score_mean_all"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["output"].endswith("data.jsonl")
    # the SFT data contract: loads as sft examples, and an sft stage trains on it
    examples, _ = load_examples(cfg.best_of_n.data.model_copy(update={"path": str(out / "data.jsonl"),
                                                                       "max_records": None}), "sft")
    assert len(examples) == 12
    sft = tiny_cfg("stages=[sft]", "run_name=raft2", f"sft.data={{path: {out / 'data.jsonl'}}}",
                   "sft.train.max_steps=2", "sft.eval_fraction=0")
    assert run_stage("sft", sft)

    # a threshold keeps only prompts whose best score reaches it
    high = tiny_cfg(*COMMON, DIGITS, "run_name=thr", "best_of_n.threshold=0.2")
    m = run_stage("best_of_n", high)
    kept = [json.loads(x) for x in (high.stage_dir("best_of_n") / "data.jsonl").read_text().splitlines()]
    assert all(r["score"] >= 0.2 for r in kept) and m["kept"] + m["below_threshold"] == 12


def test_best_of_n_without_a_reward_source_fails_at_validate(tiny_cfg):
    from pipeline.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match=r"best_of_n\.rewards"):
        tiny_cfg(*COMMON)
    with pytest.raises((ConfigError, ValueError), match=r"'rm'"):
        tiny_cfg(*COMMON, "best_of_n.rewards=[{kind: rm}]")


def test_best_of_n_parents_and_memory_plan(tiny_cfg):
    from pipeline.memory import estimate
    from pipeline.registry import parents_of, stage_names

    cfg = tiny_cfg("stages=[sft, rm, best_of_n]", "best_of_n.data={path: data/demo/prompts.jsonl}",
                   "best_of_n.rewards=[{kind: rm}]")
    assert parents_of(cfg, "best_of_n") == ["sft", "rm"]
    assert stage_names(cfg).index("rm") < stage_names(cfg).index("best_of_n")
    roles = {r.role for r in estimate(cfg, "best_of_n").roles}
    assert {"policy", "reward_model", "kv_cache"} <= roles
