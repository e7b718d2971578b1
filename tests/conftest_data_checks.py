"""Fixtures and builders for the data-checks room's tests (imported by tests/test_data_checks*.py, test_ingest*.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recloop.schema import EVENT_TYPES, LABEL_BY_EVENT

NOW = pd.Timestamp.now(tz="UTC").floor("h")


def make_catalog(n: int = 30) -> pd.DataFrame:
    cats = ["cooking", "travel", "jazz"]
    return pd.DataFrame({
        "item_id": [f"item-{i:05d}" for i in range(n)],
        "title": [f"Title {i}" for i in range(n)],
        "description": [f"About thing {i}" for i in range(n)],
        "category": [cats[i % 3] for i in range(n)],
    })


def make_events(n: int = 200, seed: int = 0, prefix: str = "ev", n_items: int = 30, n_users: int = 20,
                start: pd.Timestamp | None = None) -> pd.DataFrame:
    """A clean batch: known items, labels that match event types, like-rate ~0.4, recent UTC times."""
    rng = np.random.default_rng(seed)
    start = (NOW - pd.Timedelta(days=2)) if start is None else start
    etype = rng.choice(list(EVENT_TYPES), size=n, p=[0.5, 0.2, 0.1, 0.1, 0.1])
    return pd.DataFrame({
        "event_id": [f"{prefix}-{seed}-{i:06d}" for i in range(n)],
        "user_id": [f"user-{i % n_users:04d}" for i in range(n)],
        "item_id": [f"item-{int(k):05d}" for k in rng.integers(0, n_items, n)],
        "event_type": etype,
        "label": pd.Series(etype).map(LABEL_BY_EVENT).astype("int8"),
        "timestamp": start + pd.to_timedelta(np.sort(rng.integers(0, 86_400, n)), unit="s"),
        "query": None,
        "model_version": None,
    })


def with_catalog(settings):
    """The workspace with a 30-item catalog in the store; Data Docs off (fast) unless a test turns them on."""
    from recloop.store import FeedbackStore

    settings.checks.data_docs = False
    FeedbackStore.from_settings(settings).upsert_catalog(make_catalog())
    return settings


def land(settings, df: pd.DataFrame, name: str) -> Path:
    from recloop.datasets.batches import write_batch

    return write_batch(df, settings.landing_dir / name)
