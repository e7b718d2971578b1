"""Model vs. baselines on a temporal hold-out: the table ``recloop train`` prints.

The same judgement as a retrain, in one run: train on the earlier part of the window,
hold out the last ``test_fraction`` (by time), then score the model **and every baseline**
(statistics-only logistic regression on the model's own point-in-time features, fresh
popularity, static popularity, tuned MF) on the same test events, point-in-time with the
same feature lag, through :func:`models.pipeline.evaluate_model` /
:func:`models.pipeline.evaluate_baselines`; ranking metrics are over the whole catalog, as
served. The gates (no champion: absolute rules and ``beats_baselines``) say whether this
model would be promoted.
"""

from __future__ import annotations

import time

import pandas as pd

from models.data import time_split, validate_events

METRICS = ("auc", "cold_item_auc", "ndcg_at_k", "recall_at_k", "tail_exposure", "max_group_auc_gap")
MODEL_NAME = "bert-two-tower"


def split_for_comparison(settings, events: pd.DataFrame, catalog: pd.DataFrame, users: pd.DataFrame | None,
                         test_fraction: float = 0.2):
    """A :class:`models.pipeline.RetrainData` whose eval part is the last ``test_fraction`` of the window."""
    from models.pipeline import RetrainData

    events = validate_events(events)
    train, test = time_split(events, test_fraction)
    return RetrainData(events=events, train=train, eval=test, catalog=catalog,
                       users=users if users is not None else pd.DataFrame({"user_id": []}), snapshot=None,
                       train_start=events["timestamp"].min(), train_end=test["timestamp"].min(),
                       eval_end=test["timestamp"].max(), feature_lag=settings.feature_lag,
                       cut_reason=f"last {test_fraction:.0%} of the window by time")


def row(ev) -> dict:
    out = {m: getattr(ev, m) for m in METRICS}
    out.update({"n_events": ev.n_events, "n_cold_events": ev.n_cold_events, "k": ev.k,
                "ranking_scope": getattr(ev, "ranking_scope", "logged_events")})
    return out


def train_and_compare(settings, events: pd.DataFrame, catalog: pd.DataFrame, users: pd.DataFrame | None,
                      test_fraction: float = 0.2, **train_kw) -> dict:
    """Train the recommender on the earlier part, judge it with the baselines on the later part."""
    from models.gates import decide_promotion
    from models.pipeline import evaluate_baselines, evaluate_model
    from models.train import train_recommender

    data = split_for_comparison(settings, events, catalog, users, test_fraction)
    t0 = time.perf_counter()
    trained = train_recommender(settings, data.train, catalog, data.users, **train_kw)
    t_train = time.perf_counter() - t0
    t1 = time.perf_counter()
    model_eval = evaluate_model(settings, trained.model, data)
    t_score = time.perf_counter() - t1
    t2 = time.perf_counter()
    base_evals = evaluate_baselines(settings, data)
    t_base = time.perf_counter() - t2
    decision = decide_promotion(model_eval, None, settings, base_evals)
    metrics = {MODEL_NAME: row(model_eval), **{name: row(ev) for name, ev in base_evals.items()}}
    return {
        "metrics": metrics, "trained": trained, "n_train": len(data.train), "n_test": len(data.eval),
        "decision": decision, "feature_lag_seconds": data.feature_lag.total_seconds(),
        "train_window": [str(data.train["timestamp"].min()), str(data.train["timestamp"].max())],
        "test_window": [str(data.eval["timestamp"].min()), str(data.eval["timestamp"].max())],
        "seconds": {"train": t_train, "evaluate_model": t_score, "baselines": t_base,
                    **{f"train.{k}": v for k, v in trained.timings.items()}},
        "history": trained.history, "best_val_auc": trained.best_val_auc,
    }
