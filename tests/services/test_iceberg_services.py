"""The Iceberg feedback store and object-storage landing on real PostgreSQL + SeaweedFS (slow tier).

Two processes that share nothing but the services append overlapping batches at the same time; a time
window is pruned in the scan plan on S3; ingest reads ``landing/`` from the bucket, stores, and moves each
object to ``processed/`` or ``quarantine/`` (registered in PostgreSQL).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from tests.services.conftest import services_fields

pytestmark = pytest.mark.slow
import pyiceberg  # noqa: F401  (a dev dependency: missing = an error, not a skip)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ice_settings(tmp_path, monkeypatch, pg_url, s3_server, s3_bucket):
    for key in list(os.environ):
        if key.startswith("RECLOOP_"):
            monkeypatch.delenv(key)
    from recloop.settings import load_settings

    s = load_settings(tmp_path / "ws", services=services_fields(pg_url, s3_server, s3_bucket, store="iceberg"))
    s.checks.data_docs = False
    return s.ensure_dirs()


def _env_for(settings) -> dict:
    """The services settings as RECLOOP_SERVICES__* variables for a child process (no file holds them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECLOOP_")}
    for name, value in settings.services.model_dump().items():
        if value is not None:
            env[f"RECLOOP_SERVICES__{name.upper()}"] = str(value)
    env["PYTHONPATH"] = str(REPO)
    return env


WRITER = textwrap.dedent("""
    import json, logging, os, sys, time
    import pandas as pd
    from recloop.settings import load_settings
    from recloop.store import FeedbackStore

    workspace, who, barrier, n_batches = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    conflicts = []
    class Count(logging.Handler):
        def emit(self, record):
            if "concurrent commit" in record.getMessage():
                conflicts.append(1)
    log = logging.getLogger("recloop.iceberg_store")
    log.setLevel(logging.INFO)
    log.addHandler(Count())
    store = FeedbackStore.from_settings(load_settings(workspace))
    store.events_table()  # connect and load before the start line, so both processes race on the commits
    open(f"{barrier}/ready-{who}", "w").close()
    while not all(os.path.exists(f"{barrier}/ready-{w}") for w in (0, 1)):  # a start line, not a timing
        time.sleep(0.01)
    results = []
    for j in range(n_batches):
        lo = j * 40 + who * 20  # process 0: ids 40j..40j+39, process 1: 40j+20..40j+59 (half overlap)
        ids = [f"e{k:05d}" for k in range(lo, lo + 40)]
        df = pd.DataFrame({"event_id": ids, "user_id": "u", "item_id": "i", "event_type": "click", "label": 1,
                           "timestamp": pd.Timestamp("2026-01-05T00:00Z") + pd.to_timedelta(
                               [int(i[1:]) for i in ids], unit="min")})
        r = store.append(df, batch_id=f"w{who}-{j}")
        results.append([r.n_new, r.n_duplicate])
    print(json.dumps({"results": results, "conflicts": len(conflicts)}))
""")


def test_two_processes_appending_overlapping_batches_store_each_event_once(ice_settings, tmp_path):
    from recloop.store import FeedbackStore

    store = FeedbackStore.from_settings(ice_settings)
    store.events_table()  # created once up front (concurrent creation is covered by the catalog's unique key)
    n_batches, env = 6, _env_for(ice_settings)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / f"w{who}"), str(who), str(tmp_path),
                               str(n_batches)], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for who in (0, 1)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    ids = store.read(columns=["event_id"])["event_id"]
    expected = {f"e{k:05d}" for k in range((n_batches - 1) * 40 + 60)}
    assert not ids.duplicated().any(), ids[ids.duplicated()].tolist()[:10]  # exactly once ...
    assert set(ids) == expected  # ... and nothing lost
    assert sum(n for o in outs for n, _ in o["results"]) == len(expected) == store.count()
    ledger = store.ledger()
    assert sorted(r["batch_id"] for r in ledger) == sorted(f"w{w}-{j}" for w in (0, 1) for j in range(n_batches))
    print("commit conflicts retried:", [o["conflicts"] for o in outs])


def test_a_time_window_is_pruned_in_the_scan_plan_on_s3(ice_settings):
    from recloop.iceberg_store import _window_filter
    from recloop.store import FeedbackStore

    store = FeedbackStore.from_settings(ice_settings)
    days = pd.date_range("2026-01-05T10:00Z", periods=5, freq="D")
    store.append(pd.DataFrame({"event_id": [f"e{i}" for i in range(5)], "user_id": "u", "item_id": "i",
                               "event_type": "click", "label": 1, "timestamp": days}), batch_id="five-days")
    table = store.events_table()
    every = list(table.scan().plan_files())
    window = list(table.scan(row_filter=_window_filter(pd.Timestamp("2026-01-07", tz="UTC"),
                                                       pd.Timestamp("2026-01-08", tz="UTC"))).plan_files())
    assert len(every) == 5 and len(window) == 1  # fewer data files planned than exist
    assert window[0].file.file_path.startswith(f"s3://{ice_settings.services.s3_bucket}/recloop/warehouse/")
    t = store.read_table(start="2026-01-07", end="2026-01-08", columns=["event_id"])
    assert t.column_names == ["event_id"] and t.column(0).to_pylist() == ["e2"]
    assert store.snapshot().n_events == 5 and store.snapshot().batch_ids == ["five-days"]


def test_ingest_from_the_landing_prefix_stores_moves_and_quarantines(ice_settings, s3_server):
    from data_checks.ingest import ingest_all
    from data_checks.quarantine import list_quarantine
    from recloop.datasets.batches import write_batch
    from recloop.objectstore import ObjectStore
    from recloop.store import FeedbackStore
    from tests.conftest_data_checks import NOW, make_catalog, make_events

    FeedbackStore.from_settings(ice_settings).upsert_catalog(make_catalog())
    bucket = ObjectStore.from_settings(ice_settings)
    outbox = ice_settings.root / "outbox"
    good, bad = make_events(60, seed=1), make_events(30, seed=2).rename(columns={"item_id": "product"})
    for df, name in ((good, "good.parquet"), (bad, "bad.csv")):
        bucket.put_file(f"landing/{name}", write_batch(df, outbox / name))
    outs = {o.source: o for o in ingest_all(ice_settings, now=NOW)}
    assert outs["good.parquet"].status == "ingested" and outs["bad.csv"].status == "quarantined"
    store = FeedbackStore.from_settings(ice_settings)
    assert set(store.read()["event_id"]) == set(good["event_id"])
    keys = bucket.list("")
    assert not [k for k in keys if k.startswith("landing/")]  # nothing left behind ...
    assert "processed/good.parquet" in keys and "quarantine/bad.csv" in keys  # ... and nothing lost
    assert bucket.get_bytes("quarantine/bad.csv") == (outbox / "bad.csv").read_bytes()  # kept as delivered
    doc = json.loads(bucket.get_bytes("quarantine/bad.csv.validation.json"))
    assert "missing column(s): item_id" in doc["outcome"]["reasons"][0]
    entries = [e for e in list_quarantine(ice_settings) if e.get("key") == "quarantine/bad.csv"]
    assert len(entries) == 1 and entries[0]["id"] == outs["bad.csv"].batch_id  # the registry in PostgreSQL
    state = [k for k in keys if k.startswith("state/ingest/")]
    assert len(state) == 2  # verdicts mirrored for another machine to resume from
    assert pd.read_parquet(io.BytesIO(bucket.get_bytes("processed/good.parquet"))).shape[0] == 60


def test_a_missing_bucket_and_wrong_credentials_say_what_to_fix(ice_settings, s3_server):
    from recloop.objectstore import ObjectStore, ObjectStoreError

    sv = ice_settings.services
    missing = ObjectStore.from_settings(ice_settings.model_copy(update={
        "services": sv.model_copy(update={"s3_bucket": "no-such-bucket-here"})}))
    with pytest.raises(ObjectStoreError, match="does not exist"):
        missing.put_bytes("landing/x.csv", b"x")
    wrong = ObjectStore.from_settings(ice_settings.model_copy(update={
        "services": sv.model_copy(update={"s3_secret_key": "not-the-key"})}))
    with pytest.raises(ObjectStoreError, match="refused the credentials"):
        wrong.put_bytes("landing/x.csv", b"x")
