"""Preference pairs for every stage that trains on them (``rm``, ``dpo``): where they come from, the
held-out split, and their token layout.

- :func:`preference_source`: the section's ``data``, or ``rlaif_label``'s ``preferences.jsonl`` when that
  stage is among the run's stages (recorded in the manifest either way);
- :func:`load_preference_split`: load (``data.formats.load_examples(..., "preference")``: pairs, K-wise
  rankings expanded to pairs, HH transcripts; bad records as ``file:line: ...``; or KTO's ``"labelled"``
  rows) and hold out ``eval_data`` or a seeded fraction *by prompt*, so no prompt is on both sides;
- :func:`encode_pair` / :func:`encode_pairs`: prompt + response in the reward layout of
  ``stages.chat.encode_sequence`` (ending at the response's closing eos); a pair longer than
  ``max_length`` has its shared prompt cut from the left (the same number of tokens in chosen and
  rejected, bos and the assistant header kept: :func:`fit_to_length`), a pair whose responses cannot fit
  is skipped and counted;
- :func:`pair_collate`: the B chosen rows then the B rejected rows, right-padded (pad != eos).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from data.formats import DataError, LabelledExample, PreferencePair, load_examples
from pipeline.config import DataSource, RunConfig
from pipeline.stage import StageRun
from stages.batching import right_pad_batch, split_eval
from stages.chat import EncodedSequence, cut_prompt, encode_sequence

NO_DATA_HINT = ("point it at a preference file (prompt/chosen/rejected, HH transcripts, or "
                "prompt/responses/ranking) or hub:name")


# ------------------------------------------------------------------------------------------ source
def require_preference_data(cfg: Any, stage: str) -> None:
    """Before ``rm`` / ``dpo`` starts: it has pairs to train on, ``<stage>.data`` or rlaif_label's (DataError)."""
    if getattr(cfg, stage).data is None and "rlaif_label" not in cfg.stages:
        raise DataError(f"{stage}.data is not set: {NO_DATA_HINT}, or add rlaif_label to the run's stages (make "
                        "rlaif) to train on AI-judged pairs of SFT samples")


def preference_source(cfg: RunConfig, run: StageRun, section: str, is_main: bool = True) -> DataSource:
    """``<section>.data``, or the labelled pairs of ``rlaif_label`` when it is a parent of this stage."""
    data = getattr(cfg, section).data
    if "rlaif_label" in run.parents:
        from pipeline.manifest import hash_file
        from stages.rlaif.label import labelled_preferences

        labelled = labelled_preferences(run.parent_dir("rlaif_label"))
        digest = hash_file(labelled)
        run.manifest["data_files"][str(labelled)] = digest
        run.update(preference_data={"from": "rlaif_label", "path": str(labelled), "hash": digest})
        if data is not None and is_main:
            print(f"[alignpipe] {section}: training on {labelled} (rlaif_label is among the stages); "
                  f"{section}.data ({data.path}) is not used", flush=True)
        return DataSource(path=str(labelled))
    if data is None:
        raise DataError(f"{section}.data is not set: {NO_DATA_HINT}")
    run.update(preference_data={"from": f"{section}.data", "path": data.path})
    return data


def load_preference_split(section: Any, seed: int, source: DataSource | None = None, name: str = "rm",
                          kind: str = "preference") -> tuple[list[Any], list[Any], dict[str, Any]]:
    """``source`` (default ``section.data``) (+ ``section.eval_data``, or a held-out split by prompt of
    ``section.eval_fraction``) -> (train, eval, report). ``name`` is the config section, for messages; ``kind``
    what ``load_examples`` makes of the records: pairs (``PreferencePair``), or KTO's ``labelled`` rows
    (``LabelledExample``, held out by prompt the same way)."""
    source = source or section.data
    if source is None:
        raise DataError(f"{name}.data is not set: {NO_DATA_HINT}")
    pairs, report = load_examples(source, kind)
    info: dict[str, Any] = {"train": report.as_dict()}
    if section.eval_data is not None:
        eval_pairs, eval_report = load_examples(section.eval_data, kind)
        info["eval"] = eval_report.as_dict()
        return pairs, eval_pairs, info
    # split by prompt: all pairs of one prompt (a K-wise ranking, several judged pairs from rlaif_label,
    # or a prompt repeated in the data) stay on one side, so held-out accuracy is on unseen prompts
    def prompt_key(pair: PreferencePair | LabelledExample) -> str:
        return json.dumps(pair.prompt, sort_keys=True)

    prompts = list(dict.fromkeys(prompt_key(p) for p in pairs))
    _, eval_prompts = split_eval(prompts, section.eval_fraction, seed)
    held = set(eval_prompts)
    return [p for p in pairs if prompt_key(p) not in held], [p for p in pairs if prompt_key(p) in held], info


# ------------------------------------------------------------------------------------------ layout
@dataclass
class EncodedPair:
    """One pair in the reward layout. ``chosen_prompt`` / ``rejected_prompt``: how many leading ids of
    ``chosen`` / ``rejected`` are prompt (after any cut; the response, ending at eos, follows)."""

    chosen: list[int]
    rejected: list[int]
    margin: float
    group: int
    where: str
    truncated: int = 0  # prompt tokens removed from the left
    chosen_prompt: int = 0
    rejected_prompt: int = 0
    kind: str | None = None  # the pair's ``kind`` column (``PreferencePair.kind``)


def fit_to_length(tokenizer: Any, seqs: list[EncodedSequence], max_length: int) -> tuple[list[list[int]], int] | None:
    """``seqs`` (prompt + response, sharing one prompt) within ``max_length``: the ids with the prompt cut from the
    left by the same number of tokens in each (bos, when every sequence starts with it, and the assistant header
    kept), and that number; None when the responses do not fit even so."""
    overflow = max(len(s.ids) for s in seqs) - max_length
    if overflow <= 0:
        return [list(s.ids) for s in seqs], 0
    bos = tokenizer.bos_token_id
    keep_first = bos is not None and all(s.ids[0] == bos for s in seqs)
    # what must stay: (bos) + assistant header + response
    cuttable = min(s.prompt_tokens - s.header_tokens for s in seqs) - (1 if keep_first else 0)
    if overflow > cuttable:
        return None
    return [cut_prompt(s, overflow, keep_first) for s in seqs], overflow


def encode_pair(tokenizer: Any, pair: PreferencePair, max_length: int,
                system_prompt: str | None = None) -> EncodedPair | None:
    """Encode one pair within ``max_length``; None when the responses do not fit (caller counts it).

    The prompt is cut from the left by the same number of tokens in both sequences, so chosen and
    rejected always see the same context.
    """
    c = encode_sequence(tokenizer, pair.prompt, pair.chosen, system_prompt)
    r = encode_sequence(tokenizer, pair.prompt, pair.rejected, system_prompt)
    margin = float(pair.margin) if pair.margin is not None else 0.0
    fitted = fit_to_length(tokenizer, [c, r], max_length)
    if fitted is None:
        return None
    (chosen, rejected), cut = fitted
    return EncodedPair(chosen, rejected, margin, pair.group, pair.where, truncated=cut,
                       chosen_prompt=c.prompt_tokens - cut, rejected_prompt=r.prompt_tokens - cut, kind=pair.kind)


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


def print_encode_reports(name: str, max_length: int, reports: dict[str, EncodeReport]) -> None:
    """One line per split that had prompts cut or pairs skipped (nothing is dropped silently)."""
    for split, enc in reports.items():
        if enc.skipped_too_long or enc.prompt_truncated:
            first = f" (first: {enc.first_skipped})" if enc.first_skipped else ""
            print(f"[alignpipe] {name}: {split}: {enc.prompt_truncated} of {enc.pairs} pairs had their prompt cut "
                  f"from the left, {enc.skipped_too_long} skipped because the responses do not fit in "
                  f"{name}.max_length={max_length}{first}", flush=True)


@dataclass
class EncodedSplit:
    """A preference stage's pairs in the reward layout (``encoded_preferences``): train and held-out rows, their
    encode reports, the data report per split and the source the pairs came from."""

    train: list[EncodedPair]
    eval: list[EncodedPair]
    train_report: EncodeReport
    eval_report: EncodeReport
    info: dict[str, Any]
    source: DataSource

    def counts(self, per_split: bool = False) -> dict[str, int]:
        """Pairs whose prompt was cut and pairs skipped as too long (train + eval; ``per_split``: each split's
        too), and the bad records skipped under ``max_bad_fraction``: the manifest's metrics."""
        t, e = self.train_report, self.eval_report
        out = {"prompt_truncated": t.prompt_truncated + e.prompt_truncated,
               "skipped_too_long": t.skipped_too_long + e.skipped_too_long}
        if per_split:
            out.update(train_prompt_truncated=t.prompt_truncated, train_skipped_too_long=t.skipped_too_long,
                       eval_prompt_truncated=e.prompt_truncated, eval_skipped_too_long=e.skipped_too_long)
        out["skipped_records"] = sum(d.get("skipped", 0) for d in self.info.values())
        return out


def encoded_preferences(cfg: Any, run: Any, stage: str, tokenizer: Any, is_main: bool) -> EncodedSplit:
    """The ``rm`` / ``dpo`` stage's pairs (``preference_source``: its data or rlaif_label's), held out by prompt
    (``load_preference_split``) and encoded within ``<stage>.max_length``; the cut and skipped pairs are
    printed, and a run with no training pair left is an error saying to raise max_length."""
    section = getattr(cfg, stage)
    source = preference_source(cfg, run, stage, is_main)
    train_pairs, eval_pairs, info = load_preference_split(section, cfg.seed, source, stage)
    system = cfg.chat.system_prompt
    train, train_report = encode_pairs(tokenizer, train_pairs, section.max_length, system)
    held, eval_report = encode_pairs(tokenizer, eval_pairs, section.max_length, system)
    if is_main:
        print_encode_reports(stage, section.max_length, {"train": train_report, "eval": eval_report})
    if not train:
        raise DataError(f"{source.path}: no training pairs fit in {stage}.max_length={section.max_length} "
                        f"({train_report.skipped_too_long} skipped as too long); raise max_length")
    return EncodedSplit(train, held, train_report, eval_report, info, source)


def pair_count(batch: dict[str, torch.Tensor]) -> int:
    """Pairs in a preference batch (``pair_collate``'s or DPO's: the chosen rows, then as many rejected
    rows): the units the RM and DPO losses are means over."""
    return int(batch["input_ids"].shape[0]) // 2


def pair_collate(pad_id: int) -> Callable[[list[EncodedPair]], dict[str, torch.Tensor]]:
    """-> input_ids/attention_mask (2B, T): the B chosen rows, then the B rejected rows; margin (B,)."""

    def collate(rows: list[EncodedPair]) -> dict[str, torch.Tensor]:
        seqs = [r.chosen for r in rows] + [r.rejected for r in rows]
        batch = right_pad_batch(seqs, pad_id)
        batch["margin"] = torch.tensor([r.margin for r in rows], dtype=torch.float32)
        return batch

    return collate
