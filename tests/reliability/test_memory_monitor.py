"""Issue 14, item 7 (memory): the drift check samples before it materialises.

The windows are read as Arrow columns (with the store's pushdown), one at a time; only the sampled rows
become pandas rows (the reference profile is counted on Arrow columns). The sample, the profile and the
like-rates are exactly what the old path computed from the whole window read into pandas.
"""

from __future__ import annotations

import pandas as pd
import pytest

from recloop.datasets.synthetic import SyntheticConfig, generate
from recloop.settings import load_settings
from recloop.store import FeedbackStore


@pytest.fixture(scope="module")
def world():
    return generate(SyntheticConfig(seed=4, n_users=150, n_items=60, n_days=8, drift_day=5, drift_items=10,
                                    bad_batch_day=None))


@pytest.fixture
def workspace(tmp_path, world):
    s = load_settings(tmp_path / "ws", monitor={"sample_size": 300, "score_sample_size": 100,
                                                "min_window_events": 50}).ensure_dirs()
    store = FeedbackStore.from_settings(s)
    store.upsert_catalog(world.catalog)
    store.append(world.events, batch_id="world")
    return s, store


def _champion(world):
    from monitoring.windows import ChampionInfo

    return ChampionInfo(version="1", train_start=world.day_start(0), train_end=world.day_start(5),
                        holdout_start=world.day_start(3))


def test_drift_check_materialises_only_the_sampled_rows(workspace, world, monkeypatch):
    from monitoring import drift, windows

    s, store = workspace
    full_reads, frames = [], []
    real_read = store.read

    def counting_read(*a, **k):
        df = real_read(*a, **k)
        full_reads.append(len(df))
        return df

    real_to_pandas = getattr(windows, "_to_pandas", None)

    def recording_to_pandas(table):
        frames.append((table.num_rows, list(table.column_names)))
        return real_to_pandas(table)

    monkeypatch.setattr(store, "read", counting_read)
    monkeypatch.setattr(windows, "_to_pandas", recording_to_pandas, raising=False)
    # the verdict is not under test here: Evidently's report is replaced by "no columns judged"
    monkeypatch.setattr(drift, "run_evidently", lambda *a, **k: ([], None))

    out = drift.detect_drift(s, store, _champion(world), now=world.day_start(8), record=False)

    assert out.status == "checked" and out.sampled
    assert out.n_reference > 300 and out.n_current > 300
    assert full_reads == []  # no window was read into pandas whole
    # the only pandas rows: the two samples (the profile is counted on Arrow columns)
    assert [n for n, _ in frames] == [300, 300] == [out.n_reference_sampled, out.n_current_sampled]


def test_window_sample_profile_and_like_rate_equal_the_whole_window_path(workspace, world):
    from monitoring.features import build_profile, build_profile_from_window
    from monitoring.windows import EVENT_COLUMNS, load_window, sample_rows

    _, store = workspace
    catalog = store.catalog()
    for start, end, n in [(world.day_start(0), world.day_start(5), 300),  # sampled
                          (world.day_start(5), world.day_start(6), 10_000),  # smaller than the sample
                          (world.day_start(9), world.day_start(10), 300)]:  # empty
        whole = store.read(start, end, columns=EVENT_COLUMNS)
        w = load_window(store, start, end)
        assert len(w) == len(whole)
        pd.testing.assert_frame_equal(w.sample(n, seed=7), sample_rows(whole, n, seed=7).reset_index(drop=True))
        if len(whole):
            assert w.like_rate() == float(whole["label"].mean())
        a, b = build_profile_from_window(w, catalog), build_profile(whole, catalog)
        assert (a.item_bucket, a.user_bucket, a.vocabulary, a.cut, a.n_events) == \
            (b.item_bucket, b.user_bucket, b.vocabulary, b.cut, b.n_events)
