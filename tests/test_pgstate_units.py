"""recloop.pgstate and its dispatch: the embedded default stays on files, a database URL moves the state.

Fast: no server. The PostgreSQL behaviour itself is tested on a real server in
tests/services/test_pgstate.py (slow tier).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pandas as pd
import pytest

from recloop import pgstate

UNREACHABLE = "postgresql://recloop:x@127.0.0.1:1/recloop"  # nothing listens on port 1: refused at once


def _event(eid: str) -> dict:
    return {"event_id": eid, "user_id": "u1", "item_id": "i1", "event_type": "click", "label": 1,
            "timestamp": pd.Timestamp("2026-01-06T10:00:00+00:00"), "query": None, "model_version": "1"}


def _with_db(settings, url: str = UNREACHABLE):
    return settings.model_copy(update={"services": settings.services.model_copy(update={"database_url": url})})


def test_enabled_follows_the_database_url(settings):
    assert pgstate.enabled(settings) is False
    assert pgstate.enabled(_with_db(settings)) is True
    assert pgstate.enabled(SimpleNamespace(state_dir=settings.state_dir)) is False  # no services at all


def test_sqlalchemy_style_urls_lose_their_driver_for_libpq():
    assert pgstate.libpq_url("postgresql+psycopg://u:p@h:5/db") == "postgresql://u:p@h:5/db"
    assert pgstate.libpq_url("postgres+psycopg2://u@h/db") == "postgresql://u@h/db"
    assert pgstate.libpq_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_lock_keys_are_stable_signed_64_bit_and_distinct():
    a, b = pgstate.lock_key("promotion:recommender"), pgstate.lock_key("promotion:other")
    assert a == pgstate.lock_key("promotion:recommender") and a != b
    assert all(-(2**63) <= k < 2**63 for k in (a, b))


def test_without_a_database_url_the_pg_entry_points_refuse_clearly(settings):
    with pytest.raises(RuntimeError, match="database_url is not set"):
        pgstate.ensure_schema(settings)


def test_the_embedded_default_never_imports_psycopg(settings, monkeypatch):
    """Storm state, the promotion lock and the accepted-id log stay on files with no database URL,
    even where psycopg cannot be imported at all."""
    from filelock import FileLock

    from models.registry import _lock
    from monitoring import storm
    from serving.feedback import AcceptedIds, FeedbackWriter

    monkeypatch.setitem(sys.modules, "psycopg", None)  # any `import psycopg` now raises ImportError
    storm.mark_retrain_requested(settings, "drift")
    storm.record_suppression(settings, {"reasons": ["cooldown"]})
    assert storm.load_state(settings).pending["reason"] == "drift" and len(storm.suppressions(settings)) == 1
    assert (settings.state_dir / storm.STATE_FILE).exists()
    lock = _lock(settings, timeout=1)
    assert isinstance(lock, FileLock)
    with lock:
        pass
    w = FeedbackWriter(settings.landing_dir, settings.state_dir / "serving")
    assert isinstance(w.ids, AcceptedIds) and w.objects is None
    assert w.write([_event("a")]).accepted == 1
    assert (settings.state_dir / "serving" / "accepted_event_ids.sqlite").exists()


def test_a_database_url_sends_storm_state_to_postgres_not_to_files(settings):
    """With a database URL the file backend is not used as a silent fallback: an unreachable
    server is an error, and no state file appears."""
    import psycopg

    from monitoring import storm

    s = _with_db(settings)
    with pytest.raises(psycopg.OperationalError):
        storm.mark_retrain_requested(s, "drift")
    with pytest.raises(psycopg.OperationalError):
        storm.load_state(s)
    assert not (settings.state_dir / storm.STATE_FILE).exists()


def test_a_database_url_makes_the_promotion_lock_a_database_lock(settings):
    import psycopg

    from models.registry import _lock

    lock = _lock(_with_db(settings), timeout=0.5)
    assert not hasattr(lock, "lock_file")  # not a FileLock
    with pytest.raises(psycopg.OperationalError), lock:
        pass
    assert not (settings.state_dir / "promotion.lock").exists()


def test_a_database_url_gives_the_writer_the_postgres_id_log(settings):
    import psycopg

    from serving.feedback import FeedbackWriter

    with pytest.raises(psycopg.OperationalError):
        FeedbackWriter.from_settings(_with_db(settings))


class _FakeObjects:
    """A tiny stand-in for recloop.objectstore.ObjectStore: a dict of keys, optionally failing."""

    def __init__(self, fail: bool = False):
        self.fail, self.keys = fail, {}

    def put_file(self, key, path):
        if self.fail:
            raise OSError("object store unreachable")
        self.keys[key] = path.read_bytes()


def test_landed_batches_go_to_the_landing_prefix_and_a_failed_upload_is_kept(settings, monkeypatch):
    import serving.feedback as fb

    objects = _FakeObjects(fail=True)
    monkeypatch.setattr(fb, "_object_store", lambda s: objects)
    w = fb.FeedbackWriter.from_settings(settings, flush_events=1, flush_seconds=0)
    name = w.write([_event("a"), _event("b")]).batch_file
    assert objects.keys == {} and (settings.landing_dir / name).exists()  # upload failed: kept locally
    objects.fail = False
    w.recover()  # the retry (also run by the flush thread and at restart)
    assert list(objects.keys) == [f"landing/{name}"] and not (settings.landing_dir / name).exists()
    import io

    landed = pd.read_parquet(io.BytesIO(objects.keys[f"landing/{name}"]))
    assert sorted(landed["event_id"]) == ["a", "b"]


def test_a_commit_of_unknown_outcome_keeps_the_events(settings, monkeypatch):
    """PostgreSQL: when COMMIT fails the ids may be recorded; the appended events must then land
    (a double landing is absorbed by the store, a lost event is not)."""
    import serving.feedback as fb

    class UnknownCommit(fb.AcceptedIds):
        truncate_on_failed_commit = False

        def commit(self):
            raise ConnectionError("server closed the connection during COMMIT")

    monkeypatch.setattr(fb, "accepted_ids_for", lambda s, d: UnknownCommit(d / "ids.sqlite"))
    w = fb.FeedbackWriter(settings.landing_dir, settings.state_dir / "serving", flush_events=100, flush_seconds=3600)
    with pytest.raises(ConnectionError):
        w.write([_event("a")])
    name = w.flush()
    assert name is not None and list(pd.read_parquet(settings.landing_dir / name)["event_id"]) == ["a"]


def test_a_rolled_back_record_drops_the_events_so_a_retry_lands_them_once(settings, monkeypatch):
    import serving.feedback as fb

    class FailingAdd(fb.AcceptedIds):
        fail = True

        def add(self, ids):
            if FailingAdd.fail:
                raise OSError("disk full")
            super().add(ids)

    monkeypatch.setattr(fb, "accepted_ids_for", lambda s, d: FailingAdd(d / "ids.sqlite"))
    w = fb.FeedbackWriter(settings.landing_dir, settings.state_dir / "serving", flush_events=100, flush_seconds=3600)
    with pytest.raises(OSError):
        w.write([_event("a")])
    FailingAdd.fail = False
    assert w.write([_event("a")]).accepted == 1
    name = w.flush()
    assert list(pd.read_parquet(settings.landing_dir / name)["event_id"]) == ["a"]
