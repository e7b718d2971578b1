"""Baselines every report and gate shows beside the model, on the same events.

One protocol for all of them (what the pipeline calls)::

    baseline.fit(train, history, catalog)        # -> self
    baseline.score(rows, history, catalog)       # -> np.ndarray float64 [len(rows)], like-probabilities

``history`` is everything the candidate model may look at (e.g. the whole stored window); rows
are scored **point-in-time** exactly as :meth:`models.recommender.Recommender.score` does: a row
only sees ``history`` events with ``timestamp < row time - lag`` (:func:`models.features.point_in_time_features`).
Baselines that need no history (static popularity, MF) accept and ignore it.

* :class:`StatisticsBaseline` ("statistics-lr") - a standardised logistic regression on exactly the
  wide features the candidate sees (``WIDE_COLUMNS``: user / item / user-category like-rates and
  counts, item age, query flag), fresh at each row's time. The model's whole non-text input as a
  linear score: a candidate that cannot beat it has learnt nothing from text, ids or history.
* :class:`FreshPopularityBaseline` ("fresh-popularity") - the item's smoothed like-rate as of each
  row's time (the ``item_like_rate`` wide feature).
* :class:`PopularityBaseline` ("popularity") - the item's smoothed like-rate in the training events,
  frozen (items never seen score the global rate: it cannot rank cold items, AUC 0.5 there).
* :class:`MostPopularBaseline` ("most-popular") - the item's number of events as of each row's time
  (``item_log_count``, with ``lag``): "what people interact with", the classic MostPop. The like-rate
  baselines above answer "is it liked *when* rated"; on self-selected feedback (ratings) the items a user
  goes on to like are mostly the much-rated ones, and this is the catalog ranking to beat there
  (MovieLens-100k, ``bench_real.py --train``: catalog NDCG@10 0.254 against 0.160 for "popularity" and
  0.227 for the model).
* :class:`MatrixFactorizationBaseline` ("mf") - id-only logistic matrix factorisation (user/item
  embeddings + biases, BCE, full-batch Adam in torch). Dimension, L2 strength and epoch count are
  chosen on a time-ordered validation tail of the training events (small grid, early stopping on
  validation AUC), then it is refit on all training events; unknown users or items fall back to
  the biases that exist. The biases carry a fixed prior of ``SMOOTHING`` pseudo-events at the global
  rate (as the statistics do): unpenalised, an item liked by its one rater topped every catalog ranking
  of a new user (MovieLens-100k, ``recloop train``: MF NDCG@10 0.007, tail share 0.98; with the prior
  0.164, AUC unchanged at 0.709).

Every baseline also ranks a whole catalog "as of now" from :class:`models.features.ServingStats`
(``score_items(stats, user_stats, items)``), for :mod:`models.catalog_eval`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch

from models.features import SMOOTHING, WIDE_COLUMNS, ServingStats, UserStats, _rate, point_in_time_features


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run a block with ``n`` torch CPU threads (None/0: unchanged). Small-op training is several
    times faster on one thread than on two spin-waiting ones when the cores are shared."""
    saved = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@runtime_checkable
class Baseline(Protocol):
    """What the pipeline calls on every baseline."""

    name: str

    def fit(self, train: pd.DataFrame, history: pd.DataFrame | None = None,
            catalog: pd.DataFrame | None = None): ...

    def score(self, rows: pd.DataFrame, history: pd.DataFrame | None = None,
              catalog: pd.DataFrame | None = None) -> np.ndarray: ...

    def score_items(self, stats: ServingStats, user_stats: UserStats, items, has_query: bool = False) -> np.ndarray:
        """One user's scores for ``items`` (ids or positions in ``stats``) "as of" the snapshot."""


def _check(events: pd.DataFrame, cols=("user_id", "item_id", "label")) -> None:
    missing = [c for c in cols if c not in events.columns]
    if missing:
        raise ValueError(f"missing columns {missing}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _as_lag(lag) -> pd.Timedelta | None:
    if lag is None:
        return None
    lag = pd.Timedelta(lag)
    if lag < pd.Timedelta(0):
        raise ValueError(f"lag must be >= 0, got {lag}")
    return lag


def _minimal_catalog(*frames: pd.DataFrame) -> pd.DataFrame:
    ids = pd.unique(pd.concat([f["item_id"].astype(str) for f in frames if f is not None], ignore_index=True))
    return pd.DataFrame({"item_id": ids, "category": pd.Series([None] * len(ids), dtype="string")})


def _features_with_lag(rows: pd.DataFrame, history: pd.DataFrame, catalog: pd.DataFrame, prior: float,
                       lag: pd.Timedelta | None) -> np.ndarray:
    """The candidate's wide features for ``rows`` (point-in-time, with the lag). [n, len(WIDE_COLUMNS)]"""
    kw = {"lag": lag} if lag is not None else {}
    return point_in_time_features(rows, history, catalog, {}, 0, prior, **kw).wide


def _f32(x) -> np.ndarray:
    """Rounded through float32, as :meth:`ServingStats.wide` returns its features."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def _positions(stats: ServingStats, items) -> np.ndarray:
    """Item positions in ``stats`` from ids (strings) or positions (an integer array)."""
    arr = np.asarray(items)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    return stats.positions([str(i) for i in items])


# --------------------------------------------------------------------------- fresh statistics
class StatisticsBaseline:
    """Logistic regression (standardised) on the candidate's wide features, point-in-time with ``lag``."""

    name = "statistics-lr"

    def __init__(self, lag=None, C: float = 1.0):
        self.lag = _as_lag(lag)
        self.C = float(C)
        self.prior = 0.5
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.coef_: np.ndarray | None = None  # on standardised features
        self.intercept_: float = 0.0
        self._parts = None  # (stats, catalog-ranking parts) of the last ServingStats ranked

    def features(self, rows: pd.DataFrame, history: pd.DataFrame | None, catalog: pd.DataFrame | None) -> np.ndarray:
        if history is None:
            history = pd.DataFrame({"user_id": pd.Series([], dtype="string"),
                                    "item_id": pd.Series([], dtype="string"),
                                    "label": pd.Series([], dtype="int64"),
                                    "timestamp": pd.Series([], dtype="datetime64[ns, UTC]")})
        if catalog is None:
            catalog = _minimal_catalog(rows, history)
        return _features_with_lag(rows, history, catalog, self.prior, self.lag)

    def fit(self, train: pd.DataFrame, history: pd.DataFrame | None = None,
            catalog: pd.DataFrame | None = None) -> StatisticsBaseline:
        """Fit on ``train`` rows, each featurised from ``history`` (default: ``train``) before its time - lag."""
        from sklearn.linear_model import LogisticRegression

        _check(train)
        if train.empty:
            raise ValueError("no events to fit on")
        y = train["label"].to_numpy(dtype=np.int64)
        self.prior = float(y.mean())  # the model's prior: the like-rate of its training events
        x = self.features(train, train if history is None else history, catalog).astype(np.float64)
        self.mean_ = x.mean(axis=0)
        sd = x.std(axis=0)
        self.scale_ = np.where(sd > 1e-12, sd, 1.0)
        z = (x - self.mean_) / self.scale_
        self._parts = None
        if len(np.unique(y)) < 2:  # one class: a constant at the observed rate
            self.coef_ = np.zeros(x.shape[1])
            p = float(np.clip(self.prior, 1e-4, 1 - 1e-4))
            self.intercept_ = math.log(p / (1 - p))
            return self
        lr = LogisticRegression(C=self.C, max_iter=1000).fit(z, y)
        self.coef_ = lr.coef_.reshape(-1).astype(np.float64)
        self.intercept_ = float(lr.intercept_[0])
        return self

    def _decision(self, wide: np.ndarray) -> np.ndarray:
        if self.coef_ is None:
            raise RuntimeError("fit() first")
        return ((np.asarray(wide, dtype=np.float64) - self.mean_) / self.scale_) @ self.coef_ + self.intercept_

    def score(self, rows: pd.DataFrame, history: pd.DataFrame | None = None,
              catalog: pd.DataFrame | None = None) -> np.ndarray:
        _check(rows, ("user_id", "item_id"))
        if self.coef_ is None:
            raise RuntimeError("fit() first")
        if len(rows) == 0:
            return np.empty(0, dtype=np.float64)
        return _sigmoid(self._decision(self.features(rows, history, catalog)))

    def score_items(self, stats: ServingStats, user_stats: UserStats, items, has_query: bool = False) -> np.ndarray:
        """Like-probabilities of one user for ``items`` (ids or positions) "as of now" from ``stats``.

        ``stats`` is built from the history the server has (apply the lag when building it).
        """
        if self.coef_ is None:
            raise RuntimeError("fit() first")
        pos = _positions(stats, items)
        if len(pos) == 0:
            return np.empty(0, dtype=np.float64)
        if len(pos) < 256:
            return _sigmoid(self._decision(stats.wide(user_stats, pos, has_query, self.prior)))
        # many items (a catalog): the score is linear in the wide features, so split it into a cached
        # per-item part, a per-(user, category) part and a per-user constant - O(n) gathers, no 8 x n matrix
        item_part, a, const = self._catalog_parts(stats)
        prior = float(np.clip(self.prior, 0.01, 0.99))
        f32 = _f32
        u_n, u_pos = np.int64(user_stats.n), np.int64(user_stats.n_pos)
        user = (a[0] * f32(_rate(u_pos, u_n, prior)) + a[1] * f32(np.log1p(u_n))
                + a[7] * (1.0 if has_query else 0.0)
                + a[8] * f32(_rate(np.int64(user_stats.recent_pos), np.int64(user_stats.recent_n), prior)))
        per_cat = a[4] * f32(_rate(user_stats.cat_pos, user_stats.cat_n, prior)) + a[5] * f32(np.log1p(user_stats.cat_n))
        known = pos >= 0
        p = np.maximum(pos, 0)
        unknown_item = a[2] * f32(_rate(0, 0, prior))  # an item the stats do not know: no events, age 0
        items_v = np.where(known, item_part[p], unknown_item) if stats.n_items else np.full(len(pos), unknown_item)
        cat = np.where(known, stats.item_cat[p], stats.unknown_cat) if stats.n_items else \
            np.full(len(pos), stats.unknown_cat, dtype=np.int64)
        return _sigmoid(const + user + items_v + per_cat[cat])

    def _catalog_parts(self, stats: ServingStats):
        """(per-item part of the decision, weights on raw features, constant), cached per ``stats``."""
        cache = self._parts
        if cache is not None and cache[0] is stats:
            return cache[1]
        prior = float(np.clip(self.prior, 0.01, 0.99))
        a = self.coef_ / self.scale_
        const = float(self.intercept_ - (self.mean_ * a).sum())
        f32 = _f32
        item_part = (a[2] * f32(_rate(stats.item_n_pos, stats.item_n, prior)) + a[3] * f32(np.log1p(stats.item_n))
                     + a[6] * f32(stats.item_log_age))
        parts = (item_part, a, const)
        self._parts = (stats, parts)
        return parts

    @property
    def coefficients(self) -> dict[str, float]:
        """Weights per wide column (standardised features), for reports."""
        return {} if self.coef_ is None else dict(zip(WIDE_COLUMNS, map(float, self.coef_)))


class FreshPopularityBaseline:
    """The item's smoothed like-rate as of each row's time (``item_like_rate``, with ``lag``).

    For catalog ranking (:meth:`score_items`) ``catalog_score`` picks the order: ``"rate"`` (default)
    = the same smoothed like-rate, "as of now"; ``"rate_log_pos"`` = like-rate x log(1 + positives),
    "popular *and* liked", the form of serving's cold-start list. On the synthetic default world
    (bench_train split, 376 eval users x 380 items) the rate alone ranks better: catalog NDCG@10
    0.059 vs 0.053 (tail exposure 0.56 vs 0.15).
    """

    name = "fresh-popularity"
    user_independent = True  # the same catalog ranking for every user

    def __init__(self, lag=None, catalog_score: str = "rate"):
        if catalog_score not in ("rate", "rate_log_pos"):
            raise ValueError(f"catalog_score must be 'rate' or 'rate_log_pos', got {catalog_score!r}")
        self.lag = _as_lag(lag)
        self.catalog_score = catalog_score
        self.prior = 0.5
        self._fitted = False

    def fit(self, train: pd.DataFrame, history: pd.DataFrame | None = None,
            catalog: pd.DataFrame | None = None) -> FreshPopularityBaseline:
        _check(train)
        if train.empty:
            raise ValueError("no events to fit on")
        self.prior = float(train["label"].astype("float64").mean())
        self._fitted = True
        return self

    def _wide(self, rows: pd.DataFrame, history: pd.DataFrame | None, catalog: pd.DataFrame | None) -> np.ndarray:
        """The rows' point-in-time wide features (with the lag)."""
        _check(rows, ("user_id", "item_id"))
        if not self._fitted:
            raise RuntimeError("fit() first")
        helper = StatisticsBaseline(lag=self.lag)
        helper.prior = self.prior
        return helper.features(rows, history, catalog) if len(rows) else np.empty((0, len(WIDE_COLUMNS)))

    def score(self, rows: pd.DataFrame, history: pd.DataFrame | None = None,
              catalog: pd.DataFrame | None = None) -> np.ndarray:
        return _sigmoid(self._wide(rows, history, catalog)[:, WIDE_COLUMNS.index("item_like_rate")])

    def score_items(self, stats: ServingStats, user_stats: UserStats | None, items,
                    has_query: bool = False) -> np.ndarray:
        """Catalog-ranking score of ``items`` (ids or positions) "as of now" (the same for every user)."""
        pos = _positions(stats, items)
        known = pos >= 0
        p = np.where(known, pos, 0)
        n = np.where(known, stats.item_n[p], 0).astype(np.float64) if stats.n_items else np.zeros(len(pos))
        n_pos = np.where(known, stats.item_n_pos[p], 0).astype(np.float64) if stats.n_items else np.zeros(len(pos))

        prior = float(np.clip(self.prior, 0.01, 0.99))
        rate = (n_pos + SMOOTHING * prior) / (n + SMOOTHING)
        return rate if self.catalog_score == "rate" else rate * np.log1p(n_pos)


class MostPopularBaseline(FreshPopularityBaseline):
    """The item's number of events as of each row's time (``item_log_count``, with ``lag``): MostPop.

    ``score`` is ``n / (n + SMOOTHING)`` of that count: monotone in it (what AUC and ranking read), not
    a calibrated like-probability. Catalog ranking (:meth:`score_items`): the same count "as of now"; ties
    (e.g. items nobody has had yet) keep the catalog order.
    """

    name = "most-popular"

    def __init__(self, lag=None):  # FreshPopularity's catalog_score does not apply: it ranks by count
        super().__init__(lag)

    def score(self, rows: pd.DataFrame, history: pd.DataFrame | None = None,
              catalog: pd.DataFrame | None = None) -> np.ndarray:
        n = np.expm1(self._wide(rows, history, catalog)[:, WIDE_COLUMNS.index("item_log_count")].astype(np.float64))
        return n / (n + SMOOTHING)

    def score_items(self, stats: ServingStats, user_stats: UserStats | None, items,
                    has_query: bool = False) -> np.ndarray:
        """The events of ``items`` (ids or positions) "as of now" (the same for every user)."""
        pos = _positions(stats, items)
        known = pos >= 0
        if not stats.n_items:
            return np.zeros(len(pos))
        return np.where(known, stats.item_n[np.where(known, pos, 0)], 0).astype(np.float64)


# --------------------------------------------------------------------------- static, id-only
class PopularityBaseline:
    """The item's smoothed like-rate over the training events, frozen at fit time."""

    name = "popularity"
    user_independent = True  # the same catalog ranking for every user

    def __init__(self, smoothing: float = 10.0):
        self.smoothing = float(smoothing)
        self.prior = 0.5
        self.rates: pd.Series = pd.Series(dtype="float64")
        self._aligned = None

    def fit(self, events: pd.DataFrame, history: pd.DataFrame | None = None,
            catalog: pd.DataFrame | None = None) -> PopularityBaseline:
        _check(events)
        if events.empty:
            raise ValueError("no events to fit on")
        y = events["label"].astype("float64")
        self.prior = float(y.mean())
        g = y.groupby(events["item_id"].astype("string")).agg(["sum", "count"])
        self.rates = (g["sum"] + self.smoothing * self.prior) / (g["count"] + self.smoothing)
        self._aligned = None
        return self

    def score(self, pairs: pd.DataFrame, history: pd.DataFrame | None = None,
              catalog: pd.DataFrame | None = None) -> np.ndarray:
        _check(pairs, ("item_id",))
        return pairs["item_id"].astype("string").map(self.rates).fillna(self.prior).to_numpy(dtype=np.float64)

    def score_items(self, stats: ServingStats, user_stats: UserStats | None, items,
                    has_query: bool = False) -> np.ndarray:
        """The frozen training rates of ``items`` (ids or positions in ``stats``), for catalog ranking."""
        pos = _positions(stats, items)
        if self._aligned is None or self._aligned[0] is not stats:
            r = self.rates.copy()
            r.index = r.index.astype(str)
            self._aligned = (stats, r.reindex(stats.item_ids.astype(str)).fillna(self.prior).to_numpy(np.float64))
        return np.where(pos >= 0, self._aligned[1][np.maximum(pos, 0)], self.prior)


# (dim, L2 strength): log-spaced; on the synthetic default world 0.03 wins at either dim (validation
# AUC 0.583 / 0.587 vs 0.55-0.57 elsewhere) and early stopping picks 10-30 full-batch epochs
MF_GRID: tuple[tuple[int, float], ...] = ((8, 1e-2), (8, 3e-2), (8, 1e-1), (32, 1e-2), (32, 3e-2), (32, 1e-1))
DENSE_LIMIT = 16_000_000  # users x items cells up to which MF trains on dense count matrices


class MatrixFactorizationBaseline:
    """Logistic MF. Without ``dim``/``weight_decay``/``epochs`` they are tuned (see the module docstring).

    Passing all three fixes them (no tuning): ``MatrixFactorizationBaseline(16, 200, weight_decay=1e-4)``
    is the old, untuned default. ``weight_decay`` is an L2 penalty on the embeddings, averaged over events
    (so a user's or item's vector is pulled towards 0 in proportion to its number of events); the biases
    have a fixed prior worth ``SMOOTHING`` events at the global rate, not tuned.
    """

    name = "mf"

    def __init__(self, dim: int | None = None, epochs: int | None = None, lr: float = 0.05,
                 weight_decay: float | None = None, seed: int = 0, *, grid=MF_GRID, val_fraction: float = 0.15,
                 max_epochs: int = 300, eval_every: int = 2, patience: int = 6, threads: int | None = 1):
        self.dim, self.epochs, self.lr, self.weight_decay, self.seed = dim, epochs, lr, weight_decay, seed
        self.grid = tuple(grid)
        self.val_fraction, self.max_epochs = float(val_fraction), int(max_epochs)
        self.eval_every, self.patience, self.threads = int(eval_every), int(patience), threads
        self.users: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.tuning: list[dict] = []  # (dim, weight_decay, best epoch, validation AUC) per grid point
        self.chosen: dict = {}
        self._aligned = None

    @property
    def tuned(self) -> bool:
        return self.dim is None or self.epochs is None or self.weight_decay is None

    # ---------------------------------------------------------------- training
    @staticmethod
    def _vocab(events: pd.DataFrame) -> tuple[dict, dict]:
        users = {u: i + 1 for i, u in enumerate(pd.unique(events["user_id"].astype(str)))}
        items = {x: i + 1 for i, x in enumerate(pd.unique(events["item_id"].astype(str)))}
        return users, items

    @staticmethod
    def _encode(frame: pd.DataFrame, users: dict, items: dict) -> tuple[np.ndarray, np.ndarray]:
        u = frame["user_id"].astype(str).map(users).fillna(0).to_numpy(dtype=np.int64)
        i = frame["item_id"].astype(str).map(items).fillna(0).to_numpy(dtype=np.int64)
        return u, i

    def _train(self, events: pd.DataFrame, dim: int, weight_decay: float, epochs: int,
               val: pd.DataFrame | None = None) -> tuple[dict, list[tuple[int, float]]]:
        """Full-batch Adam on (user, item) pairs aggregated to positive / negative counts.

        With ``val``: validation AUC every ``eval_every`` epochs, stops after ``patience`` checks
        without improvement. Returns the parameters (index 0 = unknown: zero) and the curve.
        """
        from models.evaluate import auc

        users, items = self._vocab(events)
        u, i = self._encode(events, users, items)
        y = events["label"].to_numpy(dtype=np.int64)
        nu, ni = len(users) + 1, len(items) + 1
        n = float(len(y))
        pair = u * ni + i
        uniq, inv = np.unique(pair, return_inverse=True)
        w_pos = torch.as_tensor(np.bincount(inv, weights=y, minlength=len(uniq)), dtype=torch.float32)
        w_all = torch.as_tensor(np.bincount(inv, minlength=len(uniq)), dtype=torch.float32)
        w_neg = w_all - w_pos
        pu = torch.as_tensor(uniq // ni)
        pi = torch.as_tensor(uniq % ni)
        flat = torch.as_tensor(uniq)
        dense = nu * ni <= DENSE_LIMIT
        u_w = torch.as_tensor(np.bincount(u, minlength=nu), dtype=torch.float32) / n  # events per user / n
        i_w = torch.as_tensor(np.bincount(i, minlength=ni), dtype=torch.float32) / n
        g = torch.Generator().manual_seed(self.seed)
        P = torch.nn.Parameter(torch.randn(nu, dim, generator=g) * 0.05)
        Q = torch.nn.Parameter(torch.randn(ni, dim, generator=g) * 0.05)
        bu = torch.nn.Parameter(torch.zeros(nu))
        bi = torch.nn.Parameter(torch.zeros(ni))
        p = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))
        b0 = torch.nn.Parameter(torch.tensor(math.log(p / (1 - p)), dtype=torch.float32))
        opt = torch.optim.Adam([P, Q, bu, bi, b0], lr=self.lr)
        # each bias starts from SMOOTHING pseudo-events at the global rate (the statistics' smoothing): a
        # Gaussian prior with that curvature, k p (1 - p) / 2 * b^2 per user or item, on the loss's 1/n scale.
        # Unpenalised, an item liked by its only rater got the largest bias and topped every catalog ranking.
        bias_prior = SMOOTHING * p * (1 - p) / 2 / n
        sp = torch.nn.functional.softplus

        if val is not None and len(val):
            vu, vi = self._encode(val, users, items)
            vy = val["label"].to_numpy(dtype=np.int64)
        else:
            vy = None
        curve: list[tuple[int, float]] = []
        best = (-1.0, 0, None)
        bad = 0

        def snapshot() -> dict:
            out = {k: t.detach().clone() for k, t in (("P", P), ("Q", Q), ("bu", bu), ("bi", bi), ("b0", b0))}
            out["P"][0] = 0.0
            out["Q"][0] = 0.0
            out["bu"][0] = 0.0
            out["bi"][0] = 0.0
            return out

        for epoch in range(1, epochs + 1):
            opt.zero_grad()
            if dense:
                logits = (P @ Q.T + bu[:, None] + bi[None, :]).reshape(-1)[flat] + b0
            else:
                logits = (P[pu] * Q[pi]).sum(1) + bu[pu] + bi[pi] + b0
            loss = (w_pos * sp(-logits) + w_neg * sp(logits)).sum() / n
            reg = weight_decay * ((u_w * P.pow(2).sum(1)).sum() + (i_w * Q.pow(2).sum(1)).sum()) \
                + bias_prior * (bu.pow(2).sum() + bi.pow(2).sum())
            (loss + reg).backward()
            opt.step()
            if vy is not None and (epoch % self.eval_every == 0 or epoch == epochs):
                params = snapshot()
                a = auc(vy, self._logits_np(params, vu, vi))
                a = 0.5 if not np.isfinite(a) else a
                curve.append((epoch, float(a)))
                if a > best[0] + 1e-5:
                    best, bad = (a, epoch, params), 0
                else:
                    bad += 1
                    if bad >= self.patience:
                        break
        params = best[2] if best[2] is not None else snapshot()
        return {"params": params, "users": users, "items": items, "best_epoch": best[1] or epochs,
                "best_auc": best[0]}, curve

    @staticmethod
    def _logits_np(params: dict, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        tu, ti = torch.as_tensor(u), torch.as_tensor(i)
        with torch.no_grad():
            return ((params["P"][tu] * params["Q"][ti]).sum(1) + params["bu"][tu] + params["bi"][ti]
                    + params["b0"]).double().numpy()

    def fit(self, train: pd.DataFrame, history: pd.DataFrame | None = None,
            catalog: pd.DataFrame | None = None) -> MatrixFactorizationBaseline:
        _check(train)
        if train.empty:
            raise ValueError("no events to fit on")
        with torch_threads(self.threads):
            if self.tuned:
                self._tune(train)
            else:
                self.chosen = {"dim": int(self.dim), "weight_decay": float(self.weight_decay),
                               "epochs": int(self.epochs)}
            c = self.chosen
            fitted, _ = self._train(train, c["dim"], c["weight_decay"], c["epochs"])
        self.params, self.users, self.items = fitted["params"], fitted["users"], fitted["items"]
        self._aligned = None
        return self

    def _tune(self, train: pd.DataFrame) -> None:
        """Grid over (dim, weight_decay) x early-stopped epochs on the time-ordered validation tail."""
        from models.data import time_split

        grid = [(self.dim or d, self.weight_decay if self.weight_decay is not None else w) for d, w in self.grid]
        grid = list(dict.fromkeys(grid))
        if "timestamp" in train.columns and train["timestamp"].notna().all():
            fit_part, val = time_split(train, self.val_fraction)
        else:
            cut = round(len(train) * (1 - self.val_fraction))
            fit_part, val = train.iloc[:cut], train.iloc[cut:]
        self.tuning = []
        if len(fit_part) == 0 or len(val) == 0 or val["label"].nunique() < 2:
            d, w = grid[0]
            self.chosen = {"dim": d, "weight_decay": w, "epochs": self.epochs or 50, "val_auc": float("nan")}
            return
        for d, w in grid:
            max_e = self.epochs or self.max_epochs
            res, _curve = self._train(fit_part, d, w, max_e, val=val)
            self.tuning.append({"dim": d, "weight_decay": w, "epochs": self.epochs or res["best_epoch"],
                                "val_auc": res["best_auc"]})
        best = max(self.tuning, key=lambda r: r["val_auc"])
        self.chosen = dict(best)

    # ---------------------------------------------------------------- scoring
    def score(self, pairs: pd.DataFrame, history: pd.DataFrame | None = None,
              catalog: pd.DataFrame | None = None) -> np.ndarray:
        _check(pairs, ("user_id", "item_id"))
        if not self.items:
            raise RuntimeError("fit() first")
        u, i = self._encode(pairs, self.users, self.items)
        return _sigmoid(self._logits_np(self.params, u, i))

    def score_items(self, stats: ServingStats, user_stats: UserStats, items, has_query: bool = False) -> np.ndarray:
        """``score`` of ``user_stats.user_id`` x ``items`` (ids or positions in ``stats``), for catalog ranking."""
        if not self.items:
            raise RuntimeError("fit() first")
        pos = _positions(stats, items)
        if self._aligned is None or self._aligned[0] is not stats:
            idx = np.fromiter((self.items.get(str(x), 0) for x in stats.item_ids), dtype=np.int64,
                              count=stats.n_items)
            np_params = {k: v.numpy() for k, v in self.params.items()}
            self._aligned = (stats, idx, np_params)
        _, idx, p = self._aligned
        i = np.where(pos >= 0, idx[np.maximum(pos, 0)], 0) if len(idx) else np.zeros(len(pos), dtype=np.int64)
        u = self.users.get(str(user_stats.user_id), 0)
        logits = p["Q"][i] @ p["P"][u] + p["bi"][i] + p["bu"][u] + p["b0"]
        return _sigmoid(logits)


# --------------------------------------------------------------------------- the set the pipeline uses
BASELINE_NAMES = ("statistics-lr", "fresh-popularity", "most-popular", "popularity", "mf")


def make_baselines(settings=None, lag=None) -> dict[str, Baseline]:
    """Fresh, unfitted baselines by name; the fresh ones use ``settings.feature_lag`` (or ``lag``)."""
    if lag is None and settings is not None:
        lag = getattr(settings, "feature_lag", None)
    return {
        "statistics-lr": StatisticsBaseline(lag=lag),
        "fresh-popularity": FreshPopularityBaseline(lag=lag),
        "most-popular": MostPopularBaseline(lag=lag),
        "popularity": PopularityBaseline(),
        "mf": MatrixFactorizationBaseline(),
    }
