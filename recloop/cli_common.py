"""Shared pieces for room command modules (``<room>/commands.py``): options, output."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

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
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}")
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
