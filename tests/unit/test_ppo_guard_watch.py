"""PPO's guards (stages.ppo.guards), by hand: the watch over evals (best, patience, early stop), the KL
budget, the state a checkpoint keeps, and the verifier's sums and means."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from stages.ppo.guards import PPOGuards, verifier_means, verifier_sums


def _guards(tmp_path, **settings):
    ppo = SimpleNamespace(eval_verifier=None, keep_best=False, early_stopping_patience=None, max_kl=None)
    for key, value in settings.items():
        setattr(ppo, key, value)
    return PPOGuards(ppo, tmp_path, is_main=True, world_size=1)


def test_the_watch_follows_the_verifier_and_stops_after_patience_evals_without_a_new_best(tmp_path):
    guards = _guards(tmp_path, eval_verifier="m:f", early_stopping_patience=2)
    assert guards.monitor == "eval_verifier"
    # eval_score rises all along; the verifier peaks at step 2: the watch follows the verifier
    evals = [(0, 0.50, 1.0), (2, 0.70, 2.0), (4, 0.70, 3.0), (6, 0.60, 4.0)]
    logged = [guards.after_eval(step, {"eval_verifier": v, "eval_score": s}, actor=None) for step, v, s in evals]
    assert [row["evals_since_best"] for row in logged] == [0, 0, 1, 2]  # a tie is no new best
    assert logged[-1]["best_eval_verifier"] == 0.70
    assert (guards.best_step, guards.stop_reason, guards.stop_step) == (2, "early_stopping", 6)
    assert guards.summary(kept_step=6) == {"best_eval_verifier": 0.70, "best_step": 2,
                                           "stop_reason": "early_stopping", "stop_step": 6}


def test_without_a_verifier_the_watch_is_the_eval_score_and_no_eval_changes_nothing(tmp_path):
    guards = _guards(tmp_path)
    assert guards.after_eval(0, {}, actor=None) == {}
    assert guards.after_eval(0, {"eval_score": -1.0}, actor=None) == {"best_eval_score": -1.0, "evals_since_best": 0.0}
    assert guards.after_eval(3, {"eval_score": -2.0}, actor=None)["evals_since_best"] == 1.0
    assert not guards.stopped  # no patience set: never stops


def test_the_kl_budget_stops_after_the_first_step_above_it(tmp_path):
    guards = _guards(tmp_path, max_kl=2.0)
    guards.after_step(1, {"kl": 1.5})
    guards.after_step(2, {"kl": 2.0})  # at the budget is within it
    assert not guards.stopped
    guards.after_step(3, {"kl": 2.5})
    guards.after_step(4, {"kl": 9.0})  # the first reason and step stay
    assert (guards.stop_reason, guards.stop_step) == ("max_kl", 3)


def test_the_watch_state_round_trips(tmp_path):
    guards = _guards(tmp_path, early_stopping_patience=5)
    guards.after_eval(0, {"eval_score": 1.0}, actor=None)
    guards.after_eval(2, {"eval_score": 0.5}, actor=None)
    again = _guards(tmp_path, early_stopping_patience=5)
    again.load_state_dict(guards.state_dict())
    assert again.state_dict() == guards.state_dict() == {
        "best": 1.0, "best_step": 0, "since_best": 1, "stop_reason": None, "stop_step": None}


def _verifier(prompts, responses, references):
    # score 1 where the response equals the reference; metric "brace": 1/0, missing (None) for empty answers
    return {"scores": [float(r == ref) for r, ref in zip(responses, references)],
            "metrics": {"brace": [None if not r else float(r.startswith("{")) for r in responses]}}


def test_verifier_sums_and_means_by_hand():
    first = verifier_sums(_verifier, ["a", "b"], ["{x}", "y"], ["{x}", "z"], "t:v")
    second = verifier_sums(_verifier, ["c"], [""], [""], "t:v")
    assert first == {"eval_verifier": 1.0, "eval_verifier/brace": 1.0, "eval_verifier/brace#n": 2.0}
    total = {k: first[k] + second[k] for k in first}  # the empty answer: a score, no brace value
    assert verifier_means(total, n=3.0) == pytest.approx({"eval_verifier": 2 / 3, "eval_verifier/brace": 1 / 2})
    with pytest.raises(ValueError, match="returned 1 scores for 2 responses"):
        verifier_sums(lambda p, r, ref: [1.0], ["a", "b"], ["x", "y"], [None, None], "t:v")


def test_the_report_draws_the_format_and_held_out_curves_and_says_what_the_guards_did():
    from stages.ppo.config import report_section

    class Section:  # what report_section reads of pipeline.report.sections.StageSection
        rows = [{"step": 0, "eval_score": 0.1, "eval_verifier": 0.5, "eval_verifier/house_format": 0.2},
                {"step": 1, "score": 1.0, "kl": 0.0, "reward_metric/house_format": 0.3},
                {"step": 2, "score": 1.5, "kl": 0.4, "reward_metric/house_format": 0.6}]
        manifest = {"guards": {"stop_reason": "max_kl", "stop_step": 2, "kept_step": 0}}
        grids: dict = {}

        def grid(self, file, title, keys, missing=None):
            self.grids[file] = list(keys)
            return [f"<{file}>"]

    section = Section()
    lines = report_section(section)
    assert "reward_metric/house_format" in section.grids["ppo_curves.png"]
    assert section.grids["ppo_eval_curves.png"][:3] == ["eval_score", "eval_verifier", "eval_verifier/house_format"]
    assert "Stopped after step 2 (max_kl)." in lines
    assert any("step 0's" in line for line in lines)
