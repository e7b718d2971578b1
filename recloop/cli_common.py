"""Shared pieces for room command modules (``<room>/commands.py``): options, output."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

WorkspaceOpt = typer.Option(None, "--workspace", "-w", help="Workspace folder (default: $RECLOOP_WORKSPACE or ./.recloop)")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout")


def settings_for(workspace: Path | None):
    from recloop.settings import load_settings

    return load_settings(workspace)


def emit(doc: Any, as_json: bool, render: Callable[[Any], None] | None = None) -> None:
    """Print ``doc`` as one JSON document (``--json``) or through ``render`` (rich tables)."""
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
        return
    if render is not None:
        render(doc)
    else:
        from rich import print_json

        print_json(json.dumps(doc, default=str))


def fail(message: str, code: int = 1) -> None:
    """Print ``error: <message>`` on stderr as one line (never wrapped at the console width, so a long path
    stays whole and greppable; brackets in it are text, not markup) and exit with ``code``."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    Console().print(t)


class StopSignal(BaseException):
    """SIGTERM or SIGHUP (``docker stop``, systemd, a supervisor, a closed terminal), raised like Ctrl-C."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def terminate_like_ctrl_c(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Inside: SIGTERM/SIGHUP raise :class:`StopSignal`, so ``finally`` blocks and ``atexit`` hooks run.

    The default action of SIGTERM ends the process at once: no cleanup, so the children it started
    (a Prefect server, MLflow, the API, Prefect's temporary server) outlive it. Here the first signal
    unwinds the command like Ctrl-C; repeats are ignored while the cleanup runs (SIGKILL stays the
    hard stop). The command then exits with ``128 + signal`` (143 for SIGTERM), as a shell reports it.
    Outside the main thread (signals cannot be caught there) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if fired:  # already stopping: let the cleanup finish
            return
        fired.append(signum)
        raise StopSignal(signum)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    except BaseException as exc:
        signum = _signal_of(exc)
        if signum is None:
            raise
        from rich.console import Console

        Console(stderr=True).print(f"[bold yellow]{exc}[/]: stopped cleanly")
        raise typer.Exit(128 + signum) from None
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _signal_of(exc: BaseException) -> int | None:
    """The signal behind ``exc``: ours, or one a flow turned into its own exception while it held the
    handler (``flows.retrain.Terminated.signum``, Prefect's ``TerminationSignal.signal``)."""
    if isinstance(exc, (Exception, SystemExit, KeyboardInterrupt, GeneratorExit)):
        return None
    for attr in ("signum", "signal"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return int(value)
    return None
