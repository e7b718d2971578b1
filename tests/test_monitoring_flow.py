"""The monitor flow against a real (temporary) Prefect server: artifacts, and the drift event
emitted on a retrain decision, read back from the server; a second run does not emit again.

Slow tier (starts a Prefect server): `pytest -m slow tests/test_monitoring_flow.py`."""

from __future__ import annotations

import os

import pytest

from recloop.datasets.synthetic import generate
from tests.conftest import events_named
from tests.conftest_monitoring import champion_for, make_workspace, now_for, world_config


@pytest.fixture
def harness(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.events.worker import EventsWorker
    from prefect.testing.utilities import prefect_test_harness

    EventsWorker.drain_all()  # an events worker left by an earlier test would still send to its server
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_monitor_flow_emits_drift_event_once(tmp_path, harness):
    from prefect.events.worker import EventsWorker

    from flows.events import DRIFT_DETECTED
    from flows.monitor import monitor_flow

    data = generate(world_config(seed=11, drift=True))
    s, _ = make_workspace(tmp_path, "flow-ws", data)
    champion = champion_for(data).to_dict()
    doc = monitor_flow(workspace=str(s.root), now=str(now_for(data)), champion=champion)
    assert doc["should_retrain"] and doc["reason"] == "data_drift" and doc["event_id"]
    assert os.path.exists(doc["report_path"])

    # a second check right away: the first retrain is still pending, so no second event
    again = monitor_flow(workspace=str(s.root), now=str(now_for(data)), champion=champion)
    assert not again["should_retrain"] and again["suppressed_by"] == ["retrain_pending"]
    assert again["event_id"] is None

    EventsWorker.drain_all()
    events = events_named(DRIFT_DETECTED, f"recloop.workspace.{s.root.name}")
    assert [str(e.id) for e in events] == [doc["event_id"]]
    ev = events[0]
    assert ev.payload["reason"] == "data_drift" and ev.payload["drift_share"] == doc["drift_share"]
    assert ev.payload["windows"]["current_start"] and ev.payload["report_path"] == doc["report_path"]
    assert any(r.id == f"recloop.monitor.{s.root.name}" for r in ev.related)

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"drift-decision", "drift-report"} <= keys
