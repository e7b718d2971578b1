"""A bounded, incrementally refreshed view of the feedback store for serving.

Serving never reads the store per request, and it does not hold the whole store either.
:class:`StoreView` keeps only what scoring needs, and updates it from the event parts that
the ledger lists as new since the last refresh (a refresh costs what was appended):

* per item: events and positives (exposure, popularity, the wide item statistics);
* per user: events and positives, overall and per category (the user-category affinity);
* per user, a bounded **tail**: the last ``TAIL_EVENTS`` events (the ranker reads the last ``KNN_HISTORY`` = 200,
  the recent like-rate the last 10) and the last ``TAIL_POSITIVES`` positives (the user tower's
  history, ``training.history_len`` = 20 by default), plus every item the user ever liked once,
  with the time of the last like (``/recommend`` excludes liked items);
* the catalog.

Memory grows with users x tail, items, and distinct (user, category) and (user, liked item) pairs,
not with the number of events. The tail is kept as Arrow columns (no Python string per event).
The change check is cheap (size and mtime of ``ledger.jsonl`` and ``catalog.parquet``); new parts
are read with column pushdown, in chunks (``FeedbackStore.scan``).

From these, each snapshot builds a ``models.features.ServingStats`` (:class:`BoundedServingStats`)
that scores **equal** to ``ServingStats.build`` over the whole store: counts, per-category counts,
the last events and the liked items are the same. Only the positives older than the tail are kept
once per item (at their last like), which changes none of what the model reads while
``history_len <= TAIL_POSITIVES`` (a warning is logged otherwise); liked items liked at the same
instant are ordered by item id. When the catalog changes the category of an item that already has
events (or an item seen only in events joins the catalog), the per-category counts are recounted by
a full rebuild that streams the store part by part; ``refresh(force=True)`` rebuilds too.

``StoreData.tail`` holds the tail events (an Arrow table, time-ordered); ``StoreData.events`` is the same
rows as a pandas frame (Arrow-backed strings), built on first use: only the generic scoring path of models
without the fast path (test stand-ins) reads it, so a server with the fast path never holds that copy.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from models.features import KNN_HISTORY, RECENT_EVENTS, ServingStats, UserStats
from recloop.store import FeedbackStore, concat_parts

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["event_id", "user_id", "item_id", "event_type", "label", "timestamp", "query"]
TAIL_EVENTS = max(KNN_HISTORY, RECENT_EVENTS)  # per user: the last events the model reads
TAIL_POSITIVES = 50  # per user: the last positives (>= the model's history_len; 20 by default)
CHUNK_ROWS = 500_000  # rows absorbed at a time on a full rebuild (bounds its working memory)
UNKNOWN_CATEGORY = "<unknown>"  # items not in the catalog (as models.features)
NO_CATEGORY = "<none>"  # catalog items without a category (as models.features)
_CAT_BITS = 20  # (user, category) pairs as one int64: user << _CAT_BITS | category
_ITEM_BITS = 31  # (user, item) pairs as one int64: user << _ITEM_BITS | item
_TS = pa.timestamp("ns", tz="UTC")
_STRINGS = pd.StringDtype("pyarrow")
_TAIL_SCHEMA = pa.schema([("event_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string()),
                          ("event_type", pa.string()), ("label", pa.int8()), ("timestamp", _TS),
                          ("query", pa.string()), ("_u", pa.int32()), ("_i", pa.int32())])


def _file_sig(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_size, st.st_mtime_ns)


# ----------------------------------------------------------------------------- running totals
class _Vocab:
    """Append-only string -> code map (codes never change, so they can be stored with the events)."""

    __slots__ = ("index",)

    def __init__(self, index: pd.Index | None = None):
        self.index = pd.Index([], dtype=object) if index is None else index

    def __len__(self) -> int:
        return len(self.index)

    def encode(self, values: pa.Array | pa.ChunkedArray) -> tuple[_Vocab, np.ndarray]:
        """(this vocabulary plus the unseen values, int64 codes of ``values``); nulls become ``"<NA>"``."""
        arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        enc = pc.dictionary_encode(pc.fill_null(arr.cast(pa.string()), "<NA>"))
        words = np.asarray(enc.dictionary.to_pylist(), dtype=object)
        codes = self.index.get_indexer(words).astype(np.int64)
        index = self.index
        new = codes < 0
        if new.any():
            index = index.append(pd.Index(words[new], dtype=object))
            codes[new] = np.arange(len(self.index), len(index), dtype=np.int64)
        return _Vocab(index), codes[enc.indices.to_numpy(zero_copy_only=False)]


def _grow_add(arr: np.ndarray, codes: np.ndarray, weights: np.ndarray | None, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=np.int64)
    out[: len(arr)] = arr
    add = np.bincount(codes, weights=weights, minlength=size)
    out += add if weights is None else np.rint(add).astype(np.int64)
    return out


def _merge_counts(keys, n, pos, new_keys, new_labels):
    """(sorted unique keys, events, positives) of the old pairs plus the new events."""
    k = np.concatenate([keys, new_keys])
    uniq, inv = np.unique(k, return_inverse=True)
    cnt = np.bincount(inv, weights=np.concatenate([n, np.ones(len(new_keys))]), minlength=len(uniq))
    ps = np.bincount(inv, weights=np.concatenate([pos, new_labels]), minlength=len(uniq))
    return uniq, np.rint(cnt).astype(np.int64), np.rint(ps).astype(np.int64)


def _merge_last(keys, ts, new_keys, new_ts):
    """(sorted unique keys, the latest time of each) of the old pairs plus the new ones."""
    k = np.concatenate([keys, new_keys])
    t = np.concatenate([ts, new_ts])
    order = np.lexsort((t, k))
    k, t = k[order], t[order]
    last = np.r_[k[1:] != k[:-1], True] if len(k) else np.zeros(0, dtype=bool)
    return k[last], t[last]


def _trim_tail(u: np.ndarray, label: np.ndarray, n_events: int, n_positives: int) -> tuple[np.ndarray, np.ndarray]:
    """Of a time-ordered tail (its user codes ``u`` and labels), which rows to keep: each user's last
    ``n_events`` rows and last ``n_positives`` positive rows. Returns (the kept rows' positions, in time
    order; the kept rows grouped by user, time order inside, as positions among the kept rows)."""
    g = np.argsort(u, kind="stable")
    us = u[g]
    pos = label[g] == 1
    n = len(us)
    idx = np.arange(n)
    ends = np.searchsorted(us, us, side="right")
    after = np.concatenate([np.cumsum(pos[::-1])[::-1], [0]])  # positives at or after each row
    keep_sorted = (ends - idx - 1 < n_events) | (pos & (after[idx] - after[ends] <= n_positives))
    if keep_sorted.all():
        return idx, g
    keep = np.empty(n, dtype=bool)
    keep[g] = keep_sorted
    new_pos = np.cumsum(keep) - 1
    return np.flatnonzero(keep), new_pos[g[keep_sorted]]


def _normalise(chunk: pa.Table) -> pa.Table:
    """HISTORY_COLUMNS in the tail's types; rows without a time dropped, repeated event ids once."""
    names = chunk.column_names
    cols = {}
    for f in _TAIL_SCHEMA:
        if f.name.startswith("_"):
            continue
        col = chunk.column(f.name) if f.name in names else pa.nulls(chunk.num_rows, f.type)
        if f.name == "label":
            col = pc.fill_null(col.cast(pa.int8()), 0)
        cols[f.name] = col.cast(f.type)
    t = pa.table(cols)
    t = t.filter(pc.is_valid(t.column("timestamp")))
    if t.num_rows and pc.count_distinct(t.column("event_id"), mode="all").as_py() != t.num_rows:
        first = ~pd.Series(t.column("event_id").to_numpy(zero_copy_only=False)).duplicated(keep="first").to_numpy()
        t = t.filter(pa.array(first))
    return t


@dataclass(frozen=True)
class _Totals:
    """Everything the view keeps about the events; updated functionally (a snapshot never changes)."""

    users: _Vocab
    items: _Vocab
    cats: _Vocab  # category names the counts were taken under
    user_n: np.ndarray  # per user code
    user_pos: np.ndarray
    item_n: np.ndarray  # per item code
    item_pos: np.ndarray
    item_cat: np.ndarray  # per item code: code in ``cats`` of the category it was counted under
    ucat_key: np.ndarray  # sorted user << _CAT_BITS | category
    ucat_n: np.ndarray
    ucat_pos: np.ndarray
    liked_key: np.ndarray  # sorted user << _ITEM_BITS | item, one per liked (user, item)
    liked_ts: np.ndarray  # ns of the last like
    tail: pa.Table  # _TAIL_SCHEMA, time-ordered (timestamp, event_id)
    by_user: np.ndarray  # tail rows grouped by user code, time order inside
    n_events: int = 0
    max_ts: int | None = None

    @classmethod
    def empty(cls) -> _Totals:
        z = np.zeros(0, dtype=np.int64)
        return cls(_Vocab(), _Vocab(), _Vocab(), z, z, z, z, z, z, z, z, z, z, _TAIL_SCHEMA.empty_table(), z)

    def absorb(self, chunk: pa.Table, category_of, tail_events: int, tail_positives: int) -> _Totals:
        t = _normalise(chunk)
        if t.num_rows == 0:
            return self
        users, u = self.users.encode(t.column("user_id"))
        items, i = self.items.encode(t.column("item_id"))
        cats, item_cat = self.cats, self.item_cat
        if len(items) > len(self.items):  # new items: counted under their category in the current catalog
            cats, c_new = cats.encode(pa.array(category_of(items.index[len(self.items):].to_numpy(object)),
                                               type=pa.string()))
            item_cat = np.concatenate([item_cat, c_new])
        if len(users) >= 1 << (63 - _CAT_BITS) or len(cats) >= 1 << _CAT_BITS or len(items) >= 1 << _ITEM_BITS:
            raise OverflowError("too many users, items or categories for the serving view's pair keys")
        lab = t.column("label").to_numpy().astype(np.int64)
        ts = t.column("timestamp").combine_chunks().to_numpy().view(np.int64)
        ucat = _merge_counts(self.ucat_key, self.ucat_n, self.ucat_pos, (u << _CAT_BITS) | item_cat[i], lab)
        liked = lab == 1
        liked_key, liked_ts = _merge_last(self.liked_key, self.liked_ts, (u[liked] << _ITEM_BITS) | i[liked],
                                          ts[liked])
        new = t.append_column("_u", pa.array(u.astype(np.int32))).append_column("_i", pa.array(i.astype(np.int32)))
        tail = concat_parts([self.tail, new]) if self.tail.num_rows else new  # chunked: no copy yet
        # order and trim on the key columns only, then copy just the kept rows once (one take, not a sorted
        # copy of tail + chunk and then a filtered copy of that: the start-up's peak is these transients)
        order = pc.sort_indices(tail.select(["timestamp", "event_id"]),
                                sort_keys=[("timestamp", "ascending"), ("event_id", "ascending")]).to_numpy()
        keys = tail.select(["_u", "label"]).combine_chunks()
        kept, by_user = _trim_tail(keys.column("_u").to_numpy()[order], keys.column("label").to_numpy()[order],
                                   tail_events, tail_positives)
        del keys
        tail = tail.take(pa.array(order[kept]))
        newest = int(ts.max())
        return replace(
            self, users=users, items=items, cats=cats, item_cat=item_cat,
            user_n=_grow_add(self.user_n, u, None, len(users)), user_pos=_grow_add(self.user_pos, u, lab, len(users)),
            item_n=_grow_add(self.item_n, i, None, len(items)), item_pos=_grow_add(self.item_pos, i, lab, len(items)),
            ucat_key=ucat[0], ucat_n=ucat[1], ucat_pos=ucat[2], liked_key=liked_key, liked_ts=liked_ts,
            tail=tail.combine_chunks(), by_user=by_user, n_events=self.n_events + t.num_rows,
            max_ts=newest if self.max_ts is None else max(self.max_ts, newest))

    def stale_categories(self, category_of) -> bool:
        """Whether the catalog now puts an already counted item in another category."""
        if not len(self.items):
            return False
        counted = self.cats.index.to_numpy(dtype=object)[self.item_cat]
        return bool((counted != category_of(self.items.index.to_numpy(object))).any())


def _category_lookup(catalog: pd.DataFrame):
    """item ids -> category names under ``catalog`` (the rule of ``models.features._catalog_part``)."""
    if "category" in catalog.columns:
        names = catalog["category"].astype("string").fillna(NO_CATEGORY).astype(str).to_numpy(dtype=object)
    else:
        names = np.full(len(catalog), NO_CATEGORY, dtype=object)
    ids = pd.Index(catalog.index.astype(str))
    last = ~ids.duplicated(keep="last")
    index, names = ids[last], names[last]

    def category_of(item_ids: np.ndarray) -> np.ndarray:
        pos = index.get_indexer(np.asarray(item_ids, dtype=object))
        return np.where(pos >= 0, names[np.maximum(pos, 0)] if len(names) else UNKNOWN_CATEGORY, UNKNOWN_CATEGORY)

    return category_of


# ----------------------------------------------------------------------------- the model's statistics
class _Codes(Mapping):
    """Read-only ``user_id -> code`` over a ``pd.Index`` (no second copy of the ids in a dict)."""

    def __init__(self, index: pd.Index):
        self._index = index

    def get(self, key, default=None):
        try:
            loc = self._index.get_loc(key)
        except (KeyError, TypeError):
            return default
        return loc if isinstance(loc, (int, np.integer)) else default

    def __getitem__(self, key):
        loc = self.get(key)
        if loc is None:
            raise KeyError(key)
        return loc

    def __contains__(self, key) -> bool:
        return self.get(key) is not None

    def __iter__(self) -> Iterator:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


if ServingStats is not None:

    @dataclass(frozen=True, eq=False)
    class BoundedServingStats(ServingStats):
        """``ServingStats`` from the view's running totals: ``ev_item`` / ``ev_label`` hold the users' tails
        (``user_start`` slices them), :meth:`user` adds the full counts and the liked items."""

        user_n: np.ndarray | None = None  # per user code (user_index)
        user_pos: np.ndarray | None = None
        ucat_key: np.ndarray | None = None  # sorted user << _CAT_BITS | view category code
        ucat_n: np.ndarray | None = None
        ucat_pos: np.ndarray | None = None
        cat_map: np.ndarray | None = None  # view category code -> code in ``categories``
        liked_key: np.ndarray | None = None  # sorted user << _ITEM_BITS | view item code
        liked_ts: np.ndarray | None = None
        pos_of_code: np.ndarray | None = None  # view item code -> item position
        tail_positives: int = TAIL_POSITIVES

        def user(self, user_id: str) -> UserStats:
            k = self.user_index.get(str(user_id))
            if k is None:
                return super().user(user_id)  # zeros
            n_cat = len(self.categories)
            s, e = int(self.user_start[k]), int(self.user_start[k + 1])
            items, labels = self.ev_item[s:e], self.ev_label[s:e]
            a, b = np.searchsorted(self.ucat_key, [k << _CAT_BITS, (k + 1) << _CAT_BITS])
            codes = self.cat_map[self.ucat_key[a:b] & ((1 << _CAT_BITS) - 1)]
            cat_n = np.bincount(codes, weights=self.ucat_n[a:b], minlength=n_cat).round().astype(np.int64)
            cat_pos = np.bincount(codes, weights=self.ucat_pos[a:b], minlength=n_cat).round().astype(np.int64)
            recent = labels[-RECENT_EVENTS:]
            tail_pos = items[labels == 1]  # the user's last positives, exactly
            a, b = np.searchsorted(self.liked_key, [k << _ITEM_BITS, (k + 1) << _ITEM_BITS])
            liked = self.pos_of_code[self.liked_key[a:b] & ((1 << _ITEM_BITS) - 1)]
            older = ~np.isin(liked, tail_pos)  # liked items whose last like is before the tail: once each
            if older.any():
                ts, liked = self.liked_ts[a:b][older], liked[older]
                liked = liked[np.lexsort((self.item_ids[liked].astype(str), ts))]
                positives = np.concatenate([liked, tail_pos]).astype(np.int64)
            else:
                positives = tail_pos
            return UserStats(str(user_id), int(self.user_n[k]), int(self.user_pos[k]), cat_n, cat_pos, positives,
                             len(recent), int(recent.sum()), items, labels)

        def history_items(self, user: UserStats, history_len: int) -> np.ndarray:
            if history_len > self.tail_positives:
                _warn_once(f"the model reads {history_len} positives per user but the serving view keeps the "
                           f"last {self.tail_positives}: older positives count once per item")
            return super().history_items(user, history_len)


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        log.warning(msg)


def _empty_history() -> pd.DataFrame:
    return pd.DataFrame({"user_id": pd.Series([], dtype="string"), "item_id": pd.Series([], dtype="string"),
                         "label": pd.Series([], dtype="int64"),
                         "timestamp": pd.Series([], dtype="datetime64[ns, UTC]")})


def _serving_stats(totals: _Totals, catalog: pd.DataFrame, previous: StoreData | None, tail_positives: int):
    """The snapshot's :class:`BoundedServingStats` (the catalog part reused while the catalog is unchanged)."""
    try:
        prev = previous.stats if previous is not None and previous.catalog is catalog else None
        frame = prev.catalog if prev is not None else catalog.reset_index()
        base = ServingStats.build(_empty_history(), frame, previous=prev)  # the catalog part only
        part = base._catalog_part
        n_base = len(part["ids"])
        codes = totals.items.index
        pos_of_code = part["index"].get_indexer(codes).astype(np.int64)
        extra = np.flatnonzero(pos_of_code < 0)
        pos_of_code[extra] = n_base + np.arange(len(extra), dtype=np.int64)
        extra_ids = codes[extra].to_numpy(dtype=object)
        item_ids = np.concatenate([part["ids"], extra_ids]) if len(extra) else part["ids"]
        item_pos = {**part["pos"], **{str(x): n_base + k for k, x in enumerate(extra_ids)}} if len(extra) \
            else part["pos"]
        n_items = len(item_ids)
        item_n = np.zeros(n_items, dtype=np.int64)
        item_n_pos = np.zeros(n_items, dtype=np.int64)
        item_n[pos_of_code] = totals.item_n
        item_n_pos[pos_of_code] = totals.item_pos
        categories, unknown_cat = part["categories"], part["unknown_cat"]
        item_cat = np.concatenate([part["cat"], np.full(len(extra), unknown_cat, dtype=np.int64)])
        from models.features import _NO_TIME

        ref_now = totals.max_ts if totals.max_ts is not None else pd.Timestamp.now(tz="UTC").value
        created = np.concatenate([part["created_ns"], np.full(len(extra), _NO_TIME, dtype=np.int64)])
        has_created = created != _NO_TIME
        age = np.where(has_created, (ref_now - np.where(has_created, created, 0)) / 86_400e9, 0.0)
        cat_code = {c: k for k, c in enumerate(categories)}
        cat_map = np.asarray([cat_code.get(str(c), unknown_cat) for c in totals.cats.index], dtype=np.int64)
        tail = totals.tail
        users_sorted = tail.column("_u").to_numpy()[totals.by_user]
        user_start = np.searchsorted(users_sorted, np.arange(len(totals.users) + 1)).astype(np.int64)
        ev_item = pos_of_code[tail.column("_i").to_numpy()[totals.by_user]] if tail.num_rows else \
            np.zeros(0, dtype=np.int64)
        ev_label = tail.column("label").to_numpy().astype(np.int64)[totals.by_user]
        return BoundedServingStats(
            item_ids=item_ids, item_pos=item_pos, item_texts=part["texts"] + [str(x) for x in extra_ids],
            item_cat=item_cat, item_n=item_n, item_n_pos=item_n_pos,
            item_log_age=np.log1p(np.clip(age, 0.0, None)), categories=categories, unknown_cat=unknown_cat,
            ref_now=int(ref_now), user_index=_Codes(totals.users.index), user_start=user_start, ev_item=ev_item,
            ev_label=ev_label, n_events=totals.n_events, catalog=frame, _catalog_part=part,
            user_n=totals.user_n, user_pos=totals.user_pos, ucat_key=totals.ucat_key, ucat_n=totals.ucat_n,
            ucat_pos=totals.ucat_pos, cat_map=cat_map, liked_key=totals.liked_key, liked_ts=totals.liked_ts,
            pos_of_code=pos_of_code, tail_positives=tail_positives)
    except Exception:  # never let the fast path's tables break a refresh: requests fall back
        log.exception("building the serving statistics failed; using the generic scoring path")
        return None


# ----------------------------------------------------------------------------- snapshots
@dataclass(frozen=True)
class StoreData:
    """One consistent picture of the store (never mutated after construction)."""

    catalog: pd.DataFrame  # indexed by item_id (string), columns of CATALOG_COLUMNS
    catalog_sig: tuple | None
    tail: pa.Table = field(compare=False, repr=False)  # the users' tails (_TAIL_SCHEMA), time-ordered
    shown: pd.Series  # item_id -> number of events (exposures) in the store
    positives: pd.Series  # item_id -> number of positive events
    ledger_lines: int = 0
    n_parts: int = 0
    parts: frozenset = field(default_factory=frozenset)
    meta: dict = field(default_factory=dict)  # item_id -> (title, category, tags) for explanations
    # "as of now" statistics for the model's fast scoring path (models.features.ServingStats),
    # built here, at refresh time, so a request only does array lookups
    stats: Any = field(default=None, compare=False, repr=False)
    n_events: int = 0  # every event the view has counted (``n_kept`` is the tails only)
    users: pd.Index = field(default_factory=lambda: pd.Index([], dtype=object), compare=False, repr=False)
    items: pd.Index = field(default_factory=lambda: pd.Index([], dtype=object), compare=False, repr=False)
    by_user: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), compare=False, repr=False)
    user_start: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64), compare=False, repr=False)
    tail_items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), compare=False, repr=False)

    @cached_property
    def events(self) -> pd.DataFrame:
        """The tails as a frame (HISTORY_COLUMNS, Arrow-backed strings), built on first use (generic path)."""
        return _events_frame(self.tail)

    @property
    def n_kept(self) -> int:
        """Events kept in the users' tails."""
        return self.tail.num_rows

    def _rows_of_user(self, user_id: str) -> np.ndarray | None:
        try:
            k = self.users.get_loc(user_id)
        except (KeyError, TypeError):
            return None
        if not isinstance(k, (int, np.integer)):
            return None
        return self.by_user[self.user_start[k]: self.user_start[k + 1]]

    def user_history(self, user_id: str) -> pd.DataFrame:
        """The user's tail events (time order)."""
        rows = self._rows_of_user(user_id)
        if rows is None:
            return self.events.iloc[0:0]
        return self.events.iloc[rows]

    @cached_property
    def user_rows(self) -> dict[str, np.ndarray]:
        """user_id -> row positions of the user's tail in ``events`` (built on first use: generic path)."""
        starts = self.user_start
        return {str(u): self.by_user[starts[k]: starts[k + 1]] for k, u in enumerate(self.users)
                if starts[k + 1] > starts[k]}

    @cached_property
    def item_rows(self) -> dict[str, np.ndarray]:
        """item_id -> row positions in ``events`` (built on first use: generic path)."""
        if not len(self.tail_items):
            return {}
        order = np.argsort(self.tail_items, kind="stable")
        codes = self.tail_items[order]
        cut = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        return {str(self.items[codes[a]]): order[a:b] for a, b in zip(cut, np.r_[cut[1:], len(codes)])}

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


def _events_frame(tail: pa.Table) -> pd.DataFrame:
    df = tail.select(HISTORY_COLUMNS).to_pandas(types_mapper={pa.string(): _STRINGS}.get)
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True)
    return df


def _snapshot(totals: _Totals, catalog: pd.DataFrame, catalog_sig, ledger_lines: int, parts: frozenset,
              previous: StoreData | None, tail_positives: int) -> StoreData:
    ids = totals.items.index.astype(str)
    shown = pd.Series(totals.item_n, index=ids, dtype=np.int64)
    shown = shown[shown > 0]
    positives = pd.Series(totals.item_pos, index=ids, dtype=np.int64)
    positives = positives[positives > 0]
    meta = _catalog_meta(catalog) if previous is None or previous.catalog is not catalog else previous.meta
    stats = _serving_stats(totals, catalog, previous, tail_positives)
    tail = totals.tail
    users_sorted = tail.column("_u").to_numpy()[totals.by_user]
    return StoreData(
        catalog=catalog, catalog_sig=catalog_sig, tail=tail, shown=shown, positives=positives,
        ledger_lines=ledger_lines, n_parts=len(parts), parts=parts, meta=meta, stats=stats,
        n_events=totals.n_events, users=totals.users.index, items=totals.items.index, by_user=totals.by_user,
        user_start=np.searchsorted(users_sorted, np.arange(len(totals.users) + 1)).astype(np.int64),
        tail_items=tail.column("_i").to_numpy().astype(np.int64))


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
    """Thread-safe holder of the newest :class:`StoreData`; call :meth:`refresh` off the request path.

    ``tail_events`` / ``tail_positives``: the per-user bounds of what is kept (module defaults).
    """

    def __init__(self, store, tail_events: int = TAIL_EVENTS, tail_positives: int = TAIL_POSITIVES):
        if tail_events < TAIL_EVENTS:
            raise ValueError(f"tail_events must be at least {TAIL_EVENTS} (the model reads that many events)")
        # a folder (the files store), or any store object: a table store (Iceberg) has no ledger file and
        # is followed through its commit signature and the data files it lists (append-only: new files only)
        self.store = FeedbackStore(store) if isinstance(store, str | Path) else store
        self._table_store = not hasattr(self.store, "ledger_path")
        self.tail_events, self.tail_positives = int(tail_events), int(tail_positives)
        self._lock = threading.Lock()  # one refresher at a time; readers never take it
        self._sig: tuple | None = None
        self._totals: _Totals | None = None  # None: the next refresh rebuilds from the whole store
        self._offset = 0  # bytes of ledger.jsonl already absorbed
        self.data: StoreData = _snapshot(_Totals.empty(), _load_catalog(self.store), None, 0, frozenset(), None,
                                         self.tail_positives)
        self.refreshes = 0
        self.rebuilds = 0

    def signature(self) -> tuple:
        if self._table_store:
            return self.store.signature()
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
            category_of = _category_lookup(catalog)
            totals = self._totals
            new_parts, offset, n_lines, shrank = self._ledger_parts(0 if force or totals is None else self._offset)
            full = force or shrank or totals is None or \
                (catalog is not old.catalog and totals.stale_categories(category_of))
            if full:
                if not (force or totals is None):  # re-read the ledger from its start
                    new_parts, offset, n_lines, _ = self._ledger_parts(0)
                totals, known, lines = _Totals.empty(), frozenset(), 0
                fresh = list(dict.fromkeys(new_parts))
                if not fresh:  # no ledger (a store written without one): read every part
                    fresh = [str(p.relative_to(self.store.root)) for p in self.store.parts()]
            else:
                known, lines = old.parts, old.ledger_lines
                fresh = [p for p in dict.fromkeys(new_parts) if p not in known]
            totals = self._absorb(totals, fresh, category_of)
            self._totals, self._offset = totals, offset
            self.data = _snapshot(totals, catalog, catalog_sig, lines + n_lines, known | frozenset(fresh), old,
                                  self.tail_positives)
            self._sig = sig
            self.refreshes += 1
            self.rebuilds += int(full)
            log.info("store view %s: %d events counted, %d kept (tails), %d users, %d items",
                     "rebuilt" if full else "refreshed", totals.n_events, self.data.n_kept,
                     len(totals.users), len(self.data.catalog))
            return True

    def _absorb(self, totals: _Totals, parts: list[str], category_of) -> _Totals:
        """Stream ``parts`` (HISTORY_COLUMNS only) into ``totals``, ``CHUNK_ROWS`` rows at a time."""
        batch: list[pa.Table] = []
        rows = 0
        for table in self.store.scan(columns=HISTORY_COLUMNS, parts=parts):
            batch.append(table)
            rows += table.num_rows
            if rows >= CHUNK_ROWS:
                totals = totals.absorb(concat_parts(batch), category_of, self.tail_events, self.tail_positives)
                batch, rows = [], 0
        if batch:
            totals = totals.absorb(concat_parts(batch), category_of, self.tail_events, self.tail_positives)
        return totals

    def _ledger_parts(self, offset: int) -> tuple[list[str], int, int, bool]:
        """(parts named by ledger lines after byte ``offset``, the new offset, lines read, ledger shrank)."""
        if self._table_store:  # every data file the table lists now; refresh keeps only the unseen ones
            return [str(p) for p in self.store.parts()], 0, 0, False
        path = self.store.ledger_path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return [], 0, 0, offset > 0
        if size < offset:
            return [], offset, 0, True
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read(size - offset)
        parts: list[str] = []
        n_lines = 0
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl + 1
            line = data[pos:end].strip()
            if line:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a torn last line: read it next time
                    break
                parts.extend(row.get("parts") or [])
                n_lines += 1
            pos = end
        return parts, offset + pos, n_lines, False
