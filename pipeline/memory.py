"""Memory planner: per-device bytes a stage will need, checked before anything is launched.

PPO holds four models (DESIGN §5.1), and the usual way to learn that they do not fit is an OOM an hour
into a cluster job. ``estimate(cfg, stage)`` adds up, per device and per model role:

- weights, gradients and optimizer states under the stage's ZeRO stage and offload settings, read
  from its DeepSpeed JSON, at the world size of ``cfg.launch`` (nnodes x nproc_per_node);
- activations for one training micro-batch (rough: the tensors a Llama-style layer keeps for
  backward, plus fp32 logits for the LM loss; DPO's log-softmax over the vocabulary as measured, and its
  reference forward: ``dpo_activations``);
- for PPO and RLAIF labelling, the generation KV cache
  2 * layers * kv_heads * head_dim * (prompt + new tokens) * rollout batch * bytes.

Byte accounting per parameter (the ZeRO paper's, K = optimizer bytes):

=========================  =======  =====  ==========================================
mode                       weights  grads  optimizer (Adam)
=========================  =======  =====  ==========================================
DeepSpeed with bf16        2        2      12  (fp32 master + m + v)
anything else (fp32, or    w        w      2w  (m + v in the parameter dtype, no master;
 torch autocast on fp32)                        w = bytes of model.dtype)
frozen parameters          w        0      0   (QLoRA base: 4.5 bits per parameter)
=========================  =======  =====  ==========================================

ZeRO-1 divides optimizer states by the data-parallel world size N, ZeRO-2 also gradients, ZeRO-3 also
weights (frozen models included). Optimizer offload moves optimizer states to host memory; parameter
offload (ZeRO-3) moves weights there, leaving roughly two layers gathered on the device.

Numbers are estimates: allocator fragmentation, CUDA context and communication buffers are covered by
``check``'s headroom, not itemised.

Measured accuracy (``bench/planner_accuracy.py [CONFIG]``: estimate vs the stage process's RSS growth since the
stage began, CPU; on a GPU ``bench/gpu_check.sh`` compares with torch's max allocated). configs/tiny.yaml: SFT
16.6 MiB planned vs 186 MiB measured (-91%), RM 18.6 vs 224 (-92%), PPO 14.4 vs 189 (-92%): on a model of
~0.1M parameters the runtime's own allocations (imports after the stage starts, tokenizer, data, allocator
arenas) are the whole footprint and the planner does not model them. configs/demo.yaml (SmolLM2-135M, LoRA;
2026-12-01, the bench-quality demo run): SFT 1,952 MiB planned vs 2,871 measured (-32%), RM 2,499 vs 2,968
(-16%), PPO 3,074 vs 4,115 (-25%): it under-estimates, most in SFT (outside the 25% target there), plausibly
the same unmodelled runtime memory (~150-200 MiB on tiny) plus the CPU's fp32 activations and logits.
Target: within 25% for SFT and RM, within 40% for PPO.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from pipeline.config import RunConfig, TuningConfig, resolve_path
from pipeline.paths import output_path

GIB = 1024**3

# Tensors a Llama-style decoder layer keeps for backward, per token, in units of the activation dtype:
# norm in/out (2h), q/k/v (h + 2*kv_dim), attention output and o_proj input (2h), residual (h),
# post-norm in/out (2h), gate, up, act(gate), act*up (4I). Attention itself is assumed SDPA/flash
# (no seq^2 score matrix kept).
_ACT_HIDDEN_FACTOR = 8
_ACT_INTERMEDIATE_FACTOR = 4

# Well-known hub models, so a planner run needs neither the network nor a gated-model token.
# Values are those of each model's config.json.
_KNOWN_MODELS: list[tuple[str, dict[str, Any]]] = [
    (r"llama-?3(\.\d)?-8b", dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                                 vocab_size=128256, num_attention_heads=32, num_key_value_heads=8,
                                 tie_word_embeddings=False)),
    (r"llama-?3(\.\d)?-70b", dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                                  vocab_size=128256, num_attention_heads=64, num_key_value_heads=8,
                                  tie_word_embeddings=False)),
    (r"llama-?3\.2-1b", dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, vocab_size=128256,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                             tie_word_embeddings=True)),
    (r"llama-?3\.2-3b", dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, vocab_size=128256,
                             num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                             tie_word_embeddings=True)),
    (r"llama-2-7b", dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, vocab_size=32000,
                         num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)),
    (r"llama-2-13b", dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, vocab_size=32000,
                          num_attention_heads=40, num_key_value_heads=40, tie_word_embeddings=False)),
    (r"llama-2-70b", dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, vocab_size=32000,
                          num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)),
    (r"mistral-7b", dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, vocab_size=32000,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
]

# Linear projections of a Llama-style layer by their usual module names: (in_features, out_features)
# as functions of the model dims. Aliases cover Mistral/Qwen/Gemma, which use the same names.
_LINEAR_SHAPES: dict[str, Callable[["ModelDims"], tuple[int, int]]] = {
    "q_proj": lambda d: (d.hidden, d.heads * d.head_dim),
    "k_proj": lambda d: (d.hidden, d.kv_heads * d.head_dim),
    "v_proj": lambda d: (d.hidden, d.kv_heads * d.head_dim),
    "o_proj": lambda d: (d.heads * d.head_dim, d.hidden),
    "gate_proj": lambda d: (d.hidden, d.intermediate),
    "up_proj": lambda d: (d.hidden, d.intermediate),
    "down_proj": lambda d: (d.intermediate, d.hidden),
}


class MemoryPlanError(RuntimeError):
    """The plan does not fit the device; the message lists the changes that would fit."""


# ---------------------------------------------------------------------------------------- model dims
@dataclasses.dataclass(frozen=True)
class ModelDims:
    """The architecture numbers the planner needs (Llama-style decoder)."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tie_embeddings: bool = False
    experts: int = 1  # MoE: MLP copies per layer (router weights added separately)
    source: str = "config"

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], source: str) -> "ModelDims":
        """From a transformers config dict (also multimodal ones with a ``text_config``)."""
        if "text_config" in config and isinstance(config["text_config"], dict) and "hidden_size" not in config:
            config = {**config["text_config"], "tie_word_embeddings": config.get("tie_word_embeddings", False)}

        def first(*names: str, default: Any = None) -> Any:
            for name in names:
                if config.get(name) is not None:
                    return config[name]
            if default is None:
                raise ValueError(f"model config ({source}) has none of {names}; pass param_count instead")
            return default

        hidden = int(first("hidden_size", "n_embd", "d_model"))
        heads = int(first("num_attention_heads", "n_head", "num_heads"))
        return cls(
            hidden=hidden,
            layers=int(first("num_hidden_layers", "n_layer", "num_layers")),
            intermediate=int(first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
            vocab=int(first("vocab_size")),
            heads=heads,
            kv_heads=int(first("num_key_value_heads", "num_kv_heads", default=heads)),
            head_dim=int(first("head_dim", default=hidden // heads)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            experts=int(first("num_local_experts", "num_experts", "n_routed_experts", default=1)),
            source=source,
        )

    @classmethod
    def from_param_count(cls, param_count: int) -> "ModelDims":
        """Plausible Llama-like dims for a bare parameter count (used when no config is readable).

        Assumes head_dim 128, layers ~ hidden / 128, intermediate 3.5 x hidden, vocab 32000, so that
        12-ish x layers x hidden^2 + embeddings matches the count; only KV cache, activations and LoRA
        sizes depend on this guess, never the weight/gradient/optimizer bytes.
        """
        vocab = 32000
        hidden = 128
        while True:  # grow until the model built from these dims reaches the count
            layers = max(1, hidden // 128)
            dims = cls(hidden, layers, int(3.5 * hidden), vocab, hidden // 128, hidden // 128, 128,
                       source=f"guessed from param_count={param_count:,}")
            if dims.causal_lm_params() >= param_count or hidden > 65536:
                return dims
            hidden += 128

    def layer_params(self) -> int:
        """Parameters of one decoder layer (no biases: Llama/Mistral have none)."""
        attn = sum(math.prod(_LINEAR_SHAPES[n](self)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        mlp = 3 * self.hidden * self.intermediate * self.experts
        router = self.hidden * self.experts if self.experts > 1 else 0
        return attn + mlp + router + 2 * self.hidden  # two RMSNorm weights

    def causal_lm_params(self) -> int:
        """Embeddings + layers + final norm + LM head (shared with embeddings when tied)."""
        embed = self.vocab * self.hidden
        head = 0 if self.tie_embeddings else self.vocab * self.hidden
        return embed + self.layers * self.layer_params() + self.hidden + head

    def seq_cls_params(self, num_labels: int = 1) -> int:
        """A reward model / critic: the LM head replaced by a ``hidden -> num_labels`` score head."""
        head = 0 if self.tie_embeddings else self.vocab * self.hidden
        return self.causal_lm_params() - head + self.hidden * num_labels


def _config_dict_from_folder(folder: Path) -> dict[str, Any] | None:
    """A folder's config through AutoConfig (class defaults filled in), else its raw config.json."""
    if not (folder / "config.json").exists():
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(folder)).to_dict()
    except Exception:  # custom architectures without trust_remote_code: the raw JSON has the numbers
        return json.loads((folder / "config.json").read_text())


def _known_model(name: str) -> dict[str, Any] | None:
    lowered = name.lower()
    for pattern, dims in _KNOWN_MODELS:
        if re.search(pattern, lowered):
            return dims
    return None


def model_dims(cfg: RunConfig, param_count: int | None = None) -> ModelDims:
    """Dims of the run's base model, without downloading weights.

    tiny: ``cfg.model.tiny``; local: the folder's config; hub: the local HF cache, then a table of
    well-known models, then the hub itself (unless HF_HUB_OFFLINE); gguf: the cached converted
    folder. Where none is available, ``param_count`` gives guessed dims; without it, an error.
    """
    model = cfg.model
    if model.source == "tiny":
        t = model.tiny
        return ModelDims(t.hidden_size, t.num_layers, t.intermediate_size, t.vocab_size, t.num_heads,
                         t.num_kv_heads, t.hidden_size // t.num_heads, tie_embeddings=False, source="model.tiny")
    config: dict[str, Any] | None = None
    where = model.source
    if model.source == "local":
        config = _config_dict_from_folder(resolve_path(model.path))
        where = f"local folder {model.path}"
    elif model.source == "gguf":
        from pipeline.models import _cache_key  # the converted folder's name (models.prepare_base)

        folder = output_path(model.cache_dir) / f"gguf-{_cache_key(model)}"
        config = _config_dict_from_folder(folder) if (folder / "READY").exists() else None
        where = f"converted GGUF cache {folder}"
        if config is None:  # not converted yet: the GGUF header has the numbers
            config = _gguf_header_config(model)
            where = f"GGUF header of {model.gguf_file}"
    elif model.source == "hub":
        where = f"hub model {model.path}"
        config = _hub_config(model.path, model.revision, model.trust_remote_code)
    if config is not None:
        dims = ModelDims.from_config_dict(config, where)
        if param_count is None:
            return dims
        return dataclasses.replace(dims, source=f"{where}; param_count={param_count:,} given")
    if param_count is not None:
        return ModelDims.from_param_count(param_count)
    raise ValueError(
        f"cannot read the model config of {where} (not cached, not a well-known model, offline); "
        "pass param_count= to the planner, or point model.path at a folder with its config.json"
    )


def _gguf_header_config(model: Any) -> dict[str, Any] | None:
    """Architecture numbers from a GGUF file's metadata (reads the header, not the tensors)."""
    try:
        import gguf

        from pipeline.models import gguf_folder

        file = gguf_folder(model) / model.gguf_file
        if not file.exists():
            return None
        reader = gguf.GGUFReader(str(file))
    except Exception:  # package missing, file unreadable: the caller asks for param_count
        return None

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    if not arch or value(f"{arch}.embedding_length") is None:
        return None
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return {
        "hidden_size": value(f"{arch}.embedding_length"),
        "num_hidden_layers": value(f"{arch}.block_count"),
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "num_attention_heads": value(f"{arch}.attention.head_count"),
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv"),
        "head_dim": value(f"{arch}.attention.key_length"),
        "vocab_size": value(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None),
        "num_local_experts": value(f"{arch}.expert_count"),
        # GGUF stores no separate output matrix when the LM head shares the embeddings.
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }


def _hub_config(name: str, revision: str | None, trust_remote_code: bool) -> dict[str, Any] | None:
    """Hub config: HF cache first (no network), then the built-in table, then the hub if online."""
    try:
        from transformers import AutoConfig
    except ImportError:
        AutoConfig = None  # type: ignore[assignment]
    if AutoConfig is not None:
        try:
            return AutoConfig.from_pretrained(
                name, revision=revision, local_files_only=True, trust_remote_code=trust_remote_code
            ).to_dict()
        except Exception:  # not in the local cache
            pass
    known = _known_model(name)
    if known is not None:
        return known
    if AutoConfig is not None and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "TRUE", "yes"):
        try:
            return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code).to_dict()
        except Exception:  # offline, gated, or misspelt: the caller explains
            return None
    return None


# ---------------------------------------------------------------------------------------- trainables
def _matches_targets(name: str, targets: list[str] | str) -> bool:
    if targets == "all-linear":
        return True
    if isinstance(targets, str):  # PEFT treats a string as a regex over module names
        return re.fullmatch(targets, name) is not None or re.search(targets, name) is not None
    return name in targets


def trainable_params(dims: ModelDims, tuning: TuningConfig, total: int, kind: str) -> int:
    """Trainable parameters of a model of ``total`` parameters under ``tuning``.

    LoRA family: r x (in + out) per targeted projection per layer (``all-linear``: every projection but
    the output head), plus the score head for seq_cls models (PEFT's modules_to_save). Other PEFT
    methods from their own shapes. Freeze: the top ``trainable_layers`` layers (+ head);
    gradual_unfreeze: planned at its peak (all layers), since it ends there on long runs.
    """
    head = dims.hidden if kind == "seq_cls" else 0
    m = tuning.method
    if m == "full" or m == "gradual_unfreeze":
        return total
    if m == "freeze":
        return min(total, tuning.trainable_layers * dims.layer_params() + head + dims.hidden)
    if tuning.is_lora_family:
        r = tuning.lora_r
        names = [n for n in _LINEAR_SHAPES if _matches_targets(n, tuning.target_modules)]
        if not names:  # unknown module names (non-Llama): assume every projection, the safe side
            names = list(_LINEAR_SHAPES)
        per_layer = 0
        for name in names:
            fan_in, fan_out = _LINEAR_SHAPES[name](dims)
            copies = dims.experts if name in ("gate_proj", "up_proj", "down_proj") else 1
            per_layer += r * (fan_in + fan_out) * copies
            if m == "dora":
                per_layer += fan_out * copies  # DoRA's magnitude vector
        return dims.layers * per_layer + head
    if m == "ia3":  # scaling vectors on k, v and the MLP input of down_proj
        return dims.layers * (2 * dims.kv_heads * dims.head_dim + dims.intermediate) + head
    if m == "prefix":  # past key/values per layer per virtual token
        return tuning.num_virtual_tokens * dims.layers * 2 * dims.kv_heads * dims.head_dim + head
    if m == "prompt":
        return tuning.num_virtual_tokens * dims.hidden + head
    if m == "ptuning":  # prompt embeddings + PEFT's default MLP encoder (hidden -> hidden -> hidden)
        return tuning.num_virtual_tokens * dims.hidden + 2 * dims.hidden * dims.hidden + head
    if m == "llama_adapter":
        return tuning.adapter_layers * (tuning.adapter_len * dims.hidden + 1) + head
    raise ValueError(f"memory planner: unknown tuning method {m!r}")


# ---------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class RoleMemory:
    """Per-device bytes of one model (or of the KV cache) in a stage."""

    role: str
    params: int = 0
    trainable: int = 0
    weights: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    other: int = 0  # KV cache; ZeRO-3 gathered layers
    host: int = 0  # bytes offloaded to host memory (per device's share)

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.other


@dataclasses.dataclass
class _Knobs:
    """The settings a plan depends on; alternatives in ``check`` are variations of these."""

    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    deepspeed_bf16: bool  # DeepSpeed mixed precision: bf16 weights/grads + fp32 master in optimizer
    weight_bytes: int  # bytes per weight when not under DeepSpeed bf16
    act_bytes: int
    tuning: TuningConfig
    micro_batch: int
    grad_ckpt: bool
    rollout_batch: int = 0


@dataclasses.dataclass
class MemoryPlan:
    """The per-device memory estimate of one stage. ``format()`` prints it; ``check()`` enforces it."""

    stage: str
    world_size: int
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    precision: str
    dims: ModelDims
    roles: list[RoleMemory]
    notes: list[str] = dataclasses.field(default_factory=list)
    _alternatives: Callable[[], list[tuple[str, "MemoryPlan"]]] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )

    @property
    def total_bytes(self) -> int:
        return sum(r.total for r in self.roles)

    @property
    def host_bytes(self) -> int:
        return sum(r.host for r in self.roles)

    def role(self, name: str) -> RoleMemory:
        for r in self.roles:
            if r.role == name:
                return r
        raise KeyError(f"no role {name!r} in the {self.stage} plan (roles: {[r.role for r in self.roles]})")

    def summary(self) -> str:
        offload = "+".join(n for n, on in (("optimizer", self.offload_optimizer), ("params", self.offload_param)) if on)
        return (
            f"stage {self.stage}: ZeRO-{self.zero_stage}{' offload ' + offload if offload else ''}, "
            f"{self.world_size} device(s), {self.precision}: {_gib(self.total_bytes)} per device"
        )

    def format(self) -> str:
        """A fixed-width table (GiB per device) with one row per role and a total."""
        cols = ("role", "params", "trainable", "weights", "grads", "optim", "activ", "other", "total", "host")
        rows = [cols]
        for r in self.roles:
            rows.append((
                r.role, _count(r.params), _count(r.trainable), _gib(r.weights), _gib(r.grads), _gib(r.optimizer),
                _gib(r.activations), _gib(r.other), _gib(r.total), _gib(r.host),
            ))
        rows.append(("TOTAL", "", "", "", "", "", "", "", _gib(self.total_bytes), _gib(self.host_bytes)))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(cols))]
        lines = [self.summary()]
        for i, row in enumerate(rows):
            cells = (str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
            lines.append("  ".join(cells))
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def fits(self, device_bytes: int, headroom: float = 0.9) -> bool:
        """True if the plan uses at most ``headroom`` of the device (the rest: context, fragmentation)."""
        return self.total_bytes <= headroom * device_bytes

    def check(self, device_bytes: int, headroom: float = 0.9) -> None:
        """Raise MemoryPlanError if the plan does not fit, listing the alternatives that would."""
        if self.fits(device_bytes, headroom):
            return
        lines = [
            f"{self.summary()} does not fit {_gib(device_bytes)} devices "
            f"({headroom:.0%} usable = {_gib(int(headroom * device_bytes))}).",
            self.format(),
        ]
        alternatives = self._alternatives() if self._alternatives else []
        fitting = [(how, plan) for how, plan in alternatives if plan.fits(device_bytes, headroom)]
        if fitting:
            lines.append("These changes would fit (re-estimated):")
            lines += [f"  - {how}: {_gib(plan.total_bytes)} per device" for how, plan in fitting]
        else:
            tried = "; ".join(f"{how} ({_gib(plan.total_bytes)})" for how, plan in alternatives) or "none"
            lines.append(
                f"Nothing tried fits ({tried}). Use more devices (launch.nnodes / launch.nproc_per_node) "
                "with ZeRO-3, a smaller model, or devices with more memory."
            )
        raise MemoryPlanError("\n".join(lines))


def _gib(n: int) -> str:
    # MiB below 1 GiB so that tiny test models do not print as a column of zeros.
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024**2:.2f} MiB"


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n:,}"


# ----------------------------------------------------------------------------------------- estimate
_STAGES = ("sft", "rm", "ppo", "rlaif_label", "dpo", "best_of_n", "distill")


def world_size_of(cfg: RunConfig) -> int:
    return cfg.world_size


def device_memory_bytes(cfg: RunConfig) -> int | None:
    """Per-device memory: ``launch.gpu_memory_gib``, else the first CUDA device, else None (CPU)."""
    if cfg.launch.gpu_memory_gib is not None:
        return int(cfg.launch.gpu_memory_gib * GIB)
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except ImportError:
        pass
    return None


def _stage_ds_path(cfg: RunConfig, stage: str) -> str | None:
    if stage == "sft":
        return cfg.sft.train.deepspeed
    if stage == "rm":
        return cfg.rm.train.deepspeed
    if stage == "dpo":
        return cfg.dpo.train.deepspeed
    if stage == "ppo":
        return cfg.ppo.train.deepspeed
    return None


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}[name]


def _initial_knobs(cfg: RunConfig, stage: str) -> tuple[_Knobs, str]:
    """Knobs from the config: DeepSpeed JSON, precision, tuning, micro-batch."""
    ds_path = _stage_ds_path(cfg, stage)
    zero_stage, offload_opt, offload_param = 0, False, False
    ds_bf16_setting: Any = None
    if ds_path is not None:
        from pipeline.deepspeed_check import load_ds_config, zero_settings

        ds = load_ds_config(ds_path)
        zero_stage, offload_opt, offload_param = zero_settings(ds)
        ds_bf16_setting = (ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled", False)

    if stage == "ppo":
        precision = cfg.ppo.train.precision
    elif stage in ("sft", "rm", "dpo"):
        precision = getattr(cfg, stage).train.precision
    else:
        precision = "auto"
    # "auto" means bf16 on an accelerator; the planner plans for one unless the run is clearly CPU
    # (no device memory given and no CUDA), where "auto" resolves to fp32 like the engine does.
    if precision == "auto":
        precision = "bf16" if device_memory_bytes(cfg) is not None else "fp32"
    bf16 = precision == "bf16"
    deepspeed_bf16 = ds_path is not None and bf16 and ds_bf16_setting in (True, "auto")
    weight_bytes = _dtype_bytes(cfg.model.dtype)
    if stage in ("rlaif_label", "best_of_n", "distill") and bf16:
        weight_bytes = 2  # inference only: loaded in bf16 on accelerators
    act_bytes = 2 if bf16 else 4

    if stage == "ppo":
        tuning = cfg.ppo.tuning
        micro = max(1, cfg.ppo.sizes(world_size_of(cfg)).micro_batch)
        grad_ckpt = cfg.ppo.train.gradient_checkpointing
        rollout = cfg.ppo.episodes_per_rollout
    elif stage in ("sft", "rm", "dpo"):
        section = getattr(cfg, stage)
        tuning = section.tuning
        micro = section.train.per_device_batch_size
        grad_ckpt = section.train.gradient_checkpointing
        rollout = 0
    else:
        batch = cfg.best_of_n.batch_size * cfg.best_of_n.n if stage == "best_of_n" else cfg.rlaif_label.batch_size
        if stage == "distill":
            batch = cfg.distill.batch_size
        tuning, micro, grad_ckpt, rollout = TuningConfig(), 0, False, batch
    knobs = _Knobs(zero_stage, offload_opt, offload_param, deepspeed_bf16, weight_bytes, act_bytes, tuning,
                   micro, grad_ckpt, rollout)
    return knobs, precision


def _model_role(
    role: str, dims: ModelDims, total: int, trainable: int, knobs: _Knobs, world: int, *, activations: int = 0
) -> RoleMemory:
    """Weights / grads / optimizer bytes of one model under the knobs' ZeRO stage and offload."""
    frozen = total - trainable
    qlora = knobs.tuning.method == "qlora" and trainable < total
    if knobs.deepspeed_bf16:
        w_train, g_train, o_train = 2, 2, 12
        w_frozen = 2
    else:
        w_train, g_train, o_train = knobs.weight_bytes, knobs.weight_bytes, 2 * knobs.weight_bytes
        w_frozen = knobs.weight_bytes
    # QLoRA: 4-bit base weights + blockwise constants ~ 4.5 bits per parameter.
    frozen_bytes = frozen * 9 // 16 if qlora else frozen * w_frozen

    weights = trainable * w_train + frozen_bytes
    grads = trainable * g_train
    optimizer = trainable * o_train
    stage = knobs.zero_stage
    if stage >= 1:
        optimizer = math.ceil(optimizer / world)
    if stage >= 2:
        grads = math.ceil(grads / world)
    other = 0
    host = 0
    if stage >= 3:
        weights = math.ceil(weights / world)
        # ZeRO-3 gathers full layers for compute: the current one and a prefetched one.
        other = 2 * dims.layer_params() * (w_train if trainable else w_frozen)
    if knobs.offload_optimizer and stage >= 1 and trainable:
        # ZeRO-Offload streams each reduced gradient bucket to the host, where the CPU optimizer
        # steps; the device keeps only the buckets in flight (~ two layers' worth).
        host += optimizer + grads
        optimizer = 0
        grads = min(grads, 2 * dims.layer_params() * g_train)
    if knobs.offload_param and stage >= 3:
        host += weights
        weights = 0
    return RoleMemory(role, total, trainable, weights, grads, optimizer, activations, other, host)


def _layer_token_bytes(dims: ModelDims, knobs: _Knobs) -> int:
    """Bytes one decoder layer keeps for backward per token (``_ACT_*_FACTOR``)."""
    return (_ACT_HIDDEN_FACTOR * dims.hidden + 2 * dims.kv_heads * dims.head_dim
            + _ACT_INTERMEDIATE_FACTOR * dims.intermediate) * knobs.act_bytes


def _train_activations(dims: ModelDims, knobs: _Knobs, seq: int, sequences: int, lm_head: bool) -> int:
    """Rough activation bytes of one micro-batch forward+backward (``sequences`` x ``seq`` tokens)."""
    tokens = sequences * seq
    per_layer_token = _layer_token_bytes(dims, knobs)
    if knobs.grad_ckpt:
        # Only each layer's input is kept; one layer's activations exist during its recompute.
        layers = dims.layers * tokens * dims.hidden * knobs.act_bytes + tokens * per_layer_token
    else:
        layers = dims.layers * tokens * per_layer_token
    # LM loss: logits in the compute dtype, their fp32 upcast and the fp32 softmax gradient.
    logits = tokens * dims.vocab * (knobs.act_bytes + 8) if lm_head else 0
    return layers + logits


# DPO's response log-probs (stages.dpo.core.sequence_logprobs) at the backward's peak, bytes per token and
# vocabulary entry: the fp32 logits the log-softmax keeps for backward, plus three fp32 tensors of that size
# alive together in it (logsumexp's gradient, gather's scattered gradient, the logits slice's gradient).
# Measured on CPU (sequence_logprobs + backward, 8 x 128 tokens x 49,152): 4.1 fp32 logits tensors at the
# peak, under fp32 and bf16 alike (the bf16 logits are freed once upcast).
_DPO_LOGPROB_BYTES = 16


def dpo_activations(dims: ModelDims, knobs: _Knobs, seq: int, pairs: int) -> dict[str, int]:
    """Activation bytes of a DPO micro-batch of ``pairs`` pairs, by component.

    A micro-batch is one forward over 2 x ``pairs`` sequences (the chosen rows, then the rejected ones) of
    up to ``seq`` tokens:

    - ``layers``: what the decoder layers keep for backward (``_train_activations`` without the head);
    - ``logprobs``: the log-softmax over the whole vocabulary for every token (``_DPO_LOGPROB_BYTES``);
    - ``reference_pass``: the reference's forward over the same micro-batch (and the held-out one's), with
      no gradient: the logits in the compute dtype, their fp32 copy and logsumexp's temporary, plus one
      layer's tensors in flight. It runs before a step's training forward, not beside it;
    - ``peak``: the larger of training (``layers + logprobs``) and the reference pass.
    """
    tokens = 2 * pairs * seq
    layers = _train_activations(dims, knobs, seq, 2 * pairs, lm_head=False)
    logprobs = tokens * dims.vocab * _DPO_LOGPROB_BYTES
    reference_pass = tokens * dims.vocab * (knobs.act_bytes + 8) + tokens * _layer_token_bytes(dims, knobs)
    return {"layers": layers, "logprobs": logprobs, "reference_pass": reference_pass,
            "peak": max(layers + logprobs, reference_pass)}


def _estimate(cfg: RunConfig, stage: str, dims: ModelDims, param_count: int | None, knobs: _Knobs,
              precision: str) -> MemoryPlan:
    world = world_size_of(cfg)
    lm_total = param_count if param_count is not None else dims.causal_lm_params()
    # A seq_cls model drops the LM head; with an explicit count, scale by the same difference.
    cls_total = lm_total - (dims.causal_lm_params() - dims.seq_cls_params())
    roles: list[RoleMemory] = []
    notes: list[str] = [f"model dims from {dims.source}"]

    def trainable(total: int, kind: str) -> int:
        return min(total, trainable_params(dims, knobs.tuning, total, kind))

    if stage == "sft":
        acts = _train_activations(dims, knobs, cfg.sft.max_length, knobs.micro_batch, lm_head=True)
        roles.append(_model_role("policy", dims, lm_total, trainable(lm_total, "causal_lm"), knobs, world,
                                 activations=acts))
        if cfg.distill.token_level.enabled and cfg.distill.teacher.kind != "http":
            # a frozen forward per micro-batch: its logits in the compute dtype plus the fp32 softmax
            logits = knobs.micro_batch * cfg.sft.max_length * dims.vocab * (knobs.act_bytes + 8)
            roles.append(_model_role("teacher", dims, lm_total, 0, knobs, world, activations=logits))
            notes.append("teacher (distill.token_level) sized as the student: same vocabulary; a larger teacher "
                         "needs more")
    elif stage == "rm":
        # Each preference pair is two sequences (chosen, rejected) in one forward.
        acts = _train_activations(dims, knobs, cfg.rm.max_length, 2 * knobs.micro_batch, lm_head=False)
        roles.append(_model_role("reward_model", dims, cls_total, trainable(cls_total, "seq_cls"), knobs, world,
                                 activations=acts))
    elif stage == "dpo":
        # Each pair is two sequences (chosen, rejected) in one forward, through the LM head.
        acts = dpo_activations(dims, knobs, cfg.dpo.max_length, knobs.micro_batch)
        roles.append(_model_role("policy", dims, lm_total, trainable(lm_total, "causal_lm"), knobs, world,
                                 activations=acts["peak"]))
        roles.append(RoleMemory("reference", lm_total, 0))
        if knobs.tuning.is_peft:
            notes.append("reference = the policy with the adapter disabled: no extra weights (DESIGN §7)")
        else:
            notes.append("reference log-probs come from the starting policy before the first step: no reference "
                         "copy of the weights")
        notes.append("the reference's forward (no gradient) runs before a step's training forward: the policy's "
                     "activations are the larger of the two, not their sum")
    elif stage == "ppo":
        ppo = cfg.ppo
        seq = ppo.max_prompt_length + ppo.max_new_tokens
        # Actor and critic backward passes happen one after the other; the larger one is the peak.
        actor_acts = _train_activations(dims, knobs, seq, knobs.micro_batch, lm_head=True)
        critic_acts = _train_activations(dims, knobs, seq, knobs.micro_batch, lm_head=False) if ppo.uses_critic else 0
        roles.append(_model_role("actor", dims, lm_total, trainable(lm_total, "causal_lm"), knobs, world,
                                 activations=max(actor_acts, critic_acts)))
        if ppo.uses_critic:
            roles.append(_model_role("critic", dims, cls_total, trainable(cls_total, "seq_cls"), knobs, world))
        else:
            notes.append(f"no critic: ppo.advantage_estimator={ppo.advantage_estimator} is critic-free")
        if knobs.tuning.is_peft:
            roles.append(RoleMemory("reference", lm_total, 0))
            notes.append("reference = actor base with the adapter disabled: no extra weights (DESIGN §4)")
        else:
            roles.append(_model_role("reference", dims, lm_total, 0, knobs, world))
        if any(r.kind == "rm" for r in ppo.rewards):
            roles.append(_model_role("reward_model", dims, cls_total, 0, knobs, world))
        kv_bytes = 2 if precision == "bf16" else 4
        kv = 2 * dims.layers * dims.kv_heads * dims.head_dim * seq * knobs.rollout_batch * kv_bytes
        roles.append(RoleMemory("kv_cache", other=kv))
    elif stage == "best_of_n":
        bon = cfg.best_of_n
        seq = bon.max_prompt_length + bon.max_new_tokens
        roles.append(_model_role("policy", dims, lm_total, 0, knobs, world))
        if any(r.kind == "rm" for r in bon.rewards):
            roles.append(_model_role("reward_model", dims, cls_total, 0, knobs, world))
        kv = 2 * dims.layers * dims.kv_heads * dims.head_dim * seq * knobs.rollout_batch * knobs.act_bytes
        roles.append(RoleMemory("kv_cache", other=kv))
    elif stage == "distill":
        d = cfg.distill
        if d.teacher.kind == "http":
            notes.append("the teacher is an HTTP endpoint: nothing is loaded on this device")
        else:
            seq = d.max_prompt_length + d.max_new_tokens
            roles.append(_model_role("teacher", dims, lm_total, 0, knobs, world))
            kv = 2 * dims.layers * dims.kv_heads * dims.head_dim * seq * knobs.rollout_batch * knobs.act_bytes
            roles.append(RoleMemory("kv_cache", other=kv))
    elif stage == "rlaif_label":
        lab = cfg.rlaif_label
        seq = lab.max_prompt_length + lab.max_new_tokens
        roles.append(_model_role("policy", dims, lm_total, 0, knobs, world))
        kv = 2 * dims.layers * dims.kv_heads * dims.head_dim * seq * knobs.rollout_batch * knobs.act_bytes
        roles.append(RoleMemory("kv_cache", other=kv))
        notes.append("an hf judge model, if any, is not included")
    else:
        raise ValueError(f"memory planner: unknown stage {stage!r} (expected one of {', '.join(_STAGES)})")

    if knobs.micro_batch and stage != "rlaif_label":
        notes.append(f"activations for micro-batch {knobs.micro_batch}"
                     f"{' with gradient checkpointing' if knobs.grad_ckpt else ''} (rough)")
    return MemoryPlan(stage, world, knobs.zero_stage, knobs.offload_optimizer, knobs.offload_param, precision, dims,
                      roles, notes)


def _alternatives(cfg: RunConfig, stage: str, dims: ModelDims, param_count: int | None, knobs: _Knobs,
                  precision: str) -> list[tuple[str, MemoryPlan]]:
    """Re-estimate the plan under the usual ways out of an OOM, each with the override that does it."""
    prefix = {"sft": "sft", "rm": "rm", "ppo": "ppo", "dpo": "dpo"}.get(stage)
    if prefix is None:
        return []
    ds_key = f"{prefix}.deepspeed" if stage == "ppo" else f"{prefix}.train.deepspeed"
    tuning_key = f"{prefix}.tuning.method"
    if stage == "ppo":
        small_batch = (f"ppo.gradient_accumulation_steps={cfg.ppo.mini_batch_size} "
                       f"ppo.train.gradient_checkpointing=true")
    else:
        train = getattr(cfg, stage).train
        small_batch = (f"{prefix}.train.per_device_batch_size=1 "
                       f"{prefix}.train.gradient_accumulation_steps="
                       f"{train.gradient_accumulation_steps * train.per_device_batch_size} "
                       f"{prefix}.train.gradient_checkpointing=true")
    lora = TuningConfig(method="lora", lora_r=16)
    ds_bf16 = precision == "bf16"  # our JSONs have bf16 "auto": DeepSpeed mixed precision when bf16

    options: list[tuple[str, dict[str, Any]]] = []
    if not knobs.tuning.is_peft:
        options.append((f"LoRA ({tuning_key}=lora)", dict(tuning=lora)))
    if knobs.tuning.method != "qlora":
        options.append((f"QLoRA, 4-bit base (needs bitsandbytes on CUDA; {tuning_key}=qlora)",
                        dict(tuning=TuningConfig(method="qlora", lora_r=16))))
    if knobs.zero_stage < 3:
        options.append((f"ZeRO-3 ({ds_key}=configs/deepspeed/zero3.json)",
                        dict(zero_stage=3, offload_optimizer=False, offload_param=False, deepspeed_bf16=ds_bf16)))
    if not (knobs.offload_optimizer and knobs.offload_param):
        options.append((f"ZeRO-3 + CPU offload ({ds_key}=configs/deepspeed/zero3_offload.json)",
                        dict(zero_stage=3, offload_optimizer=True, offload_param=True, deepspeed_bf16=ds_bf16)))
    if knobs.micro_batch > 1 or not knobs.grad_ckpt:
        options.append((f"micro-batch 1 + gradient checkpointing ({small_batch})",
                        dict(micro_batch=1, grad_ckpt=True)))
    if stage == "ppo" and knobs.rollout_batch > 1:
        options.append((f"smaller rollout batch (ppo.episodes_per_rollout={cfg.ppo.mini_batch_size})",
                        dict(rollout_batch=cfg.ppo.mini_batch_size)))
    # Combined remedies, for the cases no single change rescues.
    combined: dict[str, Any] = dict(zero_stage=3, offload_optimizer=True, offload_param=True, deepspeed_bf16=ds_bf16,
                                    micro_batch=1, grad_ckpt=True)
    options.append((f"ZeRO-3 + CPU offload + micro-batch 1 + gradient checkpointing "
                    f"({ds_key}=configs/deepspeed/zero3_offload.json {small_batch})", combined))
    if not knobs.tuning.is_peft:
        options.append((f"LoRA + ZeRO-3 + CPU offload + micro-batch 1 + gradient checkpointing "
                        f"({tuning_key}=lora {ds_key}=configs/deepspeed/zero3_offload.json {small_batch})",
                        dict(combined, tuning=lora)))
    return [(how, _estimate(cfg, stage, dims, param_count, dataclasses.replace(knobs, **changes), precision))
            for how, changes in options]


def estimate(cfg: RunConfig, stage: str, param_count: int | None = None) -> MemoryPlan:
    """Per-device memory plan of ``stage`` ("sft", "rm", "ppo", "rlaif_label") for the run ``cfg``.

    ``param_count`` overrides the base model's parameter count (e.g. a GGUF not converted yet, or a
    hub model not cached while offline). The plan's ``check(device_bytes)`` raises MemoryPlanError
    naming the config changes that would fit.
    """
    if stage not in _STAGES:
        raise ValueError(f"memory planner: unknown stage {stage!r} (expected one of {', '.join(_STAGES)})")
    if stage == "ppo" and cfg.ppo.policy is not None:  # a policy you bring: plan with its dims, not model.*
        from .config import ModelConfig, model_location

        location = model_location(cfg.ppo.policy.path)
        policy_model = ModelConfig(source="local" if Path(location).is_dir() else "hub", path=location,
                                   dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
        cfg = cfg.model_copy(update={"model": policy_model})
    teacher = cfg.distill.teacher
    missing_teacher = None
    if stage == "distill" and teacher.kind != "http" and not (teacher.kind == "hf" and teacher.model == "base"):
        from .config import ModelConfig  # plan with the teacher's dims, not model.*

        location = teacher.model if teacher.kind == "hf" else str(Path(teacher.path) / "model")
        source = "local" if Path(location).is_dir() else "hub"
        if teacher.kind == "stage" and source == "hub":  # not made yet (a fresh clone): the pre-flight says so
            missing_teacher = location
        else:
            cfg = cfg.model_copy(update={"model": ModelConfig(source=source, path=location, dtype=cfg.model.dtype,
                                                              trust_remote_code=cfg.model.trust_remote_code)})
    dims = model_dims(cfg, param_count)
    knobs, precision = _initial_knobs(cfg, stage)
    plan = _estimate(cfg, stage, dims, param_count, knobs, precision)
    if missing_teacher is not None:
        plan.notes.append(f"teacher sized as the base model: {missing_teacher} does not exist yet")
    plan._alternatives = lambda: _alternatives(cfg, stage, dims, param_count, knobs, precision)
    return plan
