"""Point-in-time features, shared by training, evaluation and scoring.

For every row ``(user_id, item_id, timestamp)`` the features only see ``history``
events **strictly before** the row's timestamp minus the label delay ``lag`` (events at
that instant are excluded); a row without a timestamp sees all of ``history``.

The lag models ingest: a label reaches the serving store only after the next ingest run
(``Settings.feature_lag``, the ingest cron's period by default), so a server answering at
time t holds the events older than about t - lag. Offline features with the same lag
equal the serving features of :class:`ServingStats` built from those events (with
``now=t`` for the item age): ``tests/test_feature_lag.py``. Item age is measured at the
row's own time (the catalog is not a label).

* ``history_items``: the user's last ``history_len`` positive items (oldest first,
  right-aligned, ``-1`` = padding), as indices into an item index.
* ``wide``: user like-rate and log count, item like-rate and log count, user-category
  affinity (like-rate of this user on this item's category) and its log count, item
  age in days (log), query flag. Rates are smoothed towards the prior with
  ``SMOOTHING`` pseudo-events and given as log-odds (the scoring head is linear in
  them; log-odds measured +0.007 test AUC over raw rates on the synthetic data).

Everything is vectorised: one sort per key, ``np.searchsorted`` for "how many events
of this key happened before t" and prefix sums for the label counts. No Python loop
over rows, so 100k+ rows take well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

WIDE_COLUMNS: tuple[str, ...] = (
    "user_like_rate", "user_log_count", "item_like_rate", "item_log_count",
    "user_cat_rate", "user_cat_log_count", "item_log_age_days", "has_query", "user_recent_rate",
)
# the user's last this-many events (any label) that the item-kNN and residual features read (models.cf): most
# of a profile (MovieLens-100k median 65 ratings per user); kept ragged (RecentEvents), so memory does not grow
# with it. Measured on MovieLens-100k (benchmarks/RESULTS.md): 30 -> 200 is +0.0024 AUC at lag 0
KNN_HISTORY = 200
RECENT_EVENTS = 10  # user_recent_rate: the like-rate of the user's last this-many events (taste and mood drift)
SMOOTHING = 5.0  # pseudo-events at the prior like-rate
_NO_TIME = np.iinfo(np.int64).max


@dataclass(frozen=True)
class RecentEvents:
    """Each row's user's last ``k`` events before the row (any label), kept **ragged**: one pool of the
    users' events (sorted by user, then time) and each row's ``[start, end)`` in it (at most ``k`` long).
    The [n, k] arrays the features read are built a block of rows at a time (:meth:`dense`), so memory is
    the pool plus two offsets per row whatever ``k`` (dense, 200 events x 1.5M rows would be 2.7 GB)."""

    items: np.ndarray  # int32 pool: item indices (-1: not in the item index)
    labels: np.ndarray  # int8 pool
    start: np.ndarray  # int64 [n]
    end: np.ndarray  # int64 [n]
    k: int = KNN_HISTORY

    def __len__(self) -> int:
        return len(self.end)

    def __getitem__(self, rows) -> RecentEvents:
        """The same events for a subset of rows (a slice or an index array; the pool is shared)."""
        return RecentEvents(self.items, self.labels, self.start[rows], self.end[rows], self.k)

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """([n, k] int64 items, oldest first, right-aligned, -1 = none; [n, k] int8 labels, 0 there)."""
        return _last_events(self.items, self.labels, self.start, self.end, self.k)

    @classmethod
    def empty(cls, n: int = 0, k: int = KNN_HISTORY) -> RecentEvents:
        zero = np.zeros(n, dtype=np.int64)
        return cls(np.empty(0, dtype=np.int32), np.empty(0, dtype=np.int8), zero, zero.copy(), k)

    @classmethod
    def combine(cls, n: int, parts, k: int = KNN_HISTORY) -> RecentEvents:
        """``n`` rows from ``parts`` [(row positions, RecentEvents of those rows)] (a partitioned engine's
        pieces): the pools concatenated, each part's offsets shifted; rows in no part have no events."""
        out = cls.empty(n, parts[0][1].k if parts else k)
        pools_i, pools_l, offset = [out.items], [out.labels], 0
        for rows, part in parts:
            out.start[rows], out.end[rows] = part.start + offset, part.end + offset
            pools_i.append(part.items)
            pools_l.append(part.labels)
            offset += len(part.items)
        return cls(np.concatenate(pools_i), np.concatenate(pools_l), out.start, out.end, out.k)


@dataclass
class PointInTimeFeatures:
    history_items: np.ndarray  # int64 [n, history_len], -1 = padding
    history_len: np.ndarray  # int64 [n] number of real history items
    wide: np.ndarray  # float32 [n, len(WIDE_COLUMNS)] raw (not standardised)
    recent: RecentEvents  # the last KNN_HISTORY events (any label), ragged

    @property
    def recent_items(self) -> np.ndarray:
        """int64 [n, KNN_HISTORY] the last events' items, -1 = none (dense: small calls and tests)."""
        return self.recent.dense()[0]

    @property
    def recent_labels(self) -> np.ndarray:
        """int8 [n, KNN_HISTORY] their labels (0 where there is no event)."""
        return self.recent.dense()[1]


def _times_ns(values, n: int) -> np.ndarray:
    """UTC nanoseconds as int64; missing -> +inf (sees everything)."""
    if values is None:
        return np.full(n, _NO_TIME, dtype=np.int64)
    ts = pd.to_datetime(pd.Series(values).reset_index(drop=True), utc=True)
    out = ts.to_numpy(dtype="datetime64[ns]").view(np.int64).copy()
    out[ts.isna().to_numpy()] = _NO_TIME
    return out


def _counts_before(hist_keys: np.ndarray, hist_rank: np.ndarray, hist_labels: np.ndarray,
                   row_keys: np.ndarray, row_rank: np.ndarray, base: int):
    """For each row: (n events, n positives) of the same key strictly before the row's time.

    Times enter as dense ranks over the union of history and row times, so the pair
    (key, time) becomes one int64 ``key * base + rank``; one sort plus two searchsorted
    calls answer "how many events of this key happened before t" for all rows at once.
    Also returns the sort order and the [start, end) slice of each row in sorted order
    (used to gather the last items before a row).
    """
    if (max(hist_keys.max(initial=0), row_keys.max(initial=0)) + 1) * base >= np.iinfo(np.int64).max:
        raise OverflowError("too many keys x distinct times for int64 composite keys")
    comp = hist_keys * base + hist_rank
    order = np.argsort(comp, kind="stable")
    comp = comp[order]
    start = np.searchsorted(comp, row_keys * base, side="left")
    end = np.searchsorted(comp, row_keys * base + row_rank, side="left")  # rank < row rank: strictly before
    csum = np.concatenate([[0], np.cumsum(hist_labels[order], dtype=np.int64)])
    return end - start, csum[end] - csum[start], order, (start, end)


def _codes(*columns: pd.Series) -> list[np.ndarray]:
    """Shared integer codes for several string columns (same value -> same code)."""
    cat = pd.Categorical(pd.concat([c.astype("string").fillna("<na>") for c in columns], ignore_index=True))
    codes = np.asarray(cat.codes, dtype=np.int64)
    out, at = [], 0
    for c in columns:
        out.append(codes[at: at + len(c)])
        at += len(c)
    return out


def lag_ns(lag) -> int:
    """A label delay (``pd.Timedelta``, ``timedelta``, seconds as a number, or None = 0) in nanoseconds."""
    if lag is None:
        return 0
    if isinstance(lag, (int, float, np.integer, np.floating)) and not isinstance(lag, bool):
        lag = pd.Timedelta(seconds=float(lag))
    value = pd.Timedelta(lag)
    if pd.isna(value):
        return 0
    if value < pd.Timedelta(0):
        raise ValueError(f"the feature lag must not be negative, got {value}")
    return int(value.value)


def check_feature_inputs(rows: pd.DataFrame, history: pd.DataFrame) -> None:
    """The columns :func:`point_in_time_features` needs, with a clear error (every engine checks the same)."""
    for col in ("user_id", "item_id"):
        if col not in rows.columns:
            raise ValueError(f"rows need a {col!r} column")
    missing = {"user_id", "item_id", "label", "timestamp"} - set(history.columns)
    if missing:
        raise ValueError(f"history is missing columns {sorted(missing)}")


def point_in_time_features(rows: pd.DataFrame, history: pd.DataFrame, catalog: pd.DataFrame,
                           item_index: dict[str, int], history_len: int = 20,
                           prior: float | None = None, lag=None, now=None) -> PointInTimeFeatures:
    """Features for ``rows`` (user_id, item_id, optional timestamp/query) from ``history`` before each row.

    ``item_index`` maps item ids to the indices stored in ``history_items`` (items not in it
    are dropped from histories). ``prior`` is the like-rate used for smoothing (default: the
    like-rate of ``history``). ``lag`` (``pd.Timedelta``; None or 0 = none): a row at time t
    only sees events with timestamp < t - lag (history items and every statistic alike);
    rows without a timestamp still see all of ``history``. ``now``: the time a row without a timestamp
    measures item age at (default: the latest ``history`` time); a partitioned engine
    (:mod:`models.engine`) passes the whole window's latest time, since each partition sees only part of it.
    """
    check_feature_inputs(rows, history)
    rows = rows.reset_index(drop=True)
    if prior is None:
        prior = float(pd.to_numeric(history["label"]).mean()) if len(history) else 0.5
    prior = float(np.clip(prior, 0.01, 0.99))
    latest = pd.to_datetime(history["timestamp"].max(), utc=True) if len(history) else pd.NaT
    if now is not None:
        latest = pd.to_datetime(now, utc=True)
    ref_now = (latest if pd.notna(latest) else pd.Timestamp.now(tz="UTC")).value  # "now" for rows without a time
    # only events of the rows' users or items can matter: drop the rest first (exact, and it
    # makes a serving-style call - one user, a few hundred candidates - cheap on a large store)
    if len(history) > 2 * len(rows):
        keep = (history["user_id"].isin(rows["user_id"].unique())
                | history["item_id"].isin(rows["item_id"].unique())).to_numpy()
        history = history[keep]
    history = history.reset_index(drop=True)
    n = len(rows)
    row_t = _times_ns(rows["timestamp"] if "timestamp" in rows.columns else None, n)
    lag = lag_ns(lag)
    # what a row may see ends at t - lag: shift the row times once, before ranking (item age keeps row_t)
    seen_t = np.where(row_t == _NO_TIME, _NO_TIME, row_t - lag) if lag else row_t
    hist_t = _times_ns(history["timestamp"], len(history))
    labels = history["label"].to_numpy(dtype=np.int64, na_value=0)
    uniq, inv = np.unique(np.concatenate([hist_t, seen_t]), return_inverse=True)
    hist_r, row_r = inv[: len(hist_t)].astype(np.int64), inv[len(hist_t):].astype(np.int64)
    base = np.int64(len(uniq) + 1)

    # users and items
    row_u, hist_u = _codes(rows["user_id"], history["user_id"])
    row_i, hist_i = _codes(rows["item_id"], history["item_id"])

    u_n, u_pos, u_order, (u_start, u_end) = _counts_before(hist_u, hist_r, labels, row_u, row_r, base)
    # the user's last RECENT_EVENTS events before t (ties at one time keep the history's order, as in serving)
    u_csum = np.concatenate([[0], np.cumsum(labels[u_order], dtype=np.int64)])
    r_lo = np.maximum(u_end - RECENT_EVENTS, u_start)
    r_n, r_pos = u_end - r_lo, u_csum[u_end] - u_csum[r_lo]
    all_items = history["item_id"].astype("string").map(item_index).fillna(-1).to_numpy(dtype=np.int32)[u_order]
    recent = RecentEvents(all_items, labels[u_order].astype(np.int8), np.maximum(u_end - KNN_HISTORY, u_start),
                          u_end.astype(np.int64), KNN_HISTORY)
    i_n, i_pos, _, _ = _counts_before(hist_i, hist_r, labels, row_i, row_r, base)

    # user x category of the row's item
    row_c, hist_c = _category_codes(rows, history, catalog)
    n_cat = np.int64(max(row_c.max(initial=0), hist_c.max(initial=0)) + 1)
    c_n, c_pos, _, _ = _counts_before(hist_u * n_cat + hist_c, hist_r, labels, row_u * n_cat + row_c, row_r, base)

    hist_items, hist_count = _last_positives(history, item_index, labels, hist_u, hist_r, row_u, row_r, base,
                                             history_len)
    age_days = _item_age_days(rows, catalog, np.where(row_t == _NO_TIME, ref_now, row_t))
    has_query = _has_query(rows)
    wide = np.stack([
        _rate(u_pos, u_n, prior), np.log1p(u_n), _rate(i_pos, i_n, prior), np.log1p(i_n),
        _rate(c_pos, c_n, prior), np.log1p(c_n), np.log1p(age_days), has_query, _rate(r_pos, r_n, prior),
    ], axis=1).astype(np.float32)
    return PointInTimeFeatures(hist_items, hist_count, wide, recent)


def _category_codes(rows: pd.DataFrame, history: pd.DataFrame, catalog: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Shared integer codes of the rows' and the history's item categories (``<none>`` for a catalog item
    without one, ``<unknown>`` for an item not in the catalog)."""
    cat_map = pd.Series(catalog["category"].astype("string").fillna("<none>").to_numpy(),
                        index=catalog["item_id"].astype("string").to_numpy())
    cat_map = cat_map[~cat_map.index.duplicated(keep="last")]
    row_cat = rows["item_id"].astype("string").map(cat_map).fillna("<unknown>")
    hist_cat = history["item_id"].astype("string").map(cat_map).fillna("<unknown>")
    return _codes(row_cat, hist_cat)


def _last_positives(history: pd.DataFrame, item_index: dict[str, int], labels: np.ndarray, hist_u: np.ndarray,
                    hist_r: np.ndarray, row_u: np.ndarray, row_r: np.ndarray, base: np.int64,
                    history_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's user's last ``history_len`` liked items before the row's time (indices of ``item_index``,
    oldest first, -1-padded on the left) and how many there are; the search runs among positives only."""
    pos_mask = labels == 1
    p_u, p_t = hist_u[pos_mask], hist_r[pos_mask]
    p_items = history["item_id"].astype("string").map(item_index).fillna(-1).to_numpy(dtype=np.int64)[pos_mask]
    keep = p_items >= 0
    p_u, p_t, p_items = p_u[keep], p_t[keep], p_items[keep]
    _, _, p_order, (p_start, p_end) = _counts_before(p_u, p_t, np.ones(len(p_u), dtype=np.int64), row_u, row_r, base)
    sorted_items = p_items[p_order]
    offs = np.arange(-history_len, 0, dtype=np.int64)
    idx = p_end[:, None] + offs[None, :]
    valid = idx >= p_start[:, None]
    hist_items = np.where(valid, sorted_items[np.clip(idx, 0, max(len(sorted_items) - 1, 0))]
                          if len(sorted_items) else -1, -1).astype(np.int64)
    return hist_items, valid.sum(axis=1).astype(np.int64)


def _item_age_days(rows: pd.DataFrame, catalog: pd.DataFrame, ref_ns: np.ndarray) -> np.ndarray:
    """Days from each row's item's ``created_at`` to ``ref_ns`` (the row's time; 0 without a creation
    time, never negative)."""
    created = pd.Series(pd.to_datetime(catalog["created_at"], utc=True).to_numpy(),
                        index=catalog["item_id"].astype("string").to_numpy()) if "created_at" in catalog.columns \
        else pd.Series(dtype="datetime64[ns, UTC]")
    created = created[~created.index.duplicated(keep="last")]
    row_created = pd.to_datetime(rows["item_id"].astype("string").map(created), utc=True)
    created_ns = row_created.to_numpy(dtype="datetime64[ns]").view(np.int64)
    age_days = np.where(row_created.isna().to_numpy(), 0.0, (ref_ns - created_ns) / 86_400e9)
    return np.clip(age_days, 0.0, None)


def _has_query(rows: pd.DataFrame) -> np.ndarray:
    """1.0 for rows with a non-blank ``query``, else 0.0."""
    if "query" not in rows.columns:
        return np.zeros(len(rows), dtype=np.float32)
    q = rows["query"].astype("string")
    return (q.notna() & (q.str.strip().str.len() > 0)).fillna(False).to_numpy(dtype=np.float32)


def _last_events(items: np.ndarray, labels: np.ndarray, start: np.ndarray, end: np.ndarray, k: int):
    """Per row, the ``k`` entries before ``end`` (not before ``start``) of the sorted ``items`` / ``labels``,
    oldest first, right-aligned: ([n, k] int64 items, -1 = none; [n, k] int8 labels)."""
    idx = end[:, None] + np.arange(-k, 0, dtype=np.int64)[None, :]
    valid = idx >= start[:, None]
    if not len(items):
        return np.full(idx.shape, -1, dtype=np.int64), np.zeros(idx.shape, dtype=np.int8)
    cl = np.clip(idx, 0, len(items) - 1)
    return (np.where(valid, items[cl], -1).astype(np.int64),
            np.where(valid, labels[cl], 0).astype(np.int8))


def _rate(pos, cnt, prior: float):
    """Smoothed like-rate as a log-odds (the head is linear in logits)."""
    p = np.clip((pos + SMOOTHING * prior) / (cnt + SMOOTHING), 1e-4, 1.0 - 1e-4)
    return np.log(p / (1.0 - p))


# --------------------------------------------------------------------------- serving: "as of now"
UNKNOWN_CATEGORY = "<unknown>"  # items not in the catalog (as in point_in_time_features)


@dataclass(frozen=True)
class UserStats:
    """One user's statistics over a whole snapshot (see :meth:`ServingStats.user`)."""

    user_id: str
    n: int  # events
    n_pos: int  # positive events
    cat_n: np.ndarray  # int64 [n_cat] events per category
    cat_pos: np.ndarray  # int64 [n_cat] positives per category
    positives: np.ndarray  # int64 item positions of the positive events, oldest first (repeats kept)
    recent_n: int = 0  # of the user's last RECENT_EVENTS events: how many there are
    recent_pos: int = 0  # ... and how many of them are positive
    events: np.ndarray | None = None  # int64 item positions of all the user's events, oldest first
    labels: np.ndarray | None = None  # int64 their labels


@dataclass(frozen=True, eq=False)
class ServingStats:
    """Statistics of one history snapshot for scoring rows **without a timestamp** fast.

    Built once per snapshot (vectorised; for serving: at store-refresh time, off the request
    path); afterwards :meth:`user` and :meth:`wide` are a few array lookups per call, no pandas.
    For any ``(user, item)`` the result equals :func:`point_in_time_features` of a row without
    a timestamp over the same ``history`` and ``catalog``: every event with a valid time counts,
    "now" (for item age) is the latest history time, categories and creation times come from
    ``catalog`` (last row per item wins), items only seen in events have category ``<unknown>``.
    Item positions run over the catalog items (deduplicated, last wins) and then the items
    only seen in ``history``: the same order as ``models.data.ItemIndex.from_catalog``.
    """

    item_ids: np.ndarray  # object [n_items]
    item_pos: dict  # item_id -> position
    item_texts: list  # the model's text per item (the id for items only seen in events)
    item_cat: np.ndarray  # int64 [n_items] category code
    item_n: np.ndarray  # int64 [n_items] events per item
    item_n_pos: np.ndarray  # int64 [n_items] positives per item
    item_log_age: np.ndarray  # float64 [n_items] log1p(age in days at ref_now), 0 without created_at
    categories: list  # code -> category string
    unknown_cat: int  # code of UNKNOWN_CATEGORY
    ref_now: int  # ns: ``now`` if given, else the latest history time (or the build time for an empty history)
    user_index: dict  # user_id -> row of user_start
    user_start: np.ndarray  # int64 [n_users + 1]: each user's slice of ev_item / ev_label
    ev_item: np.ndarray  # int64 item positions of the events, sorted by (user, time), stable
    ev_label: np.ndarray  # int64 labels in the same order
    n_events: int
    catalog: pd.DataFrame | None = None  # the frame the catalog part was built from (for reuse)
    _catalog_part: dict | None = None

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @classmethod
    def build(cls, history: pd.DataFrame, catalog: pd.DataFrame,
              previous: ServingStats | None = None, now=None) -> ServingStats:
        """Statistics of ``history`` (user_id, item_id, label, timestamp) against ``catalog``
        (an ``item_id`` column; ``category``, ``created_at`` and the text columns used when present).

        ``previous``: stats built from the *same* catalog object; its catalog part is reused.
        ``now``: the time item ages are measured at (default: the latest history time, as for a
        row without a timestamp). With ``now=t`` and ``history`` = the events older than
        ``t - lag``, the features equal :func:`point_in_time_features` of a row at ``t`` with ``lag``.
        """
        missing = {"user_id", "item_id", "label", "timestamp"} - set(history.columns)
        if missing:
            raise ValueError(f"history is missing columns {sorted(missing)}")
        if "item_id" not in catalog.columns:
            raise ValueError("the catalog needs an 'item_id' column")
        if previous is not None and previous.catalog is catalog and previous._catalog_part is not None:
            part = previous._catalog_part
        else:
            part = _catalog_part(catalog)

        t = _times_ns(history["timestamp"], len(history))
        valid = t != _NO_TIME  # rows without a time see every event with a time, never a NaT one
        ref_now = int(t[valid].max()) if valid.any() else pd.Timestamp.now(tz="UTC").value
        if now is not None:
            now = pd.Timestamp(now)
            ref_now = (now.tz_localize("UTC") if now.tzinfo is None else now.tz_convert("UTC")).value
        users = history["user_id"].astype(str).to_numpy(dtype=object)[valid]
        items = history["item_id"].astype(str).to_numpy(dtype=object)[valid]
        labels = history["label"].to_numpy(dtype=np.int64, na_value=0)[valid]
        t = t[valid]

        # item positions: catalog items, then items only seen in events (first-seen order)
        ev_item = part["index"].get_indexer(items).astype(np.int64)
        base_ids = part["ids"]
        extra = pd.unique(items[ev_item < 0]) if (ev_item < 0).any() else np.empty(0, dtype=object)
        item_ids = np.concatenate([base_ids, np.asarray(extra, dtype=object)]) if len(extra) else base_ids
        if len(extra):
            ev_item[ev_item < 0] = len(base_ids) + pd.Index(extra).get_indexer(items[ev_item < 0])
            item_pos = {**part["pos"], **{str(x): len(base_ids) + k for k, x in enumerate(extra)}}
        else:
            item_pos = part["pos"]
        n_items = len(item_ids)
        categories = part["categories"]
        unknown_cat = part["unknown_cat"]
        item_cat = np.concatenate([part["cat"], np.full(len(extra), unknown_cat, dtype=np.int64)])
        created = np.concatenate([part["created_ns"], np.full(len(extra), _NO_TIME, dtype=np.int64)])
        has_created = created != _NO_TIME
        age = np.where(has_created, (ref_now - np.where(has_created, created, 0)) / 86_400e9, 0.0)
        item_log_age = np.log1p(np.clip(age, 0.0, None))
        item_texts = part["texts"] + [str(x) for x in extra]

        item_n = np.bincount(ev_item, minlength=n_items).astype(np.int64)
        item_n_pos = np.bincount(ev_item, weights=labels, minlength=n_items).round().astype(np.int64)

        # events grouped by user, time order inside (stable: ties keep the history's order)
        ucode, uniq = pd.factorize(pd.Series(users, dtype=object), sort=False)
        ucode = np.asarray(ucode, dtype=np.int64)
        order = np.lexsort((t, ucode))
        counts = np.bincount(ucode, minlength=len(uniq))
        user_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(item_ids=item_ids, item_pos=item_pos, item_texts=item_texts, item_cat=item_cat,
                   item_n=item_n, item_n_pos=item_n_pos, item_log_age=item_log_age, categories=categories,
                   unknown_cat=unknown_cat, ref_now=ref_now,
                   user_index={str(u): k for k, u in enumerate(uniq)}, user_start=user_start,
                   ev_item=ev_item[order], ev_label=labels[order], n_events=len(labels),
                   catalog=catalog, _catalog_part=part)

    def user(self, user_id: str) -> UserStats:
        """The user's counts (all, per category) and positive items; zeros for an unknown user."""
        n_cat = len(self.categories)
        k = self.user_index.get(str(user_id))
        if k is None:
            z = np.zeros(n_cat, dtype=np.int64)
            return UserStats(str(user_id), 0, 0, z, z, np.empty(0, dtype=np.int64))
        s, e = int(self.user_start[k]), int(self.user_start[k + 1])
        items, labels = self.ev_item[s:e], self.ev_label[s:e]
        cats = self.item_cat[items]
        cat_n = np.bincount(cats, minlength=n_cat).astype(np.int64)
        cat_pos = np.bincount(cats, weights=labels, minlength=n_cat).round().astype(np.int64)
        recent = labels[-RECENT_EVENTS:]
        return UserStats(str(user_id), e - s, int(labels.sum()), cat_n, cat_pos, items[labels == 1],
                         len(recent), int(recent.sum()), items, labels)

    def positions(self, item_ids) -> np.ndarray:
        """Item positions (-1 for items neither in the catalog nor in the history)."""
        get = self.item_pos.get
        return np.fromiter((get(str(i), -1) for i in item_ids), dtype=np.int64, count=len(item_ids))

    def history_items(self, user: UserStats, history_len: int) -> np.ndarray:
        """``history_items`` of :func:`point_in_time_features` for a row without a time: [history_len]."""
        last = user.positives[-history_len:] if history_len > 0 else user.positives[:0]
        out = np.full(history_len, -1, dtype=np.int64)
        if len(last):
            out[history_len - len(last):] = last
        return out

    def recent_events(self, user: UserStats, k: int = KNN_HISTORY) -> tuple[np.ndarray, np.ndarray]:
        """``recent_items`` / ``recent_labels`` of :func:`point_in_time_features` for a row without a time: [k]."""
        if user.events is None or not len(user.events):
            return np.full(k, -1, dtype=np.int64), np.zeros(k, dtype=np.int8)
        n = len(user.events)
        it, lab = _last_events(user.events, user.labels, np.zeros(1, dtype=np.int64), np.full(1, n, dtype=np.int64), k)
        return it[0], lab[0]

    def wide(self, user: UserStats, positions: np.ndarray, has_query: bool, prior: float) -> np.ndarray:
        """``wide`` of :func:`point_in_time_features` for ``user`` x items at ``positions`` (no time)."""
        prior = float(np.clip(prior, 0.01, 0.99))
        pos = np.asarray(positions, dtype=np.int64)
        n = len(pos)
        known = pos >= 0
        p = np.where(known, pos, 0)
        i_n = np.where(known, self.item_n[p], 0) if self.n_items else np.zeros(n, dtype=np.int64)
        i_pos = np.where(known, self.item_n_pos[p], 0) if self.n_items else np.zeros(n, dtype=np.int64)
        cat = np.where(known, self.item_cat[p], self.unknown_cat) if self.n_items else \
            np.full(n, self.unknown_cat, dtype=np.int64)
        c_n, c_pos = user.cat_n[cat], user.cat_pos[cat]
        age = np.where(known, self.item_log_age[p], 0.0) if self.n_items else np.zeros(n)
        u_n, u_pos = np.int64(user.n), np.int64(user.n_pos)
        return np.stack([
            np.full(n, _rate(u_pos, u_n, prior)), np.full(n, np.log1p(u_n)), _rate(i_pos, i_n, prior),
            np.log1p(i_n), _rate(c_pos, c_n, prior), np.log1p(c_n), age,
            np.full(n, 1.0 if has_query else 0.0),
            np.full(n, _rate(np.int64(user.recent_pos), np.int64(user.recent_n), prior)),
        ], axis=1).astype(np.float32)


def _catalog_part(catalog: pd.DataFrame) -> dict:
    """What the serving statistics take from the catalog alone (reused while the catalog is unchanged)."""
    from recloop.schema import item_text

    cat = catalog.drop_duplicates("item_id", keep="last")
    ids = cat["item_id"].astype(str).to_numpy(dtype=object)
    if "category" in cat.columns:
        names = cat["category"].astype("string").fillna("<none>").astype(str).to_numpy(dtype=object)
    else:
        names = np.full(len(cat), "<none>", dtype=object)
    codes, categories = pd.factorize(pd.Series(names, dtype=object), sort=False)
    categories = [str(c) for c in categories]
    if UNKNOWN_CATEGORY in categories:
        unknown_cat = categories.index(UNKNOWN_CATEGORY)
    else:
        unknown_cat = len(categories)
        categories.append(UNKNOWN_CATEGORY)
    if "created_at" in cat.columns:
        created = pd.to_datetime(cat["created_at"], utc=True)
        created_ns = created.to_numpy(dtype="datetime64[ns]").view(np.int64).copy()
        created_ns[created.isna().to_numpy()] = _NO_TIME
    else:
        created_ns = np.full(len(cat), _NO_TIME, dtype=np.int64)
    texts = item_text(cat).tolist() if len(cat) and {"title", "category", "description"} <= set(cat.columns) \
        else [str(i) for i in ids]
    return {"ids": ids, "index": pd.Index(ids), "pos": {str(x): k for k, x in enumerate(ids)},
            "cat": np.asarray(codes, dtype=np.int64), "categories": categories, "unknown_cat": unknown_cat,
            "created_ns": created_ns, "texts": texts}
