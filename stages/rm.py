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

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from data.formats import DataError, PreferencePair
from pipeline.config import DataSource, RunConfig
from pipeline.models import chat_fingerprint, chat_format, load_model, load_tokenizer, prepare_base
from pipeline.stage import StageRun
from stages.engine import Engine, init_distributed, set_seed
from stages.preferences import (  # noqa: F401  (EncodedPair, encode_pair: re-exported for callers of stages.rm)
    EncodedPair,
    encode_pair,
    encode_pairs,
    load_preference_split,
    pair_collate,
    pair_count,
    preference_source,
    print_encode_reports,
)
from stages.saving import save_stage_model
from stages.scoring import READ_TRAINED, REWARD_LAYOUT, score_sequences, write_reading_file
from stages.tuning import apply_tuning, quantization_kwargs, trainable_summary

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


def run(cfg: RunConfig) -> dict[str, Any]:
    rm = cfg.rm
    if rm.data is None and "rlaif_label" not in cfg.stages:
        raise DataError("rm.data is not set: point it at a preference file (prompt/chosen/rejected, "
                        "HH transcripts, or prompt/responses/ranking) or hub:name, or add rlaif_label to the "
                        "run's stages (make rlaif) to train on AI-judged pairs of SFT samples")
    dist = init_distributed()
    with StageRun(cfg, "rm", is_main=dist.is_main) as run:
        if rm.train.num_threads:
            torch.set_num_threads(rm.train.num_threads)
        if rm.init_from == "sft":
            sft_dir = run.parent_dir("sft")
            init_path = str(sft_dir / "model")
            if not (sft_dir / "model").exists():
                method = run.parents["sft"].get("tuning_method")
                raise FileNotFoundError(
                    f"{sft_dir}/model not found: the sft stage (tuning method {method!r}) saved only an "
                    "adapter, and a reward model needs a full or merged SFT model to start from. Re-run sft "
                    "with a mergeable method (full, lora, dora, ...) or set rm.init_from=base.")
            tokenizer = load_tokenizer(str(sft_dir), cfg.model, cfg.chat)
        else:
            base = prepare_base(cfg.model) if dist.is_main else None
            if dist.world_size > 1:  # rank 0 builds/converts the base once; the others wait for it
                holder = [base]
                torch.distributed.broadcast_object_list(holder, src=0)
                base = holder[0]
            init_path = base
            tokenizer = load_tokenizer(base, cfg.model, cfg.chat)
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("the tokenizer's pad must differ from eos for the reward model (set model.pad_token)")
        fmt = chat_format(tokenizer, cfg.chat)
        run.set_chat_format(fmt, chat_fingerprint(fmt))
        run.update(reward_layout=dict(REWARD_LAYOUT), reward_model_read=READ_TRAINED)

        # offline RLAIF: with rlaif_label among the stages, its labelled pairs replace rm.data
        source = preference_source(cfg, run, "rm", dist.is_main)
        train_pairs, eval_pairs, data_info = load_preferences(cfg, source)
        system = cfg.chat.system_prompt
        train_rows, train_enc = encode_pairs(tokenizer, train_pairs, rm.max_length, system)
        eval_rows, eval_enc = encode_pairs(tokenizer, eval_pairs, rm.max_length, system)
        if dist.is_main:
            print_encode_reports("rm", rm.max_length, {"train": train_enc, "eval": eval_enc})
        if not train_rows:
            raise DataError(f"{source.path}: no training pairs fit in rm.max_length={rm.max_length} "
                            f"({train_enc.skipped_too_long} skipped as too long); raise max_length")
        if not eval_rows and dist.is_main:
            print("[alignpipe] rm: no held-out pairs (set rm.eval_data or rm.eval_fraction): no eval metrics "
                  "or histogram", flush=True)

        group_sizes: dict[int, int] = {}
        for row in train_rows:
            group_sizes[row.group] = group_sizes.get(row.group, 0) + 1
        kwise_groups = sum(1 for n in group_sizes.values() if n > 1)
        groups = [row.group for row in train_rows] if kwise_groups else None

        t = rm.train
        steps_guess = t.max_steps or max(1, math.ceil(
            t.epochs * len(train_rows) / (t.per_device_batch_size * dist.world_size * t.gradient_accumulation_steps)))
        set_seed(t.seed)  # the new score head's initialisation is reproducible
        model = load_model(init_path, cfg.model, tokenizer, kind="seq_cls", **quantization_kwargs(rm.tuning))
        model.config.use_cache = False
        model, unfreezer = apply_tuning(model, rm.tuning, "seq_cls", steps_guess)
        params = trainable_summary(model)
        if dist.is_main:
            print(f"[alignpipe] rm: {len(train_rows)} train pairs ({kwise_groups} K-wise groups), {len(eval_rows)} "
                  f"eval, init from {rm.init_from}, method {rm.tuning.method}, trainable "
                  f"{params['params_trainable']:,} / {params['params_total']:,}", flush=True)
        collate = pair_collate(tokenizer.pad_token_id)
        kept: dict[str, torch.Tensor] = {}
        engine = Engine(
            model, t, run, dist, train_rows, collate, make_loss_fn(rm.center_rewards_coefficient),
            loss_units=pair_count, groups=groups, unfreezer=unfreezer, desc="rm",
            eval_fn=make_eval_fn(eval_rows, collate, t.per_device_batch_size, dist.device,
                                 rm.center_rewards_coefficient, kept) if eval_rows else None,
        )
        result = engine.fit()
        save_stage_model(engine, tokenizer, run, rm.tuning, init_path, cfg, "seq_cls")
        if dist.is_main and (run.dir / "model").is_dir():  # model/ on its own says where it is read
            write_reading_file(run.dir / "model", rm.max_length, cfg.chat.system_prompt)

        metrics: dict[str, Any] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        if kept and dist.is_main:
            write_score_histogram(kept["chosen"], kept["rejected"], run.dir / HISTOGRAM_FILE)
            metrics["score_histogram"] = HISTOGRAM_FILE
        for key in ("accuracy_by_margin_bucket", "eval_accuracy_by_kind"):
            if key in result.metrics:
                metrics[key] = result.metrics[key]
        metrics.update(
            steps=result.global_step, train_pairs=len(train_rows), eval_pairs=len(eval_rows),
            prompt_truncated=train_enc.prompt_truncated + eval_enc.prompt_truncated,
            skipped_too_long=train_enc.skipped_too_long + eval_enc.skipped_too_long,
            train_prompt_truncated=train_enc.prompt_truncated, train_skipped_too_long=train_enc.skipped_too_long,
            eval_prompt_truncated=eval_enc.prompt_truncated, eval_skipped_too_long=eval_enc.skipped_too_long,
            skipped_records=sum(d.get("skipped", 0) for d in data_info.values()),
            kwise_groups=kwise_groups, world_size=dist.world_size,
        )
        run.update(data=data_info, params=params)
        run.manifest["metrics"] = metrics
        return metrics
