"""One whole turn of the loop, for running by hand: ingest -> monitor -> retrain if drift.

In production the turn is split across deployments (cron ingest, cron monitor, and a
retrain deployment triggered by the ``recloop.drift.detected`` event); this flow runs
the same three flows as subflows, and by default calls retrain itself
(``retrain_inline=True``) so it also works without a Prefect server's triggers.
"""

from __future__ import annotations

from prefect import flow

from flows.ingest import ingest_flow
from flows.monitor import monitor_flow
from flows.retrain import retrain_flow


@flow(name="loop", log_prints=True, description="One turn: ingest new feedback, check drift, retrain if needed.")
def loop_flow(workspace: str | None = None, retrain_inline: bool = True) -> dict:
    ingested = ingest_flow(workspace=workspace)
    drift = monitor_flow(workspace=workspace)
    retrain = None
    if retrain_inline and drift.get("should_retrain"):
        retrain = retrain_flow(reason=drift.get("reason", "drift"), workspace=workspace,
                               drift_report=drift.get("report_path"))
    return {"ingest": ingested, "monitor": drift, "retrain": retrain}
