"""Append-only feedback store: Parquet partitioned by event date, idempotent on ``event_id``.

Layout under ``<workspace>/store``::

    events/date=YYYY-MM-DD/part-<content-hash>.parquet   feedback events
    catalog.parquet                                     catalog items (upserted)
    users.parquet                                       users (upserted)
    ledger.jsonl                                        one line per append: batch id, counts, parts
    .lock                                               inter-process lock for writers

Every write goes to a temp file in the same folder and is published with
``os.replace``; an exception (or a kill) mid-write leaves no partial file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from recloop.schema import normalize_catalog, normalize_feedback, normalize_users


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


def atomic_write_parquet(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
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


class FeedbackStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.events_dir = self.root / "events"
        self.catalog_path = self.root / "catalog.parquet"
        self.users_path = self.root / "users.parquet"
        self.ledger_path = self.root / "ledger.jsonl"
        self._lock = FileLock(str(self.root / ".lock")) if self.root.exists() else None

    @classmethod
    def from_settings(cls, settings) -> "FeedbackStore":
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
        """All stored event ids (reads one column of each part)."""
        ids: set[str] = set()
        for part in self._parts():
            ids.update(pq.read_table(part, columns=["event_id"]).column(0).to_pylist())
        return ids

    def append(self, df: pd.DataFrame, batch_id: str | None = None) -> AppendResult:
        """Append valid events; events whose ``event_id`` is already stored are skipped.

        Appending the same batch twice stores its events once. Duplicate ids inside
        ``df`` keep their first occurrence.
        """
        events = normalize_feedback(df)
        with self._writer_lock():
            existing = self.event_ids()
            fresh = events[~events["event_id"].isin(existing)].drop_duplicates("event_id", keep="first")
            n_dup = len(events) - len(fresh)
            parts: list[str] = []
            if len(fresh):
                # the UTC day as datetime64[D]: grouping on it is ~20x cheaper than formatting strings
                days = fresh["timestamp"].dt.tz_convert("UTC").dt.tz_localize(None).to_numpy().astype("datetime64[D]")
                for day64, chunk in fresh.groupby(days, sort=True):
                    day = str(day64)[:10]
                    chunk = chunk.sort_values(["timestamp", "event_id"]).reset_index(drop=True)
                    digest = hashlib.sha256("\n".join(chunk["event_id"]).encode()).hexdigest()[:16]
                    path = self.events_dir / f"date={day}" / f"part-{digest}.parquet"
                    atomic_write_parquet(chunk, path)
                    parts.append(str(path.relative_to(self.root)))
            result = AppendResult(batch_id=batch_id, n_new=len(fresh), n_duplicate=n_dup, parts=parts)
            if batch_id is not None or parts:
                self._append_ledger(result)
            return result

    def _append_ledger(self, result: AppendResult) -> None:
        line = json.dumps({**result.to_dict(), "at": datetime.now(timezone.utc).isoformat()})
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

    def read(self, start=None, end=None, columns: list[str] | None = None) -> pd.DataFrame:
        """Events with ``start <= timestamp < end`` (UTC), sorted by time."""
        start_ts, end_ts = _to_utc(start), _to_utc(end)
        wanted = []
        for part in self._parts():
            day = pd.Timestamp(part.parent.name.split("=", 1)[1], tz="UTC")
            if start_ts is not None and day + pd.Timedelta(days=1) <= start_ts:
                continue
            if end_ts is not None and day >= end_ts:
                continue
            wanted.append(part)
        if not wanted:
            empty = normalize_feedback(pd.DataFrame({c: [] for c in ("event_id",)}))
            return empty[columns] if columns else empty
        cols = None if columns is None else sorted(set(columns) | {"timestamp", "event_id"})
        df = pd.concat([pq.read_table(p, columns=cols).to_pandas() for p in wanted], ignore_index=True)
        df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True)
        if start_ts is not None:
            df = df[df["timestamp"] >= start_ts]
        if end_ts is not None:
            df = df[df["timestamp"] < end_ts]
        df = df.sort_values(["timestamp", "event_id"], kind="stable").reset_index(drop=True)
        return df[columns] if columns else df

    def time_range(self) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
        df = self.read(columns=["timestamp"])
        if df.empty:
            return None, None
        return df["timestamp"].min(), df["timestamp"].max()

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
