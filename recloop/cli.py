"""The ``recloop`` command line.

Commands of the spine live here; each room adds its own from ``<room>/commands.py``
through a ``register(app)`` function. A room's command module imports only Typer and the
spine at the top (its room is imported inside each command), so ``recloop --help`` stays
fast; a room whose command module fails to import fails the CLI loudly.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import typer
from typer.core import TyperGroup

from recloop.cli_common import JsonOpt, WorkspaceOpt, emit, fail, settings_for, table


def _no_value_shown(option):
    """A flag takes no value, so its help shows no type (Typer's rich help prints ``<bool>`` next to
    every flag, ``--help`` included, which reads as if the flag wanted an argument)."""
    if option is not None and getattr(option, "is_flag", False) and option.metavar is None:
        option.metavar = ""
    return option


class CommandGroup(TyperGroup):
    """The ``recloop`` group: help without ``<bool>`` next to flags, for the group and every command."""

    def get_help_option(self, ctx):
        return _no_value_shown(super().get_help_option(ctx))

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            for param in command.params:
                _no_value_shown(param)
            _no_value_shown(command.get_help_option(ctx))
        return command


app = typer.Typer(help="recloop: a self-retraining BERT recommender (Prefect, GX, Evidently, Lightning, MLflow).",
                  no_args_is_help=True, add_completion=False, cls=CommandGroup)

# Defaults for every command: offline model loading, no Prefect analytics, and a patient
# ephemeral Prefect server (its 20 s default is too short on a busy 2-core machine).
PROCESS_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


@app.callback()
def _defaults() -> None:
    import os

    for key, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(key, value)


ROOM_COMMANDS = ("data_checks.commands", "models.commands", "models.registry_commands", "monitoring.commands", "flows.commands",
                 "serving.commands", "replay.commands")


@app.command()
def generate(
    workspace: Path = WorkspaceOpt,
    seed: int = typer.Option(7, help="Random seed"),
    users: int = typer.Option(500, help="Number of users"),
    items: int = typer.Option(320, help="Number of catalog items (before the drift launch)"),
    days: int = typer.Option(28, help="Number of daily batches"),
    drift_day: int = typer.Option(18, help="Day the drift starts (-1: no drift)"),
    bad_batch_day: int = typer.Option(3, help="Day whose batch is corrupted (-1: none)"),
    fmt: str = typer.Option("parquet", "--format", help="Batch file format: parquet, csv or jsonl"),
    as_json: bool = JsonOpt,
):
    """Generate the synthetic world: catalog and users into the store, daily batches into landing/."""
    from recloop.datasets import land_synthetic
    from recloop.datasets.synthetic import SyntheticConfig

    cfg = SyntheticConfig(seed=seed, n_users=users, n_items=items, n_days=days,
                          drift_day=None if drift_day < 0 else drift_day,
                          bad_batch_day=None if bad_batch_day < 0 else bad_batch_day)
    s = settings_for(workspace)
    out = land_synthetic(s, cfg, fmt)
    out.pop("data")
    out["landing"] = str(s.landing_dir)
    out.pop("files")
    emit(out, as_json, lambda d: table("generated", ["what", "value"], [[k, v] for k, v in d.items()]))


PeriodOpt = typer.Option(7, "--period-days", help="Days per landing batch")
FormatOpt = typer.Option("parquet", "--format", help="Batch file format: parquet, csv or jsonl")
LikeOpt = typer.Option(4.0, "--like-threshold", help="Label rule: rating >= this -> like (1), else dislike (0)")
MapOpt = typer.Option(None, "--map", help="COLUMN=FIELD (repeatable); events./items./users.COLUMN=FIELD for one "
                                          "file. Fields: see recloop/datasets/contracts.py")
TimeUnitOpt = typer.Option("s", "--time-unit", help="Unit of numeric timestamps: s, ms, us or ns")
IdPrefixOpt = typer.Option("", "--id-prefix", help="Prefix for user and item ids (keeps datasets apart)")
MovieLensArg = typer.Argument(..., help="Folder with u.data, u.item, u.user (MovieLens-100k format)")
RecBoleArg = typer.Argument(..., help="Folder with RecBole atomic files <name>.inter, .item and optional .user; or the .inter file")
RecBoleNameOpt = typer.Option(None, help="Dataset name, when the folder holds several (<name>.inter)")
EventsOpt = typer.Option(..., "--events", help="Events file (CSV, TSV or Parquet)")
ItemsOpt = typer.Option(..., "--items", help="Items file (CSV, TSV or Parquet)")
UsersOpt = typer.Option(None, "--users", help="Users file with group attributes (optional)")
SourceOpt = typer.Option(None, help="Name for the batch files (default: the events file's name)")


def _import_render(d: dict) -> None:
    rows = [[k, v] for k, v in d.items() if k != "notes"]
    rows += [[f"note: {k}", v] for k, v in d.get("notes", {}).items()]
    table("imported", ["what", "value"], rows)
    print(f"next: recloop ingest --all -w {d['workspace']}")


def _land(s, fn, as_json: bool) -> None:
    try:
        out = fn()
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    out.pop("files")
    out["workspace"] = str(s.root)
    out["landing"] = str(s.landing_dir)
    emit(out, as_json, _import_render)


@app.command("import-movielens")
def import_movielens(
    path: Path = MovieLensArg,
    workspace: Path = WorkspaceOpt,
    period_days: int = PeriodOpt,
    fmt: str = FormatOpt,
    like_threshold: float = LikeOpt,
    as_json: bool = JsonOpt,
):
    """Load a MovieLens-100k folder: catalog and users into the store, batches into landing/."""
    from recloop.datasets import land_movielens

    s = settings_for(workspace)
    _land(s, lambda: land_movielens(s, path, period_days, fmt, like_threshold), as_json)


@app.command("import-recbole")
def import_recbole(
    path: Path = RecBoleArg,
    name: str = RecBoleNameOpt,
    workspace: Path = WorkspaceOpt,
    period_days: int = PeriodOpt,
    fmt: str = FormatOpt,
    like_threshold: float = LikeOpt,
    maps: list[str] = MapOpt,
    time_unit: str = TimeUnitOpt,
    id_prefix: str = IdPrefixOpt,
    as_json: bool = JsonOpt,
):
    """Load a RecBole dataset (atomic files): catalog and users into the store, batches into landing/."""
    from recloop.datasets import land_recbole

    s = settings_for(workspace)
    _land(s, lambda: land_recbole(s, path, name=name, period_days=period_days, fmt=fmt,
                                  like_threshold=like_threshold, maps=maps, time_unit=time_unit,
                                  id_prefix=id_prefix), as_json)


@app.command("import")
def import_tables(
    events: Path = EventsOpt,
    items: Path = ItemsOpt,
    users: Path = UsersOpt,
    maps: list[str] = MapOpt,
    source: str = SourceOpt,
    workspace: Path = WorkspaceOpt,
    period_days: int = PeriodOpt,
    fmt: str = FormatOpt,
    like_threshold: float = LikeOpt,
    time_unit: str = TimeUnitOpt,
    id_prefix: str = IdPrefixOpt,
    as_json: bool = JsonOpt,
):
    """Load events/items/users tables with a column map: catalog and users into the store, batches into landing/."""
    from recloop.datasets import land_tables

    s = settings_for(workspace)
    _land(s, lambda: land_tables(s, events, items, users, maps=maps, source=source, period_days=period_days,
                                 fmt=fmt, like_threshold=like_threshold, time_unit=time_unit,
                                 id_prefix=id_prefix), as_json)


@app.command()
def status(workspace: Path = WorkspaceOpt, as_json: bool = JsonOpt):
    """What is in the workspace: batches landed / ingested / quarantined, events, model versions."""
    from recloop.status import workspace_status

    doc = workspace_status(settings_for(workspace))
    emit(doc, as_json, _render_status)


def _render_status(doc: dict) -> None:
    rows = [[k, v] for k, v in doc.items() if not isinstance(v, (list, dict))]
    table(f"recloop workspace {doc['workspace']}", ["what", "value"], rows)
    if doc.get("models"):
        table("model versions", ["version", "aliases", "status"],
              [[m["version"], ",".join(m["aliases"]), m.get("status")] for m in doc["models"]])


def _register_rooms() -> None:
    for name in ROOM_COMMANDS:
        importlib.import_module(name).register(app)


_register_rooms()

if __name__ == "__main__":  # pragma: no cover
    app()
