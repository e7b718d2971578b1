"""Promises of the ingest that hold today and must keep holding (issue 14, "the reliability suite").

Proved elsewhere, not repeated here:

* SIGKILL between the store append and the file move loses and duplicates nothing:
  ``tests/test_ingest.py::test_crash_between_append_and_move_resumes_without_duplicates`` (an
  injected crash) and ``::test_kill_between_append_and_move_in_a_subprocess`` (a real SIGKILL, slow).
"""

from __future__ import annotations

import threading

import pytest

from data_checks.ingest import ingest_all, ingest_batch
from recloop.store import FeedbackStore
from tests.conftest_data_checks import NOW, land, make_events, with_catalog


@pytest.fixture
def dc_settings(settings):
    return with_catalog(settings)


def test_concurrent_appends_of_the_same_event_ids_store_each_once(tmp_path):
    """Three writers append overlapping batches at the same moment: every event_id is stored once.

    Each writer has its own ``FeedbackStore`` (its own lock file descriptor): ``flock`` excludes them
    exactly as it excludes separate processes (the serving API and an ingest flow).
    """
    root = tmp_path / "store"
    events = make_events(400, seed=0)
    go = threading.Barrier(3)
    results, errors = {}, []

    def writer(k):
        rows = events.iloc[k * 100: k * 100 + 200]  # the writers overlap by 100 rows
        store = FeedbackStore(root)
        try:
            go.wait(30)
            results[k] = store.append(rows, batch_id=f"w{k}").n_new
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    stored = FeedbackStore(root).read()
    assert len(stored) == 400 and stored["event_id"].is_unique
    assert sum(results.values()) == 400  # each new id counted by exactly one writer
    assert set(stored["event_id"]) == set(events["event_id"])


def test_concurrent_ingests_of_two_files_with_the_same_events_store_each_once(dc_settings):
    df = make_events(150, seed=4)
    a = land(dc_settings, df, "a.parquet")
    b = land(dc_settings, df.iloc[::-1].reset_index(drop=True), "b.csv")  # same events, other bytes
    outs, errors = {}, []

    def run(path):
        try:
            outs[path.name] = ingest_batch(path, dc_settings, now=NOW)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    stored = FeedbackStore.from_settings(dc_settings).read()
    assert len(stored) == 150 and stored["event_id"].is_unique
    assert sorted(o.n_new for o in outs.values()) == [0, 150]
    for o in outs.values():  # nothing lost either: the later file's copies are held with their reason
        assert o.n_rows == o.n_new + o.n_quarantined


@pytest.mark.parametrize("break_it,reason", [
    (lambda df: df.drop(columns=["label"]), "missing column(s): label"),
    (lambda df: df.assign(timestamp=["not a time"] * len(df)), "timestamp"),
])
def test_a_critical_failure_quarantines_only_its_own_batch(dc_settings, break_it, reason):
    before = land(dc_settings, make_events(100, seed=1), "a-before.parquet")
    broken_df = make_events(100, seed=2)
    broken = land(dc_settings, break_it(broken_df), "b-broken.csv")
    data = broken.read_bytes()
    after = land(dc_settings, make_events(100, seed=3), "c-after.jsonl")
    outs = {o.source: o for o in ingest_all(dc_settings, now=NOW)}
    assert outs[before.name].status == outs[after.name].status == "ingested"
    assert outs[before.name].n_new == outs[after.name].n_new == 100
    bad = outs[broken.name]
    assert bad.status == "quarantined" and bad.n_new == 0 and any(reason in r for r in bad.reasons), bad.reasons
    assert (dc_settings.quarantine_dir / broken.name).read_bytes() == data  # held whole, as delivered
    stored = set(FeedbackStore.from_settings(dc_settings).read()["event_id"])
    assert len(stored) == 200 and not stored & set(broken_df["event_id"])
