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
    snapshot: Snapshot
    train_start: pd.Timestamp
    train_end: pd.Timestamp  # exclusive: eval starts here
    eval_end: pd.Timestamp

    def lineage(self) -> dict:
        return {
            "snapshot_hash": self.snapshot.hash,
            "window_start": str(self.train_start),
            "window_end": str(self.train_end),
            "eval_start": str(self.train_end),
            "eval_end": str(self.eval_end),
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
    champion_version_before: str | None = None
    champion_version_after: str | None = None
    baseline_auc: float | None = None
    train_seconds: float = 0.0
    total_seconds: float = 0.0
    run_id: str | None = None
    lineage: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def prepare_retrain_data(settings, now=None) -> RetrainData:
    """Read the store, cut a time-ordered train / eval split (eval = the newest days)."""
    store = FeedbackStore.from_settings(settings)
    cfg = settings.retrain
    start = None
    if cfg.window_days is not None:
        _, last = store.time_range()
        if last is not None:
            start = last - pd.Timedelta(days=cfg.window_days)
    events = store.read(start=start, end=now)
    if len(events) < cfg.min_train_events:
        raise RetrainError(f"only {len(events)} events stored (need {cfg.min_train_events}): ingest more feedback first")
    first, last = events["timestamp"].min(), events["timestamp"].max()
    span = last - first
    eval_len = pd.Timedelta(days=cfg.eval_days)
    eval_len = min(max(eval_len, span * cfg.min_eval_fraction), span * cfg.max_eval_fraction)
    cut = (last - eval_len).ceil("h") if span > pd.Timedelta(days=1) else last - eval_len
    train, held_out = events[events["timestamp"] < cut], events[events["timestamp"] >= cut]
    if train.empty or held_out.empty or held_out["label"].nunique() < 2:
        raise RetrainError(f"cannot split {len(events)} events at {cut}: need train events and both labels in eval")
    return RetrainData(
        events=events, train=train.reset_index(drop=True), eval=held_out.reset_index(drop=True),
        catalog=store.catalog(), users=store.users(),
        snapshot=store.snapshot(start=first, end=last + pd.Timedelta(microseconds=1)),
        train_start=first, train_end=cut, eval_end=last,
    )


def train_candidate(settings, data: RetrainData):
    """Fit a new model on the train part; returns models.train.TrainedModel and the saved folder."""
    from models.train import train_recommender

    trained = train_recommender(settings, data.train, data.catalog, data.users)
    out = settings.models_dir / "candidates" / f"{time.strftime('%Y%m%dT%H%M%S')}-{data.snapshot.hash[:8]}"
    trained.model.save(out)
    return trained, out


def score_events(model, data: RetrainData) -> pd.DataFrame:
    """Score the eval events point-in-time (history = everything stored, strictly before each event)."""
    scores = model.score(data.eval[["user_id", "item_id", "query", "timestamp"]], data.events, data.catalog)
    scored = data.eval[["event_id", "user_id", "item_id", "label", "timestamp"]].copy()
    scored["score"] = np.asarray(scores, dtype=float)
    return scored


def evaluate_model(settings, model, data: RetrainData):
    from models.evaluate import evaluate_scores

    scored = score_events(model, data)
    popularity = data.train.groupby("item_id").size()
    return evaluate_scores(scored, data.users, set(data.train["item_id"]), popularity,
                           k=settings.gates.k, group_columns=tuple(settings.gates.group_columns))


def baseline_auc(data: RetrainData) -> float:
    """The popularity baseline's AUC on the same eval events (a floor every candidate must beat)."""
    from models.baselines import PopularityBaseline
    from models.evaluate import auc

    pop = PopularityBaseline().fit(data.train)
    return float(auc(data.eval["label"].to_numpy(), pop.score(data.eval[["user_id", "item_id"]])))


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
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_champion_version(settings) -> str | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    try:
        return str(client.get_model_version_by_alias(settings.model_name, "champion").version)
    except MlflowException:
        return None
