"""Issue 14, item 7 (memory): serving keeps bounded per-user tails and incremental statistics.

The store view no longer caches the whole store: per user it keeps the last events and positives the
model reads plus counts, per item counts, updated from the new parts only. Its statistics must score
exactly like ``ServingStats.build`` over the whole store, after new files arrive (new users, new items,
items only seen in events, late events, ties in time) and after a catalog change that moves an item
to another category (a recount).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from recloop.store import FeedbackStore

T0 = pd.Timestamp("2026-02-02T00:00:00Z")
TAIL_POSITIVES = 6  # small, so the heavy user's history goes far beyond it
HISTORY_LEN = 5  # <= TAIL_POSITIVES: exact


def _catalog(n: int = 24) -> pd.DataFrame:
    cats = ["jazz", "cooking", "travel"]
    return pd.DataFrame({"item_id": [f"i{k:02d}" for k in range(n)], "title": [f"Item {k}" for k in range(n)],
                         "description": [f"about {cats[k % 3]} {k}" for k in range(n)],
                         "category": [cats[k % 3] if k != 5 else None for k in range(n)],
                         "created_at": [T0 - pd.Timedelta(days=k) for k in range(n)]})


def _batch(seed: int, n: int, users: list[str], items: list[str], day: int, prefix: str,
           heavy: str | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    user = rng.choice(users, n)
    if heavy is not None:
        user[: n // 2] = heavy  # one user with far more events and positives than the tail holds
    etype = rng.choice(["impression", "click", "like", "dislike", "purchase"], n, p=[0.4, 0.25, 0.2, 0.1, 0.05])
    secs = rng.integers(0, 86_400 // 4, n) * 4  # coarse times: many ties, broken by event id
    return pd.DataFrame({
        "event_id": [f"{prefix}-{k:04d}" for k in range(n)], "user_id": user, "item_id": rng.choice(items, n),
        "event_type": etype, "label": np.isin(etype, ["click", "like", "purchase"]).astype(int),
        "timestamp": T0 + pd.Timedelta(days=day) + pd.to_timedelta(secs, unit="s"),
        "query": np.where(rng.random(n) < 0.1, "smooth jazz", None),
    })


def _liked_order(stats, user_stats) -> list[str]:
    ids = stats.item_ids[user_stats.positives].tolist()
    return list(dict.fromkeys(reversed(ids)))[::-1]


W = np.linspace(-1.0, 1.0, 9)  # a fixed linear head over the wide features: "a score"


def _score(wide: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(wide.astype(np.float64) @ W)))


def _assert_scores_like_a_full_build(view, store, users):
    from models.features import ServingStats, point_in_time_features

    data = view.data
    catalog = data.catalog.reset_index()
    everything = store.read()
    full = ServingStats.build(everything, catalog)
    inc = data.stats
    assert inc is not None and inc.n_events == full.n_events == len(everything) == data.n_events
    assert inc.categories == full.categories and inc.ref_now == full.ref_now
    ids = [str(i) for i in full.item_ids]
    assert sorted(ids) == sorted(str(i) for i in inc.item_ids)
    pi, pf = inc.positions(ids), full.positions(ids)
    for name in ("item_n", "item_n_pos", "item_cat", "item_log_age"):
        np.testing.assert_array_equal(getattr(inc, name)[pi], getattr(full, name)[pf])
    everyone = [*users, "nobody"]
    rows = pd.DataFrame({"user_id": np.repeat(everyone, len(ids)), "item_id": ids * len(everyone)})
    # the offline features over the whole store (rows without a time see every event): the reference
    pit = point_in_time_features(rows, everything, catalog, {i: k for k, i in enumerate(ids)}, HISTORY_LEN, 0.4)
    want = _score(pit.wide).reshape(len(everyone), len(ids))
    pit_hist = pit.history_items.reshape(len(everyone), len(ids), HISTORY_LEN)[:, 0]
    for j, user in enumerate(everyone):
        a, b = inc.user(user), full.user(user)
        assert (a.n, a.n_pos, a.recent_n, a.recent_pos) == (b.n, b.n_pos, b.recent_n, b.recent_pos)
        np.testing.assert_array_equal(a.cat_n, b.cat_n)
        np.testing.assert_array_equal(a.cat_pos, b.cat_pos)
        ha, hb = inc.history_items(a, HISTORY_LEN), full.history_items(b, HISTORY_LEN)
        assert [inc.item_ids[p] if p >= 0 else None for p in ha] == [full.item_ids[p] if p >= 0 else None for p in hb]
        (ra, la), (rb, lb) = inc.recent_events(a), full.recent_events(b)
        assert [inc.item_ids[p] if p >= 0 else None for p in ra] == [full.item_ids[p] if p >= 0 else None for p in rb]
        np.testing.assert_array_equal(la, lb)
        assert _liked_order(inc, a) == _liked_order(full, b)  # what /recommend excludes, in order
        np.testing.assert_array_equal(inc.wide(a, pi, False, 0.4), full.wide(b, pf, False, 0.4))
        np.testing.assert_array_equal(_score(inc.wide(a, pi, False, 0.4)), want[j])  # same scores
        assert [inc.item_ids[p] if p >= 0 else None for p in ha] == [ids[p] if p >= 0 else None for p in pit_hist[j]]


def test_incremental_statistics_equal_a_full_build_after_new_files(tmp_path):
    from serving.storeview import TAIL_EVENTS, StoreView

    store = FeedbackStore(tmp_path / "store")
    cat = _catalog()
    store.upsert_catalog(cat)
    items = cat["item_id"].tolist()
    users = [f"u{k}" for k in range(12)]
    store.append(_batch(1, 500, users, items + ["ghost"], 0, "a", heavy="u0"), batch_id="a")

    view = StoreView(store.root, tail_positives=TAIL_POSITIVES)
    assert view.refresh()
    _assert_scores_like_a_full_build(view, store, users)
    # bounded: the heavy user (~250 events, ~110 positives) keeps only its tail
    kept = view.data.user_history("u0")
    assert len(kept) <= TAIL_EVENTS + TAIL_POSITIVES < view.data.stats.user("u0").n
    assert len(view.data.events) < store.count()

    # new files: new users and items (also one only seen in events), late events, same-instant ties
    more_users = users + ["u-new-1", "u-new-2"]
    store.append(_batch(2, 300, more_users, items[:10] + ["ghost-2"], 1, "b", heavy="u0"), batch_id="b")
    store.append(_batch(3, 200, more_users, items, 0, "c", heavy="u-new-1"), batch_id="c")  # late: day 0 again
    reads = []
    real_scan = view.store.scan
    view.store.scan = lambda *a, **k: reads.append(k.get("parts")) or real_scan(*a, **k)
    assert view.refresh() and view.rebuilds == 1
    assert reads and all(p is not None and len(p) <= 3 for p in reads)  # only the new parts were read
    _assert_scores_like_a_full_build(view, store, more_users)

    # a catalog change that only adds an item: no recount; one that moves an item with events: recount
    store.upsert_catalog(pd.DataFrame([{**cat.iloc[0].to_dict(), "item_id": "i-new", "category": "jazz"}]))
    store.append(_batch(4, 50, more_users, ["i-new", "i01"], 2, "d"), batch_id="d")
    assert view.refresh() and view.rebuilds == 1
    _assert_scores_like_a_full_build(view, store, more_users)
    store.upsert_catalog(pd.DataFrame([{**cat.iloc[1].to_dict(), "category": "travel"}, {
        "item_id": "ghost", "title": "Ghost", "description": "now in the catalog", "category": "cooking",
        "created_at": T0}]))
    assert view.refresh() and view.rebuilds == 2
    _assert_scores_like_a_full_build(view, store, more_users)


def test_a_fresh_view_and_a_forced_rebuild_equal_the_incremental_one(tmp_path):
    from serving.storeview import StoreView

    store = FeedbackStore(tmp_path / "store")
    cat = _catalog()
    store.upsert_catalog(cat)
    users = [f"u{k}" for k in range(8)]
    inc = StoreView(store.root, tail_positives=TAIL_POSITIVES)
    for k in range(4):
        store.append(_batch(10 + k, 120, users, cat["item_id"].tolist(), 3 - k, f"p{k}", heavy="u1"), batch_id=f"p{k}")
        inc.refresh()
    fresh = StoreView(store.root, tail_positives=TAIL_POSITIVES)
    fresh.refresh()
    assert (inc.rebuilds, fresh.rebuilds) == (1, 1)

    def same(x, y):
        assert x.data.n_events == y.data.n_events == store.count()
        for user in users:
            ua, ub = x.data.stats.user(user), y.data.stats.user(user)
            assert (ua.n, ua.n_pos, ua.recent_pos) == (ub.n, ub.n_pos, ub.recent_pos)
            np.testing.assert_array_equal(ua.cat_n, ub.cat_n)
            assert _liked_order(x.data.stats, ua) == _liked_order(y.data.stats, ub)
            pd.testing.assert_frame_equal(x.data.user_history(user).reset_index(drop=True),
                                          y.data.user_history(user).reset_index(drop=True))

    same(inc, fresh)
    assert inc.refresh(force=True) and inc.rebuilds == 2
    same(inc, fresh)
