"""One retrain, as steps: snapshot -> train -> evaluate (candidate AND champion, same events)
-> register -> gates -> promote or reject.

Each step is one function so the retrain flow (flows/retrain.py), the one place that chains
them, can wrap each in a Prefect task; each step is plain Python and testable on its own.
A failure anywhere before ``promote`` leaves the champion untouched: promotion is the
last step and happens under the registry's promotion lock.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from recloop.store import FeedbackStore, Snapshot


class RetrainError(RuntimeError):
    """A retrain could not run (not enough data, a broken champion, ...); the champion is untouched."""


@dataclass
class RetrainData:
    events: pd.DataFrame  # everything the window holds (history for point-in-time features)
    train: pd.DataFrame
    eval: pd.DataFrame
    catalog: pd.DataFrame
    users: pd.DataFrame
    snapshot: Snapshot | None  # None outside a retrain (e.g. `recloop train`)
    train_start: pd.Timestamp
    train_end: pd.Timestamp  # exclusive: eval starts here
    eval_end: pd.Timestamp
    feature_lag: pd.Timedelta = field(default_factory=lambda: pd.Timedelta(0))
    cut_reason: str = "newest eval_days"  # why the eval window starts where it does

    @property
    def eval_start(self) -> pd.Timestamp:
        return self.train_end

    def lineage(self) -> dict:
        return {
            "snapshot_hash": self.snapshot.hash,
            "window_start": str(self.train_start),
            "window_end": str(self.train_end),
            "eval_start": str(self.train_end),
            "eval_end": str(self.eval_end),
            "eval_cut": self.cut_reason,
            "feature_lag_seconds": str(self.feature_lag.total_seconds()),
            "n_train_events": len(self.train),
            "n_eval_events": len(self.eval),
            "batch_ids": ",".join(self.snapshot.batch_ids),
        }


@dataclass
class RetrainOutcome:
    version: str | None
    promoted: bool
    reason: str
    decision: dict = field(default_factory=dict)
    candidate_metrics: dict = field(default_factory=dict)
    champion_metrics: dict | None = None
    baseline_metrics: dict = field(default_factory=dict)  # name -> Evaluation.to_dict() on the same events
    champion_version_before: str | None = None
    champion_version_after: str | None = None
    train_seconds: float = 0.0
    total_seconds: float = 0.0
    run_id: str | None = None
    lineage: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def champion_train_end(model) -> pd.Timestamp | None:
    """The newest event the champion was trained on (from its config), or None when unknown."""
    end = (getattr(model, "config", None) or {}).get("train_end") if model is not None else None
    if end in (None, "", "None", "NaT"):
        return None
    ts = pd.Timestamp(end)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts


def _evidence_cut(events: pd.DataFrame, settings):
    """The latest cut time whose eval window (events at or after it) holds ``retrain.min_eval_users``
    distinct users and ``gates.min_eval_events`` events (None when the whole window holds fewer)."""
    ts = events["timestamp"].to_numpy()
    order = np.argsort(ts, kind="stable")[::-1]  # newest first
    users = events["user_id"].astype(str).to_numpy()[order]
    first_seen = ~pd.Series(users).duplicated().to_numpy()
    n_users = np.cumsum(first_seen)
    n_events = np.arange(1, len(users) + 1)
    ok = np.flatnonzero((n_users >= settings.retrain.min_eval_users) & (n_events >= settings.gates.min_eval_events))
    if not len(ok):
        return None
    return pd.Timestamp(ts[order[ok[0]]])


def _newest_events_start(store, start, end, max_events: int | None):
    """The window's start moved forward so that it holds at most ``max_events`` events (the newest; events
    tied with the boundary's timestamp come along). Reads only the timestamp column."""
    if max_events is None:
        return start
    ts = store.read(start=start, end=end, columns=["timestamp"])["timestamp"]
    if len(ts) <= max_events:
        return start
    values = ts.to_numpy()
    return pd.Timestamp(np.partition(values, len(values) - max_events)[len(values) - max_events])


def prepare_retrain_data(settings, now=None, champion_trained_until=None) -> RetrainData:
    """Read the store, cut a time-ordered train / eval split (eval = the newest days).

    ``champion_trained_until``: the newest event the champion was trained on. The eval window
    starts after it, so the champion is never judged on events it learned from (a shorter
    window then carries less evidence, which the gates' evidence rule weighs).
    """
    store = FeedbackStore.from_settings(settings)
    cfg = settings.retrain
    start = None
    if cfg.window_days is not None:
        _, last = store.time_range()
        if last is not None:
            start = last - pd.Timedelta(days=cfg.window_days)
    start = _newest_events_start(store, start, now, cfg.max_window_events)
    events = store.read(start=start, end=now)
    if len(events) < cfg.min_train_events:
        raise RetrainError(f"only {len(events)} events stored (need {cfg.min_train_events}): ingest more feedback first")
    first, last = events["timestamp"].min(), events["timestamp"].max()
    span = last - first
    eval_len = pd.Timedelta(days=cfg.eval_days)
    eval_len = min(max(eval_len, span * cfg.min_eval_fraction), span * cfg.max_eval_fraction)
    cut = (last - eval_len).ceil("h") if span > pd.Timedelta(days=1) else last - eval_len
    why = f"newest {eval_len} of the window"
    need = _evidence_cut(events, settings)
    if need is not None and need < cut:  # too little evidence in the newest days: reach further back
        cut = max(need, last - span * cfg.max_eval_fraction)
        why = (f"newest {last - cut} of the window (grown from {eval_len} to hold {cfg.min_eval_users} users / "
               f"{settings.gates.min_eval_events} events, at most {cfg.max_eval_fraction:.0%} of the span)")
    if champion_trained_until is not None and champion_trained_until >= cut:
        cut = champion_trained_until + pd.Timedelta(microseconds=1)
        why = f"after the champion's training data (it was trained on events up to {champion_trained_until})"
    train, held_out = events[events["timestamp"] < cut], events[events["timestamp"] >= cut]
    if train.empty or held_out.empty or held_out["label"].nunique() < 2:
        raise RetrainError(f"cannot split {len(events)} events at {cut} ({why}): need train events and both "
                           f"labels in eval ({len(held_out)} eval events)")
    return RetrainData(
        events=events, train=train.reset_index(drop=True), eval=held_out.reset_index(drop=True),
        catalog=store.catalog(), users=store.users(),
        snapshot=store.snapshot(start=first, end=last + pd.Timedelta(microseconds=1)),
        train_start=first, train_end=cut, eval_end=last, feature_lag=settings.feature_lag, cut_reason=why,
    )


def check_champion_window(champion_model, data: RetrainData) -> None:
    """Fail closed when the champion was trained on events of the eval window (its figures would flatter it)."""
    end = champion_train_end(champion_model)
    if champion_model is not None and end is not None and end >= data.eval_start:
        raise RetrainError(f"the champion was trained on events up to {end}, inside the eval window that starts "
                           f"at {data.eval_start}: it cannot be judged fairly on these events")


def train_candidate(settings, data: RetrainData):
    """Fit a new model on the train part; returns models.train.TrainedModel and the saved folder."""
    from models.train import train_recommender

    trained = train_recommender(settings, data.train, data.catalog, data.users)
    out = settings.models_dir / "candidates" / f"{time.strftime('%Y%m%dT%H%M%S')}-{data.snapshot.hash[:8]}"
    trained.model.save(out)
    return trained, out


def score_events(model, data: RetrainData, engine=None) -> pd.DataFrame:
    """Score the eval events point-in-time: history = events older than each event minus the feature lag.
    ``engine`` (``models.engine``): where the scoring runs (default: this process)."""
    rows = data.eval[["user_id", "item_id", "query", "timestamp"]]
    if engine is None:
        scores = model.score(rows, data.events, data.catalog, lag=data.feature_lag)
    else:
        scores = engine.score(model, rows, data.events, data.catalog, lag=data.feature_lag)
    scored = data.eval[["event_id", "user_id", "item_id", "label", "timestamp"]].copy()
    scored["score"] = np.asarray(scores, dtype=float)
    return scored


def _evaluation(settings, scored: pd.DataFrame, data: RetrainData, ranker=None):
    """Logged-event AUC (and groups, cold items) + ranking metrics over the whole catalog, as served."""
    from models.catalog_eval import evaluate_catalog_ranking
    from models.evaluate import evaluate_scores, item_popularity

    g = settings.gates
    ev = evaluate_scores(scored, data.users, set(data.train["item_id"]), item_popularity(data.train), k=g.k,
                         group_columns=tuple(g.group_columns), min_group_events=g.min_group_events,
                         include_missing_group=g.include_missing_group)
    if ranker is not None:
        ranking = evaluate_catalog_ranking(settings, ranker, data)
        ev.ndcg_at_k, ev.recall_at_k, ev.tail_exposure = ranking.ndcg_at_k, ranking.recall_at_k, ranking.tail_exposure
        ev.ranking_scope = "catalog"
        ev.reasons.pop("ndcg_at_k", None)
        ev.reasons.pop("recall_at_k", None)
        ev.reasons.pop("tail_exposure", None)
    return ev


def evaluate_model(settings, model, data: RetrainData):
    """The model's :class:`~models.evaluate.Evaluation` on the eval events (candidate and champion alike)."""
    from models.catalog_eval import ModelRanker
    from models.engine import feature_engine

    engine = feature_engine(settings)
    try:
        scored = score_events(model, data, None if engine.name == "pandas" else engine)
    finally:
        engine.close()
    return _evaluation(settings, scored, data, ModelRanker(model, settings))


def evaluate_baselines(settings, data: RetrainData) -> dict:
    """Every baseline fitted on the train part and scored on the same eval events the same way (same lag)."""
    from models.baselines import make_baselines
    from models.catalog_eval import ranker_for

    out = {}
    for name, baseline in make_baselines(settings).items():
        baseline.fit(data.train, data.events, data.catalog)
        scored = data.eval[["event_id", "user_id", "item_id", "label", "timestamp"]].copy()
        scored["score"] = np.asarray(baseline.score(data.eval, data.events, data.catalog), dtype=float)
        out[name] = _evaluation(settings, scored, data, ranker_for(baseline, settings))
        out[name].model_version = name
    return out


def load_champion_for_eval(settings):
    """(model, version) of the current champion, or (None, None). A broken champion is an error."""
    from models.registry import load_champion

    loaded = load_champion(settings)
    if loaded is None:
        return None, None
    model, info = loaded
    version = info.get("version") if isinstance(info, dict) else getattr(info, "version", None)
    return model, None if version is None else str(version)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
