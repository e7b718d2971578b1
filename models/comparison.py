"""Model vs. baselines on a temporal hold-out: the table ``recloop train`` prints.

Train on the earlier part of the window, evaluate on the last ``test_fraction`` (by
time). The model scores test events point-in-time from all events before each of
them (fresh features, as when serving); the baselines are fit on the training part.
Metrics come from :func:`models.evaluate.evaluate_scores` (AUC, cold-item AUC,
NDCG@k, Recall@k, tail exposure, per-group AUC gap).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from models.baselines import MatrixFactorizationBaseline, PopularityBaseline
from models.data import time_split, validate_events

METRICS = ("auc", "cold_item_auc", "ndcg_at_k", "recall_at_k", "tail_exposure", "max_group_auc_gap")


def evaluate_all(scores: dict[str, np.ndarray], test: pd.DataFrame, train: pd.DataFrame, users: pd.DataFrame | None,
                 k: int = 10, group_columns=("gender", "age_bucket")) -> dict[str, dict]:
    """{name: metrics} for each score vector over the same test events."""
    from models.evaluate import evaluate_scores, item_popularity

    popularity = item_popularity(train)
    train_items = set(train["item_id"].astype(str))
    out = {}
    for name, s in scores.items():
        scored = test[[c for c in ("event_id", "user_id", "item_id", "label") if c in test.columns]].copy()
        scored["score"] = np.asarray(s, dtype=float)
        ev = evaluate_scores(scored, users, train_items, popularity, k=k, group_columns=group_columns)
        row = {m: getattr(ev, m) for m in METRICS}
        row.update({"n_events": ev.n_events, "n_cold_events": ev.n_cold_events, "k": ev.k})
        out[name] = row
    return out


def train_and_compare(settings, events: pd.DataFrame, catalog: pd.DataFrame, users: pd.DataFrame | None,
                      test_fraction: float = 0.2, **train_kw) -> dict:
    """Train the recommender on the earlier part, compare with the baselines on the later part."""
    from models.train import train_recommender

    events = validate_events(events)
    train, test = time_split(events, test_fraction)
    t0 = time.perf_counter()
    trained = train_recommender(settings, train, catalog, users, **train_kw)
    t_train = time.perf_counter() - t0
    t1 = time.perf_counter()
    model_scores = trained.model.score(test, events, catalog)  # point-in-time over everything before
    t_score = time.perf_counter() - t1
    pop = PopularityBaseline().fit(train)
    mf = MatrixFactorizationBaseline().fit(train)
    scores = {"bert-two-tower": model_scores, "popularity": pop.score(test), "matrix-factorisation": mf.score(test)}
    metrics = evaluate_all(scores, test, train, users, settings.gates.k, settings.gates.group_columns)
    return {
        "metrics": metrics, "trained": trained, "n_train": len(train), "n_test": len(test),
        "train_window": [str(train["timestamp"].min()), str(train["timestamp"].max())],
        "test_window": [str(test["timestamp"].min()), str(test["timestamp"].max())],
        "seconds": {"train": t_train, "score_test": t_score, **{f"train.{k}": v for k, v in trained.timings.items()}},
        "history": trained.history, "best_val_auc": trained.best_val_auc,
    }
