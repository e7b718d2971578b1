"""``recloop up`` / ``recloop down``: the local stack, on loopback, bound to one workspace.

* Prefect server (SQLite under ``<workspace>/prefect``, analytics off) - the Prefect UI
* the deployments, served by ``python -m flows.deploy`` (cron ingest, cron monitor,
  event-triggered retrain)
* an MLflow server on the workspace's SQLite store and artifacts - the MLflow UI
* the serving API (``recloop serve``), when the serving room is installed

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
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


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


def services(settings, with_mlflow: bool = True, with_serving: bool = True) -> list[Service]:
    ws = str(settings.root)
    out = []
    if not settings.prefect_api_url:  # no external server given: start our own
        out.append(Service("prefect-server",
                           [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                            "--port", str(settings.prefect_port), "--log-level", "WARNING"],
                           f"http://127.0.0.1:{settings.prefect_port}", prefect_api_url(settings) + "/health"))
    out.append(Service("deployments", [sys.executable, "-m", "flows.deploy", "--workspace", ws], None, None))
    if with_mlflow and settings.tracking_uri.startswith("sqlite:"):
        out.append(Service("mlflow-server",
                           [str(BIN / "mlflow"), "server", "--backend-store-uri", settings.tracking_uri,
                            "--default-artifact-root", settings.artifact_root, "--host", "127.0.0.1",
                            "--port", str(settings.mlflow_port), "--workers", "1"],
                           f"http://127.0.0.1:{settings.mlflow_port}", f"http://127.0.0.1:{settings.mlflow_port}/health"))
    if with_serving:
        out.append(Service("serving", [str(BIN / "recloop"), "serve", "--workspace", ws, "--host",
                                       settings.serving.host, "--port", str(settings.serving.port)],
                           f"http://{settings.serving.host}:{settings.serving.port}/docs", None))
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
    """Start services in order, wait for each to be healthy, stop them all in reverse."""

    def __init__(self, settings, with_mlflow: bool = True, with_serving: bool = True, log_dir: Path | None = None):
        self.settings = settings.ensure_dirs()
        self.services = services(settings, with_mlflow, with_serving)
        self.env = stack_env(settings)
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
            for svc in self.services:
                log = open(self.log_dir / f"{svc.name}.log", "ab")  # noqa: SIM115 - the child keeps writing to it
                svc.proc = subprocess.Popen(svc.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            cwd=str(Path(__file__).resolve().parent.parent))
                if svc.health:
                    wait_http(svc.health, timeout, svc.proc)
            self._write_state()
        except BaseException:
            self.stop()
            raise
        return self

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

    def client_settings(self):
        """Point this process's Prefect client at the stack's server (Prefect reads env vars only at import)."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: prefect_api_url(self.settings)})

    def _write_state(self) -> None:
        state = {s.name: {"pid": s.proc.pid, "url": s.url} for s in self.services if s.proc}
        (self.settings.state_dir / "stack.json").write_text(json.dumps(state, indent=2))

    def urls(self) -> dict[str, str]:
        return {s.name: s.url for s in self.services if s.url}

    def stop(self, grace: float = 10.0) -> None:
        stop_process_groups([svc.proc for svc in reversed(self.services) if svc.proc], grace)
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
        while all(svc.proc.poll() is None for svc in stack.services if svc.proc):
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


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    """Signal ``p``'s process group; a process that leads no group of its own gets the signal alone."""
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        if p.poll() is None:
            p.send_signal(sig)
    except PermissionError:
        pass


def stop_process_groups(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM each process's group (started with ``start_new_session=True``), wait up to ``grace``
    seconds in all, then SIGKILL the groups still running; every process is reaped.

    The whole group goes, so a child's own children (uvicorn workers, flow-run subprocesses) go too;
    SIGKILL is sent to the group even when its leader has exited, for children that ignored SIGTERM.
    """
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(p, signal.SIGKILL)  # stragglers of the group (no-op when it is empty)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state): report, do not hang
            pass


def stop_background(settings) -> list[str]:
    """Stop a stack started with ``recloop up --background``; returns the names stopped."""
    path = settings.state_dir / "stack.json"
    if not path.exists():
        return []
    state = json.loads(path.read_text())
    for info in state.values():
        _killpg(info["pid"], signal.SIGTERM)
    time.sleep(1.0)
    for info in state.values():
        _killpg(info["pid"], signal.SIGKILL)
    path.unlink(missing_ok=True)
    return list(state)
