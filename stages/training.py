"""The training mechanism every trainer shares (the SFT/RM ``Engine`` and ``PPOTrainer``).

One home for what is not the algorithm:

- ``Checkpoints``: ``checkpoints/step-N`` folders written under a temporary name (``.tmp-step-N``),
  renamed into place, ``latest`` naming the newest, only the last two kept;
- ``rng_state`` / ``set_rng_state``: python, numpy, torch and CUDA generator states (per rank);
- ``trainable_state`` / ``load_trainable``: the weights a checkpoint keeps and puts back;
- ``build_optimizer``: AdamW + a warm-up/cosine/linear/constant ``LambdaLR`` schedule;
- ``init_deepspeed``: a model, its optimiser and schedule -> a DeepSpeed engine (the JSON's ``auto``
  values filled from the run; DeepSpeed's CPU Adam when the JSON offloads the optimiser);
- ``save_final_model``: ``model/`` (+ ``adapter/``) and the tokenizer on rank 0, ZeRO-3 shards gathered.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.config import resolve_path
from pipeline.manifest import atomic_write_text

KEEP_CHECKPOINTS = 2


# ------------------------------------------------------------------------------------ checkpoints
class Checkpoints:
    """``root/step-N`` folders, published atomically. Collective when ``world_size > 1``: every rank
    calls ``stage`` and ``publish`` (rank 0 touches the file system, the others wait at barriers)."""

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
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self._barrier()
        return tmp

    def publish(self, step: int) -> Path:
        """Rename the staged folder to ``step-N``, point ``latest`` at it, drop all but the newest two."""
        tag = self.tag(step)
        final = self.root / tag
        self._barrier()  # every rank has finished writing
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(self.root / f".tmp-{tag}", final)
            atomic_write_text(self.root / "latest", tag)
            steps = sorted(self.root.glob("step-*"), key=lambda q: int(q.name.split("-")[1]))
            for old in steps[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def latest(self) -> Path | None:
        """The folder ``latest`` names, or None when there is no checkpoint."""
        pointer = self.root / "latest"
        return self.root / pointer.read_text().strip() if pointer.exists() else None


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


def init_deepspeed(model: Any, optimizer: Any, scheduler: Any, ds_path: str, *, micro_batch: int, grad_accum: int,
                   world_size: int, lr: float, weight_decay: float, max_grad_norm: float | None, bf16: bool,
                   hidden_size: int | None = None) -> tuple[Any, Any, Any, dict[str, Any]]:
    """-> (engine, optimizer, scheduler, the filled DeepSpeed config) for ``model``.

    An optimiser-offload JSON only accepts DeepSpeed's CPU Adam (compiled on first use, ~2 min): the
    optimiser is rebuilt as one over the same parameters, with the same schedule function.
    """
    import deepspeed

    from pipeline.deepspeed_check import fill_auto, needs_ds_cpu_adam

    raw = json.loads(resolve_path(ds_path).read_text())
    if needs_ds_cpu_adam(raw):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer = DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scheduler.lr_lambdas[0])
    extra = {"hidden_size": hidden_size} if hidden_size is not None else {}
    ds_config = fill_auto(raw, micro_batch=micro_batch, grad_accum=grad_accum, world_size=world_size, lr=lr,
                          max_grad_norm=max_grad_norm, bf16=bf16, **extra)
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
