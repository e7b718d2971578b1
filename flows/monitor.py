"""The monitor flow: one drift check, its report as artifacts, and the trigger event.

Thin: the decision is ``monitoring.drift.detect_drift``, the registered champion comes through
``monitoring.champion`` (its MLflow lineage read by ``models.champion``). This file publishes the result, and on ``should_retrain`` emits ``recloop.drift.detected`` (resource
``recloop.workspace.<name>``, which the retrain deployment's trigger matches; related
resource ``recloop.monitor.<name>``) with reason, drift share, windows and report path.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.events import DRIFT_DETECTED, workspace_resource
from monitoring.champion import load_champion_for_monitoring
from monitoring.drift import detect_drift
from monitoring.windows import ChampionInfo
from recloop.settings import load_settings
from recloop.store import FeedbackStore

champion_task = task(load_champion_for_monitoring, name="load-champion", cache_policy=NO_CACHE, retries=2,
                     retry_delay_seconds=[2, 10])
detect_task = task(detect_drift, name="detect-drift", cache_policy=NO_CACHE)


@task(name="publish", cache_policy=NO_CACHE)
def publish(settings, doc: dict, markdown: str) -> str | None:
    """Markdown + link artifacts; on a retrain decision, the event. Returns the event id."""
    create_markdown_artifact(key="drift-decision", markdown=markdown,
                             description=f"Drift check of {settings.root.name}: reason {doc.get('reason')}")
    if doc.get("report_path"):
        create_link_artifact(key="drift-report", link=Path(doc["report_path"]).resolve().as_uri(),
                             link_text=Path(doc["report_path"]).name,
                             description="Evidently drift report (HTML, with tests)")
    if not doc.get("should_retrain"):
        return None
    from prefect.events import emit_event

    payload = {k: doc.get(k) for k in ("reason", "triggers", "drift_share", "drifted_columns", "windows",
                                       "report_path", "champion_version", "target_drift", "prediction_drift",
                                       "live_auc", "offline_auc", "auc_drop", "n_current", "json_path")}
    event = emit_event(event=DRIFT_DETECTED, resource=workspace_resource(settings), payload=payload,
                       related=[{"prefect.resource.id": f"recloop.monitor.{settings.root.name}",
                                 "prefect.resource.role": "monitor"}])
    return None if event is None else str(event.id)


@flow(name="monitor", log_prints=True,
      description="Evidently drift (data, target, prediction) and the champion's live AUC; emits "
                  f"{DRIFT_DETECTED} when a retrain is due and storm control allows it.")
def monitor_flow(workspace: str | None = None, now: str | None = None, champion: dict | None = None) -> dict:
    """``champion`` (ChampionInfo fields) overrides the registry lookup: back-fills, tests."""
    settings = load_settings(workspace).ensure_dirs()
    logger = get_run_logger()
    store = FeedbackStore.from_settings(settings)
    if champion:
        info, scorer = ChampionInfo.from_dict(champion), None
    else:
        info, scorer = champion_task(settings, store)
    outcome = detect_task(settings, store, info, scorer, now=now, record=True)
    doc = outcome.to_dict()
    doc["event_id"] = publish(settings, doc, outcome.to_markdown())
    logger.info("drift check: status=%s should_retrain=%s reason=%s suppressed_by=%s share=%s report=%s",
                outcome.status, outcome.should_retrain, outcome.reason, outcome.suppressed_by,
                outcome.drift_share, outcome.report_path)
    return doc
