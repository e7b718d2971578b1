"""Ranking metrics over the whole catalog, as served.

Ranking only a user's *logged* evaluation events says little: a user with 10 or fewer of them gets
all of them in a top-10 whatever the scores (random scores reach NDCG@10 ~0.5 there). Here every
sampled user gets a top-k out of the **full catalog**, exactly as the server would have built it at
the start of the evaluation window, and it is compared with what the user went on to like:

* **history** = events with ``timestamp < eval_start - lag`` (what the store holds when the
  window opens); one :class:`models.features.ServingStats` over it serves every user.
* **users** = users with at least one positive in the window (``eval_start <= t <= eval_end``) on
  an item they had no event with in the history and that is in the catalog; a seeded sample of
  ``max_users`` of them (``settings.gates.catalog_eval_users``; 0 = all).
* **ranking**: the catalog items (not items only seen in events: the server's index is the
  catalog) except the items the user already had an event with in the history; top ``k``.
  (Serving itself only excludes the items a user *liked*; a later like of an item the user had
  already been shown is not counted as a discovery here, so such items are left out of both sides.)
* **relevant** = the user's positive items in the window, new to the user (as above).
* **NDCG@k** (binary relevance, ideal DCG over ``min(|relevant|, k)``), **recall@k**
  (hits / |relevant|), **tail exposure** (share of the top-k slots outside the head = the top 20 %
  of items by training popularity, :func:`models.evaluate.head_items`), each averaged over users.
  ``ndcg_random`` is the expected NDCG@k of a uniformly random ranking of the same candidates:
  the chance level to read NDCG against.

Rankers (``top_k(stats, user_id, exclude, k, n_items) -> item positions, best first``):

* :class:`ModelRanker` - serving's path: the user tower (``Recommender.user_context``) against the
  L2-normalised item vectors, exact top ``candidates`` (:func:`top_n`, the same function serving
  retrieves with), the best ``rescore`` of them re-scored by ``Recommender.score_items`` and
  ordered by that probability. Cold users (no positive in the history) start, as in serving, from
  the popular items (smoothed like-rate x log positives; exposure here = events, serving uses
  impressions) topped up by the cold user vector, re-scored or kept in their order as the model's
  ``cold_start_order`` says (:mod:`models.cold_start`); serving's MMR re-ordering of cold lists is not
  reproduced.
* :class:`BaselineRanker` (:func:`ranker_for`) - a baseline's ``score_items`` over the whole catalog
  ("statistics-lr", "fresh-popularity", "most-popular", "popularity", "mf").
* :class:`PopularityRanker` (event counts in the history, or a given popularity) and :class:`RandomRanker`.

Cost (one core, shared): one ``ServingStats`` build (vectorised: 0.15 s for 30k events, 2.6 s for
300k), then per user one top-k over the catalog. 400 items: model ranker (tiny test model) ~2.5 ms
per user (1,413 users in 3.6 s), statistics / popularity / random < 1 ms. 100k items (measured on
a fake 100k-item catalog): statistics-lr 4 ms, fresh popularity 1.5 ms, random 2.3 ms per user; the
model ranker's exact retrieval (100k x 64 float32 product + top-k, what serving does per request)
~12 ms per user - so 2,000 users cost ~10 s for a baseline and ~30 s per model at 100k items.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd

from models.cold_start import order_of, popular_order
from models.features import ServingStats


# --------------------------------------------------------------------------- retrieval (shared with serving)
def top_n_scores(scores: np.ndarray, n: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows and scores of the ``n`` best rows of ``scores``, best first; ties: lower row first.

    ``exclude``: row numbers never returned. Non-finite scores are never returned. ``scores`` is
    modified in place when ``exclude`` is given (pass a copy to keep it).
    """
    scores = np.asarray(scores)
    if exclude is not None and len(exclude):
        scores[np.asarray(exclude, dtype=np.int64)] = -np.inf
    n = min(int(n), len(scores))
    if n <= 0:
        return np.empty(0, dtype=np.int64), scores[:0]
    if n < len(scores):  # torch.topk is ~5x faster than argpartition on 100k floats (no negated copy)
        import torch

        kth = torch.topk(torch.from_numpy(np.ascontiguousarray(scores)), n, sorted=False).values.min().item()
        part = np.flatnonzero(scores >= kth)  # ties at the boundary: lowest rows first, as a stable sort
    else:
        part = np.arange(len(scores))
    part = part[np.isfinite(scores[part])]
    order = part[np.argsort(-scores[part], kind="stable")][:n]
    return order.astype(np.int64), scores[order]


def top_n(vectors: np.ndarray, query: np.ndarray, n: int,
          exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine retrieval: rows and similarities of the ``n`` rows of ``vectors`` (L2-normalised,
    [N, d]) nearest to ``query``, best first (ties: lower row first). What serving retrieves with."""
    if len(vectors) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    sims = vectors @ q  # one sgemv over the whole catalog (memory-bound: ~50 MB at 100k x 128)
    return top_n_scores(sims, n, exclude)


def retrieve_for_rescore(vectors: np.ndarray, query: np.ndarray, candidates: int, rescore: int,
                         exclude: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Serving's steps 1-2: the ``candidates`` nearest rows, of which the best ``rescore`` go to the
    full model. Returns (rows to re-score, best first; number of candidates retrieved)."""
    rows, _ = top_n(vectors, query, candidates, exclude)
    return rows[: max(int(rescore), 0)], len(rows)


def order_by_score(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` highest scores, best first; ties keep the input order."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[: max(int(k), 0)]


# --------------------------------------------------------------------------- rankers
class Ranker(Protocol):
    name: str

    def top_k(self, stats: ServingStats, user_id: str, exclude: np.ndarray, k: int, n_items: int) -> np.ndarray:
        """Item positions (< ``n_items``, not in ``exclude``), best first, at most ``k``."""


class _ScoreRanker:
    """Ranks positions ``0..n_items-1`` by a score vector (ties: lower position first)."""

    name = "scores"

    def scores(self, stats: ServingStats, user_id: str, n_items: int) -> np.ndarray:
        raise NotImplementedError

    def top_k(self, stats, user_id, exclude, k, n_items):
        s = np.array(self.scores(stats, user_id, n_items), dtype=np.float64, copy=True)
        rows, _ = top_n_scores(s, k, exclude)
        return rows


class RandomRanker(_ScoreRanker):
    """Uniformly random scores (a fresh draw per user, seeded): the chance level."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def scores(self, stats, user_id, n_items):
        return self.rng.random(n_items)


class PopularityRanker(_ScoreRanker):
    """Static popularity: ``popularity`` (item_id -> count), default the history's events per item."""

    name = "popularity"

    def __init__(self, popularity: pd.Series | None = None):
        self.popularity = popularity
        self._cache: tuple[int, np.ndarray] | None = None

    def scores(self, stats, user_id, n_items):
        if self._cache is None or self._cache[0] != id(stats):
            if self.popularity is None:
                s = stats.item_n[:n_items].astype(np.float64)
            else:
                pop = pd.Series(self.popularity, dtype="float64")
                pop.index = pop.index.astype(str)
                s = pop.reindex(stats.item_ids[:n_items].astype(str)).fillna(0.0).to_numpy(dtype=np.float64)
            self._cache = (id(stats), s)
        return self._cache[1]


class BaselineRanker(_ScoreRanker):
    """A baseline's ``score_items(stats, user_stats, positions)`` over the whole catalog."""

    def __init__(self, baseline, name: str | None = None):
        self.baseline = baseline
        self.name = name or getattr(baseline, "name", type(baseline).__name__)
        self._same_for_all = bool(getattr(baseline, "user_independent", False))
        self._cache: tuple[int, np.ndarray] | None = None

    def scores(self, stats, user_id, n_items):
        positions = np.arange(n_items, dtype=np.int64)
        if self._same_for_all:
            if self._cache is None or self._cache[0] != id(stats):
                self._cache = (id(stats), self.baseline.score_items(stats, None, positions))
            return self._cache[1]
        return self.baseline.score_items(stats, stats.user(user_id), positions)


class ModelRanker:
    """Serving's path with a ``Recommender``: retrieve ``candidates`` by the user vector, re-score the
    best ``rescore`` with ``score_items``, order by the model's probability (see the module docstring)."""

    name = "model"

    def __init__(self, model, settings=None, *, candidates: int | None = None, rescore: int | None = None,
                 name: str | None = None):
        serving = getattr(settings, "serving", None)
        self.model = model
        self.candidates = int(candidates if candidates is not None else getattr(serving, "candidates", 200))
        self.rescore = int(rescore if rescore is not None else getattr(serving, "rescore", 50))
        if name:
            self.name = name
        self.cold_start_order: str | None = None  # None: the model's own (models.cold_start.order_of)
        self._vectors: tuple[int, np.ndarray, np.ndarray] | None = None

    def _prepare(self, stats: ServingStats, n_items: int) -> tuple[np.ndarray, np.ndarray]:
        if self._vectors is None or self._vectors[0] != id(stats):
            if stats.catalog is None:
                raise ValueError("the ServingStats were built without their catalog frame")
            ids, vecs = self.model.item_vectors(stats.catalog)
            if len(ids) != n_items or not np.array_equal(np.asarray(ids, dtype=str),
                                                          stats.item_ids[:n_items].astype(str)):
                raise ValueError("item vectors and serving statistics disagree on the catalog order")
            vecs = np.ascontiguousarray(vecs, dtype=np.float32)
            self._vectors = (id(stats), vecs, popular_order(stats, n_items))
        return self._vectors[1], self._vectors[2]

    def top_k(self, stats, user_id, exclude, k, n_items):
        vecs, pop_order = self._prepare(stats, n_items)
        ctx = self.model.user_context(stats, user_id)
        exclude = np.asarray(exclude, dtype=np.int64)
        if len(ctx.stats.positives):
            rows, _ = retrieve_for_rescore(vecs, ctx.vector, self.candidates, self.rescore, exclude)
        else:  # cold start: the popular items, topped up by the cold user vector
            cand = pop_order[~np.isin(pop_order, exclude)][: self.candidates]
            if len(cand) < self.candidates:
                extra, _ = top_n(vecs, ctx.vector, self.candidates - len(cand), np.concatenate([exclude, cand]))
                cand = np.concatenate([cand, extra])
            if (self.cold_start_order or order_of(self.model)) == "popularity":
                return cand[:k]  # the list's own order (models.cold_start)
            rows = cand[: self.rescore]
        if len(rows) == 0:
            return rows
        scores = self.model.score_items(stats, ctx, stats.item_ids[rows].tolist())
        return rows[order_by_score(scores, k)]


# --------------------------------------------------------------------------- the evaluation set
@dataclass
class CatalogEvalSet:
    """Everything the rankers are compared on (build once, rank with many rankers)."""

    stats: ServingStats  # over the history at the window's start
    n_items: int  # catalog items: positions 0..n_items-1 are rankable
    users: list[str]
    relevant: list[np.ndarray]  # per user: positions of held-out positives new to the user
    seen: list[np.ndarray]  # per user: positions the user had an event with in the history
    head: np.ndarray  # bool [n_items]: in the head by training popularity
    eval_start: pd.Timestamp
    eval_end: pd.Timestamp | None
    lag: pd.Timedelta
    n_eligible_users: int  # before sampling
    build_seconds: float = 0.0


def _ts(x) -> pd.Timestamp:
    t = pd.Timestamp(x)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def build_eval_set(events: pd.DataFrame, catalog: pd.DataFrame, eval_start, eval_end=None, *, lag=None,
                   max_users: int = 2000, seed: int = 0, popularity: pd.Series | None = None) -> CatalogEvalSet:
    """The evaluation set for a window starting at ``eval_start`` (see the module docstring).

    ``popularity``: item_id -> training popularity for the head (default: events per item before
    ``eval_start``, :func:`models.evaluate.item_popularity`).
    """
    from models.evaluate import head_items, item_popularity

    t0 = time.perf_counter()
    missing = {"user_id", "item_id", "label", "timestamp"} - set(events.columns)
    if missing:
        raise ValueError(f"events are missing columns {sorted(missing)}")
    start = _ts(eval_start)
    end = None if eval_end is None else _ts(eval_end)
    lag = pd.Timedelta(0) if lag is None else pd.Timedelta(lag)
    t = pd.to_datetime(events["timestamp"], utc=True)
    history = events[(t < start - lag).to_numpy()]
    in_window = (t >= start) & (t <= end) if end is not None else (t >= start)
    window = events[in_window.to_numpy()]
    hist = history[["user_id", "item_id", "label", "timestamp"]]
    stats = ServingStats.build(hist, catalog, now=start)  # item ages as of the window's start
    n_items = int(catalog["item_id"].astype(str).nunique())

    if popularity is None:
        popularity = item_popularity(events[(t < start).to_numpy()])
    head = np.zeros(n_items, dtype=bool)
    head_ids = head_items(popularity)
    if head_ids:
        head = np.isin(stats.item_ids[:n_items].astype(str), np.asarray(sorted(head_ids), dtype=str))

    # held-out positives on catalog items, per user
    pos = window[window["label"].to_numpy(dtype=np.int64, na_value=0) == 1]
    p_items = stats.positions(pos["item_id"].astype(str).tolist())
    keep = (p_items >= 0) & (p_items < n_items)
    p_users = pos["user_id"].astype(str).to_numpy(dtype=object)[keep]
    p_items = p_items[keep]
    frame = pd.DataFrame({"u": p_users, "i": p_items}).drop_duplicates()
    users, relevant, seen = [], [], []
    for u, grp in frame.groupby("u", sort=True):
        k = stats.user_index.get(str(u))
        had = np.empty(0, dtype=np.int64) if k is None else \
            np.unique(stats.ev_item[stats.user_start[k]: stats.user_start[k + 1]])
        rel = np.setdiff1d(grp["i"].to_numpy(dtype=np.int64), had)
        if len(rel):
            users.append(str(u))
            relevant.append(rel)
            seen.append(had[had < n_items])
    n_eligible = len(users)
    if max_users and n_eligible > max_users:
        pick = np.sort(np.random.default_rng(seed).choice(n_eligible, size=int(max_users), replace=False))
        users = [users[j] for j in pick]
        relevant = [relevant[j] for j in pick]
        seen = [seen[j] for j in pick]
    return CatalogEvalSet(stats=stats, n_items=n_items, users=users, relevant=relevant, seen=seen, head=head,
                          eval_start=start, eval_end=end, lag=lag, n_eligible_users=n_eligible,
                          build_seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------- metrics
@dataclass
class CatalogEvaluation:
    ndcg_at_k: float
    recall_at_k: float
    tail_exposure: float
    n_users: int
    k: int
    ndcg_random: float = float("nan")  # expected NDCG@k of a random ranking of the same candidates
    n_items: int = 0
    n_eligible_users: int = 0
    seconds: float = 0.0
    per_user: pd.DataFrame | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("per_user", None)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def evaluate_ranker(ranker: Ranker, data: CatalogEvalSet, k: int = 10, per_user: bool = False) -> CatalogEvaluation:
    """Mean NDCG@k, recall@k and tail exposure of ``ranker`` over the users of ``data``."""
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    t0 = time.perf_counter()
    disc = _discounts(k)
    ideal = np.cumsum(disc)
    n_u = len(data.users)
    ndcg, recall, tail, rnd = (np.full(n_u, np.nan) for _ in range(4))
    hits_n = np.zeros(n_u, dtype=np.int64)
    for j, (user, rel, seen) in enumerate(zip(data.users, data.relevant, data.seen)):
        top = np.asarray(ranker.top_k(data.stats, user, seen, k, data.n_items), dtype=np.int64)[:k]
        if len(top) and (top.min() < 0 or top.max() >= data.n_items):
            raise ValueError(f"ranker {getattr(ranker, 'name', ranker)!r} returned positions outside the catalog")
        if len(np.intersect1d(top, seen)):
            raise ValueError(f"ranker {getattr(ranker, 'name', ranker)!r} returned an excluded item")
        hit = np.isin(top, rel)
        n_rel = len(rel)
        idcg = ideal[min(n_rel, k) - 1]
        ndcg[j] = float((hit * disc[: len(top)]).sum() / idcg)
        recall[j] = hit.sum() / n_rel
        hits_n[j] = int(hit.sum())
        if len(top):
            tail[j] = float((~data.head[top]).mean())
        n_cand = data.n_items - len(seen)
        if n_cand > 0:
            rnd[j] = float(min(n_rel / n_cand, 1.0) * disc[: min(k, n_cand)].sum() / idcg)
    mean = lambda a: float(np.nanmean(a)) if n_u and np.isfinite(a).any() else float("nan")
    frame = None
    if per_user:
        frame = pd.DataFrame({"user_id": data.users, "n_relevant": [len(r) for r in data.relevant],
                              "n_seen": [len(s) for s in data.seen], "hits": hits_n, "ndcg": ndcg,
                              "recall": recall, "tail_exposure": tail, "ndcg_random": rnd})
    return CatalogEvaluation(ndcg_at_k=mean(ndcg), recall_at_k=mean(recall), tail_exposure=mean(tail),
                             n_users=n_u, k=k, ndcg_random=mean(rnd), n_items=data.n_items,
                             n_eligible_users=data.n_eligible_users, seconds=time.perf_counter() - t0,
                             per_user=frame)


def model_ranker(model, settings=None, name: str = "model") -> ModelRanker:
    """A :class:`ModelRanker` with serving's ``candidates`` / ``rescore`` from ``settings``."""
    return ModelRanker(model, settings, name=name)


def ranker_for(baseline, settings=None) -> BaselineRanker:
    """The catalog ranker of a baseline (anything with ``score_items``, see :mod:`models.baselines`)."""
    if not hasattr(baseline, "score_items"):
        raise TypeError(f"{type(baseline).__name__} cannot rank a catalog: it has no score_items")
    return BaselineRanker(baseline)


_SETS: list[tuple[object, tuple, CatalogEvalSet]] = []  # a few recent evaluation sets (candidate, champion,
# baselines are all judged on the same one: built once per retrain data)


def eval_set_for(settings, data) -> CatalogEvalSet:
    """The :class:`CatalogEvalSet` of a ``models.pipeline.RetrainData`` (events, catalog, train, train_end =
    the window's start, eval_end, feature_lag), users sampled per ``settings.gates``; cached per ``data``."""
    import weakref

    from models.evaluate import item_popularity

    lag = getattr(data, "feature_lag", None)
    if lag is None:
        lag = getattr(settings, "feature_lag", None)
    g = getattr(settings, "gates", None)
    max_users = int(getattr(g, "catalog_eval_users", 2000))
    key = (str(lag), max_users, str(data.train_end), str(data.eval_end), len(data.events))
    for ref, k, es in _SETS:
        if ref() is data and k == key:
            return es
    es = build_eval_set(data.events, data.catalog, data.train_end, data.eval_end, lag=lag, max_users=max_users,
                        seed=0, popularity=item_popularity(data.train))
    try:
        ref = weakref.ref(data)
    except TypeError:
        return es
    _SETS[:] = [e for e in _SETS if e[0]() is not None][-3:] + [(ref, key, es)]
    return es


def evaluate_catalog_ranking(settings, ranker: Ranker, data, per_user: bool = False) -> CatalogEvaluation:
    """Catalog NDCG@k / recall@k / tail exposure of ``ranker`` on a retrain's evaluation window
    (``k = settings.gates.k``; see :func:`eval_set_for`)."""
    k = int(getattr(getattr(settings, "gates", None), "k", 10))
    return evaluate_ranker(ranker, eval_set_for(settings, data), k, per_user)


def evaluate_catalog(rankers: dict[str, Ranker], events: pd.DataFrame, catalog: pd.DataFrame, eval_start,
                     eval_end=None, *, settings=None, k: int | None = None, lag=None, max_users: int | None = None,
                     seed: int = 0, popularity: pd.Series | None = None,
                     per_user: bool = False) -> dict[str, CatalogEvaluation]:
    """{name: metrics} for each ranker over one evaluation set.

    Defaults from ``settings``: ``k = gates.k``, ``max_users = gates.catalog_eval_users``,
    ``lag = feature_lag``; without settings k = 10, 2000 users, no lag.
    """
    g = getattr(settings, "gates", None)
    if k is None:
        k = getattr(g, "k", 10)
    if max_users is None:
        max_users = getattr(g, "catalog_eval_users", 2000)
    if lag is None and settings is not None:
        lag = getattr(settings, "feature_lag", None)
    data = build_eval_set(events, catalog, eval_start, eval_end, lag=lag, max_users=max_users, seed=seed,
                          popularity=popularity)
    return {name: evaluate_ranker(r, data, k, per_user) for name, r in rankers.items()}
