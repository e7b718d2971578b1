"""One request's ranking: retrieve, re-score, diversify, explore, explain.

1. **Retrieve** ``serving.candidates`` items: cosine of the user vector (the user tower from the
   user's history) against every item vector through ``ItemIndex.top_n``: exact
   (``models.catalog_eval.top_n``, the retrieval the offline catalog evaluation runs, so its metrics
   measure this path) below ``serving.ann_min_items`` items, an inverted file over the item vectors above
   (``serving/ivf.py``; or a usearch HNSW graph, ``serving.ann_user_index = "graph"``). Items the user already liked are excluded from ``/recommend``. A
   cold-start user (no positive history) gets the most popular items (smoothed like-rate x log
   positives, from the store) instead, topped up by the model's cold user vector; the model's
   ``cold_start_order`` (chosen at training, :mod:`models.cold_start`) says whether step 3 orders
   them by the model's probability or keeps the list's order.
   **Search** retrieves by meaning instead: the cosine of the query's encoder vector with the item
   texts' (``ItemIndex.top_by_text``; models without text vectors fall back to the user tower with
   the query), and orders the re-scored candidates by :func:`standard_fusion` of that relevance and
   the model's score.
2. **Re-score** the best ``serving.rescore`` of them with the full model (towers +
   "wide" statistics as of now). With a ``Recommender`` this is its fast path: the store
   view builds ``models.features.ServingStats`` once per snapshot (at refresh time), the
   request computes the user vector **once** (``Recommender.user_context``, used for the
   retrieval in step 1 too) and ``Recommender.score_items`` scores the candidates with array
   lookups and small matrix products — equal to ``Recommender.score`` over the whole store,
   no pandas per request. Other models (test stand-ins) go through ``user_vectors`` /
   ``score`` with the user's events plus every event of the candidate items as history.
3. **Order** by the model's probability; with ``serving.mmr_lambda`` set, greedy MMR over
   item vectors trades relevance for diversity. Cold-start lists always use MMR
   (``mmr_lambda`` or 0.7): "popular and diverse".
4. **Explore** (``/recommend`` only): with probability ``serving.exploration_epsilon``
   one position (uniform over the K) shows a new or rarely shown item instead; it is
   marked ``explored`` in the answer and the impression log.
5. **Explain**: "because you liked: <title>" (the liked item nearest to the recommended
   one in the item space), the query words an item matches for search, "popular in
   <category>" for cold start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from models.catalog_eval import order_by_score
from models.cold_start import order_of
from serving.index import exploration_pool, mmr
from serving.lifecycle import Served
from serving.storeview import StoreData

COLD_MMR_LAMBDA = 0.7
ANONYMOUS = "__anonymous__"
_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset(["a", "an", "and", "the", "of", "for", "to", "in", "on", "with", "about", "my", "me", "i", "you", "is", "are", "was", "be", "how", "what", "best", "new"])


@dataclass
class Ranked:
    items: list[dict]
    cold_start: bool
    n_candidates: int
    explored: bool = False
    timings: dict = field(default_factory=dict)


def _user_history(data: StoreData, user_id: str | None) -> pd.DataFrame:
    return data.user_history(user_id) if user_id else data.events.iloc[0:0]


def _liked_items(hist: pd.DataFrame) -> list[str]:
    """The user's positive items, most recent last, unique."""
    if hist.empty:
        return []
    items = hist["item_id"].to_numpy(dtype=object)[hist["label"].to_numpy(dtype=np.int64, na_value=0) == 1]
    return list(dict.fromkeys(reversed(items.tolist())))[::-1]


def _scoring_history(data: StoreData, user_id: str | None, hist: pd.DataFrame, item_ids) -> pd.DataFrame:
    """The user's events plus all events of ``item_ids``: exact wide statistics for these pairs."""
    rows = [data.user_rows[user_id]] if user_id and user_id in data.user_rows else []
    rows += [data.item_rows[i] for i in item_ids if i in data.item_rows]
    if not rows:
        return data.events.iloc[0:0]
    sel = np.unique(np.concatenate(rows))
    return data.events.iloc[sel]


def _score(served: Served, data: StoreData, user_id: str, hist: pd.DataFrame, cand_ids: list[str],
           query: str | None) -> np.ndarray:
    if not cand_ids:
        return np.empty(0, dtype=np.float64)
    pairs = pd.DataFrame({"user_id": user_id, "item_id": cand_ids})
    if query:
        pairs["query"] = query
    history = _scoring_history(data, user_id, hist, cand_ids)
    catalog = data.catalog_for(list(cand_ids) + history["item_id"].astype(str).tolist())
    with served.model_lock:
        scores = served.model.score(pairs, history, catalog)
    return np.asarray(scores, dtype=np.float64).reshape(-1)


def _user_vector(served: Served, data: StoreData, user_id: str, hist: pd.DataFrame,
                 query: str | None) -> np.ndarray:
    ids = hist["item_id"].astype(str).tolist() if len(hist) else []
    if not ids and len(data.catalog):  # the model wants a non-empty catalog even for a user without history
        ids = [str(data.catalog.index[0])]
    catalog = data.catalog_for(ids)
    queries = [query] if query else None
    with served.model_lock:
        vec = served.model.user_vectors([user_id], hist, catalog, queries=queries)
    return np.asarray(vec, dtype=np.float32).reshape(-1)


class _Scorer:
    """One request's model calls. With a ``Recommender`` (``user_context``/``score_items``) and the
    snapshot's ``ServingStats``: the user vector is computed **once** and reused for retrieval and
    re-scoring, and scoring is array lookups + small matrix products (no pandas, no lock: the
    Recommender is thread-safe). Any other model: ``user_vectors`` / ``score`` on pandas frames,
    serialised by ``served.model_lock``.
    """

    def __init__(self, served: Served, data: StoreData, user_id: str | None, query: str | None):
        self.served, self.data, self.query = served, data, query
        self.user_id = user_id or ANONYMOUS
        model = served.model
        self.fast = data.stats is not None and hasattr(model, "user_context") and hasattr(model, "score_items")
        self._ctx = None
        self._hist = None
        self._known = user_id is not None

    @property
    def hist(self) -> pd.DataFrame:
        if self._hist is None:
            self._hist = _user_history(self.data, self.user_id if self._known else None)
        return self._hist

    def liked(self) -> list[str]:
        """The user's positive items, most recent last, unique."""
        if not self.fast:
            return _liked_items(self.hist)
        if not self._known:
            return []
        stats = self.data.stats
        pos = stats.user(self.user_id).positives
        if not len(pos):
            return []
        ids = stats.item_ids[pos].tolist()
        return list(dict.fromkeys(reversed(ids)))[::-1]

    def context(self):
        if self._ctx is None:
            self._ctx = self.served.model.user_context(self.data.stats, self.user_id, self.query)
        return self._ctx

    def user_vector(self) -> np.ndarray:
        if self.fast:
            return self.context().vector
        return _user_vector(self.served, self.data, self.user_id, self.hist, self.query)

    def score(self, item_ids: list[str]) -> np.ndarray:
        if not item_ids:
            return np.empty(0, dtype=np.float64)
        if self.fast:
            return np.asarray(self.served.model.score_items(self.data.stats, self.context(), item_ids),
                              dtype=np.float64).reshape(-1)
        return _score(self.served, self.data, self.user_id, self.hist, item_ids, self.query)


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(str(text).lower()) if len(w) > 2 and w not in STOPWORDS}


def _row_text(data: StoreData, item_id: str) -> tuple[str, str, str]:
    return data.item_meta(item_id)


def _item_payload(data: StoreData, item_id: str) -> dict:
    title, category, _ = _row_text(data, item_id)
    return {"item_id": item_id, "title": title, "category": category}


def _order(scores: np.ndarray, vectors: np.ndarray, k: int, lam: float | None) -> np.ndarray:
    if lam is not None and len(scores) > 1:
        return mmr(scores, vectors, k, lam)
    return order_by_score(scores, k)


def _pick_exploration(served: Served, data: StoreData, settings, rng, taken: set[int]) -> int | None:
    pool = exploration_pool(served.index, data.shown, settings.serving.exploration_max_shown)
    if len(pool) == 0:
        return None
    pool = pool[~np.isin(pool, np.fromiter(taken, dtype=np.int64, count=len(taken)))] if taken else pool
    if len(pool) == 0:
        return None
    return int(pool[rng.integers(len(pool))])


def recommend(served: Served, data: StoreData, settings, user_id: str, k: int, rng: np.random.Generator) -> Ranked:
    s = settings.serving
    index = served.index
    scorer = _Scorer(served, data, user_id, None)
    liked = scorer.liked()
    liked_rows = index.rows_of(liked)
    cold = len(liked_rows) == 0
    if cold:
        pop = data.popularity()
        pop_rows = index.rows_of([i for i in pop.index[: s.candidates]])
        cand_rows = list(pop_rows)
        if len(cand_rows) < s.candidates:
            extra, _ = index.top_n(scorer.user_vector(), s.candidates)
            seen = set(cand_rows)
            cand_rows += [r for r in extra if r not in seen][: s.candidates - len(cand_rows)]
        cand_rows = np.asarray(cand_rows, dtype=np.int64)
        n_cand = len(cand_rows)
        cand_rows = cand_rows[: s.rescore]
    else:
        cand_rows, n_cand = index.retrieve_for_rescore(scorer.user_vector(), s.candidates, s.rescore,
                                                 exclude=liked_rows)

    explore_row = None
    if s.exploration_epsilon > 0 and k > 0 and rng.random() < s.exploration_epsilon:
        explore_row = _pick_exploration(served, data, settings, rng, set(cand_rows[:k].tolist()) | set(liked_rows.tolist()))
    score_rows = cand_rows if explore_row is None else np.append(cand_rows, explore_row)
    scores = scorer.score([str(index.item_ids[r]) for r in score_rows])
    cand_scores = scores[: len(cand_rows)]

    lam = s.mmr_lambda if s.mmr_lambda is not None else (COLD_MMR_LAMBDA if cold else None)
    relevance = cand_scores
    if cold and order_of(served.model) == "popularity":  # the list's own order (models.cold_start)
        pop_of = data.popularity()
        top = float(pop_of.iloc[0]) if len(pop_of) and float(pop_of.iloc[0]) > 0 else 1.0
        relevance = np.array([float(pop_of.get(str(index.item_ids[r]), 0.0)) / top for r in cand_rows])
    picked = _order(relevance, index.vectors[cand_rows], k, lam)
    final = [(int(cand_rows[j]), float(cand_scores[j]), False) for j in picked]
    if explore_row is not None:
        pos = int(rng.integers(min(k, len(final) + 1)))
        if len(final) >= k:
            final.pop()  # the exploration item takes the place of the last ranked one
        final.insert(pos, (explore_row, float(scores[-1]), True))

    liked_vecs = index.vectors[liked_rows[-20:]] if len(liked_rows) else None
    liked_titles = [_row_text(data, str(index.item_ids[r]))[0] for r in liked_rows[-20:]]
    items = []
    for rank, (row, score, explored) in enumerate(final, start=1):
        iid = str(index.item_ids[row])
        payload = _item_payload(data, iid)
        if explored:
            reason = f"new to you and rarely shown ({payload['category']}): exploring"
        elif cold:
            reason = f"popular in {payload['category']}" if iid in data.positives.index else \
                f"a good start in {payload['category']}"
        else:
            sims = liked_vecs @ index.vectors[row]
            reason = f"because you liked: {liked_titles[int(np.argmax(sims))]}"
        items.append({**payload, "score": round(score, 6), "rank": rank, "reason": reason, "explored": explored})
    return Ranked(items=items, cold_start=cold, n_candidates=n_cand, explored=explore_row is not None)


def standard_fusion(relevance: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """Sum of the z-scores (over the candidates) of the text relevance and the model's logit: scale-free, no
    weight to tune, and unlike a rank fusion it keeps the size of a gap — an exact title match stands far
    above the next text, so the model's preference reorders only where relevance does not separate."""
    rel = np.asarray(relevance, dtype=np.float64)
    p = np.clip(np.asarray(probability, dtype=np.float64), 1e-6, 1 - 1e-6)
    if rel.shape != p.shape:
        raise ValueError(f"relevance {rel.shape} and probability {p.shape} differ in shape")
    return _z(rel) + _z(np.log(p / (1 - p)))


def _z(x: np.ndarray) -> np.ndarray:
    if x.size == 0:
        return x
    sd = x.std()
    return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)


def search(served: Served, data: StoreData, settings, query: str, user_id: str | None, k: int,
           rng: np.random.Generator) -> Ranked:
    s = settings.serving
    index = served.index
    scorer = _Scorer(served, data, user_id, query)
    by_text = index.searchable and hasattr(served.model, "query_vector")
    if by_text:  # relevance by meaning: the encoder's query vector against the item texts'
        cand_rows, rel = index.top_by_text(served.model.query_vector(query), s.candidates)
        n_cand = len(cand_rows)
        cand_rows = cand_rows[: max(int(s.rescore), 0)]
    else:  # models without text vectors: the user tower with the query retrieves
        cand_rows, n_cand = index.retrieve_for_rescore(scorer.user_vector(), s.candidates, s.rescore)
    scores = scorer.score([str(index.item_ids[r]) for r in cand_rows])
    order_by = standard_fusion(rel[: len(cand_rows)], scores) if by_text else scores
    picked = _order(order_by, index.vectors[cand_rows], k, s.mmr_lambda)
    qwords = _words(query)
    items = []
    for rank, j in enumerate(picked, start=1):
        iid = str(index.item_ids[cand_rows[j]])
        payload = _item_payload(data, iid)
        title, category, tags = _row_text(data, iid)
        matched = sorted(qwords & (_words(title) | _words(category) | _words(tags)))
        if matched:
            reason = f"matches: {', '.join(matched[:4])} ({category})"
        else:
            reason = f"close in meaning to your query ({category})"
        items.append({**payload, "score": round(float(scores[j]), 6), "rank": rank, "reason": reason,
                      "explored": False})
    return Ranked(items=items, cold_start=len(scorer.liked()) == 0, n_candidates=n_cand)
