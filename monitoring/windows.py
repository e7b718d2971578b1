"""Reference and current windows.

* **reference** = the events the champion was trained (and evaluated) on: ``[train_start, train_end)``
  from its lineage. The champion's held-out part (``holdout_start`` onwards, if known) is where its
  scores are out-of-sample: prediction drift and the fallback offline AUC use only that part.
* **current** = what arrived since: ``[max(train_end, end - current_days), end)``, where ``end`` is
  ``now`` if given, else just after the newest stored event (data time, so a replayed or
  back-filled stream is judged on its own clock).

Memory: a window is read as Arrow columns (:func:`load_window`, with the store's partition, column
and row-group pushdown) and only what the check needs becomes pandas rows: the seeded sample
(:meth:`EventWindow.sample`, the same rows :func:`sample_rows` would pick from the whole window); the
reference profile is counted on Arrow columns (``monitoring.features.build_profile_from_window``). The
counts come first (:func:`count_window`, one column) and one window is held at a time, so a check costs
one window's compact Arrow columns plus its samples, not millions of Python strings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

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


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    """The one place a window's Arrow rows become a pandas frame (tests count what passes here)."""
    df = table.to_pandas()
    if "timestamp" in df.columns:
        df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True)
    return df


def _empty_table(columns: list[str]) -> pa.Table:
    from recloop.schema import normalize_feedback

    empty = normalize_feedback(pd.DataFrame({"event_id": pd.Series([], dtype="string")}))[columns]
    return pa.Table.from_pandas(empty, preserve_index=False)


@dataclass(frozen=True)
class EventWindow:
    """A window's events as Arrow columns plus their time order; rows become pandas only on request."""

    table: pa.Table  # EVENT_COLUMNS, file order
    order: np.ndarray  # int64 row positions in (timestamp, event_id) order

    def __len__(self) -> int:
        return self.table.num_rows

    def _times(self) -> np.ndarray:
        """int64 UTC nanoseconds in time order."""
        ts = self.table.column("timestamp")
        if ts.type != pa.timestamp("ns", tz="UTC"):
            ts = pc.cast(ts, pa.timestamp("ns", tz="UTC"))
        return ts.to_numpy().view("int64")[self.order] if len(self) else np.empty(0, dtype=np.int64)

    def time_bounds(self) -> tuple[pd.Timestamp, pd.Timestamp] | tuple[None, None]:
        t = self._times()
        if not len(t):
            return None, None
        return pd.Timestamp(int(t[0]), tz="UTC"), pd.Timestamp(int(t[-1]), tz="UTC")

    def like_rate(self) -> float:
        """Mean label (NaN for an empty window), as ``frame["label"].mean()``."""
        if not len(self):
            return float("nan")
        return float(pc.sum(self.table.column("label")).as_py()) / len(self)

    def rows(self, positions: np.ndarray, columns: list[str] | None = None) -> pd.DataFrame:
        """The rows at ``positions`` of the time order (sorted positions keep time order) as pandas."""
        cols = columns or EVENT_COLUMNS
        take = self.order[np.asarray(positions, dtype=np.int64)]
        df = _to_pandas(self.table.select(cols).take(pa.array(take, type=pa.int64())))
        return df.reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """The whole window in time order (what ``store.read(start, end, EVENT_COLUMNS)`` returns)."""
        return self.rows(np.arange(len(self)))

    def sample(self, n: int, seed: int) -> pd.DataFrame:
        """``sample_rows(self.to_frame(), n, seed)`` without materialising the rows it leaves out."""
        if n <= 0:
            raise ValueError(f"sample size must be positive, got {n}")
        if len(self) <= n:
            return self.to_frame()
        rng = np.random.default_rng(seed)
        return self.rows(np.sort(rng.choice(len(self), size=n, replace=False)))

    def table_until(self, cut: pd.Timestamp, columns: list[str]) -> pa.Table:
        """``columns`` of the rows with ``timestamp <= cut``, in time order, as Arrow (no pandas rows)."""
        k = int(np.searchsorted(self._times(), pd.Timestamp(cut).value, side="right"))
        return self.table.select(columns).take(pa.array(self.order[:k], type=pa.int64()))


def load_window(store, start, end) -> EventWindow:
    """The events ``start <= timestamp < end`` as an :class:`EventWindow` (Arrow, pushdown read)."""
    if start is None or end is None or start >= end:
        table = _empty_table(EVENT_COLUMNS)
    else:
        table = store.read_table(start, end, columns=EVENT_COLUMNS)
        if table.num_rows == 0:
            table = _empty_table(EVENT_COLUMNS)
    if table.num_rows:
        order = pc.sort_indices(table, sort_keys=[("timestamp", "ascending"), ("event_id", "ascending")])
        order = order.to_numpy().astype(np.int64, copy=False)
    else:
        order = np.empty(0, dtype=np.int64)
    return EventWindow(table, order)


def count_window(store, start, end) -> int:
    """Events ``start <= timestamp < end``: the ``timestamp`` column only, one part at a time."""
    if start is None or end is None or start >= end:
        return 0
    return sum(t.num_rows for t in store.scan(start, end, columns=["timestamp"]))


def read_window(store, start, end) -> pd.DataFrame:
    """The whole window as a pandas frame, time-ordered (prefer :func:`load_window` + ``.sample``)."""
    return load_window(store, start, end).to_frame()


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
