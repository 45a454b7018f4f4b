"""The PPO update: step 3 of the trainer's loop (``stages.ppo.trainer``). ``PPOUpdate.update(rollout, step)``
runs ``ppo_epochs`` passes over a ``Rollout`` in minibatches, each split into micro-batches, and returns the
step's statistics; ``PPOUpdate`` is built once per run from what it reads (config, models, sizes, the
process group, the PTX stream, the actor's EMA or None, the folder a bad batch is saved to).

A micro-step (``_micro_step``) computes the clipped value loss, weighted by the micro-batch's share of the
global minibatch's response tokens, and (after the critic warm-up) the clipped policy loss (+ the KL loss with
``kl_in_loss``), weighted by its share of the minibatch's policy-loss units (``ppo.loss_aggregation``: response
tokens, or responses for the ``seq-mean-*`` modes; without the responses ``ppo.mask_truncated`` drops), + PTX
weighted by its share of the minibatch's PTX target tokens (every count summed over all ranks before the first
backward; ``stages.training.loss_weight``), and back-propagates them. Its statistics stay tensors; they are
summed as tensors and turned into numbers once, when ``update`` returns its means for the step's log row. The
micro-step synchronises the ranks only where a decision needs every rank: whether all losses are finite, and the
largest ratio (a micro-batch over ``ratio_skip_threshold`` on any rank contributes no policy gradient; a minibatch
whose every micro-batch is skipped moves nothing, with or without DeepSpeed: no weight update, optimiser state and
schedule untouched).
"""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from pipeline.config import RunConfig
from stages.batching import pad_collate, target_tokens
from stages.ppo.core import (
    aggregate_loss,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    loss_units,
)
from stages.ppo.distributed import Comm
from stages.ppo.experience import Rollout
from stages.ppo.models import Optimisation, PPOModels
from stages.training import loss_weight, step_without_update

if TYPE_CHECKING:
    from pipeline.config import PPOSizes

Stats = dict[str, torch.Tensor]
#: one micro-step's PTX batch (``input_ids``, ``attention_mask``, ``labels`` on the device) and its loss weight
PTXBatch = tuple[dict[str, torch.Tensor], float]


class MinibatchUnits(NamedTuple):
    """A minibatch's loss units over all ranks: ``tokens``, its response tokens (the value loss is a mean over
    them); ``policy``, what the policy loss averages over (``ppo.loss_aggregation``: tokens or responses, without
    those ``ppo.mask_truncated`` drops). Equal to ``tokens`` by default."""

    tokens: float
    policy: float


class LossWeights(NamedTuple):
    """A micro-batch's ``stages.training.loss_weight`` for the value loss and for the policy (+ KL) loss."""

    value: float
    policy: float


class MicroStepContext(NamedTuple):
    """Where a micro-step is in the update: PPO ``step`` and ``epoch`` (named in the error of a non-finite
    loss), ``train_actor`` (false during the critic warm-up), ``kl_coef`` (beta of the KL loss with
    ``kl_in_loss``: the step's KL controller value)."""

    step: int
    epoch: int
    train_actor: bool
    kl_coef: float


class PTXStream:
    """The SFT rows mixed into the actor's loss (``ppo.ptx_coef``), read in order; ``position`` (micro-batches
    read so far on each rank) is saved in checkpoints."""

    def __init__(self, rows: list[dict[str, Any]], pad_token_id: int, sizes: PPOSizes, comm: Comm,
                 device: torch.device):
        self.rows, self.pad_token_id, self.sizes, self.comm, self.device = rows, pad_token_id, sizes, comm, device
        self.position = 0

    def _batch(self) -> dict[str, torch.Tensor]:
        n, micro, dist = len(self.rows), self.sizes.micro_batch, self.comm.dist
        start = (self.position * dist.world_size + dist.rank) * micro
        rows = [self.rows[(start + i) % n] for i in range(micro)]
        self.position += 1
        return {k: v.to(self.device) for k, v in pad_collate(self.pad_token_id)(rows).items()}

    def minibatch(self) -> deque[PTXBatch]:
        """A minibatch's PTX batches (one per micro-step), each with its weight: the PTX loss is the mean over
        every target token of the minibatch's PTX batches on all ranks (collective), not a mean of means."""
        accum, world = self.sizes.grad_accum, self.comm.dist.world_size
        batches = [self._batch() for _ in range(accum)]
        counts = [float(target_tokens(b)) for b in batches]
        total = float(self.comm.sum(torch.tensor([sum(counts)], dtype=torch.float64))[0])
        return deque((b, loss_weight(n, total, world, accum)) for b, n in zip(batches, counts))


class ActorEMA:
    """An exponential moving average (fp32) of the actor's trainable weights (``ppo.ema_decay``): updated
    after each actor optimiser step, saved in checkpoints, and saved as the policy at the end."""

    def __init__(self, actor: Any, decay: float):
        self.decay = decay
        self.weights = {n: q.detach().float().clone() for n, q in actor.named_parameters() if q.requires_grad}

    @torch.no_grad()
    def update(self, actor: Any) -> None:
        for name, param in actor.named_parameters():
            if name in self.weights:
                self.weights[name].mul_(self.decay).add_(param.detach().float(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_into(self, actor: Any) -> None:
        named = dict(actor.named_parameters())
        for name, value in self.weights.items():
            named[name].copy_(value.to(named[name].dtype))


class PPOUpdate:
    """Minibatch loop, micro-steps, optimiser steps, EMA and PTX."""

    def __init__(self, cfg: RunConfig, models: PPOModels, sizes: PPOSizes, comm: Comm, ptx: PTXStream,
                 ema: ActorEMA | None, bad_batch_dir: Path):
        self.cfg, self.models, self.sizes, self.comm = cfg, models, sizes, comm
        self.ptx, self.ema, self.bad_batch_dir = ptx, ema, bad_batch_dir

    def update(self, rollout: Rollout, step: int, kl_coef: float) -> dict[str, float]:
        """PPO epochs over the rollout of PPO step ``step`` (``kl_coef``: its KL coefficient); returns this
        rank's mean statistics (plus ``ratio_max`` over all ranks and ``skipped_minibatches``)."""
        ppo, sizes, models = self.cfg.ppo, self.sizes, self.models
        train_actor = step >= ppo.critic_warmup_steps
        sums: Stats = {}
        n_micro, ratio_max, skipped = 0, 0.0, 0
        for epoch in range(ppo.ppo_epochs):
            context = MicroStepContext(step, epoch, train_actor, kl_coef)
            for minibatch, units in self._minibatches(rollout, step, epoch):
                mb_skipped = 0
                ptx = self.ptx.minibatch() if train_actor and ppo.ptx_coef > 0 else None
                for idx in minibatch.view(sizes.grad_accum, sizes.micro_batch):
                    stats, micro_ratio_max, was_skipped = self._micro_step(
                        rollout, idx, units, context, skipped_before=mb_skipped,
                        ptx=ptx.popleft() if ptx else None)
                    ratio_max = max(ratio_max, micro_ratio_max)
                    mb_skipped += was_skipped
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
                    n_micro += 1
                if models.critic is not None:
                    self._optimizer_step(models.critic_optim, skip=False)
                if train_actor:
                    self._optimizer_step(models.actor_optim, skip=mb_skipped == sizes.grad_accum)
                    skipped += bool(mb_skipped)
                    if self.ema is not None and mb_skipped < sizes.grad_accum:
                        self.ema.update(models.actor)
        out = {k: float(v) / max(n_micro, 1) for k, v in sums.items()}  # the one conversion, for the log row
        out["ratio_max"] = ratio_max
        out["skipped_minibatches"] = float(skipped)
        return out

    def _minibatches(self, rollout: Rollout, step: int, epoch: int) -> list[tuple[torch.Tensor, MinibatchUnits]]:
        """This epoch's minibatches (index tensors of ``mini_batch_size`` rows, a seeded permutation) with
        the global loss units in each (each micro-batch's loss is weighted by its share)."""
        ppo, sizes = self.cfg.ppo, self.sizes
        g = torch.Generator().manual_seed(ppo.train.seed * 1_000_003 + step * 1_009 + epoch)
        order = torch.randperm(ppo.episodes_per_rollout, generator=g)
        minibatches = order.view(sizes.n_minibatches, sizes.mini_batch)
        counts = self.comm.sum(torch.stack([torch.stack([
            rollout.response_mask[mb].sum().double(),
            loss_units(rollout.policy_mask(mb, ppo.mask_truncated), ppo.loss_aggregation).double()])
            for mb in minibatches]))
        return [(mb, MinibatchUnits(*row)) for mb, row in zip(minibatches, counts.tolist())]

    def _losses(self, rollout: Rollout, idx: torch.Tensor, weights: LossWeights, context: MicroStepContext,
                ptx: PTXBatch | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, Stats]:
        """-> (weighted value loss x vf_coef, or None without a critic; weighted policy loss, or None during the
        critic warm-up; stats). ``ptx``: this micro-step's PTX batch and its weight (``PTXStream.minibatch``)."""
        ppo, models, T, dev = self.cfg.ppo, self.models, rollout.response_ids.size(1), self.models.device
        ids, att = (x.to(dev) for x in rollout.sequences(idx))
        mask = rollout.response_mask[idx].to(dev)
        policy_mask = rollout.policy_mask(idx, ppo.mask_truncated).to(dev)
        stats: Stats = {}
        vf_loss = None
        if models.critic is not None:
            values = models.critic_values(models.critic_forward, ids, att, T)
            vf_loss, vf_stats = clipped_value_loss(values, rollout.old_values[idx].to(dev),
                                                   rollout.returns[idx].to(dev), mask, ppo.cliprange_value)
            stats = {"value_loss": vf_loss.detach().double(), "vf_clipfrac": vf_stats["vf_clipfrac"].double()}
            vf_loss = ppo.vf_coef * vf_loss * weights.value
        if not context.train_actor:
            return vf_loss, None, stats
        logits = models.policy_logits(models.actor_forward, ids, att, T)
        logp = logprobs_from_logits(logits, rollout.response_ids[idx].to(dev))
        is_weights = None if rollout.is_weights is None else rollout.is_weights[idx].to(dev)  # engine correction
        pg_loss, pg_stats = clipped_policy_loss(
            logp, rollout.old_logp[idx].to(dev), rollout.advantages[idx].to(dev), policy_mask, ppo.clip_low,
            token_weights=is_weights, cliprange_high=ppo.clip_high, clip_ratio_c=ppo.clip_ratio_c,
            importance_level=ppo.importance_level, aggregation=ppo.loss_aggregation, max_length=ppo.max_new_tokens)
        stats.update({k: torch.as_tensor(v).detach().double() for k, v in pg_stats.items()})
        stats["policy_loss"] = pg_loss.detach().double()
        with torch.no_grad():
            stats["entropy"] = entropy_from_logits(logits.detach(), mask).double()
        if ppo.kl_in_loss and rollout.ref_logp is not None:  # None: kl_coef 0, the term would be 0 x KL
            kl_term = self._kl_loss(logp, rollout.ref_logp[idx].to(dev), policy_mask)
            stats["kl_loss"] = kl_term.detach().double()
            pg_loss = pg_loss + context.kl_coef * kl_term
        pg_loss = pg_loss * weights.policy
        if ptx is not None:
            ptx_batch, ptx_weight = ptx
            with models.autocast():
                ptx_loss = models.actor_forward(**ptx_batch, use_cache=False).loss.float()
            stats["ptx_loss"] = ptx_loss.detach().double()
            pg_loss = pg_loss + ppo.ptx_coef * ptx_loss * ptx_weight
        return vf_loss, pg_loss, stats

    def _kl_loss(self, logp: torch.Tensor, ref_logp: torch.Tensor, policy_mask: torch.Tensor) -> torch.Tensor:
        """The KL loss term of ``kl_in_loss`` over the policy loss's tokens, aggregated as the policy loss is (TRL
        and verl add it to the per-token loss before aggregating); 0 where the micro-batch has no such token."""
        ppo = self.cfg.ppo
        kl = kl_penalty(logp, ref_logp, ppo.kl_estimator)
        if not bool(policy_mask.any()):
            return torch.where(policy_mask.bool(), kl, torch.zeros((), dtype=kl.dtype, device=kl.device)).sum()
        return aggregate_loss(kl, policy_mask, ppo.loss_aggregation, ppo.max_new_tokens)

    def _micro_step(self, rollout: Rollout, idx: torch.Tensor, units: MinibatchUnits, context: MicroStepContext,
                    skipped_before: int = 0, ptx: PTXBatch | None = None) -> tuple[Stats, float, bool]:
        """Losses and backward passes of one micro-batch -> (stats as tensors, max ratio over ranks, skipped).
        ``skipped_before``: micro-batches of this minibatch skipped so far; ``ptx``: see ``_losses``."""
        world, accum = self.comm.dist.world_size, self.sizes.grad_accum
        actor_engine, critic_engine = self.models.actor_optim.engine, self._critic_engine
        ppo = self.cfg.ppo
        policy_units = loss_units(rollout.policy_mask(idx, ppo.mask_truncated), ppo.loss_aggregation)
        weights = LossWeights(loss_weight(float(rollout.response_mask[idx].sum()), units.tokens, world, accum),
                              loss_weight(float(policy_units), units.policy, world, accum))
        vf_total, pg_loss, stats = self._losses(rollout, idx, weights, context, ptx)
        # NaN / inf: stop with the batch saved (sync point: every rank agrees before anyone raises)
        finite = torch.tensor([(1.0 if vf_total is None else float(torch.isfinite(vf_total))) * (
            1.0 if pg_loss is None else float(torch.isfinite(pg_loss)))])
        if float(self.comm.sum(finite)[0]) < world:
            self._raise_non_finite(rollout, idx, stats, context)
        if vf_total is not None:
            self._backward(critic_engine, vf_total)
            if critic_engine is not None:
                critic_engine.step()
        if pg_loss is None:
            return stats, 0.0, False
        # sync point: the largest ratio on any rank decides whether this micro-batch's policy gradient counts
        ratio_max = float(self.comm.max(stats["ratio_max"].float().reshape(1).cpu())[0])
        skipped = ratio_max > self.cfg.ppo.ratio_skip_threshold
        if skipped:
            pg_loss = pg_loss * 0.0  # keeps DeepSpeed's accumulation bookkeeping intact
            if actor_engine is None:
                pg_loss = None
        if pg_loss is not None:
            self._backward(actor_engine, pg_loss)
        if actor_engine is not None:
            # the boundary of a minibatch skipped whole: DeepSpeed's step would still move the weights (Adam's
            # momentum, weight decay) and the schedule; like the plain path's skip, it must move nothing
            skipped_whole = skipped and skipped_before == accum - 1
            with step_without_update(actor_engine) if skipped_whole else nullcontext():
                actor_engine.step()
        return stats, ratio_max, skipped

    @property
    def _critic_engine(self) -> Any | None:
        return self.models.critic_optim.engine if self.models.critic_optim is not None else None

    def _backward(self, engine: Any, loss: torch.Tensor) -> None:
        if engine is not None:
            engine.backward(loss)
        else:
            (loss / self.sizes.grad_accum).backward()

    def _optimizer_step(self, optim: Optimisation, skip: bool) -> None:
        if optim.engine is not None:
            return  # DeepSpeed steps inside engine.step() at its accumulation boundary
        if skip:
            optim.optimizer.zero_grad(set_to_none=True)
            return
        max_grad_norm = self.cfg.ppo.train.max_grad_norm
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(optim.params, max_grad_norm, foreach=True)
        optim.optimizer.step()
        optim.scheduler.step()
        optim.optimizer.zero_grad(set_to_none=True)

    def _raise_non_finite(self, rollout: Rollout, idx: torch.Tensor, stats: Stats,
                          context: MicroStepContext) -> None:
        step, epoch = context.step, context.epoch
        losses = {k: float(v) for k, v in stats.items() if k in ("policy_loss", "value_loss")}
        path = self._save_bad_batch(rollout, idx, losses, step)
        raise FloatingPointError(
            f"ppo: non-finite loss at step {step} (epoch {epoch}); policy_loss={losses.get('policy_loss')}, "
            f"value_loss={losses.get('value_loss')}. The micro-batch is saved to {path} (load with torch.load). "
            "Lower ppo.train.learning_rate, check the reward scale (ppo.normalize_reward / reward_clip) or use "
            "bf16/fp32 (never fp16).")

    def _save_bad_batch(self, rollout: Rollout, idx: torch.Tensor, losses: dict[str, float], step: int) -> Path:
        path = self.bad_batch_dir / f"nan_batch_step{step}_rank{self.comm.dist.rank}.pt"
        ids, att = rollout.sequences(idx)
        torch.save({"step": step, "losses": losses, "input_ids": ids, "attention_mask": att,
                    "response": rollout.response_ids[idx], "mask": rollout.response_mask[idx],
                    "old_logp": rollout.old_logp[idx], "ref_logp": rollout.ref_logp[idx],
                    "values": rollout.old_values[idx], "advantages": rollout.advantages[idx],
                    "returns": rollout.returns[idx], "reward": rollout.reward[idx],
                    "texts": [rollout.response_texts[i] for i in idx.tolist()]}, path)
        return path
