"""The registered champion's lineage, as the monitor reads it (MLflow version tags + its run)."""

from __future__ import annotations

import logging


def lineage(settings, version, meta) -> tuple[dict, dict]:
    """(tags, metrics) of champion ``version``: ``meta`` from ``load_champion``, then the MLflow version's tags and
    its run's tags, params and metrics (what the monitor reads its reference window and offline AUC from)."""
    tags: dict = {}
    metrics: dict = {}
    if isinstance(meta, dict):
        tags.update({k: v for k, v in meta.items() if isinstance(v, (str, int, float))})
        tags.update(meta.get("tags") or {})
        metrics.update(meta.get("metrics") or {})
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
        mv = client.get_model_version(settings.model_name, str(version))
        tags.update(mv.tags or {})
        if mv.run_id:
            run = client.get_run(mv.run_id)
            tags = {**run.data.tags, **run.data.params, **tags}
            metrics.update(run.data.metrics)
    except Exception as exc:
        logging.getLogger(__name__).warning("could not read lineage of v%s from MLflow: %s", version, exc)
    return tags, metrics
