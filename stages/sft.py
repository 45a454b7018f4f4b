"""Supervised fine-tuning stage: base model -> policy.

Loss on assistant tokens only; every assistant turn's closing eos is a trained target, the newline the
template puts after it is not (DESIGN §3). Masks are computed from character spans of the rendered chat
template (prefix renders of the conversation), so they are exact whatever the tokenizer merges at the
boundaries (``stages.chat.tokenize_sft``, the one home of the chat layout). Optional packing puts several
conversations in one row with position ids restarting at each conversation and no attention mask, so
transformers builds a block-diagonal mask (each conversation attends only to itself; verified in tests).

The loss of an optimizer step is the cross-entropy summed over every target token of its global batch
(all micro-batches, all ranks) divided by their number, so a token weighs the same however the batch is
split into micro-batches, accumulation steps and ranks (``stages.engine``; ``target_tokens`` is the count).

Metrics (metrics.jsonl, one row per logged optimizer step): ``loss`` (mean token cross-entropy over the
target tokens of the step, all ranks), ``lr``, ``grad_norm``, ``tokens_per_s`` (non-pad input tokens per
second, all ranks), ``target_tokens`` (trained tokens per micro-batch), ``epoch``; eval rows: ``eval_loss``.

Token-level distillation (``distill.token_level.enabled``): a frozen teacher (``distill.teacher``, same
vocabulary) reads each batch too, and ``loss`` is ``(1 - weight) x ce_loss + weight x kd_loss`` (both
logged; ``stages.kd``). ``eval_loss`` stays the cross-entropy. Resume needs nothing more: the teacher does
not train and is loaded again from the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from data.formats import DataError, load_examples
from pipeline.config import DataSource, RunConfig
from pipeline.stage import StageRun
from stages.batching import IGNORE, pad_collate, split_eval, target_tokens
from stages.chat import tokenize_sft
from stages.context import StageContext, numeric
from stages.engine import Engine


def pack_rows(rows: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """First-fit-decreasing packing into rows of at most ``max_length`` tokens with per-example positions."""
    bins: list[dict[str, Any]] = []
    for r in sorted(rows, key=lambda r: -len(r["input_ids"])):
        n = len(r["input_ids"])
        for b in bins:
            if len(b["input_ids"]) + n <= max_length:
                break
        else:
            b = {"input_ids": [], "labels": [], "position_ids": []}
            bins.append(b)
        labels = list(r["labels"])
        labels[0] = IGNORE  # never predict a conversation's first token from the previous one
        b["input_ids"] += r["input_ids"]
        b["labels"] += labels
        b["position_ids"] += list(range(n))
    return bins


def packed_collate(pad_id: int):
    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
        pos = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            pos[i, :n] = torch.tensor(r["position_ids"])
            # padding continues the last position run; its labels are ignored
            pos[i, n:] = torch.arange(longest - n)
        return {"input_ids": ids, "labels": labels, "position_ids": pos}

    return collate


def sft_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy over target tokens (fp32 logits), computed by the model from ``labels``."""
    kwargs = dict(batch)
    if "position_ids" in kwargs:
        kwargs["use_cache"] = False  # packed rows stay separate only without a cache
    out = model(**kwargs)
    return out.loss.float(), {"target_tokens": float(target_tokens(batch))}


def distillation_sft_loss(teacher: Any, token_level: Any):
    """The SFT loss with token-level distillation (``distill.token_level``): ``loss_fn(model, batch)`` for the
    engine, returning ``(1 - weight) x ce_loss + weight x kd_loss`` and both parts as metrics.

    ``ce_loss``: the mean cross-entropy over the data's target tokens (what ``sft_loss`` computes);
    ``kd_loss``: ``stages.kd.distillation_loss`` between the frozen ``teacher``'s and the student's
    next-token distributions at the same positions (the teacher reads the student's input ids and
    positions: one vocabulary, checked when the teacher loads)."""
    from stages.kd import distillation_loss, trained_positions

    weight = token_level.weight

    def loss_fn(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if "position_ids" in inputs:
            inputs["use_cache"] = False  # packed rows stay separate only without a cache
        logits = model(**inputs).logits
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits
        mask = trained_positions(labels, IGNORE)  # (B, L): position t predicts the trained token t + 1
        ce = torch.nn.functional.cross_entropy(logits[mask].float(), labels[:, 1:][mask[:, :-1]])
        kd = distillation_loss(logits, teacher_logits, mask, token_level.loss, token_level.beta,
                               token_level.temperature)
        loss = (1.0 - weight) * ce + weight * kd
        return loss, {"target_tokens": float(mask.sum()), "ce_loss": float(ce.detach()),
                      "kd_loss": float(kd.detach())}

    return loss_fn


def load_distillation_teacher(cfg: RunConfig, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """``distill.teacher`` as a frozen model for token-level distillation -> (model, its identity). Refuses a
    teacher whose vocabulary is not the student's ``tokenizer``'s (``pipeline.models.vocabulary_mismatch``)."""
    from pipeline.models import vocabulary_mismatch
    from stages.distill import build_teacher

    teacher, identity = build_teacher(cfg)
    key = "distill.teacher.path" if cfg.distill.teacher.kind == "stage" else "distill.teacher.model"
    problem = vocabulary_mismatch(tokenizer, teacher.tokenizer, key)
    if problem:
        raise DataError(problem)
    model = teacher.model.eval().requires_grad_(False)
    model.config.use_cache = False
    return model, identity


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def make_eval_fn(rows: list[dict[str, Any]], collate, batch_size: int, device: torch.device):
    def evaluate(model: Any) -> dict[str, float]:
        if not rows:
            return {}
        total, count = 0.0, 0
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i:i + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, metrics = sft_loss(model, batch)
            total += float(loss) * metrics["target_tokens"]
            count += metrics["target_tokens"]
        return {"eval_loss": total / max(count, 1)}

    return evaluate


def _sft_source(cfg: RunConfig, run: StageRun, is_main: bool) -> DataSource:
    """``sft.data``, or the teacher's answers of ``distill`` when it is a parent (recorded in the manifest)."""
    if "distill" not in run.parents:
        return cfg.sft.data
    from pipeline.manifest import hash_file
    from stages.distill import distill_data

    path = distill_data(run.parent_dir("distill"))
    digest = hash_file(path)
    run.manifest["data_files"][str(path)] = digest
    run.update(sft_data={"from": "distill", "path": str(path), "hash": digest})
    if cfg.sft.data is not None and is_main:
        print(f"[alignpipe] sft: training on {path} (distill is among the stages); sft.data ({cfg.sft.data.path}) "
              "is not used", flush=True)
    return DataSource(path=str(path))


@dataclass
class SFTRows:
    """The stage's encoded rows: training (packed with ``sft.packing``) and held-out, their collate functions,
    how many training conversations were cut at ``max_length``, and the data report."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    collate: Any
    eval_collate: Any
    truncated: int
    report: Any


def encoded_rows(ctx: StageContext, tokenizer: Any) -> SFTRows:
    """``sft.data`` (or distill's answers) split into training and held-out conversations (``sft.eval_data``, else
    ``eval_fraction``), encoded with the loss on the assistant tokens; a conversation with no assistant token left
    within ``max_length`` is an error."""
    cfg, sft = ctx.cfg, ctx.settings
    examples, report = load_examples(_sft_source(cfg, ctx.run, ctx.is_main), "sft")
    if sft.eval_data is not None:
        train_examples, (eval_examples, _) = examples, load_examples(sft.eval_data, "sft")
    else:
        train_examples, eval_examples = split_eval(examples, sft.eval_fraction, cfg.seed)

    def encode(ex: Any) -> dict[str, Any]:
        return tokenize_sft(tokenizer, ex.messages, sft.max_length, cfg.chat.system_prompt)

    train, held = [encode(ex) for ex in train_examples], [encode(ex) for ex in eval_examples]
    no_target = [ex.where for ex, r in zip(train_examples, train) if all(label == IGNORE for label in r["labels"])]
    if no_target:
        raise DataError(f"{no_target[0]}: no assistant tokens left within sft.max_length={sft.max_length} "
                        f"({len(no_target)} such records); raise max_length")
    truncated = sum(r["truncated"] for r in train)
    collate = pad_collate(tokenizer.pad_token_id)
    if sft.packing:
        train, collate = pack_rows(train, sft.max_length), packed_collate(tokenizer.pad_token_id)
    return SFTRows(train, held, collate, pad_collate(tokenizer.pad_token_id), truncated, report)


def loss_with_teacher(ctx: StageContext, tokenizer: Any) -> tuple[Any, Any]:
    """(the loss function, the frozen teacher or None): ``sft_loss``, or with ``distill.token_level`` the loss
    on the teacher's logits too (recorded in the manifest)."""
    token_level = ctx.cfg.distill.token_level
    if not token_level.enabled:
        return sft_loss, None
    teacher, identity = load_distillation_teacher(ctx.cfg, tokenizer)
    ctx.run.update(token_level={**token_level.model_dump(mode="json"), "teacher": identity})
    ctx.say(f"token-level distillation ({token_level.loss}, weight {token_level.weight}, temperature "
            f"{token_level.temperature}) from {identity}")
    return distillation_sft_loss(teacher, token_level), teacher


def run(cfg: RunConfig) -> dict[str, Any]:
    """The ``sft`` stage: the base model trained on the conversations' assistant tokens (see the module doc)."""
    sft = cfg.sft
    if sft.data is None and "distill" not in cfg.stages:
        raise DataError("sft.data is not set: point it at a JSONL/JSON/CSV/Parquet file or hub:name, or add "
                        "distill to the run's stages to train on a teacher's answers")
    with StageContext(cfg, "sft", num_threads=sft.train.num_threads) as ctx:
        base = ctx.base_model()
        tokenizer = ctx.use_tokenizer(base)
        rows = encoded_rows(ctx, tokenizer)
        # new weights (LoRA's A, a resized embedding) start the same in every run: trainable_model seeds them
        model, unfreezer, params = ctx.trainable_model(base, tokenizer, "causal_lm", len(rows.train))
        loss_fn, teacher = loss_with_teacher(ctx, tokenizer)
        ctx.say(f"{len(rows.train)} train rows, {len(rows.eval)} eval, method {sft.tuning.method}, trainable "
                f"{params['params_trainable']:,} / {params['params_total']:,}")
        engine = Engine(model, sft.train, ctx.run, ctx.dist, rows.train, rows.collate, loss_fn,
                        count_tokens=count_tokens, loss_units=target_tokens, unfreezer=unfreezer, desc="sft",
                        eval_fn=make_eval_fn(rows.eval, rows.eval_collate, sft.train.per_device_batch_size, ctx.device))
        result = engine.fit()
        del teacher, loss_fn  # frozen, nothing of it is saved; free its memory before the final save
        ctx.save_model(engine, tokenizer, base, "causal_lm")
        metrics = {**numeric(result.metrics), "steps": result.global_step, "train_rows": len(rows.train),
                   "eval_rows": len(rows.eval), "truncated": rows.truncated, "skipped_records": rows.report.skipped,
                   "packing": sft.packing, "world_size": ctx.dist.world_size}
        return ctx.finish(metrics, data=rows.report.as_dict(), params=params)
