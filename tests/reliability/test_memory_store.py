"""Issue 14, item 7 (memory): store reads push down partitions, columns and row groups.

A windowed read opens only the row groups whose ``timestamp`` statistics overlap the window and
only the columns asked for, and returns exactly what a full read filtered afterwards returns.
``time_range`` answers from the Parquet statistics without reading data; ``stored_among`` checks a
batch's ids part by part instead of loading every stored id.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import recloop.store as store_mod
from recloop.store import FeedbackStore

T0 = pd.Timestamp("2026-03-02T00:00:00Z")


def _events(n: int, day_offset: int = 0, prefix: str = "e", seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    secs = np.sort(rng.integers(0, 86_400, n))
    ts = T0 + pd.Timedelta(days=day_offset) + pd.to_timedelta(secs, unit="s")
    etype = rng.choice(["impression", "click", "like"], n)
    return pd.DataFrame({
        "event_id": [f"{prefix}-{day_offset}-{k:05d}" for k in range(n)],
        "user_id": [f"u{u}" for u in rng.integers(0, 30, n)],
        "item_id": [f"i{i}" for i in rng.integers(0, 20, n)],
        "event_type": etype, "label": (etype != "impression").astype(int), "timestamp": ts,
        "query": np.where(rng.random(n) < 0.2, "jazz", None),
    })


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "PART_ROW_GROUP_ROWS", 50, raising=False)  # 400 rows a day -> 8 time-ordered row groups
    s = FeedbackStore(tmp_path / "store")
    s.append(_events(400, 0), batch_id="d0")
    s.append(_events(400, 1, seed=1), batch_id="d1")
    s.append(_events(100, 1, prefix="late", seed=2), batch_id="d1-late")  # a second part on day 1
    return s


@pytest.fixture
def reads(monkeypatch):
    """Every Parquet data read: ('groups', file, row groups, columns) or ('file', file, None, columns)."""
    calls = []
    real_groups, real_read, real_table = pq.ParquetFile.read_row_groups, pq.ParquetFile.read, pq.read_table

    def read_row_groups(self, row_groups, columns=None, *a, **k):
        calls.append(("groups", None, list(row_groups), None if columns is None else list(columns)))
        return real_groups(self, row_groups, columns, *a, **k)

    def read(self, columns=None, *a, **k):
        calls.append(("file", None, None, None if columns is None else list(columns)))
        return real_read(self, columns, *a, **k)

    def read_table(source, *a, **k):
        calls.append(("table", str(source), None, k.get("columns")))
        return real_table(source, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", read_row_groups)
    monkeypatch.setattr(pq.ParquetFile, "read", read)
    monkeypatch.setattr(pq, "read_table", read_table)
    return calls


def test_window_read_skips_row_groups_outside_the_window_and_reads_only_asked_columns(store, reads):
    full = store.read()
    start, end = T0 + pd.Timedelta(hours=30), T0 + pd.Timedelta(hours=33)  # a slice of day 1
    reads.clear()
    got = store.read(start, end, columns=["user_id", "label"])

    want = full[(full["timestamp"] >= start) & (full["timestamp"] < end)][["user_id", "label"]]
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))
    assert len(got) > 0
    # day 0 is never opened; of day 1's parts only the row groups overlapping 06:00-09:00 are read
    groups = [c for c in reads if c[0] == "groups"]
    assert groups and not [c for c in reads if c[0] in ("file", "table")]
    assert sum(len(c[2]) for c in groups) <= 4  # of 8 + 2 row groups on day 1
    assert all(set(c[3]) == {"user_id", "label", "timestamp", "event_id"} for c in groups)


def test_pushdown_reads_equal_a_full_read_then_filter(store):
    full = store.read()
    for start, end, cols in [(None, None, None), (T0 + pd.Timedelta(hours=5), None, ["item_id"]),
                             (None, T0 + pd.Timedelta(hours=26, minutes=7), ["event_id", "timestamp"]),
                             (T0 + pd.Timedelta(hours=23), T0 + pd.Timedelta(hours=25), None),
                             (T0 + pd.Timedelta(days=9), None, ["label"])]:
        got = store.read(start, end, columns=cols)
        keep = np.ones(len(full), dtype=bool)
        if start is not None:
            keep &= (full["timestamp"] >= start).to_numpy()
        if end is not None:
            keep &= (full["timestamp"] < end).to_numpy()
        want = full[keep].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want[cols] if cols else want)
    table = store.read_table(T0 + pd.Timedelta(hours=23), T0 + pd.Timedelta(hours=25), ["event_id"])
    assert table.column_names == ["event_id"] and table.num_rows == len(
        store.read(T0 + pd.Timedelta(hours=23), T0 + pd.Timedelta(hours=25)))
    assert sum(t.num_rows for t in store.scan()) == store.count() == 900  # one table per part, streamed


def test_time_range_reads_statistics_not_data(store, reads):
    full = store.read()
    reads.clear()
    assert store.time_range() == (full["timestamp"].min(), full["timestamp"].max())
    assert reads == []  # answered from the row-group statistics


def test_stored_among_equals_the_set_of_all_ids_intersected(store, monkeypatch):
    ids = ["e-0-00007", "late-1-00099", "nope", "e-1-00399", None, "e-0-00007"]
    want = {"e-0-00007", "late-1-00099", "e-1-00399"}
    assert store.stored_among(ids) == want == {i for i in ids if i} & store.event_ids()
    assert store.stored_among(pd.Series(ids, dtype="string")) == want
    monkeypatch.setattr(store_mod, "_SMALL_BATCH_IDS", 2, raising=False)  # the large-batch path
    assert store.stored_among(ids) == want
    assert store.stored_among([]) == set()
    res = store.append(_events(5, 0), batch_id="again")  # append checks ids part by part: still idempotent
    assert (res.n_new, res.n_duplicate) == (0, 5)
