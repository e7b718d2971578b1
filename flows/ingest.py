"""The ingest flow: every landing file through the GX checks, one task per file.

Thin: the work is ``data_checks.ingest.ingest_batch`` (read, validate, store, move,
record). This file adds Prefect's retries (with backoff) on the I/O tasks, one
event per file (``recloop.feedback.ingested`` / ``recloop.feedback.quarantined``,
counts in the payload) and a markdown artifact summarising the run.

Files are ingested one after another, in name order: appends to the store are
serialised anyway, and a later batch's "already stored" check must see the earlier one.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from data_checks.ingest import (
    confine_to_landing,
    ingest_batch,
    ingest_object,
    pending_batches,
    pending_objects,
)
from flows.events import FEEDBACK_INGESTED, FEEDBACK_QUARANTINED, workspace_resource
from recloop.settings import load_settings

list_task = task(pending_batches, name="list-landing", cache_policy=NO_CACHE, retries=3,
                 retry_delay_seconds=[1, 4, 16])
# ingest_batch is idempotent and resumes after a crash, so a retry is always safe
ingest_task = task(ingest_batch, name="ingest-file", cache_policy=NO_CACHE, retries=2,
                   retry_delay_seconds=[2, 10], task_run_name="ingest {path.name}")
# the services backend: landing objects under s3://<bucket>/<prefix>/landing/ (claimed per object, so
# several workers on several machines can run this flow at once)
list_objects_task = task(pending_objects, name="list-landing-objects", cache_policy=NO_CACHE, retries=3,
                         retry_delay_seconds=[1, 4, 16])
ingest_object_task = task(ingest_object, name="ingest-object", cache_policy=NO_CACHE, retries=2,
                          retry_delay_seconds=[2, 10], task_run_name="ingest {key}")


@task(name="emit-event", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5])
def emit_outcome(settings, outcome: dict) -> list[str]:
    """One event per outcome: ingested (ingested/partial) and/or quarantined (quarantined/partial)."""
    from prefect.events import emit_event

    counts = {k: outcome.get(k) for k in ("batch_id", "source", "status", "n_rows", "n_good", "n_new",
                                          "n_duplicate", "n_quarantined")}
    related = [{"prefect.resource.id": f"recloop.batch.{outcome['batch_id']}", "prefect.resource.role": "batch"}]
    names = []
    if outcome["status"] in ("ingested", "partial"):
        names.append(FEEDBACK_INGESTED)
    if outcome["status"] == "quarantined" or (outcome["status"] == "partial" and outcome.get("n_quarantined")):
        names.append(FEEDBACK_QUARANTINED)
    ids = []
    for name in names:
        payload = {**counts, "reasons": outcome.get("reasons", [])[:20],
                   "reason_counts": outcome.get("reason_counts", {}),
                   "validation_path": outcome.get("validation_path"), "data_docs": outcome.get("data_docs"),
                   "quarantined_rows_path": outcome.get("quarantined_rows_path")}
        ev = emit_event(event=name, resource=workspace_resource(settings), payload=payload, related=related)
        if ev is not None:
            ids.append(str(ev.id))
    return ids


def summary_markdown(settings, outcomes: list[dict]) -> str:
    lines = [f"# Ingest of `{settings.root}`", "",
             f"{len(outcomes)} file(s): " + ", ".join(
                 f"{sum(o['status'] == s for o in outcomes)} {s}"
                 for s in ("ingested", "partial", "quarantined", "skipped")), "",
             "| file | status | rows | new in store | quarantined | reasons |", "|---|---|---:|---:|---:|---|"]
    for o in outcomes:
        reasons = "<br>".join(r.replace("|", "/") for r in o.get("reasons", [])[:6]) or "-"
        lines.append(f"| `{o['source']}` | **{o['status']}** | {o['n_rows']} | {o['n_new']} | "
                     f"{o['n_quarantined']} | {reasons} |")
    docs = settings.reports_dir / "data_docs" / "index.html"
    if docs.exists():
        lines += ["", f"Data Docs: `{docs}`"]
    return "\n".join(lines)


@flow(name="ingest", log_prints=True,
      description="Validate every new landing file with Great Expectations; store good rows, quarantine bad "
                  "batches with reasons; one event per file.")
def ingest_flow(workspace: str | None = None, paths: list[str] | None = None) -> dict:
    """Ingest ``paths`` (default: everything in landing/); returns the outcomes and event ids.

    Each of ``paths`` must resolve inside the workspace's ``landing/`` (a relative path is relative
    to it); one that does not fails the run before any file is touched.
    """
    settings = load_settings(workspace).ensure_dirs()
    # checked first, before any Prefect call: a refused path fails the run with nothing touched
    files = [confine_to_landing(p, settings) for p in paths] if paths else None
    logger = get_run_logger()
    keys: list[str] = []
    if files is None:
        files = list_task(settings)
        keys = list_objects_task(settings)
    outcomes, events = [], []
    runs = [lambda p=p: ingest_task(p, settings) for p in files]
    runs += [lambda k=k: ingest_object_task(k, settings) for k in keys]
    for run in runs:
        out = run().to_dict()
        logger.info("%s: %s (%s rows, %s new, %s quarantined)", out["source"], out["status"], out["n_rows"],
                    out["n_new"], out["n_quarantined"])
        events += emit_outcome(settings, out)
        outcomes.append(out)
    if outcomes:
        create_markdown_artifact(key="ingest-summary", markdown=summary_markdown(settings, outcomes),
                                 description=f"Ingest of {len(outcomes)} landing file(s)")
    return {"outcomes": outcomes, "events": events,
            "counts": {s: sum(o["status"] == s for o in outcomes)
                       for s in ("ingested", "partial", "quarantined", "skipped")}}


if __name__ == "__main__":  # pragma: no cover
    ingest_flow()
