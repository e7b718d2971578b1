"""All deployments, declared in one place, served by one process.

* ``ingest``  - cron (``settings.ingest_cron``): validate and store new landing files
* ``monitor`` - cron (``settings.monitor_cron``): drift + performance decision; emits
  ``recloop.drift.detected`` when a retrain is due
* ``retrain`` - no schedule: an event trigger on ``recloop.drift.detected`` runs it with
  the event's reason and report path as parameters; one run at a time

``python -m flows.deploy --workspace W`` (what ``recloop up`` starts) serves them
against ``PREFECT_API_URL``. For a work pool instead of serve(), see README.
"""

from __future__ import annotations

import argparse

from flows.events import DRIFT_DETECTED


def build_deployments(settings):
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from flows.ingest import ingest_flow
    from flows.monitor import monitor_flow
    from flows.retrain import retrain_flow

    ws = str(settings.root)
    resource = f"recloop.workspace.{settings.root.name}"
    return [
        ingest_flow.to_deployment(
            name="ingest", cron=settings.ingest_cron, parameters={"workspace": ws}, tags=["recloop", "ingest"],
            description="Validate every new landing file with Great Expectations; store good rows, quarantine bad "
                        "batches with reasons.",
        ),
        monitor_flow.to_deployment(
            name="monitor", cron=settings.monitor_cron, parameters={"workspace": ws}, tags=["recloop", "monitor"],
            description="Evidently drift (data, target, prediction) and live AUC of the champion; emits "
                        f"{DRIFT_DETECTED} when a retrain is due.",
        ),
        retrain_flow.to_deployment(
            name="retrain", parameters={"workspace": ws}, tags=["recloop", "retrain"], concurrency_limit=1,
            description="Train a candidate, judge it against the champion on AUC and fairness gates, promote or "
                        "reject. Triggered by drift events.",
            triggers=[DeploymentEventTrigger(
                name=f"retrain on drift ({settings.root.name})",
                expect={DRIFT_DETECTED},
                match={"prefect.resource.id": resource},
                parameters={"workspace": ws, "reason": "{{ event.payload.reason }}",
                            "drift_report": "{{ event.payload.report_path }}"},
            )],
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    from prefect import serve

    from recloop.settings import load_settings

    parser = argparse.ArgumentParser(description="Serve recloop's deployments")
    parser.add_argument("--workspace", default=None)
    args = parser.parse_args(argv)
    settings = load_settings(args.workspace).ensure_dirs()
    serve(*build_deployments(settings), print_starting_message=True)


if __name__ == "__main__":
    main()
