"""Append-only feedback store: Parquet partitioned by event date, idempotent on ``event_id``.

Layout under ``<workspace>/store``::

    events/date=YYYY-MM-DD/part-<content-hash>.parquet   feedback events
    catalog.parquet                                     catalog items (upserted)
    users.parquet                                       users (upserted)
    ledger.jsonl                                        one line per append: batch id, counts, parts
    .lock                                               inter-process lock for writers

Every write goes to a temp file in the same folder and is published with
``os.replace``; an exception (or a kill) mid-write leaves no partial file.

Reads push down what they can, so memory follows what is asked for, not the store's size:
day partitions outside the window are never opened, only the requested columns are read
(column pushdown), row groups whose ``timestamp`` statistics lie outside the window are skipped
(row-group pushdown; parts are written in row groups of ``PART_ROW_GROUP_ROWS`` rows, time-ordered),
and rows are filtered as Arrow columns before anything becomes a pandas object.
:meth:`FeedbackStore.scan` yields one Arrow table per part (streaming), :meth:`FeedbackStore.read_table`
concatenates them, :meth:`FeedbackStore.read` is the sorted pandas frame; :meth:`FeedbackStore.time_range`
answers from the Parquet statistics alone and :meth:`FeedbackStore.stored_among` checks ids part by part.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from filelock import FileLock

from recloop.schema import FEEDBACK_COLUMNS, normalize_catalog, normalize_feedback, normalize_users


@dataclass(frozen=True)
class AppendResult:
    batch_id: str | None
    n_new: int
    n_duplicate: int
    parts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Snapshot:
    """What a model was trained on: a content hash plus its window and batches."""

    hash: str
    start: str | None
    end: str | None
    n_events: int
    batch_ids: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Rows per Parquet row group in an event part: small enough that a window boundary inside a big
# part skips most of it (row-group pushdown), large enough that metadata and compression stay cheap.
PART_ROW_GROUP_ROWS = 131_072


def atomic_write_parquet(df: pd.DataFrame, path: Path, row_group_size: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        table = pa.Table.from_pandas(df, preserve_index=False)
        if row_group_size is None:
            pq.write_table(table, tmp)
        else:
            pq.write_table(table, tmp, row_group_size=row_group_size)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(obj, path: Path) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode())


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in ``folder`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory fds: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def move_file(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest``: ``os.replace`` on one filesystem, copy + fsync + rename across two.

    Across filesystems (``EXDEV``: a landing folder on its own mount) the bytes go to a hidden
    temp file beside ``dest``, are fsynced and renamed onto ``dest``; only then is ``src``
    removed. A crash leaves ``dest`` whole or absent and ``src`` in place until ``dest`` is
    durable, so repeating the move finishes it (it overwrites ``dest`` with the same bytes).
    """
    src, dest = Path(src), Path(dest)
    try:
        os.replace(src, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        shutil.copystat(src, tmp)
        os.replace(tmp, dest)  # same folder: atomic
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    os.unlink(src)
    fsync_dir(src.parent)


def _to_utc(ts) -> pd.Timestamp | None:
    if ts is None:
        return None
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def _part_day(part: Path) -> pd.Timestamp:
    return pd.Timestamp(part.parent.name.split("=", 1)[1], tz="UTC")


def _stat_ts(value) -> pd.Timestamp | None:
    if value is None:
        return None
    t = pd.Timestamp(value)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def _row_group_bounds(meta: pq.FileMetaData, rg: int, col: int) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    """(min, max) of the timestamp column in one row group, or None without usable statistics."""
    stats = meta.row_group(rg).column(col).statistics
    if stats is None or not stats.has_min_max:
        return None
    try:
        lo, hi = _stat_ts(stats.min), _stat_ts(stats.max)
    except (TypeError, ValueError):
        return None
    if lo is None or hi is None:
        return None
    return lo, hi


def _timestamp_index(meta: pq.FileMetaData) -> int | None:
    for j in range(meta.num_columns):
        if meta.schema.column(j).path == "timestamp":
            return j
    return None


_TS_NS = pa.timestamp("ns", tz="UTC")
_SMALL_BATCH_IDS = 65_536  # stored_among: up to this many ids, Arrow's is_in per part
# statistics may be rounded to microseconds: widen them by one before deciding to skip
_STAT_SLACK = pd.Timedelta(microseconds=1)


def _read_part(part: Path, start: pd.Timestamp | None, end: pd.Timestamp | None,
               columns: list[str] | None) -> pa.Table:
    pf = pq.ParquetFile(part)
    names = pf.schema_arrow.names
    want = names if columns is None else list(dict.fromkeys(columns))
    present = [c for c in want if c in names]
    day = _part_day(part)
    whole = (start is None or day >= start) and (end is None or day + pd.Timedelta(days=1) <= end)
    if whole:
        table = pf.read(columns=present)
    else:
        meta, j = pf.metadata, _timestamp_index(pf.metadata)
        groups = []
        for rg in range(meta.num_row_groups):
            b = None if j is None else _row_group_bounds(meta, rg, j)
            if b is not None:
                lo, hi = b
                if start is not None and hi + _STAT_SLACK <= start:
                    continue  # the whole row group is older than the window
                if end is not None and lo >= end:
                    continue  # ... or newer
            groups.append(rg)
        read_cols = present if "timestamp" in present else [*present, "timestamp"]
        table = pf.read_row_groups(groups, columns=read_cols) if groups else \
            pf.schema_arrow.empty_table().select(read_cols)
        ts = table.column("timestamp")
        if ts.type != _TS_NS:
            ts = pc.cast(ts, _TS_NS)
        keep = None
        if start is not None:
            keep = pc.greater_equal(ts, pa.scalar(start.value, type=_TS_NS))
        if end is not None:
            upper = pc.less(ts, pa.scalar(end.value, type=_TS_NS))
            keep = upper if keep is None else pc.and_(keep, upper)
        if keep is not None:
            table = table.filter(keep)
        table = table.select(present)
    for c in want:  # a column this part does not have: nulls, so every part has the same columns
        if c not in names:
            table = table.append_column(c, pa.nulls(table.num_rows))
    return table.select(want)


def concat_parts(tables: list[pa.Table], columns: list[str] | None = None) -> pa.Table:
    """Concatenate part tables whose schemas may differ slightly (all-null columns, timestamp units)."""
    if not tables:
        cols = columns or ["event_id"]
        return pa.table({c: pa.array([], type=pa.string()) for c in cols})
    if len(tables) == 1:
        return tables[0]
    schema = pa.unify_schemas([t.schema for t in tables], promote_options="permissive")
    return pa.concat_tables([t.cast(schema) if not t.schema.equals(schema) else t for t in tables])


def _part_time_bounds(part: Path) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    pf = pq.ParquetFile(part)
    meta, j = pf.metadata, _timestamp_index(pf.metadata)
    if meta.num_rows == 0:
        return None
    bounds = [None if j is None else _row_group_bounds(meta, rg, j) for rg in range(meta.num_row_groups)
              if meta.row_group(rg).num_rows]
    if bounds and all(b is not None for b in bounds):
        return min(b[0] for b in bounds), max(b[1] for b in bounds)
    ts = pd.to_datetime(pf.read(columns=["timestamp"]).column(0).to_pandas(), utc=True)
    return (ts.min(), ts.max()) if len(ts) else None


def _normalized(df: pd.DataFrame) -> pd.DataFrame:
    """``normalize_feedback(df)`` without copying the columns that already have the canonical dtype."""
    if not all(c in df.columns and str(df[c].dtype) == dtype for c, dtype in FEEDBACK_COLUMNS.items()):
        return normalize_feedback(df)
    extra = [c for c in df.columns if c not in FEEDBACK_COLUMNS]
    cols = [*FEEDBACK_COLUMNS, *extra]
    return pd.DataFrame({c: df[c].array for c in cols}, index=df.index, copy=False)


class FeedbackStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.events_dir = self.root / "events"
        self.catalog_path = self.root / "catalog.parquet"
        self.users_path = self.root / "users.parquet"
        self.ledger_path = self.root / "ledger.jsonl"
        self._lock = FileLock(str(self.root / ".lock")) if self.root.exists() else None

    @classmethod
    def from_settings(cls, settings) -> FeedbackStore:
        """The configured store: these files (default), or Iceberg tables when ``services.store == "iceberg"``
        (:class:`recloop.iceberg_store.IcebergFeedbackStore`, same interface; imported only then)."""
        services = getattr(settings, "services", None)
        if services is not None and services.store == "iceberg":
            from recloop.iceberg_store import IcebergFeedbackStore

            return IcebergFeedbackStore.from_settings(settings)
        settings.store_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings.store_dir)

    # ---- locking -------------------------------------------------------------------
    def _writer_lock(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._lock = FileLock(str(self.root / ".lock"))
        return self._lock

    # ---- events --------------------------------------------------------------------
    def _parts(self) -> list[Path]:
        if not self.events_dir.exists():
            return []
        return sorted(self.events_dir.glob("date=*/part-*.parquet"))

    def event_ids(self) -> set[str]:
        """All stored event ids (reads one column of each part). Memory grows with the store: to check
        a batch, prefer :meth:`stored_among`."""
        ids: set[str] = set()
        for part in self._parts():
            ids.update(pq.read_table(part, columns=["event_id"]).column(0).to_pylist())
        return ids

    def stored_among(self, ids: Iterable) -> set[str]:
        """The ids among ``ids`` that are already stored; equal to ``set(ids) & self.event_ids()``.

        Never builds a set of every stored id: the batch's ids are hashed once and the parts' ``event_id``
        columns stream past them, one part at a time (memory: the batch's hash plus one part).
        """
        found: set[str] = set()
        parts = self._parts()
        if not parts:
            return found
        values = ids if isinstance(ids, pd.Series) else pd.Series(list(ids), dtype=object)
        values = values.dropna()
        if not len(values):
            return found
        obj = values.astype(object).astype(str).to_numpy(dtype=object)
        if len(obj) <= _SMALL_BATCH_IDS:  # a small batch: Arrow's set lookup, rebuilt per part, is cheap
            want = pc.unique(pa.array(obj, type=pa.string()))
            for part in parts:
                col = pq.read_table(part, columns=["event_id"]).column(0)
                hit = col.filter(pc.is_in(col, value_set=want))
                if len(hit):
                    found.update(hit.to_pylist())
            return found
        want = pd.Index(pd.unique(obj))  # a large batch: one pandas hash table, probed by each part
        for part in parts:
            col = pq.read_table(part, columns=["event_id"]).column(0).to_numpy(zero_copy_only=False)
            hit = col[want.get_indexer(col) >= 0]
            if len(hit):
                found.update(hit.tolist())
        return found

    def append(self, df: pd.DataFrame, batch_id: str | None = None) -> AppendResult:
        """Append valid events; events whose ``event_id`` is already stored are skipped.

        Appending the same batch twice stores its events once. Duplicate ids inside
        ``df`` keep their first occurrence.
        """
        events = _normalized(df)
        with self._writer_lock():
            ids = events["event_id"]
            keep = ~(ids.isin(self.stored_among(ids)).to_numpy() | ids.duplicated(keep="first").to_numpy())
            fresh = events if keep.all() else events[keep]  # no copy in the common case: all new
            n_dup = len(events) - int(keep.sum())
            del events, ids
            parts: list[str] = []
            if len(fresh):
                # one order for the whole batch: (timestamp, event_id), so each UTC day is a contiguous run
                t = fresh["timestamp"].dt.tz_convert("UTC").dt.tz_localize(None).to_numpy()
                order = pd.DataFrame({"t": t, "e": fresh["event_id"].to_numpy()}).sort_values(
                    ["t", "e"]).index.to_numpy()
                # the UTC day as datetime64[D]: grouping on it is ~20x cheaper than formatting strings
                days = t.astype("datetime64[D]")[order]
                del t
                cuts = np.flatnonzero(days[1:] != days[:-1]) + 1
                for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(days)]):
                    day = str(days[a])[:10]
                    chunk = fresh.take(order[a:b])  # one copy per day (no sort + reset copies)
                    chunk.index = pd.RangeIndex(len(chunk))
                    digest = hashlib.sha256("\n".join(chunk["event_id"]).encode()).hexdigest()[:16]
                    path = self.events_dir / f"date={day}" / f"part-{digest}.parquet"
                    atomic_write_parquet(chunk, path, row_group_size=PART_ROW_GROUP_ROWS)
                    parts.append(str(path.relative_to(self.root)))
                    del chunk
            result = AppendResult(batch_id=batch_id, n_new=len(fresh), n_duplicate=n_dup, parts=parts)
            if batch_id is not None or parts:
                self._append_ledger(result)
            return result

    def _append_ledger(self, result: AppendResult) -> None:
        line = json.dumps({**result.to_dict(), "at": datetime.now(UTC).isoformat()})
        with self.ledger_path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def ledger(self) -> list[dict]:
        if not self.ledger_path.exists():
            return []
        rows = []
        for line in self.ledger_path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a torn last line after a crash: ignore it
                    continue
        return rows

    def parts(self, start=None, end=None) -> list[Path]:
        """Event part files whose day partition overlaps ``[start, end)`` (all parts without bounds)."""
        start_ts, end_ts = _to_utc(start), _to_utc(end)
        out = []
        for part in self._parts():
            day = _part_day(part)
            if start_ts is not None and day + pd.Timedelta(days=1) <= start_ts:
                continue
            if end_ts is not None and day >= end_ts:
                continue
            out.append(part)
        return out

    def scan(self, start=None, end=None, columns: list[str] | None = None,
             parts: Iterable[Path | str] | None = None) -> Iterator[pa.Table]:
        """One Arrow table per part with the rows ``start <= timestamp < end`` and only ``columns``.

        Streaming: a part is read when the iterator reaches it. Pushdown: partitions outside the window
        are not opened, only ``columns`` are read, row groups whose ``timestamp`` statistics lie outside
        the window are skipped and the remaining rows are filtered as Arrow columns. A requested column a
        part lacks comes back as nulls. ``parts`` (paths, or paths relative to the store root) limits the
        scan to those files. Rows come in file order, not sorted.
        """
        start_ts, end_ts = _to_utc(start), _to_utc(end)
        if parts is None:
            files = self.parts(start_ts, end_ts)
        else:
            files = [p if Path(p).is_absolute() else self.root / p for p in map(Path, parts)]
        for part in files:
            if not part.exists():
                continue
            table = _read_part(part, start_ts, end_ts, columns)
            if table.num_rows:
                yield table

    def read_table(self, start=None, end=None, columns: list[str] | None = None) -> pa.Table:
        """:meth:`scan` concatenated into one Arrow table (file order, schemas unified; no pandas objects)."""
        return concat_parts(list(self.scan(start, end, columns)), columns)

    def read(self, start=None, end=None, columns: list[str] | None = None) -> pd.DataFrame:
        """Events with ``start <= timestamp < end`` (UTC), sorted by time (then ``event_id``).

        Reads with pushdown (:meth:`scan`): only the window's partitions and row groups, only the columns
        asked for (plus ``timestamp`` and ``event_id`` for the order).
        """
        cols = None if columns is None else list(dict.fromkeys([*columns, "timestamp", "event_id"]))
        table = self.read_table(start, end, cols)
        if table.num_rows == 0:
            empty = normalize_feedback(pd.DataFrame({c: [] for c in ("event_id",)}))
            return empty[columns] if columns else empty
        table = table.take(pc.sort_indices(table, sort_keys=[("timestamp", "ascending"),
                                                             ("event_id", "ascending")]))
        df = table.to_pandas()
        df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True)
        return df[columns] if columns else df

    def time_range(self) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
        """Oldest and newest event time, from the Parquet ``timestamp`` statistics (no data read
        where the statistics are there; a part without them has its timestamp column read)."""
        lo = hi = None
        for part in self._parts():
            bounds = _part_time_bounds(part)
            if bounds is None:
                continue
            a, b = bounds
            lo = a if lo is None or a < lo else lo
            hi = b if hi is None or b > hi else hi
        return lo, hi

    def count(self) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self._parts())

    def snapshot(self, start=None, end=None) -> Snapshot:
        """Content hash of the events in a window plus the catalog: stable for equal content."""
        df = self.read(start, end, columns=["event_id", "label", "timestamp"])
        h = hashlib.sha256()
        for eid, label in zip(df["event_id"].astype(str), df["label"].astype(int)):
            h.update(f"{eid}:{label}\n".encode())
        if self.catalog_path.exists():
            cat = self.catalog()
            for iid in sorted(cat["item_id"].astype(str)):
                h.update(f"item:{iid}\n".encode())
        batch_ids = [r["batch_id"] for r in self.ledger() if r.get("batch_id") and r.get("n_new", 0) > 0]
        return Snapshot(
            hash=h.hexdigest(),
            start=None if start is None else str(_to_utc(start)),
            end=None if end is None else str(_to_utc(end)),
            n_events=len(df),
            batch_ids=batch_ids,
        )

    # ---- catalog and users ------------------------------------------------------------
    def has_catalog(self) -> bool:
        return self.catalog_path.exists()

    def has_users(self) -> bool:
        return self.users_path.exists()

    def upsert_catalog(self, df: pd.DataFrame) -> int:
        return self._upsert(self.catalog_path, normalize_catalog(df), "item_id")

    def upsert_users(self, df: pd.DataFrame) -> int:
        return self._upsert(self.users_path, normalize_users(df), "user_id")

    def _upsert(self, path: Path, new: pd.DataFrame, key: str) -> int:
        with self._writer_lock():
            if path.exists():
                old = pd.read_parquet(path)
                merged = pd.concat([old[~old[key].isin(new[key])], new], ignore_index=True)
            else:
                merged = new
            merged = merged.drop_duplicates(key, keep="last").sort_values(key).reset_index(drop=True)
            atomic_write_parquet(merged, path)
            return len(merged)

    def catalog(self) -> pd.DataFrame:
        if not self.catalog_path.exists():
            return normalize_catalog(pd.DataFrame({"item_id": [], "title": [], "description": [], "category": []}))
        df = pd.read_parquet(self.catalog_path)
        df["created_at"] = pd.to_datetime(df["created_at"], utc=True)
        return df

    def users(self) -> pd.DataFrame:
        if not self.users_path.exists():
            return pd.DataFrame({"user_id": pd.Series([], dtype="string")})
        return pd.read_parquet(self.users_path)
