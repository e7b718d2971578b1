"""Small shared state in PostgreSQL, for machines that share nothing but services.

The embedded default keeps this state in files under ``<workspace>/state`` (JSON + file locks,
SQLite). With ``services.database_url`` set, these move into one small schema instead, so two
workers, retrainers or serving replicas on different machines agree without a shared disk:

============================  ======================================================================
``recloop_storm_state``       storm control (``monitoring.storm``): one JSON row per model name,
                              changed under ``SELECT ... FOR UPDATE`` in a transaction
``recloop_storm_suppressions`` the suppression log (append-only)
``recloop_accepted_ids``      the accepted-id log of ``/feedback`` (``serving.feedback``): one
                              primary-key row per ``event_id``; ``INSERT ... ON CONFLICT DO NOTHING
                              RETURNING`` tells a replica which ids are new, atomically
``recloop_quarantine``        the quarantine registry (``data_checks.quarantine``): one row per entry,
                              the data itself under the object store's ``quarantine/`` prefix
============================  ======================================================================

The promotion compare-and-set (``models.registry.promote``) runs under :func:`advisory_lock`, a
session-level ``pg_advisory_lock`` that PostgreSQL releases by itself when the holder's connection
dies, so a crashed promoter never leaves a stale lock behind (a file lock on a network disk can).

psycopg (3) is imported inside the functions: the embedded default never needs it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_LOCK = "schema"  # advisory-lock name serialising ensure_schema across processes

SCHEMA_SQL = (
    """CREATE TABLE IF NOT EXISTS recloop_storm_state (
        scope text PRIMARY KEY,
        state jsonb NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS recloop_storm_suppressions (
        id bigserial PRIMARY KEY,
        scope text NOT NULL,
        at timestamptz NOT NULL DEFAULT now(),
        entry jsonb NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS recloop_storm_suppressions_scope ON recloop_storm_suppressions (scope, id)",
    """CREATE TABLE IF NOT EXISTS recloop_accepted_ids (
        event_id text PRIMARY KEY,
        accepted_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS recloop_quarantine (
        entry_id text PRIMARY KEY,
        kind text NOT NULL,
        object_key text,
        status text NOT NULL DEFAULT 'quarantined',
        doc jsonb NOT NULL,
        registered_at timestamptz NOT NULL DEFAULT now(),
        released_at timestamptz)""",
)

_ready: set[str] = set()  # database URLs whose schema this process has already ensured
_ready_lock = threading.Lock()


def database_url(settings) -> str | None:
    """``services.database_url`` (None: the embedded default). Tolerates settings without ``services``."""
    services = getattr(settings, "services", None)
    url = getattr(services, "database_url", None)
    return url or None


def enabled(settings) -> bool:
    """Whether this state lives in PostgreSQL (``services.database_url`` is set)."""
    return database_url(settings) is not None


def libpq_url(url: str) -> str:
    """A URL libpq understands: SQLAlchemy-style ``postgresql+psycopg://`` loses its driver suffix."""
    return re.sub(r"^postgres(?:ql)?\+[A-Za-z0-9_]+://", "postgresql://", url)


def _require(settings) -> str:
    url = database_url(settings)
    if url is None:
        raise RuntimeError("services.database_url is not set: this state lives in files (embedded default)")
    return libpq_url(url)


def _psycopg():
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("services.database_url is set but psycopg is not installed: "
                           "pip install 'psycopg[binary]'") from exc
    return psycopg


def jsonb(value: Any):
    """``value`` as a JSONB parameter (JSON-safe first: timestamps and the like become text)."""
    import json

    _psycopg()
    from psycopg.types.json import Jsonb

    return Jsonb(json.loads(json.dumps(value, default=str)))


def open_connection(settings, *, autocommit: bool = False, connect_timeout: float = 10.0):
    """A new psycopg connection to ``services.database_url`` (the caller closes it)."""
    psycopg = _psycopg()
    return psycopg.connect(_require(settings), autocommit=autocommit, connect_timeout=max(1, int(connect_timeout)))


@contextmanager
def connect(settings, *, ensure: bool = True) -> Iterator[Any]:
    """A connection with autocommit off: committed when the block ends, rolled back on an exception.

    ``ensure`` creates the schema first (once per process and database).
    """
    if ensure:
        ensure_schema(settings)
    conn = open_connection(settings)
    try:
        with conn:  # psycopg: commit on success, rollback on exception, then close
            yield conn
    finally:
        if not conn.closed:
            conn.close()


def lock_key(name: str) -> int:
    """The signed 64-bit advisory-lock key of ``name`` (stable across processes and versions)."""
    digest = hashlib.blake2b(f"recloop:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def ensure_schema(settings) -> None:
    """Create the tables if missing. Idempotent, and safe when several processes call it at once:
    the DDL runs inside a transaction holding a transaction-level advisory lock."""
    url = _require(settings)
    with _ready_lock:
        if url in _ready:
            return
        conn = open_connection(settings)
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(SCHEMA_LOCK),))
                for stmt in SCHEMA_SQL:
                    cur.execute(stmt)
        finally:
            if not conn.closed:
                conn.close()
        _ready.add(url)


@contextmanager
def advisory_lock(settings, name: str, timeout: float = 120.0, *, poll: float = 0.05) -> Iterator[None]:
    """Hold the PostgreSQL advisory lock ``name`` for the block, across processes and machines.

    Waits at most ``timeout`` seconds (``TimeoutError`` otherwise). The lock is a session lock on a
    connection of its own: released on exit (also on an exception), and by the server if this
    process dies, so no stale lock survives a crash.
    """
    conn = open_connection(settings, autocommit=True, connect_timeout=min(max(timeout, 1.0), 30.0))
    key = lock_key(name)
    try:
        deadline = time.monotonic() + max(float(timeout), 0.0)
        wait = poll
        while True:
            if conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the PostgreSQL advisory lock {name!r} is held elsewhere; "
                                   f"gave up after {timeout:g} s")
            time.sleep(min(wait, left))
            wait = min(wait * 1.5, 1.0)
        try:
            yield
        finally:
            try:
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            except Exception as exc:  # the connection is gone: the server released the lock with it
                log.debug("advisory unlock of %r failed (%s); the closing connection releases it", name, exc)
    finally:
        conn.close()
