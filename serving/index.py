"""Candidate retrieval over precomputed item vectors, MMR diversity, the exploration slot.

:class:`ItemIndex` holds one L2-normalised vector per catalog item (the model's item
tower, ``Recommender.item_vectors``). Below ``serving.ann_min_items`` items retrieval
is exact: one matrix-vector product and a top-k (100k x 128 float32 is ~50 MB and a few ms on one
core). From that size on, :meth:`ItemIndex.with_ann` attaches an inverted file (:mod:`serving.ivf`, the
default: built in seconds when serving loads a model) or a usearch HNSW graph (:mod:`serving.ann`; saved next
to the model's local files and loaded instead of rebuilt next time) and :meth:`ItemIndex.top_n` answers through
it; search's text vectors always get their own HNSW graph. The index is rebuilt incrementally when the catalog
changes: items whose text did not change keep their vectors, new or edited items are
encoded — so a new catalog item is retrievable as soon as the store shows it.
(The ``Recommender`` caches the encoder's text vectors itself and saves them with the
model, so loading a champion re-encodes only items added after its training.)
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from models.cf import unit_rows
from recloop.schema import item_text
from serving.ann import AnnIndex, AnnParams, index_key, item_keys, model_prefix
from serving.ivf import IvfIndex, IvfParams

log = logging.getLogger(__name__)


def text_hashes(catalog: pd.DataFrame) -> np.ndarray:
    """A 64-bit hash of each item's model text (detects edited items)."""
    texts = item_text(catalog)
    return np.array([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
                     for t in texts], dtype=np.uint64)


@dataclass(frozen=True)
class ItemIndex:
    item_ids: np.ndarray  # str [n]
    vectors: np.ndarray  # float32 [n, d], L2-normalised, C-contiguous
    hashes: np.ndarray  # uint64 [n]
    row: dict = field(repr=False)  # item_id -> row
    build_seconds: float = 0.0
    n_encoded: int = 0  # how many vectors the last build had to compute
    ann: AnnIndex | None = field(default=None, repr=False)  # None: exact retrieval (or ivf)
    # the inverted file over ``vectors`` (serving.ann_user_index = "ivf", the default): user-vector retrieval
    ivf: IvfIndex | None = field(default=None, repr=False)
    # [n, text_dim] float32, L2-normalised encoder vectors of the item texts (search relevance,
    # ``Recommender.item_text_vectors``); None for models without them, and once a graph holds them (text_ann)
    text_vectors: np.ndarray | None = field(default=None, repr=False)
    # the HNSW graph over the text vectors (large catalogs): its own float16 copy is the only one kept
    text_ann: AnnIndex | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0

    @property
    def searchable(self) -> bool:
        """Whether search by meaning works (:meth:`top_by_text`): the model gave text vectors."""
        return self.text_vectors is not None or self.text_ann is not None

    @property
    def text_dim(self) -> int:
        """The dimension of the text vectors (0 without them), whoever holds them."""
        if self.text_ann is not None:
            return int(self.text_ann.graph.ndim)
        return int(self.text_vectors.shape[1]) if self.text_vectors is not None else 0

    def top_by_text(self, query_vector: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and cosines of the ``n`` items whose text is closest in meaning to a search query
        (``Recommender.query_vector``), best first: exact (one matrix-vector product) below
        ``serving.ann_min_items`` items, through its own HNSW graph above (:meth:`with_ann`)."""
        if not self.searchable:
            raise ValueError("this index has no text vectors (the model does not provide them)")
        if self.text_ann is not None:  # similarities from the graph's own copy of the vectors
            return self.text_ann.search(None, query_vector, n)
        from models.catalog_eval import top_n

        return top_n(self.text_vectors, np.asarray(query_vector, dtype=np.float32), n)

    def rows_of(self, item_ids) -> np.ndarray:
        return np.array([self.row[i] for i in item_ids if i in self.row], dtype=np.int64)

    def top_n(self, query: np.ndarray, n: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows and cosine similarities of the ``n`` items nearest to ``query``, best first; rows in
        ``exclude`` are never returned.

        Exact (``models.catalog_eval.top_n``, the retrieval the offline catalog evaluation measures)
        unless :meth:`with_ann` attached an inverted file (:mod:`serving.ivf`, the default at scale) or an
        HNSW graph: then approximate in *which* rows come back, exact in their similarities and order. The
        graph reaches recall@100 >= 0.95 only for queries among the items (benchmarks/bench_ann.py); the user
        tower's vectors lie outside them, which is why user retrieval goes through the inverted file."""
        if self.ivf is not None:
            return self.ivf.search(query, n, exclude)
        if self.ann is not None:
            return self.ann.search(self.vectors, query, n, exclude)
        from models.catalog_eval import top_n

        return top_n(self.vectors, query, n, exclude)

    def retrieve_for_rescore(self, query: np.ndarray, candidates: int, rescore: int,
                             exclude: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Serving's steps 1-2 (``models.catalog_eval.retrieve_for_rescore`` through :meth:`top_n`): the
        ``candidates`` nearest rows, of which the best ``rescore`` go to the full model."""
        rows, _ = self.top_n(query, candidates, exclude)
        return rows[: max(int(rescore), 0)], len(rows)

    # ---- the ANN graph ----------------------------------------------------------------------
    def with_ann(self, params: AnnParams, directory: Path | None = None, model_stamp: str | None = None,
                 previous: ItemIndex | None = None, ivf: IvfParams | None = None) -> ItemIndex:
        """This index with an HNSW graph attached when it has at least ``params.min_items`` items.

        ``ivf``: retrieve by the user vector through an inverted file (:mod:`serving.ivf`) instead of a graph
        over the item-tower vectors: no towers graph is built; ``previous.ivf``'s lists are kept (items
        re-assigned) when ``previous`` is given. Search's text graph is unaffected.

        Where the graph comes from, cheapest first: ``previous.ann`` updated incrementally (same
        model, catalog changed while serving); the save in ``directory`` for exactly this model +
        catalog (loaded as is); the newest save of this model for another catalog (updated
        incrementally); a fresh build. ``directory`` + ``model_stamp`` (the model's version and
        identity) enable saving: a built graph is saved there so the next start loads it. Below the
        threshold the index stays exact (``ann=None``). With ``text_vectors`` (search), a second graph over
        them (``text_ann``) comes the same way, filed under the model's stamp + ``|texts``.
        """
        if len(self) < max(int(params.min_items), 1) or self.dim == 0:
            return replace(self._dense(), ann=None, text_ann=None, ivf=None)
        inverted = None
        if ivf is not None:
            prev = previous.ivf if previous is not None else None
            inverted = IvfIndex.build(self.vectors, ivf, None if prev is None else prev.centroids)
            log.info("inverted file (towers) %s: %d items in %d lists, %.1fs", inverted.how, len(inverted),
                     inverted.n_lists, inverted.build_seconds)
        keys = item_keys(self.item_ids)
        if len(np.unique(keys)) != len(keys):  # a 64-bit collision among item ids: never seen, but stay exact
            log.warning("item id hashes collide: ANN retrieval disabled for this catalog")
            return replace(self._dense(), ann=None, text_ann=None, ivf=inverted)
        graphs = [] if inverted is not None else \
            [("towers", self.vectors, model_stamp, previous.ann if previous is not None else None)]
        if self.text_vectors is not None:  # search's own graph (another space); saved under another stamp
            graphs.append(("texts", self.text_vectors, None if model_stamp is None else f"{model_stamp}|texts",
                           previous.text_ann if previous is not None else None))
        built = []
        for what, vectors, stamp, prev in graphs:
            ann = _graph(vectors, keys, self.hashes, params, directory, stamp, prev, previous is not None,
                         keep=2 * len(graphs))
            if ann is None:  # usearch not installed: exact retrieval, loudly
                return replace(self._dense(), ann=None, text_ann=None, ivf=inverted)
            log.info("ANN index (%s) %s: %d items in %.1fs (+%d -%d)", what, ann.how, len(ann), ann.build_seconds,
                     ann.n_added, ann.n_removed)
            built.append((what, ann.bind(keys)))
        towers = next((a for w, a in built if w == "towers"), None)
        texts = next((a for w, a in built if w == "texts"), None)
        if texts is None:
            return replace(self._dense(), ann=towers, text_ann=None, ivf=inverted)
        # behind a graph the text vectors only score its hits and seed a refresh: the graph's own float16 copy
        # serves both (its distances; AnnIndex.stored), so the index keeps none (768 MB less at 1M x 384 dims)
        return replace(self, ann=towers, text_ann=texts, text_vectors=None, ivf=inverted)

    def _dense(self) -> ItemIndex:
        """This index with its text vectors as one array (a deferred refresh left some in the old graph)."""
        if isinstance(self.text_vectors, _PartialRows):
            return replace(self, text_vectors=np.asarray(self.text_vectors))
        return self

    # ---- building ---------------------------------------------------------------------------
    @classmethod
    def build(cls, model, catalog: pd.DataFrame, previous: ItemIndex | None = None,
              chunk: int = 4096, defer_text_reads: bool = False) -> ItemIndex:
        """Vectors for every item of ``catalog`` (a frame with an ``item_id`` column).

        Vectors of items whose text hash matches ``previous`` (same model) are reused. Where only
        ``previous``'s text graph holds its text vectors, ``defer_text_reads`` leaves the unchanged ones in
        that graph (:class:`_PartialRows`) for :meth:`with_ann`, which reads back only what it needs: none
        for an incremental graph update (at 1M items: 8.8 s and +1.6 GiB less per refresh), all for a
        rebuild or an exact index. Pass it only when :meth:`with_ann` follows.
        """
        t0 = time.perf_counter()
        catalog = catalog.reset_index(drop=True)
        ids = catalog["item_id"].astype(str).to_numpy()
        hashes = text_hashes(catalog)
        vectors, n_encoded = _vectors(model.item_vectors, ids, hashes, catalog, chunk,
                                      previous and (previous.item_ids, previous.hashes, previous.vectors))
        texts = None
        if hasattr(model, "item_text_vectors"):
            old = None
            if previous is not None and previous.text_vectors is not None:
                old = (previous.item_ids, previous.hashes, previous.text_vectors)
            elif previous is not None and previous.text_ann is not None:  # the graph holds them (as float16)
                old = (previous.item_ids, previous.hashes, _GraphRows(previous.text_ann, len(previous)))
            texts, _ = _vectors(model.item_text_vectors, ids, hashes, catalog, chunk, old, defer=defer_text_reads)
        return cls(item_ids=ids, vectors=vectors, hashes=hashes,
                   row={iid: j for j, iid in enumerate(ids)}, build_seconds=time.perf_counter() - t0,
                   n_encoded=n_encoded, text_vectors=texts)


def _graph(vectors: np.ndarray, keys: np.ndarray, hashes: np.ndarray, params: AnnParams, directory: Path | None,
           model_stamp: str | None, prev: AnnIndex | None, refreshing: bool, keep: int) -> AnnIndex | None:
    """One HNSW graph over ``vectors`` (see :meth:`ItemIndex.with_ann`); None when usearch is missing."""
    key = prefix = None
    dim = vectors.shape[1]
    if model_stamp is not None:
        prefix = model_prefix(model_stamp, dim, params)
        key = index_key(model_stamp, dim, params, keys, hashes)
    ann = None
    if prev is not None and prev.params.graph_fields() == params.graph_fields() and int(prev.graph.ndim) == dim:
        ann = prev.updated(vectors, keys, hashes)  # the caller passes a previous of the same model
    if ann is None and directory is not None and key is not None:
        ann = AnnIndex.load(directory, key, prefix, params)
        if ann is None:
            stale = AnnIndex.latest_for_model(directory, prefix, params)
            if stale is not None:
                ann = stale.updated(vectors, keys, hashes)
    if ann is None:
        try:
            ann = AnnIndex.build(vectors, keys, hashes, params)
        except ImportError as exc:
            log.warning("ANN retrieval unavailable (%s): exact retrieval over %d items", exc, len(keys))
            return None
    if directory is not None and key is not None and ann.how != "loaded" and not refreshing:
        try:
            ann.save(directory, key, prefix, keep=keep)
        except OSError as exc:  # a read-only model folder: serve from memory, rebuild next start
            log.warning("could not save the ANN index to %s: %s", directory, exc)
    ann.key = key or ann.key
    return ann


class _GraphRows:
    """Row access to the vectors a bound HNSW graph holds for its index's items: ``rows[ks]`` -> float32
    [len(ks), d] (the refresh's reuse when the index kept no copy of its own)."""

    def __init__(self, ann: AnnIndex, n: int):
        self.ann, self.shape = ann, (int(n), int(ann.graph.ndim))

    def __getitem__(self, ks) -> np.ndarray:
        return self.ann.stored_rows(ks)


class _PartialRows:
    """A refreshed catalog's text vectors, not made whole: the rows computed for new or edited items, and for
    the others their row in the previous index, whose graph still holds them (:class:`_GraphRows`). ``rows[ks]``
    reads what ``ks`` needs; ``np.asarray(rows)`` makes the whole float32 array, 64k rows at a time."""

    def __init__(self, n: int, fresh_rows: np.ndarray, fresh: np.ndarray, old_rows: np.ndarray, graph: _GraphRows):
        self.shape = (int(n), int(graph.shape[1]))
        self._fresh_at = np.full(int(n), -1, dtype=np.int64)
        self._fresh_at[fresh_rows] = np.arange(len(fresh_rows))
        self._fresh, self._old, self._graph = fresh, old_rows, graph

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, ks) -> np.ndarray:
        ks = np.asarray(ks, dtype=np.int64)
        out = np.empty((len(ks), self.shape[1]), dtype=np.float32)
        at = self._fresh_at[ks]
        new = at >= 0
        out[new] = self._fresh[at[new]]
        if not new.all():
            out[~new] = self._graph[self._old[ks[~new]]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.float32)
        for start in range(0, self.shape[0], 65_536):  # in slices: no second full-size copy in flight
            out[start:start + 65_536] = self[np.arange(start, min(start + 65_536, self.shape[0]))]
        return out if dtype is None else out.astype(dtype, copy=False)


def _encoded(compute, ids: np.ndarray, rows: np.ndarray, catalog: pd.DataFrame, chunk: int):
    """(rows, unit vectors) for the catalog ``rows``, ``chunk`` rows per ``compute`` call, matched back by id."""
    for start in range(0, len(rows), chunk):
        sel = rows[start:start + chunk]
        out_ids, vecs = compute(catalog.iloc[sel].reset_index(drop=True))
        vecs = unit_rows(vecs)
        row_of = {ids[j]: j for j in sel}
        at = np.array([row_of.get(str(i), -1) for i in out_ids], dtype=np.int64)
        yield at[at >= 0], vecs[at >= 0]


def _vectors(compute, ids: np.ndarray, hashes: np.ndarray, catalog: pd.DataFrame, chunk: int,
             previous, defer: bool = False) -> tuple[np.ndarray, int]:
    """(unit vectors [n, d] aligned with ``ids``, how many were computed): rows of ``previous`` (item_ids,
    hashes, vectors: an array or :class:`_GraphRows`) whose text hash matches are reused, the rest come from
    ``compute(catalog rows)``. ``defer`` (with a :class:`_GraphRows` previous): the reused rows stay in its
    graph and a :class:`_PartialRows` comes back."""
    vectors = None
    reused = np.zeros(len(ids), dtype=bool)
    if previous:
        s_ids, s_hash, s_vec = previous
        lookup = {str(i): k for k, i in enumerate(s_ids)}
        at = np.fromiter((lookup.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
        reused = at >= 0
        reused[reused] = np.asarray(s_hash, dtype=np.uint64)[at[reused]] == np.asarray(hashes)[reused]
        if defer and isinstance(s_vec, _GraphRows) and reused.any():
            missing = np.flatnonzero(~reused)
            fresh = np.zeros((len(missing), s_vec.shape[1]), dtype=np.float32)
            position = np.full(len(ids), -1, dtype=np.int64)
            position[missing] = np.arange(len(missing))
            for got, vecs in _encoded(compute, ids, missing, catalog, chunk):
                _same_width(vecs, s_vec.shape[1])
                fresh[position[got]] = vecs
            return _PartialRows(len(ids), missing, fresh, np.where(reused, at, -1), s_vec), len(missing)
        vectors = np.zeros((len(ids), s_vec.shape[1]), dtype=np.float32)
        rows = np.flatnonzero(reused)
        for start in range(0, len(rows), 65_536):  # in slices: no second full-size copy in flight
            sel = rows[start:start + 65_536]
            vectors[sel] = s_vec[at[sel]]
    missing = np.flatnonzero(~reused)
    for got, vecs in _encoded(compute, ids, missing, catalog, chunk):
        if vectors is None or (vectors.shape[1] != vecs.shape[1] and not reused.any()):
            vectors = np.zeros((len(ids), vecs.shape[1]), dtype=np.float32)
        _same_width(vecs, vectors.shape[1])
        vectors[got] = vecs
    if vectors is None:
        vectors = np.zeros((len(ids), 0), dtype=np.float32)
    return np.ascontiguousarray(vectors), len(missing)


def _same_width(vecs: np.ndarray, width: int) -> None:
    if vecs.shape[1] != width:
        raise ValueError(f"the model gives {vecs.shape[1]}-d vectors, the previous index {width}-d")


def mmr(relevance: np.ndarray, vectors: np.ndarray, k: int, lam: float) -> np.ndarray:
    """Maximal marginal relevance: greedily pick ``k`` of the candidates.

    Each step takes ``argmax lam * rel - (1 - lam) * max_sim_to_picked``; ``relevance`` is
    min-max scaled to [0, 1] first so it is comparable with cosine similarity.
    Returns positions into the candidate arrays, in pick order.
    """
    n = len(relevance)
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    rel = np.asarray(relevance, dtype=np.float64)
    span = rel.max() - rel.min()
    rel = (rel - rel.min()) / span if span > 0 else np.ones_like(rel)
    sim = vectors @ vectors.T
    picked: list[int] = []
    max_sim = np.full(n, -np.inf)
    available = np.ones(n, dtype=bool)
    for _ in range(k):
        penalty = np.where(np.isfinite(max_sim), max_sim, 0.0)
        gain = lam * rel - (1 - lam) * penalty
        gain[~available] = -np.inf
        j = int(np.argmax(gain))
        picked.append(j)
        available[j] = False
        max_sim = np.maximum(max_sim, sim[j])
    return np.array(picked, dtype=np.int64)


def exploration_pool(index: ItemIndex, shown: pd.Series, max_shown: int | None) -> np.ndarray:
    """Rows of new or rarely shown items: never shown, or shown at most ``max_shown`` times.

    With ``max_shown=None`` the threshold is the 10th percentile of exposure counts among
    catalog items (items never shown count as 0).
    """
    if len(index) == 0:
        return np.empty(0, dtype=np.int64)
    counts = shown.reindex(index.item_ids).fillna(0).to_numpy(dtype=np.int64)
    limit = int(np.percentile(counts, 10)) if max_shown is None else max_shown
    return np.flatnonzero(counts <= limit).astype(np.int64)
