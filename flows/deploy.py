"""All deployments, declared in one place.

* ``ingest``  - cron (``settings.ingest_cron``): validate and store new landing files
* ``monitor`` - cron (``settings.monitor_cron``): drift + performance decision; emits
  ``recloop.drift.detected`` when a retrain is due
* ``retrain`` - no schedule: an event trigger on ``recloop.drift.detected`` runs it with
  the event's reason and report path as parameters; one run at a time

Two ways to run them, same declarations:

* ``python -m flows.deploy --workspace W`` serves them from this process (what
  ``recloop up`` starts): simplest, one machine;
* ``python -m flows.deploy --workspace W --work-pool recloop`` registers them on a Prefect
  process work pool; start as many ``prefect worker start --pool recloop`` as you like.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.events import DRIFT_DETECTED

REPO_ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINTS = {"ingest": "flows/ingest.py:ingest_flow", "monitor": "flows/monitor.py:monitor_flow",
               "retrain": "flows/retrain.py:retrain_flow"}


def deployment_specs(settings, pin_workspace: bool = True) -> dict[str, dict]:
    """name -> keyword arguments shared by ``flow.to_deployment`` and ``flow.deploy``.

    ``pin_workspace=False``: the runs carry no workspace parameter, so each worker runs in its own
    (``RECLOOP_WORKSPACE``): share-nothing workers on other machines, sharing only the services.
    """
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    ws = str(settings.root)
    params = {"workspace": ws} if pin_workspace else {}
    resource = f"recloop.workspace.{settings.root.name}"
    return {
        "ingest": {
            "cron": settings.ingest_cron, "parameters": dict(params), "tags": ["recloop", "ingest"],
            "description": "Validate every new landing file with Great Expectations; store good rows, quarantine bad "
                        "batches with reasons.",
        },
        "monitor": {
            "cron": settings.monitor_cron, "parameters": dict(params), "tags": ["recloop", "monitor"],
            "description": "Evidently drift (data, target, prediction) and live AUC of the champion; emits "
                        f"{DRIFT_DETECTED} when a retrain is due.",
        },
        "retrain": {
            "parameters": dict(params), "tags": ["recloop", "retrain"], "concurrency_limit": 1,
            "description": "Train a candidate, judge it against the champion on AUC and fairness gates, promote or "
                        "reject. Triggered by drift events.",
            "triggers": [DeploymentEventTrigger(
                name=f"retrain on drift ({settings.root.name})",
                expect={DRIFT_DETECTED},
                match={"prefect.resource.id": resource},
                parameters={**params, "reason": "{{ event.payload.reason }}",
                            "drift_report": "{{ event.payload.report_path }}"},
            )],
        },
    }


def _flows():
    from flows.ingest import ingest_flow
    from flows.monitor import monitor_flow
    from flows.retrain import retrain_flow

    return {"ingest": ingest_flow, "monitor": monitor_flow, "retrain": retrain_flow}


def build_deployments(settings):
    flows = _flows()
    return [flows[name].to_deployment(name=name, **kw) for name, kw in deployment_specs(settings).items()]


def deploy_to_work_pool(settings, pool: str) -> list[str]:
    """Register the same deployments on a process work pool (code loaded from this checkout).

    With the services backend (``services.database_url``) the workspace is not pinned: workers share
    nothing but the services, each in its own workspace. Without it, workers share this workspace folder.
    """
    from prefect import Flow

    ids = []
    pin = settings.services.database_url is None
    for name, kw in deployment_specs(settings, pin_workspace=pin).items():
        flow = Flow.from_source(source=str(REPO_ROOT), entrypoint=ENTRYPOINTS[name])
        ids.append(str(flow.deploy(name=name, work_pool_name=pool, build=False, push=False, print_next_steps=False,
                                   **kw)))
    return ids


def main(argv: list[str] | None = None) -> None:
    from prefect import serve

    from recloop.settings import load_settings

    parser = argparse.ArgumentParser(description="Serve or deploy recloop's deployments")
    parser.add_argument("--workspace", default=None)
    parser.add_argument("--work-pool", default=None, help="register on this process work pool instead of serving")
    args = parser.parse_args(argv)
    settings = load_settings(args.workspace).ensure_dirs()
    if args.work_pool:
        ids = deploy_to_work_pool(settings, args.work_pool)
        print(f"registered {len(ids)} deployments on work pool {args.work_pool!r}; start workers with: "
              f"prefect worker start --pool {args.work_pool} --type process")
        return
    serve(*build_deployments(settings), print_starting_message=True)


if __name__ == "__main__":
    main()
