"""Three rollout-side features of the RL stage on the tiny model:

- shared prefills: the K samples of a prompt share one forward pass over it, and sample exactly the tokens
  K separate prompt passes sample;
- dynamic sampling (``ppo.filter_tied_groups``): groups whose rewards tie are dropped and more prompts are
  sampled; the batch keeps only groups with a signal, a run resumes exactly, and a run in which nothing
  ties trains exactly as without the filter;
- no reference at ``kl_coef`` 0: the reference is neither loaded nor run, no KL is logged, and the weights
  equal those of a run that computes the KL and multiplies it by 0.
"""

from __future__ import annotations

import hashlib
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
PARITY = "ppo.rewards=[{kind: function, function: 'tests.test_ppo_rollout_features:parity_reward'}]"
DISTINCT = "ppo.rewards=[{kind: function, function: 'tests.test_ppo_rollout_features:distinct_reward'}]"
GRPO2 = ("ppo.advantage_estimator=grpo", "ppo.num_samples_per_prompt=2")
TIMING = ("time", "episodes_per_s", "step_seconds")


def parity_reward(prompts, responses, references):
    """1 for a response of an odd number of characters, else 0: a 0/1 reward whose groups of 2 tie half the time."""
    return [float(len(r) % 2) for r in responses]


def distinct_reward(prompts, responses, references):
    """A number from the response's text: two different responses never tie (in practice)."""
    return [int(hashlib.md5(r.encode()).hexdigest()[:8], 16) / 2 ** 32 for r in responses]


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


def _first_rollout(cfg, timings=None):
    """Step 0's rollout (with advantages) of a fresh trainer on ``cfg``."""
    run, tr = _trainer(cfg)
    try:
        return tr.make_rollout(0, {} if timings is None else timings)
    finally:
        _close(run)


def _same_rows(rows_a, rows_b, ignore=()):
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for key in ra.keys() | rb.keys():
            if key.startswith(TIMING) or key in ignore:
                continue
            assert ra.get(key) == rb.get(key), (ra["step"], key, ra.get(key), rb.get(key))


# ------------------------------------------------------------------------------------ shared prefills
@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_shared_prefill_samples_the_tokens_of_separate_prefills(tiny_cfg, tuning):
    """K = 4 samples of 4 prompts of different lengths (left padding): one prompt pass per group gives the
    same tokens and log-probs as the K-separate path, bit for bit."""
    cfg = tiny_cfg(*_base(DIGITS, "ppo.advantage_estimator=grpo", "ppo.num_samples_per_prompt=4",
                          "ppo.episodes_per_rollout=16", "ppo.mini_batch_size=8", "ppo.max_new_tokens=24",
                          f"ppo.tuning.method={tuning}"))
    run, tr = _trainer(cfg)
    try:
        experience = tr.experience
        caches = []
        prefill = experience._shared_prefill

        def spy(*args):
            caches.append(prefill(*args))
            return caches[-1]

        experience._shared_prefill = spy
        shared = experience.make_rollout(0, {})
        assert len(caches) == 1 and caches[0] is not None, "the K samples shared one prompt pass"
        assert len(set(shared.prompt_mask.sum(1).tolist())) > 1, "prompts of different lengths"
        experience.share_prefill = False
        separate = experience.make_rollout(0, {})
        assert len(caches) == 1, "the separate path runs no shared prefill"
        assert torch.equal(shared.response_ids, separate.response_ids)
        assert torch.equal(shared.old_logp, separate.old_logp)
        assert shared.response_texts == separate.response_texts
    finally:
        _close(run)


def test_no_shared_prefill_for_single_samples_or_mixed_groups(tiny_cfg):
    cfg = tiny_cfg(*_base(DIGITS, "ppo.episodes_per_rollout=4", "ppo.mini_batch_size=4"))
    run, tr = _trainer(cfg)
    try:
        experience = tr.experience
        query = torch.tensor([[5, 6, 7], [5, 6, 7], [5, 6, 8], [5, 6, 8]])
        mask = torch.ones_like(query)
        assert experience._shared_prefill(query, mask, 1) is None
        assert experience._shared_prefill(query[:, :1], mask[:, :1], 2) is None, "one-token prompts"
        assert experience._shared_prefill(query, mask, 4) is None, "rows of a group differ"
        assert experience._shared_prefill(query, mask, 2).get_seq_length() == 2
    finally:
        _close(run)


# ----------------------------------------------------------------------------------- dynamic sampling
def test_filter_tied_groups_keeps_groups_with_a_signal_and_refills_from_new_prompts(tiny_cfg):
    """Parity reward, 4 groups of 2: the unfiltered rollout has tied groups; the filtered one has none, its
    groups whose rewards differ come first and are the unfiltered rollout's (same tokens), the rest come
    from prompts the step had not used, sampled in later rounds."""
    from stages.ppo.core import tied_groups

    overrides = _base(PARITY, *GRPO2, "ppo.episodes_per_rollout=8", "ppo.mini_batch_size=4", "ppo.train.seed=1")
    timings: dict[str, float] = {}
    filtered = _first_rollout(tiny_cfg(*overrides, "ppo.filter_tied_groups=true", "ppo.max_sampling_rounds=6",
                                       "run_name=filtered"), timings)
    plain = _first_rollout(tiny_cfg(*overrides, "run_name=plain"))
    plain_tied = tied_groups(plain.score, 2)
    assert 0 < int(plain_tied.sum()) < 4, "the case under test: some groups of the first round tie"
    stats = filtered.reward_stats
    assert stats["sampling_rounds"] >= 2 and stats["tied_groups_trained"] == 0
    assert stats["tied_group_frac"] > 0
    assert not tied_groups(filtered.score, 2).any()
    assert filtered.response_ids.size(0) == 8 and filtered.advantages.abs().sum(1).min() > 0
    for g in range(4):  # each group is one prompt's two samples
        assert filtered.prompt_messages[2 * g] == filtered.prompt_messages[2 * g + 1]
    kept = [g for g in range(4) if not plain_tied[g]]
    for i, g in enumerate(kept):  # the first round's groups with a signal, unchanged, in order
        assert filtered.response_texts[2 * i:2 * i + 2] == plain.response_texts[2 * g:2 * g + 2]
        assert filtered.prompt_messages[2 * i] == plain.prompt_messages[2 * g]
    step_prompts = {json.dumps(m) for m in plain.prompt_messages}
    refills = [json.dumps(m) for m in filtered.prompt_messages[2 * len(kept)::2]]
    assert refills and not step_prompts & set(refills), "extra rounds draw prompts the step has not used"
    assert timings["time_generate"] > 0 and timings["time_score"] > 0


def test_out_of_rounds_the_batch_is_filled_with_tied_groups(tiny_cfg):
    """One round allowed: nothing is resampled, the batch is the unfiltered one and says how many groups tie."""
    from stages.ppo.core import tied_groups

    overrides = _base(PARITY, *GRPO2, "ppo.episodes_per_rollout=8", "ppo.mini_batch_size=4", "ppo.train.seed=1")
    filtered = _first_rollout(tiny_cfg(*overrides, "ppo.filter_tied_groups=true", "ppo.max_sampling_rounds=1",
                                       "run_name=filtered"))
    plain = _first_rollout(tiny_cfg(*overrides, "run_name=plain"))
    tied = int(tied_groups(plain.score, 2).sum())
    assert tied > 0
    assert filtered.reward_stats["tied_groups_trained"] == tied
    assert filtered.reward_stats["sampling_rounds"] == 1 and filtered.reward_stats["tied_group_frac"] == tied / 4
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "old_logp", "ref_logp", "reward"):
        assert torch.equal(getattr(filtered, name), getattr(plain, name)), name


def test_filter_without_ties_trains_exactly_as_without_the_filter(tiny_cfg):
    """A reward under which no group ties: one sampling round per step, and the run equals the unfiltered
    one (weights bit for bit, every logged number)."""
    from stages.ppo import trainer

    overrides = _base(DISTINCT, *GRPO2, "ppo.total_episodes=24", "ppo.episodes_per_rollout=8",
                      "ppo.mini_batch_size=4", "ppo.train.learning_rate=5e-3")
    plain = tiny_cfg(*overrides, "run_name=plain")
    filtered = tiny_cfg(*overrides, "ppo.filter_tied_groups=true", "run_name=filtered")
    trainer.run(plain)
    trainer.run(filtered)
    a, b = saved_weights(plain.stage_dir("ppo") / "model"), saved_weights(filtered.stage_dir("ppo") / "model")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows = train_rows(filtered.stage_dir("ppo"), "score")
    assert all(r["sampling_rounds"] == 1 and r["tied_group_frac"] == 0 for r in rows)
    _same_rows(train_rows(plain.stage_dir("ppo"), "score"), rows,
               ignore={"sampling_rounds", "tied_group_frac", "tied_groups_trained"})


def test_filter_tied_groups_resume_after_kill_equals_uninterrupted_run(tiny_cfg):
    """Extra rounds are a function of (seed, step), so a resumed run samples them again exactly."""
    from stages.ppo import trainer

    overrides = _base(PARITY, *GRPO2, "ppo.total_episodes=32", "ppo.episodes_per_rollout=8",
                      "ppo.mini_batch_size=4", "ppo.train.save_steps=2", "ppo.train.learning_rate=5e-3",
                      "ppo.normalize_reward=true", "ppo.filter_tied_groups=true")
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
    torch.manual_seed(12345)
    trainer.run(resumed)
    out = resumed.stage_dir("ppo")
    assert json.loads((out / "manifest.json").read_text())["resumed"] is True
    a, b = saved_weights(straight.stage_dir("ppo") / "model"), saved_weights(out / "model")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows = train_rows(straight.stage_dir("ppo"), "score")
    assert max(r["sampling_rounds"] for r in rows) > 1, "the run resampled"
    _same_rows(rows, train_rows(out, "score"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_process_filter_tied_groups_runs_the_same_rounds_on_every_rank(tmp_path):
    """Two ZeRO-2 ranks with dynamic sampling: every rank runs the same rounds (sampling has collectives) and
    they end with the same weights; the run is deterministic (two runs, equal weights)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    params = []
    for tag in ("a", "b"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(REPO / "tests" / "test_ppo.py"), "--worker", str(tmp_path / tag),
               "ppo.train.deepspeed=configs/deepspeed/zero2.json", "ppo.episodes_per_rollout=4",
               "ppo.mini_batch_size=4", PARITY, *GRPO2, "ppo.filter_tied_groups=true", "ppo.missing_eos_penalty=0",
               "ppo.train.seed=1"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        params.append([torch.load(tmp_path / tag / f"params-rank{r}.pt") for r in (0, 1)])
        rows = train_rows(tmp_path / tag / "run" / "tiny" / "ppo", "score")
        assert len(rows) == 2 and sum(r["sampling_rounds"] for r in rows) > 2, "some step sampled again"
    for ranks in params:
        for name in ranks[0]:
            assert torch.equal(ranks[0][name], ranks[1][name]), name
    for name in params[0][0]:
        assert torch.equal(params[0][0][name], params[1][0][name]), name


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
