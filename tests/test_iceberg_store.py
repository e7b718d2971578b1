"""The Iceberg feedback store keeps the files store's contract (SQLite catalog + a local warehouse).

The contract tests run against both backends; the Iceberg-only ones pin what the table format adds:
partition pruning in the scan plan, exactly-once under a commit conflict, the ledger in the commit.
The same store on PostgreSQL + SeaweedFS, across processes: tests/services/test_iceberg_services.py.
"""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from recloop.iceberg_store import IcebergFeedbackStore, sqlalchemy_url
from recloop.store import FeedbackStore


def _events(ids, day="2026-01-05", labels=None):
    n = len(ids)
    return pd.DataFrame({
        "event_id": ids,
        "user_id": ["u1"] * n,
        "item_id": ["i1"] * n,
        "event_type": ["click"] * n,
        "label": labels or [1] * n,
        "timestamp": pd.date_range(f"{day}T10:00:00Z", periods=n, freq="h"),
    })


def iceberg_at(root, name="s") -> IcebergFeedbackStore:
    root.mkdir(parents=True, exist_ok=True)
    return IcebergFeedbackStore(f"sqlite:///{root / (name + '.db')}", (root / f"{name}-wh").as_uri())


@pytest.fixture(params=["files", "iceberg"])
def make_store(request, tmp_path):
    made = []

    def make(name="s"):
        if request.param == "files":
            return FeedbackStore(tmp_path / name)
        s = iceberg_at(tmp_path, name)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# ---- the contract, on both backends ---------------------------------------------------------------------
def test_append_is_idempotent(make_store):
    store = make_store()
    first = store.append(_events(["a", "b", "c"]), batch_id="b1")
    again = store.append(_events(["a", "b", "c"]), batch_id="b1")
    assert (first.n_new, first.n_duplicate) == (3, 0)
    assert (again.n_new, again.n_duplicate) == (0, 3)
    assert store.count() == 3
    assert sorted(store.read()["event_id"]) == ["a", "b", "c"]
    assert store.stored_among(["a", "zz", None]) == {"a"} and store.event_ids() == {"a", "b", "c"}


def test_duplicates_inside_a_batch_keep_the_first(make_store):
    store = make_store()
    res = store.append(_events(["a", "a", "b"], labels=[1, 0, 1]))
    assert (res.n_new, res.n_duplicate) == (2, 1)
    assert store.read().set_index("event_id").loc["a", "label"] == 1


def test_window_reads_and_column_lists(make_store):
    store = make_store()
    store.append(_events(["a", "b"], day="2026-01-05"))
    store.append(_events(["c"], day="2026-01-07"))
    assert list(store.read(start="2026-01-06")["event_id"]) == ["c"]
    assert list(store.read(end="2026-01-05T10:30:00Z")["event_id"]) == ["a"]
    assert list(store.read(start="2026-01-05T11:00:00Z", end="2026-01-07T10:00:00Z")["event_id"]) == ["b"]
    assert store.read(start="2026-02-01").empty
    df = store.read()
    assert str(df["timestamp"].dtype) == "datetime64[ns, UTC]" and str(df["label"].dtype) == "int8"
    t = store.read_table(start="2026-01-06", columns=["user_id", "label"])
    assert t.column_names == ["user_id", "label"] and t.num_rows == 1
    assert sum(x.num_rows for x in store.scan(columns=["timestamp"])) == 3
    lo, hi = store.time_range()
    assert (lo, hi) == (pd.Timestamp("2026-01-05T10:00Z"), pd.Timestamp("2026-01-07T10:00Z"))


def test_snapshot_hash_is_stable_and_content_sensitive(make_store):
    s1, s2 = make_store("s1"), make_store("s2")
    s1.append(_events(["a", "b"]), batch_id="x")
    s2.append(_events(["b"]))
    s2.append(_events(["a", "b"]))  # same content, different arrival order
    assert s1.snapshot().hash == s2.snapshot().hash
    assert s1.snapshot().hash == s1.snapshot().hash
    s2.append(_events(["z"], day="2026-01-06"))
    assert s1.snapshot().hash != s2.snapshot().hash
    assert s1.snapshot().batch_ids == ["x"]
    assert s1.snapshot(end="2026-01-05T10:30:00Z").n_events == 1


def test_catalog_and_users_upsert(make_store):
    store = make_store()
    assert store.catalog().empty and store.users().empty
    store.upsert_catalog(pd.DataFrame({"item_id": ["i1", "i2"], "title": ["A", "B"], "description": ["", ""],
                                       "category": ["x", "y"]}))
    store.upsert_catalog(pd.DataFrame({"item_id": ["i2"], "title": ["B2"], "description": [""], "category": ["y"]}))
    cat = store.catalog().set_index("item_id")
    assert cat.loc["i2", "title"] == "B2" and len(cat) == 2
    assert str(store.catalog()["created_at"].dtype) == "datetime64[ns, UTC]"
    store.upsert_users(pd.DataFrame({"user_id": ["u1"], "gender": ["female"]}))
    store.upsert_users(pd.DataFrame({"user_id": ["u2"], "gender": ["male"], "age_bucket": ["18-24"]}))
    users = store.users().set_index("user_id")
    assert users.loc["u1", "gender"] == "female" and users.loc["u2", "age_bucket"] == "18-24"


def test_the_catalog_enters_the_snapshot_hash(make_store):
    store = make_store()
    store.append(_events(["a"]))
    before = store.snapshot().hash
    store.upsert_catalog(pd.DataFrame({"item_id": ["i9"], "title": ["T"], "description": [""], "category": ["x"]}))
    assert store.snapshot().hash != before


# ---- what the table format adds ------------------------------------------------------------------------
def test_the_hash_is_the_same_in_both_backends(tmp_path):
    files, ice = FeedbackStore(tmp_path / "files"), iceberg_at(tmp_path)
    for s in (files, ice):
        s.append(_events(["a", "b"], labels=[1, 0]), batch_id="x")
        s.append(_events(["c"], day="2026-01-06"), batch_id="y")
    assert ice.snapshot().hash == files.snapshot().hash
    assert ice.snapshot(start="2026-01-06").hash == files.snapshot(start="2026-01-06").hash


def test_a_time_window_prunes_day_partitions_in_the_scan_plan(tmp_path):
    store = iceberg_at(tmp_path)
    for d in range(5, 10):
        store.append(_events([f"e{d}a", f"e{d}b"], day=f"2026-01-0{d}"))
    every = store.parts()
    window = store.parts(start="2026-01-07", end="2026-01-08")
    assert len(every) == 5 and len(window) == 1 and "timestamp_day=2026-01-07" in window[0]
    table = store.events_table()
    planned = list(table.scan(row_filter=__import__("recloop.iceberg_store", fromlist=["x"])._window_filter(
        pd.Timestamp("2026-01-07", tz="UTC"), pd.Timestamp("2026-01-08", tz="UTC"))).plan_files())
    assert len(planned) == 1  # the planner, not a filter after reading, drops the other days
    assert list(store.read(start="2026-01-07", end="2026-01-08")["event_id"]) == ["e7a", "e7b"]


def test_append_result_names_its_data_files_and_the_ledger_is_in_the_commit(tmp_path):
    store = iceberg_at(tmp_path)
    res = store.append(_events(["a", "b"], day="2026-01-05").pipe(
        lambda d: pd.concat([d, _events(["c"], day="2026-01-06")])), batch_id="b1")
    assert len(res.parts) == 2 and all(p.endswith(".parquet") for p in res.parts)
    assert [t.num_rows for t in store.scan(parts=res.parts[:1])] == [2]
    store.append(_events(["a"]), batch_id="b2")  # nothing new, still a ledger row (as in the files store)
    rows = store.ledger()
    assert [(r["batch_id"], r["n_new"], r["n_duplicate"]) for r in rows] == [("b1", 3, 0), ("b2", 0, 1)]


def _race(store_a, store_b, batch_a, batch_b):
    """store_a checks its ids, then store_b commits an overlapping batch before store_a commits."""
    real = store_a._stored_among
    fired = []

    def check_then_lose_the_race(table, ids):
        found = real(table, ids)
        if not fired:
            fired.append(True)
            store_b.append(batch_b, batch_id="B")
        return found

    store_a._stored_among = check_then_lose_the_race
    return store_a.append(batch_a, batch_id="A")


def test_a_commit_conflict_rechecks_the_ids_so_each_event_is_stored_once(tmp_path):
    a, b = iceberg_at(tmp_path), iceberg_at(tmp_path)
    a.append(_events(["seed"]))
    res = _race(a, b, _events(["x1", "x2", "x3"]), _events(["x2", "x3", "x4"]))
    ids = list(a.read()["event_id"])
    assert sorted(ids) == ["seed", "x1", "x2", "x3", "x4"]  # each exactly once
    assert (res.n_new, res.n_duplicate) == (1, 2)
    assert [r["batch_id"] for r in a.ledger()] == [None, "B", "A"]


def test_pyicebergs_own_retry_would_store_the_overlap_twice(tmp_path):
    """Why tables are created with ``commit.retry.num-retries = 0``: with pyiceberg's default rebase-retry
    the same race stores x2 and x3 twice. (Fails if pyiceberg stops rebasing fast appends: then the
    property is no longer needed, and this test says so.)"""
    import recloop.iceberg_store as mod

    a, b = iceberg_at(tmp_path), iceberg_at(tmp_path)
    a.append(_events(["seed"]))
    with a.events_table().transaction() as tx:
        tx.set_properties(**{"commit.retry.num-retries": "4", "commit.retry.min-wait-ms": "1"})
    a._own_retries = lambda table: table  # keep the default behaviour for this demonstration

    orig_append = mod.IcebergFeedbackStore.append
    a.append = lambda df, batch_id=None: orig_append(a, df, batch_id)
    _race(a, b, _events(["x1", "x2", "x3"]), _events(["x2", "x3", "x4"]))
    ids = list(a.read()["event_id"])
    assert sorted(ids) == ["seed", "x1", "x2", "x2", "x3", "x3", "x4"]


def test_a_table_made_elsewhere_with_retries_on_is_switched_to_ours(tmp_path):
    store = iceberg_at(tmp_path)
    with store.events_table().transaction() as tx:
        tx.set_properties(**{"commit.retry.num-retries": "4"})
    assert iceberg_at(tmp_path).events_table().properties["commit.retry.num-retries"] == "0"


def test_from_settings_dispatches_on_services_store(settings, tmp_path):
    assert type(FeedbackStore.from_settings(settings)) is FeedbackStore  # the embedded default is untouched
    sv = settings.services.model_copy(update={"store": "iceberg",
                                               "iceberg_catalog_url": f"sqlite:///{tmp_path / 'c.db'}"})
    s = settings.model_copy(update={"services": sv})
    store = FeedbackStore.from_settings(s)
    assert isinstance(store, IcebergFeedbackStore) and store.warehouse.startswith("file://")
    store.append(_events(["a"]), batch_id="b")
    assert FeedbackStore.from_settings(s).count() == 1
    store.close()


def test_from_settings_without_a_catalog_url_says_what_to_set(settings):
    sv = settings.services.model_copy(update={"store": "iceberg"})
    with pytest.raises(ValueError, match="iceberg_catalog_url"):
        FeedbackStore.from_settings(settings.model_copy(update={"services": sv}))


def test_s3_settings_become_the_warehouse_and_fileio_properties(settings):
    sv = settings.services.model_copy(update={
        "store": "iceberg", "database_url": "postgresql://u:p@127.0.0.1:5/db", "s3_bucket": "bk",
        "s3_prefix": "team-a", "s3_endpoint": "http://127.0.0.1:8333", "s3_access_key": "k", "s3_secret_key": "SECRET-VALUE"})
    store = IcebergFeedbackStore.from_settings(settings.model_copy(update={"services": sv}))
    assert store.warehouse == "s3://bk/team-a/warehouse" and store.namespace == "team_a"
    assert store.catalog_url == "postgresql+psycopg://u:p@127.0.0.1:5/db"
    assert store.io_properties["s3.endpoint"] == "http://127.0.0.1:8333"
    assert store.io_properties["s3.access-key-id"] == "k" and "SECRET-VALUE" not in repr(store)
    assert sqlalchemy_url("sqlite:///x.db") == "sqlite:///x.db"


# ---- landing on object storage (ingest), with a tiny local stand-in for the bucket -------------------------
class FolderObjectStore:
    """The :class:`recloop.objectstore.ObjectStore` interface over a folder: enough to test ingest's steps
    fast. The real bucket (SeaweedFS) runs the same steps in tests/services/test_iceberg_services.py."""

    def __init__(self, root):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _p(self, key):
        return self.root / key

    def url(self, key=""):
        return f"s3://fake/{key}"

    def put_file(self, key, path):
        self.put_bytes(key, path.read_bytes())

    def put_bytes(self, key, data):
        self._p(key).parent.mkdir(parents=True, exist_ok=True)
        self._p(key).write_bytes(data)

    def get_file(self, key, dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self._p(key).read_bytes())
        return dest

    def get_bytes(self, key):
        return self._p(key).read_bytes()

    def list(self, prefix=""):
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*")
                      if p.is_file() and str(p.relative_to(self.root)).startswith(prefix))

    def exists(self, key):
        return self._p(key).is_file()

    def move(self, src, dst):
        self.put_bytes(dst, self.get_bytes(src))
        self.delete(src)

    def delete(self, key):
        self._p(key).unlink(missing_ok=True)


def _iceberg_settings(workspace, catalog_db):
    from recloop.settings import load_settings

    s = load_settings(workspace).ensure_dirs()
    s.checks.data_docs = False
    sv = s.services.model_copy(update={"store": "iceberg", "iceberg_catalog_url": f"sqlite:///{catalog_db}"})
    return s.model_copy(update={"services": sv})


@pytest.fixture
def bucket_world(settings, tmp_path, monkeypatch):
    """Two share-nothing workspaces (A, B), one Iceberg store (one catalog), one bucket stand-in."""
    import data_checks.ingest as ingest_mod
    import data_checks.quarantine as quarantine_mod
    from tests.conftest_data_checks import make_catalog

    bucket = FolderObjectStore(tmp_path / "bucket")
    monkeypatch.setattr(ingest_mod.ObjectStore, "from_settings", classmethod(lambda cls, s: bucket))
    registered = []
    monkeypatch.setattr(quarantine_mod, "register_entry", lambda s, entry: registered.append(entry), raising=False)
    a = _iceberg_settings(tmp_path / "wA", tmp_path / "catalog.db")
    b = _iceberg_settings(tmp_path / "wB", tmp_path / "catalog.db")
    FeedbackStore.from_settings(a).upsert_catalog(make_catalog())
    yield a, b, bucket, registered


def _put_batch(bucket, df, name, tmp_path):
    from recloop.datasets.batches import write_batch

    local = write_batch(df, tmp_path / "outbox" / name)
    bucket.put_file(f"landing/{name}", local)


def test_landing_objects_are_stored_and_moved_to_processed(bucket_world, tmp_path):
    from data_checks.ingest import ingest_all, pending_objects
    from tests.conftest_data_checks import NOW, make_events

    a, _, bucket, registered = bucket_world
    _put_batch(bucket, make_events(80, seed=1), "b1.parquet", tmp_path)
    outs = ingest_all(a, now=NOW)
    assert [(o.status, o.n_new) for o in outs] == [("ingested", 80)]
    assert FeedbackStore.from_settings(a).count() == 80
    assert pending_objects(a) == [] and bucket.exists("processed/b1.parquet")
    assert json.loads(bucket.get_bytes("processed/b1.parquet.validation.json"))["outcome"]["status"] == "ingested"
    assert outs[0].destination == "s3://fake/processed/b1.parquet" and registered == []
    assert not (a.processed_dir / "b1.parquet").exists()  # the bucket holds it; no local pile-up


def test_a_bad_landing_object_goes_to_the_quarantine_prefix_with_its_reason(bucket_world, tmp_path):
    from data_checks.ingest import ingest_all
    from tests.conftest_data_checks import NOW, make_events

    a, _, bucket, registered = bucket_world
    bad = make_events(40, seed=2).rename(columns={"item_id": "product"})
    _put_batch(bucket, bad, "bad.csv", tmp_path)
    mixed = make_events(60, seed=3)
    mixed.loc[[1, 2], "item_id"] = "item-unknown"
    _put_batch(bucket, mixed, "mixed.parquet", tmp_path)
    outs = {o.source: o for o in ingest_all(a, now=NOW)}
    assert outs["bad.csv"].status == "quarantined" and bucket.exists("quarantine/bad.csv")
    doc = json.loads(bucket.get_bytes("quarantine/bad.csv.validation.json"))
    assert "missing column(s): item_id" in doc["outcome"]["reasons"][0]
    assert outs["mixed.parquet"].status == "partial" and bucket.exists("processed/mixed.parquet")
    rows = pd.read_parquet(io.BytesIO(bucket.get_bytes("quarantine/mixed.rejected.parquet")))
    assert sorted(rows["event_id"]) == sorted(mixed.loc[[1, 2], "event_id"])  # nothing lost: 58 stored + 2 here
    assert FeedbackStore.from_settings(a).count() == 58
    assert {(e["kind"], e["key"]) for e in registered} == {("batch", "quarantine/bad.csv"),
                                                           ("rows", "quarantine/mixed.rejected.parquet")}
    assert [k for k in bucket.list("landing/")] == []


def test_another_machine_resumes_a_crashed_ingest_with_the_same_verdict(bucket_world, tmp_path, monkeypatch):
    """A validates and appends, then dies before the move; B (no shared disk) finishes from the bucket's
    verdict: no "already stored" quarantine, every event once. Without the mirrored state B would re-validate,
    see its own events as stored and quarantine the batch."""
    import data_checks.ingest as ingest_mod
    from data_checks.ingest import ingest_all
    from tests.conftest_data_checks import NOW, make_events

    a, b, bucket, registered = bucket_world
    _put_batch(bucket, make_events(50, seed=4), "day.parquet", tmp_path)

    def boom():
        raise RuntimeError("machine A lost power after the append")

    monkeypatch.setattr(ingest_mod, "_AFTER_APPEND", boom)
    with pytest.raises(RuntimeError, match="lost power"):
        ingest_all(a, now=NOW)
    monkeypatch.setattr(ingest_mod, "_AFTER_APPEND", None)
    assert bucket.exists("landing/day.parquet") and FeedbackStore.from_settings(b).count() == 50
    (out,) = ingest_all(b, now=NOW)
    assert out.resumed and out.status == "ingested" and (out.n_new, out.n_duplicate) == (0, 50)
    assert bucket.exists("processed/day.parquet") and registered == []
    assert FeedbackStore.from_settings(b).count() == 50


def test_objects_with_the_same_name_never_overwrite_each_other(bucket_world, tmp_path):
    from data_checks.ingest import ingest_all
    from tests.conftest_data_checks import NOW, make_events

    a, b, bucket, _ = bucket_world
    _put_batch(bucket, make_events(10, seed=5, prefix="x"), "feedback.csv", tmp_path)
    ingest_all(a, now=NOW)
    _put_batch(bucket, make_events(10, seed=6, prefix="y"), "feedback.csv", tmp_path)
    ingest_all(b, now=NOW)
    processed = [k for k in bucket.list("processed/") if not k.endswith(".json")]
    assert len(processed) == 2 and "processed/feedback.csv" in processed
    assert FeedbackStore.from_settings(a).count() == 20


# ---- serving's view follows the table store's commits -------------------------------------------------
def test_serving_store_view_follows_iceberg_commits(tmp_path):
    from serving.storeview import StoreView

    store = iceberg_at(tmp_path)
    store.upsert_catalog(pd.DataFrame({"item_id": ["i1", "i2"], "title": ["A", "B"], "description": ["", ""],
                                       "category": ["c", "c"]}))
    store.append(_events(["a", "b"]), batch_id="b1")
    view = StoreView(store)
    assert view.refresh() is True
    assert len(view.data.events) == 2
    assert view.refresh() is False  # no new commit: no work
    more = _events(["c", "d", "e"], day="2026-01-06").assign(item_id="i2")
    store.append(more, batch_id="b2")
    assert view.refresh() is True  # a new commit: only its new data file is read
    assert len(view.data.events) == 5 and view.data.shown["i2"] == 3
    store.upsert_catalog(pd.DataFrame({"item_id": ["i3"], "title": ["C"], "description": [""], "category": ["c"]}))
    assert view.refresh() is True and "i3" in view.data.catalog.index
    store.close()
