"""CLI of the data-checks room: ``recloop ingest`` and ``recloop quarantine list|release``."""

from __future__ import annotations

from pathlib import Path

import typer

from recloop.cli_common import JsonOpt, WorkspaceOpt, emit, fail, settings_for, table

PathArg = typer.Argument(None, help="One file inside the workspace's landing/ (or use --all / --copy-from)")
CopyFromOpt = typer.Option(None, "--copy-from", metavar="FILE",
                           help="Copy FILE (from anywhere; left untouched) into landing/, then ingest the copy")
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
    copy_from: Path = CopyFromOpt,
    workspace: Path = WorkspaceOpt,
    as_json: bool = JsonOpt,
):
    """Validate landing files with Great Expectations; store good rows, quarantine the rest with reasons.

    PATH must lie inside the workspace's landing/ (after symlinks and `..`): ingest moves the file
    on to processed/ or quarantine/. A file from elsewhere comes in only as a copy, with --copy-from.
    """
    from data_checks.ingest import confine_to_landing, copy_into_landing, ingest_all, ingest_batch
    from recloop.paths import PathOutsideRoot

    if sum((path is not None, all_, copy_from is not None)) != 1:
        fail("give either a PATH, --all or --copy-from FILE")
    s = settings_for(workspace)
    try:
        if all_:
            outcomes = ingest_all(s)
        elif copy_from is not None:
            outcomes = [ingest_batch(copy_into_landing(copy_from, s), s)]
        else:  # relative to the shell's directory, as any CLI path; then it must be inside landing/
            outcomes = [ingest_batch(confine_to_landing(path.absolute(), s), s)]
    except PathOutsideRoot as exc:
        fail(f"{exc} (to ingest a file from elsewhere, copy it in: recloop ingest --copy-from FILE)")
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
    except (KeyError, ValueError, FileNotFoundError) as exc:
        fail(str(exc.args[0] if exc.args else exc))
    emit([out.to_dict()], as_json, _render_outcomes)
    if out.status == "quarantined":
        raise typer.Exit(2)
