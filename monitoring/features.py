"""The feature frame drift is measured on: one row per event, built from events and catalog.

=================  ===========  ===========================================================
column             type         meaning
=================  ===========  ===========================================================
category           categorical  the item's catalog category (``unknown`` for an unknown item)
item_popularity    categorical  head / torso / tail by the item's share of reference events;
                                ``unseen`` if the item had no reference events
user_activity      categorical  heavy / regular / light by the user's reference events; ``new``
has_query          categorical  ``yes`` for search events
item_age_days      numerical    days between the item's creation and the event
hour               numerical    hour of day (UTC)
query_tokens       numerical    tokens in the query (0 without one)
text_novelty       numerical    share of the event's item-text + query tokens that are not in
                                the reference vocabulary (see below)
label              categorical  target (1 = positive feedback): target drift = like-rate moves
score              numerical    the champion's predicted score (prediction drift), if a scorer
=================  ===========  ===========================================================

Buckets (popularity, activity) and the vocabulary come from the *reference* window only,
so the current window is described in the reference's terms. They are built from the first
``PROFILE_FRACTION`` of the reference window (by time) and the reference's own values of those
three columns are measured on the rest (the early rows are left NaN). Both windows are then
described out-of-sample: an in-sample reference would put exactly a third of events in each
bucket and see no new words, and regression to the mean alone would look like drift.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recloop.schema import item_text

CATEGORICAL = ["category", "item_popularity", "user_activity", "has_query"]
NUMERICAL = ["item_age_days", "hour", "query_tokens", "text_novelty"]
FEATURES = CATEGORICAL + NUMERICAL
TARGET = "label"
PREDICTION = "score"
PROFILE_FRACTION = 0.5
PROFILED = ["item_popularity", "user_activity", "text_novelty"]
PROFILE_COLUMNS = ["item_id", "user_id", "query"]  # what the profile reads of the early reference rows
_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text) -> list[str]:
    if text is None or (isinstance(text, float) and np.isnan(text)) or text is pd.NA:
        return []
    return _TOKEN.findall(str(text).lower())


@dataclass
class ReferenceProfile:
    item_bucket: dict[str, str]
    user_bucket: dict[str, str]
    vocabulary: frozenset[str]
    cut: pd.Timestamp | None  # reference rows up to this built the profile (PROFILED columns NaN there)
    n_events: int


def _buckets(counts: pd.Series, names: tuple[str, str, str]) -> dict[str, str]:
    """Split keys into three groups that each hold about a third of the events (most active first)."""
    if counts.empty:
        return {}
    counts = counts.sort_values(ascending=False, kind="stable")
    cum = counts.cumsum().to_numpy() / counts.sum()
    before = np.concatenate([[0.0], cum[:-1]])  # share of events held by more popular keys
    group = np.where(before < 1 / 3, 0, np.where(before < 2 / 3, 1, 2))
    return dict(zip(counts.index.astype(str), np.asarray(names, dtype=object)[group]))


def build_profile(reference: pd.DataFrame, catalog: pd.DataFrame) -> ReferenceProfile:
    """Buckets and vocabulary from the early part of the reference window (counts, distinct texts)."""
    cut = None
    early = reference.iloc[0:0]
    if len(reference):
        t0, t1 = reference["timestamp"].min(), reference["timestamp"].max()
        cut = t0 + (t1 - t0) * PROFILE_FRACTION
        early = reference[reference["timestamp"] <= cut]
    return _profile(early, cut, catalog)


def build_profile_from_window(window, catalog: pd.DataFrame) -> ReferenceProfile:
    """:func:`build_profile` of a ``monitoring.windows.EventWindow``: the same profile, counted on the
    early half's Arrow columns (``item_id``, ``user_id``, ``query``) without a pandas row per event."""
    import pyarrow.compute as pc

    t0, t1 = window.time_bounds()
    if t0 is None:
        return _profile(pd.DataFrame({c: pd.Series([], dtype="string") for c in PROFILE_COLUMNS}), None, catalog)
    cut = t0 + (t1 - t0) * PROFILE_FRACTION
    early = window.table_until(cut, PROFILE_COLUMNS)
    vocab: set[str] = set()
    texts = _item_texts(catalog)
    for iid in pc.unique(early.column("item_id")).drop_null().to_pylist():
        vocab.update(tokenize(texts.get(iid)))
    for q in pc.unique(early.column("query")).drop_null().to_pylist():
        vocab.update(tokenize(q))
    items = _buckets(_value_counts(early.column("item_id")), ("head", "torso", "tail"))
    users = _buckets(_value_counts(early.column("user_id")), ("heavy", "regular", "light"))
    return ReferenceProfile(items, users, frozenset(vocab), cut, early.num_rows)


def _value_counts(column) -> pd.Series:
    """``Series.value_counts()`` of an Arrow string column (keys in order of first appearance, then the
    same sort), without a Python object per row."""
    import pyarrow.compute as pc

    enc = pc.dictionary_encode(column.combine_chunks() if hasattr(column, "combine_chunks") else column)
    codes = enc.indices.to_numpy(zero_copy_only=False)
    codes = codes[~np.isnan(codes)].astype(np.int64) if codes.dtype.kind == "f" else codes.astype(np.int64)
    counts = np.bincount(codes, minlength=len(enc.dictionary)).astype(np.int64)
    keys = pd.Index(enc.dictionary.to_pylist(), dtype=object)
    return pd.Series(counts, index=keys)[counts > 0].sort_values(ascending=False)


def _profile(early: pd.DataFrame, cut, catalog: pd.DataFrame) -> ReferenceProfile:
    vocab: set[str] = set()
    if cut is not None:
        texts = _item_texts(catalog)
        for iid in early["item_id"].dropna().unique():
            vocab.update(tokenize(texts.get(iid)))
        for q in early["query"].dropna().unique():
            vocab.update(tokenize(q))
    items = _buckets(early["item_id"].value_counts(), ("head", "torso", "tail"))
    users = _buckets(early["user_id"].value_counts(), ("heavy", "regular", "light"))
    return ReferenceProfile(items, users, frozenset(vocab), cut, len(early))


def _item_texts(catalog: pd.DataFrame) -> dict[str, str]:
    if catalog.empty:
        return {}
    return dict(zip(catalog["item_id"].astype(str), item_text(catalog)))


def _novelty_counts(keys, texts, vocab) -> tuple[dict, dict]:
    unseen, total = {}, {}
    for k in keys:
        toks = tokenize(texts(k))
        total[k] = len(toks)
        unseen[k] = sum(t not in vocab for t in toks)
    return unseen, total


def build_feature_frame(events: pd.DataFrame, catalog: pd.DataFrame, profile: ReferenceProfile,
                        reference: bool = False) -> pd.DataFrame:
    """One row per event with the FEATURES columns plus ``label``; vectorised (maps over distinct keys)."""
    out = pd.DataFrame(index=events.index)
    item_ids = events["item_id"].astype(str)
    cat = catalog.set_index(catalog["item_id"].astype(str)) if not catalog.empty else None

    if cat is not None:
        out["category"] = item_ids.map(cat["category"].astype(str)).fillna("unknown").astype(str)
        created = item_ids.map(cat["created_at"])
        created = pd.to_datetime(created, utc=True)
        age = (events["timestamp"] - created).dt.total_seconds() / 86400.0
        out["item_age_days"] = age.clip(lower=0.0).astype(float)
    else:
        out["category"] = "unknown"
        out["item_age_days"] = np.nan

    out["item_popularity"] = item_ids.map(profile.item_bucket).fillna("unseen").astype(str)
    out["user_activity"] = events["user_id"].astype(str).map(profile.user_bucket).fillna("new").astype(str)
    query = events["query"].astype("object").where(events["query"].notna(), None)
    has_q = query.notna() & (query.astype(str).str.strip() != "")
    out["has_query"] = np.where(has_q, "yes", "no")
    out["hour"] = events["timestamp"].dt.hour.astype(float)

    texts = _item_texts(catalog)
    i_unseen, i_total = _novelty_counts(item_ids.unique(), texts.get, profile.vocabulary)
    distinct_q = query[has_q].unique()
    q_unseen, q_total = _novelty_counts(distinct_q, lambda q: q, profile.vocabulary)
    q_tok = query.map(q_total).fillna(0.0).astype(float)
    unseen = item_ids.map(i_unseen).astype(float) + query.map(q_unseen).fillna(0.0).astype(float)
    total = item_ids.map(i_total).astype(float) + q_tok
    out["query_tokens"] = q_tok
    with np.errstate(invalid="ignore", divide="ignore"):
        novelty = np.where(total > 0, unseen / total.replace(0, np.nan), 0.0)
    out["text_novelty"] = novelty.astype(float)
    if reference and profile.cut is not None:
        early = (events["timestamp"] <= profile.cut).to_numpy()
        for c in PROFILED:
            out.loc[early, c] = np.nan

    out[TARGET] = events["label"].astype(int).astype(str)
    out["timestamp"] = events["timestamp"]
    return out.reset_index(drop=True)
