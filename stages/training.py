"""The training mechanism every trainer shares (the SFT/RM ``Engine`` and ``PPOTrainer``).

One home for what is not the algorithm:

- ``Checkpoints``: ``checkpoints/step-N`` folders written under a temporary name (``.tmp-step-N``),
  indexed (``index.json``: size + SHA-256 of every file), renamed into place, only the last two kept;
  resume takes the newest folder that matches its index (falling back to the previous one, saying so);
  a save that cannot write (full disk) keeps the previous checkpoint and stops with
  ``CheckpointWriteError``;
- ``save_state`` / ``load_state``, ``save_weights`` / ``load_weights``: the project's resumable state
  as JSON + safetensors, loaded without unpickling anything. One exception, a library's: DeepSpeed
  writes its engine checkpoints (``mp_rank_*_model_states.pt``, ``*_optim_states.pt``) with
  ``torch.save`` and reads them back with ``torch.load``, unpickling (``weights_only`` off). We hand
  it only folders under the run's own ``checkpoints/`` that match the index written when they were
  saved (docs/ARCHITECTURE.md, "Checkpoints");
- ``rng_state`` / ``set_rng_state``: python, numpy, torch and CUDA generator states (per rank);
- ``start_reproducibly``: a stage process's generators seeded from the run's seed, and (``determinism``)
  torch's deterministic kernels, before anything is built;
- ``trainable_state`` / ``load_trainable``: the weights a checkpoint keeps and puts back;
- ``disable_dropout``: dropout off in a built model (modules, the probabilities attention modules copied
  from the config, the config), so a train-mode forward equals an eval-mode one;
- ``build_optimizer``: AdamW + a warm-up/cosine/linear/constant ``LambdaLR`` schedule;
- ``loss_weight``: what a micro-batch's mean loss is multiplied by so that the accumulated gradient is the
  mean over every loss unit (target token, pair) of the global batch, however it is split;
- ``step_without_update``: a DeepSpeed boundary step that discards the accumulated gradient and moves
  nothing (weights, optimiser state, schedule), as a skipped step of the plain loop;
- ``init_deepspeed``: a model, its optimiser and schedule -> a DeepSpeed engine (the JSON's ``auto``
  values filled from the run; DeepSpeed's CPU Adam when the JSON offloads the optimiser);
- ``save_final_model``: ``model/`` (+ ``adapter/``) and the tokenizer on rank 0, ZeRO-3 shards gathered.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import resolve_path
from pipeline.manifest import atomic_write_text
from stages.stopping import note_checkpoint_seconds

KEEP_CHECKPOINTS = 2


# ------------------------------------------------------------------------------------ checkpoints
class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, ...); the previous checkpoint is kept."""


class Checkpoints:
    """``root/step-N`` folders, published atomically and verified on resume. Collective when
    ``world_size > 1``: every rank calls ``save`` (or ``stage`` and ``publish``) and ``latest`` (rank 0
    touches the file system, the others wait at barriers).

    A save writes into ``.tmp-step-N``; ``publish`` adds ``index.json`` (the size and SHA-256 of every
    file in the folder), renames the folder to ``step-N``, points ``latest`` at it and keeps the newest
    two. ``latest()`` returns the newest ``step-N`` whose files all match its index, saying which newer
    ones it skipped and why, so a kill at any point of a save, or a damaged file, falls back to the
    previous checkpoint.
    """

    def __init__(self, root: Path, is_main: bool, world_size: int):
        self.root, self.is_main, self.world_size = Path(root), is_main, world_size

    def _barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    @staticmethod
    def tag(step: int) -> str:
        return f"step-{step}"

    def stage(self, step: int) -> Path:
        """An empty ``.tmp-step-N`` folder to write step ``step``'s checkpoint into (all ranks get its path)."""
        tmp = self.root / f".tmp-{self.tag(step)}"
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step-*"):  # left by a save that was killed
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self._barrier()
        return tmp

    def publish(self, step: int) -> Path:
        """Index the staged folder, rename it to ``step-N``, point ``latest`` at it, drop all but the newest two."""
        tag = self.tag(step)
        final = self.root / tag
        self._barrier()  # every rank has finished writing
        if self.is_main:
            tmp = self.root / f".tmp-{tag}"
            _write_index(tmp, step)
            if final.exists():
                shutil.rmtree(final)
            _rename(tmp, final)
            _point_latest(self.root, tag)
            _prune(self.root)
        self._barrier()
        return final

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """``write(folder)`` on every rank into a staged folder, then ``publish``. A failure to write (a full
        disk) removes the staged folder, keeps the previous checkpoint and raises ``CheckpointWriteError``
        on every rank with what happened."""
        started = time.perf_counter()
        tmp = self.stage(step)
        error: BaseException | None = None
        try:
            write(tmp)
        except OSError as exc:
            error = exc
        if self.world_size > 1:  # a rank that failed must not leave the others waiting at a barrier
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and error is None:
                error = OSError("another rank could not write its part of the checkpoint")
        if error is None:
            try:
                published = self.publish(step)
                note_checkpoint_seconds(time.perf_counter() - started)  # the margin before a deadline
                return published
            except OSError as exc:
                error = exc
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = self._newest_tag()
        kept = f"the previous checkpoint {previous} is kept" if previous else "there is no earlier checkpoint"
        raise CheckpointWriteError(
            getattr(error, "errno", None) or 0,
            f"could not write checkpoint {self.tag(step)} under {self.root}: {error}; {kept} and the run "
            f"resumes from it when started again (free disk space first if the disk is full)") from error

    def _newest_tag(self) -> str | None:
        steps = _step_folders(self.root)
        return steps[0].name if steps else None

    def latest(self) -> Path | None:
        """The newest ``step-N`` folder whose files match its index, or None when there is none. Rank 0
        verifies and tells the others."""
        choice: list[str | None] = [None]
        if self.is_main:
            found = self._verified()
            choice[0] = found.name if found is not None else None
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(choice, src=0)
        return self.root / choice[0] if choice[0] else None

    def _verified(self) -> Path | None:
        for folder in _step_folders(self.root):
            problem = verify_checkpoint(folder)
            if problem is None:
                return folder
            print(f"[alignpipe] checkpoint {folder} is incomplete or damaged ({problem}); "
                  "falling back to the previous one", flush=True)
        return None


INDEX = "index.json"
INDEX_FORMAT = 1


def _step_folders(root: Path) -> list[Path]:
    """``root/step-N`` folders (real folders inside ``root``, no links), newest first."""
    if not root.is_dir():
        return []
    found = [q for q in root.glob("step-*") if q.is_dir() and not q.is_symlink() and q.name[5:].isdigit()]
    return sorted(found, key=lambda q: int(q.name[5:]), reverse=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(q for q in folder.rglob("*") if q.is_file() and q.name != INDEX)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_index(folder: Path, step: int) -> None:
    """``folder/index.json``: size and SHA-256 of every file (flushed to disk first)."""
    files = {}
    for path in _files(folder):
        _fsync(path)
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    _write_json(folder / INDEX, {"format": INDEX_FORMAT, "step": step, "files": files})
    _fsync(folder)


def verify_checkpoint(folder: Path) -> str | None:
    """None when every file ``folder/index.json`` lists is there with its size and SHA-256, else what is wrong."""
    try:
        index = json.loads((folder / INDEX).read_text())
        files = index["files"]
    except FileNotFoundError:
        return f"no {INDEX}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {INDEX}: {exc}"
    if index.get("format") != INDEX_FORMAT:
        return f"{INDEX} format {index.get('format')!r}, expected {INDEX_FORMAT}"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the index says {want['bytes']}"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


# The steps of a publish, as functions so that tests can stop a save between any two of them.
def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)
    _fsync(dst.parent)


def _point_latest(root: Path, tag: str) -> None:
    atomic_write_text(root / "latest", tag)  # informational: ``latest()`` picks the newest verified folder


def _prune(root: Path) -> None:
    for old in _step_folders(root)[KEEP_CHECKPOINTS:]:
        shutil.rmtree(old, ignore_errors=True)


def trim_logs_after(folder: Path, step: int, names: tuple[str, ...] = ("metrics.jsonl",)) -> None:
    """Drop the rows of ``folder/NAME`` logged after ``step``: on resume they belong to the lost part of
    the run (a kill after logging, or a fallback to an older checkpoint) and are logged again."""
    for name in names:
        path = folder / name
        if path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= step]
            atomic_write_text(path, "".join(line + "\n" for line in keep))


# ------------------------------------------------------------------ state files: JSON + safetensors
# Resumable state (optimiser and schedule state dicts, RNG states, counters, controllers) is a tree of
# dicts, lists, tuples, numbers, strings and tensors. ``save_state`` writes its tensors to
# ``NAME.safetensors`` and the rest to ``NAME.json`` (a tensor becomes {"__tensor__": key}, a tuple
# {"__tuple__": [...]}, a dict with non-string keys {"__items__": [[key, value], ...]}); ``load_state``
# rebuilds it. Nothing is unpickled.
def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path))


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh)


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                              for k, v in obj.items()]}
    raise TypeError(f"checkpoint state {where}: {type(obj).__name__} cannot be written as JSON/safetensors")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode_key(k): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _decode_key(key: Any) -> Any:
    return tuple(key["__tuple__"]) if isinstance(key, dict) and "__tuple__" in key else key


def save_state(folder: Path, name: str, state: Any) -> None:
    """Write ``state`` as ``folder/NAME.safetensors`` (its tensors) + ``folder/NAME.json`` (the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, name)
    _write_tensors(folder / f"{name}.safetensors", tensors)
    _write_json(folder / f"{name}.json", {"format": INDEX_FORMAT, "state": tree})


def load_state(folder: Path, name: str) -> Any:
    """The state ``save_state(folder, name, ...)`` wrote (tensors on the CPU)."""
    tensors = load_file(str(folder / f"{name}.safetensors"))
    return _decode(json.loads((folder / f"{name}.json").read_text())["state"], tensors)


def save_weights(folder: Path, name: str, weights: dict[str, torch.Tensor]) -> None:
    """Named weights (``trainable_state``) as ``folder/NAME.safetensors``."""
    _write_tensors(folder / f"{name}.safetensors", {k: v.contiguous() for k, v in weights.items()})


def load_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / f"{name}.safetensors"))


# -------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """This process's generator states (numpy's array as a list, so DeepSpeed's client state can hold it)."""
    return {
        "python": random.getstate(),
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


#: cuBLAS's workspace setting that makes its GEMMs deterministic (read when its handle is made)
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


def start_reproducibly(seed: int, deterministic: bool) -> None:
    """Put a stage process in a known state before it builds anything (``stages.run_stage`` calls it first).

    The python, numpy and torch generators are seeded with ``seed``: torch's own starting seed differs in
    every new process, so anything drawn before a stage seeds for itself would differ between two runs of
    one config. ``deterministic`` (the run's ``determinism``) asks torch for deterministic kernels
    (``torch.use_deterministic_algorithms``; an op without one warns instead of failing the stage), sets
    ``CUBLAS_WORKSPACE_CONFIG`` for CUDA (unless already set) and turns cuDNN's autotuner off. It leaves
    torch's filling of every new uninitialised tensor off (``fill_uninitialized_memory``, on by default in
    that mode): it only hides kernels that read memory they never wrote, and it is the mode's CPU cost.
    The price is measured in docs/RESULTS.md ("Determinism"). Runs with different thread counts
    (``train.num_threads``) still differ in the last bits: a CPU reduction is split by thread.
    """
    seed_everything(seed)
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


# ----------------------------------------------------------------------------------------- weights
def trainable_state(model: Any, everything: bool = False) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that train (all of them with ``everything``: an unfreezer may turn
    any of them on, so all must come back on resume)."""
    return {n: q.detach().cpu().clone() for n, q in model.named_parameters() if q.requires_grad or everything}


@torch.no_grad()
def load_trainable(model: Any, state: dict[str, torch.Tensor]) -> None:
    named = dict(model.named_parameters())
    for name, value in state.items():
        named[name].copy_(value)


_DROPOUT_MODULES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                    torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def _is_probability(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def disable_dropout(model: Any) -> Any:
    """Turn dropout off in a built model, in place; returns ``model``.

    Setting ``config.attention_dropout`` after the model is built is not enough: transformers' attention
    modules copy it at construction (``self.attention_dropout``) and hand it to the attention kernel in
    train mode. So this sets p = 0 on every dropout module (PEFT's ``lora_dropout`` included), 0 on every
    number-valued module attribute whose name says it is a dropout probability (``attention_dropout``,
    ``dropout``, ``attn_dropout``, ...) and on the same keys of every config the modules hold (plus
    GPT-2-style ``*_pdrop``), so that anything built from the config later has none either. Afterwards a
    forward in train mode (needed for gradient checkpointing) computes exactly what eval mode does.
    """
    configs: dict[int, Any] = {}
    for module in model.modules():
        if isinstance(module, _DROPOUT_MODULES):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and _is_probability(value):
                setattr(module, name, 0.0)
        config = vars(module).get("config")
        if config is not None and hasattr(config, "to_dict"):
            configs[id(config)] = config
    for config in configs.values():
        for sub in [config, *(v for v in vars(config).values() if hasattr(v, "to_dict") and hasattr(v, "__dict__"))]:
            for name, value in list(vars(sub).items()):
                if ("dropout" in name or name.endswith("pdrop")) and _is_probability(value):
                    setattr(sub, name, 0.0)
    return model


# ------------------------------------------------------------------------------ optimiser, schedule
def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def build_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, schedule: str, warmup: int,
                    total: int, **adamw_kwargs: Any) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over ``params`` and its ``LambdaLR`` schedule (``warmup`` then ``schedule`` up to ``total`` steps)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **adamw_kwargs)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup, total))


def loss_weight(units: float, global_units: float, world_size: int, accumulation: int) -> float:
    """The factor a micro-batch's mean loss is multiplied by before the backward that divides it by
    ``accumulation`` (the plain loop's ``loss / accumulation``, or DeepSpeed's own 1/gradient_accumulation_steps).

    Ranks average their gradients (DDP, DeepSpeed) and the backward divides by ``accumulation``, so with
    this weight the optimiser sees ``sum over every unit of the global batch / global_units``: each target
    token (or pair) weighs the same, whatever the micro-batch size, accumulation count and world size
    (the normalisation of transformers' ``num_items_in_batch``).

    Args:
        units: loss units (target tokens, pairs) of this micro-batch, the count its mean loss is over.
        global_units: units of every micro-batch of the optimiser step on every rank (the same number on
            every rank: summed across ranks before the first backward).
        world_size: ranks whose gradients are averaged.
        accumulation: micro-batches per optimiser step (what the backward divides by).
    Returns:
        ``units * world_size * accumulation / global_units`` (0 for a micro-batch without units).
    """
    return units * world_size * accumulation / max(global_units, 1.0)


@contextmanager
def step_without_update(engine: Any) -> Iterator[None]:
    """Inside it, a DeepSpeed ``engine.step()`` at an accumulation boundary discards the accumulated
    gradient and moves nothing: the weights, the optimiser state (Adam's moments and step count, weight
    decay) and the learning-rate schedule stay as they were, as when the plain loop skips
    ``optimizer.step()`` and ``scheduler.step()`` and zeroes the gradients.

    DeepSpeed's own bookkeeping still runs (the gradients are reduced and cleared, the micro-step
    counter advances, so the next step's accumulation boundary is where it should be): only the update
    of the torch optimiser it wraps (ours, ``build_optimizer``'s, or the CPU Adam of an offload config) and
    the schedule's step are switched off. The ZeRO wrapper then copies the unchanged fp32 master weights
    back into the model's."""
    inner = engine.basic_optimizer
    own_step = inner.__dict__.get("step")  # the LR schedule may have wrapped it on the instance
    schedule = engine.lr_scheduler
    inner.step = lambda *args, **kwargs: None
    engine.lr_scheduler = None
    try:
        yield
    finally:
        if own_step is None:
            del inner.step
        else:
            inner.step = own_step
        engine.lr_scheduler = schedule


def init_deepspeed(model: Any, optimizer: Any, scheduler: Any, ds_path: str, *, micro_batch: int, grad_accum: int,
                   world_size: int, lr: float, weight_decay: float, max_grad_norm: float | None, bf16: bool,
                   hidden_size: int | None = None) -> tuple[Any, Any, Any, dict[str, Any]]:
    """-> (engine, optimizer, scheduler, the filled DeepSpeed config) for ``model``.

    An optimiser-offload JSON only accepts DeepSpeed's CPU Adam (compiled on first use, ~2 min): the
    optimiser is rebuilt as one over the same parameters, with the same schedule function.
    """
    import deepspeed

    from pipeline.deepspeed_check import fill_auto, needs_ds_cpu_adam, skip_comm_op_build

    raw = json.loads(resolve_path(ds_path).read_text())
    if needs_ds_cpu_adam(raw):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer = DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scheduler.lr_lambdas[0])
    extra = {"hidden_size": hidden_size} if hidden_size is not None else {}
    ds_config = fill_auto(raw, micro_batch=micro_batch, grad_accum=grad_accum, world_size=world_size, lr=lr,
                          max_grad_norm=max_grad_norm, bf16=bf16, **extra)
    skip_comm_op_build()  # no C++ build at start-up: the optimiser is torch's, the collectives torch.distributed's
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config)
    return engine, optimizer, scheduler, ds_config


def zero_stage_of(ds_config: dict[str, Any] | None) -> int:
    return int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))


# ------------------------------------------------------------------------------------- final save
def save_final_model(model: Any, tokenizer: Any, run: Any, tuning: Any, base: str | None, model_cfg: Any,
                     kind: str, zero_stage: int, world_size: int) -> None:
    """Save ``model/`` (+ ``adapter/``) and the tokenizer on rank 0; gathers ZeRO-3 shards first
    (collective: call on every rank, DESIGN §5.6)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if run.is_main:
                _write_model(model, tokenizer, run, tuning, base, model_cfg, kind)
    elif run.is_main:
        _write_model(model, tokenizer, run, tuning, base, model_cfg, kind)
    if world_size > 1:
        torch.distributed.barrier()


def _write_model(model: Any, tokenizer: Any, run: Any, tuning: Any, base: str | None, model_cfg: Any,
                 kind: str) -> None:
    from pipeline.models import save_tokenizer
    from stages.tuning import save_trained

    out: Path = run.dir
    for sub in ("model", "adapter"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    model.config.use_cache = True
    info = save_trained(model, tokenizer, out, tuning, base, model_cfg, kind=kind)
    save_tokenizer(tokenizer, out)
    if (out / "model").exists():
        save_tokenizer(tokenizer, out / "model")  # model/ loads on its own (serving, other tools)
    run.update(**info)
