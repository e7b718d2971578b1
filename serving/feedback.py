"""Durable feedback landing and the impression log.

**Feedback** (``POST /feedback``) is micro-batched into ``landing/``: a landing file holds up
to ``feedback_flush_events`` events or ``feedback_flush_seconds`` of feedback, so the ingest
checks that need a batch (per-user click cap, like-rate over >= 50 rows) see real batches and
ingest cost grows with events, not with requests. Durability before the 202: the events of a
request are appended to the *open batch*, a JSON-lines spool file
``state/serving/spool/serving-<time>-<id>.jsonl``, and fsynced; only then are their ids
recorded and the 202 sent. The open batch is converted into ``landing/serving-<time>-<id>.parquet``
(the ``batch_file`` of the answer; written to a temp file, fsynced, renamed) when it reaches the
size, when it is older than the time limit (a background thread), on shutdown, and — after a crash
— when the next server starts on the workspace (a spool file whose owner process is gone: each
owner holds an ``flock`` on its open batch). An append that fails half-way is truncated back, so
every acknowledged line is whole. A crash can land an event at worst twice (the batch landed but
its spool file not yet removed), which the store's own ``event_id`` idempotency absorbs; it
never loses an accepted event. ``feedback_flush_seconds = 0`` lands every request at once.

Idempotency on ``event_id``: the ids this server accepted are kept in SQLite
(``state/serving/accepted_event_ids.sqlite``, one primary-key row per id, parameterised
queries, ``synchronous=FULL``): no id can inject another, and memory does not grow with them.
An id seen before is counted as a duplicate and not written again. One lock (a thread lock plus
a file lock, so server processes on one workspace agree) covers check, append and record, so
concurrent duplicate posts store the event once. The old newline-delimited log
(``accepted_event_ids.log``) is migrated once: only ids found in the store or in ``landing/`` are
imported (a line injected through a newline cannot be told from a real id, and an unverified id
that is posted again lands again, which the store absorbs), then it is renamed ``*.migrated``.

**Services backend** (``FeedbackWriter(..., settings=)`` / :meth:`FeedbackWriter.from_settings`): with
``services.database_url`` the ids live in PostgreSQL (``recloop_accepted_ids``; claimed with
``INSERT ... ON CONFLICT DO NOTHING RETURNING`` in a transaction that commits after the fsynced
append), so replicas on different machines accept each id exactly once. With ``services.s3_bucket``
each landed file is uploaded to the object store's ``landing/`` prefix; the local copy is deleted
only after the upload succeeded, and a failed upload is retried by the flush thread and at restart.

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
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from filelock import FileLock

from recloop.schema import FEEDBACK_COLUMNS, normalize_feedback
from recloop.store import atomic_write_bytes, fsync_dir
from serving.schemas import is_valid_id

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")


def _try_flock(fh) -> bool:
    """An exclusive, non-blocking ``flock`` on ``fh`` (released by the kernel when its process dies)."""
    if fcntl is None:  # no flock (Windows): spool files are recovered at startup only
        return True
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class FeedbackResult:
    accepted: int
    duplicates: int
    batch_file: str | None


class AcceptedIds:
    """The event ids accepted so far: SQLite, one primary-key row per id, shared by processes.

    :meth:`reserve` / :meth:`commit` / :meth:`abort` are the writer's protocol (the same for
    :class:`PgAcceptedIds`): reserve the ids that are new, append their events, then commit. Here
    the writer's file lock makes the check and the record atomic for processes on one workspace.
    """

    truncate_on_failed_commit = True  # a failed commit was rolled back: the ids are not recorded

    def __init__(self, path: Path):
        self.path = Path(path)
        self.label = self.path.name
        self._reserved: list[str] = []
        self._db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS accepted (event_id TEXT PRIMARY KEY, accepted_at TEXT NOT NULL)"
                         " WITHOUT ROWID")

    def known(self, ids: list[str]) -> set[str]:
        out: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            sql = f"SELECT event_id FROM accepted WHERE event_id IN ({','.join('?' * len(chunk))})"  # placeholders only
            out.update(r[0] for r in self._db.execute(sql, chunk))
        return out

    def add(self, ids) -> None:
        when = datetime.now(UTC).isoformat()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("INSERT OR IGNORE INTO accepted (event_id, accepted_at) VALUES (?, ?)",
                                 [(i, when) for i in ids])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def reserve(self, ids: list[str]) -> set[str]:
        """The ids among ``ids`` not accepted before (recorded by :meth:`commit`)."""
        known = self.known(ids)
        self._reserved = [i for i in ids if i not in known]
        return set(self._reserved)

    def commit(self) -> None:
        reserved, self._reserved = self._reserved, []
        if reserved:
            self.add(reserved)

    def abort(self) -> None:
        self._reserved = []

    def __contains__(self, event_id: str) -> bool:
        return bool(self.known([event_id]))

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM accepted").fetchone()[0])

    def close(self) -> None:
        self._db.close()


class PgAcceptedIds:
    """The accepted-id log in PostgreSQL (``services.database_url``), shared by serving replicas.

    :meth:`reserve` opens a transaction and runs ``INSERT ... ON CONFLICT DO NOTHING RETURNING``:
    the returned ids are new *for this replica*; a replica posting the same id at the same time
    waits on the uncommitted row and then gets nothing back (or the id, if this one aborts). The
    writer appends the events, then :meth:`commit`. When a commit fails the outcome is unknown (the
    server may have committed): the writer keeps the appended events, since a batch landed twice is
    absorbed by the store's ``event_id`` idempotency, while an id recorded without its event is lost.
    """

    truncate_on_failed_commit = False

    def __init__(self, settings):
        from recloop import pgstate

        self._settings = settings
        self.label = "PostgreSQL table recloop_accepted_ids"
        pgstate.ensure_schema(settings)
        self._conn = None  # reserve .. commit/abort (the writer's lock serialises them)
        self._read = None  # reads, autocommit: a read from another thread never ends a reservation

    def _connection(self, *, read: bool = False):
        from recloop import pgstate

        conn = self._read if read else self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            conn = pgstate.open_connection(self._settings, autocommit=read)
            if read:
                self._read = conn
            else:
                self._conn = conn
        return conn

    def known(self, ids: list[str]) -> set[str]:
        rows = self._connection(read=True).execute(
            "SELECT event_id FROM recloop_accepted_ids WHERE event_id = ANY(%s)", (list(ids),)).fetchall()
        return {r[0] for r in rows}

    def add(self, ids) -> None:
        self.reserve(list(ids))
        self.commit()

    def reserve(self, ids: list[str]) -> set[str]:
        conn = self._connection()
        try:
            rows = conn.execute(
                "INSERT INTO recloop_accepted_ids (event_id) SELECT unnest(%s::text[]) "
                "ON CONFLICT (event_id) DO NOTHING RETURNING event_id", (list(ids),)).fetchall()
        except BaseException:
            self.abort()
            raise
        return {r[0] for r in rows}

    def commit(self) -> None:
        self._connection().commit()

    def abort(self) -> None:
        if self._conn is not None and not self._conn.closed:
            try:
                self._conn.rollback()
            except Exception:  # a broken connection: the server rolled back with it
                self._conn.close()

    def __contains__(self, event_id: str) -> bool:
        return bool(self.known([event_id]))

    def count(self) -> int:
        return int(self._connection(read=True).execute("SELECT COUNT(*) FROM recloop_accepted_ids").fetchone()[0])

    def close(self) -> None:
        for conn in (self._conn, self._read):
            if conn is not None:
                conn.close()


class _OpenBatch:
    """The spool file being appended to, flock'ed by this process for as long as it is open."""

    def __init__(self, path: Path, fh):
        self.path, self.fh = path, fh
        self.n = 0
        self.opened = time.monotonic()

    @property
    def landing_name(self) -> str:
        return self.path.stem + ".parquet"

    def append(self, data: bytes) -> None:
        size = self.fh.tell()
        try:
            self.fh.write(data)
            self.fh.flush()
            os.fsync(self.fh.fileno())
        except BaseException:
            self.truncate(size)
            raise

    def truncate(self, size: int) -> None:
        """Cut a half-written append back, so every acknowledged line stays whole."""
        try:
            self.fh.seek(size)
            self.fh.truncate(size)
            self.fh.flush()
            os.fsync(self.fh.fileno())
        except (OSError, ValueError):
            log.exception("could not truncate %s back to %d bytes", self.path, size)

    def close(self) -> None:
        try:
            self.fh.close()  # releases the flock
        except OSError:
            pass


def _jsonable(row: dict) -> dict:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


def land_spool(spool: Path, landing_dir: Path) -> Path | None:
    """Convert one spool file into ``landing/<stem>.parquet`` (atomic, fsynced), then remove it.

    (With an object store the writer then uploads that file to the ``landing/`` prefix.)"""
    rows, torn = [], 0
    for line in spool.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:  # only an append that was never acknowledged can be torn
            torn += 1
    if torn:
        log.warning("%s: %d torn line(s) skipped (never acknowledged)", spool.name, torn)
    target = None
    if rows:
        df = pd.DataFrame(rows, columns=list(FEEDBACK_COLUMNS))
        df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True, format="ISO8601")
        df = normalize_feedback(df)
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        target = landing_dir / (spool.stem + ".parquet")
        atomic_write_bytes(target, buf.getvalue())
        fsync_dir(landing_dir)
    spool.unlink()
    fsync_dir(spool.parent)
    return target


def _object_store(settings):
    """The object store of ``settings`` (None: landing stays a local folder). Imported only when
    ``services.s3_bucket`` is set, so the embedded default needs no S3 client."""
    services = getattr(settings, "services", None)
    if settings is None or not getattr(services, "s3_bucket", None):
        return None
    try:
        from recloop.objectstore import ObjectStore
    except ImportError as exc:
        raise RuntimeError("services.s3_bucket is set, but recloop.objectstore (the object-store client) "
                           f"cannot be imported ({exc}); feedback would not reach the landing prefix") from exc
    return ObjectStore.from_settings(settings)


def accepted_ids_for(settings, state_dir: Path):
    """The accepted-id log: PostgreSQL with ``services.database_url``, else SQLite under ``state_dir``."""
    from recloop import pgstate

    if settings is not None and pgstate.enabled(settings):
        return PgAcceptedIds(settings)
    return AcceptedIds(Path(state_dir) / "accepted_event_ids.sqlite")


class FeedbackWriter:
    """Accepted feedback -> the open batch (fsynced) -> ``landing/`` by size, time or shutdown.

    The defaults (``flush_events=1``, ``flush_seconds=0``) land every write at once; the server
    passes ``feedback_flush_events`` / ``feedback_flush_seconds``.

    ``settings`` (optional) selects the services backend: with ``services.database_url`` the
    accepted ids live in PostgreSQL (:class:`PgAcceptedIds`), so replicas on different machines
    accept each id once; with ``services.s3_bucket`` every landed file is uploaded to the object
    store's ``landing/`` prefix and its local copy deleted only after the upload succeeded (a
    failed upload keeps the file; :meth:`recover` and the flush thread retry it).
    """

    def __init__(self, landing_dir: Path, state_dir: Path, *, store_dir: Path | None = None,
                 flush_events: int = 1, flush_seconds: float = 0.0, source: str = "serving", settings=None):
        self.landing_dir = Path(landing_dir)
        self.state_dir = Path(state_dir)
        self.spool_dir = self.state_dir / "spool"
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.landing_dir.mkdir(parents=True, exist_ok=True)
        self.flush_events = max(int(flush_events), 1)
        self.flush_seconds = max(float(flush_seconds), 0.0)
        self.source = source
        self._lock = threading.Lock()
        self._file_lock = FileLock(str(self.state_dir / "feedback.lock"))
        self._open: _OpenBatch | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.objects = _object_store(settings)
        self.ids = accepted_ids_for(settings, self.state_dir)
        with self._lock, self._file_lock:
            self._migrate_old_log(store_dir)
            self._recover_locked()

    @classmethod
    def from_settings(cls, settings, **kwargs) -> FeedbackWriter:
        """The writer of a server on ``settings`` (landing/, ``state/serving``, the store, the backend)."""
        s = settings.serving
        kwargs.setdefault("flush_events", s.feedback_flush_events)
        kwargs.setdefault("flush_seconds", s.feedback_flush_seconds)
        return cls(settings.landing_dir, settings.state_dir / "serving", store_dir=settings.store_dir,
                   settings=settings, **kwargs)

    # ---- the accepted-id log ---------------------------------------------------------------------
    def _migrate_old_log(self, store_dir: Path | None) -> None:
        old = self.state_dir / "accepted_event_ids.log"
        if not old.exists():
            return
        data = old.read_bytes()
        lines = data.split(b"\n")
        if lines and not data.endswith(b"\n"):
            log.warning("%s: torn last line ignored", old.name)
        lines = lines[:-1]  # after the last newline: empty, or a torn line
        candidates = set()
        for line in lines:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if is_valid_id(text):
                candidates.add(text)
        found = self._landed_ids(candidates)
        if store_dir is not None and candidates - found:
            from recloop.store import FeedbackStore

            found |= candidates & FeedbackStore(store_dir).event_ids()
        self.ids.add(sorted(found))
        old.rename(old.with_name(old.name + ".migrated"))
        log.warning("migrated %s to %s: %d id(s) imported (found in the store or landing/), %d line(s) not "
                    "imported (not verifiable; a re-post lands again and the store's event_id idempotency "
                    "absorbs it)", old.name, self.ids.label, len(found), len(lines) - len(found))

    def _landed_ids(self, candidates: set[str]) -> set[str]:
        out: set[str] = set()
        if not candidates:
            return out
        for f in sorted(self.landing_dir.glob(f"{self.source}-*.parquet")):
            try:
                out.update(candidates.intersection(pd.read_parquet(f, columns=["event_id"])["event_id"].astype(str)))
            except Exception as exc:
                log.warning("migration: cannot read %s: %s", f, exc)
        return out

    def seen(self, event_id: str) -> bool:
        return event_id in self.ids

    # ---- writing ---------------------------------------------------------------------------------
    def write(self, rows: list[dict]) -> FeedbackResult:
        """Accept ``rows`` (validated feedback dicts) once per ``event_id``; on disk before it returns."""
        with self._lock, self._file_lock:
            unique: dict[str, dict] = {}
            for r in rows:
                unique.setdefault(r["event_id"], r)
            new = self.ids.reserve(list(unique))  # PostgreSQL: claimed in an open transaction
            try:
                fresh = [r for eid, r in unique.items() if eid in new]
                if not fresh:
                    self.ids.abort()
                    return FeedbackResult(0, len(rows), None)
                batch = self._open or self._new_batch()
                size = batch.fh.tell()
                batch.append(b"".join(json.dumps(_jsonable(r)).encode("utf-8") + b"\n" for r in fresh))
            except BaseException:
                self.ids.abort()
                raise
            try:
                self.ids.commit()
            except BaseException:
                if self.ids.truncate_on_failed_commit:  # rolled back: the ids are not recorded, drop the lines
                    batch.truncate(size)
                else:  # outcome unknown: keep the lines (landing twice is absorbed, losing is not)
                    batch.n += len(fresh)
                raise
            batch.n += len(fresh)
            name = batch.landing_name
            if batch.n >= self.flush_events or self.flush_seconds <= 0:
                self._land_locked()
            return FeedbackResult(len(fresh), len(rows) - len(fresh), name)

    def _new_batch(self) -> _OpenBatch:
        path = self.spool_dir / f"{self.source}-{_stamp()}-{uuid.uuid4().hex[:8]}.jsonl"
        fh = open(path, "xb")  # noqa: SIM115 - held open (and flock'ed) until the batch lands
        _try_flock(fh)
        fsync_dir(self.spool_dir)
        self._open = _OpenBatch(path, fh)
        return self._open

    def _land_locked(self) -> str | None:
        batch, self._open = self._open, None
        if batch is None:
            return None
        try:
            target = land_spool(batch.path, self.landing_dir)
        except Exception as exc:
            self._keep(batch.path, exc)
            return None
        finally:
            batch.close()
        if target is not None:
            self._upload(target)
        return target.name if target else None

    def _upload(self, path: Path) -> str | None:
        """Object store configured: ``landing/<name>`` gets the file, then the local copy goes.
        A failed upload keeps the local file (logged) for the next :meth:`recover` / flush pass."""
        if self.objects is None:
            return None
        key = f"landing/{path.name}"
        try:
            self.objects.put_file(key, path)
        except Exception as exc:
            log.error("uploading feedback batch %s to %s failed (%s: %s); kept locally for retry", path.name, key,
                      type(exc).__name__, exc)
            return None
        try:
            path.unlink()
            fsync_dir(path.parent)
        except FileNotFoundError:  # another process on this workspace uploaded it too
            pass
        return key

    def _upload_pending(self) -> list[str]:
        """Retry uploading landed files of this writer's source that are still local."""
        if self.objects is None:
            return []
        keys = []
        for path in sorted(self.landing_dir.glob(f"{self.source}-*.parquet")):
            key = self._upload(path)
            if key is not None:
                log.warning("uploaded feedback batch %s left behind by a failed upload -> %s", path.name, key)
                keys.append(key)
        return keys

    def _keep(self, spool: Path, exc: Exception) -> None:
        """A batch that did not land is never dropped: after a disk error it stays for the next pass;
        content that cannot be converted goes to ``spool/failed/`` (logged) instead of blocking."""
        if isinstance(exc, OSError):
            log.error("landing feedback batch %s failed (%s); kept for retry", spool.name, exc)
            return
        failed = self.spool_dir / "failed"
        failed.mkdir(exist_ok=True)
        spool.replace(failed / spool.name)
        log.error("feedback batch %s cannot be converted (%s: %s); moved to %s for inspection", spool.name,
                  type(exc).__name__, exc, failed)

    def flush(self) -> str | None:
        """Land the open batch now; returns the landing file name (None: nothing open)."""
        with self._lock, self._file_lock:
            return self._land_locked()

    def flush_due(self) -> str | None:
        """Land the open batch if it is older than ``flush_seconds``; retry batches left behind."""
        with self._lock, self._file_lock:
            out = None
            if self._open is not None and time.monotonic() - self._open.opened >= self.flush_seconds:
                out = self._land_locked()
            self._recover_locked()
            return out

    def recover(self) -> list[str]:
        """Land spool files that no live process holds; returns their names."""
        with self._lock, self._file_lock:
            return self._recover_locked()

    def _recover_locked(self) -> list[str]:
        landed = []
        for path in sorted(self.spool_dir.glob(f"{self.source}-*.jsonl")):
            if self._open is not None and path == self._open.path:
                continue
            with open(path, "rb") as fh:
                if not _try_flock(fh):
                    continue  # another server process is appending to it
                try:
                    target = land_spool(path, self.landing_dir)
                except Exception as exc:
                    self._keep(path, exc)
                    continue
            if target is not None:
                self._upload(target)
            log.warning("recovered feedback batch %s (left by a stopped server or a failed landing) -> "
                        "landing/%s", path.name, target.name if target else "(empty)")
            landed.append(path.name)
        self._upload_pending()
        return landed

    # ---- the flush thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        tick = min(max(self.flush_seconds / 2, 0.05), 1.0)
        while not self._stop.wait(tick):
            try:
                self.flush_due()
            except Exception:
                log.exception("flushing feedback failed")

    def start(self) -> None:
        if self._thread is None and self.flush_seconds > 0:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="recloop-feedback-flush", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the flush thread and land the open batch (shutdown)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.flush()
        if isinstance(self.ids, PgAcceptedIds):  # SQLite stays open: tests read it after close()
            self.ids.close()


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
