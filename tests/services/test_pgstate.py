"""Shared state in a real PostgreSQL: workspaces (machines) that share nothing but the services.

Every test uses two workspaces in separate temp folders with the same ``services.database_url``;
what one writes the other must see, and concurrent writers in two processes must not lose or
double anything. With the file backend (no database URL) these workspaces would each keep their own
state, so every assertion below fails when the PostgreSQL path is bypassed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NOW = "2026-01-10T12:00:00+00:00"


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("RECLOOP_"):
            monkeypatch.delenv(key)


def workspace(root: Path, url: str | None = None, **services):
    """Settings of a fresh workspace at ``root`` whose services point at the test servers."""
    from recloop.settings import load_settings

    fields = {"database_url": url, **services} if url else services
    s = load_settings(root, services=fields)
    s.checks.data_docs = False  # fast; Data Docs are tested elsewhere
    return s.ensure_dirs()


# ---- two processes started together ------------------------------------------------------------------
WORKER = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    args = json.loads(sys.argv[1])
    from recloop.settings import load_settings
    s = load_settings(args["ws"], services={"database_url": args["url"]}, **args.get("settings", {}))
    mode = args["mode"]
    if mode == "storm":
        from monitoring import storm
    elif mode == "ids":
        from serving.feedback import FeedbackWriter
        w = FeedbackWriter.from_settings(s, flush_events=10_000, flush_seconds=3600)
    elif mode == "promote":
        import models.registry as registry
        sys.path.insert(0, args["tests"])
        from test_registry import verdict
        if args.get("setup"):  # one worker creates the registry while the other is still starting
            c = registry.client(s)
            c.create_registered_model(s.model_name)
            for i in range(3):  # no runs: the race is about the aliases
                c.create_model_version(s.model_name, source=str(s.root / f"v{i}"),
                                       tags={"weights_sha256": f"sha{i}", "gate_decision": "pending"})
            c.set_registered_model_alias(s.model_name, "champion", "1")
        else:  # after the setup (no two schema migrations at once), open the registry before the start
            while not Path(args["after"]).exists():
                time.sleep(0.05)
            assert registry.champion_version(s) == "1"
        verify = registry._verify_registration
        def slow_verify(*a, **k):  # widen the compare-and-set window: without a shared lock both read v1
            verify(*a, **k)
            time.sleep(1.0)
        registry._verify_registration = slow_verify
    Path(args["ready"]).write_text("ready")
    while not Path(args["go"]).exists():
        time.sleep(0.01)
    if mode == "storm":
        def bump(state):
            state.events_at_last_retrain = (state.events_at_last_retrain or 0) + 1
            time.sleep(0.005)  # a read-modify-write window: a lost update would show
        for _ in range(args["n"]):
            storm._update(s, bump)
        print(json.dumps({"done": args["n"]}))
    elif mode == "ids":
        accepted = 0
        for batch in args["batches"]:
            accepted += w.write([{"event_id": e, "user_id": "u1", "item_id": "i1", "event_type": "click",
                                  "label": 1, "timestamp": "2026-01-06T10:00:00+00:00", "query": None,
                                  "model_version": "1"} for e in batch]).accepted
        w.close()
        print(json.dumps({"accepted": accepted}))
    elif mode == "promote":
        r = registry.promote(s, args["version"], verdict(True, args["champion"], candidate_version=args["version"]))
        print(json.dumps(r.to_dict()))
''')


def run_together(tmp_path: Path, jobs: list[dict], timeout: float = 180) -> list[dict]:
    """Start one process per job, release them at once, return what each printed (JSON)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    go = tmp_path / "go"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RECLOOP_")}, "PYTHONPATH": str(REPO)}
    procs = []
    for i, job in enumerate(jobs):
        job = {**job, "ready": str(tmp_path / f"ready{i}"), "go": str(go)}
        procs.append(subprocess.Popen([sys.executable, str(script), json.dumps(job)], cwd=str(REPO), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + timeout
        while not all((tmp_path / f"ready{i}").exists() for i in range(len(jobs))):
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                pytest.fail(f"a worker did not get ready: {[p.communicate(timeout=30) for p in procs]}")
            time.sleep(0.05)
        go.write_text("go")
        out = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            assert p.returncode == 0, stderr[-3000:]
            out.append(json.loads(stdout.strip().splitlines()[-1]))
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# ---- storm control ---------------------------------------------------------------------------------------
def test_storm_state_is_shared_by_workspaces_that_share_no_disk(tmp_path, pg_url, clean_env):
    from monitoring import storm

    a, b = workspace(tmp_path / "a", pg_url), workspace(tmp_path / "b", pg_url)
    storm.mark_retrain_requested(a, "drift: 5 of 8 features", now=NOW)
    seen = storm.load_state(b)  # the other machine's monitor
    assert seen.pending and seen.pending["status"] == "requested" and seen.pending["reason"].startswith("drift")
    check = storm.check_storm(b, seen, n_events_total=50_000, n_new_fallback=50_000, now=NOW)
    assert check.suppressed_by == [storm.RETRAIN_PENDING]  # b does not start a second retrain
    storm.mark_retrain_started(b, "drift", n_events=1_000, now=NOW)  # the retrain runs on b ...
    storm.mark_retrain_finished(b, succeeded=True, now=NOW)
    after = storm.load_state(a)  # ... and a's monitor knows it finished
    assert after.pending is None and after.last_retrain_succeeded is True and after.events_at_last_retrain == 1_000
    storm.record_suppression(b, {"reasons": [storm.COOLDOWN], "trigger": "drift"})
    assert [e["reasons"] for e in storm.suppressions(a)] == [[storm.COOLDOWN]]
    assert not any((ws.state_dir / f).exists() for ws in (a, b) for f in (storm.STATE_FILE, storm.SUPPRESSION_LOG))


def test_concurrent_storm_updates_from_two_processes_lose_none(tmp_path, pg_url, clean_env):
    from monitoring import storm

    n = 20
    jobs = [{"mode": "storm", "ws": str(tmp_path / ws), "url": pg_url, "n": n} for ws in ("a", "b")]
    assert run_together(tmp_path, jobs) == [{"done": n}, {"done": n}]
    for ws in ("a", "b"):  # every workspace reads the same total
        assert storm.load_state(workspace(tmp_path / ws, pg_url)).events_at_last_retrain == 2 * n


# ---- the accepted-id log ---------------------------------------------------------------------------------
def test_two_serving_processes_accept_each_id_exactly_once(tmp_path, pg_url, clean_env):
    shared = [f"e{i:03d}" for i in range(150)]  # both replicas get every one of these (retries, a balancer)
    own = {ws: [f"{ws}-{i}" for i in range(10)] for ws in ("a", "b")}
    jobs = []
    for ws in ("a", "b"):
        ids = shared + own[ws]
        jobs.append({"mode": "ids", "ws": str(tmp_path / ws), "url": pg_url,
                     "batches": [ids[i:i + 8] for i in range(0, len(ids), 8)]})
    results = run_together(tmp_path, jobs)
    assert sum(r["accepted"] for r in results) == 170
    landed = pd.concat([pd.read_parquet(f) for ws in ("a", "b")
                        for f in sorted((tmp_path / ws / "landing").glob("serving-*.parquet"))])
    assert landed["event_id"].is_unique and set(landed["event_id"]) == set(shared) | set(own["a"]) | set(own["b"])
    from serving.feedback import PgAcceptedIds

    ids = PgAcceptedIds(workspace(tmp_path / "c", pg_url))  # a third replica sees them all as known
    try:
        assert ids.count() == 170 and ids.known(["e000", "b-9", "new"]) == {"e000", "b-9"}
    finally:
        ids.close()


# ---- the promotion compare-and-set -----------------------------------------------------------------------
def _aliases_and_decisions(pg_url: str, name: str) -> tuple[dict, dict]:
    """MLflow's registry tables, read straight from PostgreSQL (no MLflow import in the test process)."""
    import psycopg

    with psycopg.connect(pg_url) as conn:
        aliases = dict(conn.execute("SELECT alias, version::text FROM registered_model_aliases WHERE name = %s",
                                    (name,)).fetchall())
        decisions = dict(conn.execute("SELECT version::text, value FROM model_version_tags WHERE name = %s "
                                      "AND key = 'gate_decision'", (name,)).fetchall())
    return aliases, decisions


def test_a_promotion_race_across_machines_is_decided_by_the_database(tmp_path, pg_url, clean_env):
    extra = {"mlflow_tracking_uri": pg_url.replace("postgresql://", "postgresql+psycopg://", 1)}  # MLflow on PG
    jobs = [{"mode": "promote", "ws": str(tmp_path / ws), "url": pg_url, "settings": extra, "setup": ws == "a",
             "tests": str(REPO / "tests"), "version": v, "champion": "1", "after": str(tmp_path / "ready0")}
            for ws, v in (("a", "2"), ("b", "3"))]
    results = run_together(tmp_path, jobs)
    winners = [r for r in results if r["promoted"]]
    losers = [r for r in results if not r["promoted"]]
    assert len(winners) == 1 and len(losers) == 1, results
    winner, loser = winners[0]["version"], losers[0]["version"]
    assert losers[0]["reason"] == "champion_changed" and losers[0]["champion_after"] == winner
    aliases, decisions = _aliases_and_decisions(pg_url, "recommender")
    assert aliases == {"champion": winner, "previous": "1"}
    assert decisions[winner] == "promoted" and decisions[loser] == "rejected"
    assert not any((tmp_path / ws / "state" / "promotion.lock").exists() for ws in ("a", "b"))


# ---- the quarantine registry -----------------------------------------------------------------------------
def test_a_quarantined_batch_is_listed_and_released_from_another_workspace(tmp_path, pg_url, s3_server, s3_bucket,
                                                                           clean_env):
    from data_checks.ingest import ingest_object
    from data_checks.quarantine import list_quarantine, register_entry, release
    from recloop.objectstore import ObjectStore
    from recloop.store import FeedbackStore
    from tests.conftest_data_checks import NOW as DC_NOW
    from tests.conftest_data_checks import make_catalog, make_events
    from tests.services.conftest import services_fields

    fields = services_fields(pg_url, s3_server, s3_bucket)
    a = workspace(tmp_path / "a", **fields)
    b = workspace(tmp_path / "b", **fields)
    for ws in (a, b):
        FeedbackStore.from_settings(ws).upsert_catalog(make_catalog())
    bad = make_events(100)
    bad.loc[:19, "item_id"] = "item-new-launch"  # unknown item: the whole batch is quarantined
    local = tmp_path / "launch.parquet"
    bad.to_parquet(local, index=False)
    objects = ObjectStore.from_settings(a)
    objects.put_file("landing/launch.parquet", local)
    out = ingest_object("landing/launch.parquet", a, now=DC_NOW)  # machine a ingests: quarantined, registered
    assert out.status == "quarantined" and objects.exists("quarantine/launch.parquet")
    for ws in (a, b):  # every machine sees the entry
        entry, = list_quarantine(ws)
        assert entry["id"] == out.batch_id and entry["key"] == "quarantine/launch.parquet"
        assert entry["reason_counts"] == {"item_id_unknown": 20}
    with pytest.raises(ValueError, match="needs key"):
        register_entry(a, {"id": "x"})

    still = release(b, out.batch_id[:12], now=DC_NOW)  # nothing fixed yet: a fresh verdict, still listed
    assert still.status == "quarantined" and still.released_from == out.batch_id == still.batch_id
    assert [e["id"] for e in list_quarantine(a)] == [out.batch_id]

    cat = make_catalog()
    FeedbackStore.from_settings(b).upsert_catalog(pd.concat([cat, cat.iloc[[0]].assign(item_id="item-new-launch")]))
    done = release(b, out.batch_id, now=DC_NOW)  # machine b fixed its catalog and releases it
    assert done.status == "ingested" and done.n_new == 100
    assert list_quarantine(a) == [] and list_quarantine(b) == []  # a's local copy is not listed again
    assert objects.exists("processed/launch.parquet") and objects.exists("processed/launch.parquet.validation.json")
    assert objects.list("quarantine/") == []


# ---- feedback micro-batches to the landing prefix --------------------------------------------------------
def test_a_serving_replica_lands_feedback_in_the_object_store(services_settings):
    import io

    from recloop.objectstore import ObjectStore
    from serving.feedback import FeedbackWriter

    w = FeedbackWriter.from_settings(services_settings, flush_events=1, flush_seconds=0)
    rows = [{"event_id": f"x{i}", "user_id": "u1", "item_id": "i1", "event_type": "click", "label": 1,
             "timestamp": pd.Timestamp("2026-01-06T10:00:00+00:00"), "query": None, "model_version": "1"}
            for i in range(3)]
    name = w.write(rows).batch_file
    assert w.write(rows).accepted == 0  # the ids are in PostgreSQL now
    w.close()
    objects = ObjectStore.from_settings(services_settings)
    assert objects.list("landing/") == [f"landing/{name}"]
    landed = pd.read_parquet(io.BytesIO(objects.get_bytes(f"landing/{name}")))
    assert sorted(landed["event_id"]) == ["x0", "x1", "x2"]
    assert list(services_settings.landing_dir.glob("*.parquet")) == []  # no local copy left behind
