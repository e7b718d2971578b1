"""CLI of the data-checks room: ``recloop ingest`` and ``recloop quarantine list|release``."""

from __future__ import annotations

from pathlib import Path

import typer

from recloop.cli_common import JsonOpt, WorkspaceOpt, emit, fail, settings_for, table

PathArg = typer.Argument(None, help="One landing file (default: use --all)")
IdArg = typer.Argument(..., metavar="ID", help="Id from `recloop quarantine list`")
quarantine_app = typer.Typer(help="Batches and rows held back by the data checks.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command()(ingest)
    app.add_typer(quarantine_app, name="quarantine")


def _render_outcomes(outcomes: list[dict]) -> None:
    table("ingest", ["file", "status", "rows", "new", "quarantined", "reasons"],
          [[o["source"], o["status"], o["n_rows"], o["n_new"], o["n_quarantined"],
            "\n".join(o["reasons"][:6])] for o in outcomes])


def ingest(
    path: Path = PathArg,
    all_: bool = typer.Option(False, "--all", help="Ingest every file waiting in landing/"),
    workspace: Path = WorkspaceOpt,
    as_json: bool = JsonOpt,
):
    """Validate landing files with Great Expectations; store good rows, quarantine the rest with reasons."""
    from data_checks.ingest import ingest_all, ingest_batch

    if (path is None) == (not all_):
        fail("give either a PATH or --all")
    s = settings_for(workspace)
    try:
        outcomes = ingest_all(s) if all_ else [ingest_batch(path, s)]
    except FileNotFoundError as exc:
        fail(str(exc))
    emit([o.to_dict() for o in outcomes], as_json, _render_outcomes)


@quarantine_app.command("list")
def quarantine_list(workspace: Path = WorkspaceOpt, as_json: bool = JsonOpt):
    """What is in quarantine and why."""
    from data_checks.quarantine import list_quarantine

    entries = list_quarantine(settings_for(workspace))
    emit(entries, as_json, lambda es: table("quarantine", ["id", "kind", "rows", "reasons"],
                                            [[e["id"], e["kind"], e["n_rows"], "\n".join(e["reasons"][:6])]
                                             for e in es]))


@quarantine_app.command("release")
def quarantine_release(entry_id: str = IdArg,
                       workspace: Path = WorkspaceOpt, as_json: bool = JsonOpt):
    """Re-validate a quarantined batch after a fix; ingest it if it now passes."""
    from data_checks.quarantine import release

    try:
        out = release(settings_for(workspace), entry_id)
    except (KeyError, FileNotFoundError) as exc:
        fail(str(exc.args[0] if exc.args else exc))
    emit([out.to_dict()], as_json, _render_outcomes)
    if out.status == "quarantined":
        raise typer.Exit(2)
