"""Property of the ingest policy (issue 14): rows in = rows stored + rows quarantined, always.

Hypothesis builds batches from valid rows, rows with bad fields, duplicates (inside the batch and
already in the store), a user over the per-batch event cap, too-old and future timestamps, in a
random order and under a random bad-row tolerance. Whatever the verdict (pass, split, quarantine),
every input row ends up exactly once either in the store or in quarantine: checked by ``event_id``
multiset against what is physically in the store and in ``quarantine/``, and against the counts
the outcome reports.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from data_checks.ingest import ingest_batch
from data_checks.readers import read_batch
from recloop.store import FeedbackStore
from tests.conftest_data_checks import NOW, land, make_events, with_catalog

CAP = 8  # max_events_per_user in these workspaces
N_STORED = 10  # events already in the store before the batch


@pytest.fixture(scope="module")
def clean_env():
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("RECLOOP_"):
                mp.delenv(key)
        yield


def _workspace(root: Path, max_invalid_share: float):
    from recloop.settings import load_settings

    s = with_catalog(load_settings(root).ensure_dirs())
    s.checks.max_events_per_user = CAP
    s.checks.retention_days = 365
    s.checks.max_invalid_row_share = max_invalid_share
    FeedbackStore.from_settings(s).append(make_events(N_STORED, seed=99, prefix="stored"), batch_id="seed")
    return s


def _bad_fields(rows: pd.DataFrame, kinds: list[str]) -> pd.DataFrame:
    rows = rows.copy().astype({"label": "int64"})
    rows["user_id"] = rows["user_id"].astype(object)
    for i, kind in enumerate(kinds):
        at = rows.index[i]
        if kind == "null_user":
            rows.at[at, "user_id"] = None
        elif kind == "unknown_item":
            rows.at[at, "item_id"] = "item-nobody-knows"
        elif kind == "label_not_binary":
            rows.at[at, "label"] = 2
        elif kind == "unknown_type":
            rows.at[at, "event_type"] = "teleport"
        elif kind == "label_contradicts_type":
            rows.at[at, "event_type"], rows.at[at, "label"] = "impression", 1
    return rows


def _batch(seed, n_valid, bad_kinds, n_dup, n_stored_dup, n_burst_extra, n_old, n_future) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    valid = make_events(n_valid, seed=seed, prefix="valid")
    parts = [valid]
    if bad_kinds:
        parts.append(_bad_fields(make_events(len(bad_kinds), seed=seed + 1, prefix="bad"), bad_kinds))
    if n_dup and n_valid:
        parts.append(valid.iloc[rng.integers(0, n_valid, n_dup)])  # same event_id again in the batch
    if n_stored_dup:
        parts.append(make_events(N_STORED, seed=99, prefix="stored").iloc[:n_stored_dup])  # already stored
    if n_burst_extra:
        burst = make_events(CAP + n_burst_extra, seed=seed + 2, prefix="burst")
        parts.append(burst.assign(user_id="user-burst"))
    if n_old:
        parts.append(make_events(n_old, seed=seed + 3, prefix="old", start=NOW - pd.Timedelta(days=800)))
    if n_future:
        parts.append(make_events(n_future, seed=seed + 4, prefix="future", start=NOW + pd.Timedelta(days=2)))
    df = pd.concat(parts, ignore_index=True)
    df["label"] = df["label"].astype("int64")
    return df.iloc[rng.permutation(len(df))].reset_index(drop=True)


BAD_KINDS = st.lists(st.sampled_from(["null_user", "unknown_item", "label_not_binary", "unknown_type",
                                      "label_contradicts_type"]), max_size=6)


@hsettings(max_examples=10, deadline=None, database=None,
           suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(seed=st.integers(0, 10_000), n_valid=st.integers(0, 60), bad_kinds=BAD_KINDS, n_dup=st.integers(0, 5),
       n_stored_dup=st.integers(0, 5), n_burst_extra=st.integers(0, 6), n_old=st.integers(0, 5),
       n_future=st.integers(0, 4), max_invalid_share=st.sampled_from([0.05, 0.3, 1.0]))
def test_every_row_is_either_stored_or_quarantined(clean_env, tmp_path_factory, seed, n_valid, bad_kinds, n_dup,
                                                   n_stored_dup, n_burst_extra, n_old, n_future,
                                                   max_invalid_share):
    s = _workspace(tmp_path_factory.mktemp("ws"), max_invalid_share)
    df = _batch(seed, n_valid, bad_kinds, n_dup, n_stored_dup, n_burst_extra, n_old, n_future)
    path = land(s, df, "batch.parquet")
    out = ingest_batch(path, s, now=NOW)
    event(out.status)

    stored = FeedbackStore.from_settings(s).read()
    stored_now = Counter(stored.loc[~stored["event_id"].str.startswith("stored-"), "event_id"])
    if out.status == "quarantined":  # the whole file, kept as delivered
        held = Counter(read_batch(Path(out.destination))["event_id"]) if len(df) else Counter()
        assert Path(out.destination).parent == s.quarantine_dir
    elif out.quarantined_rows_path:
        held = Counter(pd.read_parquet(out.quarantined_rows_path)["event_id"])
    else:
        held = Counter()
    assert Counter(df["event_id"]) == stored_now + held, (out.status, out.reasons)
    assert len(stored) - N_STORED == sum(stored_now.values()) == out.n_new  # nothing stored twice
    assert out.n_rows == len(df) == out.n_new + out.n_quarantined, (out.status, out.reasons)
    assert not path.exists()  # the file moved on (processed/ or quarantine/)
