"""Memory planner: per-device bytes a stage will need, checked before anything is launched.

PPO holds four models (DESIGN §5.1), and the usual way to learn that they do not fit is an OOM an hour
into a cluster job. ``estimate(cfg, stage)`` adds up, per device and per model role:

- weights, gradients and optimizer states under the stage's ZeRO stage and offload settings, read
  from its DeepSpeed JSON, at the world size of ``cfg.launch`` (nnodes x nproc_per_node);
- activations for one training micro-batch: the tensors a Llama-style layer keeps for backward
  (``_layer_saved``), counted from the architecture and checked against the bytes autograd actually saves
  (``tests/test_memory.py``), plus the LM loss's vocabulary-wide tensors; DPO's log-softmax over the
  vocabulary and its reference forward: ``dpo_activations``;
- for PPO and RLAIF labelling, the generation KV cache
  2 * layers * kv_heads * head_dim * (prompt + new tokens) * rollout batch * bytes;
- ``runtime``: what the process holds apart from its models. On a CPU that is the stage process's own
  resident memory (python, torch, transformers, tokenizers, the data: ``CPU_RUNTIME_BYTES``, more with peft
  or DeepSpeed: ``PEFT_RUNTIME_BYTES``, ``DEEPSPEED_RUNTIME_BYTES``). On an accelerator that memory is the
  host's, and the plan counts the CUDA context instead (``CUDA_CONTEXT_BYTES``: device memory outside
  torch's allocator);
- ``cpu_heap`` (CPU plans): what glibc's allocator keeps resident beyond the live activations
  (``CPU_HEAP_RETENTION``).

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

Numbers are estimates: allocator fragmentation on an accelerator and communication buffers are covered by
``check``'s headroom, not itemised. The planner sizes activations at the config's longest sequence
(``max_length``, prompt + new tokens); a run whose rows are shorter needs less. Accuracy, measured against the
stage processes' peak RSS on CPU: docs/RESULTS.md "Memory planner accuracy" (``bench/planner_accuracy.py``).
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
MIB = 1024**2

# --- measured constants (docs/RESULTS.md "Memory planner accuracy" has the runs they come from) -----------
#: CPU: resident memory of a stage process apart from its models and activations: python, torch, transformers,
#: tokenizers, DeepSpeed's and accelerate's imports, the data, torch's first-use buffers. Fitted on
#: configs/tiny.yaml (2026-12-07, this 2-core CPU), whose 0.1M-parameter model leaves little else: peak RSS less
#: the plan's other roles ("implied runtime" in bench/planner_accuracy.py) was 416 (sft), 440 (rm: matplotlib
#: for its histogram) and 425 (ppo) MiB. The RSS after importing torch + transformers alone, 253 MiB, is not
#: the figure: a stage imports much more before its model is built.
CPU_RUNTIME_BYTES = 427 * MIB
#: CPU, a PEFT method: what peft (and the bitsandbytes it imports) adds; the same tiny stages with LoRA
#: implied 475, 505 and 482 MiB, 60 more on average.
PEFT_RUNTIME_BYTES = 60 * MIB
#: CPU, under DeepSpeed (launched by torchrun, a process group, DeepSpeed's engine): the GPU check's dry run
#: (2026-12-07) peaked 51, 50 and 51 MiB higher in sft, rm and ppo with ZeRO-2 than without DeepSpeed.
DEEPSPEED_RUNTIME_BYTES = 50 * MIB
#: Accelerator: device memory the CUDA context (kernels, cuBLAS / cuDNN workspaces) holds outside torch's
#: allocator, so neither max_memory_allocated nor the rest of the plan sees it. About 0.5 GiB on recent
#: NVIDIA GPUs with CUDA 12's lazy module loading; an assumption, not measured here (no GPU on this machine).
CUDA_CONTEXT_BYTES = 512 * MIB
#: CPU: glibc's malloc serves allocations below its mmap threshold from heaps it rarely gives back, and
#: raises that threshold (up to ``GLIBC_MMAP_THRESHOLD_MAX``) to the size of the largest block it has freed.
#: From the second training step on, the per-layer activations therefore live in heaps that also keep the
#: freed blocks of the step before: their resident size settles near (1 + this) x the live activations, less
#: what gradients and optimizer states, allocated while the activations are freed, take of that slack. Fitted
#: with ``bench/planner_accuracy.py --heap`` (2026-12-07; SmolLM2-135M's layer shape, micro-batch 8 x 96, 6
#: steps): retention 0.93 (LoRA, 30 layers), 1.02 (LoRA, 8 layers); a full fine-tune's gradients and Adam
#: states filled the slack (8 layers: peak 1.03 x the plan). An earlier run of the 30-layer shape gave 1.21:
#: glibc's behaviour varies from run to run by about a tenth of the peak.
CPU_HEAP_RETENTION = 1.0
GLIBC_MMAP_THRESHOLD_MAX = 32 * MIB  # 4 MiB x sizeof(long): larger blocks are mmap-ed and returned when freed

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
    cpu: bool = False  # the stage runs on the CPU: RSS is what is planned (process runtime, glibc's heaps)
    deepspeed: bool = False  # the stage trains under DeepSpeed


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
    _alternatives: Callable[[], list["Alternative"]] | None = dataclasses.field(default=None, repr=False,
                                                                                compare=False)

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

    def alternatives(self) -> list["Alternative"]:
        """The usual ways out of an OOM, each re-estimated (empty for a stage that trains nothing)."""
        return self._alternatives() if self._alternatives else []

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
        alternatives = self.alternatives()
        fitting = [alt for alt in alternatives if alt.plan.fits(device_bytes, headroom)]
        if fitting:
            lines.append("These changes would fit (re-estimated):")
            lines += [f"  - {alt.how}: {_gib(alt.plan.total_bytes)} per device ({' '.join(alt.overrides)})"
                      for alt in fitting]
            short = "; ".join(f"{alt.how} ({_gib(alt.plan.total_bytes)})" for alt in alternatives if alt not in fitting)
            if short:
                lines.append(f"Not enough alone: {short}.")
        else:
            tried = "; ".join(f"{alt.how} ({_gib(alt.plan.total_bytes)})" for alt in alternatives) or "none"
            lines.append(
                f"Nothing tried fits ({tried}). Use more devices (launch.nnodes / launch.nproc_per_node) "
                "with ZeRO-3, a smaller model, or devices with more memory."
            )
        raise MemoryPlanError("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class Alternative:
    """One way out of an OOM that ``check`` offers: what it is, the config overrides that make it (``key=value``,
    as the command line takes them) and the plan re-estimated with it."""

    how: str
    overrides: list[str]
    plan: MemoryPlan


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
                   *shape_knobs, cpu=device_memory_bytes(cfg) is None, deepspeed=ds_path is not None)
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


def _layer_saved(dims: ModelDims, knobs: _Knobs, padded: bool) -> list[tuple[int, int]]:
    """(elements per token, bytes per element) of each tensor a Llama-style decoder layer keeps for backward,
    counted from HF's LlamaDecoderLayer under SDPA (no seq^2 score matrix is kept):

    - the residual stream, twice (the layer's input, the sum after attention): fp32 whatever the precision,
      as the stream itself (fp32 weights) or as RMSNorm's fp32 upcast of it (bf16 weights);
    - each RMSNorm's normalised input, kept only when its weight trains (not under a PEFT method), in the
      weights' dtype;
    - the projections' input: each norm's output, shared by the projections it feeds, except under bf16
      autocast on fp32 weights, where each of q, k, v, gate and up keeps its own bf16 cast of it;
    - q and k after RoPE, v, and the attention output (o_proj's input). With a padding mask transformers
      repeats k and v to every query head before SDPA, so they are kept at q's width; without one (SFT's
      collate passes none) SDPA takes the grouped heads as they are;
    - the MLP's gate and up outputs, act(gate) and act(gate) * up;
    - per token, each norm's fp32 reciprocal RMS and SDPA's fp32 log-sum-exp per head.

    Left out: a LoRA adapter's A output (r elements per adapted projection) and, with a padding mask, an fp32
    row of the mask per token (seq elements): each under 3% of the layer at the demo's sizes. Checked against
    the bytes autograd saves (``tests/test_memory.py``)."""
    h, act = dims.hidden, knobs.act_bytes
    weights = 2 if knobs.deepspeed_bf16 else knobs.weight_bytes
    q = dims.heads * dims.head_dim
    kv = q if padded and dims.kv_heads < dims.heads else dims.kv_heads * dims.head_dim
    normed = [] if knobs.tuning.is_peft else [(h, weights)] * 2
    projection_inputs = [(h, act)] * (5 if act < weights else 2)
    return ([(h, 4)] * 2 + normed + projection_inputs + [(q, act), (kv, act), (kv, act), (q, act)]
            + [(dims.intermediate, act)] * 4 + [(2, 4), (dims.heads, 4)])


def _layer_token_bytes(dims: ModelDims, knobs: _Knobs, padded: bool = True) -> int:
    """Bytes one decoder layer keeps for backward per token (``_layer_saved``)."""
    return sum(width * nbytes for width, nbytes in _layer_saved(dims, knobs, padded))


@dataclasses.dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch: ``total``, and ``heap``, the part in blocks small enough for glibc's
    heaps on a CPU (``CPU_HEAP_RETENTION``)."""

    total: int
    heap: int


def _tensors_bytes(tensors: list[tuple[int, int]], tokens: int, copies: int = 1) -> Activations:
    """``copies`` x the tensors (elements per token, bytes per element) over ``tokens`` tokens."""
    sizes = [tokens * width * nbytes for width, nbytes in tensors]
    return Activations(copies * sum(sizes), copies * sum(n for n in sizes if n <= GLIBC_MMAP_THRESHOLD_MAX))


def _train_activations(dims: ModelDims, knobs: _Knobs, seq: int, sequences: int, lm_head: bool,
                       padded: bool = True, logit_positions: int | None = None) -> Activations:
    """Activation bytes of one micro-batch forward+backward (``sequences`` x ``seq`` tokens; the LM head on the
    last ``logit_positions`` of each sequence, all of them by default)."""
    tokens = sequences * seq
    saved = _layer_saved(dims, knobs, padded)
    if knobs.grad_ckpt:
        # Only each layer's input is kept; one layer's activations exist during its recompute.
        inputs = _tensors_bytes(saved[:1], tokens, dims.layers)
        one = _tensors_bytes(saved, tokens)
        layers = Activations(inputs.total + one.total, inputs.heap + one.heap)
    else:
        layers = _tensors_bytes(saved, tokens, dims.layers)
    if not lm_head:
        return layers
    # LM loss: logits in the compute dtype, the fp32 log-softmax cross-entropy keeps, and its gradient.
    logit_tokens = sequences * min(seq, logit_positions or seq)
    logits = _tensors_bytes([(dims.vocab, knobs.act_bytes), (dims.vocab, 4), (dims.vocab, 4)], logit_tokens)
    return Activations(layers.total + logits.total, layers.heap + logits.heap)


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
        self._activations = Activations(0, 0)  # all of activations()' results: their heap-sized share

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

    def activations(self, seq: int, sequences: int, lm_head: bool, *, padded: bool = True,
                    logit_positions: int | None = None) -> int:
        """Activation bytes of one training micro-batch of ``sequences`` x ``seq`` tokens. ``padded``: the forward
        gets a padding mask (``_layer_saved``: k and v are then kept at every query head's width);
        ``logit_positions``: the LM head runs on that many last positions of each sequence (all by default)."""
        found = _train_activations(self.dims, self.knobs, seq, sequences, lm_head, padded, logit_positions)
        self._activations = Activations(self._activations.total + found.total, self._activations.heap + found.heap)
        return found.total

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

    def add_runtime(self) -> None:
        """What the process holds besides its models, added after the stage's own roles. On a CPU: ``runtime``,
        the stage process's own resident memory, and ``cpu_heap``, what glibc's heaps keep beyond the live
        activations once the gradients and optimizer states have taken their share of it. On an accelerator:
        ``runtime``, the CUDA context."""
        if not self.knobs.cpu:
            self.roles.append(RoleMemory("runtime", other=CUDA_CONTEXT_BYTES))
            return
        peft = PEFT_RUNTIME_BYTES if self.knobs.tuning.is_peft else 0
        deepspeed = DEEPSPEED_RUNTIME_BYTES if self.knobs.deepspeed else 0
        self.roles.append(RoleMemory("runtime", other=CPU_RUNTIME_BYTES + peft + deepspeed))
        # the activations the roles hold at once, at the heap-sized share of those activations() computed
        held, computed = sum(r.activations for r in self.roles), self._activations
        heap = held * computed.heap // computed.total if computed.total else 0
        slack = int(CPU_HEAP_RETENTION * heap)
        filled = sum(r.grads + r.optimizer for r in self.roles)
        if slack > filled:
            self.roles.append(RoleMemory("cpu_heap", other=slack - filled))


def _estimate(cfg: RunConfig, stage: str, param_count: int | None, knobs: _Knobs, precision: str,
              dims_of: Callable[[str | None], ModelDims]) -> MemoryPlan:
    plan = MemoryBuilder(cfg, knobs, precision, param_count, dims_of)
    spec_of(cfg, stage).memory_estimate(cfg, plan)
    plan.add_runtime()
    notes = [f"model dims from {plan.dims.source}", *plan.notes]
    if knobs.micro_batch:
        notes.append(f"activations for micro-batch {knobs.micro_batch}"
                     f"{' with gradient checkpointing' if knobs.grad_ckpt else ''} at the longest sequence allowed")
    notes.append("runtime: the stage process's own resident memory (a CPU plan counts RSS)" if knobs.cpu else
                 f"runtime: the CUDA context, ~{CUDA_CONTEXT_BYTES / GIB:.1f} GiB outside torch's allocator")
    return MemoryPlan(stage, plan.world, knobs.zero_stage, knobs.offload_optimizer, knobs.offload_param, precision,
                      plan.dims, plan.roles, notes)


def _alternatives(cfg: RunConfig, stage: str, knobs: _Knobs, precision: str,
                  estimate_with: Callable[[_Knobs], MemoryPlan]) -> list[Alternative]:
    """Re-estimate the plan under the usual ways out of an OOM, each with the overrides that do it (the keys
    of the stage's ``StageSpec.training``; a stage that trains nothing has none)."""
    spec = spec_of(cfg, stage)
    shape = spec.training(cfg) if spec.training is not None else None
    if shape is None:
        return []
    tuning_key = shape.keys["tuning"]
    tuning_section = tuning_key.rsplit(".", 1)[0]
    small_batch = shape.keys["small_batch"].split()
    zero3 = [f"{shape.keys['deepspeed']}=configs/deepspeed/zero3.json"]
    zero3_offload = [f"{shape.keys['deepspeed']}=configs/deepspeed/zero3_offload.json"]
    lora_r = 16

    def adapter(method: str) -> TuningConfig:  # the stage's tuning settings with a LoRA-family method
        return knobs.tuning.model_copy(update={"method": method, "lora_r": lora_r})

    lora = [f"{tuning_key}=lora", f"{tuning_section}.lora_r={lora_r}"]
    ds_bf16 = precision == "bf16"  # our JSONs have bf16 "auto": DeepSpeed mixed precision when bf16

    options: list[tuple[str, list[str], dict[str, Any]]] = []
    if not knobs.tuning.is_peft:
        options.append(("LoRA", lora, dict(tuning=adapter("lora"))))
    if knobs.tuning.method != "qlora":
        options.append(("QLoRA, 4-bit base (needs bitsandbytes on CUDA)",
                        [f"{tuning_key}=qlora", f"{tuning_section}.lora_r={lora_r}"],
                        dict(tuning=adapter("qlora"))))
    if knobs.zero_stage < 3:
        options.append(("ZeRO-3", zero3,
                        dict(zero_stage=3, offload_optimizer=False, offload_param=False, deepspeed_bf16=ds_bf16,
                             deepspeed=True)))
    if not (knobs.offload_optimizer and knobs.offload_param):
        options.append(("ZeRO-3 + CPU offload", zero3_offload,
                        dict(zero_stage=3, offload_optimizer=True, offload_param=True, deepspeed_bf16=ds_bf16,
                             deepspeed=True)))
    if knobs.micro_batch > 1 or not knobs.grad_ckpt:
        options.append(("micro-batch 1 + gradient checkpointing", small_batch, dict(micro_batch=1, grad_ckpt=True)))
    if shape.smaller_rollout_batch and knobs.rollout_batch > 1:
        options.append(("smaller rollout batch", shape.keys["rollout_batch"].split(),
                        dict(rollout_batch=shape.smaller_rollout_batch)))
    # Combined remedies, for the cases no single change rescues.
    combined: dict[str, Any] = dict(zero_stage=3, offload_optimizer=True, offload_param=True, deepspeed_bf16=ds_bf16,
                                    micro_batch=1, grad_ckpt=True, deepspeed=True)
    options.append(("ZeRO-3 + CPU offload + micro-batch 1 + gradient checkpointing", zero3_offload + small_batch,
                    combined))
    if not knobs.tuning.is_peft:
        options.append(("LoRA + ZeRO-3 + CPU offload + micro-batch 1 + gradient checkpointing",
                        lora + zero3_offload + small_batch,
                        dict(combined, tuning=adapter("lora"))))
    return [Alternative(how, overrides, estimate_with(dataclasses.replace(knobs, **changes)))
            for how, overrides, changes in options]


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
