"""Point-in-time features: nothing at or after a row's timestamp may leak in."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.features import WIDE_COLUMNS, point_in_time_features

T0 = pd.Timestamp("2026-01-01", tz="UTC")


def _catalog(n=6):
    return pd.DataFrame({"item_id": [f"i{k}" for k in range(n)], "title": [f"t{k}" for k in range(n)],
                         "description": "", "category": ["a", "a", "b", "b", "c", "c"][:n],
                         "created_at": [T0 - pd.Timedelta(days=10)] * n})


def _events(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "label", "timestamp"])


def test_history_is_strictly_before_the_row_time_ties_excluded():
    h = _events([
        ("u", "i0", 1, T0 + pd.Timedelta(hours=1)),
        ("u", "i1", 1, T0 + pd.Timedelta(hours=2)),
        ("u", "i2", 0, T0 + pd.Timedelta(hours=3)),  # a negative never enters the history
        ("u", "i3", 1, T0 + pd.Timedelta(hours=4)),  # same instant as the row below: excluded
        ("u", "i4", 1, T0 + pd.Timedelta(hours=5)),  # after: excluded
        ("v", "i5", 1, T0),  # another user
    ])
    index = {f"i{k}": k for k in range(6)}
    rows = pd.DataFrame({"user_id": ["u", "u", "u", "w"], "item_id": ["i5"] * 4,
                         "timestamp": [T0 + pd.Timedelta(hours=4), T0, pd.NaT, T0 + pd.Timedelta(days=9)]})
    f = point_in_time_features(rows, h, _catalog(), index, history_len=3)
    assert f.history_items[0].tolist() == [-1, 0, 1]
    assert f.history_items[1].tolist() == [-1, -1, -1]  # nothing before T0
    assert f.history_items[2].tolist() == [1, 3, 4]  # no timestamp: all history, the last 3
    assert f.history_items[3].tolist() == [-1, -1, -1]  # unknown user
    assert f.history_len.tolist() == [2, 0, 3, 0]
    w = dict(zip(WIDE_COLUMNS, f.wide[0]))
    assert w["user_log_count"] == pytest.approx(np.log1p(3))  # i0, i1, i2 only
    assert w["item_log_count"] == pytest.approx(np.log1p(1))  # v's event on i5 at T0
    # category c: i5 is category c; u had no c events before hour 4
    assert w["user_cat_log_count"] == pytest.approx(0.0)
    assert f.wide[2, WIDE_COLUMNS.index("user_cat_log_count")] == pytest.approx(np.log1p(1))  # i4 (c)


def test_no_event_at_or_after_the_row_time_changes_its_features():
    """Adding arbitrary future events (and events at the same instant) leaves every row's features unchanged."""
    rng = np.random.default_rng(0)
    n = 400
    users = rng.choice([f"u{k}" for k in range(15)], n)
    items = rng.choice([f"i{k}" for k in range(6)], n)
    ts = T0 + pd.to_timedelta(rng.integers(0, 50, n), unit="h")  # many ties on purpose
    past = _events(list(zip(users, items, rng.integers(0, 2, n), ts)))
    cut = T0 + pd.Timedelta(hours=25)
    rows = past[past.timestamp >= cut][["user_id", "item_id", "timestamp"]].drop_duplicates("timestamp")
    rows = rows.assign(timestamp=cut)  # all rows at the cut instant
    index = {f"i{k}": k for k in range(6)}
    before = past[past.timestamp < cut]
    f_clean = point_in_time_features(rows, before, _catalog(), index, 5, prior=0.4)
    f_full = point_in_time_features(rows, past, _catalog(), index, 5, prior=0.4)  # includes ties + future
    np.testing.assert_array_equal(f_clean.history_items, f_full.history_items)
    np.testing.assert_allclose(f_clean.wide, f_full.wide)


def test_counts_match_a_brute_force_loop(small_world):
    ev = small_world.events.iloc[:3000]
    cat = small_world.catalog
    index = {k: i for i, k in enumerate(cat.item_id)}
    rng = np.random.default_rng(1)
    sample = rng.choice(len(ev), 40, replace=False)
    # 40 rows against 3000 events: also exercises the exact pre-filter on the rows' users/items
    f = point_in_time_features(ev.iloc[sample], ev, cat, index, history_len=4)
    cat_of = dict(zip(cat.item_id, cat.category))
    for r_out, r in enumerate(sample):
        row = ev.iloc[r]
        before = ev[ev.timestamp < row.timestamp]
        mine = before[before.user_id == row.user_id]
        assert f.wide[r_out, 1] == pytest.approx(np.log1p(len(mine)))
        assert f.wide[r_out, 3] == pytest.approx(np.log1p((before.item_id == row.item_id).sum()))
        same_cat = mine[mine.item_id.map(cat_of) == cat_of[row.item_id]]
        assert f.wide[r_out, 5] == pytest.approx(np.log1p(len(same_cat)))
        pos = mine[mine.label == 1]
        assert f.history_len[r_out] == min(4, len(pos))
        got = {i for i in f.history_items[r_out] if i >= 0}
        assert got <= {index[i] for i in pos.item_id}


def test_item_age_and_query_flag():
    h = _events([("u", "i0", 1, T0)])
    rows = pd.DataFrame({"user_id": ["u", "u"], "item_id": ["i0", "zz"], "query": ["jazz", None],
                         "timestamp": [T0 + pd.Timedelta(days=2), T0]})
    f = point_in_time_features(rows, h, _catalog(), {"i0": 0}, 2)
    assert f.wide[0, WIDE_COLUMNS.index("item_log_age_days")] == pytest.approx(np.log1p(12.0))
    assert f.wide[1, WIDE_COLUMNS.index("item_log_age_days")] == 0.0  # unknown item: no age
    assert f.wide[:, WIDE_COLUMNS.index("has_query")].tolist() == [1.0, 0.0]


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="user_id"):
        point_in_time_features(pd.DataFrame({"item_id": ["i0"]}), _events([]), _catalog(), {}, 2)
    with pytest.raises(ValueError, match="history is missing"):
        point_in_time_features(pd.DataFrame({"user_id": ["u"], "item_id": ["i0"]}), pd.DataFrame({"user_id": []}),
                               _catalog(), {}, 2)



def test_recent_rate_and_recent_events_read_the_last_events_strictly_before():
    """user_recent_rate: like-rate of the user's last RECENT_EVENTS events (smoothed); recent_items /
    recent_labels: the last KNN_HISTORY events of any label - both strictly before the row, lag applied."""
    from models.features import KNN_HISTORY, RECENT_EVENTS, SMOOTHING

    n_old = RECENT_EVENTS + 5
    rows_ = [("u", "i0", 1, T0 + pd.Timedelta(minutes=k)) for k in range(5)]  # 5 old likes
    rows_ += [("u", "i1", 0, T0 + pd.Timedelta(minutes=5 + k)) for k in range(RECENT_EVENTS)]  # then dislikes
    rows_ += [("u", "i2", 1, T0 + pd.Timedelta(minutes=100))]  # at the row's time: excluded
    h = _events(rows_)
    index = {f"i{k}": k for k in range(6)}
    prior = 0.5
    row = pd.DataFrame({"user_id": ["u", "u"], "item_id": ["i3", "i3"],
                        "timestamp": [T0 + pd.Timedelta(minutes=100), T0 + pd.Timedelta(minutes=7)]})
    f = point_in_time_features(row, h, _catalog(), index, prior=prior)
    col = WIDE_COLUMNS.index("user_recent_rate")
    p0 = (0 + SMOOTHING * prior) / (RECENT_EVENTS + SMOOTHING)  # the last 10 are all dislikes
    assert f.wide[0, col] == pytest.approx(np.log(p0 / (1 - p0)), rel=1e-5)
    p1 = (5 + SMOOTHING * prior) / (7 + SMOOTHING)  # at minute 7: 5 likes + 2 dislikes before it
    assert f.wide[1, col] == pytest.approx(np.log(p1 / (1 - p1)), rel=1e-5)
    assert f.recent_items.shape == (2, KNN_HISTORY)
    k = min(KNN_HISTORY, n_old)
    assert f.recent_items[0, -k:].tolist() == ([0] * 5 + [1] * RECENT_EVENTS)[-k:]
    assert f.recent_labels[0, -k:].tolist() == ([1] * 5 + [0] * RECENT_EVENTS)[-k:]
    assert (f.recent_items[1] >= 0).sum() == 7 and f.recent_labels[1, -2:].tolist() == [0, 0]
    # with a 1-hour lag the row at minute 100 sees only events before minute 40: all of them here
    lagged = point_in_time_features(row.iloc[:1], h, _catalog(), index, prior=prior, lag=pd.Timedelta(hours=1))
    assert lagged.wide[0, col] == pytest.approx(f.wide[0, col])


def test_recent_events_are_ragged_and_equal_a_brute_force_dense_reading():
    """The last KNN_HISTORY events are kept as one pool + two offsets per row (memory does not grow with
    the history length), and every dense view of them - whole, sliced, an engine's recombined parts -
    equals a brute-force reading: the user's last KNN_HISTORY events strictly before the row, any label."""
    from models.features import KNN_HISTORY, RecentEvents

    rng = np.random.default_rng(3)
    n_long = KNN_HISTORY + 40  # a user with more events than the features read
    h = _events([("u", f"i{rng.integers(6)}", int(rng.integers(2)), T0 + pd.Timedelta(minutes=k))
                 for k in range(n_long)] + [("v", "i1", 1, T0), ("v", "zz", 0, T0 + pd.Timedelta(minutes=1))])
    rows = pd.DataFrame({"user_id": ["u", "v", "u", "w", "u"], "item_id": "i0",
                         "timestamp": [T0 + pd.Timedelta(minutes=m) for m in (n_long + 5, 10, 30, 10, 3)]})
    index = {f"i{k}": k for k in range(6)}
    f = point_in_time_features(rows, h, _catalog(), index)
    assert f.recent.items.dtype == np.int32 and len(f.recent.items) <= len(h) and len(f.recent) == len(rows)
    items, labels = f.recent.dense()
    assert items.shape == labels.shape == (len(rows), KNN_HISTORY)
    for r, row in rows.iterrows():
        before = h[(h["user_id"] == row["user_id"]) & (h["timestamp"] < row["timestamp"])].tail(KNN_HISTORY)
        pad = KNN_HISTORY - len(before)
        assert items[r, pad:].tolist() == before["item_id"].map(index).fillna(-1).astype(int).tolist(), r
        assert labels[r, pad:].tolist() == before["label"].tolist(), r
        assert (items[r, :pad] == -1).all() and (labels[r, :pad] == 0).all(), r
    assert (items[0] >= 0).sum() == KNN_HISTORY  # the long user: exactly the last KNN_HISTORY
    # a slice and an index array read the same rows; an engine's parts recombine to the same arrays
    np.testing.assert_array_equal(f.recent[1:4].dense()[0], items[1:4])
    np.testing.assert_array_equal(f.recent[np.array([4, 0])].dense()[1], labels[[4, 0]])
    # (each part computed on its own, as an engine's partitions are: pools of different events and lengths)
    parts = [(sel, point_in_time_features(rows.iloc[sel], h, _catalog(), index).recent)
             for sel in (np.array([1, 3]), np.array([4, 0, 2]))]
    assert len(parts[0][1].items) != len(parts[1][1].items)
    whole = RecentEvents.combine(len(rows), parts)
    np.testing.assert_array_equal(whole.dense()[0], items)
    np.testing.assert_array_equal(whole.dense()[1], labels)
    assert (RecentEvents.combine(2, []).dense()[0] == -1).all()
