"""Issue 14, item 7 (memory): a landing file is read without holding it whole as bytes and text.

The reader used to read the whole file as bytes, decode it to one string and parse that string
through an in-memory text buffer (about 8x a CSV's size before any validation). Now the UTF-8 check
streams the file in chunks (same error message and offset), CSV is parsed from the file and JSONL a
line at a time, with the same frames as before.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest

from data_checks import readers
from data_checks.readers import TEXT_COLUMNS, BatchReadError, read_batch

HEADER = "event_id,user_id,item_id,event_type,label,timestamp,query\n"


@pytest.fixture
def no_whole_file_reads(monkeypatch):
    def refuse(self, *a, **k):
        raise AssertionError(f"{self.name} was read whole into memory")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    monkeypatch.setattr(Path, "read_text", refuse)


def test_csv_and_jsonl_are_parsed_without_reading_the_file_whole(tmp_path, no_whole_file_reads):
    rows = "".join(f"e{k},00{k},caf\u00e9-{k % 7},click,1,2026-01-0{1 + k % 9}T00:00:00Z,{'jazz' if k % 3 else ''}\n"
                   for k in range(500))
    csv = tmp_path / "b.csv"
    csv.write_bytes((HEADER + rows).encode())
    text = HEADER + rows
    header = pd.read_csv(io.StringIO(text), nrows=0).columns
    want = pd.read_csv(io.StringIO(text), dtype={c: "string" for c in TEXT_COLUMNS if c in header})
    pd.testing.assert_frame_equal(read_batch(csv), want)  # ids like "007" stay text

    records = [{"event_id": f"e{k}", "user_id": "u1", "label": k % 2, **({"query": None} if k % 4 else {})}
               for k in range(300)] + [{"event_id": 5, "extra": [1, 2]}]
    jl = tmp_path / "b.jsonl"
    jl.write_bytes(("\n".join(json.dumps(r) for r in records) + "\n\n").encode())
    want = pd.DataFrame.from_records(records)
    got = read_batch(jl)
    pd.testing.assert_frame_equal(got, want)  # event_id holds a number: stays object for the type check


def test_utf8_check_streams_in_chunks_and_reports_the_same_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "_CHUNK", 7)  # multibyte characters straddle many chunk boundaries
    good = (HEADER + "e1,u1,caf\u00e9\u00e9\u00e9,click,1,2026-01-01T00:00:00Z,\u00fc\u00df\n").encode()
    path = tmp_path / "ok.csv"
    path.write_bytes(good)
    assert read_batch(path)["item_id"].tolist() == ["caf\u00e9\u00e9\u00e9"]

    bad = good[:61] + b"\xe9" + good[62:]  # a latin-1 byte in the middle of the file
    path = tmp_path / "latin.csv"
    path.write_bytes(bad)
    try:
        bad.decode("utf-8")
    except UnicodeDecodeError as exc:
        want = f"not UTF-8: byte {bad[exc.start:exc.start + 1]!r} at offset {exc.start} ({exc.reason})"
    with pytest.raises(BatchReadError) as err:
        read_batch(path)
    assert err.value.reason.startswith(want)

    path = tmp_path / "cut.csv"
    path.write_bytes(good[:-4])  # ends inside a two-byte character
    with pytest.raises(BatchReadError, match="unexpected end of data"):
        read_batch(path)
    path = tmp_path / "blank.jsonl"
    path.write_bytes(b"  \n" * 10)
    with pytest.raises(BatchReadError, match="only whitespace"):
        read_batch(path)
