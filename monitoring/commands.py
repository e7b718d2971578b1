"""``recloop monitor``: run the drift check once and print the decision."""

from __future__ import annotations

from pathlib import Path

import typer

from recloop.cli_common import JsonOpt, WorkspaceOpt, emit, fail, settings_for, table


def register(app: typer.Typer) -> None:
    @app.command("monitor")
    def monitor(
        workspace: Path = WorkspaceOpt,
        as_json: bool = JsonOpt,
        now: str = typer.Option(None, help="End of the current window (UTC, ISO); default: the newest event"),
        record: bool = typer.Option(False, "--record/--no-record",
                                    help="Write the decision into storm state (mark a retrain pending, log "
                                         "suppressions) as the monitor flow does; default only looks"),
    ):
        """Drift of data, target and predictions vs the champion's training window; prints the decision."""
        from monitoring.drift import detect_drift
        from recloop.store import FeedbackStore

        s = settings_for(workspace)
        s.ensure_dirs()
        store = FeedbackStore.from_settings(s)
        from monitoring.champion import load_champion_for_monitoring

        info, scorer = load_champion_for_monitoring(s, store)
        try:
            outcome = detect_drift(s, store, info, scorer, now=now, record=record)
        except ValueError as exc:
            fail(str(exc))
        emit(outcome.to_dict(), as_json, _render)


def _render(doc: dict) -> None:
    rows = [["status", doc["status"]], ["should_retrain", doc["should_retrain"]], ["reason", doc["reason"]],
            ["triggers", ", ".join(doc["triggers"]) or "-"], ["suppressed_by", ", ".join(doc["suppressed_by"]) or "-"],
            ["champion", doc["champion_version"]],
            ["reference", (f"{doc['windows'].get('reference_start')} .. {doc['windows'].get('reference_end')} "
                          f"({doc['n_reference']} events, {doc['n_reference_sampled']} sampled)")],
            ["current", (f"{doc['windows'].get('current_start')} .. {doc['windows'].get('current_end')} "
                        f"({doc['n_current']} events, {doc['n_current_sampled']} sampled)")],
            ["drift share", doc["drift_share"] if doc["drift_share"] is None
             else f"{doc['drift_share']:.2f} (threshold {doc['drift_share_threshold']})"],
            ["like-rate ref -> cur", f"{doc['like_rate_reference']} -> {doc['like_rate_current']}"],
            ["live AUC / offline / drop", f"{doc['live_auc']} / {doc['offline_auc']} / {doc['auc_drop']}"],
            ["report", doc["report_path"]], ["decision json", doc["json_path"]]]
    table("drift decision", ["what", "value"], rows)
    if doc["columns"]:
        table("columns", ["column", "role", "method", "score", "threshold", "verdict"],
              [[c["column"], c["role"], c["method"], f"{c['score']:.4f}", f"{c['threshold']:.3g}",
                "DRIFT" if c["drifted"] else "ok"] for c in doc["columns"]])
    for n in doc["notes"]:
        print(f"note: {n}")
