"""Dataset loaders that return DataFrames in the recloop contracts (recloop/schema.py)."""

from __future__ import annotations

import re
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


def land_dataset(settings, data, source: str, period_days: int = 7, fmt: str = "parquet") -> dict:
    """Put an imported dataset into a workspace: catalog and users into the store, the events as
    ``period_days`` batches into landing/ (``<source>-YYYYMMDD.<fmt>``), for ``recloop ingest`` to check.

    Every importer (MovieLens, RecBole, generic tables) lands through here.
    """
    from recloop.store import FeedbackStore

    if period_days < 1:
        raise ValueError(f"period_days must be at least 1, got {period_days}")
    source = re.sub(r"[^A-Za-z0-9_.-]+", "_", source).strip("._") or "import"  # it names the batch files
    settings.ensure_dirs()
    store = FeedbackStore.from_settings(settings)
    store.upsert_catalog(data.catalog)
    store.upsert_users(data.users)
    files = write_batches(split_by_period(data.events, period_days), settings.landing_dir, source, fmt)
    ts = data.events["timestamp"]
    out = {"source": source, "items": len(data.catalog), "users": len(data.users), "events": len(data.events),
           "batches": len(files), "first_event": str(ts.min()) if len(ts) else None,
           "last_event": str(ts.max()) if len(ts) else None, "files": [str(f) for f in files]}
    notes = {k: v for k, v in getattr(data, "notes", {}).items() if k not in ("name", "files")}
    if notes:
        out["notes"] = notes
    return out


def land_movielens(settings, path: str | Path, period_days: int = 7, fmt: str = "parquet",
                   like_threshold: float = 4) -> dict:
    from recloop.datasets.movielens import load_movielens

    return land_dataset(settings, load_movielens(path, like_threshold=like_threshold), "movielens", period_days, fmt)


def land_recbole(settings, path: str | Path, *, name: str | None = None, period_days: int = 7,
                 fmt: str = "parquet", like_threshold: float = 4, maps: list[str] | None = None,
                 time_unit: str = "s", id_prefix: str = "") -> dict:
    from recloop.datasets.recbole import load_recbole

    data = load_recbole(path, name=name, like_threshold=like_threshold, maps=maps, time_unit=time_unit,
                        id_prefix=id_prefix)
    return land_dataset(settings, data, data.notes["name"], period_days, fmt)


def land_tables(settings, events: str | Path, items: str | Path, users: str | Path | None = None, *,
                maps: list[str] | None = None, source: str | None = None, period_days: int = 7,
                fmt: str = "parquet", like_threshold: float = 4, time_unit: str = "s",
                id_prefix: str = "") -> dict:
    from recloop.datasets.tabular import load_tables

    data = load_tables(events, items, users, maps=maps, source=source, like_threshold=like_threshold,
                       time_unit=time_unit, id_prefix=id_prefix)
    return land_dataset(settings, data, data.notes["name"], period_days, fmt)
