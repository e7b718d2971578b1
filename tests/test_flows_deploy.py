"""Deployments are declared right, and a real Prefect server runs the drift-triggered retrain."""

from __future__ import annotations

import importlib
import socket
from datetime import UTC

import pytest

from flows.events import DRIFT_DETECTED
from tests.conftest import events_named, permissive_toml


def test_every_deployment_entrypoint_imports():
    for module, fn in [("flows.ingest", "ingest_flow"), ("flows.monitor", "monitor_flow"),
                       ("flows.retrain", "retrain_flow"), ("flows.loop", "loop_flow"), ("flows.deploy", "main")]:
        assert callable(getattr(importlib.import_module(module), fn))


def test_three_deployments_with_schedules_and_trigger(settings):
    from flows.deploy import build_deployments

    deps = {d.name: d for d in build_deployments(settings)}
    assert set(deps) == {"ingest", "monitor", "retrain"}
    assert deps["ingest"].schedules[0].schedule.cron == settings.ingest_cron
    assert deps["monitor"].schedules[0].schedule.cron == settings.monitor_cron
    assert not deps["retrain"].schedules
    (trigger,) = deps["retrain"].triggers
    assert trigger.expect == {DRIFT_DETECTED}
    assert trigger.match.root["prefect.resource.id"] == f"recloop.workspace.{settings.root.name}"
    assert trigger.parameters["reason"] == "{{ event.payload.reason }}"
    for d in deps.values():
        assert d.parameters["workspace"] == str(settings.root)
        assert "recloop" in d.tags and d.description


def test_share_nothing_deployments_leave_the_workspace_to_each_worker(settings):
    from flows.deploy import deployment_specs

    specs = deployment_specs(settings, pin_workspace=False)
    assert all("workspace" not in spec["parameters"] for spec in specs.values())
    (trigger,) = specs["retrain"]["triggers"]
    assert "workspace" not in trigger.parameters and "reason" in trigger.parameters


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_server_runs_retrain_when_drift_event_arrives(tmp_path, small_world):
    """Start a Prefect server + served deployments, emit recloop.drift.detected, see a retrain run complete."""
    from datetime import datetime

    from flows.demo import wait_for_triggered_run
    from flows.stack import Stack
    from models.testing import make_tiny_encoder
    from recloop.settings import load_settings
    from recloop.store import FeedbackStore

    ws = tmp_path / "ws"
    ws.mkdir()
    enc = make_tiny_encoder(tmp_path / "enc")
    (ws / "recloop.toml").write_text(permissive_toml(enc, extra=f"prefect_port = {_free_port()}\n"))
    settings = load_settings(ws).ensure_dirs()
    store = FeedbackStore.from_settings(settings)
    store.upsert_catalog(small_world.catalog)
    store.upsert_users(small_world.users)
    store.append(small_world.events, batch_id="seed")

    stack = Stack(settings, with_mlflow=False, with_serving=False)
    stack.start()
    try:
        stack.wait_for_deployments()
        from prefect.client.orchestration import get_client

        with stack.client_settings():
            with get_client(sync_client=True) as client:
                ingest = client.read_deployment_by_name("ingest/ingest")
                monitor = client.read_deployment_by_name("monitor/monitor")
                assert ingest.schedules and ingest.schedules[0].schedule.cron == settings.ingest_cron
                assert monitor.schedules and monitor.schedules[0].schedule.cron == settings.monitor_cron
            before = datetime.now(UTC)
            from flows.events import emit

            emit(settings, DRIFT_DETECTED, {"reason": "test_drift", "report_path": ""})
            run = wait_for_triggered_run("retrain/retrain", before, timeout=300)
            assert run.state.type.value == "COMPLETED", run.state.message
            assert run.parameters["reason"] == "test_drift"
            from models.registry import champion_version

            assert champion_version(settings) == "1"
    finally:
        stack.stop()

    # the stack's events worker did not outlive it: a later server in this process receives this process's
    # events (before, the worker stayed bound to the stopped server and dropped them)
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        sent = emit_event(event="recloop.test.after-stack", resource={"prefect.resource.id": "recloop.test"})
        assert sent is not None
        EventsWorker.drain_all()
        assert [str(e.id) for e in events_named("recloop.test.after-stack", "recloop.test")] == [str(sent.id)]


@pytest.mark.slow
def test_same_deployments_on_a_process_work_pool_with_two_workers(tmp_path):
    """Scale-out on one machine: register the deployments on a process pool, two workers share the runs."""
    import os
    import subprocess
    import sys
    import time

    from prefect.deployments import run_deployment

    from flows.deploy import deploy_to_work_pool
    from flows.stack import Stack, stack_env, stop_process_groups
    from recloop.settings import load_settings

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "recloop.toml").write_text(f"prefect_port = {_free_port()}\n")
    settings = load_settings(ws).ensure_dirs()
    stack = Stack(settings, with_mlflow=False, with_serving=False)
    stack.services = [s for s in stack.services if s.name == "prefect-server"]  # no serve(): workers run the flows
    stack.start()
    env = stack_env(settings)
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    workers = []
    try:
        subprocess.run([prefect, "work-pool", "create", "recloop-test", "--type", "process"], env=env, check=True,
                       capture_output=True, timeout=120)
        with stack.client_settings():
            ids = deploy_to_work_pool(settings, "recloop-test")
            assert len(ids) == 3
            for i in range(2):
                with open(tmp_path / f"worker{i}.log", "wb") as log:
                    workers.append(subprocess.Popen(
                        [prefect, "worker", "start", "--pool", "recloop-test", "--type", "process", "--name",
                         f"w{i}", "--limit", "1"], env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, stdout=log,
                        stderr=subprocess.STDOUT, start_new_session=True))
            runs = [run_deployment("ingest/ingest", timeout=0) for _ in range(2)]
            deadline = time.monotonic() + 300
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                while time.monotonic() < deadline:
                    states = [client.read_flow_run(r.id).state for r in runs]
                    if all(s.is_final() for s in states):
                        break
                    time.sleep(2)
                assert all(s.is_completed() for s in states), [s.message for s in states]
                workers_used = {client.read_flow_run(r.id).work_pool_name for r in runs}
            assert workers_used == {"recloop-test"}
    finally:  # workers first (while their server still answers), then the server; SIGKILL after 10 s
        stop_process_groups(workers)
        stack.stop()
        assert all(w.poll() is not None for w in workers), "a prefect worker outlived the test"
