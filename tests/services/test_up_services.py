"""`recloop up --services`: PostgreSQL + SeaweedFS under the workspace, Prefect and MLflow on them."""

from __future__ import annotations

import json
import os
import shutil
import stat
import urllib.request

import psutil
import pytest

from tests.services.conftest import services_root

pytestmark = pytest.mark.slow


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _tree(procs) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            parent = psutil.Process(p.pid)
            out += [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return out


def _alive(procs) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(p.cmdline())[:120])
        except psutil.NoSuchProcess:
            continue
    return left


def test_up_services_runs_prefect_and_mlflow_on_postgres_and_s3(monkeypatch):
    import boto3  # noqa: F401  (dev dependencies: missing = an error, not a skip)
    import mlflow
    import psycopg

    from flows.stack import Stack, stop_background
    from recloop.services import ServiceUnavailable, free_port, postgres_bin_dir, weed_binary
    from recloop.settings import load_settings

    try:
        postgres_bin_dir(), weed_binary()
    except ServiceUnavailable as exc:
        pytest.skip(str(exc))
    for key in list(os.environ):
        if key.startswith("RECLOOP_"):
            monkeypatch.delenv(key)
    parent = services_root("recloop-up-")
    settings = load_settings(parent / "ws", prefect_port=free_port(), mlflow_port=free_port())
    stack = Stack(settings, with_mlflow=True, with_serving=False, with_services=True)
    stack.services = [s for s in stack.services if s.name != "deployments"]  # servers only: fast
    stack.backing.s3_grace = 1.0  # throwaway data
    started: list[psutil.Process] = []
    try:
        secrets_file = settings.root / "services" / "secrets.json"
        assert _mode(secrets_file) == 0o600
        secrets = json.loads(secrets_file.read_text())
        stack.start(timeout=150)
        started = _tree(stack.processes())

        # Prefect answers, and its tables are in PostgreSQL
        with urllib.request.urlopen(stack.prefect_url + "/api/health", timeout=10) as resp:
            assert resp.status == 200
        with psycopg.connect(stack.backing.pg_url("prefect")) as conn:
            assert conn.execute("SELECT to_regclass('public.flow_run')").fetchone()[0] == "flow_run"

        # a run logged through the MLflow server: run in PostgreSQL, artifact in the S3 bucket
        mlflow_url = stack.urls()["mlflow-server"]
        with urllib.request.urlopen(mlflow_url + "/health", timeout=10) as resp:
            assert resp.status == 200
        client = mlflow.MlflowClient(tracking_uri=mlflow_url)
        exp = client.create_experiment("up-services")
        run = client.create_run(exp)
        client.log_param(run.info.run_id, "p", "1")
        note = settings.root / "note.txt"
        note.write_text("stored in s3")
        client.log_artifact(run.info.run_id, str(note))
        client.set_terminated(run.info.run_id)
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # clients go through the server
        with psycopg.connect(stack.backing.pg_url("mlflow")) as conn:
            assert conn.execute("SELECT status FROM runs WHERE run_uuid = %s",
                                (run.info.run_id,)).fetchone() == ("FINISHED",)
        s3 = stack.backing.s3.client()
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=secrets["bucket"], Prefix="mlflow/")["Contents"]]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys
        assert not (settings.root / "mlartifacts").exists()

        # workers get every setting; no password on a command line or in what is printed
        env_file = stack.backing.write_worker_env()
        assert _mode(env_file) == 0o600
        env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        assert env["RECLOOP_SERVICES__DATABASE_URL"] == stack.backing.pg_url("recloop")
        assert env["RECLOOP_SERVICES__S3_SECRET_KEY"] == secrets["s3_secret_key"]
        assert env["RECLOOP_MLFLOW_TRACKING_URI"] == mlflow_url
        printed = " ".join(stack.backing.printable_env().values())
        for secret in (secrets["postgres_password"], secrets["s3_secret_key"]):
            assert secret not in printed
            assert not [p.pid for p in started if secret in " ".join(_cmdline(p))]
        loaded = load_settings(parent / "elsewhere", services={
            k.removeprefix("RECLOOP_SERVICES__").lower(): v for k, v in env.items() if "SERVICES__" in k})
        assert loaded.services.s3_bucket == secrets["bucket"]

        # `recloop down` stops everything; PostgreSQL by a fast (clean) shutdown
        assert set(json.loads((settings.state_dir / "stack.json").read_text())) == {
            "postgres", "s3", "prefect-server", "mlflow-server"}
        assert set(stop_background(settings)) == {"postgres", "s3", "prefect-server", "mlflow-server"}
        assert not _alive(started), _alive(started)
        assert "database system is shut down" in (settings.root / "services/postgres/postgres.log").read_text()
    finally:
        stack.stop(grace=5)
        shutil.rmtree(parent, ignore_errors=True)
    assert started and not _alive(started)


def test_up_services_refuses_settings_that_already_point_at_services(tmp_path):
    from flows.stack import BackingServices
    from recloop.settings import load_settings

    settings = load_settings(tmp_path / "ws", services={"database_url": "postgresql://x@db/recloop"})
    with pytest.raises(ValueError, match="without --services"):
        BackingServices(settings)
    assert not (tmp_path / "ws" / "services").exists()


def test_secrets_are_generated_once(tmp_path):
    from flows.stack import load_or_create_secrets

    first = load_or_create_secrets(tmp_path / "services")
    assert _mode(tmp_path / "services" / "secrets.json") == 0o600
    assert load_or_create_secrets(tmp_path / "services") == first
    (tmp_path / "services" / "secrets.json").write_text("{}")
    with pytest.raises(ValueError, match="lacks"):
        load_or_create_secrets(tmp_path / "services")


def test_the_command_prints_what_a_worker_needs_without_its_secrets(tmp_path, monkeypatch):
    """`recloop up --services --background` (servers replaced by a stand-in: the wiring of the command)."""
    from typer.testing import CliRunner

    import flows.stack as st
    from recloop.cli import app

    for key in list(os.environ):
        if key.startswith("RECLOOP_"):
            monkeypatch.delenv(key)
    monkeypatch.setattr(st.BackingServices, "start", lambda self: None)
    monkeypatch.setattr(st, "services", lambda settings, with_mlflow=True, with_serving=True, backing=None: [
        st.Service("stand-in", ["sleep", "300"], None, None)])
    ws = tmp_path / "ws"
    try:
        out = CliRunner().invoke(app, ["up", "--services", "--background", "-w", str(ws)])
        assert out.exit_code == 0, out.output
    finally:
        CliRunner().invoke(app, ["down", "-w", str(ws)])
    secrets = json.loads((ws / "services" / "secrets.json").read_text())
    env_file = ws / "services" / "worker.env"
    assert f"RECLOOP_SERVICES__S3_SECRET_KEY={secrets['s3_secret_key']}" in env_file.read_text()
    assert _mode(env_file) == 0o600
    for name in ("RECLOOP_SERVICES__DATABASE_URL", "RECLOOP_SERVICES__S3_ENDPOINT", "RECLOOP_SERVICES__S3_BUCKET",
                 "RECLOOP_MLFLOW_TRACKING_URI", "RECLOOP_PREFECT_API_URL", str(env_file)):
        assert name in out.output
    assert secrets["postgres_password"] not in out.output and secrets["s3_secret_key"] not in out.output


def _cmdline(proc) -> list[str]:
    """A process's command line; [] once it has exited (a short-lived helper cannot show a secret any more)."""
    import psutil

    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []
