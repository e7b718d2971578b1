"""The retrain's eval window: the newest days, grown until it holds enough users for the gates."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recloop.settings import load_settings
from recloop.store import FeedbackStore


def _sparse_log(days: int = 60, users_per_day: int = 3, events_per_user: int = 20) -> pd.DataFrame:
    """Each user is active on one day only (sign-up bursts): few distinct users in any few days."""
    rng = np.random.default_rng(0)
    rows, t0 = [], pd.Timestamp("2026-01-01", tz="UTC")
    for d in range(days):
        for u in range(users_per_day):
            uid = f"u{d}-{u}"
            for e in range(events_per_user):
                label = int(rng.random() < 0.5)
                rows.append({"event_id": f"{uid}-{e}", "user_id": uid, "item_id": f"i{rng.integers(50)}",
                             "event_type": "like" if label else "dislike", "label": label,
                             "timestamp": t0 + pd.Timedelta(days=d, minutes=10 * u + e), "query": None,
                             "model_version": None})
    return pd.DataFrame(rows)


def _data(tmp_path, **retrain):
    from models.pipeline import prepare_retrain_data

    s = load_settings(tmp_path / "ws", retrain={"min_train_events": 10, **retrain},
                      gates={"min_eval_events": 50}).ensure_dirs()
    store = FeedbackStore.from_settings(s)
    ev = _sparse_log()
    store.upsert_catalog(pd.DataFrame({"item_id": [f"i{k}" for k in range(50)], "title": "t", "description": ""}))
    store.append(ev, "batch-1")
    return prepare_retrain_data(s), ev


def test_the_eval_window_grows_until_it_holds_enough_users(tmp_path):
    data, ev = _data(tmp_path, min_eval_users=30)
    assert data.eval["user_id"].nunique() >= 30  # the newest 6 days (10 % of the span) hold only 18 users
    assert data.eval["user_id"].nunique() < 40 and "grown" in data.cut_reason
    assert len(data.train) + len(data.eval) == len(ev)


def test_the_grown_window_is_capped_by_max_eval_fraction(tmp_path):
    data, _ = _data(tmp_path, min_eval_users=1000, max_eval_fraction=0.3)
    span = data.eval_end - data.train_start
    assert data.eval_end - data.train_end <= span * 0.3 + pd.Timedelta(seconds=1)
    assert data.eval["user_id"].nunique() < 1000  # capped: the gates' evidence rule weighs what is there


def test_without_a_user_minimum_the_window_is_the_newest_days(tmp_path):
    data, _ = _data(tmp_path, min_eval_users=0)
    assert data.eval["user_id"].nunique() == 18 and "grown" not in data.cut_reason  # 10 % of 60 days = 6 days


def test_the_window_holds_at_most_max_window_events_newest_first(tmp_path):
    data, ev = _data(tmp_path, max_window_events=1000, min_eval_users=0)
    newest = ev.sort_values("timestamp").tail(1000)
    assert len(data.events) == 1000  # no ties at this boundary in the sparse log
    assert set(data.events["event_id"]) == set(newest["event_id"])
    uncapped, _ = _data(tmp_path / "b", max_window_events=None, min_eval_users=0)
    assert len(uncapped.events) == len(ev)
