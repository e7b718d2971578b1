"""A summary of a workspace: what landed, what was ingested or quarantined, which models exist."""

from __future__ import annotations

from recloop.store import FeedbackStore


def _count(folder) -> int:
    """Batch files in a folder (validation results ``*.json`` beside them are not batches)."""
    if not folder.exists():
        return 0
    return sum(1 for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix != ".json"
               and ".rejected." not in p.name)  # rows split off a partly valid batch are not a batch


def workspace_status(settings) -> dict:
    store = FeedbackStore.from_settings(settings)
    files = settings.services.store == "files"
    has_events = settings.store_dir.exists() or not files
    first, last = store.time_range() if has_events else (None, None)
    doc = {
        "workspace": str(settings.root),
        "batches_landed": _count(settings.landing_dir),
        "batches_processed": _count(settings.processed_dir),
        "batches_quarantined": _count(settings.quarantine_dir),
        "events_stored": store.count() if has_events else 0,
        "catalog_items": len(store.catalog()) if store.has_catalog() else 0,
        "users": len(store.users()) if store.has_users() else 0,
        "first_event": first,
        "last_event": last,
        "mlflow_tracking_uri": settings.tracking_uri,
        "models": _model_versions(settings),
    }
    return doc


def _model_versions(settings) -> list[dict]:
    if settings.tracking_uri.startswith("sqlite:///") and not (settings.root / "mlflow.db").exists():
        return []
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    try:
        versions = client.search_model_versions(f"name='{settings.model_name}'")
        aliases = client.get_registered_model(settings.model_name).aliases  # {alias: version}
    except Exception:  # no registered model yet
        return []
    return sorted(
        ({"version": int(v.version), "aliases": sorted(a for a, ver in aliases.items() if str(ver) == str(v.version)),
          "status": v.tags.get("gate_decision"), "run_id": v.run_id} for v in versions),
        key=lambda d: d["version"],
    )
