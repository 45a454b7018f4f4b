"""Bad inputs as they come from real tools, each one clear error (issue 12): data files (encodings, line
ends, damaged .gz / Parquet), model paths at validate / run, interrupted vs failed stages."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from data.formats import DataError, load_examples
from pipeline.config import DataSource

ROWS = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS)
CSV = "prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(3))
BOM = b"\xef\xbb\xbf"


def _load(path: Path, kind: str = "sft"):
    return load_examples(DataSource(path=str(path)), kind)


def _answers(path: Path) -> list[str]:
    examples, _ = _load(path)
    return [e.messages[-1]["content"] for e in examples]


# ------------------------------------------------------------------------- encodings and line ends
@pytest.mark.parametrize("name, text", [("d.jsonl", JSONL), ("d.json", json.dumps(ROWS, indent=1)), ("d.csv", CSV),
                                        ("d.jsonl.gz", JSONL), ("d.csv.gz", CSV)])
@pytest.mark.parametrize("bom", [False, True], ids=["plain", "bom"])
@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
def test_byte_order_mark_and_crlf_are_accepted(tmp_path, name, text, bom, crlf):
    data = (BOM if bom else b"") + (text.replace("\n", "\r\n") if crlf else text).encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    assert _answers(path) == ["a0", "a1", "a2"]
    examples, _ = _load(path)
    assert examples[0].messages[0] == {"role": "user", "content": "q0"}  # no BOM or \r in the first column


def test_csv_with_bom_crlf_and_a_quoted_multiline_field_keeps_line_numbers(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(BOM + b'prompt,completion\r\n"two\r\nlines",a0\r\nq1,\r\n')
    with pytest.raises(DataError) as err:
        _load(path)
    assert str(err.value).startswith(f"{path}:4: empty assistant turn")


@pytest.mark.parametrize("name, data, line, byte, column", [
    ("latin1.jsonl", JSONL.encode() + '{"prompt": "café", "completion": "x"}\n'.encode("latin-1"), 4, "e9", 16),
    ("latin1.csv", CSV.encode() + "q3,na\xefve\n".encode("latin-1"), 5, "ef", 6),
    ("latin1.json", json.dumps(ROWS, indent=1).encode()[:-1] + ',\n{"prompt": "\xe9"}]'.encode("latin-1"),
     15, "e9", 13),
    ("bom-then-latin1.jsonl", BOM + '{"prompt": "\xe9"}\n'.encode("latin-1"), 1, "e9", 13),
    ("latin1.jsonl.gz", gzip.compress(JSONL.encode() + b'{"prompt": "\xff"}\n'), 4, "ff", 13),
    ("after-utf8.jsonl", '{"prompt": "ü'.encode() + b"\x80" + b'"}\n', 1, "80", 14),
], ids=["jsonl", "csv", "json", "bom-jsonl", "jsonl.gz", "column-counts-characters"])
def test_bytes_that_are_not_utf8_name_the_line_byte_and_column(tmp_path, name, data, line, byte, column):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        _load(path)
    assert str(err.value) == f"{path}:{line}: not UTF-8 (byte 0x{byte} at column {column}); save the file as UTF-8"


# -------------------------------------------------------------------------------- damaged files
def test_gzip_cut_short_names_the_file_and_the_last_good_line(tmp_path):
    rows = [json.dumps({"prompt": f"question {i} " + "x" * (i % 50), "completion": f"a{i}"}) for i in range(3000)]
    whole = gzip.compress(("\n".join(rows) + "\n").encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError) as err:
        _load(path)
    found = re.fullmatch(rf"{re.escape(str(path))}: damaged gzip file: cut short \(it ends before the end of the "
                         r"compressed stream\); the last good record is line (\d+)\. Re-download or re-compress it",
                         str(err.value))
    assert found, str(err.value)
    assert 0 < int(found.group(1)) < 3000


def test_gzip_cut_short_inside_a_whole_file_json(tmp_path):
    whole = gzip.compress(json.dumps(ROWS * 200).encode())
    path = tmp_path / "cut.json.gz"
    path.write_bytes(whole[:-12])
    with pytest.raises(DataError) as err:
        _load(path)
    assert str(err.value) == (f"{path}: damaged gzip file: cut short (it ends before the end of the compressed "
                              "stream). Re-download or re-compress it")


def test_a_gz_file_that_is_not_gzip(tmp_path):
    path = tmp_path / "plain.jsonl.gz"
    path.write_text(JSONL)
    with pytest.raises(DataError) as err:
        _load(path)
    assert str(err.value).startswith(f"{path}: damaged gzip file: corrupt (Not a gzipped file (b'{{\"'))")
    assert str(err.value).endswith("; no record could be read. Re-download or re-compress it")


def test_gzip_with_a_corrupt_checksum(tmp_path):
    whole = bytearray(gzip.compress(JSONL.encode()))
    whole[-8] ^= 0xFF  # the CRC32 of the trailer
    path = tmp_path / "crc.jsonl.gz"
    path.write_bytes(bytes(whole))
    with pytest.raises(DataError) as err:
        _load(path)
    assert re.fullmatch(rf"{re.escape(str(path))}: damaged gzip file: corrupt \(CRC check failed 0x[0-9a-f]+ != "
                        r"0x[0-9a-f]+\); the last good record is line 3\. Re-download or re-compress it",
                        str(err.value))


def test_parquet_that_is_cut_short(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "cut.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError) as err:
        _load(path)
    assert str(err.value).startswith(f"{path}: damaged Parquet file, no record could be read (")
    assert str(err.value).endswith("). Re-download or re-write it")


def test_parquet_with_a_damaged_row_group_names_the_last_good_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{i}", "completion": f"a{i}" * 40} for i in range(40)]
    path = tmp_path / "groups.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10, compression="snappy")
    meta = pq.ParquetFile(path).metadata
    start = meta.row_group(2).column(1).data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 64] = b"\xff" * 64  # the third row group's 'completion' page
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        _load(path)
    assert str(err.value).startswith(f"{path}: damaged Parquet file: row group 2 cannot be read (")
    assert str(err.value).endswith("); the last good record is row 19. Re-download or re-write it")


def test_gzipped_parquet_is_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    (tmp_path / "d.parquet.gz").write_bytes(gzip.compress((tmp_path / "d.parquet").read_bytes()))
    assert _answers(tmp_path / "d.parquet.gz") == ["a0", "a1", "a2"]
