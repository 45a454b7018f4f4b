"""The data contract (DESIGN §2): one loader for every stage.

Sources: local JSONL / JSON / CSV / Parquet (plain or .gz) or ``hub:org/name`` (users online).
Every record keeps its location (``file:line``) so that a bad record is reported as
``path:line: what is wrong``. A stage stops on the first bad record unless its ``max_bad_fraction``
allows skipping, and then it reports how many it skipped.

Normalised shapes (a conversation is a list of ``{"role", "content"}`` dicts):
- SFT:  ``SFTExample(messages)``; the last message is the assistant's.
- RM:   ``PreferencePair(prompt, chosen, rejected, margin, group, kind)``; chosen/rejected are the assistant
        turns only; ``group`` ties the pairs expanded from one K-wise ranking; ``kind`` is the optional
        ``kind`` column (a label of what the pair contrasts, e.g. "format"), carried for per-kind metrics.
- KTO:  ``LabelledExample(prompt, completion, desirable, pair)``: an unpaired row (``prompt`` or ``messages``,
        ``completion`` or ``response``, ``label`` true|false, TRL's unpaired preference format), or each pair
        of a preference record unpaired into its chosen (desirable) and rejected (undesirable) rows.
- PPO:  ``PromptExample(prompt)``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import string
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A record or file does not fit the data contract; the message starts with ``file:line:``."""


@dataclass
class Record:
    where: str  # "path:line" (1-based line for JSONL/CSV, record index for JSON/Parquet/hub)
    data: dict[str, Any]


@dataclass
class SFTExample:
    messages: list[dict[str, str]]
    where: str = ""


@dataclass
class PreferencePair:
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    margin: float | None = None
    group: int = 0
    where: str = ""
    kind: str | None = None  # the optional ``kind`` column: what the pair contrasts (held-out accuracy per kind)


@dataclass
class LabelledExample:
    prompt: list[dict[str, str]]
    completion: list[dict[str, str]]
    desirable: bool
    pair: int | None = None  # the preference record it was unpaired from (held-out accuracy on pairs); None: unpaired
    where: str = ""
    kind: str | None = None


@dataclass
class PromptExample:
    prompt: list[dict[str, str]]
    where: str = ""
    reference: Any = None  # e.g. a gsm8k answer for a rule-based reward


@dataclass
class LoadReport:
    source: str
    records: int = 0
    kept: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "records": self.records, "kept": self.kept, "skipped": self.skipped,
                "first_skipped": self.skipped_examples[:5]}


# ------------------------------------------------------------------------------------------- reading
# Files as real tools write them: a UTF-8 byte-order mark (Windows tools, Excel's "CSV UTF-8") is skipped,
# CRLF line ends are accepted, bytes that are not UTF-8 and damaged .gz / Parquet files are one DataError
# naming the file (and the line or the last good record) instead of a UnicodeDecodeError or EOFError.
_BOM = b"\xef\xbb\xbf"
_DAMAGED = (EOFError, OSError, zlib.error)  # gzip: cut short (EOFError), corrupt (BadGzipFile, zlib.error, CRC)


def _not_utf8(shown: str, lineno: int, raw: bytes, exc: UnicodeDecodeError) -> DataError:
    column = len(raw[:exc.start].decode("utf-8", errors="replace")) + 1
    return DataError(f"{shown}:{lineno}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); "
                     "save the file as UTF-8")


def _damaged_gzip(shown: str, exc: BaseException, good_lines: int | None) -> DataError:
    if isinstance(exc, EOFError):
        what = "cut short (it ends before the end of the compressed stream)"
    else:
        what = f"corrupt ({exc})"
    if good_lines is None:
        where = ""
    elif good_lines:
        where = f"; the last good record is line {good_lines}"
    else:
        where = "; no record could be read"
    return DataError(f"{shown}: damaged gzip file: {what}{where}. Re-download or re-compress it")


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # type: ignore[return-value]


def _text_lines(path: Path, shown: str) -> Iterator[tuple[int, str]]:
    """``(line number, decoded line with its line end)``; a BOM on the first line is dropped."""
    lineno = 0
    with _open_binary(path) as fh:
        try:
            for raw in fh:
                lineno += 1
                if lineno == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _not_utf8(shown, lineno, raw, exc) from None
                yield lineno, line
        except _DAMAGED as exc:
            raise _damaged_gzip(shown, exc, lineno) from None


def _read_text(path: Path, shown: str) -> str:
    """The whole file decoded (BOM dropped); errors as in ``_text_lines``."""
    try:
        with _open_binary(path) as fh:
            data = fh.read()
    except _DAMAGED as exc:
        raise _damaged_gzip(shown, exc, None) from None
    data = data[len(_BOM):] if data.startswith(_BOM) else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = data.rfind(b"\n", 0, exc.start) + 1
        end = data.find(b"\n", exc.start)
        raw = data[start:end if end >= 0 else len(data)]
        local = UnicodeDecodeError(exc.encoding, raw, exc.start - start, exc.end - start, exc.reason)
        raise _not_utf8(shown, data.count(b"\n", 0, exc.start) + 1, raw, local) from None


def _parquet_rows(path: Path, shown: str) -> Iterator[dict[str, Any]]:
    """Rows of a (possibly gzipped) Parquet file, one row group at a time, so a damaged group names the
    last good row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    errors = (pa.ArrowException, OSError, EOFError, zlib.error)
    try:
        source: Any = path
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                source = io.BytesIO(fh.read())
        parquet = pq.ParquetFile(source)
    except errors as exc:
        if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
            raise _damaged_gzip(shown, exc, None) from None
        raise DataError(f"{shown}: damaged Parquet file, no record could be read ({exc}). "
                        "Re-download or re-write it") from None
    rows = 0
    for group in range(parquet.num_row_groups):
        try:
            batch = parquet.read_row_group(group).to_pylist()
        except errors as exc:
            last = f"the last good record is row {rows - 1}" if rows else "no record could be read"
            raise DataError(f"{shown}: damaged Parquet file: row group {group} cannot be read ({exc}); {last}. "
                            "Re-download or re-write it") from None
        yield from batch
        rows += len(batch)


def _base_suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1] if suffixes else ""


def iter_records(path_or_hub: str, split: str = "train", display: str | None = None) -> Iterator[Record]:
    """Yield records with their location. Invalid JSON lines raise DataError('file:line: ...')."""
    if path_or_hub.startswith("hub:"):
        from datasets import load_dataset  # users online; tests use local files

        name = path_or_hub[4:]
        for i, row in enumerate(load_dataset(name, split=split)):
            yield Record(f"{path_or_hub}[{split}]#{i}", dict(row))
        return
    from pipeline.config import resolve_path

    path = resolve_path(path_or_hub)
    shown = display or path_or_hub
    if not path.exists():
        raise DataError(f"{shown}: file not found")
    kind = _base_suffix(path)
    if kind == ".jsonl":
        for lineno, line in _text_lines(path, shown):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Record(f"{shown}:{lineno}", {"__error__": f"invalid JSON ({exc.msg} at column {exc.colno})"})
                continue
            if not isinstance(obj, dict):
                error = f"expected a JSON object, got {type(obj).__name__}"
                yield Record(f"{shown}:{lineno}", {"__error__": error})
                continue
            yield Record(f"{shown}:{lineno}", obj)
    elif kind == ".json":
        try:
            obj = json.loads(_read_text(path, shown))
        except json.JSONDecodeError as exc:
            raise DataError(f"{shown}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        rows = obj.get("data", obj) if isinstance(obj, dict) else obj
        if not isinstance(rows, list):
            raise DataError(f"{shown}: expected a JSON list of records (or {{'data': [...]}})")
        for i, row in enumerate(rows):
            yield Record(f"{shown}:record {i}", row if isinstance(row, dict) else {"__error__": "not an object"})
    elif kind == ".csv":
        reader = csv.DictReader(line for _, line in _text_lines(path, shown))
        for row in reader:
            yield Record(f"{shown}:{reader.line_num}", dict(row))
    elif kind == ".parquet":
        for i, row in enumerate(_parquet_rows(path, shown)):
            yield Record(f"{shown}:row {i}", row)
    else:
        raise DataError(f"{shown}: unsupported file type {kind!r}; use .jsonl, .json, .csv or .parquet "
                        "(optionally .gz)")


# ----------------------------------------------------------------------------------- column mapping
_FIELD = re.compile(r"\{([^{}]+)\}")


def _get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(obj, list):
            try:
                obj = obj[int(part)]
            except (ValueError, IndexError):
                raise KeyError(dotted) from None
        elif isinstance(obj, dict):
            if part not in obj:
                raise KeyError(dotted)
            obj = obj[part]
        else:
            raise KeyError(dotted)
    return obj


def map_columns(data: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Apply a ``columns`` mapping (column path or ``{path}`` format string) to one record."""
    if not columns:
        return data
    out = dict(data)
    for ours, theirs in columns.items():
        if "{" in theirs:
            names = [f[1] for f in string.Formatter().parse(theirs) if f[1]]
            values = {n: _get_path(data, n) for n in names}
            text = theirs
            for n, v in values.items():
                text = text.replace("{" + n + "}", "" if v is None else str(v))
            out[ours] = text.strip()
        else:
            out[ours] = _get_path(data, theirs)
    return out


# ------------------------------------------------------------------------------------ normalisation
def _as_messages(value: Any, what: str, default_role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list):
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"{what}[{i}] must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise ValueError(f"{what}[{i}].role is {m['role']!r}; expected one of {', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise ValueError(f"{what}[{i}].content must be a string")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    raise ValueError(f"'{what}' must be a string or a list of messages, got {type(value).__name__}")


def last_user(messages: list[dict[str, Any]]) -> str:
    """The text of a conversation's last user turn ('' when there is none): the prompt that reward
    functions, verifiers and judges are shown."""
    return next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")


def check_conversation(messages: list[dict[str, str]], need_final_assistant: bool = True) -> None:
    """Roles: optional system first, then user/assistant alternating, starting with user."""
    if not messages:
        raise ValueError("empty conversation")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body:
        raise ValueError("conversation has only a system message")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            offset = len(messages) - len(body)
            raise ValueError(f"wrong role order: message {i + offset} is '{m['role']}', expected '{expected}'")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"empty assistant turn (message {i + len(messages) - len(body)})")
    if need_final_assistant and body[-1]["role"] != "assistant":
        raise ValueError("the conversation must end with an assistant turn")
    if not need_final_assistant and body[-1]["role"] != "user":
        raise ValueError("a prompt must end with a user turn")


def _missing(data: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [k for k in keys if k not in data or data[k] is None]


def _record_keys(data: dict[str, Any]) -> str:
    return ", ".join(sorted(k for k in data if not k.startswith("__"))) or "none"


def to_sft(data: dict[str, Any]) -> SFTExample:
    if "messages" in data and data["messages"] is not None:
        messages = _as_messages(data["messages"], "messages", "user")
    elif not _missing(data, ("prompt", "completion")):
        prompt = _as_messages(data["prompt"], "prompt", "user")
        completion = _as_messages(data["completion"], "completion", "assistant")
        if not isinstance(data["prompt"], list) and not str(data["prompt"]).strip():
            raise ValueError("empty prompt")
        messages = prompt + completion
    else:
        raise ValueError(
            f"missing column: need 'messages' or 'prompt' + 'completion' (record has: {_record_keys(data)}); "
            "map other layouts with the data source's 'columns'"
        )
    check_conversation(messages)
    return SFTExample(messages)


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    """Anthropic-HH ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` -> messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an HH transcript (expected it to start with '\\n\\nHuman: ')")
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return messages


def _split_hh(chosen: str, rejected: str) -> tuple[list, list, list]:
    c, r = parse_hh_transcript(chosen), parse_hh_transcript(rejected)
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise ValueError("HH transcript must end with an Assistant turn")
    if c[:-1] != r[:-1]:
        raise ValueError("chosen and rejected transcripts do not share the same prompt before the last Assistant turn")
    return c[:-1], [c[-1]], [r[-1]]


def _kind(data: dict[str, Any]) -> str | None:
    """The optional ``kind`` column; empty (a CSV cell left blank) is the same as absent."""
    kind = data.get("kind")
    if kind is not None and not isinstance(kind, str):
        raise ValueError(f"'kind' must be a string (a label of what the pair contrasts), got {kind!r}")
    return (kind or "").strip() or None


def to_preferences(data: dict[str, Any], group: int) -> list[PreferencePair]:
    """One record -> one pair (or all K(K-1)/2 pairs of a K-wise ranking, sharing ``group``)."""
    margin = data.get("margin")
    if margin is not None:
        try:
            margin = float(margin)
        except (TypeError, ValueError):
            raise ValueError(f"'margin' must be a number, got {margin!r}") from None
    kind = _kind(data)
    if "responses" in data or "ranking" in data:
        return _ranking_pairs(data, group, margin, kind)
    return [_chosen_rejected_pair(data, group, margin, kind)]


def _ranking_pairs(data: dict[str, Any], group: int, margin: float | None, kind: str | None) -> list[PreferencePair]:
    """A K-wise ranking record -> all K(K-1)/2 pairs, sharing ``group``."""
    missing = _missing(data, ("prompt", "responses", "ranking"))
    if missing:
        raise ValueError(f"missing column(s) {', '.join(missing)} for a K-wise ranking record")
    prompt = _as_messages(data["prompt"], "prompt", "user")
    responses, ranking = data["responses"], data["ranking"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise ValueError("'responses' must be a list of at least 2 responses")
    if sorted(ranking) != list(range(len(responses))):
        raise ValueError(
            f"'ranking' must be a permutation of 0..{len(responses) - 1} (best first), got {ranking!r}"
        )
    resp = [_as_messages(x, f"responses[{i}]", "assistant") for i, x in enumerate(responses)]
    for i, x in enumerate(resp):
        if not "".join(m["content"] for m in x).strip():
            raise ValueError(f"empty response responses[{i}]")
    pairs = []
    for a in range(len(ranking)):
        for b in range(a + 1, len(ranking)):
            better, worse = resp[ranking[a]], resp[ranking[b]]
            if better == worse:
                raise ValueError(f"responses {ranking[a]} and {ranking[b]} are identical")
            pairs.append(PreferencePair(prompt, better, worse, margin, group, kind=kind))
    check_conversation(prompt, need_final_assistant=False)
    return pairs


def _chosen_rejected_pair(data: dict[str, Any], group: int, margin: float | None,
                          kind: str | None) -> PreferencePair:
    """A chosen/rejected record (prompt column, full conversations, or hh-rlhf text) -> one pair."""
    missing = _missing(data, ("chosen", "rejected"))
    if missing and data.get("label") is not None:
        raise ValueError("an unpaired record (prompt, completion, label): only dpo.loss=kto trains on rows labelled "
                         "desirable or not; the other objectives need 'chosen' and 'rejected'")
    if missing:
        raise ValueError(
            f"missing column(s) {', '.join(repr(m) for m in missing)}: a preference record needs 'chosen' and "
            f"'rejected' (+ 'prompt'), or 'prompt' + 'responses' + 'ranking' (record has: {_record_keys(data)})"
        )
    chosen_raw, rejected_raw = data["chosen"], data["rejected"]
    for name, value in (("chosen", chosen_raw), ("rejected", rejected_raw)):
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"'{name}' is an empty string")
    if chosen_raw == rejected_raw:
        raise ValueError("'chosen' and 'rejected' are identical")
    if data.get("prompt") in (None, "") and isinstance(chosen_raw, str) and chosen_raw.startswith("\n\nHuman:"):
        prompt, chosen, rejected = _split_hh(chosen_raw, rejected_raw)
    elif data.get("prompt") in (None, "") and isinstance(chosen_raw, list):
        # full conversations: the prompt is everything before the last assistant turn
        c = _as_messages(chosen_raw, "chosen", "assistant")
        r = _as_messages(rejected_raw, "rejected", "assistant")
        if c[:-1] != r[:-1]:
            raise ValueError("chosen and rejected conversations differ before their last turn")
        prompt, chosen, rejected = c[:-1], c[-1:], r[-1:]
    else:
        if "prompt" not in data or data["prompt"] is None:
            raise ValueError("missing column 'prompt'")
        prompt = _as_messages(data["prompt"], "prompt", "user")
        chosen = _as_messages(chosen_raw, "chosen", "assistant")
        rejected = _as_messages(rejected_raw, "rejected", "assistant")
    if not prompt or not "".join(m["content"] for m in prompt).strip():
        raise ValueError("empty prompt")
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if not "".join(m["content"] for m in conv).strip():
            raise ValueError(f"'{name}' response is empty")
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' responses are identical")
    check_conversation(prompt + chosen)
    check_conversation(prompt + rejected)
    return PreferencePair(prompt, chosen, rejected, margin, group, kind=kind)


def _label(value: Any) -> bool:
    """``label``: true / false (JSON, Parquet), "true" / "false" (CSV), 1 / 0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"'label' must be true (desirable) or false (undesirable), got {value!r}")


def _labelled_row(data: dict[str, Any], kind: str | None) -> LabelledExample:
    """An unpaired record: ``prompt`` + ``completion`` (or ``response``), or a ``messages`` conversation whose last
    (assistant) turn is the completion; and its ``label``."""
    completion_key = "completion" if data.get("completion") is not None else "response"
    if data.get("prompt") is not None and data.get(completion_key) is not None:
        prompt = _as_messages(data["prompt"], "prompt", "user")
        completion = _as_messages(data[completion_key], completion_key, "assistant")
    elif data.get("messages") is not None:
        messages = _as_messages(data["messages"], "messages", "user")
        prompt, completion = messages[:-1], messages[-1:]
    else:
        raise ValueError(f"missing column(s): an unpaired record needs 'prompt' + 'completion' (or 'response'), or "
                         f"'messages', beside 'label' (record has: {_record_keys(data)})")
    if not "".join(m["content"] for m in prompt).strip():
        raise ValueError("empty prompt")
    check_conversation(prompt + completion)
    return LabelledExample(prompt, completion, _label(data["label"]), kind=kind)


def to_labelled(data: dict[str, Any], index: int) -> list[LabelledExample]:
    """One record -> KTO's rows: an unpaired record (with ``label``) as it is; a preference pair (chosen/rejected,
    a full conversation or HH text) unpaired into its desirable and undesirable rows, as TRL's KTOTrainer does.
    A K-wise ranking is refused: its middle responses would be desirable in one pair and undesirable in another."""
    if data.get("label") is not None and data.get("chosen") is None:
        return [_labelled_row(data, _kind(data))]
    if "responses" in data or "ranking" in data:
        raise ValueError("a K-wise ranking cannot be unpaired for dpo.loss=kto (a middle response is both better "
                         "and worse); give chosen/rejected pairs or rows with a 'label'")
    (pair,) = to_preferences(data, index)
    return [LabelledExample(pair.prompt, pair.chosen, True, index, kind=pair.kind),
            LabelledExample(pair.prompt, pair.rejected, False, index, kind=pair.kind)]


def to_prompt(data: dict[str, Any]) -> PromptExample:
    if "prompt" in data and data["prompt"] is not None:
        prompt = _as_messages(data["prompt"], "prompt", "user")
    elif "messages" in data and data["messages"] is not None:
        prompt = _as_messages(data["messages"], "messages", "user")
        if prompt and prompt[-1]["role"] == "assistant":
            prompt = prompt[:-1]
    else:
        raise ValueError(f"missing column 'prompt' (record has: {_record_keys(data)})")
    if not "".join(m["content"] for m in prompt).strip():
        raise ValueError("empty prompt")
    check_conversation(prompt, need_final_assistant=False)
    return PromptExample(prompt, reference=data.get("reference", data.get("answer")))


SCORING_ROWS = ("expected one of {\"messages\": [...]} (a whole conversation ending with the assistant's answer), "
                "{\"prompt\", \"response\"} or {\"prompt\", \"chosen\", \"rejected\"}")


@dataclass
class ScoringRow:
    """A row of ``python -m pipeline score``: the prompt and one response (``score``) or a preference pair
    (``chosen_score``, ``rejected_score``); ``as_given``: a ``messages`` conversation, rendered as it is
    (no system prompt added)."""

    prompt: list[dict[str, str]]
    responses: list[list[dict[str, str]]]  # one per output key
    keys: tuple[str, ...]
    as_given: bool = False


def to_scoring_row(data: dict[str, Any]) -> ScoringRow:
    """One record of a file to score -> ScoringRow; ValueError naming what is wrong (see ``SCORING_ROWS``)."""
    if "responses" in data or "ranking" in data:
        raise ValueError("a K-wise ranking ('responses' + 'ranking') is not scored as one row; give one row per "
                         "response ('prompt' + 'response')")
    if "chosen" in data or "rejected" in data:
        pair = to_preferences(data, 0)[0]
        return ScoringRow(pair.prompt, [pair.chosen, pair.rejected], ("chosen_score", "rejected_score"))
    if data.get("messages") is not None:
        messages = to_sft({"messages": data["messages"]}).messages
        return ScoringRow(messages[:-1], [messages[-1:]], ("score",), as_given=True)
    if not _missing(data, ("prompt", "response")):
        prompt = _as_messages(data["prompt"], "prompt", "user")
        messages = to_sft({"prompt": data["prompt"], "completion": data["response"]}).messages
        return ScoringRow(prompt, [messages[len(prompt):]], ("score",))
    raise ValueError(f"missing column(s): no 'messages', 'prompt' + 'response' or 'chosen' + 'rejected' "
                     f"(record has: {_record_keys(data)})")


# --------------------------------------------------------------------------------------------- loading
def load_examples(source: Any, kind: str) -> tuple[list[Any], LoadReport]:
    """Load a ``DataSource`` as ``kind`` in {"sft", "preference", "labelled", "prompt"}.

    Raises DataError('file:line: ...') on the first bad record when skipping is not allowed, or when
    more than ``max_bad_fraction`` of the records are bad.
    """
    convert: Callable[[dict[str, Any], int], list[Any]] = {
        "sft": lambda d, i: [to_sft(d)],
        "preference": to_preferences,
        "labelled": to_labelled,
        "prompt": lambda d, i: [to_prompt(d)],
    }[kind]
    report = LoadReport(source.path)
    examples: list[Any] = []
    for index, record in enumerate(iter_records(source.path, source.split)):
        if source.max_records is not None and report.records >= source.max_records:
            break
        report.records += 1
        try:
            if "__error__" in record.data:
                raise ValueError(record.data["__error__"])
            data = map_columns(record.data, source.columns)
            items = convert(data, index)
        except KeyError as exc:
            problem = f"missing column {exc.args[0]!r} named in the data source's columns mapping"
            items = None
        except ValueError as exc:
            problem = str(exc)
            items = None
        if items is None:
            message = f"{record.where}: {problem}"
            if source.max_bad_fraction <= 0:
                raise DataError(message + " (set max_bad_fraction on the data source to skip bad records)")
            report.skipped += 1
            report.skipped_examples.append(message)
            continue
        for item in items:
            item.where = record.where
        examples.extend(items)
        report.kept += 1
    if report.records == 0:
        raise DataError(f"{source.path}: no records")
    if report.skipped / report.records > source.max_bad_fraction:
        raise DataError(
            f"{source.path}: {report.skipped} of {report.records} records are bad "
            f"({report.skipped / report.records:.1%} > max_bad_fraction {source.max_bad_fraction:.1%}); "
            f"first: {report.skipped_examples[0]}"
        )
    return examples, report
