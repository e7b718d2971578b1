"""Shared fixtures: a throwaway workspace per test, Prefect/HF kept offline and quiet."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """Settings bound to a fresh workspace under tmp_path; no RECLOOP_* leaks in from the shell."""
    for key in list(os.environ):
        if key.startswith("RECLOOP_"):
            monkeypatch.delenv(key)
    from recloop.settings import load_settings

    return load_settings(tmp_path / "ws").ensure_dirs()


@pytest.fixture
def small_world():
    """A small synthetic world (fast to generate) for room tests."""
    from recloop.datasets.synthetic import generate

    return generate(small_world_config(bad_batch_day=2))


def permissive_toml(encoder, extra: str = "") -> str:
    """Workspace settings for flow tests: a tiny encoder, one epoch, and gates that let any working
    candidate through (these tests are about orchestration, not model quality)."""
    return (f'{extra}[training]\nencoder_path = "{encoder}"\nmax_epochs = 1\n'
            "[gates]\nmin_eval_events = 0\nmin_eval_positives = 0\nmin_eval_negatives = 0\n"
            "min_auc = 0.0\nmin_ndcg = 0.0\nbaseline_margin = -1.0\nmax_auc_drop = 1.0\ncatalog_eval_users = 100\n"
            "max_group_auc_gap = 1.0\nmax_gap_increase = 1.0\nmin_tail_exposure = 0.0\n")


def events_named(name: str, resource_id: str, wait_s: float = 30.0) -> list:
    """Events of this name about this resource, read back from the Prefect server of the current settings;
    polls up to ``wait_s`` (the server persists events in batches)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    flt = EventFilter(event=EventNameFilter(name=[name]), resource=EventResourceFilter(id=[resource_id]))
    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            events = client.read_events(filter=flt, limit=50).events
            if events or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread, restoring the previous setting afterwards."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ---- every test that starts a process stops it (issue 14, item 9) ----------------------------------
# Descendants inherit this mark through their environment, so an orphan re-parented to init (a server
# whose parent was SIGKILLed, a `prefect worker` left running) is still found at the end of the session.
PROCESS_MARK = "PYTEST_RECLOOP_SESSION"
os.environ[PROCESS_MARK] = f"{os.getpid()}-{os.urandom(6).hex()}"  # this session's own (a nested pytest gets its own)
EXIT_MANAGED = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")  # end with the interpreter


def _leftover_processes() -> list:
    import psutil

    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)}
    mark = os.environ[PROCESS_MARK]
    for p in psutil.process_iter(["pid"]):
        if p.pid == me.pid or p.pid in found:
            continue
        try:
            if p.environ().get(PROCESS_MARK) == mark:
                found[p.pid] = p
        except (psutil.Error, OSError):
            continue
    left = []
    for p in found.values():
        try:
            if p.status() == psutil.STATUS_ZOMBIE or any(m in " ".join(p.cmdline()) for m in EXIT_MANAGED):
                continue
            left.append(p)
        except psutil.Error:
            continue
    return left


@pytest.fixture(scope="session", autouse=True)
def no_child_process_outlives_the_suite():
    """At the end of the session no process started by a test is still running; any that is, is
    stopped (SIGTERM, then SIGKILL) and the session fails with its command line."""
    yield
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dev dependency
        import warnings

        warnings.warn("psutil is not installed: the leftover-process check did not run", stacklevel=1)
        return
    import sys

    server_mod = sys.modules.get("prefect.server.api.server")
    if server_mod is not None:  # Prefect's temporary servers stop at interpreter exit (atexit): stop them now
        for server in list(getattr(server_mod.SubprocessASGIServer, "_instances", {}).values()):
            server.stop()
    left = _leftover_processes()
    if not left:
        return
    described = []
    for p in left:
        try:
            described.append(f"pid {p.pid} (parent {p.ppid()}): {' '.join(p.cmdline())[:300]}")
        except psutil.Error:
            described.append(f"pid {p.pid}")
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    pytest.fail("processes started during the tests outlived them (now stopped):\n  " + "\n  ".join(described),
                pytrace=False)


# ---- the small synthetic world most tests share (issue 16: one literal, not seven) -------------------
def small_world_config(**changes):
    """``SyntheticConfig`` of the small world: 120 users, 80 items, 14 daily batches, drift from day 9 with
    16 new items, no corrupted batch; ``changes`` override any field (e.g. ``bad_batch_day=2``)."""
    from recloop.datasets.synthetic import SyntheticConfig

    fields = {"seed": 3, "n_users": 120, "n_items": 80, "n_days": 14, "drift_day": 9, "drift_items": 16,
              "bad_batch_day": None}
    return SyntheticConfig(**{**fields, **changes})
