"""DPO stage: preferences -> a policy (``AutoModelForCausalLM``), on the shared training engine. The
objective is ``dpo.loss`` (docs/DPO.md): DPO, IPO, cDPO and KTO against a reference, ORPO and SimPO without
one (no reference forward is ever run for them: steps 2-3 below are skipped). KTO's unpaired rows and their
KL estimate are ``stages.dpo.kto``.

Why the engine and not TRL's ``DPOTrainer``: it is the loop SFT and RM train on (one checkpoint format,
one exact-resume path, DeepSpeed ZeRO-1/2/3 and DDP tested on CPU), it uses our chat layout
(``stages.preferences``: pad != eos, prompts cut from the left and counted, never dropped silently), and
its training loop measured faster at equal settings (``bench/dpo.py``, which compares whole-stage wall time
first: docs/RESULTS.md). The loss math is ``stages.dpo.core``.

1. The starting policy: the SFT stage's ``model/`` (``dpo.init_from: sft``) or the base model.
2. Pairs: ``dpo.data`` or ``rlaif_label``'s ``preferences.jsonl`` (``stages.preferences``), held out by
   prompt; each pair is prompt + response ending at the response's closing eos, chosen and rejected
   sharing the same (left-cut) prompt. The log-prob of a response sums its tokens including the eos.
3. The reference is the starting policy, in eval mode, under the run's autocast; no second copy of the
   weights is ever held. Its log-probs are computed only for the pairs the run trains on
   (``ReferenceCache``): with a PEFT method the reference is the same model with the adapter disabled
   (DESIGN §7), available at any step, so each micro-batch's new pairs are computed when it is first
   collated and cached by pair index; the cache is part of every checkpoint, so a resumed run uses the
   numbers the interrupted one computed. Full (or partial) fine-tuning moves the weights the reference
   is computed with, so there the pairs of every step the run will take (``Engine.scheduled_batches``)
   are computed before the first step (again, identically, on resume). The held-out pairs' log-probs
   are computed before the first step either way. Dropout is off (``dpo.disable_dropout``, as TRL's
   default), so at step 0 the policy's train-mode log-probs equal the reference's: loss log 2, margin 0.
4. Train ``mean(preference_loss)`` (over the pairs of each step's whole global batch) with the engine;
   evaluate on held-out pairs every ``eval_steps`` and at the end; save ``model/`` (+ ``adapter/``) like
   every policy stage, so ``serve``, the report and later stages load it.

Metrics
- metrics.jsonl, one row per logged optimizer step: ``loss``, ``reward_chosen``, ``reward_rejected``
  (mean implicit rewards β (logp - ref_logp); simpo: β x per-token mean logp; orpo: the log odds of the
  per-token mean probability, and ``nll``, the chosen responses' per-token NLL; KTO's rows:
  ``stages.dpo.kto``), ``margin`` (their mean difference), ``accuracy``
  (fraction with reward_chosen > reward_rejected), ``logp_chosen``, ``logp_rejected`` (policy, as the
  loss uses them), ``pairs``, ``lr`` (the rate the step's update used), ``grad_norm``, ``tokens_per_s``,
  ``epoch``; eval rows: ``eval_loss``, ``eval_reward_chosen``, ``eval_reward_rejected``, ``eval_margin``,
  ``eval_accuracy``
  (held-out preference accuracy of the implicit reward), ``eval_logp_margin`` / ``eval_logp_accuracy``
  (the policy's own log-prob of chosen minus rejected, and how often it is > 0), ``eval_pairs``.
- manifest ``metrics``: the last training row and final eval row, ``reference_eval_logp_margin`` /
  ``reference_eval_logp_accuracy`` (the same two on the starting policy: what DPO moved; not for orpo and
  simpo, which never run it), ``steps``,
  ``train_pairs``, ``eval_pairs``, ``reference_train_pairs`` (training pairs whose reference log-probs were
  computed, on rank 0), truncation/skip counts, ``skipped_records``, ``world_size``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import torch

from pipeline.config import RunConfig
from stages.context import StageContext, numeric
from stages.dpo.config import LENGTH_NORMALISED
from stages.dpo.core import logp_agreement, orpo_loss, preference_loss, preference_metrics, simpo_loss
from stages.dpo.kto import kto_rows
from stages.dpo.layout import DPORow, StageRows, dpo_collate, policy_logps
from stages.engine import Engine, use_bf16
from stages.preferences import encoded_preferences, pair_count, require_preference_data
from stages.training import disable_dropout

#: the manifest's ``reference``: how the reference's log-probs were computed
REFERENCE_LAZY = ("the starting policy with the adapter disabled: log-probs of each micro-batch's new pairs, computed "
                  "when it is first trained on")
REFERENCE_BEFORE = "the starting policy before the first step: log-probs of the pairs the run's steps use"
REFERENCE_NONE = "none: dpo.loss={} uses no reference model (none was run)"


# ------------------------------------------------------------------------------------- reference
def reference_context(model: Any) -> Any:
    """The reference forward: a PEFT model with its adapter disabled, any other model as it is (at step 0
    the policy *is* the reference)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


@torch.no_grad()
def compute_reference(model: Any, rows: list[DPORow], collate: Callable[[list[DPORow]], dict[str, torch.Tensor]],
                      batch_size: int, device: torch.device, bf16: bool, mean: bool) -> None:
    """Fill ``ref_chosen`` / ``ref_rejected`` of ``rows`` with the reference's log-probs (eval mode)."""
    was_training = model.training
    model.eval()
    with reference_context(model), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            logp = policy_logps(model, batch, mean).cpu()
            n = len(chunk)
            for row, c, r in zip(chunk, logp[:n].tolist(), logp[n:].tolist()):
                row.ref_chosen, row.ref_rejected = c, r
    model.train(was_training)


class ReferenceCache:
    """The reference's log-probs of the training pairs, computed for a micro-batch's pairs not seen before
    (one eval-mode forward, ``compute_reference``) and kept on the rows by pair index.

    ``collate`` is the engine's collate: it fills the micro-batch's missing pairs, then lays it out. With a
    PEFT method that is the lazy path (the adapter-disabled reference is the same at every step); for the
    other methods ``fill`` is called over ``Engine.scheduled_batches()`` before the first step, in the same
    grouping. ``state_dict`` / ``load_state_dict`` carry the cache through checkpoints (the engine's
    ``stage_state``). Under ZeRO-3 (``lockstep``) a forward gathers the weights collectively, so every rank
    takes part in each fill: a rank with nothing new recomputes one of its pairs and discards it.
    """

    def __init__(self, model: Any, rows: list[DPORow], collate: Callable[[list[DPORow]], dict[str, torch.Tensor]],
                 device: torch.device, bf16: bool, mean: bool):
        self.model, self.rows, self.layout = model, rows, collate
        self.device, self.bf16, self.mean = device, bf16, mean
        self.computed: set[int] = set()
        self.forward_pairs = 0  # pairs through the reference forward (each once, without lockstep's extras)
        self.lockstep = False

    def fill(self, indices: list[int]) -> None:
        missing = [i for i in dict.fromkeys(indices) if i not in self.computed]
        if self.lockstep:
            flag = torch.tensor([1 if missing else 0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and not missing:  # another rank computes: take part in its collectives
                spare = [dataclasses.replace(self.rows[indices[0]])]
                compute_reference(self.model, spare, self.layout, 1, self.device, self.bf16, self.mean)
        if not missing:
            return
        compute_reference(self.model, [self.rows[i] for i in missing], self.layout, len(missing), self.device,
                          self.bf16, self.mean)
        self.computed.update(missing)
        self.forward_pairs += len(missing)

    def collate(self, rows: list[DPORow]) -> dict[str, torch.Tensor]:
        self.fill([r.index for r in rows])
        return self.layout(rows)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The cache: pair indices and their log-probs (fp64 holds the fp32 numbers exactly)."""
        order = sorted(self.computed)
        return {"index": torch.tensor(order, dtype=torch.long),
                "chosen": torch.tensor([self.rows[i].ref_chosen for i in order], dtype=torch.float64),
                "rejected": torch.tensor([self.rows[i].ref_rejected for i in order], dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, chosen, rejected in zip(state["index"].tolist(), state["chosen"].tolist(), state["rejected"].tolist()):
            self.rows[i].ref_chosen, self.rows[i].ref_rejected = chosen, rejected
            self.computed.add(i)


# ---------------------------------------------------------------------------------------------- loss
def pair_losses(dpo: Any, logp_c: torch.Tensor, logp_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dpo.loss``'s per-pair losses and rewards (``stages.dpo.core``) on (B,) log-probs in its form (sums, or
    per-token means: ``LENGTH_NORMALISED``); orpo and simpo ignore ``ref_c`` / ``ref_r``."""
    if dpo.loss == "simpo":
        return simpo_loss(logp_c, logp_r, dpo.beta, dpo.simpo_gamma, dpo.simpo_sft_weight)
    if dpo.loss == "orpo":
        return orpo_loss(logp_c, logp_r, dpo.orpo_lambda)
    return preference_loss(logp_c, logp_r, ref_c, ref_r, dpo.beta, dpo.loss, dpo.label_smoothing)


def make_loss_fn(dpo: Any):
    """The engine's loss of a micro-batch of pairs under ``dpo`` (the ``dpo`` config section): the mean of
    ``pair_losses`` and its statistics."""
    mean = dpo.loss in LENGTH_NORMALISED

    def loss_fn(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logp = policy_logps(model, batch, mean)
        n = batch["ref_chosen"].shape[0]
        losses, reward_c, reward_r = pair_losses(dpo, logp[:n], logp[n:], batch["ref_chosen"], batch["ref_rejected"])
        stats = preference_metrics(reward_c, reward_r)
        stats["logp_chosen"], stats["logp_rejected"] = logp[:n].detach().mean(), logp[n:].detach().mean()
        if not dpo.uses_reference:  # the chosen responses' per-token NLL (ORPO's SFT term)
            stats["nll"] = -stats["logp_chosen"]
        return losses.mean(), {**{k: float(v) for k, v in stats.items()}, "pairs": float(n)}

    return loss_fn


def make_eval_fn(rows: list[DPORow], collate: Callable[[list[DPORow]], dict[str, torch.Tensor]], batch_size: int,
                 device: torch.device, dpo: Any):
    mean = dpo.loss in LENGTH_NORMALISED

    def evaluate(model: Any) -> dict[str, float]:
        if not rows:
            return {}
        logp_c, logp_r = [], []
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size]).items()}
            logp = policy_logps(model, batch, mean).float().cpu()
            n = batch["ref_chosen"].shape[0]
            logp_c.append(logp[:n])
            logp_r.append(logp[n:])
        pc, pr = torch.cat(logp_c), torch.cat(logp_r)
        rc = torch.tensor([r.ref_chosen for r in rows])
        rr = torch.tensor([r.ref_rejected for r in rows])
        losses, reward_c, reward_r = pair_losses(dpo, pc, pr, rc, rr)
        out = {f"eval_{k}": float(v) for k, v in preference_metrics(reward_c, reward_r).items()}
        out.update({f"eval_{k}": v for k, v in logp_agreement(pc, pr).items()})
        return {"eval_loss": float(losses.mean()), **out, "eval_pairs": len(rows)}

    return evaluate


# ----------------------------------------------------------------------------------------------- run
def _reference(model: Any, engine: Engine, eval_rows: list[DPORow], reference: ReferenceCache,
               collate: Callable[[list[DPORow]], dict[str, torch.Tensor]], lazy: bool, dpo: Any, ctx: StageContext
               ) -> None:
    """The reference's log-probs before the first step: the held-out pairs', and with full (or partial)
    fine-tuning, whose weights move from step 1 on, every training pair the run's steps will use. Called after
    the engine is built: under DeepSpeed the reference computes with the weights it will train."""
    reference.lockstep = ctx.dist.world_size > 1 and engine.zero_stage == 3
    compute_reference(model, eval_rows, collate, dpo.train.per_device_batch_size, ctx.device, reference.bf16,
                      reference.mean)
    if not lazy:
        for indices in engine.scheduled_batches():
            reference.fill(indices)


def paired_rows(cfg: RunConfig, ctx: StageContext, tokenizer: Any) -> StageRows:
    """The pairs (``encoded_preferences``) as the engine takes them under a paired ``dpo.loss``."""
    dpo = cfg.dpo
    pairs = encoded_preferences(cfg, ctx.run, "dpo", tokenizer, ctx.is_main)
    train_rows = [DPORow(p, i) for i, p in enumerate(pairs.train)]
    eval_rows = [DPORow(p, i) for i, p in enumerate(pairs.eval)]
    collate = dpo_collate(tokenizer.pad_token_id)
    evaluate = make_eval_fn(eval_rows, collate, dpo.train.per_device_batch_size, ctx.device, dpo) if eval_rows else None

    def reference_eval() -> dict[str, float]:  # what DPO moved: the policy's own agreement, on the starting policy
        if not eval_rows or not dpo.uses_reference:
            return {}
        before = logp_agreement(torch.tensor([r.ref_chosen for r in eval_rows]),
                                torch.tensor([r.ref_rejected for r in eval_rows]))
        return {f"reference_eval_{k}": v for k, v in before.items()}

    return StageRows(train_rows, eval_rows, collate, make_loss_fn(dpo), evaluate, pairs.info, pairs.counts(),
                     "pairs", reference_eval)


def reference_cache(model: Any, rows: StageRows, dpo: Any, ctx: StageContext) -> ReferenceCache | None:
    """The reference log-probs of the training rows (``ReferenceCache``); None for a loss without a reference."""
    if not dpo.uses_reference:
        return None
    return ReferenceCache(model, rows.train, rows.collate, ctx.device, use_bf16(dpo.train.precision, ctx.device),
                          dpo.loss in LENGTH_NORMALISED)


def reference_note(dpo: Any) -> str:
    """The manifest's ``reference``: how the reference's log-probs were computed (or that there is none)."""
    if not dpo.uses_reference:
        return REFERENCE_NONE.format(dpo.loss)
    return REFERENCE_LAZY if dpo.tuning.is_peft else REFERENCE_BEFORE


def run(cfg: RunConfig) -> dict[str, Any]:
    """The ``dpo`` stage: 1. the starting policy and its chat format, 2. the pairs (KTO: its rows), 3. the
    reference's log-probs (the starting policy; adapter disabled for PEFT; none for orpo and simpo), 4. train,
    evaluate, save (see the module doc)."""
    dpo = cfg.dpo
    require_preference_data(cfg, "dpo")
    with StageContext(cfg, "dpo", num_threads=dpo.train.num_threads) as ctx:
        start = ctx.starting_model(dpo.init_from == "sft", needs_full_model="DPO")
        tokenizer = ctx.use_tokenizer(start.tokenizer_dir, distinct_pad="DPO")
        rows = kto_rows(cfg, ctx, tokenizer) if dpo.loss == "kto" else paired_rows(cfg, ctx, tokenizer)
        model, unfreezer, params = ctx.trainable_model(start.model_dir, tokenizer, "causal_lm", len(rows.train))
        if dpo.disable_dropout:
            disable_dropout(model)
        model = model.to(ctx.device)
        reference = reference_cache(model, rows, dpo, ctx)
        objective = dpo.objective()
        ctx.run.update(policy_source=start.description, reference=reference_note(dpo), dpo_loss=objective)
        settings = ", ".join(f"{key} {value}" for key, value in objective.items() if key != "loss")
        ctx.say(f"{len(rows.train)} train {rows.unit}, {len(rows.eval)} eval, from {start.description}, loss "
                f"{dpo.loss} ({settings}), method {dpo.tuning.method}, trainable {params['params_trainable']:,} / "
                f"{params['params_total']:,}")
        collate = reference.collate if reference is not None else rows.collate  # the cache fills as it lays out
        engine = Engine(model, dpo.train, ctx.run, ctx.dist, rows.train, collate, rows.loss_fn, loss_units=pair_count,
                        unfreezer=unfreezer, desc="dpo", eval_fn=rows.evaluate, stage_state=reference)
        if reference is not None:
            _reference(model, engine, rows.eval, reference, rows.collate, dpo.tuning.is_peft, dpo, ctx)
        result = engine.fit()
        ctx.save_model(engine, tokenizer, start.model_dir, "causal_lm")
        metrics = {**numeric(result.metrics), **rows.reference_eval(), "steps": result.global_step,
                   f"train_{rows.unit}": len(rows.train), f"eval_{rows.unit}": len(rows.eval)}
        if reference is not None:
            metrics[f"reference_train_{rows.unit}"] = len(reference.computed)
        metrics.update(**rows.counts, world_size=ctx.dist.world_size)
        return ctx.finish(metrics, data=rows.info, params=params)
