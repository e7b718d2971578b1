"""``recloop up`` / ``recloop down``: the local stack, on loopback, bound to one workspace.

* Prefect server (SQLite under ``<workspace>/prefect``, analytics off) - the Prefect UI
* the deployments, served by ``python -m flows.deploy`` (cron ingest, cron monitor,
  event-triggered retrain)
* an MLflow server on the workspace's SQLite store and artifacts - the MLflow UI
* the serving API (``recloop serve``), when the serving room is installed

With ``Stack(..., with_services=True)`` (``recloop up --services``) the stack first starts its own backing services,
PostgreSQL and SeaweedFS S3 (``recloop.services``), with data under ``<workspace>/services/`` and
credentials generated once into ``<workspace>/services/secrets.json`` (mode 0600); then Prefect runs
on PostgreSQL, MLflow on PostgreSQL with artifacts in ``s3://recloop/mlflow`` (served through the MLflow
server), and every child gets the ``RECLOOP_SERVICES__*`` settings.

Child processes run in their own process group; their pids are kept in
``<workspace>/state/stack.json`` so ``recloop down`` can stop a background stack.
A foreground stack (``run_foreground``) stops every child on Ctrl-C and, under
``recloop.cli_common.terminate_like_ctrl_c``, on SIGTERM/SIGHUP too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from recloop.services import free_port, start_postgres, start_s3, stop_process_groups

BIN = Path(sys.executable).parent
__all__ = ["BackingServices", "Stack", "run_foreground", "stack_env", "stop_background", "stop_process_groups"]


@dataclass
class Service:
    name: str
    cmd: list[str]
    url: str | None
    health: str | None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None


def prefect_api_url(settings) -> str:
    return settings.prefect_api_url or f"http://127.0.0.1:{settings.prefect_port}/api"


def stack_env(settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(settings.prefect_env())
    env["PREFECT_API_URL"] = prefect_api_url(settings)
    env.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")  # the trigger hop takes seconds, not a minute
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    env["RECLOOP_WORKSPACE"] = str(settings.root)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    return env


def services(settings, with_mlflow: bool = True, with_serving: bool = True,
             backing: BackingServices | None = None) -> list[Service]:
    ws = str(settings.root)
    out = []
    if not settings.prefect_api_url:  # no external server given: start our own
        out.append(Service("prefect-server",
                           [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                            "--port", str(settings.prefect_port), "--log-level", "WARNING"],
                           f"http://127.0.0.1:{settings.prefect_port}", prefect_api_url(settings) + "/health",
                           env=backing.prefect_server_env() if backing else {}))
    mlflow_url = f"http://127.0.0.1:{settings.mlflow_port}"
    if with_mlflow and backing is not None:  # tracking + registry on PostgreSQL, artifacts on S3 via the server
        out.append(Service("mlflow-server",
                           [str(BIN / "mlflow"), "server", "--serve-artifacts", "--host", "127.0.0.1",
                            "--port", str(settings.mlflow_port), "--workers", "1"],
                           mlflow_url, f"{mlflow_url}/health", env=backing.mlflow_server_env()))
    elif with_mlflow and settings.tracking_uri.startswith("sqlite:"):
        out.append(Service("mlflow-server",
                           [str(BIN / "mlflow"), "server", "--backend-store-uri", settings.tracking_uri,
                            "--default-artifact-root", settings.artifact_root, "--host", "127.0.0.1",
                            "--port", str(settings.mlflow_port), "--workers", "1"],
                           mlflow_url, f"{mlflow_url}/health"))
    out.append(Service("deployments", [sys.executable, "-m", "flows.deploy", "--workspace", ws], None, None))
    if with_serving:
        out.append(Service("serving", [str(BIN / "recloop"), "serve", "--workspace", ws, "--host",
                                       settings.serving.host, "--port", str(settings.serving.port)],
                           f"http://{settings.serving.host}:{settings.serving.port}/docs", None))
    return out


SECRETS_FILE = "secrets.json"
WORKER_ENV_FILE = "worker.env"
SERVICES_DATABASES = ("recloop", "prefect", "mlflow")  # recloop's state + Iceberg catalog, Prefect, MLflow


def load_or_create_secrets(root: Path) -> dict:
    """Credentials and ports of the backing services, generated once and kept in ``root/secrets.json``
    (mode 0600): a restarted stack reopens the same databases and bucket with the same passwords."""
    import secrets as rnd

    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o711)  # PostgreSQL may run as the `postgres` user: it must traverse, not list
    path = root / SECRETS_FILE
    if path.exists():
        os.chmod(path, 0o600)
        data = json.loads(path.read_text())
        missing = {"postgres_password", "postgres_port", "s3_access_key", "s3_secret_key", "s3_port",
                   "bucket"} - set(data)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}: restore it (the data under {root} needs its "
                             "passwords) or move the folder away to start afresh")
        return data
    data = {"postgres_password": rnd.token_urlsafe(24), "postgres_port": free_port(),
            "s3_access_key": "rl" + rnd.token_hex(9), "s3_secret_key": rnd.token_urlsafe(30),
            "s3_port": free_port(), "bucket": "recloop"}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    return data


class BackingServices:
    """PostgreSQL + SeaweedFS S3 of ``recloop up --services``: data under ``<workspace>/services/``."""

    def __init__(self, settings, s3_grace: float = 20.0):
        svc = settings.services
        if svc.database_url or svc.s3_endpoint or svc.s3_bucket:
            raise ValueError("`recloop up --services` starts its own PostgreSQL and S3, but the settings already "
                             "point at services (RECLOOP_SERVICES__*): run `recloop up` without --services to "
                             "use those")
        self.settings = settings
        self.root = settings.root / "services"
        self.secrets = load_or_create_secrets(self.root)
        self.s3_grace = s3_grace  # SeaweedFS's clean stop takes ~15 s (its filer drains gRPC streams)
        self.postgres = None
        self.s3 = None

    def pg_url(self, dbname: str, driver: str = "postgresql") -> str:
        s = self.secrets
        return f"{driver}://recloop:{s['postgres_password']}@127.0.0.1:{s['postgres_port']}/{dbname}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.secrets['s3_port']}"

    def start(self) -> None:
        s = self.secrets
        for name, port in (("PostgreSQL", s["postgres_port"]), ("S3", s["s3_port"])):
            if _port_in_use(port):
                raise RuntimeError(f"port {port} for {name} is in use (another `recloop up --services` on this "
                                   f"workspace? stop it with `recloop down`)")
        try:
            self.postgres = start_postgres(self.root, port=s["postgres_port"], databases=SERVICES_DATABASES,
                                           password=s["postgres_password"])
            self.s3 = start_s3(self.root, port=s["s3_port"], buckets=(s["bucket"],),
                               access_key=s["s3_access_key"], secret_key=s["s3_secret_key"])
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.s3 is not None:
            self.s3.stop(grace=self.s3_grace)
        if self.postgres is not None:
            self.postgres.stop()

    def processes(self) -> list[subprocess.Popen]:
        return [x.proc for x in (self.postgres, self.s3) if x is not None and x.proc is not None]

    def state(self) -> dict:
        out = {}
        if self.postgres is not None and self.postgres.proc is not None:
            out["postgres"] = {"pid": self.postgres.proc.pid, "url": f"127.0.0.1:{self.secrets['postgres_port']}",
                               "stop_signal": "SIGINT", "grace": 30}
        if self.s3 is not None and self.s3.proc is not None:
            out["s3"] = {"pid": self.s3.proc.pid, "url": self.s3_endpoint, "stop_signal": "SIGTERM",
                         "grace": self.s3_grace}
        return out

    def urls(self) -> dict[str, str]:
        return {"postgres": f"postgresql://127.0.0.1:{self.secrets['postgres_port']} (user recloop)",
                "s3": self.s3_endpoint}

    def prefect_server_env(self) -> dict[str, str]:
        return {"PREFECT_API_DATABASE_CONNECTION_URL": self.pg_url("prefect", "postgresql+asyncpg")}

    def mlflow_server_env(self) -> dict[str, str]:
        """The MLflow server's store and artifact destination, by environment (not argv: no password in
        ``ps``); only the server holds the S3 keys, clients upload through its ``--serve-artifacts`` proxy."""
        s = self.secrets
        return {"MLFLOW_BACKEND_STORE_URI": self.pg_url("mlflow", "postgresql+psycopg"),
                "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{s['bucket']}/mlflow",
                "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": s["s3_access_key"],
                "AWS_SECRET_ACCESS_KEY": s["s3_secret_key"], "AWS_DEFAULT_REGION": "us-east-1"}

    def worker_env(self, with_mlflow: bool = True) -> dict[str, str]:
        """What a worker (or the serving API) needs to share this stack's state: ``RECLOOP_*`` settings."""
        s = self.secrets
        env = {"RECLOOP_SERVICES__DATABASE_URL": self.pg_url("recloop"),
               "RECLOOP_SERVICES__STORE": "iceberg",  # the feedback store as Iceberg tables in the bucket
               "RECLOOP_SERVICES__S3_ENDPOINT": self.s3_endpoint,
               "RECLOOP_SERVICES__S3_BUCKET": s["bucket"],
               "RECLOOP_SERVICES__S3_ACCESS_KEY": s["s3_access_key"],
               "RECLOOP_SERVICES__S3_SECRET_KEY": s["s3_secret_key"],
               "RECLOOP_SERVICES__S3_REGION": "us-east-1",
               "RECLOOP_PREFECT_API_URL": prefect_api_url(self.settings)}
        if with_mlflow:
            env["RECLOOP_MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{self.settings.mlflow_port}"
        return env

    def write_worker_env(self, with_mlflow: bool = True) -> Path:
        """``<workspace>/services/worker.env`` (mode 0600): ``set -a; . worker.env`` on a worker."""
        path = self.root / WORKER_ENV_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.writelines(f"{k}={v}\n" for k, v in self.worker_env(with_mlflow).items())
        os.chmod(path, 0o600)
        return path

    def printable_env(self, with_mlflow: bool = True) -> dict[str, str]:
        """``worker_env`` with the secrets replaced by a pointer to worker.env (not echoed to a terminal/log)."""
        out = {}
        for k, v in self.worker_env(with_mlflow).items():
            if k.endswith(("S3_SECRET_KEY", "S3_ACCESS_KEY")):
                v = f"<in {self.root / WORKER_ENV_FILE}>"
            elif k.endswith("DATABASE_URL"):
                v = v.replace(self.secrets["postgres_password"], "***")
            out[k] = v
        return out


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s ({last})")


class Stack:
    """Start services in order, wait for each to be healthy, stop them all in reverse.

    ``with_services=True``: PostgreSQL and S3 first (``BackingServices``), stopped last.
    """

    def __init__(self, settings, with_mlflow: bool = True, with_serving: bool = True, log_dir: Path | None = None,
                 with_services: bool = False):
        self.settings = settings.ensure_dirs()
        self.backing = BackingServices(settings) if with_services else None
        self.services = (services(settings, with_mlflow, with_serving, backing=self.backing) if self.backing
                         else services(settings, with_mlflow, with_serving))
        self.env = stack_env(settings)
        if self.backing is not None:
            self.env.update(self.backing.worker_env(with_mlflow=with_mlflow))
        self.log_dir = log_dir or settings.state_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    @property
    def prefect_url(self) -> str:
        return prefect_api_url(self.settings).removesuffix("/api")

    def start(self, timeout: float = 90.0) -> Stack:
        for svc in self.services:
            port = _port_of(svc.url)
            if port and _port_in_use(port):
                raise RuntimeError(f"port {port} for {svc.name} is already in use (another `recloop up`? "
                                   f"stop it with `recloop down`, or choose another port in settings)")
        try:
            if self.backing is not None:
                self.backing.start()
                self._write_state()  # `recloop down` finds the databases even if a later service fails
            # servers (with a health URL) start side by side; a client of them starts once they answer
            starting: list[Service] = []
            for svc in self.services:
                if not svc.health:
                    self._wait_healthy(starting, timeout)
                    starting = []
                with open(self.log_dir / f"{svc.name}.log", "ab") as log:  # the child keeps its own descriptor
                    svc.proc = subprocess.Popen(svc.cmd, env={**self.env, **svc.env}, stdout=log,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True,
                                                cwd=str(Path(__file__).resolve().parent.parent))
                if svc.health:
                    starting.append(svc)
            self._wait_healthy(starting, timeout)
            self._write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self, starting: list[Service], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for svc in starting:
            try:
                wait_http(svc.health, max(1.0, deadline - time.monotonic()), svc.proc)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{svc.name} did not start: {exc}; see {self.log_dir / (svc.name + '.log')}") from exc

    def wait_for_deployments(self, names: tuple[str, ...] = ("ingest/ingest", "monitor/monitor", "retrain/retrain"),
                             timeout: float = 90.0) -> None:
        from prefect.client.orchestration import get_client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.client_settings(), get_client(sync_client=True) as client:
                found = set()
                for name in names:
                    try:
                        client.read_deployment_by_name(name)
                        found.add(name)
                    except Exception:  # noqa: S112 - not registered yet: keep polling
                        continue
            if found == set(names):
                return
            dep = next((s for s in self.services if s.name == "deployments"), None)
            if dep and dep.proc and dep.proc.poll() is not None:
                raise RuntimeError(f"the deployments process exited ({dep.proc.returncode}); see "
                                   f"{self.log_dir / 'deployments.log'}")
            time.sleep(1)
        raise TimeoutError(f"deployments {names} not registered within {timeout:.0f}s")

    @contextmanager
    def client_settings(self, drain_timeout: float = 30.0):
        """Point this process's Prefect client at the stack's server (Prefect reads env vars only at import).

        Events emitted inside are delivered before the context ends: Prefect keeps one events worker per
        process, bound to the first server it saw, so leaving drains it. Otherwise it would outlive the
        stack and send the process's later events (to another server) to this one, which is gone."""
        from prefect.events.worker import EventsWorker
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: prefect_api_url(self.settings)}):
            try:
                yield
            finally:
                EventsWorker.drain_all(timeout=drain_timeout, at_exit=False)

    def _write_state(self) -> None:
        """Pids in start order; ``stop_signal``/``grace``: how ``recloop down`` stops each cleanly."""
        state = {}
        if self.backing is not None:
            state.update(self.backing.state())
        state.update({s.name: {"pid": s.proc.pid, "url": s.url} for s in self.services if s.proc})
        (self.settings.state_dir / "stack.json").write_text(json.dumps(state, indent=2))

    def urls(self) -> dict[str, str]:
        out = self.backing.urls() if self.backing is not None else {}
        return {**out, **{s.name: s.url for s in self.services if s.url}}

    def processes(self) -> list[subprocess.Popen]:
        """Every child process the stack started (backing services included)."""
        procs = self.backing.processes() if self.backing is not None else []
        return procs + [s.proc for s in self.services if s.proc]

    def stop(self, grace: float = 10.0) -> None:
        stop_process_groups([svc.proc for svc in reversed(self.services) if svc.proc], grace)
        if self.backing is not None:
            self.backing.stop()
        (self.settings.state_dir / "stack.json").unlink(missing_ok=True)

    def __enter__(self) -> Stack:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_foreground(stack: Stack, on_started=None, poll_s: float = 1.0) -> str:
    """Start ``stack``, wait until one service exits or the caller is interrupted, then stop them all.

    Ctrl-C returns ``"interrupted"``; any other exception (e.g. SIGTERM turned into an exception
    by ``terminate_like_ctrl_c``) propagates after every child is stopped.
    """
    try:
        stack.start()
        if on_started is not None:
            on_started(stack)
        while all(p.poll() is None for p in stack.processes()):
            time.sleep(poll_s)
        return "a service exited"
    except KeyboardInterrupt:
        return "interrupted"
    finally:
        stack.stop()


def _port_of(url: str | None) -> int | None:
    if not url:
        return None
    from urllib.parse import urlparse

    return urlparse(url).port


def _port_in_use(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_background(settings) -> list[str]:
    """Stop a stack started with ``recloop up --background``; returns the names stopped.

    The services go first (SIGTERM, then SIGKILL after a second), the backing databases last, each
    with its own clean-stop signal and grace (PostgreSQL: SIGINT, a fast shutdown).
    """
    path = settings.state_dir / "stack.json"
    if not path.exists():
        return []
    state = json.loads(path.read_text())
    apps = {k: v for k, v in state.items() if "stop_signal" not in v}
    backing = {k: v for k, v in state.items() if "stop_signal" in v}
    for info in apps.values():
        _killpg(info["pid"], signal.SIGTERM)
    if apps:
        time.sleep(1.0)
    for info in apps.values():
        _killpg(info["pid"], signal.SIGKILL)
    for info in reversed(list(backing.values())):
        _killpg(info["pid"], getattr(signal, info["stop_signal"]))
        deadline = time.monotonic() + float(info.get("grace", 10))
        while time.monotonic() < deadline and _alive(info["pid"]):
            time.sleep(0.2)
        _killpg(info["pid"], signal.SIGKILL)
    path.unlink(missing_ok=True)
    return list(state)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of ours counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
