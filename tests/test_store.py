"""The files store. The contract both backends share (idempotent appends, in-batch duplicates, the snapshot
hash, catalog and users upserts) runs on files and Iceberg in tests/test_iceberg_store.py."""

import pandas as pd
import pytest

from recloop.store import FeedbackStore, atomic_write_parquet


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






def test_partitioned_by_event_date_and_window_reads(tmp_path):
    store = FeedbackStore(tmp_path / "store")
    store.append(_events(["a", "b"], day="2026-01-05"))
    store.append(_events(["c"], day="2026-01-07"))
    parts = sorted(p.parent.name for p in (tmp_path / "store" / "events").glob("*/*.parquet"))
    assert parts == ["date=2026-01-05", "date=2026-01-07"]
    assert list(store.read(start="2026-01-06")["event_id"]) == ["c"]
    assert list(store.read(end="2026-01-05T10:30:00Z")["event_id"]) == ["a"]
    assert store.read(start="2026-02-01").empty
    assert str(store.read()["timestamp"].dt.tz) == "UTC"


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    store = FeedbackStore(tmp_path / "store")
    store.append(_events(["a"]))
    import recloop.store as mod

    def boom(table, where, *a, **k):
        with open(where, "wb") as fh:
            fh.write(b"PAR1 half a file")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(mod.pq, "write_table", boom)
    with pytest.raises(KeyboardInterrupt):
        store.append(_events(["b"], day="2026-01-09"))
    files = list((tmp_path / "store").rglob("*"))
    assert not [f for f in files if f.name.endswith(".tmp")]
    assert not (tmp_path / "store" / "events" / "date=2026-01-09").exists() or not list(
        (tmp_path / "store" / "events" / "date=2026-01-09").glob("*.parquet"))
    monkeypatch.undo()
    assert list(store.read()["event_id"]) == ["a"]


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "x.parquet"
    atomic_write_parquet(pd.DataFrame({"a": [1]}), path)
    atomic_write_parquet(pd.DataFrame({"a": [2, 3]}), path)
    assert list(pd.read_parquet(path)["a"]) == [2, 3]




def test_ledger_survives_a_torn_line(tmp_path):
    store = FeedbackStore(tmp_path / "store")
    store.append(_events(["a"]), batch_id="b1")
    with store.ledger_path.open("a") as fh:
        fh.write('{"batch_id": "b2", "n_ne')
    assert [r["batch_id"] for r in store.ledger()] == ["b1"]
