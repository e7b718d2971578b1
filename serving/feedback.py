"""Durable feedback landing and the impression log.

**Feedback** (``POST /feedback``) is written to ``landing/`` as one small Parquet batch
per request, in the feedback contract of ``recloop/schema.py`` (``FEEDBACK_COLUMNS``),
so the ingest flow validates and stores it like any other batch. The file is written to
a hidden temp file, fsynced and renamed (``atomic_write_bytes``): the ingest flow never
sees half a batch, and a 202 means the events are on disk.

Idempotency on ``event_id``: the ids this server accepted are kept in memory and in an
append-only, fsynced log (``state/serving/accepted_event_ids.log``); an id seen before is
counted as a duplicate and not written again. One lock (a thread lock plus a file lock,
so two server processes on one workspace agree) covers check, write and log, so
concurrent duplicate posts store the event once. The batch file is written *before* the
ids are logged: a crash in between can at worst land an event twice, which the store's
own ``event_id`` idempotency absorbs, but never lose one.

**Impressions** (every ``/recommend`` and ``/search`` answer) go to a separate log,
``<workspace>/impressions/impressions-<time>-<id>.jsonl``: one row per shown item with
``impression_id``, ``timestamp``, ``endpoint``, ``user_id``, ``query``, ``item_id``,
``rank``, ``score``, ``explored``, ``model_version``. They are *not* feedback events: a
shown item the user then clicks is reported by the client as a ``click`` (with the
``impression_id``), and the client may report unclicked ones as ``impression`` events.
Putting every served list into ``landing/`` as label-0 events would double-count shown
and clicked items. :func:`read_impressions` loads the log (training can tell explored
positions from ranked ones and join clicks through ``impression_id``; feedback that carried
an ``impression_id`` is recorded in ``impressions/links-*.jsonl``). Rows are buffered and
flushed every ``impression_flush_seconds`` by a background thread: a crash loses at most
that window of impressions, never feedback.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from filelock import FileLock

from recloop.schema import FEEDBACK_COLUMNS, normalize_feedback
from recloop.store import atomic_write_bytes

log = logging.getLogger(__name__)


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")


@dataclass(frozen=True)
class FeedbackResult:
    accepted: int
    duplicates: int
    batch_file: str | None


class FeedbackWriter:
    def __init__(self, landing_dir: Path, state_dir: Path):
        self.landing_dir = Path(landing_dir)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ids_path = self.state_dir / "accepted_event_ids.log"
        self._lock = threading.Lock()
        self._file_lock = FileLock(str(self.state_dir / "feedback.lock"))
        self._accepted: set[str] = set()
        self._ids_size = 0
        self._load_ids()

    def _load_ids(self) -> None:
        """(Re)read the accepted-id log from where we last stopped (another process may have appended)."""
        if not self.ids_path.exists():
            return
        with self.ids_path.open("rb") as fh:
            fh.seek(self._ids_size)
            chunk = fh.read()
        end = chunk.rfind(b"\n") + 1  # ignore a torn last line
        for line in chunk[:end].decode("utf-8", errors="replace").splitlines():
            if line:
                self._accepted.add(line)
        self._ids_size += end

    def seen(self, event_id: str) -> bool:
        return event_id in self._accepted

    def write(self, rows: list[dict], source: str = "serving") -> FeedbackResult:
        """Land ``rows`` (validated feedback dicts) once per ``event_id``; returns counts."""
        with self._lock, self._file_lock:
            self._load_ids()
            fresh, seen_now = [], set()
            for r in rows:
                eid = r["event_id"]
                if eid in self._accepted or eid in seen_now:
                    continue
                seen_now.add(eid)
                fresh.append(r)
            if not fresh:
                return FeedbackResult(0, len(rows), None)
            df = normalize_feedback(pd.DataFrame(fresh, columns=list(FEEDBACK_COLUMNS)))
            path = self.landing_dir / f"{source}-{_stamp()}-{uuid.uuid4().hex[:8]}.parquet"
            buf = io.BytesIO()
            df.to_parquet(buf, index=False)
            atomic_write_bytes(path, buf.getvalue())  # fsync + rename: on disk before we answer
            data = "".join(r["event_id"] + "\n" for r in fresh).encode("utf-8")
            with self.ids_path.open("ab") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            self._ids_size += len(data)
            self._accepted.update(seen_now)
            return FeedbackResult(len(fresh), len(rows) - len(fresh), path.name)


class ImpressionLog:
    """Buffered, atomically flushed JSONL files of what was shown."""

    def __init__(self, directory: Path, flush_seconds: float = 1.0, max_buffer: int = 50_000):
        self.dir = Path(directory)
        self.flush_seconds = flush_seconds
        self.max_buffer = max_buffer
        self._rows: list[dict] = []
        self._links: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def log(self, rows: list[dict]) -> None:
        with self._lock:
            if len(self._rows) + len(rows) > self.max_buffer:  # the disk is not keeping up: shed, count it
                self.dropped += len(rows)
                return
            self._rows.extend(rows)

    def link(self, links: list[dict]) -> None:
        if links:
            with self._lock:
                self._links.extend(links)

    def flush(self) -> int:
        with self._lock:
            rows, self._rows = self._rows, []
            links, self._links = self._links, []
        for prefix, batch in (("impressions", rows), ("links", links)):
            if batch:
                data = "".join(json.dumps(r, default=str) + "\n" for r in batch).encode("utf-8")
                atomic_write_bytes(self.dir / f"{prefix}-{_stamp()}-{uuid.uuid4().hex[:8]}.jsonl", data)
        return len(rows)

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            try:
                self.flush()
            except Exception:
                log.exception("flushing impressions failed")

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="recloop-impressions", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.flush()


def impressions_dir(settings) -> Path:
    return settings.root / "impressions"


def read_impressions(settings, links: bool = False) -> pd.DataFrame:
    """All logged impressions (or, with ``links=True``, the feedback -> impression links) as one frame."""
    folder = impressions_dir(settings)
    prefix = "links" if links else "impressions"
    files = sorted(folder.glob(f"{prefix}-*.jsonl")) if folder.exists() else []
    frames = [pd.read_json(f, lines=True, dtype=False) for f in files if f.stat().st_size]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    if "timestamp" in df.columns:
        df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True)
    return df


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def monotonic() -> float:
    return time.monotonic()
