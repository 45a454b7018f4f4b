"""KTO in the ``dpo`` stage (``dpo.loss: kto``): unpaired rows, each desirable or not, and the KL estimate.

1. Rows: ``data.formats.load_examples(..., "labelled")``: records ``{prompt | messages, completion | response,
   label}`` (TRL's unpaired preference format), or preference pairs unpaired into their chosen (desirable)
   and rejected (undesirable) rows as TRL's ``KTOTrainer`` does; held out by prompt like pairs.
2. The reference point z0 (``stages.dpo.core.kto_loss``) is estimated, as in the KTO paper and TRL, from
   *mismatched* sequences: a row's prompt with another row's completion, scored by the policy and by the
   reference. TRL pairs each row with the previous row of its micro-batch, which ties the mismatched
   sequence to the batching; here each row gets one fixed partner instead (``kl_partners``: the next row,
   in a seeded cyclic order of the split, whose prompt differs), so a row's two sequences, its own and its
   mismatched one, are known before training and their reference log-probs are computed once and cached
   exactly like a DPO pair's (``ReferenceCache``: before the first step, or lazily with a PEFT method, and
   kept in checkpoints). z0 is the mean over the micro-batch's mismatched sequences, clamped at 0, without
   gradient; each rank uses its own micro-batch's (TRL also averages it over ranks).
3. A row is a ``KTORow``: a ``DPORow`` whose two sequences are the prompt with its own completion
   (``pair.chosen``) and with its partner's (``pair.rejected``), so the collate, the reference pass and the
   cache treat it as a pair. The loss is the mean over the micro-batch's rows (``loss_units``: rows).

Metrics: train rows log ``kl`` (z0), ``label_accuracy`` (rows whose reward r = β (logp - ref) is on their
label's side of β z0), ``reward`` (mean), ``logp``, ``desirable`` (share of desirable rows), ``rows``. Held-out:
``eval_loss``, ``eval_kl``, ``eval_label_accuracy``, ``eval_reward_desirable`` / ``eval_reward_undesirable``,
``eval_rows``; when the held-out rows were unpaired from pairs, also the pair metrics of the other objectives
(``eval_accuracy``, ``eval_margin``, ``eval_reward_chosen`` / ``_rejected``, ``eval_logp_margin`` /
``eval_logp_accuracy``, ``eval_pairs``) on the pairs both of whose rows were kept.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from data.formats import DataError, LabelledExample
from stages.chat import encode_sequence
from stages.dpo.core import kto_loss, logp_agreement, preference_metrics
from stages.dpo.layout import DPORow, StageRows, dpo_collate, policy_logps
from stages.preferences import EncodedPair, EncodeReport, fit_to_length, load_preference_split, preference_source

#: rows looked at for a partner with another prompt before one with the same prompt is taken (a split with
#: very few prompts: the walk stays short)
PARTNER_WALK = 64


@dataclass
class KTORow(DPORow):
    """One labelled row: ``pair.chosen`` its prompt + completion, ``pair.rejected`` its prompt + its KL partner's
    completion (``ref_chosen`` / ``ref_rejected`` their reference log-probs); ``pair_id``: the preference record
    it was unpaired from (None: an unpaired record)."""

    desirable: bool = True
    pair_id: int | None = None


# ------------------------------------------------------------------------------------------ partners
def kl_partners(prompt_keys: list[str], seed: int) -> Iterator[tuple[int, Iterator[int]]]:
    """For each row i (in order): ``(i, candidates)``, the rows whose completion may make i's mismatched sequence,
    best first: the rows after i in a seeded cyclic order of the split with another prompt (at most
    ``PARTNER_WALK`` looked at), then those with the same prompt; a lone row is its own."""
    n = len(prompt_keys)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    position = {row: k for k, row in enumerate(order)}

    def candidates(i: int) -> Iterator[int]:
        after = [order[(position[i] + k) % n] for k in range(1, min(n, PARTNER_WALK + 1))]
        yield from (j for j in after if prompt_keys[j] != prompt_keys[i])
        yield from (j for j in after if prompt_keys[j] == prompt_keys[i])
        yield i

    for i in range(n):
        yield i, candidates(i)


def encode_row(tokenizer: Any, example: LabelledExample, completion: list[dict[str, str]], max_length: int,
               system_prompt: str | None) -> tuple[list[int], int, int] | None:
    """``example``'s prompt + ``completion`` within ``max_length`` -> (ids, prompt tokens, prompt tokens cut), or
    None when the completion does not fit."""
    seq = encode_sequence(tokenizer, example.prompt, completion, system_prompt)
    fitted = fit_to_length(tokenizer, [seq], max_length)
    if fitted is None:
        return None
    (ids,), cut = fitted
    return ids, seq.prompt_tokens - cut, cut


def build_kto_rows(examples: list[LabelledExample], tokenizer: Any, max_length: int, system_prompt: str | None,
                   seed: int) -> tuple[list[KTORow], EncodeReport]:
    """Encode each row and its mismatched sequence (``kl_partners``); rows whose completion does not fit are
    skipped and counted (``EncodeReport``, in rows)."""
    report = EncodeReport(pairs=len(examples))
    own: dict[int, tuple[list[int], int, int]] = {}
    for i, example in enumerate(examples):
        try:
            encoded = encode_row(tokenizer, example, example.completion, max_length, system_prompt)
        except ValueError as exc:
            raise DataError(f"{example.where}: {exc}") from None
        if encoded is None:
            report.skipped_too_long += 1
            report.first_skipped = report.first_skipped or example.where
        else:
            own[i] = encoded
    kept = list(own)
    keys = [json.dumps(examples[i].prompt, sort_keys=True) for i in kept]
    rows: list[KTORow] = []
    for k, candidates in kl_partners(keys, seed):
        example = examples[kept[k]]
        ids, prompt_tokens, cut = own[kept[k]]
        mismatched = next(filter(None, (encode_row(tokenizer, example, examples[kept[j]].completion, max_length,
                                                   system_prompt) for j in candidates)))
        pair = EncodedPair(ids, mismatched[0], 0.0, example.pair if example.pair is not None else -1, example.where,
                           truncated=cut, chosen_prompt=prompt_tokens, rejected_prompt=mismatched[1], kind=example.kind)
        rows.append(KTORow(pair, len(rows), desirable=example.desirable, pair_id=example.pair))
        report.prompt_truncated += cut > 0
    report.kept = len(rows)
    return rows, report


# ---------------------------------------------------------------------------------------------- loss
def kto_collate(pad_id: int) -> Callable[[list[KTORow]], dict[str, torch.Tensor]]:
    """``dpo_collate``'s layout (the B rows' own sequences, then their B mismatched ones) + ``desirable`` (B,) bool."""
    layout = dpo_collate(pad_id)

    def collate(rows: list[KTORow]) -> dict[str, torch.Tensor]:
        return {**layout(rows), "desirable": torch.tensor([r.desirable for r in rows], dtype=torch.bool)}

    return collate


def _half(batch: dict[str, torch.Tensor], first: bool) -> dict[str, torch.Tensor]:
    """The rows' own sequences (``first``) or their mismatched ones, right padding beyond the longest cut off."""
    n = batch["desirable"].shape[0]
    rows = slice(0, n) if first else slice(n, 2 * n)
    width = int(batch["attention_mask"][rows].sum(1).max())
    return {k: batch[k][rows, :width] for k in ("input_ids", "attention_mask", "response_mask")}


def kto_statistics(rewards: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor, beta: float
                   ) -> dict[str, torch.Tensor]:
    """``(N,)`` rewards β r and labels, z0 -> ``kl`` (z0) and ``label_accuracy`` (rewards on their label's side of
    β z0): the statistics every row has, whatever the labels of a micro-batch."""
    right_side = torch.where(desirable, rewards > beta * z0, rewards < beta * z0)
    return {"kl": z0, "label_accuracy": right_side.float().mean()}


def make_kto_loss_fn(dpo: Any):
    """The engine's loss of a micro-batch of KTO rows: the mean of ``kto_loss`` over its rows, z0 from the same
    micro-batch's mismatched sequences (their policy forward without gradient, first)."""

    def loss_fn(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            kl_logp = policy_logps(model, _half(batch, first=False), mean=False)
        logp = policy_logps(model, _half(batch, first=True), mean=False)
        desirable = batch["desirable"]
        losses, rewards, z0 = kto_loss(logp, batch["ref_chosen"], desirable, kl_logp, batch["ref_rejected"], dpo.beta,
                                       dpo.desirable_weight, dpo.undesirable_weight)
        stats = kto_statistics(rewards, desirable, z0, dpo.beta)
        stats.update(reward=rewards.mean(), logp=logp.detach().mean(), desirable=desirable.float().mean())
        return losses.mean(), {**{k: float(v) for k, v in stats.items()}, "rows": float(len(desirable))}

    return loss_fn


# ---------------------------------------------------------------------------------------- evaluation
def held_out_pairs(rows: list[KTORow]) -> list[tuple[int, int]]:
    """(desirable row, undesirable row) of each pair both of whose rows are in ``rows``, by position."""
    halves: dict[int, dict[bool, int]] = {}
    for k, row in enumerate(rows):
        if row.pair_id is not None:
            halves.setdefault(row.pair_id, {})[row.desirable] = k
    return [(two[True], two[False]) for two in halves.values() if len(two) == 2]


def pair_metrics(rewards: torch.Tensor, logp: torch.Tensor, pairs: list[tuple[int, int]]) -> dict[str, float]:
    """The paired objectives' held-out metrics on the pairs the rows were unpaired from."""
    if not pairs:
        return {}
    chosen, rejected = torch.tensor([c for c, _ in pairs]), torch.tensor([r for _, r in pairs])
    out = {f"eval_{k}": float(v) for k, v in preference_metrics(rewards[chosen], rewards[rejected]).items()}
    out.update({f"eval_{k}": v for k, v in logp_agreement(logp[chosen], logp[rejected]).items()})
    return {**out, "eval_pairs": len(pairs)}


def make_kto_eval_fn(rows: list[KTORow], collate: Callable[[list[KTORow]], dict[str, torch.Tensor]],
                     batch_size: int, device: torch.device, dpo: Any):
    """Held-out KTO metrics (module doc), z0 over the whole held-out split."""
    pairs = held_out_pairs(rows)

    def evaluate(model: Any) -> dict[str, float]:
        own, mismatched = [], []
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size]).items()}
            logp = policy_logps(model, batch, mean=False).float().cpu()
            n = batch["desirable"].shape[0]
            own.append(logp[:n])
            mismatched.append(logp[n:])
        logp, kl_logp = torch.cat(own), torch.cat(mismatched)
        desirable = torch.tensor([r.desirable for r in rows])
        ref, kl_ref = (torch.tensor([getattr(r, key) for r in rows]) for key in ("ref_chosen", "ref_rejected"))
        losses, rewards, z0 = kto_loss(logp, ref, desirable, kl_logp, kl_ref, dpo.beta, dpo.desirable_weight,
                                       dpo.undesirable_weight)
        out = {"eval_loss": float(losses.mean()),
               **{f"eval_{k}": float(v) for k, v in kto_statistics(rewards, desirable, z0, dpo.beta).items()}}
        for name, label in (("desirable", True), ("undesirable", False)):
            if bool((desirable == label).any()):
                out[f"eval_reward_{name}"] = float(rewards[desirable == label].mean())
        return {**out, **pair_metrics(rewards, logp, pairs), "eval_rows": len(rows)}

    return evaluate


# --------------------------------------------------------------------------------------------- rows
def _say_balance(ctx: Any, rows: list[KTORow], dpo: Any) -> dict[str, int]:
    """The label counts; a note when λ_D n_D / (λ_U n_U) is outside [1, 4/3] (the KTO paper's advice, as TRL's)."""
    n_d = sum(r.desirable for r in rows)
    n_u = len(rows) - n_d
    ratio = dpo.desirable_weight * n_d / max(dpo.undesirable_weight * n_u, 1e-12)
    if n_d and n_u and not 1.0 <= round(ratio, 2) <= 1.33:
        ctx.say(f"kto: {n_d} desirable and {n_u} undesirable rows give desirable_weight x n_D / (undesirable_weight x "
                f"n_U) = {ratio:.2f}, outside the KTO paper's [1, 4/3]; e.g. dpo.desirable_weight="
                f"{dpo.undesirable_weight * n_u / n_d:.2f}")
    return {"desirable_rows": n_d, "undesirable_rows": n_u}


def kto_rows(cfg: Any, ctx: Any, tokenizer: Any) -> StageRows:
    """The stage's rows under ``dpo.loss: kto`` (module doc): loaded, held out by prompt, encoded with their
    mismatched sequences."""
    dpo = cfg.dpo
    source = preference_source(cfg, ctx.run, "dpo", ctx.is_main)
    train_examples, eval_examples, info = load_preference_split(dpo, cfg.seed, source, "dpo", kind="labelled")
    split = {}
    for name, examples in (("train", train_examples), ("eval", eval_examples)):
        split[name] = build_kto_rows(examples, tokenizer, dpo.max_length, cfg.chat.system_prompt, cfg.seed)
        enc = split[name][1]
        if enc.skipped_too_long or enc.prompt_truncated:
            ctx.say(f"{name}: {enc.prompt_truncated} of {enc.pairs} rows had their prompt cut from the left, "
                    f"{enc.skipped_too_long} skipped because the completion does not fit in dpo.max_length="
                    f"{dpo.max_length} (first: {enc.first_skipped})")
    (train, train_report), (held, eval_report) = split["train"], split["eval"]
    if not train:
        raise DataError(f"{source.path}: no training rows fit in dpo.max_length={dpo.max_length}; raise max_length")
    collate = kto_collate(tokenizer.pad_token_id)
    evaluate = make_kto_eval_fn(held, collate, dpo.train.per_device_batch_size, ctx.device, dpo) if held else None
    pairs = held_out_pairs(held)

    def reference_eval() -> dict[str, float]:  # the starting policy's own agreement on the held-out pairs
        if not pairs:
            return {}
        before = logp_agreement(torch.tensor([held[c].ref_chosen for c, _ in pairs]),
                                torch.tensor([held[r].ref_chosen for _, r in pairs]))
        return {f"reference_eval_{k}": v for k, v in before.items()}

    counts = {"prompt_truncated": train_report.prompt_truncated + eval_report.prompt_truncated,
              "skipped_too_long": train_report.skipped_too_long + eval_report.skipped_too_long,
              "skipped_records": sum(d.get("skipped", 0) for d in info.values()), **_say_balance(ctx, train, dpo)}
    return StageRows(train, held, collate, make_kto_loss_fn(dpo), evaluate, info, counts, "rows", reference_eval)
