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
import math
from pathlib import Path
from typing import Any, Callable

from pipeline.config import RunConfig, TuningConfig
from pipeline.model_dims import ModelDims, model_dims, trainable_params  # noqa: F401  (re-exported for callers)
from pipeline.registry import spec_of

GIB = 1024**3

# Tensors a Llama-style decoder layer keeps for backward, per token, in units of the activation dtype:
# norm in/out (2h), q/k/v (h + 2*kv_dim), attention output and o_proj input (2h), residual (h),
# post-norm in/out (2h), gate, up, act(gate), act*up (4I). Attention itself is assumed SDPA/flash
# (no seq^2 score matrix kept).
_ACT_HIDDEN_FACTOR = 8
_ACT_INTERMEDIATE_FACTOR = 4

class MemoryPlanError(RuntimeError):
    """The plan does not fit the device; the message lists the changes that would fit."""


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


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}[name]


def _initial_knobs(cfg: RunConfig, stage: str) -> tuple[_Knobs, str]:
    """Knobs from the config: the stage's ``StageSpec.training`` (DeepSpeed JSON, precision, tuning,
    micro-batch); a stage that trains nothing plans inference only."""
    spec = spec_of(cfg, stage)
    shape = spec.training(cfg) if spec.training is not None else None
    ds_path = shape.deepspeed if shape is not None else None
    zero_stage, offload_opt, offload_param = 0, False, False
    ds_bf16_setting: Any = None
    if ds_path is not None:
        from pipeline.deepspeed_check import load_ds_config, zero_settings

        ds = load_ds_config(ds_path)
        zero_stage, offload_opt, offload_param = zero_settings(ds)
        ds_bf16_setting = (ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled", False)
    precision = shape.precision if shape is not None else "auto"
    # "auto" means bf16 on an accelerator; the planner plans for one unless the run is clearly CPU
    # (no device memory given and no CUDA), where "auto" resolves to fp32 like the engine does.
    if precision == "auto":
        precision = "bf16" if device_memory_bytes(cfg) is not None else "fp32"
    bf16 = precision == "bf16"
    deepspeed_bf16 = ds_path is not None and bf16 and ds_bf16_setting in (True, "auto")
    weight_bytes = _dtype_bytes(cfg.model.dtype)
    if shape is None and bf16:
        weight_bytes = 2  # inference only: loaded in bf16 on accelerators
    if shape is None:
        shape_knobs: tuple[Any, ...] = (TuningConfig(), 0, False, 0)
    else:
        shape_knobs = (shape.tuning, shape.micro_batch, shape.gradient_checkpointing, shape.rollout_batch)
    knobs = _Knobs(zero_stage, offload_opt, offload_param, deepspeed_bf16, weight_bytes, 2 if bf16 else 4,
                   *shape_knobs)
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


class MemoryBuilder:
    """What a stage's ``memory_estimate(cfg, plan)`` (``StageSpec``) fills in: the models it holds on a device,
    by role, and notes. The arithmetic stays here; the stage says which models it has and how it uses them.

    ``knobs`` (ZeRO stage, offload, bytes per weight and activation, tuning, micro-batch, gradient checkpointing,
    rollout batch) and ``precision`` are the ones being planned (``check``'s alternatives vary them); ``dims`` are
    the base model's unless ``use_model`` names another."""

    def __init__(self, cfg: RunConfig, knobs: _Knobs, precision: str, param_count: int | None,
                 dims_of: Callable[[str | None], ModelDims]):
        self.cfg, self.knobs, self.precision = cfg, knobs, precision
        self.world = world_size_of(cfg)
        self.roles: list[RoleMemory] = []
        self.notes: list[str] = []
        self._param_count, self._dims_of = param_count, dims_of
        self.dims = dims_of(None)

    def use_model(self, location: str, *, may_be_missing: bool = False) -> None:
        """Plan with the dims of the model at ``location`` (a folder or hub name: a policy the run brings, a
        teacher) instead of ``model.*``. ``may_be_missing``: a folder a parent stage makes later (not a hub
        name): planned as the base model until it exists, with a note."""
        if may_be_missing and not Path(location).is_dir():
            self.note(f"{location} does not exist yet: sized as the base model")
            return
        self.dims = self._dims_of(location)

    @property
    def lm_total(self) -> int:
        """Parameters of the causal LM (``param_count`` when given)."""
        return self._param_count if self._param_count is not None else self.dims.causal_lm_params()

    @property
    def cls_total(self) -> int:
        """Parameters of the same model as a one-label classifier (the LM head dropped)."""
        return self.lm_total - (self.dims.causal_lm_params() - self.dims.seq_cls_params())

    def _total(self, kind: str) -> int:
        return self.lm_total if kind == "causal_lm" else self.cls_total

    def trained(self, role: str, kind: str = "causal_lm", activations: int = 0) -> None:
        """A model the stage trains (``kind``: causal_lm or seq_cls), its trainable share by the tuning method."""
        total = self._total(kind)
        trainable = min(total, trainable_params(self.dims, self.knobs.tuning, total, kind))
        self.roles.append(_model_role(role, self.dims, total, trainable, self.knobs, self.world,
                                      activations=activations))

    def frozen(self, role: str, kind: str = "causal_lm", activations: int = 0) -> None:
        """A frozen copy of a model (a reference, a reward model, a teacher, a sampling policy)."""
        self.roles.append(_model_role(role, self.dims, self._total(kind), 0, self.knobs, self.world,
                                      activations=activations))

    def shared(self, role: str, kind: str = "causal_lm") -> None:
        """A model that costs no extra weights (the trained one with its adapter disabled)."""
        self.roles.append(RoleMemory(role, self._total(kind), 0))

    def activations(self, seq: int, sequences: int, lm_head: bool) -> int:
        """Activation bytes of one training micro-batch of ``sequences`` x ``seq`` tokens."""
        return _train_activations(self.dims, self.knobs, seq, sequences, lm_head)

    def layer_token_bytes(self) -> int:
        """Bytes one decoder layer keeps for backward per token."""
        return _layer_token_bytes(self.dims, self.knobs)

    def kv_cache(self, seq: int, batch: int | None = None) -> None:
        """The generation KV cache of ``batch`` sequences (default: the rollout batch) of ``seq`` tokens."""
        dims, rows = self.dims, self.knobs.rollout_batch if batch is None else batch
        kv = 2 * dims.layers * dims.kv_heads * dims.head_dim * seq * rows * self.knobs.act_bytes
        self.roles.append(RoleMemory("kv_cache", other=kv))

    def note(self, text: str) -> None:
        self.notes.append(text)


def _estimate(cfg: RunConfig, stage: str, param_count: int | None, knobs: _Knobs, precision: str,
              dims_of: Callable[[str | None], ModelDims]) -> MemoryPlan:
    plan = MemoryBuilder(cfg, knobs, precision, param_count, dims_of)
    spec_of(cfg, stage).memory_estimate(cfg, plan)
    notes = [f"model dims from {plan.dims.source}", *plan.notes]
    if knobs.micro_batch:
        notes.append(f"activations for micro-batch {knobs.micro_batch}"
                     f"{' with gradient checkpointing' if knobs.grad_ckpt else ''} (rough)")
    return MemoryPlan(stage, plan.world, knobs.zero_stage, knobs.offload_optimizer, knobs.offload_param, precision,
                      plan.dims, plan.roles, notes)


def _alternatives(cfg: RunConfig, stage: str, knobs: _Knobs, precision: str,
                  estimate_with: Callable[[_Knobs], MemoryPlan]) -> list[tuple[str, MemoryPlan]]:
    """Re-estimate the plan under the usual ways out of an OOM, each with the override that does it (the keys
    of the stage's ``StageSpec.training``; a stage that trains nothing has none)."""
    spec = spec_of(cfg, stage)
    shape = spec.training(cfg) if spec.training is not None else None
    if shape is None:
        return []
    ds_key, tuning_key, small_batch = shape.keys["deepspeed"], shape.keys["tuning"], shape.keys["small_batch"]
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
    if shape.smaller_rollout_batch and knobs.rollout_batch > 1:
        options.append((f"smaller rollout batch ({shape.keys['rollout_batch']})",
                        dict(rollout_batch=shape.smaller_rollout_batch)))
    # Combined remedies, for the cases no single change rescues.
    combined: dict[str, Any] = dict(zero_stage=3, offload_optimizer=True, offload_param=True, deepspeed_bf16=ds_bf16,
                                    micro_batch=1, grad_ckpt=True)
    options.append((f"ZeRO-3 + CPU offload + micro-batch 1 + gradient checkpointing "
                    f"({ds_key}=configs/deepspeed/zero3_offload.json {small_batch})", combined))
    if not knobs.tuning.is_peft:
        options.append((f"LoRA + ZeRO-3 + CPU offload + micro-batch 1 + gradient checkpointing "
                        f"({tuning_key}=lora {ds_key}=configs/deepspeed/zero3_offload.json {small_batch})",
                        dict(combined, tuning=lora)))
    return [(how, estimate_with(dataclasses.replace(knobs, **changes))) for how, changes in options]


def estimate(cfg: RunConfig, stage: str, param_count: int | None = None) -> MemoryPlan | None:
    """Per-device memory plan of ``stage`` for the run ``cfg``; None for a stage whose spec has no
    ``memory_estimate`` (nothing planned). An unknown stage is a ValueError.

    ``param_count`` overrides the base model's parameter count (e.g. a GGUF not converted yet, or a
    hub model not cached while offline). The plan's ``check(device_bytes)`` raises MemoryPlanError
    naming the config changes that would fit.
    """
    if spec_of(cfg, stage).memory_estimate is None:
        return None
    found: dict[str | None, ModelDims] = {}

    def dims_of(location: str | None) -> ModelDims:
        """The base model's dims (None) or those of the model at ``location``, read once."""
        if location not in found:
            if location is None:
                found[location] = model_dims(cfg, param_count)
            else:
                from .config import ModelConfig

                model = ModelConfig(source="local" if Path(location).is_dir() else "hub", path=location,
                                    dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
                found[location] = model_dims(cfg.model_copy(update={"model": model}), param_count)
        return found[location]

    knobs, precision = _initial_knobs(cfg, stage)

    def estimate_with(k: _Knobs) -> MemoryPlan:
        return _estimate(cfg, stage, param_count, k, precision, dims_of)

    plan = estimate_with(knobs)
    plan._alternatives = lambda: _alternatives(cfg, stage, knobs, precision, estimate_with)
    return plan
