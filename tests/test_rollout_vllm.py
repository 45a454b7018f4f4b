"""The vLLM rollout backend against the hf reference, with the real engine (``make vllm-env``; skipped when
the vLLM environment is absent; marker ``vllm``).

- greedy generations of hf and vllm agree (token ids) on the tiny model and on SmolLM2-135M-Instruct;
- seeded sampling is reproducible (same seeds, same samples; other seeds, other samples);
- after a PPO update and a weight sync, vLLM's greedy output equals the updated HF policy's (full
  fine-tuning: weights reloaded in place; LoRA: the adapter hot-loaded).

The tiny model here has head_dim 32 (``model.tiny.num_heads=2``): vLLM's CPU attention has no kernel for
the default tiny model's head_dim 16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers.common import read_jsonl

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("ALIGNPIPE_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
# `make vllm-env` writes .installed last: a half-built environment (a failed install) counts as absent
VLLM_READY = VLLM_PYTHON.exists() and ("ALIGNPIPE_VLLM_PYTHON" in os.environ
                                       or (REPO / ".venv-vllm" / ".installed").exists())
TINY32 = ["model.tiny.num_heads=2", "model.tiny.num_kv_heads=1"]
DIGITS = "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction', weight: 10}]"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not VLLM_READY,
                       reason=f"no (complete) vLLM environment at {VLLM_PYTHON}: run `make vllm-env` (or set "
                              "ALIGNPIPE_VLLM_PYTHON) to run the vLLM backend tests"),
]


def _prompts(tok, n: int) -> list[list[int]]:
    from data.formats import load_examples
    from pipeline.config import DataSource
    from stages.chat import prompt_ids

    examples, _ = load_examples(DataSource(path="data/demo/prompts.jsonl", max_records=n), "prompt")
    return [prompt_ids(tok, ex.prompt, None) for ex in examples]


def _ids(groups) -> list[list[int]]:
    return [group[0].token_ids for group in groups]


def _comparable(groups, pad_id: int) -> list[list[int]]:
    """Token ids as the hf backend reports them: it drops pad ids from a row without eos (the rule the stages
    always had: ``generate`` pads finished rows), the vllm backend returns exactly what was sampled (a random
    tiny model does sample its pad id now and then)."""
    return [g.token_ids if g.finished else [t for t in g.token_ids if t != pad_id] for g in (grp[0] for grp in groups)]


def _vcfg(**kw):
    from pipeline.config import VLLMRolloutConfig

    return VLLMRolloutConfig(python=str(VLLM_PYTHON), dtype="float32", **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, tokenizer, HF model, vLLM backend on the same tiny model) for the module."""
    from pipeline.config import load_config
    from pipeline.models import load_model, load_tokenizer, prepare_base
    from stages.rollout_backend.vllm_client import VLLMBackend

    cfg = load_config(REPO / "configs" / "tiny.yaml", TINY32)
    base = prepare_base(cfg.model)
    tok = load_tokenizer(base, cfg.model, cfg.chat)
    model = load_model(base, cfg.model, tok).eval()
    backend = VLLMBackend(_vcfg(), base, tok, tmp_path_factory.mktemp("vllm"), max_model_len=256)
    yield cfg, tok, model, backend
    backend.close()


def test_greedy_tiny_hf_and_vllm_agree(tiny):
    from stages.rollout_backend import HFBackend, Sampling

    cfg, tok, model, backend = tiny
    prompts = _prompts(tok, 24)
    greedy = Sampling(max_new_tokens=24, temperature=0, logprobs=True)
    hf = _ids(HFBackend(model, tok, torch.device("cpu"), batch_size=8).generate(prompts, greedy))
    out = backend.generate(prompts, greedy)
    assert _comparable(out, tok.pad_token_id) == hf
    for group in out:  # engine log-probs come back, one per token (diagnostics only)
        assert len(group[0].logprobs) == len(group[0].token_ids) and all(x <= 0 for x in group[0].logprobs)


def test_seeded_sampling_is_reproducible(tiny):
    from stages.rollout_backend import Sampling

    _, tok, _, backend = tiny
    prompts = _prompts(tok, 6)
    first = backend.generate(prompts, Sampling(max_new_tokens=16, temperature=1.0, n=2, seed=11))
    again = backend.generate(prompts, Sampling(max_new_tokens=16, temperature=1.0, n=2, seed=11))
    other = backend.generate(prompts, Sampling(max_new_tokens=16, temperature=1.0, n=2, seed=12))
    assert [[g.token_ids for g in grp] for grp in first] == [[g.token_ids for g in grp] for grp in again]
    assert [[g.token_ids for g in grp] for grp in first] != [[g.token_ids for g in grp] for grp in other]
    assert any(grp[0].token_ids != grp[1].token_ids for grp in first), "the n samples of a prompt differ"
    # a prompt's stream does not depend on the batch it shares (PPO's episode seeds)
    seeds = [101, 202, 303, 404, 505, 606]
    together = _ids(backend.generate(prompts, Sampling(max_new_tokens=16, prompt_seeds=seeds)))
    alone = _ids(backend.generate(prompts[2:3], Sampling(max_new_tokens=16, prompt_seeds=seeds[2:3])))
    assert alone[0] == together[2]


def test_distill_greedy_answers_are_the_same_with_hf_and_vllm(tiny, tiny_cfg):
    """The distill stage with an hf teacher (the base model) answers greedily: the same answers either way."""
    from stages import run_stage

    _, _, _, backend = tiny
    common = [*TINY32, "stages=[distill]", "distill.data={path: data/demo/prompts.jsonl, max_records: 8}",
              "distill.max_new_tokens=12", "distill.batch_size=4", "distill.num_threads=1", "distill.cache=false"]
    hf_cfg = tiny_cfg(*common, "run_name=distill-hf")
    vllm_cfg = tiny_cfg(*common, "run_name=distill-vllm", "rollout.backend=vllm",
                        f"rollout.vllm.base_url={backend.base_url}", f"rollout.vllm.python={VLLM_PYTHON}")
    run_stage("distill", hf_cfg)
    run_stage("distill", vllm_cfg)
    hf = [r["messages"] for r in read_jsonl(hf_cfg.stage_dir("distill") / "data.jsonl")]
    vllm = [r["messages"] for r in read_jsonl(vllm_cfg.stage_dir("distill") / "data.jsonl")]
    assert hf and vllm == hf


def test_best_of_n_and_rlaif_label_sample_through_the_engine(tiny, tiny_cfg):
    """Both stages run with rollout.backend=vllm, and every response they keep is one of the engine's samples
    for the stage's seed (so the samples are the backend's, reproducible, not HF's)."""
    from pipeline.models import load_tokenizer, prepare_base
    from stages import run_stage
    from stages.chat import prompt_ids
    from stages.rollout_backend import Sampling

    _, _, _, backend = tiny
    engine = ["rollout.backend=vllm", f"rollout.vllm.base_url={backend.base_url}",
              f"rollout.vllm.python={VLLM_PYTHON}"]
    bon = tiny_cfg(*TINY32, *engine, "stages=[best_of_n]", "best_of_n.policy_from=base",
                   "best_of_n.data={path: data/demo/prompts.jsonl, max_records: 6}", "best_of_n.n=3",
                   "best_of_n.max_new_tokens=12", "best_of_n.require_eos=false", "best_of_n.seed=4",
                   "best_of_n.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction'}]")
    run_stage("best_of_n", bon)
    base = prepare_base(bon.model)
    tok = load_tokenizer(base, bon.model, bon.chat)
    rows = read_jsonl(bon.stage_dir("best_of_n") / "data.jsonl")
    assert len(rows) == 6  # every prompt kept, in order: the stage asked for all 6 in one call
    prompts = [prompt_ids(tok, r["messages"][:-1], bon.chat.system_prompt) for r in rows]
    for r, samples in zip(rows, backend.generate(prompts, Sampling(12, 1.0, n=3, seed=4))):
        assert r["messages"][-1]["content"] == tok.decode(samples[r["best_index"]].token_ids,
                                                          skip_special_tokens=True).strip()

    label = tiny_cfg(*TINY32, *engine, "stages=[rlaif_label]", "rlaif_label.data={path: data/demo/prompts.jsonl, "
                     "max_records: 6}", "rlaif_label.num_responses=3", "rlaif_label.max_new_tokens=12")
    run_stage("rlaif_label", label)
    prefs = read_jsonl(label.stage_dir("rlaif_label") / "preferences.jsonl")
    assert prefs
    prompts = [[{"role": "user", "content": row["prompt"]}] for row in read_jsonl(REPO / "data/demo/prompts.jsonl")[:6]]
    groups = backend.generate([prompt_ids(tok, m, label.chat.system_prompt) for m in prompts],
                              Sampling(12, label.rlaif_label.temperature, n=3, seed=label.rlaif_label.seed))
    texts = {json.dumps(m): {tok.decode(g.token_ids[:-1] if g.finished else g.token_ids,
                                        skip_special_tokens=True).strip() for g in group}
             for m, group in zip(prompts, groups)}
    for r in prefs:
        assert {r["chosen"], r["rejected"]} <= texts[json.dumps(r["prompt"])]


def _ppo_step_then_compare(cfg, tok, vllm_backend_of, n_prompts: int = 12) -> None:
    """One PPO step with rollouts from vLLM, then: the engine, synced, answers greedily as the updated actor."""
    from pipeline.stage import StageRun
    from stages.engine import init_distributed
    from stages.ppo.trainer import PPOTrainer
    from stages.rollout_backend import HFBackend, Sampling

    with StageRun(cfg, "ppo") as run:
        tr = PPOTrainer(cfg, run, init_distributed())
        try:
            engine = vllm_backend_of(tr)
            start = {n: p.detach().clone() for n, p in tr.actor.named_parameters() if p.requires_grad}
            row, rollout = tr._ppo_step()
            assert rollout.response_ids.shape == rollout.old_logp.shape and torch.isfinite(rollout.old_logp).all()
            # the engine's log-probs of its own samples agree with the trainer's forward pass (fp32 both)
            assert row["rollout_engine_logp_diff"] < 1e-3, row["rollout_engine_logp_diff"]
            moved = max(float((p.detach() - start[n]).abs().max()) for n, p in tr.actor.named_parameters()
                        if p.requires_grad)
            assert moved > 0, "the update changed the actor"
            assert tr.engine_stale
            tok = tok or tr.tokenizer
            prompts = [p.ids for p in tr.prompts[:n_prompts]]
            greedy = Sampling(max_new_tokens=16, temperature=0)
            before_sync = _comparable(engine.generate(prompts, greedy), tok.pad_token_id)
            engine.sync_weights(tr.actor)
            after_sync = _comparable(engine.generate(prompts, greedy), tok.pad_token_id)
            hf = _ids(HFBackend(tr.actor, tok, torch.device("cpu"), batch_size=4).generate(prompts, greedy))
            assert after_sync == hf
            print(f"greedy rows changed by the update: {sum(a != b for a, b in zip(before_sync, after_sync))} of "
                  f"{len(prompts)}; max |weight change| {moved:.3g}; engine vs trainer log-prob "
                  f"{row['rollout_engine_logp_diff']:.2e}")
        finally:
            tr.close_rollout_engine()
        run.manifest["metrics"] = {}


def test_ppo_update_then_sync_full_weights_equals_hf(tiny, tiny_cfg):
    """Full fine-tuning: the PPO trainer talks to the module's worker (base_url), syncs the weights in place."""
    _, tok, _, backend = tiny
    cfg = tiny_cfg(*TINY32, "stages=[ppo]", "ppo.policy_from=base", DIGITS, "ppo.episodes_per_rollout=8",
                   "ppo.mini_batch_size=8", "ppo.train.learning_rate=3e-3", "rollout.backend=vllm",
                   f"rollout.vllm.base_url={backend.base_url}", f"rollout.vllm.python={VLLM_PYTHON}")
    _ppo_step_then_compare(cfg, tok, lambda tr: tr.rollout_engine)
    backend.sync_weights(tiny[2])  # the module's worker back on the base weights


@pytest.mark.slow
def test_ppo_update_then_sync_lora_adapter_equals_hf(tiny_cfg, tiny):
    """LoRA: the trainer starts its own worker with LoRA on; each sync hot-loads the saved adapter."""
    _, tok, _, _ = tiny
    cfg = tiny_cfg(*TINY32, "stages=[ppo]", "ppo.policy_from=base", DIGITS, "ppo.episodes_per_rollout=8",
                   "ppo.mini_batch_size=8", "ppo.train.learning_rate=3e-2", "ppo.tuning.method=lora",
                   "rollout.backend=vllm", f"rollout.vllm.python={VLLM_PYTHON}", "rollout.vllm.dtype=float32")
    _ppo_step_then_compare(cfg, tok, lambda tr: tr.rollout_engine)


@pytest.mark.slow
def test_smollm2_ppo_step_then_sync_equals_hf(tmp_path):
    """SmolLM2 ties lm_head to the embeddings: after a full fine-tuning PPO step and the in-place sync, vLLM's
    greedy output still equals the updated HF actor's."""
    from pipeline.config import load_config
    from pipeline.models import prepare_base

    try:
        cfg = load_config(REPO / "configs" / "demo.yaml", [
            f"output_root={tmp_path}", "logging.progress_bar=false", "stages=[ppo]", "ppo.policy_from=base",
            "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction'}]", "ppo.eval_data=null",
            "ppo.episodes_per_rollout=4", "ppo.mini_batch_size=4", "ppo.max_new_tokens=8", "ppo.tuning.method=full",
            "ppo.train.learning_rate=1e-4", "ppo.train.save_steps=1000", "rollout.backend=vllm",
            f"rollout.vllm.python={VLLM_PYTHON}", "rollout.vllm.dtype=float32"])
        prepare_base(cfg.model)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"SmolLM2 not available here: {exc}")
    assert json.loads((Path(prepare_base(cfg.model)) / "config.json").read_text())["tie_word_embeddings"]
    _ppo_step_then_compare(cfg, None, lambda tr: tr.rollout_engine, n_prompts=6)


@pytest.mark.slow
def test_greedy_smollm2_hf_and_vllm_agree(tmp_path):
    from pipeline.config import load_config
    from pipeline.models import load_model, load_tokenizer, prepare_base
    from stages.rollout_backend import HFBackend, Sampling
    from stages.rollout_backend.vllm_client import VLLMBackend

    try:
        cfg = load_config(REPO / "configs" / "demo.yaml")
        base = prepare_base(cfg.model)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"SmolLM2 not available here: {exc}")
    tok = load_tokenizer(base, cfg.model, cfg.chat)
    prompts = _prompts(tok, 16)
    greedy = Sampling(max_new_tokens=32, temperature=0)
    model = load_model(base, cfg.model, tok).eval()
    hf = _ids(HFBackend(model, tok, torch.device("cpu"), batch_size=8).generate(prompts, greedy))
    del model
    backend = VLLMBackend(_vcfg(), base, tok, tmp_path, max_model_len=512)
    try:
        out = _comparable(backend.generate(prompts, greedy), tok.pad_token_id)
    finally:
        backend.close()
    same = sum(a == b for a, b in zip(out, hf))
    print(f"SmolLM2 greedy: {same} of {len(prompts)} prompts token-identical")
    assert out == hf


@pytest.mark.slow
@pytest.mark.distributed
def test_two_deepspeed_ranks_with_vllm_rollouts_match_one_process(tiny, tiny_cfg, tmp_path):
    """tests/test_ppo.py's torchrun worker with rollout.backend=vllm: rank 0 alone talks to the engine (gathers
    both ranks' prompts and episode seeds, broadcasts the rows); two ZeRO-2 ranks end with the parameters of
    one process on the same global batch, as with hf rollouts."""
    from stages.ppo import trainer
    from tests.helpers.common import saved_weights
    from tests.test_ppo import DIST_OVERRIDES, _launch

    _, _, model, backend = tiny
    engine = [*TINY32, "rollout.backend=vllm", f"rollout.vllm.base_url={backend.base_url}",
              f"rollout.vllm.python={VLLM_PYTHON}"]
    try:
        proc = _launch(tmp_path, "ds", ["ppo.train.deepspeed=configs/deepspeed/zero2.json",
                                        "ppo.episodes_per_rollout=4", "ppo.mini_batch_size=4", *engine])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        ranks = [torch.load(tmp_path / "ds" / f"params-rank{r}.pt") for r in (0, 1)]
        one = tiny_cfg(*DIST_OVERRIDES, *engine, "run_name=one", "ppo.episodes_per_rollout=8", "ppo.mini_batch_size=8",
                       "ppo.gradient_accumulation_steps=2")
        trainer.run(one)
    finally:
        backend.sync_weights(model)  # the module's worker back on the base weights
    single = {k: v.float() for k, v in saved_weights(one.stage_dir("ppo") / "model").items()}
    for params in ranks:
        diffs = {k: float((params[k] - single[k]).abs().max()) for k in single}
        assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
