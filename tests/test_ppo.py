"""PPO stage on the tiny model: learning, KL control, RM + critic wiring, LoRA reference, resume
equivalence, NaN stop, ratio skipping, fp16 refusal, and a two-process DeepSpeed ZeRO-2 run.

The distributed worker lives at the bottom of this file: ``torchrun ... tests/test_ppo.py --worker``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.helpers.common import saved_weights, train_rows

REPO = Path(__file__).resolve().parent.parent

DIGITS = "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction', weight: 10}]"
EVAL = "ppo.eval_data={path: data/demo/prompts.jsonl, max_records: 32}"


def _base_overrides(*extra: str) -> list[str]:
    return ["stages=[ppo]", "ppo.policy_from=base", DIGITS, "ppo.max_new_tokens=16", *extra]


# --------------------------------------------------------------------------------------- helpers
def test_episode_sampler_is_batch_independent_and_follows_the_distribution():
    from stages.ppo.rollout import EpisodeSampler, episode_uniforms

    torch.manual_seed(0)
    logits = torch.randn(1, 6) * 2
    # frequencies over many independent episodes match softmax(logits / temperature)
    n = 4000
    u = episode_uniforms(0, 0, list(range(n)), 1)
    sampler = EpisodeSampler(u, prompt_len=3, temperature=0.7, top_k=0, top_p=1.0)
    out = sampler(torch.zeros(n, 3, dtype=torch.long), logits.expand(n, 6).clone())
    assert torch.isinf(out).sum(1).eq(5).all(), "exactly one token stays finite per row"
    freq = torch.bincount(out.argmax(-1), minlength=6).float() / n
    assert torch.allclose(freq, torch.softmax(logits[0] / 0.7, -1), atol=0.03)
    # the draw for an episode does not depend on the rest of the batch
    single = EpisodeSampler(u[5:6], 3, 0.7, 0, 1.0)(torch.zeros(1, 3, dtype=torch.long), logits.clone())
    assert single.argmax(-1).item() == out[5].argmax().item()
    # top-k 1 is greedy; top-p keeps the nucleus only
    greedy = EpisodeSampler(u[:50], 3, 1.0, 1, 1.0)(torch.zeros(50, 3, dtype=torch.long), logits.expand(50, 6).clone())
    assert greedy.argmax(-1).eq(logits.argmax()).all()
    probs = torch.softmax(logits[0], -1)
    top = probs.argsort(descending=True)
    nucleus = EpisodeSampler(u[:500], 3, 1.0, 0, float(probs[top[0]]) * 0.999)
    picks = nucleus(torch.zeros(500, 3, dtype=torch.long), logits.expand(500, 6).clone()).argmax(-1)
    assert picks.eq(top[0]).all()


def test_response_mask_stops_at_first_eos():
    from stages.ppo.rollout import response_mask

    eos = 7
    responses = torch.tensor([[1, 7, 3, 7], [1, 2, 3, 4], [7, 0, 0, 0]])
    mask, has_eos = response_mask(responses, eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_reward_functions():
    from stages.ppo.rewards import contains_reference_number, digit_fraction, gsm8k_correct

    refs = ["Natalia sold 48/2 = 24 clips.\n#### 72", "50 plus 38 is 88.", None]
    assert gsm8k_correct([""] * 3, ["so the answer is #### 72", "It is 88", "7"], refs) == [1.0, 1.0, 0.0]
    assert gsm8k_correct([""], ["72 or maybe 71"], refs[:1]) == [0.0]
    assert contains_reference_number([""], ["72 or maybe 71"], refs[:1]) == [1.0]
    assert digit_fraction([""] * 2, ["a1 2", ""], [None] * 2) == [pytest.approx(2 / 3), 0.0]


def test_rm_scores_the_generated_ids_and_survives_overlong_sequences(tiny_cfg):
    """Same tokenizer: the RM scores the prompt ids + generated ids up to and including eos, nothing
    re-rendered; a response cut off without eos is scored at its last token (no eos appended); a
    special token the policy emitted stays visible; an overlong sequence keeps its last tokens."""
    from types import SimpleNamespace

    from pipeline.models import load_model, load_tokenizer, prepare_base
    from stages.ppo.rewards import Responses, RewardSources
    from stages.ppo.rollout import encode_prompts
    from stages.scoring import score_responses, score_token_ids

    cfg = tiny_cfg()
    base = prepare_base(cfg.model)
    tok = load_tokenizer(base, cfg.model, cfg.chat)
    torch.manual_seed(0)
    rm = load_model(base, cfg.model, tok, kind="seq_cls").eval()
    sources = RewardSources([SimpleNamespace(kind="rm", weight=1.0)], cfg, tok, rm, 48, torch.device("cpu"))
    assert sources.rm_scoring == "token_ids"
    prompt = encode_prompts(tok, [SimpleNamespace(prompt=[{"role": "user", "content": "What is 2 plus 2?"}],
                                                  reference=None)], 64, None)[0]
    eos, im_start = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_start|>")
    words = tok("It is four", add_special_tokens=False)["input_ids"]
    finished, cut, special = words + [eos], words, words[:1] + [im_start] + words[1:] + [eos]
    long = tok(" one two three" * 40, add_special_tokens=False)["input_ids"]
    rows = [finished, cut, special, long]
    batch = Responses([prompt.messages] * 4, [prompt.ids] * 4, rows, [True, False, True, False],
                      tok.batch_decode(rows, skip_special_tokens=True), [None] * 4)
    seqs, n_cut = sources.rm_inputs(batch)
    assert seqs[:3] == [prompt.ids + r for r in rows[:3]], "the ids generated are the ids scored"
    assert seqs[1][-1] != eos and seqs[1][-1] == cut[-1], "a cut-off response is not scored as finished"
    assert im_start in seqs[2][len(prompt.ids):], "a special token the policy emitted reaches the RM"
    assert len(seqs[3]) == 48 and seqs[3] == (prompt.ids + long)[-48:] and n_cut == 1
    scores, truncated = sources.rm_scores(batch)
    assert truncated == 1
    torch.testing.assert_close(scores, score_token_ids(rm, seqs, tok.pad_token_id))
    # the text round trip would have scored the cut-off answer as finished (its template closes the turn)
    text_layout = score_responses(rm, tok, [prompt.messages], [batch.texts[1]], max_length=48)
    assert float(text_layout[0]) != pytest.approx(float(scores[1]))


def test_fp16_refused(tiny_cfg):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="fp16"):
        tiny_cfg("ppo.train.precision=fp16")


# -------------------------------------------------------------------------------------- learning
def test_reward_rises_eval_improves_and_high_kl_stays_near_reference(tiny_cfg, tmp_path):
    """A learnable dense reward (digit fraction): the score and a held-out eval score rise with KL
    bounded; the same run with a very high KL coefficient stays much nearer the reference."""
    from stages.ppo import trainer

    # the missing-eos penalty (on by default) is a second reward that pulls towards eos under any KL
    # coefficient; off here, so the KL comparison is about the digit reward alone
    common = _base_overrides(EVAL, "ppo.total_episodes=160", "ppo.train.learning_rate=5e-3", "ppo.ppo_epochs=4",
                             "ppo.train.save_steps=1000", "ppo.missing_eos_penalty=0")
    cfg = tiny_cfg(*common, "ppo.kl_coef=0.02")
    final = trainer.run(cfg)
    rows = train_rows(cfg.stage_dir("ppo"), "score")
    first = sum(r["score"] for r in rows[:3]) / 3
    last = sum(r["score"] for r in rows[-3:]) / 3
    assert last > first + 0.5, (first, last)
    assert final["eval_score"] > final["eval_score_before"] + 1.0, final
    low_kl = sum(r["kl"] for r in rows[-3:]) / 3
    assert 0 < low_kl < 40, low_kl
    for key in ("score", "non_score_reward", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "ratio_max",
                "policy_loss", "value_loss", "explained_variance", "response_length", "eos_rate",
                "skipped_minibatches", "time_generate", "time_score", "time_update", "episodes_per_s"):
        assert key in rows[-1], key
    samples = [json.loads(x) for x in (cfg.stage_dir("ppo") / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "response", "score"} <= set(samples[0])

    high = tiny_cfg(*common, "ppo.kl_coef=5.0", "run_name=highkl")
    final_high = trainer.run(high)
    rows_high = train_rows(high.stage_dir("ppo"), "score")
    high_kl = sum(r["kl"] for r in rows_high[-3:]) / 3
    assert high_kl < 0.35 * low_kl, (high_kl, low_kl)
    assert abs(final_high["eval_score"] - final_high["eval_score_before"]) < 0.5, final_high


# ------------------------------------------------------------------------- RM, critic, LoRA reference
@pytest.mark.gpu
def test_rm_reward_critic_from_rm_and_lora_reference(tiny_cfg):
    """RM stage output as reward (read at eos) and critic init (value head = RM score head); a LoRA
    actor uses the adapter-disabled policy as reference (no second copy); outputs follow the contract."""
    from pipeline.stage import StageRun
    from stages import run_stage
    from stages.engine import init_distributed
    from stages.ppo.trainer import PPOTrainer

    cfg = tiny_cfg("stages=[rm, ppo]", "rm.init_from=base", "rm.train.max_steps=20", "ppo.policy_from=base",
                   "ppo.total_episodes=32", "ppo.tuning.method=lora", "ppo.train.learning_rate=1e-3",
                   "ppo.missing_eos_penalty=1.0", "ppo.log_samples_every=1")
    run_stage("rm", cfg)
    dist = init_distributed()
    with StageRun(cfg, "ppo") as run:
        tr = PPOTrainer(cfg, run, dist)
        assert tr.ref is None and tr.lora, "LoRA actor: the reference is the adapter-disabled policy"
        rm_head = dict(tr.rm.named_parameters())["score.weight"]
        heads = [p for n, p in tr.critic.named_parameters() if "score" in n and n.endswith("weight")]
        assert heads and all(torch.equal(rm_head, h.detach()) for h in heads), "value head = RM score head"
        final = tr.train()
        # after training, the reference (adapter disabled) is still exactly the base; the policy moved
        from pipeline.models import load_model

        base = load_model(tr.base_path, cfg.model, tr.tokenizer)
        ids = torch.tensor([tr.prompts[0].ids])
        att = torch.ones_like(ids)
        with torch.no_grad():
            ref = tr.reference_logits(ids, att, 4)
            torch.testing.assert_close(ref, tr.policy_logits(base, ids, att, 4))
            assert not torch.allclose(ref, tr.policy_logits(tr.actor, ids, att, 4))
        tr.save_policy()
        run.manifest["metrics"] = final
    out = cfg.stage_dir("ppo")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["model_format"] == "merged"
    assert (out / "adapter").exists() and (out / "model" / "model.safetensors").exists()
    rows = train_rows(out, "score")
    assert len(rows) == 2 and all("score/rm" in r for r in rows)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert all(s["reward"] <= s["score"] + 1e-6 for s in samples)
    assert any(not s["eos"] and s["reward"] == pytest.approx(s["score"] - 1.0) for s in samples) or \
        all(s["eos"] for s in samples)
    # the saved policy loads on its own and generates
    from pipeline.models import load_model, load_tokenizer

    tok = load_tokenizer(str(out), cfg.model)
    model = load_model(str(out / "model"), cfg.model, tok)
    assert model.generate(torch.tensor([[tok.bos_token_id]]), max_new_tokens=2).shape[1] >= 2


# --------------------------------------------------------------------------------------- resume
def test_resume_after_kill_equals_uninterrupted_run(tiny_cfg, tmp_path):
    """4 steps straight vs 2 steps, killed after the step-2 checkpoint, resumed for 2 more: identical
    weights and identical metrics (optimisers, schedulers, RNG, data position, KL controller, reward
    normaliser, EMA all restored)."""
    from stages.ppo import trainer

    overrides = _base_overrides(
        "ppo.total_episodes=64", "ppo.train.save_steps=2", "ppo.ppo_epochs=2", "ppo.gradient_accumulation_steps=2",
        "ppo.train.learning_rate=5e-3", "ppo.adaptive_kl=true", "ppo.target_kl=0.5", "ppo.kl_horizon=100",
        "ppo.normalize_reward=true", "ppo.reward_clip=3", "ppo.ema_decay=0.5", "ppo.missing_eos_penalty=0.5",
        "ppo.train.lr_scheduler=linear", "ppo.ptx_coef=0.1", "ppo.critic_warmup_steps=1")
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
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    assert (out / "checkpoints" / "latest").read_text() == "step-2"
    torch.manual_seed(12345)  # the resumed run must not depend on the process's RNG
    trainer.run(resumed)
    assert json.loads((out / "manifest.json").read_text())["resumed"] is True

    a, b = saved_weights(straight.stage_dir("ppo") / "model"), saved_weights(out / "model")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7, msg=name)
    skip = {"time", "episodes_per_s"}
    rows_a, rows_b = train_rows(straight.stage_dir("ppo"), "score"), train_rows(out, "score")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b):
        for key in ra:
            if key in skip or key.startswith("time"):
                continue
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["step"], key)
    assert rows_a[-1]["kl_coef"] != rows_a[0]["kl_coef"], "adaptive KL moved (so its state was checkpointed)"
    assert "policy_loss" not in rows_a[0] and "policy_loss" in rows_a[1], "step 1 was critic warm-up only"
    assert rows_a[-1]["ptx_loss"] > 0


def test_gradient_checkpointing_gives_the_same_run(tiny_cfg):
    """Checkpointing is really on during the update (train mode, dropout off) and changes nothing."""
    from stages.ppo import trainer

    common = _base_overrides("ppo.total_episodes=16", "ppo.train.learning_rate=5e-3")
    plain = tiny_cfg(*common, "run_name=plain")
    ckpt = tiny_cfg(*common, "run_name=ckpt", "ppo.train.gradient_checkpointing=true")
    seen = []
    real = trainer.PPOTrainer.update

    def update(self, rollout):
        layers = [m for m in self.actor.modules() if hasattr(m, "gradient_checkpointing")]
        seen.append(self.actor.training and self.critic.training and any(m.gradient_checkpointing for m in layers))
        return real(self, rollout)

    trainer.run(plain)
    trainer.PPOTrainer.update = update
    try:
        trainer.run(ckpt)
    finally:
        trainer.PPOTrainer.update = real
    assert seen and all(seen), "gradient checkpointing must be active (train mode) during the update"
    a, b = saved_weights(plain.stage_dir("ppo") / "model"), saved_weights(ckpt.stage_dir("ppo") / "model")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------- failure modes
def test_nan_loss_stops_with_the_batch_saved(tiny_cfg, monkeypatch):
    from stages.ppo import trainer, update

    real = update.clipped_policy_loss

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(update, "clipped_policy_loss", poisoned)
    cfg = tiny_cfg(*_base_overrides("ppo.total_episodes=32"))
    with pytest.raises(FloatingPointError, match="non-finite loss.*saved to"):
        trainer.run(cfg)
    saved = list(cfg.stage_dir("ppo").glob("nan_batch_step0_rank0.pt"))
    assert saved, "the offending batch is saved in the stage folder"
    batch = torch.load(saved[0], weights_only=False)
    assert batch["input_ids"].shape[0] == 8 and "advantages" in batch and batch["texts"]
    manifest = json.loads((cfg.stage_dir("ppo") / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "non-finite" in manifest["error"]


def test_nan_reward_is_refused_with_the_source_named(tiny_cfg):
    from stages.ppo import trainer

    cfg = tiny_cfg("stages=[ppo]", "ppo.policy_from=base", "ppo.total_episodes=16",
                   "ppo.rewards=[{kind: function, function: 'tests.test_ppo:nan_reward'}]")
    with pytest.raises(FloatingPointError, match="nan_reward"):
        trainer.run(cfg)


def nan_reward(prompts, responses, references):
    """A broken reward function (used by the test above)."""
    return [float("nan")] * len(responses)


def test_exploding_ratio_minibatches_are_skipped_and_counted(tiny_cfg):
    from stages.ppo import trainer

    cfg = tiny_cfg(*_base_overrides("ppo.total_episodes=32", "ppo.ppo_epochs=4", "ppo.train.learning_rate=2e-2",
                                    "ppo.ratio_skip_threshold=1.05", "ppo.kl_in_loss=true", "ppo.kl_estimator=k3"))
    trainer.run(cfg)
    rows = train_rows(cfg.stage_dir("ppo"), "score")
    assert all(r["non_score_reward"] == 0 and "kl_loss" in r and r["kl"] >= 0 for r in rows), "k3 KL in the loss"
    total = 2 * 4 * 2  # steps x epochs x minibatches
    skipped = sum(r["skipped_minibatches"] for r in rows)
    assert 0 < skipped < total, skipped
    assert max(r["ratio_max"] for r in rows) > 1.05


def judge_score(prompt, response):
    """A rule-based judge for the test below: longer responses score higher (1..10)."""
    return 1 + min(9, len(response) // 4)


def test_judge_reward_source_composes_with_a_function(tiny_cfg):
    from stages.ppo import trainer

    cfg = tiny_cfg("stages=[ppo]", "ppo.policy_from=base", "ppo.total_episodes=16",
                   "rlaif.judges={rule: {kind: function, function: 'tests.test_ppo:judge_score'}}",
                   "ppo.rewards=[{kind: judge, judge: rule, weight: 0.5}, "
                   "{kind: function, function: 'stages.ppo.rewards:digit_fraction', weight: 2}]")
    trainer.run(cfg)
    row = train_rows(cfg.stage_dir("ppo"), "score")[0]
    assert 1 <= row["score/judge_rule"] <= 10
    assert row["score"] == pytest.approx(0.5 * row["score/judge_rule"] + 2 * row["score/digit_fraction"], rel=1e-5)


def test_full_chain_sft_rm_ppo_defaults(tiny_cfg):
    """Policy and reference from the SFT stage, reward model and critic from the RM stage (manifests,
    fingerprint check), as configs/tiny.yaml runs them."""
    from stages import run_stage

    cfg = tiny_cfg("ppo.total_episodes=32")
    for stage in ("sft", "rm"):
        run_stage(stage, cfg)
    metrics = run_stage("ppo", cfg)
    manifest = json.loads((cfg.stage_dir("ppo") / "manifest.json").read_text())
    assert set(manifest["parents"]) == {"sft", "rm"}
    assert manifest["chat_fingerprint"] == json.loads((cfg.stage_dir("sft") / "manifest.json").read_text())[
        "chat_fingerprint"]
    assert manifest["critic_source"].endswith("rm") and manifest["reward_sources"] == ["rm"]
    assert metrics["steps"] == 2 and (cfg.stage_dir("ppo") / "model" / "model.safetensors").exists()


# ------------------------------------------------- sample from exactly the policy that is optimised
@contextmanager
def _ppo_trainer(tiny_cfg, *overrides):
    """A PPOTrainer on the tiny base model (function reward) inside its StageRun."""
    from pipeline.stage import StageRun
    from stages.engine import init_distributed
    from stages.ppo.trainer import PPOTrainer

    cfg = tiny_cfg(*_base_overrides(*overrides))
    with StageRun(cfg, "ppo") as run:
        yield PPOTrainer(cfg, run, init_distributed())


def test_sampling_filters_and_k1_kl_loss_are_refused(tiny_cfg):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="ppo.top_k=5 is refused"):
        tiny_cfg("ppo.top_k=5")
    with pytest.raises(ConfigError, match="ppo.top_p=0.9 is refused"):
        tiny_cfg("ppo.top_p=0.9")
    with pytest.raises(ConfigError, match="kl_in_loss=true with ppo.kl_estimator='k1' is refused"):
        tiny_cfg("ppo.kl_in_loss=true")
    assert tiny_cfg("ppo.kl_in_loss=true", "ppo.kl_estimator=k2").ppo.kl_estimator == "k2"


@pytest.mark.gpu
def test_first_minibatch_ratio_is_one_in_fp32(tiny_cfg, monkeypatch):
    """One PPO epoch, dropout off: the first minibatch sees the policy that sampled the rollout."""
    from stages.ppo import trainer, update

    seen = []
    real = update.clipped_policy_loss

    def record(logp, old_logp, advantages, mask, *args, **kwargs):
        seen.append((logp.detach().clone(), old_logp.clone(), mask.clone()))
        return real(logp, old_logp, advantages, mask, *args, **kwargs)

    monkeypatch.setattr(update, "clipped_policy_loss", record)
    trainer.run(tiny_cfg(*_base_overrides("ppo.total_episodes=16", "ppo.ppo_epochs=1", "ppo.train.precision=fp32",
                                          "ppo.train.learning_rate=1e-2")))
    logp, old_logp, mask = seen[0]
    assert logp.dtype == old_logp.dtype == torch.float32
    ratio = torch.exp(logp - old_logp)[mask.bool()]
    assert (ratio - 1).abs().max() < 1e-5, float((ratio - 1).abs().max())
    later = torch.exp(seen[-1][0] - seen[-1][1])[seen[-1][2].bool()]
    assert (later - 1).abs().max() > 1e-5, "negative control: after an update the ratio moves"


def test_first_minibatch_ratio_is_one_with_attention_dropout_and_checkpointing(tiny_cfg, tiny_dropout_base,
                                                                              monkeypatch):
    """A model built with attention_dropout=0.5 and gradient checkpointing (the update passes run in train
    mode): the attention modules copied the probability at construction, and dropout is turned off there
    too, so the first minibatch's ratio is 1. Negative control: turning it off only in nn.Dropout modules and
    the config (after the model was built) leaves the attention dropout on and the ratio far from 1."""
    from stages.ppo import setup, trainer, update

    def first_ratio(name: str) -> torch.Tensor:
        seen = []
        real = update.clipped_policy_loss

        def record(logp, old_logp, advantages, mask, *args, **kwargs):
            seen.append(torch.exp(logp.detach() - old_logp)[mask.bool()])
            return real(logp, old_logp, advantages, mask, *args, **kwargs)

        monkeypatch.setattr(update, "clipped_policy_loss", record)
        trainer.run(tiny_cfg(*_base_overrides(*tiny_dropout_base(0.5), f"run_name={name}", "ppo.total_episodes=16",
                                              "ppo.ppo_epochs=1", "ppo.train.precision=fp32",
                                              "ppo.train.gradient_checkpointing=true")))
        monkeypatch.setattr(update, "clipped_policy_loss", real)
        return seen[0]

    ratio = first_ratio("dropout-off")
    assert (ratio - 1).abs().max() < 1e-5, float((ratio - 1).abs().max())

    def modules_and_config_only(model):
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model.config.attention_dropout = 0.0
        return model

    monkeypatch.setattr(setup, "disable_dropout", modules_and_config_only)
    assert (first_ratio("config-only") - 1).abs().max() > 1e-2


def test_left_padded_logprobs_and_values_equal_unpadded_rows(tiny_cfg):
    from stages.ppo.core import logprobs_from_logits

    with _ppo_trainer(tiny_cfg, "ppo.train.precision=fp32") as tr:
        prompts = sorted(tr.prompts[:6], key=lambda x: len(x.ids))[::2]  # three lengths
        assert len({len(x.ids) for x in prompts}) > 1
        query, query_mask, response, mask, _ = tr.generate([x.ids for x in prompts], [0, 1, 2], stream=0)
        assert (query_mask == 0).any(), "the batch is left-padded"
        T = response.size(1)
        ids, att = torch.cat([query, response], 1), torch.cat([query_mask, mask], 1)
        with torch.no_grad():
            logp = logprobs_from_logits(tr.policy_logits(tr.actor, ids, att, T), response)
            values = tr.critic_values(tr.critic, ids, att, T)
            for i, prompt in enumerate(prompts):
                n = int(mask[i].sum())
                alone = torch.tensor([prompt.ids + response[i, :n].tolist()])
                ones = torch.ones_like(alone)
                logp_1 = logprobs_from_logits(tr.policy_logits(tr.actor, alone, ones, n), response[i:i + 1, :n])
                torch.testing.assert_close(logp[i, :n], logp_1[0], rtol=0, atol=1e-5)
                torch.testing.assert_close(values[i, :n], tr.critic_values(tr.critic, alone, ones, n)[0],
                                           rtol=0, atol=1e-5)


def test_truncated_response_has_no_eos_and_gets_the_missing_eos_penalty(tiny_cfg):
    with _ppo_trainer(tiny_cfg, "ppo.max_new_tokens=4", "ppo.missing_eos_penalty=2.0") as tr:
        rollout = tr.make_rollout(0, {})
    eos = tr.tokenizer.eos_token_id
    cut = ~rollout.has_eos
    assert cut.any(), "a random tiny model rarely says eos within 4 tokens"
    assert rollout.response_ids.size(1) == 4 and rollout.response_mask[cut].sum(1).eq(4).all()
    assert not (rollout.response_ids[cut] == eos).any()
    torch.testing.assert_close(rollout.reward[cut], rollout.score[cut] - 2.0)
    torch.testing.assert_close(rollout.reward[~cut], rollout.score[~cut])


def test_checkpoint_generation_config_does_not_change_sampling(tiny_cfg):
    """A checkpoint shipping repetition_penalty / top_k / temperature (as Qwen2.5 Instruct does) samples
    exactly as one without; the plain ``generate`` call it replaced does pick them up (negative control)."""
    from transformers import GenerationConfig, LogitsProcessorList

    from stages.batching import left_pad
    from stages.generation import neutral_generate, neutral_generation_config
    from stages.ppo.rollout import EpisodeSampler, episode_uniforms

    with _ppo_trainer(tiny_cfg) as tr:
        prompt_ids, positions = [x.ids for x in tr.prompts[:8]], list(range(8))
        plain = tr.generate(prompt_ids, positions, stream=0)[2]
        tr.actor.generation_config = GenerationConfig(
            do_sample=True, repetition_penalty=1.5, top_k=5, temperature=0.3, no_repeat_ngram_size=2,
            pad_token_id=tr.tokenizer.pad_token_id, eos_token_id=tr.tokenizer.eos_token_id)
        shipped = tr.generate(prompt_ids, positions, stream=0)[2]
        assert torch.equal(plain, shipped)
        assert tr.actor.generation_config.repetition_penalty == 1.5, "the checkpoint's own config stays"

        tok, p = tr.tokenizer, tr.cfg.ppo
        query, query_mask = left_pad(prompt_ids, tok.pad_token_id)
        sampler = EpisodeSampler(episode_uniforms(p.train.seed, 0, positions, p.max_new_tokens), query.size(1),
                                 p.temperature, p.top_k, p.top_p)
        old_cfg = GenerationConfig(max_new_tokens=p.max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            leaked = tr.actor.generate(input_ids=query, attention_mask=query_mask, generation_config=old_cfg,
                                       logits_processor=LogitsProcessorList([sampler]))[:, query.size(1):]
        n = min(leaked.size(1), plain.size(1))
        assert not torch.equal(leaked[:, :n], plain[:, :n]), "negative control: plain generate merges them"

        # greedy (the report) and plain sampling (RLAIF labels) through the same helper
        for kw in ({}, {"do_sample": True, "temperature": 0.7}):
            outs = []
            for shipped_cfg in (GenerationConfig(), tr.actor.generation_config):
                tr.actor.generation_config = shipped_cfg
                torch.manual_seed(0)
                with torch.no_grad():
                    outs.append(neutral_generate(tr.actor, neutral_generation_config(tok, 8, **kw),
                                                 input_ids=query, attention_mask=query_mask))
            assert torch.equal(outs[0], outs[1]), kw


@pytest.mark.gpu
def test_bf16_heads_run_in_fp32_and_the_reference_matches_the_actor(tiny_cfg):
    """ppo.train.precision=bf16 (autocast on CPU too): the lm_head, value head and RM score head compute in
    fp32 from their (bf16) inputs; the separate reference gives the actor's log-probs at step 0."""
    from pipeline.models import load_model
    from stages.ppo.trainer import head_in_fp32
    from stages.scoring import find_score_head, token_scores

    def fp32_reference(head):
        seen = {}

        def hook(module, args, output):
            seen["in"], seen["out"] = args[0], output
        return seen, head.register_forward_hook(hook)

    with _ppo_trainer(tiny_cfg, "ppo.train.precision=bf16") as tr:
        assert tr.bf16 and tr.ref is not None
        rollout = tr.make_rollout(0, {})
        m = rollout.response_mask.bool()
        assert rollout.old_logp.dtype == rollout.ref_logp.dtype == rollout.old_values.dtype == torch.float32
        assert torch.equal(rollout.old_logp, rollout.ref_logp) and rollout.kl.eq(0).all(), \
            "reference = actor numerics at step 0"
        v = rollout.old_values[m]
        assert (v != v.bfloat16().float()).any(), "values are not rounded to bf16"
        ids, att = rollout.sequences(slice(0, 4))
        T = rollout.response_ids.size(1)
        for head, run in ((tr.actor.get_output_embeddings(), lambda: tr.policy_logits(tr.actor, ids, att, T)),
                          (tr.critic.score, lambda: tr.critic_values(tr.critic, ids, att, T))):
            seen, handle = fp32_reference(head)
            with torch.no_grad():
                run()
            handle.remove()
            expected = torch.nn.functional.linear(seen["in"].float(), head.weight.float(),
                                                  None if head.bias is None else head.bias.float())
            assert seen["out"].dtype == torch.float32 and torch.equal(seen["out"], expected)
            with torch.no_grad(), tr._autocast():  # negative control: a plain head under autocast rounds
                assert torch.nn.Linear.forward(head, seen["in"]).dtype == torch.bfloat16
        # the RM's score head, as PPO sets it up (bf16 weights on CUDA: upcast per call)
        rm = load_model(tr.base_path, tr.cfg.model, tr.tokenizer, kind="seq_cls").eval().to(torch.bfloat16)
        head_in_fp32(find_score_head(rm))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            scores = token_scores(rm, ids, att)
        assert scores.dtype == torch.float32 and (scores != scores.bfloat16().float()).any()


def test_actor_lr_schedule_skips_critic_warmup_and_manifest_has_run_throughput(tiny_cfg):
    from stages.ppo import trainer

    cfg = tiny_cfg(*_base_overrides("ppo.total_episodes=64", "ppo.critic_warmup_steps=2",
                                    "ppo.train.lr_scheduler=linear", "ppo.train.learning_rate=1e-3",
                                    "ppo.train.save_steps=1000"))
    metrics = trainer.run(cfg)
    rows = train_rows(cfg.stage_dir("ppo"), "score")
    # 4 steps x 2 minibatches: the critic's linear schedule spans 8 optimizer steps (rate 1 - k/8 at its
    # k-th), the actor's only the 4 after the 2 warm-up steps (1 - k/4). A row logs the rate its step's
    # update began with: the actor's k = 0 until it first steps in step 3, then k = 2; the critic's k = 0,
    # 2, 4, 6. The last step's rate is not 0 (the schedules reach 0 only after it).
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4])
    assert [r["critic_lr"] for r in rows] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    manifest = json.loads((cfg.stage_dir("ppo") / "manifest.json").read_text())["metrics"]
    assert manifest == metrics
    assert metrics["load_seconds"] > 0 and metrics["train_seconds"] > 0
    assert metrics["episodes_per_s_mean"] == pytest.approx(64 / metrics["train_seconds"])
    tokens = sum(r["response_length"] * 16 for r in rows)
    assert metrics["response_tokens_per_s_mean"] == pytest.approx(tokens / metrics["train_seconds"])


# --------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_OVERRIDES = _base_overrides(
    "ppo.total_episodes=16", "ppo.ppo_epochs=2", "ppo.train.learning_rate=1e-3", "ppo.train.precision=fp32",
    "ppo.train.save_steps=1000", "ppo.adaptive_kl=true")


def _launch(tmp_path: Path, tag: str, extra: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(Path(__file__).resolve()), "--worker", str(tmp_path / tag), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))


@pytest.mark.distributed
def test_two_process_deepspeed_zero2_matches_one_process(tiny_cfg, tmp_path):
    """torchrun x2, DeepSpeed ZeRO-2 on CPU/gloo: both ranks are DeepSpeed engines in a world of 2, see
    different prompts, end with identical parameters equal to a 1-process run on the same global batch;
    an unsynchronised run (each rank alone) fails the same check (negative control)."""
    from stages.ppo import trainer

    proc = _launch(tmp_path, "ds", ["ppo.train.deepspeed=configs/deepspeed/zero2.json", "ppo.episodes_per_rollout=4",
                                    "ppo.mini_batch_size=4"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    info = [json.loads((tmp_path / "ds" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(i["world_size"] == 2 and i["engine"] == "DeepSpeedEngine" for i in info), info
    assert all(i["zero_stage"] == 2 for i in info)
    assert set(info[0]["prompts"]).isdisjoint(info[1]["prompts"]), "ranks see different prompts"
    ranks = [torch.load(tmp_path / "ds" / f"params-rank{r}.pt") for r in (0, 1)]

    def identical(x: dict, y: dict, atol: float) -> bool:
        return x.keys() == y.keys() and all(torch.allclose(x[k], y[k], rtol=0, atol=atol) for k in x)

    assert identical(ranks[0], ranks[1], 0.0), "ranks diverged"
    # one process, same global batch (8), same minibatch (8) split into 2 micro-batches of 4
    one = tiny_cfg(*DIST_OVERRIDES, "run_name=one", "ppo.episodes_per_rollout=8", "ppo.mini_batch_size=8",
                   "ppo.gradient_accumulation_steps=2")
    trainer.run(one)
    single = {k: v.float() for k, v in saved_weights(one.stage_dir("ppo") / "model").items()}
    assert set(info[0]["prompts"]) | set(info[1]["prompts"]) == set(_one_process_prompts(one))
    diffs = {k: float((ranks[0][k] - single[k]).abs().max()) for k in single}
    # rounding differs (micro-batch grouping, all-reduce order) and Adam amplifies it on tiny gradients
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    # the same episodes were sampled: per-step metrics agree
    rows_ds = train_rows(tmp_path / "ds" / "run" / "tiny" / "ppo", "score")
    rows_one = train_rows(one.stage_dir("ppo"), "score")
    for a, b in zip(rows_ds, rows_one):
        for key in ("score", "response_length", "eos_rate", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key, a[key], b[key])

    # negative control: two ranks that never synchronise (each thinks it is alone, own data shard)
    proc = _launch(tmp_path, "unsync", ["--unsync", "ppo.episodes_per_rollout=4", "ppo.mini_batch_size=4"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    bad = [torch.load(tmp_path / "unsync" / f"params-rank{r}.pt") for r in (0, 1)]
    assert not identical(bad[0], bad[1], 1e-5), "the check must catch unsynchronised ranks"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_deepspeed_resume_equals_uninterrupted(tmp_path):
    """DeepSpeed checkpoints (both engines + per-rank client state): kill after the step-1 checkpoint,
    relaunch, and the final weights equal an uninterrupted two-process run."""
    args = ["ppo.train.deepspeed=configs/deepspeed/zero2.json", "ppo.episodes_per_rollout=4", "ppo.mini_batch_size=4",
            "ppo.train.save_steps=1", "ppo.total_episodes=24"]
    proc = _launch(tmp_path, "straight", args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    proc = _launch(tmp_path, "resumed", [*args, "--kill-at=1"])
    assert proc.returncode != 0 and "simulated kill" in proc.stdout + proc.stderr
    stage = tmp_path / "resumed" / "run" / "tiny" / "ppo"
    assert (stage / "checkpoints" / "latest").read_text() == "step-1"
    # DeepSpeed's own engine folders plus our per-rank state as JSON + safetensors (no pickle) and the index
    assert {p.name for p in (stage / "checkpoints" / "step-1").iterdir()} >= {
        "actor", "critic", "index.json", "client-rank0.json", "client-rank0.safetensors", "client-rank1.json",
        "client-rank1.safetensors"}
    proc = _launch(tmp_path, "resumed", args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert json.loads((stage / "manifest.json").read_text())["resumed"] is True
    a = torch.load(tmp_path / "straight" / "params-rank0.pt")
    b = torch.load(tmp_path / "resumed" / "params-rank0.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7, msg=name)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_deepspeed_zero3_generates_and_saves_gathered_weights(tiny_cfg, tmp_path):
    """ZeRO-3: generation runs on partitioned weights (gathered layer by layer, ranks kept in step) and
    the saved policy is the gathered full model, equal to a 1-process run on the same global batch."""
    from stages.ppo import trainer

    proc = _launch(tmp_path, "z3", ["ppo.train.deepspeed=configs/deepspeed/zero3.json", "ppo.episodes_per_rollout=4",
                                    "ppo.mini_batch_size=4"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    info = [json.loads((tmp_path / "z3" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(i["world_size"] == 2 and i["zero_stage"] == 3 and i["engine"] == "DeepSpeedEngine" for i in info)
    one = tiny_cfg(*DIST_OVERRIDES, "run_name=one", "ppo.episodes_per_rollout=8", "ppo.mini_batch_size=8",
                   "ppo.gradient_accumulation_steps=2")
    trainer.run(one)
    single = saved_weights(one.stage_dir("ppo") / "model")
    saved = saved_weights(tmp_path / "z3" / "run" / "tiny" / "ppo" / "model")
    assert saved.keys() == single.keys() and all(v.numel() for v in saved.values()), "full (gathered) tensors"
    diffs = {k: float((saved[k].float() - single[k].float()).abs().max()) for k in single}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]


def _one_process_prompts(cfg) -> list[int]:
    """Dataset indices a 1-process run with cfg uses at steps 0 and 1."""
    from data.formats import load_examples
    from stages.engine import epoch_order

    n = len(load_examples(cfg.ppo.data, "prompt")[0])
    batches = epoch_order(n, 0, cfg.ppo.train.seed, 0, 1, cfg.ppo.episodes_per_rollout)
    return batches[0] + batches[1]


def _worker(argv: list[str]) -> None:
    """Entry of each torchrun rank: run PPO, dump world info, prompts seen and final parameters."""
    out = Path(argv[0])
    unsync = "--unsync" in argv
    kill_at = next((int(a.split("=")[1]) for a in argv if a.startswith("--kill-at=")), None)
    overrides = [a for a in argv[1:] if not a.startswith("--")]
    torch.set_num_threads(1)
    from pipeline.config import load_config
    from pipeline.stage import StageRun
    from stages.engine import init_distributed
    from stages.ppo.trainer import PPOTrainer

    rank = int(os.environ["RANK"])
    kill = None
    if kill_at is not None:
        def kill(step: int) -> None:
            if step == kill_at:
                raise RuntimeError(f"simulated kill after step {step}")
    if unsync:  # the classic silent failure: every process believes it is alone
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(key)
        overrides.append(f"ppo.train.seed={rank}")
    root = out / (f"alone{rank}" if unsync else "run")
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"output_root={root}", "logging.progress_bar=false", *DIST_OVERRIDES, *overrides])
    dist = init_distributed()
    with StageRun(cfg, "ppo", is_main=dist.is_main) as run:
        tr = PPOTrainer(cfg, run, dist, on_step_end=kill)
        prompts = tr.step_prompts(0)[0] + tr.step_prompts(1)[0]
        tr.train()
        params = {n: p.detach().float().clone() for n, p in tr.actor.named_parameters()}
        info = {"world_size": dist.world_size if not unsync else 1, "rank": rank,
                "engine": type(tr.actor_engine).__name__ if tr.actor_engine is not None else None,
                "zero_stage": tr.zero_stage, "prompts": prompts}
        out.mkdir(parents=True, exist_ok=True)
        torch.save(params, out / f"params-rank{rank}.pt")
        (out / f"rank{rank}.json").write_text(json.dumps(info))
        tr.save_policy()
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--worker":
    _worker(sys.argv[2:])
