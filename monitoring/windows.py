"""Reference and current windows.

* **reference** = the events the champion was trained (and evaluated) on: ``[train_start, train_end)``
  from its lineage. The champion's held-out part (``holdout_start`` onwards, if known) is where its
  scores are out-of-sample: prediction drift and the fallback offline AUC use only that part.
* **current** = what arrived since: ``[max(train_end, end - current_days), end)``, where ``end`` is
  ``now`` if given, else just after the newest stored event (data time, so a replayed or
  back-filled stream is judged on its own clock).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

EVENT_COLUMNS = ["event_id", "user_id", "item_id", "label", "timestamp", "query"]


def to_utc(ts) -> pd.Timestamp | None:
    if ts is None or (isinstance(ts, str) and not ts.strip()):
        return None
    t = pd.Timestamp(ts)
    if pd.isna(t):
        return None
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


@dataclass(frozen=True)
class ChampionInfo:
    """What monitoring needs to know about the model in production (adapted from its MLflow lineage)."""

    version: str
    train_start: pd.Timestamp  # reference window start (inclusive)
    train_end: pd.Timestamp  # reference window end (exclusive): everything the champion saw
    offline_auc: float | None = None  # its AUC on its own held-out evaluation
    holdout_start: pd.Timestamp | None = None  # start of its held-out part inside the window, if known

    def __post_init__(self):
        start, end = to_utc(self.train_start), to_utc(self.train_end)
        if start is None or end is None:
            raise ValueError("ChampionInfo needs train_start and train_end (its training window)")
        if end <= start:
            raise ValueError(f"ChampionInfo window is empty: train_start {start} >= train_end {end}")
        hold = to_utc(self.holdout_start)
        if hold is not None and not (start <= hold < end):
            raise ValueError(f"holdout_start {hold} lies outside the window [{start}, {end})")
        object.__setattr__(self, "version", str(self.version))
        object.__setattr__(self, "train_start", start)
        object.__setattr__(self, "train_end", end)
        object.__setattr__(self, "holdout_start", hold)
        if self.offline_auc is not None:
            object.__setattr__(self, "offline_auc", float(self.offline_auc))

    @classmethod
    def from_dict(cls, doc: dict) -> ChampionInfo:
        keys = ("version", "train_start", "train_end", "offline_auc", "holdout_start")
        unknown = set(doc) - set(keys)
        if unknown:
            raise ValueError(f"unknown ChampionInfo fields: {sorted(unknown)}")
        return cls(**{k: doc.get(k) for k in keys if k in doc})

    def to_dict(self) -> dict:
        return {"version": self.version, "train_start": str(self.train_start), "train_end": str(self.train_end),
                "offline_auc": self.offline_auc,
                "holdout_start": None if self.holdout_start is None else str(self.holdout_start)}


@dataclass(frozen=True)
class Windows:
    reference_start: pd.Timestamp | None
    reference_end: pd.Timestamp | None
    current_start: pd.Timestamp | None
    current_end: pd.Timestamp | None

    def to_dict(self) -> dict:
        return {k: None if v is None else str(v) for k, v in self.__dict__.items()}


def resolve_windows(settings, store, champion: ChampionInfo | None, now=None) -> Windows:
    end = to_utc(now)
    if end is None:
        _, last = store.time_range()
        end = None if last is None else last + pd.Timedelta(microseconds=1)
    if end is None:  # empty store
        return Windows(champion and champion.train_start, champion and champion.train_end, None, None)
    start = end - pd.Timedelta(days=settings.monitor.current_days)
    if champion is None:
        return Windows(None, None, start, end)
    start = max(start, champion.train_end)
    start = min(start, end)
    return Windows(champion.train_start, champion.train_end, start, end)


def read_window(store, start, end) -> pd.DataFrame:
    if start is None or end is None or start >= end:
        return store.read(columns=EVENT_COLUMNS).iloc[0:0]
    return store.read(start, end, columns=EVENT_COLUMNS)


def sample_rows(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A seeded uniform sample of at most ``n`` rows, kept in time order."""
    if n <= 0:
        raise ValueError(f"sample size must be positive, got {n}")
    if len(df) <= n:
        return df
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(df), size=n, replace=False))
    return df.iloc[idx].reset_index(drop=True)


_AUC_KEYS = ("auc", "eval_auc", "test_auc", "eval.auc", "metrics.auc", "candidate_auc")


def champion_from_lineage(version, tags: dict, metrics: dict | None = None) -> ChampionInfo | None:
    """Adapt a registered model's lineage tags (as ``models.pipeline.RetrainData.lineage`` writes
    them: ``window_start``, ``window_end`` = eval start, ``eval_start``, ``eval_end``; optionally
    prefixed ``lineage.``) and metrics into a ChampionInfo. None if the window is not recorded."""
    def get(key):
        for k in (key, f"lineage.{key}", f"recloop.{key}"):
            v = tags.get(k)
            if v not in (None, "", "None"):
                return v
        return None

    start = to_utc(get("window_start") or get("train_start"))
    end = to_utc(get("eval_end") or get("train_end") or get("window_end"))
    if start is None or end is None:
        return None
    end = end + pd.Timedelta(microseconds=1)  # eval_end is the newest event: the window includes it
    hold = to_utc(get("eval_start"))
    auc = None
    for source in (metrics or {}, tags):
        for k in _AUC_KEYS:
            if source.get(k) not in (None, ""):
                auc = float(source[k])
                break
        if auc is not None:
            break
    return ChampionInfo(version=str(version), train_start=start, train_end=end, offline_auc=auc,
                        holdout_start=hold if hold is not None and start <= hold < end else None)
