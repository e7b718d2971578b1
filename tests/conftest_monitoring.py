"""Fixtures for the monitoring tests: synthetic worlds in a store, a champion window, fake scorers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from monitoring.windows import ChampionInfo
from recloop.datasets.synthetic import SyntheticConfig
from recloop.settings import load_settings
from recloop.store import FeedbackStore

TRAIN_DAYS = 9  # the champion saw days [0, 9); its held-out part is days [6, 9)
N_DAYS = 14  # "now" = day 14: the current window is days [9, 14)


def world_config(seed: int, drift: bool) -> SyntheticConfig:
    return SyntheticConfig(seed=seed, n_users=300, n_items=120, n_days=N_DAYS, drift_day=TRAIN_DAYS if drift else None,
                           drift_items=20, bad_batch_day=None)


def make_workspace(tmp_path, name: str, data, events: pd.DataFrame | None = None, **monitor):
    s = load_settings(tmp_path / name, monitor=monitor).ensure_dirs() if monitor else \
        load_settings(tmp_path / name).ensure_dirs()
    store = FeedbackStore.from_settings(s)
    store.upsert_catalog(data.catalog)
    store.upsert_users(data.users)
    store.append(data.events if events is None else events, batch_id="world")
    return s, store


def champion_for(data, offline_auc=None) -> ChampionInfo:
    return ChampionInfo(version="1", train_start=data.day_start(0), train_end=data.day_start(TRAIN_DAYS),
                        offline_auc=offline_auc, holdout_start=data.day_start(TRAIN_DAYS - 3))


def now_for(data) -> pd.Timestamp:
    return data.day_start(N_DAYS)


def _hash01(rows: pd.DataFrame) -> np.ndarray:
    """A deterministic pseudo-random number in [0, 1) per (user, item): label-free noise."""
    key = rows["user_id"].astype(str) + "|" + rows["item_id"].astype(str)
    return (pd.util.hash_pandas_object(key, index=False).to_numpy() % 10_000) / 10_000.0


def shifting_scorer(cut: pd.Timestamp, shift: float):
    """Label-free scores whose level moves by ``shift`` from ``cut`` on: prediction drift only."""

    def score(rows: pd.DataFrame) -> np.ndarray:
        base = 0.1 + 0.6 * _hash01(rows)
        return base + shift * (rows["timestamp"] >= cut).to_numpy()

    return score


def decaying_scorer(events: pd.DataFrame, cut: pd.Timestamp):
    """Knows the labels before ``cut`` (a good model); after it, the same score distribution
    but on a coin with the same like-rate (a model that stopped ranking well)."""
    lookup = dict(zip(zip(events["user_id"], events["item_id"], events["timestamp"]), events["label"].astype(int)))
    rate = float(events["label"].mean())

    def score(rows: pd.DataFrame) -> np.ndarray:
        noise = _hash01(rows)
        truth = np.array([lookup.get(k, 0) for k in zip(rows["user_id"], rows["item_id"], rows["timestamp"])])
        coin = (noise < rate).astype(int)
        label = np.where((rows["timestamp"] >= cut).to_numpy(), coin, truth)
        return 0.6 * label + 0.4 * _hash01(rows.assign(user_id=rows["user_id"].astype(str) + "x"))

    return score
