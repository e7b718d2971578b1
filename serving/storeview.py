"""A cached, periodically refreshed view of the feedback store for serving.

Serving never reads the store per request. :class:`StoreView` holds an immutable
:class:`StoreData` (catalog, events, per-user row index, per-item exposure and
positive counts) and swaps in a new one when the store changed. The change check is
cheap (size and mtime of ``ledger.jsonl`` and ``catalog.parquet``); new events are read
incrementally from the parts the ledger names since the last refresh, so a refresh
costs what was appended, not the whole history.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from recloop.store import FeedbackStore

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["event_id", "user_id", "item_id", "event_type", "label", "timestamp", "query"]


def _file_sig(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class StoreData:
    """One consistent picture of the store (never mutated after construction)."""

    catalog: pd.DataFrame  # indexed by item_id (string), columns of CATALOG_COLUMNS
    catalog_sig: tuple | None
    events: pd.DataFrame  # HISTORY_COLUMNS, time-ordered
    user_rows: dict[str, np.ndarray]  # user_id -> row positions in ``events``
    item_rows: dict[str, np.ndarray]  # item_id -> row positions in ``events``
    shown: pd.Series  # item_id -> number of events (exposures) in the store
    positives: pd.Series  # item_id -> number of positive events
    ledger_lines: int = 0
    n_parts: int = 0
    parts: frozenset = field(default_factory=frozenset)
    meta: dict = field(default_factory=dict)  # item_id -> (title, category, tags) for explanations
    # "as of now" statistics for the model's fast scoring path (models.features.ServingStats),
    # built here, at refresh time, so a request only does array lookups
    stats: Any = field(default=None, compare=False, repr=False)

    def user_history(self, user_id: str) -> pd.DataFrame:
        rows = self.user_rows.get(user_id)
        if rows is None:
            return self.events.iloc[0:0]
        return self.events.iloc[rows]

    @cached_property
    def _popularity(self) -> pd.Series:
        return self._compute_popularity()

    def popularity(self) -> pd.Series:
        """Cached per snapshot: computed once, on the first cold-start request after a refresh."""
        return self._popularity

    def _compute_popularity(self) -> pd.Series:
        """Smoothed positive rate times log-exposure: popular *and* liked, item_id -> score."""
        if self.shown.empty:
            return pd.Series(dtype=float)
        pos = self.positives.reindex(self.shown.index, fill_value=0).astype(float)
        rate = (pos + 1.0) / (self.shown.astype(float) + 2.0)
        return (rate * np.log1p(pos)).sort_values(ascending=False)

    def catalog_for(self, item_ids) -> pd.DataFrame:
        """Catalog rows of ``item_ids`` (unknown ids dropped) as a plain frame with an item_id column."""
        pos = self.catalog.index.get_indexer(list(dict.fromkeys(item_ids)))
        return self.catalog.take(pos[pos >= 0]).reset_index()

    def item_meta(self, item_id: str) -> tuple[str, str, str]:
        """(title, category, tags) of an item; the id itself as title when it is not in the catalog."""
        return self.meta.get(item_id) or (item_id, "", "")


def _empty_events() -> pd.DataFrame:
    return pd.DataFrame({
        "event_id": pd.Series([], dtype="string"), "user_id": pd.Series([], dtype="string"),
        "item_id": pd.Series([], dtype="string"), "event_type": pd.Series([], dtype="string"),
        "label": pd.Series([], dtype="int8"), "timestamp": pd.Series([], dtype="datetime64[ns, UTC]"),
        "query": pd.Series([], dtype="string"),
    })


def _read_parts(root: Path, parts: list[str]) -> pd.DataFrame:
    frames = []
    for rel in parts:
        path = root / rel
        if not path.exists():
            continue
        t = pq.read_table(path)
        cols = [c for c in HISTORY_COLUMNS if c in t.column_names]
        frames.append(t.select(cols).to_pandas())
    if not frames:
        return _empty_events()
    df = pd.concat(frames, ignore_index=True)
    for c in HISTORY_COLUMNS:
        if c not in df.columns:
            df[c] = pd.NA
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True)
    return df[HISTORY_COLUMNS]


def _serving_stats(catalog: pd.DataFrame, events: pd.DataFrame, previous: StoreData | None):
    """``models.features.ServingStats`` of this snapshot (the catalog part reused while it is unchanged)."""
    try:
        from models.features import ServingStats
    except ImportError:  # serving without the models package: the generic scoring path only
        return None
    prev = previous.stats if previous is not None and previous.catalog is catalog else None
    frame = prev.catalog if prev is not None else catalog.reset_index()
    try:
        return ServingStats.build(events, frame, previous=prev)
    except Exception:  # never let the fast path's tables break a refresh: requests fall back
        log.exception("building the serving statistics failed; using the generic scoring path")
        return None


def _build(catalog: pd.DataFrame, catalog_sig, events: pd.DataFrame, ledger_lines: int,
           parts: frozenset, previous: StoreData | None = None) -> StoreData:
    events = events.sort_values(["timestamp", "event_id"], kind="stable").reset_index(drop=True)
    events = events.astype({"user_id": "string", "item_id": "string"})
    if len(events):
        user_rows = {str(u): np.asarray(r) for u, r in events.groupby("user_id", sort=False).indices.items()}
        item_rows = {str(i): np.asarray(r) for i, r in events.groupby("item_id", sort=False).indices.items()}
        shown = events.groupby("item_id", sort=False).size()
        positives = events[events["label"].astype(int) == 1].groupby("item_id", sort=False).size()
    else:
        user_rows, item_rows, shown, positives = {}, {}, pd.Series(dtype=int), pd.Series(dtype=int)
    shown.index = shown.index.astype(str)
    positives.index = positives.index.astype(str)
    meta = _catalog_meta(catalog) if previous is None or previous.catalog is not catalog else previous.meta
    stats = _serving_stats(catalog, events, previous)
    return StoreData(stats=stats, meta=meta, catalog=catalog, catalog_sig=catalog_sig, events=events, user_rows=user_rows, item_rows=item_rows, shown=shown,
                     positives=positives, ledger_lines=ledger_lines, n_parts=len(parts), parts=parts)


def _catalog_meta(catalog: pd.DataFrame) -> dict:
    def col(name):
        if name not in catalog.columns:
            return [""] * len(catalog)
        return catalog[name].astype("string").fillna("").tolist()

    return dict(zip(catalog.index.astype(str), zip(col("title"), col("category"), col("tags"))))


def _load_catalog(store: FeedbackStore) -> pd.DataFrame:
    cat = store.catalog()
    cat = cat.astype({"item_id": "string"})
    cat.index = pd.Index(cat["item_id"].astype(str), name="item_id")
    return cat.drop(columns=["item_id"])


class StoreView:
    """Thread-safe holder of the newest :class:`StoreData`; call :meth:`refresh` off the request path."""

    def __init__(self, store_dir: str | Path):
        self.store = FeedbackStore(store_dir)
        self._lock = threading.Lock()  # one refresher at a time; readers never take it
        self._sig: tuple | None = None
        self.data: StoreData = _build(_load_catalog(self.store), None, _empty_events(), 0, frozenset())
        self.refreshes = 0

    def signature(self) -> tuple:
        return (_file_sig(self.store.ledger_path), _file_sig(self.store.catalog_path))

    def refresh(self, force: bool = False) -> bool:
        """Pick up new events and catalog changes; returns True when something changed."""
        with self._lock:
            sig = self.signature()
            if not force and sig == self._sig:
                return False
            old = self.data
            catalog, catalog_sig = old.catalog, old.catalog_sig
            if force or sig[1] != old.catalog_sig:
                catalog, catalog_sig = _load_catalog(self.store), sig[1]
            events, lines, parts = self._new_events(old, force)
            self.data = _build(catalog, catalog_sig, events, lines, parts, previous=old)
            self._sig = sig
            self.refreshes += 1
            log.info("store view refreshed: %d events, %d users, %d items", len(self.data.events),
                     len(self.data.user_rows), len(self.data.catalog))
            return True

    def _new_events(self, old: StoreData, force: bool) -> tuple[pd.DataFrame, int, frozenset]:
        """Events of parts the ledger added since ``old`` (falls back to a full read if the ledger shrank)."""
        lines: list[str] = []
        if self.store.ledger_path.exists():
            lines = self.store.ledger_path.read_text(encoding="utf-8").splitlines()
        new_parts: list[str] = []
        start = 0 if force or len(lines) < old.ledger_lines else old.ledger_lines
        complete = start
        for i, line in enumerate(lines[start:], start=start):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a torn last line: read it next time
                break
            new_parts.extend(row.get("parts") or [])
            complete = i + 1
        base = _empty_events() if start == 0 else old.events
        known = frozenset() if start == 0 else old.parts
        fresh = [p for p in dict.fromkeys(new_parts) if p not in known]
        if start == 0 and not fresh:  # no ledger (a store written without one): read every part
            fresh = [str(p.relative_to(self.store.root)) for p in self.store._parts()]
        if not fresh:
            return base, complete, known
        add = _read_parts(self.store.root, fresh)
        events = add if base.empty else pd.concat([base, add], ignore_index=True)
        events = events.drop_duplicates("event_id", keep="first")
        return events, complete, known | frozenset(fresh)
