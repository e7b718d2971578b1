"""``recloop models`` (versions, aliases, metrics, gate results), ``recloop rollback`` and ``recloop prune``."""

from __future__ import annotations

from pathlib import Path

import typer

from recloop.cli_common import JsonOpt, WorkspaceOpt, emit, fail, settings_for, table

_METRICS = ("auc", "ndcg_at_10", "cold_item_auc", "tail_exposure")


def register(app: typer.Typer) -> None:
    app.command("models")(models)
    app.command("rollback")(rollback)
    app.command("prune")(prune)


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _why(v: dict, limit: int | None = None) -> str:
    failed = [k for k, x in v["gates"].items() if str(x).startswith("fail")]
    reason = v["gate_reasons"] or ""
    return ", ".join(failed) or (reason[:limit] if limit else reason)


def _render(versions: list[dict], wide: bool = False) -> None:
    """One row per version. By default the columns a person reads at a glance in an 80-column terminal
    (version, aliases, decision, AUC, why); ``wide``: every metric and the trigger too."""
    if not versions:
        typer.echo("no registered model versions yet")
        return
    if not wide:
        rows = [[v["version"], ",".join(v["aliases"]), v["gate_decision"] or "",
                 _fmt(v["metrics"].get("auc")), _why(v)] for v in versions]
        table("model versions (newest first; --wide for every metric)",
              ["version", "aliases", "decision", "auc", "failed gates / reason"], rows)
        return
    rows = [[v["version"], ",".join(v["aliases"]), v["gate_decision"] or "",
             *[_fmt(v["metrics"].get(m)) for m in _METRICS], _why(v, 60),
             v["lineage"].get("trigger_reason", "")] for v in versions]
    table("model versions (newest first)", ["version", "aliases", "decision", *_METRICS, "failed gates / reason",
                                            "trigger"], rows)


def models(workspace: Path = WorkspaceOpt, as_json: bool = JsonOpt,
           wide: bool = typer.Option(False, "--wide", help="Every column: all metrics and the trigger")):
    """List registered model versions: aliases, gate decision, AUC, failed gates (--wide: every metric and
    the trigger)."""
    from models.registry import list_versions

    emit(list_versions(settings_for(workspace)), as_json, lambda versions: _render(versions, wide))


def rollback(
    reason: str = typer.Option(..., "--reason", help="Why (recorded on both versions)"),
    workspace: Path = WorkspaceOpt,
    as_json: bool = JsonOpt,
):
    """Move the champion alias back to the previous version and record why."""
    from models.registry import RegistryError
    from models.registry import rollback as do_rollback

    try:
        result = do_rollback(settings_for(workspace), reason)
    except RegistryError as exc:
        fail(str(exc))
    emit(result.to_dict(), as_json,
         lambda d: typer.echo(f"champion: version {d['champion_before']} -> {d['champion_after']} ({reason})"))


def prune(
    keep: int = typer.Option(None, "--keep", min=0,
                             help="Newest versions that keep their artifacts (default: retrain.keep_versions)"),
    workspace: Path = WorkspaceOpt,
    as_json: bool = JsonOpt,
):
    """Apply the retention policy: versions without an alias, older than the newest N, lose their heavy
    artifacts (weights, encoder); their MLflow records stay. Identical large files are shared."""
    from models.retention import disk_usage, housekeeping, prune_versions

    settings = settings_for(workspace)
    if keep is None:
        out = housekeeping(settings)
    else:
        before = disk_usage(settings.models_dir)
        out = {**prune_versions(settings, keep).to_dict(), "disk_bytes_before": before,
               "disk_bytes_after": disk_usage(settings.models_dir)}
    emit(out, as_json, lambda d: typer.echo(
        f"pruned versions: {', '.join(d['pruned']) or 'none'}; kept: {', '.join(d['kept']) or 'none'}; "
        f"disk {d['disk_bytes_before'] / 1e6:.1f} -> {d['disk_bytes_after'] / 1e6:.1f} MB"
        + (f"; errors: {d['errors']}" if d["errors"] else "")))
