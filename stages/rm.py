"""Reward-model stage: preferences -> a scalar reward model (``AutoModelForSequenceClassification``, 1 label).

Loss (Bradley-Terry, fp32): ``-log σ(r_chosen - r_rejected - margin)`` averaged over the pairs
(``margin`` is the optional data column, 0 where absent), plus the optional reward-centring term
``center_rewards_coefficient · mean((r_chosen + r_rejected)²)`` that keeps rewards near zero. A step's
mean is over every pair of its global batch (all micro-batches, all ranks; ``stages.engine``), so a pair
weighs the same even where K-wise groups make micro-batches of unequal sizes.

Layout (recorded in the manifest as ``reward_layout``; PPO must score exactly this, see DESIGN §3):
the prompt and one response are rendered with the chat template in force and end at the response's
closing eos (``stages.chat.encode_sequence``); batches are right-padded with pad != eos and the score is
read at the last real token (the eos) by ``stages.scoring.score_sequences``, the same scorer PPO and the
report use. That is not where transformers' sequence classifier pools (the last non-pad token of the
full template render: for ChatML the newline after the eos), so the manifest says
``reward_model_read: trained_position`` and ``model/`` gets a ``reward_reading.json`` saying the same
(``stages.scoring.reward_reading``), and PPO and ``python -m pipeline score`` read it at the eos. This
module is the training stage only: reading an RM lives in ``stages.scoring``.

Pairs longer than ``rm.max_length``: the shared prompt is cut from the left (the same number of
tokens for chosen and rejected; a leading bos is kept, the assistant header is never cut); a pair
whose responses do not fit even with the prompt reduced to the assistant header is skipped and
counted. Nothing is dropped silently: the counts go into the manifest and are printed.

K-wise rankings are expanded by ``data.formats`` to all K(K-1)/2 pairs that share a ``group`` id; the
Engine keeps a group in one micro-batch (InstructGPT), and the held-out split is made by prompt, so no
prompt is in both the training and the evaluation set.

Metrics
- metrics.jsonl, one row per logged optimizer step: ``loss`` (Bradley-Terry loss + centring term, mean
  over the step's pairs, all ranks), ``accuracy`` (fraction of pairs with r_chosen > r_rejected),
  ``margin`` (mean r_chosen - r_rejected), ``reward_chosen``, ``reward_rejected`` (mean scores),
  ``center_loss`` (the centring term, before its coefficient), ``pairs`` (pairs per micro-batch),
  ``lr``, ``grad_norm``, ``tokens_per_s`` (non-pad tokens of both responses' sequences per second, all
  ranks), ``epoch``; eval rows (every ``train.eval_steps`` and at the end): ``eval_loss``,
  ``eval_accuracy``, ``eval_mean_margin``, ``eval_reward_chosen``, ``eval_reward_rejected``,
  ``eval_pairs``, ``accuracy_by_margin_bucket``, and, when the data has the optional ``kind`` column,
  ``eval_accuracy_by_kind`` (``{kind: {n, accuracy}}``: held-out accuracy per kind of pair, e.g. pairs that
  differ in format against pairs that differ in correctness; pairs without a kind count as "unlabelled").
- manifest ``metrics``: the last training row and the final eval row, plus ``steps``, ``train_pairs``,
  ``eval_pairs``, ``prompt_truncated`` / ``skipped_too_long`` (pairs, train + eval) and their per-split
  ``train_*`` / ``eval_*`` counts, ``skipped_records`` (bad records skipped under
  ``max_bad_fraction``), ``kwise_groups`` (groups with more than one pair), ``world_size``,
  ``accuracy_by_margin_bucket`` (a list of ``{lo, hi, count, accuracy}`` for quartiles of
  |r_chosen - r_rejected| on the held-out pairs: a calibrated RM is more accurate where it is more
  confident), ``eval_accuracy_by_kind`` (as in the eval rows, when the data has a ``kind`` column: an
  overall accuracy can hide an RM that learned one kind of contrast and not another), ``score_histogram``
  (the PNG's file name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from data.formats import PreferencePair
from pipeline.config import DataSource, RunConfig
from stages.context import StageContext, numeric
from stages.engine import Engine
from stages.preferences import (  # noqa: F401  (encode_pair, encode_pairs: re-exported for callers of stages.rm)
    EncodedPair,
    encode_pair,
    encode_pairs,
    encoded_preferences,
    load_preference_split,
    pair_collate,
    pair_count,
    require_preference_data,
)
from stages.scoring import READ_TRAINED, REWARD_LAYOUT, score_sequences, write_reading_file

HISTOGRAM_FILE = "score_histogram.png"


# ---------------------------------------------------------------------------------------------- loss
def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  center_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """(B,) rewards -> (scalar fp32 loss, metrics). loss = mean(-log σ(rc - rr - m)) + c·mean((rc + rr)²)."""
    rc, rr = r_chosen.float(), r_rejected.float()
    diff = rc - rr
    if margin is not None:
        diff = diff - margin.float().to(diff.device)
    loss = -F.logsigmoid(diff).mean()
    center = ((rc + rr) ** 2).mean()
    if center_coef:
        loss = loss + center_coef * center
    rc, rr, center_value = rc.detach(), rr.detach(), center.detach()
    metrics = {
        "accuracy": float((rc > rr).float().mean()),
        "margin": float((rc - rr).mean()),
        "reward_chosen": float(rc.mean()),
        "reward_rejected": float(rr.mean()),
        "center_loss": float(center_value),
        "pairs": float(rc.numel()),
    }
    return loss, metrics


def make_loss_fn(center_coef: float) -> Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]:
    def loss_fn(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        scores = score_sequences(model, batch["input_ids"], batch["attention_mask"])
        n = batch["margin"].shape[0]
        return pairwise_loss(scores[:n], scores[n:], batch["margin"], center_coef)

    return loss_fn


# ---------------------------------------------------------------------------------------------- eval
def margin_buckets(r_chosen: torch.Tensor, r_rejected: torch.Tensor, n_buckets: int = 4) -> list[dict[str, float]]:
    """Accuracy by quantile bucket of |r_chosen - r_rejected| -> [{lo, hi, count, accuracy}], low first."""
    if r_chosen.numel() == 0:
        return []
    gap = (r_chosen - r_rejected).abs().double()
    correct = (r_chosen > r_rejected).double()
    order = torch.argsort(gap)
    n = gap.numel()
    n_buckets = max(1, min(n_buckets, n))
    out = []
    for b in range(n_buckets):
        idx = order[b * n // n_buckets:(b + 1) * n // n_buckets]
        if idx.numel() == 0:
            continue
        out.append({"lo": round(float(gap[idx].min()), 6), "hi": round(float(gap[idx].max()), 6),
                    "count": int(idx.numel()), "accuracy": round(float(correct[idx].mean()), 6)})
    return out


UNLABELLED = "unlabelled"  # eval_accuracy_by_kind's key for pairs without a kind where others have one


def accuracy_by_kind(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                     kinds: list[str | None]) -> dict[str, dict[str, float]]:
    """Held-out accuracy per kind of pair: (B,) chosen and rejected scores and B kinds -> ``{kind: {n,
    accuracy}}`` (accuracy: the fraction of that kind's pairs with r_chosen > r_rejected), kinds sorted by
    name; a pair whose kind is None counts as ``UNLABELLED``. Empty when no pair has a kind."""
    if not any(kinds):
        return {}
    right = (r_chosen > r_rejected).tolist()
    counts: dict[str, list[int]] = {}
    for kind, ok in zip(kinds, right):
        entry = counts.setdefault(kind or UNLABELLED, [0, 0])
        entry[0] += 1
        entry[1] += bool(ok)
    return {kind: {"n": n, "accuracy": round(hits / n, 6)} for kind, (n, hits) in sorted(counts.items())}


def write_score_histogram(r_chosen: torch.Tensor, r_rejected: torch.Tensor, path: Path,
                          title: str = "reward model: held-out scores") -> None:
    """Overlaid histograms of chosen and rejected scores (matplotlib, Agg backend) -> PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen, rejected = r_chosen.double().numpy(), r_rejected.double().numpy()
    lo = float(min(chosen.min(), rejected.min()))
    hi = float(max(chosen.max(), rejected.max()))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    bins = [lo + (hi - lo) * i / 30 for i in range(31)]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.hist(chosen, bins=bins, alpha=0.6, label=f"chosen (mean {chosen.mean():.2f})", color="tab:green")
    ax.hist(rejected, bins=bins, alpha=0.6, label=f"rejected (mean {rejected.mean():.2f})", color="tab:red")
    acc = float((r_chosen > r_rejected).double().mean())
    ax.set_title(f"{title}\n{len(chosen)} pairs, accuracy {acc:.3f}")
    ax.set_xlabel("reward score")
    ax.set_ylabel("pairs")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)


def make_eval_fn(rows: list[EncodedPair], collate: Callable[[list[EncodedPair]], dict[str, torch.Tensor]],
                 batch_size: int, device: torch.device, center_coef: float,
                 keep: dict[str, torch.Tensor]) -> Callable[[Any], dict[str, Any]]:
    """Held-out metrics; the last scores are left in ``keep`` ("chosen", "rejected") for the histogram."""

    def evaluate(model: Any) -> dict[str, Any]:
        if not rows:
            return {}
        chosen, rejected, margins = [], [], []
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i:i + batch_size])
            scores = score_sequences(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            n = batch["margin"].shape[0]
            chosen.append(scores[:n].float().cpu())
            rejected.append(scores[n:].float().cpu())
            margins.append(batch["margin"])
        rc, rr, m = torch.cat(chosen), torch.cat(rejected), torch.cat(margins)
        keep["chosen"], keep["rejected"] = rc, rr
        loss, metrics = pairwise_loss(rc, rr, m, center_coef)
        out = {"eval_loss": float(loss), "eval_accuracy": metrics["accuracy"],
               "eval_mean_margin": metrics["margin"], "eval_reward_chosen": metrics["reward_chosen"],
               "eval_reward_rejected": metrics["reward_rejected"], "eval_pairs": len(rows),
               "accuracy_by_margin_bucket": margin_buckets(rc, rr)}
        by_kind = accuracy_by_kind(rc, rr, [row.kind for row in rows])
        if by_kind:
            out["eval_accuracy_by_kind"] = by_kind
        return out

    return evaluate


# ----------------------------------------------------------------------------------------------- run
def load_preferences(cfg: RunConfig, source: DataSource | None = None,
                     ) -> tuple[list[PreferencePair], list[PreferencePair], dict[str, Any]]:
    """``source`` (default rm.data) (+ rm.eval_data, or a held-out split by prompt of rm.eval_fraction)
    -> (train, eval, report); see ``stages.preferences.load_preference_split``."""
    return load_preference_split(cfg.rm, cfg.seed, source, "rm")


def kwise_groups(rows: list[EncodedPair]) -> tuple[list[int] | None, int]:
    """(a group id per row when some prompt has several pairs (a K-wise ranking), the number of such groups):
    the engine keeps a group in one micro-batch."""
    sizes: dict[int, int] = {}
    for row in rows:
        sizes[row.group] = sizes.get(row.group, 0) + 1
    n = sum(1 for size in sizes.values() if size > 1)
    return ([row.group for row in rows] if n else None), n


def run(cfg: RunConfig) -> dict[str, Any]:
    """The ``rm`` stage: pairs in the reward layout, a Bradley-Terry loss on the shared engine, ``model/`` with
    where it is read, the held-out histogram and metrics (see the module doc)."""
    rm = cfg.rm
    require_preference_data(cfg, "rm")
    with StageContext(cfg, "rm", num_threads=rm.train.num_threads) as ctx:
        start = ctx.starting_model(rm.init_from == "sft", needs_full_model="a reward model")
        tokenizer = ctx.use_tokenizer(start.tokenizer_dir, distinct_pad="the reward model")
        ctx.run.update(reward_layout=dict(REWARD_LAYOUT), reward_model_read=READ_TRAINED)
        # offline RLAIF: with rlaif_label among the stages, its labelled pairs replace rm.data
        pairs = encoded_preferences(cfg, ctx.run, "rm", tokenizer, ctx.is_main)
        if not pairs.eval:
            ctx.say("no held-out pairs (set rm.eval_data or rm.eval_fraction): no eval metrics or histogram")
        groups, n_groups = kwise_groups(pairs.train)
        model, unfreezer, params = ctx.trainable_model(start.model_dir, tokenizer, "seq_cls", len(pairs.train))
        ctx.say(f"{len(pairs.train)} train pairs ({n_groups} K-wise groups), {len(pairs.eval)} eval, init from "
                f"{rm.init_from}, method {rm.tuning.method}, trainable {params['params_trainable']:,} / "
                f"{params['params_total']:,}")
        collate, kept = pair_collate(tokenizer.pad_token_id), {}
        evaluate = make_eval_fn(pairs.eval, collate, rm.train.per_device_batch_size, ctx.device,
                                rm.center_rewards_coefficient, kept) if pairs.eval else None
        engine = Engine(model, rm.train, ctx.run, ctx.dist, pairs.train, collate,
                        make_loss_fn(rm.center_rewards_coefficient), loss_units=pair_count, groups=groups,
                        unfreezer=unfreezer, desc="rm", eval_fn=evaluate)
        result = engine.fit()
        ctx.save_model(engine, tokenizer, start.model_dir, "seq_cls")
        if ctx.is_main and (ctx.dir / "model").is_dir():  # model/ on its own says where it is read
            write_reading_file(ctx.dir / "model", rm.max_length, cfg.chat.system_prompt)
        metrics = numeric(result.metrics)
        if kept and ctx.is_main:
            write_score_histogram(kept["chosen"], kept["rejected"], ctx.dir / HISTOGRAM_FILE)
            metrics["score_histogram"] = HISTOGRAM_FILE
        metrics.update({key: result.metrics[key] for key in ("accuracy_by_margin_bucket", "eval_accuracy_by_kind")
                        if key in result.metrics})
        metrics.update(steps=result.global_step, train_pairs=len(pairs.train), eval_pairs=len(pairs.eval),
                       **pairs.counts(per_split=True), kwise_groups=n_groups, world_size=ctx.dist.world_size)
        return ctx.finish(metrics, data=pairs.info, params=params)
