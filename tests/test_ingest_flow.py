"""The Prefect ingest flow on a temporary Prefect database: files move, events carry counts, artifact published."""

from __future__ import annotations

import pytest

from tests.conftest_data_checks import land, make_events, with_catalog


@pytest.fixture
def dc_settings(settings):
    return with_catalog(settings)


def start_recording_events(monkeypatch):
    """Prefect's own asserting events client: every emitted event is recorded for inspection.

    Started inside the harness, so the worker's orchestration client talks to the test server.
    """
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker

    AssertingEventsClient.reset()
    worker = EventsWorker.instance(AssertingEventsClient)
    monkeypatch.setattr(EventsWorker, "instance", lambda *_a, **_k: worker)
    return worker


@pytest.mark.slow  # starts a real (temporary) Prefect server: ~10 s idle, ~50 s on a busy 2-core box
def test_ingest_flow_moves_files_emits_events_and_publishes_artifact(dc_settings, tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    good = land(dc_settings, make_events(120, seed=1), "a-good.parquet")
    bad = make_events(120, seed=2).drop(columns=["label"])
    bad_path = land(dc_settings, bad, "b-bad.parquet")

    from flows.ingest import ingest_flow

    with prefect_test_harness(server_startup_timeout=180):
        # settings are re-read inside the flow (as a deployment would): keep Data Docs off for speed
        monkeypatch.setenv("RECLOOP_CHECKS__DATA_DOCS", "false")
        worker = start_recording_events(monkeypatch)
        result = ingest_flow(workspace=str(dc_settings.root))
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ingest-summary"])))
        worker.drain()

    assert result["counts"] == {"ingested": 1, "partial": 0, "quarantined": 1, "skipped": 0}
    assert not good.exists() and (dc_settings.processed_dir / good.name).exists()
    assert not bad_path.exists() and (dc_settings.quarantine_dir / bad_path.name).exists()

    from prefect.events.clients import AssertingEventsClient

    events = [e for c in AssertingEventsClient.all for e in c.events if e.event.startswith("recloop.feedback.")]
    by_name = {e.event: e for e in events}
    assert set(by_name) == {"recloop.feedback.ingested", "recloop.feedback.quarantined"}
    ing = by_name["recloop.feedback.ingested"].payload
    assert (ing["source"], ing["n_rows"], ing["n_new"], ing["n_quarantined"]) == ("a-good.parquet", 120, 120, 0)
    q = by_name["recloop.feedback.quarantined"].payload
    assert q["source"] == "b-bad.parquet" and q["n_new"] == 0 and q["n_rows"] == 120
    assert any("missing column(s): label" in r for r in q["reasons"])
    assert by_name["recloop.feedback.quarantined"].resource.id.startswith("recloop.workspace.")

    assert artifacts and "b-bad.parquet" in artifacts[0].data and "quarantined" in artifacts[0].data
