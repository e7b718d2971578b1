"""The loop on three machines that share nothing but the services (issue 15, item 2).

Three workspaces in separate temp folders, each used by its own processes and configured by environment
variables only: they share only the services - PostgreSQL (recloop's state, the Iceberg catalog, MLflow's
tracking and registry, the Prefect server's database), S3 (the Iceberg warehouse, landing/processed/
quarantine, MLflow artifacts) and the Prefect server.

* ingest worker (A): a ``prefect worker`` on pool-a runs the real ``ingest`` deployment, which takes a
  batch from the bucket's ``landing/`` into the store;
* retrain worker (B): a ``prefect worker`` on pool-b runs the real ``retrain`` deployment on that store,
  registers and promotes in MLflow;
* serving (C): ``recloop serve`` loads B's champion from MLflow and lands feedback in the bucket, which
  A's next ingest stores.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import permissive_toml, small_world_config
from tests.services.conftest import services_fields

pytestmark = pytest.mark.slow
import pyiceberg  # noqa: F401  (a dev dependency: missing = an error, not a skip)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WAIT_S = 300  # bound for a busy machine; nothing asserts on time


def _machine_env(ws: Path, fields: dict, pg, bucket: str, s3_server, extra: dict | None = None) -> dict:
    """A process's whole configuration: environment variables only (what a worker on another machine gets)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECLOOP_", "PREFECT_", "MLFLOW_", "AWS_"))}
    env.update({f"RECLOOP_SERVICES__{k.upper()}": str(v) for k, v in fields.items()})
    env.update({
        "RECLOOP_WORKSPACE": str(ws),
        # MLflow's tracking + registry in PostgreSQL, its artifacts in the bucket: no MLflow server needed
        "RECLOOP_MLFLOW_TRACKING_URI": pg.replace("postgresql://", "postgresql+psycopg://", 1),
        "RECLOOP_MLFLOW_ARTIFACT_ROOT": f"s3://{bucket}/mlflow",
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint, "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "AWS_DEFAULT_REGION": s3_server.region,
        "PREFECT_HOME": str(ws / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "PREFECT_LOGGING_LEVEL": "WARNING",
        "RECLOOP_CHECKS__DATA_DOCS": "false",
        "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    })
    env.update(extra or {})
    return env


def test_ingest_retrain_and_serve_on_three_machines_sharing_only_the_services(
        tmp_path, postgres, pg_url, s3_server, s3_bucket):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.stack import wait_http
    from models.testing import make_tiny_encoder
    from recloop.datasets.batches import write_batch
    from recloop.datasets.synthetic import generate
    from recloop.objectstore import ObjectStore
    from recloop.services import free_port, stop_process_groups
    from recloop.settings import load_settings
    from recloop.store import FeedbackStore

    fields = services_fields(pg_url, s3_server, s3_bucket, store="iceberg")
    ws = {name: tmp_path / name for name in ("seed", "ingest", "retrain", "serving", "prefect")}
    for path in ws.values():
        path.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        with (tmp_path / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        # the services: PostgreSQL and S3 (the fixtures), and a Prefect server on that PostgreSQL
        api = f"http://127.0.0.1:{free_port()}/api"
        prefect_db = postgres.create_database(f"prefect_{secrets.token_hex(6)}")
        server = start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                          api.split(":")[-1].removesuffix("/api"), "--log-level", "WARNING"],
                       _machine_env(ws["prefect"], {}, pg_url, s3_bucket, s3_server, {
                           "PREFECT_API_DATABASE_CONNECTION_URL": prefect_db.replace(
                               "postgresql://", "postgresql+asyncpg://", 1)}))
        wait_http(api + "/health", WAIT_S, server)

        # the catalog and users, and one batch of feedback in landing/, put there by some other machine
        world = generate(small_world_config())
        seed = load_settings(ws["seed"], services=fields)
        FeedbackStore.from_settings(seed).upsert_catalog(world.catalog)
        FeedbackStore.from_settings(seed).upsert_users(world.users)
        bucket = ObjectStore.from_settings(seed)
        bucket.put_file("landing/day-00.parquet", write_batch(world.events, ws["seed"] / "day-00.parquet"))

        # one pool per worker, so that ingest runs on A and retrain on B; no workspace in the parameters:
        # each worker's own RECLOOP_WORKSPACE applies
        with temporary_settings(updates={PREFECT_API_URL: api}):
            _deploy("ingest", "flows/ingest.py:ingest_flow", "pool-a")
            _deploy("retrain", "flows/retrain.py:retrain_flow", "pool-b")
        encoder = make_tiny_encoder(ws["retrain"] / "encoder")  # B's base encoder: a file of its own
        (ws["retrain"] / "recloop.toml").write_text(permissive_toml(encoder))
        for name, pool in (("ingest", "pool-a"), ("retrain", "pool-b")):
            start(f"worker-{name}", [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
                                     "--limit", "1"],
                  _machine_env(ws[name], fields, pg_url, s3_bucket, s3_server, {
                      "PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "2"}))

        # A: ingest; B: retrain on what A stored, register and promote in MLflow
        with temporary_settings(updates={PREFECT_API_URL: api}):
            _run_on_worker("ingest/ingest", procs, tmp_path)
            assert FeedbackStore.from_settings(seed).count() == len(world.events)
            assert not [k for k in bucket.list("") if k.startswith("landing/")]
            _run_on_worker("retrain/retrain", procs, tmp_path, {"reason": "share-nothing"})
        assert [k for k in _artifact_keys(s3_server, s3_bucket) if "/artifacts/" in k]  # the model is in the bucket

        # C: serving loads B's champion from MLflow (PostgreSQL + S3) and lands feedback in the bucket
        port, token = free_port(), secrets.token_urlsafe(16)
        serving = start("serving", [str(BIN / "recloop"), "serve", "--port", str(port)],
                        _machine_env(ws["serving"], fields, pg_url, s3_bucket, s3_server, {
                            "RECLOOP_SERVING__TOKEN": token, "RECLOOP_SERVING__FEEDBACK_FLUSH_SECONDS": "0"}))
        health = _wait_ready(f"http://127.0.0.1:{port}/health", token, serving, tmp_path / "serving.log")
        assert health["status"] == "ready" and health["model_version"]
        user, item = world.events["user_id"].iloc[0], world.events["item_id"].iloc[0]
        rec = _get(f"http://127.0.0.1:{port}/recommend?user_id={user}&k=5")
        assert len(rec["items"]) == 5
        event = {"event_id": "live-1", "user_id": user, "item_id": item, "event_type": "click", "label": 1,
                 "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/feedback", data=json.dumps(event).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 202
        _wait_for(lambda: [k for k in bucket.list("landing/") if k.endswith(".parquet")], serving,
                  tmp_path / "serving.log", "feedback in landing/")

        # A again: the served feedback reaches the store
        with temporary_settings(updates={PREFECT_API_URL: api}):
            _run_on_worker("ingest/ingest", procs, tmp_path)
        assert FeedbackStore.from_settings(seed).count() == len(world.events) + 1
        assert "live-1" in set(FeedbackStore.from_settings(seed).read(columns=["event_id"])["event_id"])
    finally:  # clients first, the Prefect server last
        stop_process_groups(procs[:0:-1], grace=10)
        stop_process_groups(procs[:1], grace=10)
    # nothing of the loop's state lives in a workspace folder: no store files, no landing files, no registry
    for name in ("ingest", "retrain", "serving"):
        settings = load_settings(ws[name])
        assert not list(settings.store_dir.rglob("*.parquet")), name
        assert not list(settings.landing_dir.rglob("*.parquet")) if settings.landing_dir.exists() else True, name
        assert not (ws[name] / "mlflow.db").exists() and not (ws[name] / "mlartifacts").exists(), name


def _deploy(name: str, entrypoint: str, pool: str) -> None:
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()),
                                overwrite=True)
    Flow.from_source(source=str(REPO), entrypoint=entrypoint).deploy(
        name=name, work_pool_name=pool, build=False, push=False, print_next_steps=False)


def _run_on_worker(deployment: str, procs, tmp_path: Path, parameters: dict | None = None) -> None:
    """Run ``deployment`` through its pool's worker and wait until the flow run is final; it must complete."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=parameters or {}, timeout=0)
    deadline = time.monotonic() + WAIT_S
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(run.id).state
            if state.is_final():
                break
            dead = [p for p in procs if p.poll() is not None]
            assert not dead, f"a process exited: {[p.args for p in dead]}"
            time.sleep(2)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("worker-*.log"))
    assert state.is_completed(), f"{deployment}: {state.name} {state.message}\n{logs}"


def _artifact_keys(s3_server, bucket: str) -> list[str]:
    client = s3_server.client()
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="mlflow/").get("Contents", [])]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.load(resp)


def _wait_for(predicate, proc, log: Path, what: str):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"no {what} within {WAIT_S}s:\n{log.read_text()[-4000:]}")


def _wait_ready(url: str, token: str, proc, log: Path) -> dict:
    """Poll /health until a model is served; a load error ends the wait with its message."""
    seen: list = []

    def ready():
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:  # 503 until a model is loaded
            body = json.loads(exc.read() or b"{}")
            seen.append(body)
            if body.get("last_error"):
                pytest.fail(f"serving could not load the champion: {body}\n{log.read_text()[-3000:]}")
        except (OSError, ValueError):
            return None
        return None

    return _wait_for(ready, proc, log, "a ready /health")
