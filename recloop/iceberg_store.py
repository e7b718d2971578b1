"""The feedback store as Apache Iceberg tables: object storage for the data, a SQL catalog for the commits.

Same public interface as :class:`recloop.store.FeedbackStore` (``append``, ``stored_among``, ``scan``,
``read``, ``snapshot``, ``upsert_catalog`` ...), selected by ``services.store = "iceberg"``. Three
tables in one namespace: ``feedback_events`` (partitioned by ``day(timestamp)``), ``catalog`` and
``users``. Data and metadata live under the warehouse (``s3://<bucket>/<prefix>/warehouse``); the
pointer to each table's current metadata lives in pyiceberg's ``SqlCatalog`` (PostgreSQL, or SQLite for
one machine), which swaps it with a compare-and-set ``UPDATE ... WHERE metadata_location = <old>``:
a commit is atomic, and of two concurrent commits on the same base exactly one wins.

Guarantees, and how they are kept:

* **Idempotent on ``event_id`` with several writers.** ``append`` reads which of the batch's ids are
  stored *at the table's current snapshot*, appends the rest, and commits with the requirement "main is
  still that snapshot". pyiceberg (0.12) would otherwise retry a failed fast append by rebasing it onto
  the new head, which appends the same events a second time when two writers hold overlapping batches,
  so every table here is created with ``commit.retry.num-retries = 0`` and :meth:`append` retries
  itself: on ``CommitFailedException`` it reloads the table, re-checks the ids against the new snapshot
  and appends only what is still missing. Each event is stored exactly once.
* **Ledger = snapshot summaries.** The batch id and counts ride in the snapshot's summary properties
  (``recloop.batch-id``, ``recloop.n-new`` ...), so the ledger line is committed in the same atomic
  swap as the data; there is no second file to fall out of step. (Expiring snapshots would drop
  ledger history: this store never expires them.)
* **Content hash per snapshot.** :meth:`snapshot` pins one Iceberg snapshot and hashes the sorted
  ``event_id:label`` lines in the window plus the catalog's item ids: the same recipe as the files
  store, so equal content has an equal hash in any process and in either backend (a snapshot id would
  differ for the same events appended in another order).
* **Pruning.** Reads pass the time window as an Iceberg row filter: the planner drops the day
  partitions (and files, by their ``timestamp`` bounds) outside it before any data file is opened, and
  only the requested columns are read.

pyiceberg, SQLAlchemy and a database driver are imported lazily: the embedded default does not need them.
A failed commit can leave the data files it wrote unreferenced (harmless; removed by orphan-file
maintenance), never a half-visible batch.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recloop.schema import FEEDBACK_COLUMNS, normalize_catalog, normalize_feedback, normalize_users
from recloop.store import AppendResult, Snapshot, _normalized, _to_utc, concat_parts

log = logging.getLogger(__name__)

EVENTS_TABLE = "feedback_events"
CATALOG_TABLE = "catalog"
USERS_TABLE = "users"
# Table properties: no automatic rebase-and-retry (see the module docstring), bounded metadata history.
TABLE_PROPERTIES = {
    "commit.retry.num-retries": "0",
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "50",
}
MAX_COMMIT_ATTEMPTS = 40  # optimistic retries on a conflicting commit before giving up
_SMALL_BATCH_IDS = 65_536  # stored_among: up to this many ids, Arrow's is_in per record batch
_TS_NS = pa.timestamp("ns", tz="UTC")
_TS_US = pa.timestamp("us", tz="UTC")
_P = "recloop."  # prefix of our snapshot-summary properties


def sqlalchemy_url(url: str) -> str:
    """A SQLAlchemy URL for the catalog: ``postgresql://`` uses psycopg 3 (the driver the project has)."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0.02, 0.1) * min(attempt + 1, 10))


def _events_schema():
    from pyiceberg.schema import Schema
    from pyiceberg.types import IntegerType, NestedField, StringType, TimestamptzType

    return Schema(
        NestedField(1, "event_id", StringType(), required=False),
        NestedField(2, "user_id", StringType(), required=False),
        NestedField(3, "item_id", StringType(), required=False),
        NestedField(4, "event_type", StringType(), required=False),
        NestedField(5, "label", IntegerType(), required=False),  # Iceberg has no int8; read back as int8
        NestedField(6, "timestamp", TimestamptzType(), required=False),
        NestedField(7, "query", StringType(), required=False),
        NestedField(8, "model_version", StringType(), required=False),
    )


def _events_spec():
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import DayTransform

    return PartitionSpec(PartitionField(source_id=6, field_id=1000, transform=DayTransform(), name="timestamp_day"))


def _column_to_arrow(s: pd.Series) -> pa.Array:
    """One pandas column as the Arrow type Iceberg stores: UTC microseconds, int32/int64, strings."""
    if isinstance(s.dtype, pd.DatetimeTZDtype) or str(s.dtype).startswith("datetime64"):
        ts = pd.to_datetime(s, utc=True)
        return pc.cast(pa.array(ts, type=_TS_NS, from_pandas=True), _TS_US, safe=False)  # floor to microseconds
    if pd.api.types.is_bool_dtype(s.dtype):
        return pa.array(s, type=pa.bool_(), from_pandas=True)
    if pd.api.types.is_integer_dtype(s.dtype):
        return pa.array(s, type=pa.int32() if s.dtype.itemsize <= 4 else pa.int64(), from_pandas=True)
    if pd.api.types.is_float_dtype(s.dtype):
        return pa.array(s, type=pa.float64(), from_pandas=True)
    return pa.array(s.astype("string"), type=pa.string(), from_pandas=True)


def _frame_to_arrow(df: pd.DataFrame) -> pa.Table:
    return pa.table({c: _column_to_arrow(df[c]) for c in df.columns})


def _events_to_arrow(events: pd.DataFrame) -> pa.Table:
    """The canonical feedback columns, sorted by (timestamp, event_id) so files have tight time bounds."""
    cols = {}
    for c in FEEDBACK_COLUMNS:
        s = events[c] if c in events.columns else pd.Series(pd.NA, index=events.index, dtype="string")
        if c == "label":
            cols[c] = pa.array(s.to_numpy(dtype="int32"), type=pa.int32())
        else:
            cols[c] = _column_to_arrow(s)
    table = pa.table(cols)
    if table.num_rows > 1:
        table = table.take(pc.sort_indices(table, sort_keys=[("timestamp", "ascending"), ("event_id", "ascending")]))
    return table


def _canonical(table: pa.Table) -> pa.Table:
    """A scanned table in the files store's types: timestamps in UTC nanoseconds, label int8, plain strings."""
    fields = []
    for f in table.schema:
        if pa.types.is_timestamp(f.type):
            fields.append(pa.field(f.name, _TS_NS))
        elif f.name == "label":
            fields.append(pa.field(f.name, pa.int8()))
        elif pa.types.is_large_string(f.type) or pa.types.is_string_view(f.type):
            fields.append(pa.field(f.name, pa.string()))
        else:
            fields.append(f)
    schema = pa.schema(fields)
    return table if table.schema.equals(schema) else table.cast(schema)


def _ceil_us(ts: pd.Timestamp) -> pd.Timestamp:
    """Stored times are whole microseconds, so ``t >= x`` equals ``t >= ceil_us(x)`` (and likewise ``<``)."""
    return ts.ceil("us")


def _window_filter(start: pd.Timestamp | None, end: pd.Timestamp | None):
    from pyiceberg.expressions import AlwaysTrue, And, GreaterThanOrEqual, LessThan

    expr = AlwaysTrue()
    if start is not None:
        expr = GreaterThanOrEqual("timestamp", _ceil_us(start).isoformat())
    if end is not None:
        upper = LessThan("timestamp", _ceil_us(end).isoformat())
        expr = upper if start is None else And(expr, upper)
    return expr


class IcebergFeedbackStore:
    """Feedback events, catalog and users as Iceberg tables (see the module docstring)."""

    def __init__(self, catalog_url: str, warehouse: str, *, namespace: str = "recloop",
                 io_properties: dict[str, str] | None = None, catalog_name: str = "recloop"):
        self.catalog_url = sqlalchemy_url(catalog_url)
        self.warehouse = warehouse.rstrip("/")
        self.namespace = namespace
        self.catalog_name = catalog_name
        self.io_properties = dict(io_properties or {})
        self._catalog = None

    @classmethod
    def from_settings(cls, settings) -> IcebergFeedbackStore:
        """The catalog on ``iceberg_catalog_url or database_url``, the warehouse under the S3 prefix.

        Without ``s3_bucket`` the warehouse is ``<workspace>/iceberg`` on the local disk (one machine only).
        """
        sv = settings.services
        url = sv.iceberg_catalog_url or sv.database_url
        if not url:
            raise ValueError("services.store = 'iceberg' needs a SQL catalog: set services.iceberg_catalog_url "
                             "(a SQLAlchemy URL) or services.database_url (PostgreSQL)")
        props: dict[str, str] = {}
        if sv.s3_bucket:
            prefix = sv.s3_prefix.strip("/")
            warehouse = f"s3://{sv.s3_bucket}/{prefix + '/' if prefix else ''}warehouse"
            if bool(sv.s3_access_key) != bool(sv.s3_secret_key):
                raise ValueError("set both services.s3_access_key and services.s3_secret_key, or neither")
            props["s3.region"] = sv.s3_region
            if sv.s3_endpoint:
                props["s3.endpoint"] = sv.s3_endpoint
                props["s3.force-virtual-addressing"] = "false"  # path-style for SeaweedFS / MinIO
            if sv.s3_access_key:
                props["s3.access-key-id"] = sv.s3_access_key
                props["s3.secret-access-key"] = sv.s3_secret_key
        else:
            local = settings.root / "iceberg"
            local.mkdir(parents=True, exist_ok=True)
            warehouse = local.as_uri()
        namespace = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in (sv.s3_prefix or "recloop")) or "recloop"
        return cls(url, warehouse, namespace=namespace, io_properties=props)

    def __repr__(self) -> str:  # no credentials in logs
        return f"IcebergFeedbackStore(warehouse={self.warehouse!r}, namespace={self.namespace!r})"

    # ---- catalog plumbing --------------------------------------------------------------------------------
    @property
    def catalog_client(self):
        if self._catalog is None:
            from pyiceberg.catalog.sql import SqlCatalog

            self._catalog = SqlCatalog(self.catalog_name, uri=self.catalog_url, warehouse=self.warehouse,
                                       **self.io_properties)
            self._catalog.create_namespace_if_not_exists(self.namespace)
        return self._catalog

    def _ident(self, name: str) -> str:
        return f"{self.namespace}.{name}"

    def _load(self, name: str):
        """The table as committed now, or None when it was never created."""
        from pyiceberg.exceptions import NoSuchTableError

        try:
            table = self.catalog_client.load_table(self._ident(name))
        except NoSuchTableError:
            return None
        return table

    def events_table(self):
        """The events table, created on first use (concurrent creators: one creates, the rest load it)."""
        table = self._load(EVENTS_TABLE)
        if table is None:
            table = self.catalog_client.create_table_if_not_exists(
                self._ident(EVENTS_TABLE), schema=_events_schema(), partition_spec=_events_spec(),
                properties=TABLE_PROPERTIES)
        return self._own_retries(table)

    def _own_retries(self, table):
        """A table created elsewhere with pyiceberg's automatic rebase-retry: switch it off (see docstring)."""
        from pyiceberg.exceptions import CommitFailedException

        if table.properties.get("commit.retry.num-retries") == "0":
            return table
        try:
            with table.transaction() as tx:
                tx.set_properties(**{"commit.retry.num-retries": "0"})
        except CommitFailedException:
            pass  # someone else changed it at the same time; the next load sees theirs
        return self.catalog_client.load_table(table.name())

    # ---- events ------------------------------------------------------------------------------------------
    def stored_among(self, ids: Iterable) -> set[str]:
        """The ids among ``ids`` already stored (at the current snapshot); never builds a set of every id."""
        table = self._load(EVENTS_TABLE)
        return set() if table is None else self._stored_among(table, ids)

    @staticmethod
    def _stored_among(table, ids: Iterable) -> set[str]:
        found: set[str] = set()
        if table.current_snapshot() is None:
            return found
        values = ids if isinstance(ids, pd.Series) else pd.Series(list(ids), dtype=object)
        values = values.dropna()
        if not len(values):
            return found
        obj = pd.unique(values.astype(object).astype(str).to_numpy(dtype=object))
        reader = table.scan(selected_fields=("event_id",)).to_arrow_batch_reader()
        if len(obj) <= _SMALL_BATCH_IDS:
            want = pa.array(obj, type=pa.string())
            for batch in reader:
                col = batch.column(0)
                hit = col.filter(pc.is_in(col, value_set=want.cast(col.type)))
                if len(hit):
                    found.update(hit.to_pylist())
            return found
        index = pd.Index(obj)  # a large batch: one hash table, probed by each record batch
        for batch in reader:
            col = batch.column(0).to_numpy(zero_copy_only=False)
            hit = col[index.get_indexer(col) >= 0]
            if len(hit):
                found.update(hit.tolist())
        return found

    def event_ids(self) -> set[str]:
        table = self._load(EVENTS_TABLE)
        if table is None or table.current_snapshot() is None:
            return set()
        ids: set[str] = set()
        for batch in table.scan(selected_fields=("event_id",)).to_arrow_batch_reader():
            ids.update(batch.column(0).to_pylist())
        return ids

    def append(self, df: pd.DataFrame, batch_id: str | None = None) -> AppendResult:
        """Append the events whose ``event_id`` is not stored yet; one atomic Iceberg commit.

        Duplicate ids inside ``df`` keep their first occurrence. On a concurrent commit the table is
        reloaded, the ids re-checked and only what is still missing appended (module docstring).
        """
        from pyiceberg.exceptions import CommitFailedException

        events = _normalized(df)
        first = ~events["event_id"].duplicated(keep="first").to_numpy()
        events = events if first.all() else events[first]
        n_inside = len(first) - int(first.sum())
        for attempt in range(MAX_COMMIT_ATTEMPTS):
            table = self.events_table()
            stored = self._stored_among(table, events["event_id"])
            fresh = events[~events["event_id"].isin(stored).to_numpy()] if stored else events
            n_dup = n_inside + len(events) - len(fresh)
            if not len(fresh) and batch_id is None:
                return AppendResult(batch_id=None, n_new=0, n_duplicate=n_dup, parts=[])
            props = {f"{_P}n-new": str(len(fresh)), f"{_P}n-duplicate": str(n_dup),
                     f"{_P}at": datetime.now(UTC).isoformat()}
            if batch_id is not None:
                props[f"{_P}batch-id"] = str(batch_id)
            try:
                table.append(_events_to_arrow(fresh), snapshot_properties=props)
            except CommitFailedException as exc:
                log.info("append %s: concurrent commit (%s); re-checking ids (attempt %d)", batch_id, exc, attempt + 1)
                _backoff(attempt)
                continue
            return AppendResult(batch_id=batch_id, n_new=len(fresh), n_duplicate=n_dup,
                                parts=self._added_files(table))
        raise RuntimeError(f"append {batch_id}: {MAX_COMMIT_ATTEMPTS} commits in a row lost to concurrent "
                           "writers; nothing of this batch was committed, retry it")

    @staticmethod
    def _added_files(table) -> list[str]:
        snap = table.current_snapshot()
        if snap is None:
            return []
        out = []
        for m in snap.manifests(table.io):
            if m.added_snapshot_id == snap.snapshot_id:
                out.extend(e.data_file.file_path for e in m.fetch_manifest_entry(table.io, discard_deleted=True))
        return sorted(out)

    def ledger(self) -> list[dict]:
        """One row per append that carried a batch id or stored rows, in commit order (snapshot summaries)."""
        table = self._load(EVENTS_TABLE)
        return [] if table is None else self._ledger(table, table.current_snapshot())

    @staticmethod
    def _ledger(table, upto) -> list[dict]:
        if upto is None:
            return []
        from pyiceberg.table.snapshots import ancestors_of

        rows = []
        for snap in reversed(list(ancestors_of(upto, table.metadata))):
            p = snap.summary.additional_properties if snap.summary is not None else {}
            if f"{_P}n-new" not in p:
                continue
            rows.append({"batch_id": p.get(f"{_P}batch-id"), "n_new": int(p[f"{_P}n-new"]),
                         "n_duplicate": int(p.get(f"{_P}n-duplicate", 0)), "parts": [],
                         "at": p.get(f"{_P}at"), "snapshot_id": snap.snapshot_id})
        return rows

    def _plan(self, table, start, end, columns: list[str] | None, snapshot_id: int | None = None):
        """(scan, tasks, wanted columns): the planner prunes partitions and files outside the window."""
        names = [f.name for f in table.schema().fields]
        want = names if columns is None else list(dict.fromkeys(columns))
        present = tuple(c for c in want if c in names) or ("event_id",)
        scan = table.scan(row_filter=_window_filter(_to_utc(start), _to_utc(end)), selected_fields=present,
                          snapshot_id=snapshot_id)
        return scan, list(scan.plan_files()), want

    def parts(self, start=None, end=None) -> list[str]:
        """Data files that may hold events in ``[start, end)`` (what the planner keeps after pruning)."""
        table = self._load(EVENTS_TABLE)
        if table is None or table.current_snapshot() is None:
            return []
        _, tasks, _ = self._plan(table, start, end, ["event_id"])
        return sorted(t.file.file_path for t in tasks)

    def scan(self, start=None, end=None, columns: list[str] | None = None,
             parts: Iterable[Path | str] | None = None, *, snapshot_id: int | None = None) -> Iterator[pa.Table]:
        """One Arrow table per data file with the rows ``start <= timestamp < end`` and only ``columns``.

        Streaming (a file is read when the iterator reaches it); partitions and files outside the window
        are never opened; a requested column the table lacks comes back as nulls. ``parts`` (data file
        paths from :meth:`parts` / ``AppendResult.parts``) limits the scan to those files.
        """
        table = self._load(EVENTS_TABLE)
        if table is None or table.current_snapshot() is None:
            return
        from pyiceberg.io.pyarrow import ArrowScan

        scan, tasks, want = self._plan(table, start, end, columns, snapshot_id)
        if parts is not None:
            keep = {str(p) for p in parts}
            tasks = [t for t in tasks if t.file.file_path in keep]
        reader = ArrowScan(scan.table_metadata, scan.io, scan.projection(), scan.row_filter, scan.case_sensitive)
        for task in tasks:
            t = reader.to_table([task])
            if not t.num_rows:
                continue
            for c in want:
                if c not in t.column_names:
                    t = t.append_column(c, pa.nulls(t.num_rows))
            yield _canonical(t.select(want))

    def read_table(self, start=None, end=None, columns: list[str] | None = None) -> pa.Table:
        return concat_parts(list(self.scan(start, end, columns)), columns)

    def read(self, start=None, end=None, columns: list[str] | None = None, *,
             snapshot_id: int | None = None) -> pd.DataFrame:
        """Events with ``start <= timestamp < end`` (UTC), sorted by time then ``event_id``; pushdown as in scan."""
        cols = None if columns is None else list(dict.fromkeys([*columns, "timestamp", "event_id"]))
        table = concat_parts(list(self.scan(start, end, cols, snapshot_id=snapshot_id)), cols)
        if table.num_rows == 0:
            empty = normalize_feedback(pd.DataFrame({c: [] for c in ("event_id",)}))
            return empty[columns] if columns else empty
        table = table.take(pc.sort_indices(table, sort_keys=[("timestamp", "ascending"), ("event_id", "ascending")]))
        df = table.to_pandas()
        df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True)
        for c, dtype in FEEDBACK_COLUMNS.items():
            if c in df.columns and dtype == "string":
                df[c] = df[c].astype("string")
        return df[columns] if columns else df

    def time_range(self) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
        """Oldest and newest event time from the data files' column bounds in the manifests (no data read)."""
        table = self._load(EVENTS_TABLE)
        if table is None or table.current_snapshot() is None:
            return None, None
        from pyiceberg.conversions import from_bytes
        from pyiceberg.types import TimestamptzType

        fid = table.schema().find_field("timestamp").field_id
        lo = hi = None
        for task in table.scan(selected_fields=("timestamp",)).plan_files():
            f = task.file
            if not f.record_count:
                continue
            lb, ub = (f.lower_bounds or {}).get(fid), (f.upper_bounds or {}).get(fid)
            if lb is None or ub is None:  # no statistics: read the column of this file
                ts = pd.to_datetime(self.read_table(columns=["timestamp"]).column(0).to_pandas(), utc=True)
                return (ts.min(), ts.max()) if len(ts) else (None, None)
            a = pd.Timestamp(from_bytes(TimestamptzType(), lb), unit="us", tz="UTC")
            b = pd.Timestamp(from_bytes(TimestamptzType(), ub), unit="us", tz="UTC")
            lo = a if lo is None or a < lo else lo
            hi = b if hi is None or b > hi else hi
        return lo, hi

    def count(self) -> int:
        """Stored events, from the manifests' record counts (append-only: no delete files)."""
        table = self._load(EVENTS_TABLE)
        if table is None or table.current_snapshot() is None:
            return 0
        return sum(t.file.record_count for t in table.scan(selected_fields=("event_id",)).plan_files())

    def snapshot(self, start=None, end=None) -> Snapshot:
        """Content hash of the window's events plus the catalog, at one pinned Iceberg snapshot.

        Same recipe as the files store (sorted ``event_id:label`` lines, then ``item:<id>`` lines): equal
        content gives an equal hash in every process and either backend. Events, counts and batch ids all
        come from the one snapshot, so a concurrent append cannot tear them apart.
        """
        table = self._load(EVENTS_TABLE)
        snap = None if table is None else table.current_snapshot()
        if snap is None:
            df = normalize_feedback(pd.DataFrame({"event_id": []}))
        else:
            df = self.read(start, end, columns=["event_id", "label", "timestamp"], snapshot_id=snap.snapshot_id)
        h = hashlib.sha256()
        for eid, label in zip(df["event_id"].astype(str), df["label"].astype(int)):
            h.update(f"{eid}:{label}\n".encode())
        if self._load(CATALOG_TABLE) is not None:
            for iid in sorted(self.catalog()["item_id"].astype(str)):
                h.update(f"item:{iid}\n".encode())
        ledger = [] if snap is None else self._ledger(table, snap)
        return Snapshot(
            hash=h.hexdigest(),
            start=None if start is None else str(_to_utc(start)),
            end=None if end is None else str(_to_utc(end)),
            n_events=len(df),
            batch_ids=[r["batch_id"] for r in ledger if r.get("batch_id") and r.get("n_new", 0) > 0],
        )

    # ---- catalog and users ---------------------------------------------------------------------------------
    def upsert_catalog(self, df: pd.DataFrame) -> int:
        return self._upsert(CATALOG_TABLE, normalize_catalog(df), "item_id", normalize_catalog)

    def upsert_users(self, df: pd.DataFrame) -> int:
        return self._upsert(USERS_TABLE, normalize_users(df), "user_id", normalize_users)

    def _upsert(self, name: str, new: pd.DataFrame, key: str, normalize) -> int:
        """Read, merge (new rows win), overwrite in one commit; on a concurrent commit, merge again."""
        from pyiceberg.exceptions import CommitFailedException

        for attempt in range(MAX_COMMIT_ATTEMPTS):
            table = self._load(name)
            old = self._read_small(table, normalize)
            if old is not None and len(old):
                merged = pd.concat([old[~old[key].isin(new[key])], new], ignore_index=True)
            else:
                merged = new
            merged = merged.drop_duplicates(key, keep="last").sort_values(key).reset_index(drop=True)
            arrow = _frame_to_arrow(merged)
            try:
                if table is None:
                    table = self._own_retries(self.catalog_client.create_table_if_not_exists(
                        self._ident(name), schema=arrow.schema, properties=TABLE_PROPERTIES))
                have = {f.name for f in table.schema().fields}
                if any(c not in have for c in arrow.column_names):  # a new user attribute: evolve the schema
                    with table.update_schema() as update:
                        update.union_by_name(arrow.schema)
                    continue  # merge again against the evolved table
                for f in table.schema().fields:  # a column the table has and this frame lacks: nulls
                    if f.name not in arrow.column_names:
                        arrow = arrow.append_column(f.name, pa.nulls(arrow.num_rows, type=pa.string()))
                arrow = arrow.select([f.name for f in table.schema().fields])
                if table.current_snapshot() is None:  # nothing to replace yet (overwrite would warn)
                    table.append(arrow)
                else:
                    table.overwrite(arrow)
            except CommitFailedException:
                _backoff(attempt)
                continue
            return len(merged)
        raise RuntimeError(f"upsert into {name}: {MAX_COMMIT_ATTEMPTS} commits lost to concurrent writers")

    @staticmethod
    def _read_small(table, normalize) -> pd.DataFrame | None:
        if table is None or table.current_snapshot() is None:
            return None
        return normalize(_canonical(table.scan().to_arrow()).to_pandas())

    def catalog(self) -> pd.DataFrame:
        df = self._read_small(self._load(CATALOG_TABLE), normalize_catalog)
        if df is None:
            return normalize_catalog(pd.DataFrame({"item_id": [], "title": [], "description": [], "category": []}))
        df["created_at"] = pd.to_datetime(df["created_at"], utc=True)
        return df

    def users(self) -> pd.DataFrame:
        df = self._read_small(self._load(USERS_TABLE), normalize_users)
        if df is None:
            return pd.DataFrame({"user_id": pd.Series([], dtype="string")})
        return df

    def signature(self) -> tuple:
        """(events snapshot id, catalog snapshot id): changes exactly when a commit changed what a reader sees
        (serving's :class:`serving.storeview.StoreView` polls it instead of a ledger file)."""
        out = []
        for name in (EVENTS_TABLE, CATALOG_TABLE):
            table = self._load(name)
            snap = None if table is None else table.current_snapshot()
            out.append(None if snap is None else snap.snapshot_id)
        return tuple(out)

    def has_catalog(self) -> bool:
        """Whether a catalog was ever upserted (the files store's ``catalog_path.exists()``)."""
        return self._load(CATALOG_TABLE) is not None

    def has_users(self) -> bool:
        return self._load(USERS_TABLE) is not None

    def close(self) -> None:
        """Dispose the catalog's connection pool (tests and short-lived workers)."""
        if self._catalog is not None:
            self._catalog.engine.dispose()
            self._catalog = None
