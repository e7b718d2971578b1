"""Issue 14, item 9: a SIGTERM'd ``recloop up`` / ``recloop retrain`` stops the processes it started.

``docker stop``, systemd and supervisors send SIGTERM, whose default action ends Python at once:
no ``finally``, no ``atexit``, so the children (Prefect server, MLflow server, API, Prefect's
temporary server) became orphans. Each test runs the real command in a subprocess, sends SIGTERM
once the children are up, and checks that none of them survives.

Output goes to files, never pipes: an orphan holding an inherited pipe would hang the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 120  # upper bound for a busy machine; the tests do not assert on time


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECLOOP_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def _wait_for(predicate, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the command exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"no {what} within {WAIT_S}s:\n{log.read_text()[-3000:]}")


def _alive(procs) -> list:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _kill_all(procs) -> None:
    for p in _alive(procs):
        try:
            p.kill()
            p.wait(10)
        except psutil.Error:
            pass


def _sigterm_and_collect(proc: subprocess.Popen, children, log: Path) -> tuple[int, list]:
    """SIGTERM the command, wait for it, return its exit code and the children still alive."""
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"the command did not exit after SIGTERM:\n{log.read_text()[-3000:]}")
    left = _alive(children)
    if left:  # give a child that is already dying a moment (a bounded wait, not a timing assert)
        psutil.wait_procs(left, timeout=10)
        left = _alive(children)
    return rc, left


def test_sigterm_to_recloop_up_stops_every_service(tmp_path):
    """``recloop up`` in the foreground with stand-in services (one of them with a grandchild)."""
    ws = tmp_path / "ws"
    script = textwrap.dedent(f"""
        import sys
        import flows.stack as st

        def services(settings, with_mlflow=True, with_serving=True):
            return [st.Service("prefect-server", ["sh", "-c", "sleep 300 & wait"], None, None),
                    st.Service("mlflow-server", ["sleep", "300"], None, None),
                    st.Service("serving", ["sleep", "300"], None, None)]

        st.services = services
        from recloop.cli import app
        app(["up", "-w", {str(ws)!r}, "--no-mlflow"], prog_name="recloop")
    """)
    log = tmp_path / "up.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=_env(), stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    children = []
    try:
        state = ws / "state" / "stack.json"
        _wait_for(state.exists, "stack.json (all services started)", proc, log)
        me = psutil.Process(proc.pid)
        children = _wait_for(lambda: (c := me.children(recursive=True)) and len(c) >= 4 and c,
                             "the services and the grandchild", proc, log)
        rc, left = _sigterm_and_collect(proc, children, log)
        assert not left, f"orphans after SIGTERM: {[p.cmdline() for p in left]}\n{log.read_text()[-2000:]}"
        assert rc == 128 + signal.SIGTERM, log.read_text()[-2000:]
        assert not state.exists()  # stopped like `recloop down` would
    finally:
        _kill_all(children)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_sigterm_to_recloop_retrain_runs_the_exit_cleanup(tmp_path):
    """``recloop retrain`` with a stand-in flow that starts a server the way Prefect's temporary server
    does (``subprocess.Popen`` + ``atexit.register(stop)``): SIGTERM must let the ``atexit`` hook run."""
    ws = tmp_path / "ws"
    ready = tmp_path / "server.pid"
    script = textwrap.dedent(f"""
        import atexit, subprocess, sys, time, types

        def retrain_flow(reason, workspace):
            server = subprocess.Popen(["sleep", "300"])  # Prefect's SubprocessASGIServer.start, in small

            def stop():
                server.terminate()
                server.wait(5)

            atexit.register(stop)
            open({str(ready)!r}, "w").write(str(server.pid))
            time.sleep(300)

        sys.modules["flows.retrain"] = types.SimpleNamespace(retrain_flow=retrain_flow)
        from recloop.cli import app
        app(["retrain", "-w", {str(ws)!r}], prog_name="recloop")
    """)
    log = tmp_path / "retrain.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=_env(), stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    children = []
    try:
        pid = int(_wait_for(lambda: ready.exists() and ready.read_text().strip(), "the stand-in server", proc, log))
        children = [psutil.Process(pid)]
        rc, left = _sigterm_and_collect(proc, children, log)
        assert not left, f"the server outlived `recloop retrain`:\n{log.read_text()[-2000:]}"
        assert rc == 128 + signal.SIGTERM and "stopped by SIGTERM" in log.read_text()
    finally:
        _kill_all(children)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow  # imports the training stack and starts Prefect's real temporary server: ~10-20 s
def test_sigterm_to_recloop_retrain_stops_its_temporary_prefect_server(tmp_path):
    ws = tmp_path / "ws"
    log = tmp_path / "retrain.log"
    env = _env()
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "recloop.cli", "retrain", "-w", str(ws)], cwd=REPO, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    children = []
    try:
        me = psutil.Process(proc.pid)

        def temporary_server():
            return [c for c in me.children(recursive=True) if "uvicorn" in " ".join(c.cmdline())]

        children = _wait_for(temporary_server, "Prefect's temporary server", proc, log)
        rc, left = _sigterm_and_collect(proc, children, log)
        assert not left, f"Prefect's temporary server outlived `recloop retrain`:\n{log.read_text()[-2000:]}"
        assert rc == 128 + signal.SIGTERM, log.read_text()[-2000:]
    finally:
        _kill_all(children)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_terminate_like_ctrl_c_unwinds_once_and_restores_the_handlers():
    import typer

    from recloop.cli_common import terminate_like_ctrl_c

    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(typer.Exit) as exc, terminate_like_ctrl_c():
        try:
            signal.raise_signal(signal.SIGTERM)
            pytest.fail("SIGTERM did not unwind")  # pragma: no cover
        finally:
            signal.raise_signal(signal.SIGTERM)  # a second SIGTERM while cleaning up is ignored
            cleaned.append(True)
    assert exc.value.exit_code == 128 + signal.SIGTERM and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_a_flow_turned_into_its_own_exception_exits_like_sigterm():
    """Inside a flow Prefect (or the retrain flow) holds the handler and raises its own exception."""
    import typer

    from recloop.cli_common import terminate_like_ctrl_c

    class Terminated(BaseException):  # the shape of flows.retrain.Terminated
        signum = signal.SIGTERM

    with pytest.raises(typer.Exit) as exc, terminate_like_ctrl_c():
        raise Terminated()
    assert exc.value.exit_code == 128 + signal.SIGTERM
    with pytest.raises(KeyboardInterrupt), terminate_like_ctrl_c():  # Ctrl-C stays Ctrl-C
        raise KeyboardInterrupt
