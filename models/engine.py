"""Where the heavy data work runs: plain pandas in this process (the default) or Ray tasks on a cluster.

``feature_engine(settings)`` returns one of two engines with the same three methods:

* ``point_in_time_features(rows, history, catalog, item_index, history_len, prior, lag)`` - the
  features of :func:`models.features.point_in_time_features` for a whole training window;
* ``encode_texts(encoder, texts)`` - catalog encoding (mean-pooled vectors of :class:`TextEncoder`);
* ``score(model, rows, history, catalog, lag)`` - batch scoring of many events (``model.score``).

:class:`PandasEngine` calls those functions directly: the embedded default, unchanged.

:class:`RayEngine` (``settings.services.engine == "ray"``) runs the **same pandas functions** inside Ray
tasks, each on a partition that carries exactly the history its rows need, so nothing is re-implemented
and the results equal the embedded path's (``tests/test_engine_ray.py``):

* features are per user *or* per item: every user-side column (user like-rate and count, user x category,
  recent rate, history items, recent events) reads only the row's user's events; the item-side columns
  (item like-rate and count) read only the row's item's events. So the rows are hash-partitioned twice:
  by user (a task gets its users' rows and all their events) and by item (its items' rows and all their
  events); each task applies the lag itself (a row only sees events older than its time - lag). The prior
  and "now" are taken from the whole window first, since a partition sees only part of it.
* catalog encoding: the texts in length order, cut into chunks of whole encoder batches; each task loads
  the encoder from its **local path** (no download) and encodes its chunk.
* scoring: the rows in contiguous chunks, the model, history and catalog put into the object store once;
  each task scores its chunk with ``model.score`` (point-in-time per row, so chunks are independent).

:class:`PartitionedEngine` is that plan with its tasks run inline, one after another: the fast tests check the
partitioning against the embedded path without Ray (``tests/test_engine_units.py``). Ray is imported only
here, and only when the Ray engine is used.
"""

from __future__ import annotations

import math
import os
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd

from models.features import (
    WIDE_COLUMNS,
    PointInTimeFeatures,
    RecentEvents,
    check_feature_inputs,
    point_in_time_features,
)

ITEM_COLUMNS = tuple(WIDE_COLUMNS.index(c) for c in ("item_like_rate", "item_log_count"))  # read from the item pass
ROWS_PER_TASK = 200_000  # default partition size (rows) when the cluster has few CPUs
TEXTS_PER_TASK = 4_096  # catalog texts per encoding task (a multiple of the encoder batch)
ROOT = Path(__file__).resolve().parents[1]


class PandasEngine:
    """The embedded default: everything in this process, plain pandas / numpy / torch."""

    name = "pandas"

    def point_in_time_features(self, rows, history, catalog, item_index, history_len=20, prior=None,
                               lag=None) -> PointInTimeFeatures:
        return point_in_time_features(rows, history, catalog, item_index, history_len, prior, lag=lag)

    def encode_texts(self, encoder, texts: list[str], batch_size: int = 128):
        return encoder.encode(list(texts), batch_size)

    def score(self, model, rows: pd.DataFrame, history, catalog, lag=None) -> np.ndarray:
        return _score_task(model, rows, history, catalog, lag)

    def close(self) -> None:
        pass


def feature_engine(settings=None, *, partitions: int | None = None):
    """The engine ``settings.services.engine`` names: :class:`PandasEngine` (default) or :class:`RayEngine`
    (connects to ``services.ray_address``, or starts a local Ray instance when it is unset)."""
    services = getattr(settings, "services", None)
    kind = getattr(services, "engine", "pandas") or "pandas"
    if kind == "pandas":
        return PandasEngine()
    if kind == "ray":
        return RayEngine(getattr(services, "ray_address", None), partitions=partitions)
    raise ValueError(f"unknown engine {kind!r}; use 'pandas' or 'ray'")


# ------------------------------------------------------------------------------------------ Ray
def _partition(values: pd.Series, k: int) -> np.ndarray:
    """A stable hash partition (0..k-1) of id values; NA ids fall together, as in the features' codes."""
    keys = values.astype("string").fillna("<na>")
    return (pd.util.hash_pandas_object(keys, index=False).to_numpy() % np.uint64(k)).astype(np.int64)


def _features_task(rows, history, catalog, item_index, history_len, prior, lag, now, item_pass):
    """One partition: the pandas features of its rows from the history it was given."""
    if item_pass:  # only the item-side wide columns are used: skip the history items
        f = point_in_time_features(rows, history, catalog, {}, 0, prior, lag=lag, now=now)
        return f.wide[:, list(ITEM_COLUMNS)]
    return point_in_time_features(rows, history, catalog, item_index, history_len, prior, lag=lag, now=now)


def _encode_task(path: str, max_tokens: int, texts: list[str], batch_size: int) -> np.ndarray:
    """One chunk of the catalog: load the encoder from its local path and encode."""
    from models.network import TextEncoder

    return TextEncoder(Path(path), max_tokens).encode(texts, batch_size).numpy()


def _score_task(model, rows, history, catalog, lag) -> np.ndarray:
    """``model.score`` of one chunk (``lag`` passed only when given: baselines hold their own)."""
    kw = {} if lag is None else {"lag": lag}
    return np.asarray(model.score(rows, history, catalog, **kw), dtype=float)


class PartitionedEngine:
    """The partitioned plan of :class:`RayEngine`, its partitions run one after another in this process.

    Not a way to scale (that is :class:`RayEngine`, which only swaps how a task runs): it lets the fast tests
    check the partitioning itself - which rows and which history each task gets - against the embedded path
    without starting Ray."""

    name = "partitioned"

    def __init__(self, partitions: int | None = None):
        self.partitions = partitions

    # how a task runs: inline here, a Ray task in RayEngine
    def _put(self, value):
        return value

    def _submit(self, fn, *args):
        return fn(*args)

    def _gather(self, futures: list) -> list:
        return list(futures)

    def _cpus(self) -> int:
        return 1

    def _parts(self, n_rows: int) -> int:
        if self.partitions:
            return max(1, int(self.partitions))
        return max(self._cpus(), math.ceil(n_rows / ROWS_PER_TASK), 1)

    def point_in_time_features(self, rows, history, catalog, item_index, history_len=20, prior=None,
                               lag=None) -> PointInTimeFeatures:
        """Equal to :func:`point_in_time_features` over the same inputs; two hash-partitioned passes."""
        check_feature_inputs(rows, history)
        rows = rows.reset_index(drop=True)
        history = history.reset_index(drop=True)
        n = len(rows)
        # what a partition cannot know by itself: the window's prior and its latest time
        if prior is None:
            prior = float(pd.to_numeric(history["label"]).mean()) if len(history) else 0.5
        now = pd.to_datetime(history["timestamp"].max(), utc=True) if len(history) else None
        now = None if now is None or pd.isna(now) else now
        k = self._parts(n)
        catalog_ref = self._put(catalog)
        index_ref = self._put(item_index)
        out_pass = {}
        for item_pass, col in ((False, "user_id"), (True, "item_id")):
            row_p, hist_p = _partition(rows[col], k), _partition(history[col], k)
            futures, where = [], []
            for p in range(k):
                sel = np.flatnonzero(row_p == p)
                if not len(sel):
                    continue
                futures.append(self._submit(
                    _features_task, rows.iloc[sel], history[hist_p == p], catalog_ref, index_ref, history_len,
                    prior, lag, now, item_pass))
                where.append(sel)
            out_pass[item_pass] = (where, self._gather(futures))
        kh = int(history_len)
        hist_items = np.full((n, kh), -1, dtype=np.int64)
        hist_len = np.zeros(n, dtype=np.int64)
        wide = np.zeros((n, len(WIDE_COLUMNS)), dtype=np.float32)
        recent = []
        for sel, f in zip(*out_pass[False]):
            hist_items[sel], hist_len[sel], wide[sel] = f.history_items, f.history_len, f.wide
            recent.append((sel, f.recent))
        for sel, item_cols in zip(*out_pass[True]):
            wide[np.ix_(sel, list(ITEM_COLUMNS))] = item_cols
        return PointInTimeFeatures(hist_items, hist_len, wide, RecentEvents.combine(n, recent))

    def encode_texts(self, encoder, texts: list[str], batch_size: int = 128):
        """Catalog vectors as :meth:`TextEncoder.encode` computes them, in Ray tasks (local encoder path)."""
        import torch

        texts = list(texts)
        if not texts:
            return torch.zeros((0, encoder.dim), dtype=torch.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")  # as encode(): batches of similar length
        step = max(batch_size, TEXTS_PER_TASK // batch_size * batch_size)
        parts = [order[s: s + step] for s in range(0, len(texts), step)]
        futures = [self._submit(_encode_task, str(encoder.path), encoder.max_tokens, [texts[i] for i in idx],
                                batch_size) for idx in parts]
        out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
        for idx, vecs in zip(parts, self._gather(futures)):
            out[idx] = vecs
        return torch.from_numpy(out)

    def score(self, model, rows: pd.DataFrame, history, catalog, lag=None) -> np.ndarray:
        """``model.score`` of ``rows`` in contiguous chunks (one task each); history and catalog shared."""
        rows = rows.reset_index(drop=True)
        if not len(rows):
            return np.empty(0, dtype=float)
        k = self._parts(len(rows))
        bounds = np.linspace(0, len(rows), k + 1).round().astype(int)
        refs = [self._put(x) for x in (model, history, catalog)]
        futures = [self._submit(_score_task, refs[0], rows.iloc[a:b], refs[1], refs[2], lag)
                   for a, b in pairwise(bounds) if b > a]
        return np.concatenate(self._gather(futures)) if futures else np.empty(0, dtype=float)

    def close(self) -> None:
        pass


class RayEngine(PartitionedEngine):
    """The heavy data work as Ray tasks (see the module doc). ``address``: a running cluster
    (``ray://`` or ``host:port``); None starts a local instance. ``partitions``: tasks per pass
    (default: the cluster's CPUs, more when the rows need it)."""

    name = "ray"

    def __init__(self, address: str | None = None, partitions: int | None = None):
        import ray

        super().__init__(partitions)
        self.ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            # workers import this package: put its root on their path unless they inherit it already (a
            # runtime env starts dedicated workers; a remote cluster needs the package installed instead)
            path = os.environ.get("PYTHONPATH", "")
            env = None if str(ROOT) in path.split(os.pathsep) else \
                {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), path) if p)}}
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env=env)
        self._remote = {}

    def _put(self, value):
        return self.ray.put(value)

    def _submit(self, fn, *args):
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(fn)
        return self._remote[fn].remote(*args)

    def _gather(self, futures: list) -> list:
        return self.ray.get(list(futures))

    def _cpus(self) -> int:
        return int(self.ray.cluster_resources().get("CPU", 1))

    def close(self) -> None:
        """Stop the Ray instance this engine started (a cluster it only joined keeps running)."""
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
