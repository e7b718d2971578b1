"""The label delay (``lag``): offline features at time t only use events older than t - lag,
and then equal what a server holding exactly those events computes (train/serve parity)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from models.features import WIDE_COLUMNS, ServingStats, point_in_time_features

T0 = pd.Timestamp("2026-01-01", tz="UTC")
LAG = pd.Timedelta(minutes=10)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models are many small ops: one thread is faster on a shared 2-core box."""


def _catalog(n=8):
    return pd.DataFrame({"item_id": [f"i{k}" for k in range(n)], "title": [f"title {k}" for k in range(n)],
                         "description": [f"about thing {k}" for k in range(n)],
                         "category": ["a", "a", "b", "b", None, "c", "c", "d"][:n],
                         "created_at": [T0 - pd.Timedelta(days=3 + k) for k in range(n)]})


def _history(n=600, seed=0) -> pd.DataFrame:
    """Events every few minutes over ~2 days (so many fall inside any 10-minute lag), ties included,
    plus an item the catalog does not know."""
    rng = np.random.default_rng(seed)
    items = [f"i{k}" for k in range(8)] + ["ghost"]
    ts = T0 + pd.to_timedelta(rng.integers(0, 48 * 60, n), unit="min")
    return pd.DataFrame({"user_id": rng.choice([f"u{k}" for k in range(6)], n), "item_id": rng.choice(items, n),
                         "label": rng.integers(0, 2, n), "timestamp": ts})


def _index(catalog, history):
    from models.data import ItemIndex

    return ItemIndex.from_catalog(catalog, history["item_id"]).position


# ----------------------------------------------------------------------------- features


def test_events_within_the_lag_are_never_seen():
    """Features at t with a lag equal features at t over the history cut at t - lag: nothing newer leaks in."""
    hist, cat = _history(), _catalog()
    index = _index(cat, hist)
    for t in (T0 + pd.Timedelta(hours=7, minutes=3), T0 + pd.Timedelta(hours=30)):
        rows = pd.DataFrame({"user_id": [f"u{k}" for k in range(6)] + ["nobody"],
                             "item_id": [f"i{k}" for k in range(6)] + ["ghost"], "timestamp": t})
        lagged = point_in_time_features(rows, hist, cat, index, history_len=5, prior=0.4, lag=LAG)
        cut = point_in_time_features(rows, hist[hist.timestamp < t - LAG], cat, index, history_len=5, prior=0.4)
        np.testing.assert_array_equal(lagged.history_items, cut.history_items)
        np.testing.assert_array_equal(lagged.history_len, cut.history_len)
        np.testing.assert_array_equal(lagged.wide, cut.wide)
        # and the lag matters here: the last 10 minutes hold events of these users / items
        plain = point_in_time_features(rows, hist, cat, index, history_len=5, prior=0.4)
        assert not np.array_equal(plain.wide, lagged.wide)


def test_the_lag_boundary_is_strict():
    """An event exactly at t - lag is not seen; one a nanosecond earlier is."""
    t = T0 + pd.Timedelta(hours=1)
    hist = pd.DataFrame({"user_id": ["u", "u", "u"], "item_id": ["i0", "i1", "i2"], "label": [1, 1, 1],
                         "timestamp": [t - LAG - pd.Timedelta(nanoseconds=1), t - LAG, t - LAG / 2]})
    rows = pd.DataFrame({"user_id": ["u", "u"], "item_id": ["i5", "i5"], "timestamp": [t, pd.NaT]})
    f = point_in_time_features(rows, hist, _catalog(), {f"i{k}": k for k in range(8)}, history_len=3, lag=LAG)
    assert f.history_items[0].tolist() == [-1, -1, 0]
    assert f.history_items[1].tolist() == [0, 1, 2]  # no timestamp: everything (the store already lags)
    assert f.wide[0, WIDE_COLUMNS.index("user_log_count")] == pytest.approx(np.log1p(1))


def test_zero_lag_is_the_old_behaviour():
    hist, cat = _history(), _catalog()
    index = _index(cat, hist)
    rows = hist.sample(200, random_state=2)[["user_id", "item_id", "timestamp"]].reset_index(drop=True)
    rows.loc[:9, "timestamp"] = pd.NaT
    base = point_in_time_features(rows, hist, cat, index, history_len=5)
    for lag in (0, pd.Timedelta(0), 0.0):
        f = point_in_time_features(rows, hist, cat, index, history_len=5, lag=lag)
        np.testing.assert_array_equal(f.history_items, base.history_items)
        np.testing.assert_array_equal(f.wide, base.wide)
    with pytest.raises(ValueError, match="negative"):
        point_in_time_features(rows, hist, cat, index, lag=pd.Timedelta(seconds=-1))


def test_item_age_is_measured_at_the_row_time_not_shifted():
    hist, cat = _history(), _catalog()
    rows = pd.DataFrame({"user_id": ["u0"], "item_id": ["i2"], "timestamp": [T0]})
    f = point_in_time_features(rows, hist, cat, _index(cat, hist), lag=pd.Timedelta(days=1))
    assert f.wide[0, WIDE_COLUMNS.index("item_log_age_days")] == pytest.approx(np.log1p(5.0))


def _serving_at(hist, cat, t, lag) -> ServingStats:
    """What a server holds at t: the events older than t - lag (ingest delay), item ages at t."""
    return ServingStats.build(hist[hist.timestamp < t - lag].reset_index(drop=True), cat, now=t)


@pytest.mark.parametrize("lag", [pd.Timedelta(0), LAG, pd.Timedelta(hours=3)])
def test_serving_features_at_t_equal_offline_features_at_the_same_lag(lag):
    hist, cat = _history(), _catalog()
    index = _index(cat, hist)
    items = [f"i{k}" for k in range(8)] + ["ghost", "not-anywhere"]
    for t in (T0 + pd.Timedelta(hours=5, minutes=17), T0 + pd.Timedelta(hours=40)):
        stats = _serving_at(hist, cat, t, lag)
        for user in ("u0", "u3", "nobody"):
            rows = pd.DataFrame({"user_id": user, "item_id": items, "timestamp": t})
            off = point_in_time_features(rows, hist, cat, index, history_len=6, prior=0.35, lag=lag)
            us = stats.user(user)
            wide = stats.wide(us, stats.positions(items), False, 0.35)
            np.testing.assert_allclose(wide, off.wide, rtol=0, atol=1e-6, err_msg=f"{user} at {t}")
            served = [stats.item_ids[p] for p in stats.history_items(us, 6) if p >= 0]
            inv = {v: k for k, v in index.items()}
            assert served == [inv[p] for p in off.history_items[0] if p >= 0]


# ----------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def lagged_model(tmp_path_factory):
    """A Recommender with random (non-zero) weights that was 'trained' with a 10-minute lag."""
    from models.network import TextEncoder, TwoTowerWide
    from models.recommender import Recommender, model_config
    from models.testing import make_tiny_encoder

    enc = TextEncoder(make_tiny_encoder(tmp_path_factory.mktemp("lag") / "encoder"), 32)
    users, items = [f"u{k}" for k in range(4)], [f"i{k}" for k in range(6)]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = TwoTowerWide(enc.dim, 16, len(users), len(items), len(WIDE_COLUMNS), True, 0.0)
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0.0, 0.5)
    net.set_wide_stats(point_in_time_features(_history().head(300), _history(), _catalog(),
                                              _index(_catalog(), _history())).wide)
    cfg = model_config(encoder_name="tiny", mode="frozen", text_dim=enc.dim, embed_dim=16, user_vocab=users,
                       item_vocab=items, history_len=6, max_text_tokens=32, prior=0.35, id_embeddings=True,
                       id_dropout=0.0, feature_lag_seconds=LAG.total_seconds())
    return Recommender(net, enc, cfg)


def test_model_scores_use_the_lag_it_was_trained_with(lagged_model):
    hist, cat = _history(), _catalog()
    rows = hist.sample(150, random_state=3)[["user_id", "item_id", "timestamp"]].reset_index(drop=True)
    assert lagged_model.feature_lag == LAG
    default = lagged_model.score(rows, hist, cat)
    np.testing.assert_array_equal(default, lagged_model.score(rows, hist, cat, lag=LAG))
    assert not np.allclose(default, lagged_model.score(rows, hist, cat, lag=pd.Timedelta(0)))
    # a model saved before the lag was recorded scores without one
    old = type(lagged_model)(lagged_model.net, lagged_model.encoder,
                             {k: v for k, v in lagged_model.config.items() if k != "feature_lag_seconds"})
    assert old.feature_lag == pd.Timedelta(0)
    np.testing.assert_array_equal(old.score(rows, hist, cat), lagged_model.score(rows, hist, cat, lag=0))


def test_served_scores_at_t_equal_offline_scores_at_t(lagged_model):
    """score_items over the store a server holds at t == Recommender.score of rows at t (the model's lag)."""
    hist, cat = _history(), _catalog()
    items = [f"i{k}" for k in range(8)] + ["ghost"]
    for t in (T0 + pd.Timedelta(hours=9, minutes=41), T0 + pd.Timedelta(hours=46)):
        stats = _serving_at(hist, cat, t, LAG)
        for user in ("u0", "u2", "u5", "nobody"):
            offline = lagged_model.score(pd.DataFrame({"user_id": user, "item_id": items, "timestamp": t}), hist, cat)
            served = lagged_model.score_user(stats, user, items)
            np.testing.assert_allclose(served, offline, rtol=0, atol=2e-6, err_msg=f"{user} at {t}")
    # without the lag the offline score would see events the server does not have yet
    t = T0 + pd.Timedelta(hours=46)
    rows = pd.DataFrame({"user_id": "u0", "item_id": items, "timestamp": t})
    fresh = lagged_model.score(rows, hist, cat, lag=0)
    assert np.abs(fresh - lagged_model.score_user(_serving_at(hist, cat, t, LAG), "u0", items)).max() > 1e-5


def test_replay_scores_the_batch_with_the_given_lag(lagged_model, tmp_path):
    from replay.runner import score_batch

    hist, cat = _history(), _catalog()
    cut = T0 + pd.Timedelta(hours=40)
    batch = hist[hist.timestamp >= cut].assign(event_id=lambda d: [f"e{k}" for k in range(len(d))], query=None)
    past = hist[hist.timestamp < cut]
    got = score_batch(lagged_model, lagged_model.config, batch, past, cat, None, group_columns=(), lag=LAG,
                      out=tmp_path / "scores" / "batch-0000.parquet")
    from models.evaluate import auc

    want = lagged_model.score(batch[["user_id", "item_id", "timestamp"]], past, cat, lag=LAG)
    assert got["auc"] == pytest.approx(auc(batch["label"].to_numpy(), want))
    kept = pd.read_parquet(tmp_path / "scores" / "batch-0000.parquet")  # every event's score, for pooled AUCs
    assert kept["event_id"].tolist() == batch["event_id"].tolist()
    np.testing.assert_allclose(kept["score"].to_numpy(), want, rtol=0, atol=1e-12)
    zero = score_batch(lagged_model, lagged_model.config, batch, past, cat, None, group_columns=(), lag=0)
    assert zero["auc"] != got["auc"]
