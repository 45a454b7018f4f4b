"""Reward-model stage: preferences -> a scalar reward model (``AutoModelForSequenceClassification``, 1 label).

Loss (Bradley-Terry, fp32): ``-log σ(r_chosen - r_rejected - margin)`` averaged over the pairs of a
micro-batch (``margin`` is the optional data column, 0 where absent), plus the optional reward-centring
term ``center_rewards_coefficient · mean((r_chosen + r_rejected)²)`` that keeps rewards near zero.

Layout (recorded in the manifest as ``reward_layout``; PPO must score exactly this, see DESIGN §3):
the prompt and one response are rendered with the chat template in force and end at the response's
closing eos (``stages.chat.encode_sequence``); batches are right-padded with pad != eos and the score is
read at the last real token (the eos) by ``stages.scoring.score_sequences``, the same scorer PPO and the
report use. This module is the training stage only: reading an RM lives in ``stages.scoring``.

Pairs longer than ``rm.max_length``: the shared prompt is cut from the left (the same number of
tokens for chosen and rejected; a leading bos is kept, the assistant header is never cut); a pair
whose responses do not fit even with the prompt reduced to the assistant header is skipped and
counted. Nothing is dropped silently: the counts go into the manifest and are printed.

K-wise rankings are expanded by ``data.formats`` to all K(K-1)/2 pairs that share a ``group`` id; the
Engine keeps a group in one micro-batch (InstructGPT), and the held-out split is made by prompt, so no
prompt is in both the training and the evaluation set.

Metrics
- metrics.jsonl, one row per logged optimizer step: ``loss`` (Bradley-Terry loss + centring term, mean
  over the step's micro-batches), ``accuracy`` (fraction of pairs with r_chosen > r_rejected),
  ``margin`` (mean r_chosen - r_rejected), ``reward_chosen``, ``reward_rejected`` (mean scores),
  ``center_loss`` (the centring term, before its coefficient), ``pairs`` (pairs per micro-batch),
  ``lr``, ``grad_norm``, ``tokens_per_s`` (non-pad tokens of both responses' sequences per second, all
  ranks), ``epoch``; eval rows (every ``train.eval_steps`` and at the end): ``eval_loss``,
  ``eval_accuracy``, ``eval_mean_margin``, ``eval_reward_chosen``, ``eval_reward_rejected``,
  ``eval_pairs``, ``accuracy_by_margin_bucket``.
- manifest ``metrics``: the last training row and the final eval row, plus ``steps``, ``train_pairs``,
  ``eval_pairs``, ``prompt_truncated`` / ``skipped_too_long`` (pairs, train + eval) and their per-split
  ``train_*`` / ``eval_*`` counts, ``skipped_records`` (bad records skipped under
  ``max_bad_fraction``), ``kwise_groups`` (groups with more than one pair), ``world_size``,
  ``accuracy_by_margin_bucket`` (a list of ``{lo, hi, count, accuracy}`` for quartiles of
  |r_chosen - r_rejected| on the held-out pairs: a calibrated RM is more accurate where it is more
  confident), ``score_histogram`` (the PNG's file name).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from data.formats import DataError, PreferencePair, load_examples
from pipeline.config import DataSource, RunConfig
from pipeline.models import chat_fingerprint, chat_format, load_model, load_tokenizer, prepare_base
from pipeline.stage import StageRun
from stages.batching import right_pad_batch, split_eval
from stages.chat import cut_prompt, encode_sequence
from stages.engine import Engine, init_distributed, set_seed
from stages.saving import save_stage_model
from stages.scoring import REWARD_LAYOUT, score_sequences
from stages.tuning import apply_tuning, quantization_kwargs, trainable_summary

HISTOGRAM_FILE = "score_histogram.png"


# ------------------------------------------------------------------------------------------ layout
@dataclass
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    margin: float
    group: int
    where: str
    truncated: int = 0  # prompt tokens removed from the left


def encode_pair(tokenizer: Any, pair: PreferencePair, max_length: int,
                system_prompt: str | None = None) -> EncodedPair | None:
    """Encode one pair within ``max_length``; None when the responses do not fit (caller counts it).

    The prompt is cut from the left by the same number of tokens in both sequences, so chosen and
    rejected always see the same context.
    """
    c = encode_sequence(tokenizer, pair.prompt, pair.chosen, system_prompt)
    r = encode_sequence(tokenizer, pair.prompt, pair.rejected, system_prompt)
    overflow = max(len(c.ids), len(r.ids)) - max_length
    margin = float(pair.margin) if pair.margin is not None else 0.0
    if overflow <= 0:
        return EncodedPair(c.ids, r.ids, margin, pair.group, pair.where)
    bos = tokenizer.bos_token_id
    keep_first = bos is not None and c.ids[0] == bos and r.ids[0] == bos
    # what must stay: (bos) + assistant header + response
    cuttable = min(s.prompt_tokens - s.header_tokens for s in (c, r)) - (1 if keep_first else 0)
    if overflow > cuttable:
        return None
    return EncodedPair(cut_prompt(c, overflow, keep_first), cut_prompt(r, overflow, keep_first), margin,
                       pair.group, pair.where, truncated=overflow)


@dataclass
class EncodeReport:
    pairs: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    skipped_too_long: int = 0
    first_skipped: str | None = None


def encode_pairs(tokenizer: Any, pairs: Sequence[PreferencePair], max_length: int,
                 system_prompt: str | None = None) -> tuple[list[EncodedPair], EncodeReport]:
    """Encode many pairs; count truncated prompts and skipped (too long) pairs."""
    report = EncodeReport()
    rows: list[EncodedPair] = []
    for pair in pairs:
        report.pairs += 1
        try:
            row = encode_pair(tokenizer, pair, max_length, system_prompt)
        except ValueError as exc:
            raise DataError(f"{pair.where}: {exc}") from None
        if row is None:
            report.skipped_too_long += 1
            report.first_skipped = report.first_skipped or pair.where
            continue
        report.prompt_truncated += row.truncated > 0
        rows.append(row)
    report.kept = len(rows)
    return rows, report


def pair_collate(pad_id: int) -> Callable[[list[EncodedPair]], dict[str, torch.Tensor]]:
    """-> input_ids/attention_mask (2B, T): the B chosen rows, then the B rejected rows; margin (B,)."""

    def collate(rows: list[EncodedPair]) -> dict[str, torch.Tensor]:
        seqs = [r.chosen for r in rows] + [r.rejected for r in rows]
        batch = right_pad_batch(seqs, pad_id)
        batch["margin"] = torch.tensor([r.margin for r in rows], dtype=torch.float32)
        return batch

    return collate


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
        return {"eval_loss": float(loss), "eval_accuracy": metrics["accuracy"],
                "eval_mean_margin": metrics["margin"], "eval_reward_chosen": metrics["reward_chosen"],
                "eval_reward_rejected": metrics["reward_rejected"], "eval_pairs": len(rows),
                "accuracy_by_margin_bucket": margin_buckets(rc, rr)}

    return evaluate


# ----------------------------------------------------------------------------------------------- run
def load_preferences(cfg: RunConfig, source: DataSource | None = None,
                     ) -> tuple[list[PreferencePair], list[PreferencePair], dict[str, Any]]:
    """``source`` (default rm.data) (+ rm.eval_data, or a held-out split by prompt of rm.eval_fraction)
    -> (train, eval, report)."""
    rm = cfg.rm
    source = source or rm.data
    if source is None:
        raise DataError("rm.data is not set: point it at a preference file (prompt/chosen/rejected, "
                        "HH transcripts, or prompt/responses/ranking) or hub:name")
    pairs, report = load_examples(source, "preference")
    info: dict[str, Any] = {"train": report.as_dict()}
    if rm.eval_data is not None:
        eval_pairs, eval_report = load_examples(rm.eval_data, "preference")
        info["eval"] = eval_report.as_dict()
        return pairs, eval_pairs, info
    # split by prompt: all pairs of one prompt (a K-wise ranking, several judged pairs from rlaif_label,
    # or a prompt repeated in the data) stay on one side, so held-out accuracy is on unseen prompts
    def prompt_key(pair: PreferencePair) -> str:
        return json.dumps(pair.prompt, sort_keys=True)

    prompts = list(dict.fromkeys(prompt_key(p) for p in pairs))
    _, eval_prompts = split_eval(prompts, rm.eval_fraction, cfg.seed)
    held = set(eval_prompts)
    return [p for p in pairs if prompt_key(p) not in held], [p for p in pairs if prompt_key(p) in held], info


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
        run.update(reward_layout=dict(REWARD_LAYOUT))

        # offline RLAIF: with rlaif_label among the stages, its labelled pairs replace rm.data
        source = rm.data
        if "rlaif_label" in run.parents:
            from pipeline.manifest import hash_file
            from stages.rlaif.label import labelled_preferences

            labelled = labelled_preferences(run.parent_dir("rlaif_label"))
            source, digest = DataSource(path=str(labelled)), hash_file(labelled)
            run.manifest["data_files"][str(labelled)] = digest
            run.update(preference_data={"from": "rlaif_label", "path": str(labelled), "hash": digest})
            if rm.data is not None and dist.is_main:
                print(f"[alignpipe] rm: training on {labelled} (rlaif_label is among the stages); "
                      f"rm.data ({rm.data.path}) is not used", flush=True)
        else:
            run.update(preference_data={"from": "rm.data", "path": rm.data.path})
        train_pairs, eval_pairs, data_info = load_preferences(cfg, source)
        system = cfg.chat.system_prompt
        train_rows, train_enc = encode_pairs(tokenizer, train_pairs, rm.max_length, system)
        eval_rows, eval_enc = encode_pairs(tokenizer, eval_pairs, rm.max_length, system)
        for split, enc in (("train", train_enc), ("eval", eval_enc)):
            if dist.is_main and (enc.skipped_too_long or enc.prompt_truncated):
                first = f" (first: {enc.first_skipped})" if enc.first_skipped else ""
                print(f"[alignpipe] rm: {split}: {enc.prompt_truncated} of {enc.pairs} pairs had their prompt cut "
                      f"from the left, {enc.skipped_too_long} skipped because the responses do not fit in "
                      f"rm.max_length={rm.max_length}{first}", flush=True)
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
            groups=groups, unfreezer=unfreezer, desc="rm",
            eval_fn=make_eval_fn(eval_rows, collate, t.per_device_batch_size, dist.device,
                                 rm.center_rewards_coefficient, kept) if eval_rows else None,
        )
        result = engine.fit()
        save_stage_model(engine, tokenizer, run, rm.tuning, init_path, cfg, "seq_cls")

        metrics: dict[str, Any] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        if kept and dist.is_main:
            write_score_histogram(kept["chosen"], kept["rejected"], run.dir / HISTOGRAM_FILE)
            metrics["score_histogram"] = HISTOGRAM_FILE
        if "accuracy_by_margin_bucket" in result.metrics:
            metrics["accuracy_by_margin_bucket"] = result.metrics["accuracy_by_margin_bucket"]
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
