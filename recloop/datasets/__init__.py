"""Dataset loaders that return DataFrames in the recloop contracts (recloop/schema.py)."""

from __future__ import annotations

from pathlib import Path

from recloop.datasets.batches import split_by_period, write_batches


def land_synthetic(settings, cfg=None, fmt: str = "parquet") -> dict:
    """Generate the synthetic world: catalog and users into the store, daily batches into landing/."""
    from recloop.datasets.synthetic import generate
    from recloop.store import FeedbackStore

    data = generate(cfg)
    settings.ensure_dirs()
    store = FeedbackStore.from_settings(settings)
    store.upsert_catalog(data.catalog)
    store.upsert_users(data.users)
    files = write_batches(data.landing_batches(), settings.landing_dir, "synthetic", fmt)
    return {"source": "synthetic", "items": len(data.catalog), "users": len(data.users),
            "events": len(data.events), "batches": len(files), "files": [str(f) for f in files],
            "drift_day": data.config.drift_day, "bad_batch_day": data.config.bad_batch_day,
            "planted": data.planted, "data": data}


def land_movielens(settings, path: str | Path, period_days: int = 7, fmt: str = "parquet") -> dict:
    from recloop.datasets.movielens import load_movielens
    from recloop.store import FeedbackStore

    data = load_movielens(path)
    settings.ensure_dirs()
    store = FeedbackStore.from_settings(settings)
    store.upsert_catalog(data.catalog)
    store.upsert_users(data.users)
    files = write_batches(split_by_period(data.events, period_days), settings.landing_dir, "movielens", fmt)
    return {"source": "movielens", "items": len(data.catalog), "users": len(data.users),
            "events": len(data.events), "batches": len(files), "files": [str(f) for f in files]}
