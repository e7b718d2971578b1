"""Ingest of landing files: every failure has a reason, nothing is lost, nothing is stored twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import data_checks.ingest as ingest_mod
from data_checks.ingest import ingest_all, ingest_batch, pending_batches, sidecar_path
from data_checks.quarantine import list_quarantine, release
from recloop.store import FeedbackStore
from tests.conftest_data_checks import NOW, land, make_catalog, make_events, with_catalog


@pytest.fixture
def dc_settings(settings):
    return with_catalog(settings)


REPO = Path(__file__).resolve().parent.parent


def store_of(settings) -> FeedbackStore:
    return FeedbackStore.from_settings(settings)


def sidecar(path) -> dict:
    return json.loads(sidecar_path(Path(path)).read_text())


def test_clean_files_in_every_format_are_ingested(dc_settings):
    for k, fmt in enumerate(("parquet", "csv", "jsonl")):
        land(dc_settings, make_events(100, seed=k), f"b{k}.{fmt}")
    outs = ingest_all(dc_settings, now=NOW)
    assert [o.status for o in outs] == ["ingested"] * 3, [o.reasons for o in outs]
    assert [o.n_new for o in outs] == [100, 100, 100]
    assert store_of(dc_settings).count() == 300
    assert pending_batches(dc_settings) == []
    for o in outs:
        assert Path(o.destination).parent == dc_settings.processed_dir and Path(o.destination).exists()
        doc = sidecar(o.destination)
        assert doc["outcome"]["status"] == "ingested" and doc["validation"]["decision"] == "pass"
    stored = store_of(dc_settings).read()
    assert str(stored["timestamp"].dtype) == "datetime64[ns, UTC]" and set(stored["label"]) <= {0, 1}


@pytest.mark.parametrize("name,content,reason", [
    ("zero.csv", b"", "zero-byte"),
    ("header_only.csv", b"event_id,user_id,item_id,event_type,label,timestamp\n", "no rows"),
    ("blank.jsonl", b"\n  \n", "empty file"),
    ("latin1.csv", "event_id,user_id,item_id,event_type,label,timestamp\ne1,u1,café,click,1,"
                   "2026-01-01T00:00:00Z\n".encode("latin-1"), "not UTF-8"),
    ("broken.jsonl", b'{"event_id": "e1"}\n{"event_id": \n', "malformed JSONL at line 2"),
    ("notes.txt", b"hello", "unsupported file type"),
])
def test_unreadable_files_are_quarantined_with_a_reason(dc_settings, name, content, reason):
    path = dc_settings.landing_dir / name
    path.write_bytes(content)
    out = ingest_batch(path, dc_settings, now=NOW)
    assert out.status == "quarantined" and reason in out.reasons[0], out.reasons
    assert not path.exists() and (dc_settings.quarantine_dir / name).read_bytes() == content  # kept as delivered
    assert sidecar(dc_settings.quarantine_dir / name)["outcome"]["reasons"] == out.reasons
    assert store_of(dc_settings).count() == 0


def test_empty_and_truncated_parquet(dc_settings):
    land(dc_settings, make_events(5).iloc[:0], "empty.parquet")
    full = land(dc_settings, make_events(300), "cut.parquet")
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])  # a transfer that stopped half-way
    outs = {o.source: o for o in ingest_all(dc_settings, now=NOW)}
    assert outs["empty.parquet"].status == "quarantined" and "no rows" in outs["empty.parquet"].reasons[0]
    assert outs["cut.parquet"].status == "quarantined"
    assert "unreadable Parquet" in outs["cut.parquet"].reasons[0]
    assert store_of(dc_settings).count() == 0


def test_wrong_schema_file_leaves_store_unchanged(dc_settings):
    land(dc_settings, make_events(50, seed=1), "ok.parquet")
    ingest_all(dc_settings, now=NOW)
    before = store_of(dc_settings).count()
    df = make_events(50, seed=2).rename(columns={"item_id": "product"})
    out = ingest_batch(land(dc_settings, df, "renamed.csv"), dc_settings, now=NOW)
    assert out.status == "quarantined" and out.n_new == 0
    assert "missing column(s): item_id" in out.reasons[0] and "unexpected column(s): product" in out.reasons[0]
    assert store_of(dc_settings).count() == before == 50
    assert [e["id"] for e in list_quarantine(dc_settings)] == [out.batch_id]


def test_split_batch_stores_good_rows_and_quarantines_bad_rows_with_reasons(dc_settings):
    df = make_events(200)
    df.loc[[3, 4], "item_id"] = "item-unknown"
    df.loc[9, "label"] = 2
    out = ingest_batch(land(dc_settings, df, "mixed.parquet"), dc_settings, now=NOW)
    assert out.status == "partial" and (out.n_good, out.n_new, out.n_quarantined) == (197, 197, 3)
    assert out.n_rows == out.n_new + out.n_quarantined  # nothing lost
    rejected = pd.read_parquet(out.quarantined_rows_path)
    assert sorted(rejected["event_id"]) == sorted(df.loc[[3, 4, 9], "event_id"])
    reasons = dict(zip(rejected["event_id"], rejected["_reason"]))
    assert reasons[df.loc[3, "event_id"]] == "item_id_unknown"
    assert "label_not_binary" in reasons[df.loc[9, "event_id"]]
    stored = set(store_of(dc_settings).read()["event_id"])
    assert len(stored) == 197 and not stored & set(rejected["event_id"])
    assert Path(out.destination).parent == dc_settings.processed_dir
    kinds = {e["kind"] for e in list_quarantine(dc_settings)}
    assert kinds == {"rows"}


def test_same_file_ingested_twice_is_a_no_op(dc_settings):
    df = make_events(100)
    path = land(dc_settings, df, "day1.parquet")
    first = ingest_batch(path, dc_settings, now=NOW)
    assert first.status == "ingested" and first.n_new == 100
    again = ingest_batch(path, dc_settings, now=NOW)  # the file has moved on: nothing to do
    assert again.status == "skipped" and "already handled" in again.reasons[0]
    copy = land(dc_settings, df, "day1.parquet")  # the producer delivers the same content again
    dup = ingest_batch(copy, dc_settings, now=NOW)
    assert dup.status == "skipped" and dup.batch_id == first.batch_id and dup.n_new == 0
    assert "identical content" in dup.reasons[0]
    assert Path(dup.destination).exists() and not copy.exists()
    assert store_of(dc_settings).count() == 100
    assert ingest_all(dc_settings, now=NOW) == []


def test_crash_between_append_and_move_resumes_without_duplicates(dc_settings, monkeypatch):
    df = make_events(200)
    df.loc[[1, 2], "item_id"] = "item-unknown"  # a split batch: the rejected rows must survive the crash too
    path = land(dc_settings, df, "crash.parquet")

    def boom():
        raise RuntimeError("power cut after the store append")

    monkeypatch.setattr(ingest_mod, "_AFTER_APPEND", boom)
    with pytest.raises(RuntimeError, match="power cut"):
        ingest_batch(path, dc_settings, now=NOW)
    assert path.exists()  # still in landing: the move never happened
    assert store_of(dc_settings).count() == 198  # the append did
    monkeypatch.setattr(ingest_mod, "_AFTER_APPEND", None)

    out = ingest_batch(path, dc_settings, now=NOW)  # the restart
    assert out.resumed and out.status == "partial"
    assert (out.n_new, out.n_duplicate, out.n_quarantined) == (0, 198, 2)
    assert store_of(dc_settings).count() == 198 and not path.exists()
    assert len(pd.read_parquet(out.quarantined_rows_path)) == 2
    assert "event_id_already_stored" not in out.reason_counts  # the verdict was not recomputed


@pytest.mark.slow  # a fresh interpreter importing GX: ~10 s
def test_kill_between_append_and_move_in_a_subprocess(dc_settings):
    path = land(dc_settings, make_events(150), "killed.parquet")
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import pandas as pd
        from recloop.settings import load_settings
        import data_checks.ingest as ing
        s = load_settings({str(dc_settings.root)!r})
        s.checks.data_docs = False
        ing._AFTER_APPEND = lambda: os.kill(os.getpid(), signal.SIGKILL)
        ing.ingest_batch({str(path)!r}, s, now=pd.Timestamp({str(NOW)!r}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECLOOP_")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert path.exists() and store_of(dc_settings).count() == 150
    out = ingest_batch(path, dc_settings, now=NOW)
    assert out.resumed and out.status == "ingested" and (out.n_new, out.n_duplicate) == (0, 150)
    assert store_of(dc_settings).count() == 150 and not path.exists()


def test_quarantine_release_after_fixing_the_catalog(dc_settings):
    df = make_events(100)
    df.loc[:19, "item_id"] = "item-new-launch"  # 20 %: whole batch quarantined
    out = ingest_batch(land(dc_settings, df, "launch.csv"), dc_settings, now=NOW)
    assert out.status == "quarantined" and out.reason_counts == {"item_id_unknown": 20}
    entry, = list_quarantine(dc_settings)
    assert entry["id"] == out.batch_id and entry["kind"] == "batch"

    still = release(dc_settings, out.batch_id, now=NOW)  # nothing fixed yet: stays, with a fresh verdict
    assert still.status == "quarantined" and still.released_from == out.batch_id
    assert store_of(dc_settings).count() == 0 and len(list_quarantine(dc_settings)) == 1

    cat = make_catalog()
    fix = cat.iloc[[0]].assign(item_id="item-new-launch", title="New launch")
    store_of(dc_settings).upsert_catalog(pd.concat([cat, fix]))
    done = release(dc_settings, out.batch_id[:12], now=NOW)  # an id prefix is enough
    assert done.status == "ingested" and done.n_new == 100
    assert list_quarantine(dc_settings) == [] and Path(done.destination).parent == dc_settings.processed_dir
    assert store_of(dc_settings).count() == 100


def test_release_of_split_off_rows(dc_settings):
    df = make_events(200)
    df.loc[[5, 6], "item_id"] = "item-late"
    out = ingest_batch(land(dc_settings, df, "late.parquet"), dc_settings, now=NOW)
    assert out.status == "partial"
    rows_entry, = list_quarantine(dc_settings)
    assert rows_entry["kind"] == "rows" and rows_entry["id"] == f"{out.batch_id}-rejected"
    cat = make_catalog()
    store_of(dc_settings).upsert_catalog(pd.concat([cat, cat.iloc[[0]].assign(item_id="item-late")]))
    done = release(dc_settings, rows_entry["id"], now=NOW)
    assert done.status == "ingested" and done.n_new == 2
    assert store_of(dc_settings).count() == 200 and list_quarantine(dc_settings) == []
    with pytest.raises(KeyError, match="no quarantined batch"):
        release(dc_settings, "nope", now=NOW)


def test_cli_ingest_quarantine_list_and_release_with_data_docs(dc_settings):
    from typer.testing import CliRunner

    from recloop.cli import app

    ws = str(dc_settings.root)
    land(dc_settings, make_events(100, seed=1), "good.parquet")
    bad = make_events(100, seed=2)
    bad["event_type"], bad["label"] = "like", 1  # 100 % likes
    land(dc_settings, bad, "likes.parquet")
    runner = CliRunner()
    res = runner.invoke(app, ["ingest", "--all", "-w", ws, "--json"])
    assert res.exit_code == 0, res.output
    outs = {o["source"]: o for o in json.loads(res.stdout)}
    assert outs["good.parquet"]["status"] == "ingested"
    assert outs["likes.parquet"]["status"] == "quarantined"
    assert any("like_rate" in r for r in outs["likes.parquet"]["reasons"])
    # Data Docs (on by default in a fresh settings object): an index and one page per validation
    assert (dc_settings.reports_dir / "data_docs" / "index.html").exists()
    page = Path(outs["good.parquet"]["data_docs"])
    assert page.exists() and "recloop_feedback" in page.read_text()

    res = runner.invoke(app, ["quarantine", "list", "-w", ws, "--json"])
    entries = json.loads(res.stdout)
    assert [e["id"] for e in entries] == [outs["likes.parquet"]["batch_id"]]
    res = runner.invoke(app, ["quarantine", "release", entries[0]["id"], "-w", ws, "--json"])
    assert res.exit_code == 2 and json.loads(res.stdout)[0]["status"] == "quarantined"  # still 100 % likes
    res = runner.invoke(app, ["ingest", "-w", ws])
    assert res.exit_code != 0 and "PATH, --all or --copy-from" in res.output


@pytest.mark.slow
def test_synthetic_demo_world_end_to_end(settings):
    """land_synthetic (default config) -> ingest --all: day 3 quarantined with its reasons, the rest stored."""
    from recloop.datasets import land_synthetic

    out = land_synthetic(settings)
    data = out["data"]
    outs = ingest_all(settings, now=data.day_start(data.config.n_days))
    status = [o.status for o in outs]
    bad_day = data.config.bad_batch_day
    assert status[bad_day] == "quarantined" and status.count("ingested") == len(outs) - 1
    bad = outs[bad_day]
    assert bad.reason_counts == {"user_id_null": data.planted["null_user_id"],
                                 "item_id_unknown": data.planted["unknown_item_id"],
                                 "timestamp_in_future": data.planted["future_timestamp"],
                                 "event_id_duplicate_in_batch": data.planted["duplicate_event_id"]}
    day = (data.events["timestamp"] - data.day_start(0)).dt.days
    assert store_of(settings).count() == int((day != bad_day).sum())
    assert Path(bad.data_docs).exists()


def test_burst_user_excess_is_split_off_and_nothing_is_lost(dc_settings):
    """The 1998-01-17 batch of the issue, in small: one user's sign-up burst over the cap."""
    dc_settings.checks.max_events_per_user = 500
    others = make_events(1_529, seed=3, n_users=300)
    burst = make_events(737, seed=4, prefix="burst")
    burst["user_id"], burst["event_type"], burst["label"] = "user-0405", "dislike", 0
    df = pd.concat([others, burst], ignore_index=True).sample(frac=1.0, random_state=0).reset_index(drop=True)
    out = ingest_batch(land(dc_settings, df, "week.parquet"), dc_settings, now=NOW)
    assert out.status == "partial", out.reasons
    assert (out.n_rows, out.n_new, out.n_quarantined) == (2_266, 1_529 + 500, 237)
    assert out.n_rows == out.n_new + out.n_quarantined
    stored = store_of(dc_settings).read()
    assert set(others["event_id"]) <= set(stored["event_id"])  # every other user's row is stored
    rejected = pd.read_parquet(out.quarantined_rows_path)
    assert len(rejected) == 237 and set(rejected["user_id"]) == {"user-0405"}
    assert set(rejected["_reason"]) == {"user_over_event_cap"}
    # the held rows are the burst's latest events, the first 500 are stored
    kept = stored.loc[stored["user_id"] == "user-0405", "timestamp"]
    assert len(kept) == 500 and kept.max() <= pd.to_datetime(rejected["timestamp"], utc=True).min()
    assert any("events beyond a user's first 500" in r for r in out.reasons)


def test_historical_backfill_is_stored_whole(dc_settings):
    """Weekly batches from 1997: retention is judged on the data's own clock, not today's date."""
    start = pd.Timestamp("1997-09-20 03:05", tz="UTC")
    for k in range(3):
        land(dc_settings, make_events(120, seed=k, start=start + pd.Timedelta(days=7 * k)), f"ml-{k}.parquet")
    outs = ingest_all(dc_settings)  # the wall clock: future checks stay against it
    assert [o.status for o in outs] == ["ingested"] * 3, [o.reasons for o in outs]
    assert store_of(dc_settings).count() == 360
    stale = make_events(50, seed=9, prefix="stale", start=start - pd.Timedelta(days=4000))
    out = ingest_batch(land(dc_settings, stale, "stale.parquet"), dc_settings)
    assert out.status == "quarantined" and out.reason_counts == {"timestamp_too_old": 50}
    assert any("retention_days before the newest event (stored or in this batch) 1997-10" in r
               for r in out.reasons), out.reasons
