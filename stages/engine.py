"""The training engine shared by the SFT and RM stages: a lean loop we own.

Why our own loop and not HF Trainer/TRL SFTTrainer: on small models the Trainer's per-step overhead
dominates (bench/sft.py: 1.40x the tokens/s of TRL's SFTTrainer, docs/RESULTS.md), HF Trainer under torchrun
on CPU is silently unsynchronised without ``use_cpu=True``, and RM needs pair-aware batching and
truncation that TRL's RewardTrainer does not do (it silently drops long pairs). One loop also gives one
checkpoint format and one resume path for every stage. ``bench/sft.py`` measures it against TRL.

What it does:
- one process, torch DDP over N ranks, or DeepSpeed ZeRO-1/2/3 (``train.deepspeed`` JSON) under
  torchrun/deepspeed; identical per-rank work (the data order is padded so every rank sees the same
  number of micro-batches, nothing is dropped);
- AdamW over the trainable parameters, warm-up + cosine/linear/constant schedule, gradient
  accumulation, gradient clipping, bf16 autocast where the hardware supports it (fp32 otherwise);
- the loss of an optimizer step is the mean over the loss units (``loss_units``: target tokens for SFT and
  token-level distillation, pairs for RM and DPO) of its whole global batch, every micro-batch on every
  rank: a step's micro-batches are collated before its first backward, their units summed across ranks,
  and each micro-batch's mean loss weighted by its share (``stages.training.loss_weight``; DeepSpeed's own
  1/accumulation scaling included). So a token weighs the same whatever the per-device batch,
  accumulation and world size (as transformers' ``num_items_in_batch``); the logged ``loss`` is that mean;
- dynamic hyper-parameters (``train.*``, off by default): reduce-on-plateau of the learning rate on the
  held-out ``monitor`` (a scale on top of the schedule, logged as ``lr_scale``), early stopping after
  ``early_stopping_patience`` evaluations without improvement with the best evaluation's weights restored
  (kept in ``checkpoints/best/``), and a batch-size ramp-up (``batch_ramp``: more micro-batches accumulated
  per optimizer step, the micro-batch order unchanged; logged as ``grad_accum_steps``/``global_batch_size``);
  their state is part of every checkpoint, so a resumed run takes the same decisions. Under DeepSpeed too
  (ZeRO-1/2; early stopping is refused under ZeRO-3, whose weights are sharded): the plateau scale is applied
  to the wrapped optimiser after DeepSpeed's step, and the ramp sets DeepSpeed's accumulation count and
  marks each step's last micro-batch as the boundary itself;
- full-state checkpoints every ``save_steps`` (trainable weights, optimizer, scheduler, RNG, data
  position, unfreezer), written to a temporary folder and renamed into place; resume continues exactly
  where the interrupted run stopped;
- a stop request (SIGTERM, SIGUSR1, the batch script's stop file, the deadline: ``stages.stopping``) is
  acted on after the optimizer step in progress: a checkpoint at that step, then ``StageStopped``;
- metrics to ``metrics.jsonl`` (through ``StageRun.log``; ``lr`` is the rate the step's update used) and a
  progress bar with loss, tokens/s, ETA.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pipeline.config import TrainConfig
from stages.stopping import StepBoundaries
from stages.training import (
    Checkpoints,
    build_optimizer,
    init_deepspeed,
    load_state,
    load_trainable,
    load_weights,
    loss_weight,
    rng_state,
    save_state,
    save_weights,
    seed_everything,
    set_rng_state,
    trainable_state,
    trim_logs_after,
    verify_checkpoint,
    zero_stage_of,
)

LossFn = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


# ------------------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Read torchrun/deepspeed env vars; start a process group (gloo on CPU, nccl on GPU) when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        import datetime

        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world, local, device)


def shutdown_distributed() -> None:
    """End this process's process group, if it started one: every rank waits for the others, then the group
    is destroyed. A group left to the interpreter's exit can abort the process from a communicator thread
    ("terminate called without an active exception") after the stage has finished its work."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "bf16":
        return True
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return False


set_seed = seed_everything  # the name rm.py and bench/ use


def enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing (transformers 5 renamed gradient_checkpointing_enable and
    its kwargs; both names work). Input grads are enabled so a frozen embedding still lets PEFT train."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


# ------------------------------------------------------------------------------------ data order
def epoch_order(n_items: int, epoch: int, seed: int, rank: int, world: int, micro: int) -> list[list[int]]:
    """This rank's micro-batches (lists of item indices) for one epoch.

    The permutation depends only on (seed, epoch), so every rank agrees on it; it is padded by wrapping
    around so that all ranks get the same number of full micro-batches (identical per-rank work).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_items, generator=g).tolist()
    per_step = micro * world
    steps = max(1, math.ceil(n_items / per_step))
    needed = steps * per_step
    perm = (perm * math.ceil(needed / n_items))[:needed]
    mine = perm[rank::world]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


def group_batches(groups: Sequence[int], epoch: int, seed: int, rank: int, world: int, micro: int) -> list[list[int]]:
    """Like ``epoch_order`` but items sharing a group id stay in one micro-batch (K-wise RM rankings).

    Groups are packed greedily into micro-batches of at most ``micro`` items (a larger group gets a
    micro-batch of its own); batches are then shuffled and dealt to ranks, padded by wrap-around.
    """
    by_group: dict[int, list[int]] = {}
    for i, gid in enumerate(groups):
        by_group.setdefault(gid, []).append(i)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = [list(by_group)[j] for j in torch.randperm(len(by_group), generator=g).tolist()]
    batches: list[list[int]] = []
    current: list[int] = []
    for gid in order:
        members = by_group[gid]
        if current and len(current) + len(members) > micro:
            batches.append(current)
            current = []
        current = current + members
    if current:
        batches.append(current)
    steps = max(1, math.ceil(len(batches) / world))
    batches = (batches * math.ceil(steps * world / len(batches)))[: steps * world]
    return batches[rank::world]


# ------------------------------------------------------------------------------------------ engine
@dataclass
class _StepWindow:
    """One optimizer step in the making: its planned micro-batches and their units (all ranks), the loss x units
    and metrics summed over its micro-batches so far, the tokens since the last step (tokens/s) and the rate
    its update uses."""

    plan: deque = field(default_factory=deque)
    units: float = 0.0
    loss_sum: float = 0.0
    metric_sums: dict[str, float] = field(default_factory=dict)
    micro: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.time)
    lr: float = 0.0

    def add(self, weighted_loss: float, metrics: dict[str, float], tokens: int) -> None:
        self.loss_sum += weighted_loss
        for k, v in metrics.items():
            self.metric_sums[k] = self.metric_sums.get(k, 0.0) + float(v)
        self.micro += 1
        self.tokens += tokens


@dataclass
class TrainResult:
    global_step: int
    metrics: dict[str, float]
    history: list[dict[str, Any]]


class Engine:
    """Train ``model`` on ``items`` with ``loss_fn``; see the module docstring.

    ``collate(list_of_items) -> batch dict of tensors``; ``loss_fn(model, batch) -> (loss, metrics)``, the
    loss a mean over ``loss_units(batch) -> int`` units (target tokens, pairs; without ``loss_units`` every
    micro-batch counts as one unit, so their means weigh the same); ``count_tokens(batch) -> int`` for
    tokens/s. ``groups`` (optional, one id per item) keeps items of a group in one micro-batch.
    ``stage_state`` (optional): the stage's own resumable state, an object with ``state_dict()`` /
    ``load_state_dict()`` (DPO's cache of reference log-probs), saved per rank in every checkpoint
    (``stage-rankR``) and put back on resume.
    """

    def __init__(self, model: Any, train: TrainConfig, run: Any, dist: DistInfo, items: Sequence[Any],
                 collate: Callable[[list[Any]], dict[str, torch.Tensor]], loss_fn: LossFn,
                 count_tokens: Callable[[dict[str, torch.Tensor]], int] | None = None,
                 groups: Sequence[int] | None = None, unfreezer: Any = None,
                 eval_fn: Callable[[Any], dict[str, float]] | None = None, desc: str = "train",
                 loss_units: Callable[[dict[str, torch.Tensor]], int] | None = None, stage_state: Any = None):
        self.train, self.run, self.dist = train, run, dist
        self.stage_state = stage_state
        self.items, self.collate, self.loss_fn = items, collate, loss_fn
        self.count_tokens = count_tokens or (lambda b: int(b["attention_mask"].sum()))
        self.loss_units = loss_units or (lambda b: 1)
        self._batch_cache: dict[int, list[list[int]]] = {}
        self.groups, self.unfreezer, self.eval_fn, self.desc = groups, unfreezer, eval_fn, desc
        self.bf16 = use_bf16(train.precision, dist.device)
        self.micro_per_epoch = len(self._epoch_batches(0))
        self.accum = train.gradient_accumulation_steps
        steps_per_epoch = max(1, self.micro_per_epoch // self.accum)
        self.total_steps = train.max_steps or (self._ramped_total_steps() if train.batch_ramp else
                                               max(1, math.ceil(train.epochs * steps_per_epoch)))
        self.warmup = int(round(train.warmup_ratio * self.total_steps))
        self._check_global_batch()
        self.model = model.to(dist.device)
        if train.gradient_checkpointing:
            enable_activation_checkpointing(model)
        # Parameters an unfreezer may turn on later must be in the optimizer from the start.
        params = [p for p in model.parameters() if p.requires_grad or unfreezer is not None]
        if not params:
            raise ValueError("no trainable parameters: check the tuning method and trainable_layers")
        self.optimizer, self.scheduler = build_optimizer(params, train.learning_rate, train.weight_decay,
                                                         train.lr_scheduler, self.warmup, self.total_steps)
        self.ds_engine = None
        self.ds_config: dict[str, Any] | None = None
        self.ddp = None
        if train.deepspeed:
            self.ds_engine, self.optimizer, self.scheduler, self.ds_config = init_deepspeed(
                self.model, self.optimizer, self.scheduler, train.deepspeed,
                micro_batch=train.per_device_batch_size, grad_accum=self.accum, world_size=dist.world_size,
                lr=train.learning_rate, weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm,
                bf16=self.bf16)
        elif dist.world_size > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
        self.global_step = 0
        self.epoch = 0
        self.micro_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        # the watch on the held-out metric (reduce-on-plateau, early stopping): saved in every checkpoint
        self.watch: dict[str, Any] = {"best": None, "best_step": None, "since_best": 0, "plateau_wait": 0,
                                      "lr_scale": 1.0, "stopped": False}
        if train.early_stopping_patience is not None and self.zero_stage == 3:
            raise ValueError(f"{desc}: early_stopping_patience is not supported with ZeRO-3 (the best weights "
                             f"would have to be gathered from every rank); use a ZeRO-1/2 config")
        if (train.lr_plateau_factor is not None or train.early_stopping_patience is not None) and eval_fn is None:
            raise ValueError(f"{desc}: lr_plateau_factor / early_stopping_patience need held-out data to watch "
                             f"{train.monitor} (eval_data or eval_fraction)")

    def _check_global_batch(self) -> None:
        """``train.global_batch_size``, when set, is what the batch, accumulation and world size give."""
        train, world = self.train, self.dist.world_size
        if train.global_batch_size is not None and train.global_batch(world) != train.global_batch_size:
            raise ValueError(
                f"train.global_batch_size={train.global_batch_size} but per_device_batch_size "
                f"({train.per_device_batch_size}) x gradient_accumulation_steps ({self.accum}) x world size "
                f"({world}) = {train.global_batch(world)}; change one so they agree")

    def _ramped_total_steps(self) -> int:
        """Optimizer steps in ``train.epochs`` epochs when the accumulation follows ``batch_ramp``."""
        micro_left = self.train.epochs * self.micro_per_epoch
        steps = 0
        while micro_left >= self.train.accumulation_at(steps):
            micro_left -= self.train.accumulation_at(steps)
            steps += 1
        return max(1, steps + (1 if micro_left > 0 else 0))

    @property
    def forward_model(self) -> Any:
        return self.ds_engine or self.ddp or self.model

    @property
    def zero_stage(self) -> int:
        return zero_stage_of(self.ds_config)

    # ---------------------------------------------------------------------------------- data
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        t, d = self.train, self.dist
        if self.groups is not None:
            return group_batches(self.groups, epoch, t.seed, d.rank, d.world_size, t.per_device_batch_size)
        return epoch_order(len(self.items), epoch, t.seed, d.rank, d.world_size, t.per_device_batch_size)

    def _batches_of(self, epoch: int) -> list[list[int]]:
        """``_epoch_batches(epoch)``, computed once per epoch (a step's plan may look into the next one)."""
        if epoch not in self._batch_cache:
            self._batch_cache = {e: b for e, b in self._batch_cache.items() if e >= self.epoch}
            self._batch_cache[epoch] = self._epoch_batches(epoch)
        return self._batch_cache[epoch]

    def _plan_step(self, accumulation: int) -> tuple[deque, float]:
        """The next optimizer step's ``accumulation`` micro-batches of this rank, collated, each with its loss
        units, and the step's units summed over all ranks (collective: every rank divides by this count).
        A step may run over into the next epoch, as the loop does."""
        plan: deque = deque()
        epoch, micro = self.epoch, self.micro_in_epoch
        for _ in range(accumulation):
            if micro >= len(self._batches_of(epoch)):
                epoch, micro = epoch + 1, 0
            batch = self.collate([self.items[i] for i in self._batches_of(epoch)[micro]])
            plan.append((batch, float(self.loss_units(batch))))
            micro += 1
        return plan, self._sum_across_ranks(sum(units for _, units in plan))

    def scheduled_batches(self) -> list[list[int]]:
        """This rank's micro-batches (item indices) from step 0 to ``total_steps``, in the order ``fit`` trains
        on them: one stream over the epochs, ``train.accumulation_at(step)`` micro-batches per step."""
        out: list[list[int]] = []
        epoch, micro, batches = 0, 0, self._epoch_batches(0)
        for step in range(self.total_steps):
            for _ in range(self.train.accumulation_at(step)):
                if micro >= len(batches):
                    epoch, micro = epoch + 1, 0
                    batches = self._epoch_batches(epoch)
                out.append(batches[micro])
                micro += 1
        return out

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.dist.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ---------------------------------------------------------------------------- checkpoints
    def _client_state(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step, "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch,
            "rng": rng_state(), "unfreezer": self.unfreezer.state_dict() if self.unfreezer else None,
            "history_len": len(self.history), "watch": dict(self.watch),
        }

    @property
    def checkpoints(self) -> Checkpoints:
        return Checkpoints(self.run.checkpoints, self.dist.is_main, self.dist.world_size)

    def save_checkpoint(self) -> Path:
        """checkpoints/step-N (see ``stages.training.Checkpoints``): DeepSpeed's sharded files (written by
        every rank) and ``client-rankR.{json,safetensors}`` per rank, or (rank 0) ``weights.safetensors``
        (trainable weights) and ``state.{json,safetensors}`` (optimizer, scheduler, client state)."""

        def write(folder: Path) -> None:
            if self.ds_engine is not None:
                self.ds_engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)
                save_state(folder, f"client-rank{self.dist.rank}", self._client_state())
            elif self.dist.is_main:
                save_weights(folder, "weights", trainable_state(self.model, everything=self.unfreezer is not None))
                save_state(folder, "state", {"optimizer": self.optimizer.state_dict(),
                                             "scheduler": self.scheduler.state_dict(),
                                             "client": self._client_state()})
            if self.stage_state is not None:  # per rank: each rank's differs (DPO: the pairs it has seen)
                save_state(folder, f"stage-rank{self.dist.rank}", self.stage_state.state_dict())

        return self.checkpoints.save(self.global_step, write)

    def maybe_resume(self) -> bool:
        folder = self.checkpoints.latest()
        if folder is None:
            return False
        if self.ds_engine is not None:
            # DeepSpeed unpickles its own files: only folders of this run's checkpoints/ that match their index
            self.ds_engine.load_checkpoint(str(folder.parent), tag=folder.name)
            client = load_state(folder, f"client-rank{self.dist.rank}")
        else:
            load_trainable(self.model, load_weights(folder, "weights"))
            state = load_state(folder, "state")
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            client = state["client"]
        self.global_step, self.epoch = client["global_step"], client["epoch"]
        self.micro_in_epoch = client["micro_in_epoch"]
        set_rng_state(client["rng"])
        if self.unfreezer is not None and client.get("unfreezer"):
            self.unfreezer.load_state_dict(client["unfreezer"])
        if client.get("watch"):
            self.watch = dict(client["watch"])
            self._apply_lr_scale()
        stage_file = f"stage-rank{self.dist.rank}"
        if self.stage_state is not None and (folder / f"{stage_file}.json").exists():
            self.stage_state.load_state_dict(load_state(folder, stage_file))
        if self.dist.is_main:
            trim_logs_after(self.run.dir, self.global_step)
            print(f"[alignpipe] resumed {self.desc} from {folder} (step {self.global_step})", flush=True)
        return True

    # ---------------------------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        """Train to ``total_steps`` (or an early stop), resuming from the latest checkpoint; then the best
        evaluation's weights (early stopping) and a final evaluation."""
        t = self.train
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        if not self.maybe_resume():
            set_seed(t.seed + self.dist.rank)
        bar = self._progress_bar()
        model = self.forward_model
        model.train()
        window = _StepWindow()
        last_row: dict[str, float] = {}
        boundaries = StepBoundaries(self.run, self.dist, self.total_steps)  # a stop request: checkpoint, exit
        boundaries.start()
        while self.global_step < self.total_steps and not self.watch["stopped"]:
            batches = self._batches_of(self.epoch)
            while (self.micro_in_epoch < len(batches) and self.global_step < self.total_steps
                   and not self.watch["stopped"]):
                accum = t.accumulation_at(self.global_step)  # batch_ramp: more micro-batches per step later on
                if not self._micro_step(model, window, accum):
                    continue
                grad_norm = self._optimizer_step()
                self.global_step += 1
                if self.unfreezer is not None:
                    self.unfreezer.step(self.global_step)
                last_row = self._step_row(window, accum, grad_norm, len(batches))
                self._after_step(last_row, bar)
                window = _StepWindow()
                boundaries.after_step(self.global_step, self.save_checkpoint)
            if self.micro_in_epoch >= len(batches):
                self.epoch += 1
                self.micro_in_epoch = 0
        if bar is not None:
            bar.close()
        self._restore_best()
        final = dict(last_row)
        if self.eval_fn is not None:
            final.update(self._evaluate())
        return TrainResult(self.global_step, final, self.history)

    def _progress_bar(self) -> Any:
        if not (self.dist.is_main and self.run.cfg.logging.progress_bar):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.global_step, desc=self.desc, dynamic_ncols=True)

    def _micro_step(self, model: Any, window: "_StepWindow", accum: int) -> bool:
        """Forward and backward of the step's next micro-batch (its loss weighted by its share of the step's
        units); True when it is the step's last (the optimizer steps next)."""
        if window.micro == 0:
            window.plan, window.units = self._plan_step(accum)
        if self.ds_engine is not None and self.train.batch_ramp:
            self._deepspeed_accumulation(accum, last_micro=window.micro + 1 == accum)
        batch, units = window.plan.popleft()
        batch = self._to_device(batch)
        with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, metrics = self.loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{self.desc}: non-finite loss {loss.item()} at step {self.global_step} "
                f"(epoch {self.epoch}, micro-batch {self.micro_in_epoch}); lower the learning rate")
        # the mean over this micro-batch's units -> its share of the mean over the global batch's
        weighted = loss * loss_weight(units, window.units, self.dist.world_size, accum)
        if self.ds_engine is not None:
            self.ds_engine.backward(weighted)  # DeepSpeed divides by its accumulation count (= accum)
        else:
            (weighted / accum).backward()
        window.add(float(loss.detach()) * units, metrics, self.count_tokens(batch))
        self.micro_in_epoch += 1
        # the rate this step's update uses: the schedule moves on with the optimizer step below
        window.lr = self.scheduler.get_last_lr()[0] * self.watch["lr_scale"]
        if self.ds_engine is not None:
            self.ds_engine.step()  # DeepSpeed counts accumulation itself
        return window.micro == accum

    def _optimizer_step(self) -> float | None:
        """Clip, step the optimizer and the schedule (DeepSpeed has stepped already); the gradient norm."""
        if self.ds_engine is not None:
            self._apply_lr_scale()  # DeepSpeed's step has just stepped the schedule
            grad_norm = self.ds_engine.get_global_grad_norm()
            return float(grad_norm) if grad_norm is not None else None
        grad_norm = None
        if self.train.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.train.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self._apply_lr_scale()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _step_row(self, window: "_StepWindow", accum: int, grad_norm: float | None, n_batches: int
                  ) -> dict[str, float]:
        """The metrics row of the optimizer step just taken (loss: the mean over the global batch's units)."""
        t, world = self.train, self.dist.world_size
        tokens_per_s = window.tokens * world / max(time.time() - window.started, 1e-9)
        row = {"loss": self._sum_across_ranks(window.loss_sum) / max(window.units, 1.0), "lr": window.lr,
               "epoch": self.epoch + self.micro_in_epoch / max(1, n_batches), "tokens_per_s": tokens_per_s}
        row.update({k: v / window.micro for k, v in window.metric_sums.items()})
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        if t.lr_plateau_factor is not None:
            row["lr_scale"] = self.watch["lr_scale"]
        if t.batch_ramp:
            row["grad_accum_steps"] = accum
            row["global_batch_size"] = accum * t.per_device_batch_size * world
        return row

    def _after_step(self, row: dict[str, float], bar: Any) -> None:
        """Log the step's row, move the progress bar, evaluate and checkpoint when they are due."""
        t = self.train
        if self.global_step % t.logging_steps == 0 or self.global_step == self.total_steps:
            self.run.log(self.global_step, row)
            self.history.append({"step": self.global_step, **row})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}")
        if self.eval_fn is not None and t.eval_steps and self.global_step % t.eval_steps == 0:
            self._evaluate(watch=True)
        if self.global_step % t.save_steps == 0 and self.global_step < self.total_steps:
            self.save_checkpoint()

    def _sum_across_ranks(self, value: float) -> float:
        """``value`` summed over the ranks (collective when there are several)."""
        if self.dist.world_size == 1:
            return float(value)
        tensor = torch.tensor([value], dtype=torch.float64, device=self.dist.device)
        torch.distributed.all_reduce(tensor)
        return float(tensor.item())

    def _evaluate(self, watch: bool = False) -> dict[str, float]:
        model = self.model
        was_training = model.training
        model.eval()
        with torch.no_grad(), torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            metrics = self.eval_fn(self.forward_model)
        if was_training:
            model.train()
        if watch and (self.train.lr_plateau_factor is not None or self.train.early_stopping_patience is not None):
            metrics = {**metrics, **self._watch(metrics)}
        if metrics:
            self.run.log(self.global_step, metrics)
            self.history.append({"step": self.global_step, **metrics})
        return metrics

    # ------------------------------------------------------------------------ dynamic hyper-parameters
    def _apply_lr_scale(self) -> None:
        """The learning rate in force: the schedule's value times the plateau scale (1 unless reduced)."""
        if self.train.lr_plateau_factor is None:
            return
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr * self.watch["lr_scale"]

    def _deepspeed_accumulation(self, accum: int, last_micro: bool) -> None:
        """``batch_ramp`` under DeepSpeed, before each micro-batch: DeepSpeed's accumulation count (it scales
        the loss by 1/count) follows the ramp, and whether this micro-batch ends the step is set explicitly,
        since DeepSpeed's own test (micro-batches since the start, modulo the count) goes out of step as soon
        as the count changes."""
        if self.ds_engine.gradient_accumulation_steps() != accum:
            self.ds_engine.set_train_batch_size(accum * self.train.per_device_batch_size * self.dist.world_size)
        self.ds_engine.set_gradient_accumulation_boundary(last_micro)

    @property
    def _best_checkpoints(self) -> Checkpoints:
        return Checkpoints(self.run.checkpoints / "best", self.dist.is_main, self.dist.world_size)

    def _watch(self, metrics: dict[str, float]) -> dict[str, float]:
        """Update the watch on ``train.monitor`` after an evaluation: a new best is kept (its weights too, with
        early stopping); ``lr_plateau_patience`` evaluations without one scale the learning rate by
        ``lr_plateau_factor``; ``early_stopping_patience`` of them stop training. Returns the fields logged."""
        t, watch = self.train, self.watch
        if t.monitor not in metrics:
            raise ValueError(f"{self.desc}: train.monitor {t.monitor!r} is not among the evaluation's metrics "
                             f"({', '.join(sorted(metrics))})")
        value = float(metrics[t.monitor])
        best = watch["best"]
        improved = best is None or (value < best - t.min_delta if t.monitor_mode == "min"
                                    else value > best + t.min_delta)
        if improved:
            watch.update(best=value, best_step=self.global_step, since_best=0, plateau_wait=0)
            if t.early_stopping_patience is not None:
                def write(folder: Path) -> None:
                    if self.dist.is_main:
                        save_weights(folder, "weights",
                                     trainable_state(self.model, everything=self.unfreezer is not None))

                self._best_checkpoints.save(self.global_step, write)
        else:
            watch["since_best"] += 1
            watch["plateau_wait"] += 1
            if t.lr_plateau_factor is not None and watch["plateau_wait"] >= t.lr_plateau_patience:
                watch["lr_scale"] = max(watch["lr_scale"] * t.lr_plateau_factor, t.lr_plateau_min_scale)
                watch["plateau_wait"] = 0
                self._apply_lr_scale()
            if t.early_stopping_patience is not None and watch["since_best"] >= t.early_stopping_patience:
                watch["stopped"] = True
                if self.dist.is_main:
                    print(f"[alignpipe] {self.desc}: early stop at step {self.global_step}: {t.monitor} has not "
                          f"improved for {watch['since_best']} evaluations (best {watch['best']:.6g} at step "
                          f"{watch['best_step']})", flush=True)
        logged = {f"best_{t.monitor}": watch["best"], "evals_since_best": watch["since_best"]}
        if t.lr_plateau_factor is not None:
            logged["lr_scale"] = watch["lr_scale"]
        if watch["stopped"]:
            logged["early_stopped"] = 1
        return logged

    def _restore_best(self) -> None:
        """With early stopping: end with the weights of the best evaluation (``checkpoints/best/step-N``)."""
        best_step = self.watch["best_step"]
        if self.train.early_stopping_patience is None or best_step is None or best_step == self.global_step:
            return
        folder = self._best_checkpoints.root / Checkpoints.tag(best_step)
        if verify_checkpoint(folder) is not None:
            raise RuntimeError(f"{self.desc}: the best checkpoint {folder} is missing or damaged")
        load_trainable(self.model, load_weights(folder, "weights"))
        if self.dist.is_main:
            print(f"[alignpipe] {self.desc}: restored the weights of step {best_step} "
                  f"({self.train.monitor} {self.watch['best']:.6g})", flush=True)

    # ---------------------------------------------------------------------------------- save
    def unwrap(self) -> Any:
        return self.model
