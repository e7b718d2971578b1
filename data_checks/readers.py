"""Read a landing file (CSV, JSONL or Parquet) into a DataFrame, or fail with a reason.

Anything that keeps a file from being read (zero bytes, no rows, bad encoding,
truncated Parquet, malformed JSON, unknown format) raises :class:`BatchReadError`
with a sentence a person can act on; the ingest turns it into a quarantine.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd

SUPPORTED = (".parquet", ".csv", ".jsonl")
# Columns read as text from CSV (CSV has no types; ids like "00123" must stay strings).
TEXT_COLUMNS = ("event_id", "user_id", "item_id", "event_type", "timestamp", "query", "model_version")


class BatchReadError(Exception):
    """A landing file that cannot be read; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BatchReadError(f"not UTF-8: byte {data[exc.start:exc.start + 1]!r} at offset {exc.start} "
                             f"({exc.reason}); re-export {path.name} as UTF-8") from None


def read_batch(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise BatchReadError(f"unsupported file type {suffix or '(none)'!r}; expected one of {', '.join(SUPPORTED)}")
    if path.stat().st_size == 0:
        raise BatchReadError("zero-byte file (nothing was delivered)")
    if suffix == ".parquet":
        df = _read_parquet(path)
    else:
        text = _decode(path.read_bytes(), path)
        if not text.strip():
            raise BatchReadError("empty file (only whitespace)")
        df = _read_csv(text) if suffix == ".csv" else _read_jsonl(text)
    if len(df) == 0:
        raise BatchReadError("empty batch: the file has a header/schema but no rows")
    return df


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise BatchReadError(f"unreadable Parquet (truncated or corrupt): {exc}") from None


def _read_csv(text: str) -> pd.DataFrame:
    try:
        header = pd.read_csv(io.StringIO(text), nrows=0).columns
        dtypes = {c: "string" for c in TEXT_COLUMNS if c in header}
        return pd.read_csv(io.StringIO(text), dtype=dtypes)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise BatchReadError(f"malformed CSV: {exc}") from None


def _read_jsonl(text: str) -> pd.DataFrame:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BatchReadError(f"malformed JSONL at line {lineno}: {exc.msg}") from None
        if not isinstance(row, dict):
            raise BatchReadError(f"malformed JSONL at line {lineno}: expected an object, got {type(row).__name__}")
        rows.append(row)
    df = pd.DataFrame.from_records(rows)
    for c in TEXT_COLUMNS:  # JSON strings stay strings; numbers where strings belong stay numbers (type check)
        if c in df.columns and df[c].map(lambda x: x is None or isinstance(x, str)).all():
            df[c] = df[c].astype("string")
    return df
