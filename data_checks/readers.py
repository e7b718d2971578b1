"""Read a landing file (CSV, JSONL or Parquet) into a DataFrame, or fail with a reason.

Anything that keeps a file from being read (zero bytes, no rows, bad encoding,
truncated Parquet, malformed JSON, unknown format) raises :class:`BatchReadError`
with a sentence a person can act on; the ingest turns it into a quarantine.

Memory: a file is never held whole as bytes, text and a text buffer at once. Text files are checked
for UTF-8 in 1 MiB chunks, CSV is parsed straight from the file by pandas' C reader (which reads it in
chunks), JSONL is parsed a line at a time into columns (not a dict per row; equal strings share one
object), and a Parquet table is released column by column while it becomes a frame. Text columns stay
pandas ``"string"`` (Python strings: the GX type check accepts ``object`` and ``string[python]`` only).
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import numpy as np
import pandas as pd

SUPPORTED = (".parquet", ".csv", ".jsonl")
# Columns read as text from CSV (CSV has no types; ids like "00123" must stay strings).
TEXT_COLUMNS = ("event_id", "user_id", "item_id", "event_type", "timestamp", "query", "model_version")
TEXT_DTYPE = "string"
_CHUNK = 1 << 20


class BatchReadError(Exception):
    """A landing file that cannot be read; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _check_text(path: Path) -> None:
    """UTF-8 all through and not only whitespace, read in chunks (the text is never held whole)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    fed = 0
    blank = True
    with path.open("rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            final = not chunk
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(chunk, final=final)
            except UnicodeDecodeError as exc:
                offset = fed - pending + exc.start
                raise BatchReadError(f"not UTF-8: byte {exc.object[exc.start:exc.start + 1]!r} at offset {offset} "
                                     f"({exc.reason}); re-export {path.name} as UTF-8") from None
            if blank and text.strip():
                blank = False
            fed += len(chunk)
            if final:
                break
    if blank:
        raise BatchReadError("empty file (only whitespace)")


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
        _check_text(path)
        df = _read_csv(path) if suffix == ".csv" else _read_jsonl(path)
    if len(df) == 0:
        raise BatchReadError("empty batch: the file has a header/schema but no rows")
    return df


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        # the Arrow buffers are freed column by column as the frame is built: no table + frame peak
        return table.to_pandas(split_blocks=True, self_destruct=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise BatchReadError(f"unreadable Parquet (truncated or corrupt): {exc}") from None


def _read_csv(path: Path) -> pd.DataFrame:
    """Parsed from the file (pandas' C reader buffers it in chunks), text columns as ``TEXT_DTYPE``."""
    try:
        header = pd.read_csv(path, nrows=0, encoding="utf-8").columns
        dtypes = {c: TEXT_DTYPE for c in TEXT_COLUMNS if c in header}
        df = pd.read_csv(path, dtype=dtypes, encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise BatchReadError(f"malformed CSV: {exc}") from None
    return df


def _lines(path: Path):
    """The file's lines as ``str.splitlines`` of the whole text would give them, read a line at a time."""
    with path.open("r", encoding="utf-8", newline="") as fh:
        for physical in fh:
            yield from physical.splitlines()


def _read_jsonl(path: Path) -> pd.DataFrame:
    """One object per line, gathered into columns (a missing key is NaN, as ``DataFrame.from_records``)."""
    cols: dict[str, list] = {}
    seen: dict[str, dict] = {}
    n = 0
    for lineno, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BatchReadError(f"malformed JSONL at line {lineno}: {exc.msg}") from None
        if not isinstance(row, dict):
            raise BatchReadError(f"malformed JSONL at line {lineno}: expected an object, got {type(row).__name__}")
        for k, v in row.items():
            col = cols.get(k)
            if col is None:
                col = cols[k] = [np.nan] * n
                seen[k] = {}
            col.append(seen[k].setdefault(v, v) if isinstance(v, str) else v)  # equal strings: one object
        n += 1
        for col in cols.values():
            if len(col) < n:
                col.append(np.nan)
    df = pd.DataFrame(cols) if cols else pd.DataFrame(index=pd.RangeIndex(n))
    for c in TEXT_COLUMNS:  # JSON strings stay strings; numbers where strings belong stay numbers (type check)
        if c in df.columns and df[c].map(lambda x: x is None or isinstance(x, str)).all():
            df[c] = df[c].astype(TEXT_DTYPE)
    return df
