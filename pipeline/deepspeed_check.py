"""DeepSpeed JSON handling: fill "auto" values for our engine, and validate a JSON offline.

A DeepSpeed mistake usually surfaces minutes into a cluster job, after the allocation has waited in the
queue and every rank has loaded the model. ``validate_ds_config`` catches those mistakes on a laptop in
seconds, in four layers, each catching mistakes the ones before it let through:

1. Hugging Face finalisation (``TrainingArguments(deepspeed=...)`` + ``HfTrainerDeepSpeedConfig``):
   lr / batch / clipping / precision values that contradict the run's settings.
2. DeepSpeed's own parser (``deepspeed.runtime.config.DeepSpeedConfig``) at the cluster's world size:
   ZeRO stage 4, typos *inside* ``zero_optimization``, a bad offload device, fp16+bf16 both on, batch
   arithmetic.
3. Top-level keys against a known list: DeepSpeed ignores unknown top-level keys, so
   ``zero_optimisation`` silently means "no ZeRO".
4. ``deepspeed.initialize`` + one optimizer step on a tiny model (``initialize_one_step``), which needs
   a fresh process because it creates a process group; ``run_initialize_check`` starts that process.

``fill_auto`` is what ``stages/engine.py`` uses before ``deepspeed.initialize``: our engine passes a
torch optimizer and scheduler itself, so it cannot lean on HF's Trainer to fill "auto".

Nothing here imports torch/transformers/deepspeed at module import time (the orchestrator imports this
module to validate configs before launching anything).
"""

from __future__ import annotations

import copy
import difflib
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from typing import Any

from pipeline.config import REPO_ROOT, resolve_path

# Top-level keys DeepSpeed 0.19 reads (deepspeed/runtime/config.py and the config sections it builds,
# https://www.deepspeed.ai/docs/config-json/). Anything else at the top level is ignored by DeepSpeed,
# which is how a typo silently disables a feature.
KNOWN_TOP_LEVEL_KEYS: frozenset[str] = frozenset(
    {
        # batch / optimisation
        "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
        "managed_gradient_accumulation", "gradient_clipping", "optimizer", "scheduler",
        "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "prescale_gradients",
        "gradient_predivide_factor", "gradient_allreduce_op", "sparse_gradients",
        # precision
        "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "data_types", "communication_data_type",
        "seq_parallel_communication_data_type",
        # ZeRO and memory
        "zero_optimization", "activation_checkpointing", "aio", "nvme", "checkpoint",
        "load_universal_checkpoint", "use_node_local_storage",
        # communication / parallelism
        "disable_allgather", "comms_logger", "pipeline", "tensor_parallel", "expert_parallel",
        "use_data_before_expert_parallel_", "sequence_parallel_size", "elasticity", "hybrid_engine",
        # logging / monitoring / profiling
        "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state", "disable_python_gc",
        "tensorboard", "wandb", "csv_monitor", "comet", "flops_profiler", "timers", "log_level",
        "autotuning",
        # data / compression / misc features
        "dataloader_drop_last", "data_efficiency", "curriculum_learning", "compression_training",
        "weight_quantization", "quantize_training", "sparse_attention", "compile", "datastates_ckpt",
        "vocabulary_size", "eigenvalue", "progressive_layer_drop", "zenflow",
    }
)

# Pydantic model titles in DeepSpeed's config classes -> the JSON section they validate, so that a
# DeepSpeed validation error can name the full key path (``zero_optimization.stage``).
_DS_MODEL_SECTIONS: dict[str, str] = {
    "DeepSpeedZeroConfig": "zero_optimization",
    "DeepSpeedZeroOffloadOptimizerConfig": "zero_optimization.offload_optimizer",
    "DeepSpeedZeroOffloadParamConfig": "zero_optimization.offload_param",
    "DeepSpeedFP16Config": "fp16",
    "DeepSpeedBF16Config": "bf16",
    "DeepSpeedMonitorConfig": "<monitor>",
    "CompileConfig": "compile",
}

# DeepSpeed defaults used when a hidden-size based "auto" must be filled without a model at hand.
_DS_DEFAULT_REDUCE_BUCKET = 500_000_000
_DS_DEFAULT_PREFETCH_BUCKET = 50_000_000
_DS_DEFAULT_PERSISTENCE_THRESHOLD = 100_000


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed JSON is unreadable or contradicts the run; the message names the file and key."""


# ------------------------------------------------------------------------------------------- loading
def load_ds_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a DeepSpeed JSON (paths relative to the repo root), with ``file:line`` on syntax errors."""
    file = resolve_path(path)
    if not file.exists():
        raise DeepSpeedConfigError(f"DeepSpeed config not found: {path} (looked at {file})")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise DeepSpeedConfigError(f"{path}: the top level must be a JSON object, got {type(data).__name__}")
    return data


def zero_settings(ds_config: dict[str, Any]) -> tuple[int, bool, bool]:
    """(ZeRO stage, optimizer offloaded to cpu/nvme, parameters offloaded to cpu/nvme) of a config."""
    zero = ds_config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))

    def offloaded(section: str) -> bool:
        device = (zero.get(section) or {}).get("device", "none")
        return str(device).lower() in ("cpu", "nvme")

    return stage, offloaded("offload_optimizer"), offloaded("offload_param")


def needs_ds_cpu_adam(ds_config: dict[str, Any]) -> bool:
    """True when ``deepspeed.initialize`` will refuse a plain torch optimizer.

    With optimizer offload DeepSpeed raises unless the client optimizer is
    ``deepspeed.ops.adam.DeepSpeedCPUAdam`` (or ``zero_force_ds_cpu_optimizer`` is false), so the
    engine must build that one instead of ``torch.optim.AdamW`` (it compiles cpu_adam on first use).
    """
    _, offload_optimizer, _ = zero_settings(ds_config)
    return offload_optimizer and bool(ds_config.get("zero_force_ds_cpu_optimizer", True))


# -------------------------------------------------------------------------------------- auto filling
def _get(config: dict[str, Any], dotted: str) -> tuple[dict[str, Any] | None, str]:
    """The dict holding the last part of ``dotted`` (None if an intermediate section is absent)."""
    node: Any = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None, parts[-1]
    return (node if isinstance(node, dict) else None), parts[-1]


def _fill(config: dict[str, Any], dotted: str, value: Any, *, must_match: bool, problems: list[str]) -> None:
    """Replace "auto" at ``dotted`` by ``value``; record a contradiction if a concrete value differs."""
    node, key = _get(config, dotted)
    if node is None or key not in node:
        return
    current = node[key]
    if current == "auto":
        node[key] = value
    elif must_match and current != value:
        problems.append(f"{dotted}={current!r} contradicts the run's value {value!r} (set it to \"auto\")")


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every value still equal to "auto"."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _find_auto(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == "auto" else []


def _fill_batch(config: dict[str, Any], problems: list[str], micro_batch: int, grad_accum: int, world_size: int,
                check: bool) -> None:
    """Batch arithmetic: DeepSpeed asserts train = micro x accum x world, but only once the job runs."""
    _fill(config, "train_micro_batch_size_per_gpu", micro_batch, must_match=check, problems=problems)
    _fill(config, "gradient_accumulation_steps", grad_accum, must_match=check, problems=problems)
    expected_train = micro_batch * grad_accum * world_size
    if check and config.get("train_batch_size", "auto") != "auto":
        if config["train_batch_size"] != expected_train:
            problems.append(
                f"train_batch_size={config['train_batch_size']!r} != micro batch {micro_batch} x grad accumulation "
                f"{grad_accum} x world size {world_size} = {expected_train} (set it to \"auto\")"
            )
    _fill(config, "train_batch_size", expected_train, must_match=False, problems=problems)


def _fill_precision(config: dict[str, Any], problems: list[str], bf16: bool, check: bool) -> None:
    """Precision: we never train in fp16 (DESIGN §5.2), so an "auto" fp16 is always off."""
    _fill(config, "bf16.enabled", bool(bf16), must_match=check, problems=problems)
    _fill(config, "fp16.enabled", False, must_match=False, problems=problems)
    if check:
        fp16_on = (config.get("fp16") or {}).get("enabled") is True
        bf16_on = (config.get("bf16") or {}).get("enabled") is True
        if fp16_on and bf16_on:
            problems.append("fp16.enabled and bf16.enabled are both true; DeepSpeed allows only one")
        elif fp16_on:
            problems.append(
                "fp16.enabled=true but alignpipe trains in bf16 or fp32 (fp16 diverges; refused on CPU); "
                "set fp16.enabled to false or remove the fp16 section"
            )


def _fill_optimizer(config: dict[str, Any], problems: list[str], lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float, num_training_steps: int | None, warmup_steps: int | None,
                    check: bool) -> None:
    """Optimizer / scheduler sections exist only when a JSON names them (ours do not, see the notes)."""
    _fill(config, "optimizer.params.lr", lr, must_match=check, problems=problems)
    _fill(config, "optimizer.params.betas", list(betas), must_match=check, problems=problems)
    _fill(config, "optimizer.params.eps", eps, must_match=check, problems=problems)
    _fill(config, "optimizer.params.weight_decay", weight_decay, must_match=check, problems=problems)
    _fill(config, "scheduler.params.warmup_min_lr", 0, must_match=False, problems=problems)
    _fill(config, "scheduler.params.warmup_max_lr", lr, must_match=check, problems=problems)
    if num_training_steps is not None:
        _fill(config, "scheduler.params.total_num_steps", num_training_steps, must_match=check, problems=problems)
    if warmup_steps is not None:
        # deepspeed>=0.19.6 rejects warmup_num_steps <= 0 (transformers clamps the same way).
        _fill(config, "scheduler.params.warmup_num_steps", max(1, warmup_steps), must_match=False, problems=problems)


def _fill_buckets(config: dict[str, Any], problems: list[str], hidden_size: int | None) -> None:
    """Bucket sizes: HF's rules when the hidden size is known, DeepSpeed's defaults otherwise."""
    _fill(
        config, "zero_optimization.reduce_bucket_size",
        hidden_size * hidden_size if hidden_size else _DS_DEFAULT_REDUCE_BUCKET, must_match=False, problems=problems,
    )
    _fill(
        config, "zero_optimization.stage3_prefetch_bucket_size",
        int(0.9 * hidden_size * hidden_size) if hidden_size else _DS_DEFAULT_PREFETCH_BUCKET,
        must_match=False, problems=problems,
    )
    _fill(
        config, "zero_optimization.stage3_param_persistence_threshold",
        10 * hidden_size if hidden_size else _DS_DEFAULT_PERSISTENCE_THRESHOLD, must_match=False, problems=problems,
    )


def _fill_all(
    ds_config: dict[str, Any],
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    lr: float,
    max_grad_norm: float | None,
    bf16: bool,
    hidden_size: int | None,
    num_training_steps: int | None,
    warmup_steps: int | None,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    check: bool,
) -> tuple[dict[str, Any], list[str]]:
    """Shared body of ``fill_auto``: returns the filled copy and the contradictions found."""
    for name, value in (("micro_batch", micro_batch), ("grad_accum", grad_accum), ("world_size", world_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    config = copy.deepcopy(ds_config)
    problems: list[str] = []
    _fill_batch(config, problems, micro_batch, grad_accum, world_size, check)
    # DeepSpeed's gradient_clipping 0.0 means "off", which is what max_grad_norm=None means for us.
    _fill(config, "gradient_clipping", float(max_grad_norm or 0.0), must_match=check, problems=problems)
    _fill_precision(config, problems, bf16, check)
    _fill_optimizer(config, problems, lr, betas, eps, weight_decay, num_training_steps, warmup_steps, check)
    _fill_buckets(config, problems, hidden_size)

    if check:
        for dotted in _find_auto(config):
            problems.append(
                f"{dotted}=\"auto\" has no value to fill it from (fill_auto knows batch sizes, lr, clipping, "
                "precision, optimizer/scheduler params and ZeRO bucket sizes); give it a concrete value"
            )
    return config, problems


def fill_auto(
    ds_config: dict[str, Any],
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    lr: float,
    max_grad_norm: float | None,
    bf16: bool,
    hidden_size: int | None = None,
    num_training_steps: int | None = None,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> dict[str, Any]:
    """Return a copy of ``ds_config`` with every "auto" replaced by the run's value.

    ``train_batch_size`` becomes micro x accum x world; ``gradient_clipping`` ``max_grad_norm`` (0.0 =
    off); ``bf16.enabled`` ``bf16``; ZeRO bucket sizes follow HF's hidden-size rules (DeepSpeed's
    defaults if ``hidden_size`` is None). A concrete value that contradicts the run (e.g.
    ``train_batch_size: 64`` when the product is 16, ``bf16.enabled: true`` for an fp32 run, fp16 on)
    raises ``ValueError`` naming the key, as does an "auto" this function cannot fill.
    """
    config, problems = _fill_all(
        ds_config, micro_batch=micro_batch, grad_accum=grad_accum, world_size=world_size, lr=lr,
        max_grad_norm=max_grad_norm, bf16=bf16, hidden_size=hidden_size, num_training_steps=num_training_steps,
        warmup_steps=warmup_steps, weight_decay=weight_decay, betas=betas, eps=eps, check=True,
    )
    if problems:
        raise ValueError("DeepSpeed config does not match the run:\n  " + "\n  ".join(problems))
    return config


# ---------------------------------------------------------------------------------------- validation
def _ensure_ds_accelerator() -> None:
    """Pick DeepSpeed's cpu accelerator on GPU-less hosts before deepspeed is first imported.

    Without it DeepSpeed probes for CUDA, warns, and on some versions fails to pick a backend.
    """
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _no_shm_comm_op() -> None:
    """Stands in for ``deepspeed.comm.torch.build_shm_op``: no shared-memory op, so every collective is
    torch.distributed's."""
    return None


def skip_comm_op_build() -> None:
    """Keep ``deepspeed.initialize`` / ``deepspeed.init_distributed`` from compiling a C++ op.

    DeepSpeed's torch communication backend builds its shared-memory all-reduce op (``deepspeed_shm_comm``)
    whenever it starts on the CPU accelerator, used or not: with DS_BUILD_OPS=0 (how we install it) that is a
    JIT build at first use, which needs a C++ compiler and the Python headers and takes about a minute of
    cc1plus on a fresh machine. Only ``inference_all_reduce`` (DeepSpeed-Inference's tensor-parallel layers)
    calls the op; training's collectives are torch.distributed's (gloo on CPU, nccl on CUDA), so nothing is
    lost. On CUDA the accelerator offers no such op and this changes nothing. Call before DeepSpeed starts
    its communication backend; tests/test_deepspeed_configs.py checks that nothing is compiled.
    """
    # by module path: the attribute ``deepspeed.comm.torch`` is the torch package that deepspeed.comm imports
    backend = importlib.import_module("deepspeed.comm.torch")
    if hasattr(backend, "build_shm_op"):
        backend.build_shm_op = _no_shm_comm_op


def check_top_level_keys(ds_config: dict[str, Any]) -> list[str]:
    """Layer 3: unknown top-level keys (DeepSpeed ignores them silently), with a did-you-mean hint."""
    problems = []
    for key in ds_config:
        if key in KNOWN_TOP_LEVEL_KEYS:
            continue
        close = difflib.get_close_matches(key, sorted(KNOWN_TOP_LEVEL_KEYS), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        problems.append(f"unknown top-level key '{key}'{hint} (DeepSpeed would silently ignore it)")
    return problems


class _WorldSizeArgs:
    """TrainingArguments seen at another world size (HF computes train_batch_size from ``world_size``).

    TrainingArguments derives world_size from the live process group, which an offline check does not
    have; this proxy answers with the cluster's world size and forwards everything else.
    """

    def __init__(self, args: Any, world_size: int) -> None:
        self._args = args
        self.world_size = world_size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._args, name)


def _hf_layer(
    ds_config: dict[str, Any], *, world_size: int, micro_batch: int, grad_accum: int, lr: float, bf16: bool,
    max_grad_norm: float | None, hidden_size: int, num_training_steps: int,
) -> list[str]:
    """Layer 1: TrainingArguments + HfTrainerDeepSpeedConfig process/finalise at ``world_size``."""
    import types

    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    saved_env = dict(os.environ)
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            try:
                args = TrainingArguments(
                    output_dir=out_dir, deepspeed=copy.deepcopy(ds_config), use_cpu=True,
                    per_device_train_batch_size=micro_batch, gradient_accumulation_steps=grad_accum,
                    learning_rate=lr, bf16=bf16, max_grad_norm=float(max_grad_norm or 0.0), report_to=[],
                )
            except Exception as exc:  # HF raises ValueError/TypeError/AssertionError with its own text
                return [f"transformers TrainingArguments refused it: {type(exc).__name__}: {exc}"]
            # TrainingArguments processed the config at this machine's world size (1); redo it at the
            # cluster's, which is where batch arithmetic goes wrong.
            hf_config = HfTrainerDeepSpeedConfig(copy.deepcopy(ds_config))
            proxy = _WorldSizeArgs(args, world_size)
            try:
                hf_config.trainer_config_process(proxy)
                model_stub = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=hidden_size))
                hf_config.trainer_config_finalize(proxy, model_stub, num_training_steps)
            except Exception as exc:
                text = str(exc).replace("\n", " ").replace("  ", " ")
                return [f"transformers finalisation (world size {world_size}): {text}"]
            return []
    finally:
        # Constructing these objects sets process-wide state (a weakref that makes
        # is_deepspeed_zero3_enabled() true, accelerate's singleton state, env vars); a validation must
        # not change how this process later loads models.
        unset_hf_deepspeed_config()
        try:
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
        except Exception:  # accelerate internals moved: nothing to reset
            pass
        for key in set(os.environ) - set(saved_env):
            del os.environ[key]
        for key, value in saved_env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


class _FakeDist:
    """Stands in for ``deepspeed.comm`` while parsing, so the parser sees the cluster's world size.

    DeepSpeedConfig asks ``dist.get_rank()``/``get_world_size()`` and falls back to world size 1 when
    no process group exists, which would hide batch-arithmetic errors that only appear at scale.
    """

    def __init__(self, world_size: int) -> None:
        self._world_size = world_size

    def get_rank(self, group: Any = None) -> int:
        return 0

    def get_world_size(self, group: Any = None) -> int:
        return self._world_size


def _zero_keys() -> list[str]:
    """Valid keys of ``zero_optimization`` (field names and their JSON aliases), for hints."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:
        return []
    keys = []
    for name, field in DeepSpeedZeroConfig.model_fields.items():
        keys += [name] + ([field.alias] if field.alias else [])
    return keys


def _format_pydantic(exc: Any) -> list[str]:
    title = getattr(exc, "title", "?")
    section = _DS_MODEL_SECTIONS.get(title, title)
    lines = []
    for item in exc.errors():
        key = ".".join([section, *(str(p) for p in item["loc"])])
        got = item.get("input")
        got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
        hint = ""
        if item.get("type") == "extra_forbidden" and title == "DeepSpeedZeroConfig" and len(item["loc"]) == 1:
            close = difflib.get_close_matches(str(item["loc"][0]), _zero_keys(), n=1, cutoff=0.6)
            hint = f"; did you mean 'zero_optimization.{close[0]}'?" if close else ""
        lines.append(f"{key}: {item['msg']}{got_text}{hint}")
    return lines


def _deepspeed_layer(filled: dict[str, Any], *, world_size: int) -> list[str]:
    """Layer 2: DeepSpeed's own parser on the filled config at ``world_size``."""
    from unittest import mock

    _ensure_ds_accelerator()
    import deepspeed.runtime.config as ds_runtime_config
    from pydantic import ValidationError

    try:
        with mock.patch.object(ds_runtime_config, "dist", _FakeDist(world_size)):
            ds_runtime_config.DeepSpeedConfig(copy.deepcopy(filled))
    except ValidationError as exc:
        return [f"DeepSpeed parser: {line}" for line in _format_pydantic(exc)]
    except Exception as exc:  # DeepSpeed mostly uses bare asserts (AssertionError) and ValueError
        text = str(exc).replace("\n", " ") or type(exc).__name__
        return [f"DeepSpeed parser (world size {world_size}): {text}"]
    return []


def validate_ds_config(
    path: str | os.PathLike,
    world_size: int,
    micro_batch: int,
    grad_accum: int,
    lr: float,
    bf16: bool,
    *,
    max_grad_norm: float | None = 1.0,
    hidden_size: int = 4096,
    num_training_steps: int = 1000,
) -> list[str]:
    """Check a DeepSpeed JSON offline against a run's settings; return problems (empty: valid).

    Every message starts with the file and names the key. Runs layers 3, 1 and 2 of the module
    docstring (layer 4 needs its own process: ``run_initialize_check``). Call it before launching,
    not inside a training process: HF's config objects reset accelerate's process state.
    """
    label = str(path)
    try:
        ds_config = load_ds_config(path)
    except DeepSpeedConfigError as exc:
        return [str(exc)]
    problems = [f"{label}: {p}" for p in check_top_level_keys(ds_config)]

    try:
        _, fill_problems = _fill_all(
            ds_config, micro_batch=micro_batch, grad_accum=grad_accum, world_size=world_size, lr=lr,
            max_grad_norm=max_grad_norm, bf16=bf16, hidden_size=hidden_size,
            num_training_steps=num_training_steps, warmup_steps=max(1, num_training_steps // 20),
            weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, check=True,
        )
    except ValueError as exc:
        return problems + [f"{label}: {exc}"]
    problems += [f"{label}: alignpipe fill_auto: {p}" for p in fill_problems]

    problems += [
        f"{label}: {p}"
        for p in _hf_layer(
            ds_config, world_size=world_size, micro_batch=micro_batch, grad_accum=grad_accum, lr=lr, bf16=bf16,
            max_grad_norm=max_grad_norm, hidden_size=hidden_size, num_training_steps=num_training_steps,
        )
    ]

    # The parser sees what the job would see: "auto" filled, concrete values left as written, so its
    # own batch assertion fires on the same contradictions at the cluster's world size.
    lenient, _ = _fill_all(
        ds_config, micro_batch=micro_batch, grad_accum=grad_accum, world_size=world_size, lr=lr,
        max_grad_norm=max_grad_norm, bf16=bf16, hidden_size=hidden_size, num_training_steps=num_training_steps,
        warmup_steps=max(1, num_training_steps // 20), weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
        check=False,
    )
    problems += [f"{label}: {p}" for p in _deepspeed_layer(lenient, world_size=world_size)]
    return problems


# ------------------------------------------------------------------------------- layer 4: initialize
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize_one_step(
    path: str | os.PathLike, *, micro_batch: int = 2, grad_accum: int = 2, lr: float = 1e-3, bf16: bool = False
) -> dict[str, Any]:
    """Layer 4: ``deepspeed.initialize`` + one optimizer step on a tiny model, in THIS process.

    It creates a 1-process gloo group, so call it in a fresh process (``run_initialize_check`` does).
    The model is a two-layer MLP; the optimizer is ours (``torch.optim.AdamW``, or ``DeepSpeedCPUAdam``
    when the config offloads the optimizer) unless the JSON names one, in which case DeepSpeed builds
    it, which is how unknown optimizer/scheduler types are caught. Returns facts about the step.
    """
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    _ensure_ds_accelerator()
    import deepspeed
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    hidden = 32
    config = fill_auto(
        load_ds_config(path), micro_batch=micro_batch, grad_accum=grad_accum, world_size=1, lr=lr,
        max_grad_norm=1.0, bf16=bf16, hidden_size=hidden, num_training_steps=10, warmup_steps=1,
    )
    skip_comm_op_build()
    deepspeed.init_distributed(dist_backend="gloo")
    model = torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    optimizer: Any = None
    scheduler: Any = None
    if "optimizer" not in config:
        if needs_ds_cpu_adam(config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(model.parameters(), lr=lr)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        if "scheduler" not in config:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)

    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    losses = []
    for _ in range(grad_accum):
        x = torch.randn(micro_batch, 16)
        y = x.sum(dim=1, keepdim=True)
        out = engine(x.to(dtype))
        loss = torch.nn.functional.mse_loss(out.float(), y)  # loss in fp32 (DESIGN §5.2)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return {
        "ok": engine.global_steps == 1 and all(loss == loss for loss in losses),
        "global_steps": int(engine.global_steps),
        "zero_stage": int(engine.zero_optimization_stage()),
        "world_size": int(engine.world_size),
        "bf16": bool(engine.bfloat16_enabled()),
        "losses": losses,
    }


def run_initialize_check(
    path: str | os.PathLike, *, bf16: bool = False, timeout_s: float = 600.0
) -> list[str]:
    """Run ``initialize_one_step`` in a subprocess (DS_ACCELERATOR=cpu unless set); return problems."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    # A parent launched under torchrun would leak its rank variables into the child's process group.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "pipeline.deepspeed_check", "initialize", str(path)] + (["--bf16"] if bf16 else [])
    try:
        proc = subprocess.run(
            cmd, cwd=str(REPO_ROOT), env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return [f"{path}: deepspeed.initialize + one step did not finish within {timeout_s:.0f} s"]
    result_lines = [line for line in proc.stdout.splitlines() if line.startswith("ALIGNPIPE_RESULT ")]
    if proc.returncode != 0 or not result_lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return [f"{path}: deepspeed.initialize + one step failed (exit {proc.returncode}):\n{tail}"]
    result = json.loads(result_lines[-1].removeprefix("ALIGNPIPE_RESULT "))
    if not result.get("ok"):
        return [f"{path}: deepspeed.initialize ran but the step was not taken cleanly: {result}"]
    return []


def _main(argv: list[str]) -> int:
    """``python -m pipeline.deepspeed_check validate PATH --world-size N ...`` or ``initialize PATH``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.deepspeed_check", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    val = sub.add_parser("validate", help="layers 1-3 (offline)")
    val.add_argument("paths", nargs="+")
    val.add_argument("--world-size", type=int, default=2)
    val.add_argument("--micro-batch", type=int, default=4)
    val.add_argument("--grad-accum", type=int, default=1)
    val.add_argument("--lr", type=float, default=1e-5)
    val.add_argument("--bf16", action="store_true")
    init = sub.add_parser("initialize", help="layer 4 in this process (creates a gloo process group)")
    init.add_argument("path")
    init.add_argument("--bf16", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "initialize":
        result = initialize_one_step(args.path, bf16=args.bf16)
        print("ALIGNPIPE_RESULT " + json.dumps(result), flush=True)
        return 0 if result["ok"] else 1
    failed = False
    for path in args.paths:
        problems = validate_ds_config(path, args.world_size, args.micro_batch, args.grad_accum, args.lr, args.bf16)
        failed |= bool(problems)
        print("\n".join(problems) if problems else f"{path}: ok (world size {args.world_size})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
