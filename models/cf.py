"""Collaborative and population-prior features for the ranker (:mod:`models.ranker`).

Three kinds of signal the towers' linear head does not have, each computable both
point-in-time over a history (training, offline scoring) and "as of now" from
:class:`models.features.ServingStats` (the serving fast path), with equal results:

* ``cat_like_rate`` / ``cat_log_count`` - the **population** like-rate of the candidate's
  category (all users), smoothed towards the prior, as log-odds, and its log event count.
  Point-in-time exactly like the wide features: a row at t sees events older than t - lag.
* ``text_prior`` - a linear text -> like-rate head: ridge regression from the item's encoder
  vector to its smoothed like-rate log-odds, fitted on the items of the fit part (weighted by
  their event counts). It says "how much do people like items *like this*", so a new item
  (no events) still carries a population prior; a new user meeting a new item has it too.
* ``cf_rate`` / ``cf_log_support`` - item-item collaborative filtering on explicit feedback:
  over the user's last ``history_len`` positives p (point-in-time, with the lag: the same
  history the user tower reads) and the candidate c, ``K[p, c]`` = users of the fit part who
  liked p and liked c, ``N[p, c]`` = users who liked p and had any event on c;
  ``cf_rate`` = log-odds of (sum K + s * prior) / (sum N + s), ``cf_log_support`` = log1p(sum N).
  "People who liked what you liked, how did they find this item?" - with the fit part's
  counts frozen, so the rows the ranker is fitted on (a later part) never see their own label.
* ``knn_resid`` / ``knn_log_weight`` - item-kNN with baselines over the user's last
  ``KNN_HISTORY`` events of **any** label (point-in-time, with the lag): item-item cosine
  similarity of "who had an event on it" in the fit part, shrunk by support
  (``c / (c + KNN_SHRINK)``), the ``KNN_NEIGHBOURS`` most similar items per item kept;
  ``knn_resid`` = sum s(c, j) * (label_j - fit-part like-rate of j) / (sum |s| + 1): "on items
  like this one, did you like more or less than people in general?"; ``knn_log_weight`` =
  log1p(sum |s|). Measured on MovieLens-100k (benchmarks/RESULTS.md): the strongest
  collaborative signal the ranker has.
* ``user_resid`` - the same residuals unweighted: sum (label_j - fit-part like-rate of j) /
  (events + ``SMOOTHING``) over those last events: the user's leniency on the items they chose
  (a raw like-rate mixes leniency with the choice of items). Measured on MovieLens-100k: +0.001 AUC
  at lag 0, +0.003 at the default lag (benchmarks/RESULTS.md); an item-side twin (the item's labels
  minus its raters' like-rates) lost 0.001-0.002 and was not kept.
* ``text_resid`` - the same residuals weighted by **text** similarity (the encoder's item vectors):
  sum w_j * (label_j - like-rate of j) / (sum |w| + ``TEXT_RESID_SHRINK``), w_j = cos(c, j) minus the
  mean cosine of the candidate to the user's last events: "did you like items whose text is more like
  this one's more than people in general?" Content-based taste, so it works where co-occurrence has
  no support (a new item, a rarely seen one); centring makes it a contrast, not a second
  ``user_resid``. Items of the history outside the fit part count at the prior.
* ``rknn_resid`` - ``knn_resid`` with a **taste** similarity instead of co-occurrence: the cosine of two
  items' residual columns (label - the item's fit-part like-rate, per user; signed), shrunk by co-users
  (``c / (c + KNN_SHRINK)``), the ``KNN_NEIGHBOURS`` largest by magnitude per item (item-kNN with baseline-
  centred similarity). Co-occurrence says "the same people had both"; this says "people who liked one more
  than people in general liked the other more (or less)", so a negative neighbour counts too. Measured on
  MovieLens-100k: +0.0016 AUC at lag 0, +0.0013 at the default lag (benchmarks/RESULTS.md).
* ``stats_logit`` - a standardised logistic regression on the wide point-in-time statistics
  (``WIDE_COLUMNS``), fitted on the fit part's rows: it carries what the whole (larger) fit part
  says about the statistics into the ranker, which only sees the later, out-of-sample part.

The fitted parts (:class:`CollabModel`) are the co-occurrence counts (sorted composite keys
``p * n + c``, looked up with ``np.searchsorted``: no Python loop per row) and the text head;
they are saved as safetensors + JSON (never pickle).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.features import (
    SMOOTHING,
    UNKNOWN_CATEGORY,
    ServingStats,
    _codes,
    _counts_before,
    _rate,
    _times_ns,
    lag_ns,
)

KNN_NEIGHBOURS = 50  # most similar items kept per item
KNN_SHRINK = 20.0  # support shrinkage of the cosine: s * c / (c + shrink), c = users who had both

CF_COLUMNS: tuple[str, ...] = ("cat_like_rate", "cat_log_count", "text_prior", "cf_rate", "cf_log_support",
                               "stats_logit", "knn_resid", "knn_log_weight", "user_resid", "text_resid",
                               "rknn_resid")
CF_BLOCK_ROWS = 20_000  # rows scored at a time: [rows, KNN_HISTORY] temporaries stay ~0.2 GB at 200 events
TEXT_RESID_SHRINK = 0.1  # added to sum |w| of text_resid (w: centred cosines, typically ~0.1 each)
TEXT_SIM_ROWS = 64  # rows per block in text_similarity: [rows, H, d] gathered vectors stay in cache (4096: 5x slower)
MAX_PAIRS = 30_000_000  # co-occurrence pairs kept at most (the ones with the most support)
BLOCK_CELLS = 4_000_000  # item x item cells per block of the co-occurrence products (memory bound)
# a kNN block filled above this share is ranked as a dense array (a row-wise sort; faster than sorting its
# triplets, same neighbours in the same order)
KNN_DENSE_SHARE = 0.25


def category_counts(rows: pd.DataFrame, history: pd.DataFrame, catalog: pd.DataFrame, lag=None):
    """(events, positives) of each row's item category over **all users**, from ``history`` events
    older than the row's time - ``lag`` (rows without a timestamp: every event with a time).

    Categories as in :func:`models.features.point_in_time_features`: the catalog's (last row wins,
    missing -> ``<none>``), items not in the catalog -> ``<unknown>``.
    """
    rows = rows.reset_index(drop=True)
    n = len(rows)
    if n == 0 or len(history) == 0:
        return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    history = history.reset_index(drop=True)
    row_t = _times_ns(rows["timestamp"] if "timestamp" in rows.columns else None, n)
    lag = lag_ns(lag)
    seen_t = np.where(row_t == np.iinfo(np.int64).max, row_t, row_t - lag) if lag else row_t
    hist_t = _times_ns(history["timestamp"], len(history))
    labels = history["label"].to_numpy(dtype=np.int64, na_value=0)
    uniq, inv = np.unique(np.concatenate([hist_t, seen_t]), return_inverse=True)
    hist_r, row_r = inv[: len(hist_t)].astype(np.int64), inv[len(hist_t):].astype(np.int64)
    base = np.int64(len(uniq) + 1)
    cat_map = pd.Series(catalog["category"].astype("string").fillna("<none>").to_numpy()
                        if "category" in catalog.columns else np.full(len(catalog), "<none>", dtype=object),
                        index=catalog["item_id"].astype("string").to_numpy())
    cat_map = cat_map[~cat_map.index.duplicated(keep="last")]
    row_cat = rows["item_id"].astype("string").map(cat_map).fillna(UNKNOWN_CATEGORY)
    hist_cat = history["item_id"].astype("string").map(cat_map).fillna(UNKNOWN_CATEGORY)
    row_c, hist_c = _codes(row_cat, hist_cat)
    c_n, c_pos, _, _ = _counts_before(hist_c, hist_r, labels, row_c, row_r, base)
    return c_n.astype(np.int64), c_pos.astype(np.int64)


def serving_category_counts(stats: ServingStats) -> tuple[np.ndarray, np.ndarray]:
    """(events, positives) per category code of ``stats`` (every user): index with ``stats.item_cat``."""
    k = len(stats.categories)
    if stats.n_items == 0:
        return np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64)
    n = np.bincount(stats.item_cat, weights=stats.item_n, minlength=k).round().astype(np.int64)
    pos = np.bincount(stats.item_cat, weights=stats.item_n_pos, minlength=k).round().astype(np.int64)
    return n, pos


def _logit(p):
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


@dataclass(eq=False)
class CollabModel:
    """Fitted item-item co-occurrence counts + the text -> like-rate head (see the module doc)."""

    item_ids: list  # the fit part's items: row / column index of the counts
    keys: np.ndarray  # int64 sorted p * n_items + c
    k: np.ndarray  # float32 co-likes
    n: np.ndarray  # float32 co-events
    text_w: np.ndarray  # float32 [d] text head weights
    text_b: float
    prior: float
    wide_mean: np.ndarray | None = None  # float64 [n_wide]: the statistics head (None: 0)
    wide_scale: np.ndarray | None = None
    wide_coef: np.ndarray | None = None
    wide_b: float = 0.0
    sim_keys: np.ndarray | None = None  # int64 sorted p * n_items + c: the kept kNN neighbour pairs
    sim: np.ndarray | None = None  # float32 their shrunk cosine similarity
    item_rate: np.ndarray | None = None  # float32 [n_items] smoothed like-rate of each fit item (the kNN baseline)
    rsim_keys: np.ndarray | None = None  # int64 sorted p * n_items + c: the kept taste-similarity neighbour pairs
    rsim: np.ndarray | None = None  # float32 their signed, shrunk residual cosine

    def __post_init__(self):
        self.item_pos = {str(x): j for j, x in enumerate(self.item_ids)}

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    # ---------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, events: pd.DataFrame, text_vectors, prior: float, wide: np.ndarray | None = None,
            max_pairs: int = MAX_PAIRS) -> CollabModel:
        """Counts, text head and statistics head from ``events`` (the fit part: every event counts).

        ``text_vectors(item_ids) -> np.ndarray [n, d]``: the encoder vectors of items (for the text head);
        ``wide``: the point-in-time ``WIDE_COLUMNS`` of ``events``' rows, in their order (statistics head).
        """
        from scipy import sparse

        prior = float(np.clip(prior, 0.01, 0.99))
        users = events["user_id"].astype(str).to_numpy(dtype=object)
        items = events["item_id"].astype(str).to_numpy(dtype=object)
        labels = events["label"].to_numpy(dtype=np.int64)
        u_code, _u = pd.factorize(pd.Series(users, dtype=object), sort=True)
        i_code, item_ids = pd.factorize(pd.Series(items, dtype=object), sort=True)
        item_ids = [str(x) for x in item_ids]
        nu, ni = len(_u), len(item_ids)
        # one cell per (user, item): "had an event" and "liked it at least once"
        a = sparse.csr_matrix((np.ones(len(u_code)), (u_code, i_code)), shape=(nu, ni))
        a.data[:] = 1.0
        liked = sparse.csr_matrix((labels.astype(np.float64), (u_code, i_code)), shape=(nu, ni))
        liked.data = (liked.data > 0).astype(np.float64)
        liked.eliminate_zeros()
        keys, nn, kk = _pair_counts(liked, a, max_pairs)
        # text head: ridge from the item's text vector to its smoothed like-rate log-odds
        cnt = np.bincount(i_code, minlength=ni).astype(np.float64)
        pos = np.bincount(i_code, weights=labels, minlength=ni)
        y = _logit((pos + SMOOTHING * prior) / (cnt + SMOOTHING))
        vecs = np.asarray(text_vectors(item_ids), dtype=np.float64)
        w, b = _ridge(vecs, y, cnt / (cnt + SMOOTHING), _logit(prior))
        head = _logistic(wide, labels) if wide is not None else (None, None, None, 0.0)
        sim_keys, sim = _knn_similarity(a, KNN_NEIGHBOURS, KNN_SHRINK)
        item_rate = ((pos + SMOOTHING * prior) / (cnt + SMOOTHING)).astype(np.float32)
        # one cell per (user, item): the summed residual of its events (one event per cell, nearly always)
        resid = sparse.csr_matrix((labels - item_rate[i_code].astype(np.float64), (u_code, i_code)), shape=(nu, ni))
        rsim_keys, rsim = _knn_similarity(a, KNN_NEIGHBOURS, KNN_SHRINK, values=resid)
        return cls(item_ids, keys, kk, nn, w.astype(np.float32), float(b),
                   prior, *head, sim_keys=sim_keys, sim=sim, item_rate=item_rate, rsim_keys=rsim_keys, rsim=rsim)

    # ---------------------------------------------------------------- features
    def index_of(self, item_ids) -> np.ndarray:
        """Count index per item id (-1: not in the fit part)."""
        get = self.item_pos.get
        return np.fromiter((get(str(i), -1) for i in item_ids), dtype=np.int64, count=len(item_ids))

    def text_prior(self, text_vecs: np.ndarray) -> np.ndarray:
        """The text head's like-rate log-odds per vector (row by row: the same value whatever the batch)."""
        v = np.asarray(text_vecs, dtype=np.float64).reshape(-1, len(self.text_w))
        return ((v * self.text_w.astype(np.float64)).sum(axis=1) + self.text_b).astype(np.float32)

    def pair_counts(self, hist: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sum K, sum N) of each row's history items ``hist`` [n, H] (count indices, -1 = none) x ``cand`` [n]."""
        hist = np.asarray(hist, dtype=np.int64).reshape(len(cand), -1)
        cand = np.asarray(cand, dtype=np.int64)
        valid = (hist >= 0) & (cand >= 0)[:, None] & (hist != cand[:, None])
        if not len(self.keys) or not valid.any():
            return np.zeros(len(cand)), np.zeros(len(cand))
        q = hist * np.int64(self.n_items) + cand[:, None]
        idx = np.clip(np.searchsorted(self.keys, q), 0, len(self.keys) - 1)
        hit = valid & (self.keys[idx] == q)
        k = np.where(hit, self.k[idx], 0.0).sum(axis=1, dtype=np.float64)
        n = np.where(hit, self.n[idx], 0.0).sum(axis=1, dtype=np.float64)
        return k, n

    def knn(self, recent: np.ndarray, labels: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(knn_resid, knn_log_weight) of each row's last events ``recent`` [n, H] (count indices, -1 = none)
        with ``labels`` [n, H] x candidate ``cand`` [n] (count indices)."""
        return self._kernel_resid(self.sim_keys, self.sim, recent, labels, cand)

    def rknn(self, recent: np.ndarray, labels: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """``rknn_resid``: :meth:`knn`'s residual average with the taste similarities (``rsim``)."""
        return self._kernel_resid(self.rsim_keys, self.rsim, recent, labels, cand)[0]

    def _kernel_resid(self, sim_keys, sim, recent, labels, cand) -> tuple[np.ndarray, np.ndarray]:
        """sum s(c, j) * (label_j - like-rate of j) / (sum |s| + 1) and log1p(sum |s|) over each row's last
        events, s looked up in the sorted neighbour pairs ``sim_keys`` / ``sim``."""
        cand = np.asarray(cand, dtype=np.int64)
        recent = np.asarray(recent, dtype=np.int64).reshape(len(cand), -1)
        labels = np.asarray(labels, dtype=np.float64).reshape(len(cand), -1)
        valid = (recent >= 0) & (cand >= 0)[:, None] & (recent != cand[:, None])
        if sim_keys is None or not len(sim_keys) or not valid.any():
            return np.zeros(len(cand)), np.zeros(len(cand))
        q = recent * np.int64(self.n_items) + cand[:, None]
        idx = np.clip(np.searchsorted(sim_keys, q), 0, len(sim_keys) - 1)
        hit = valid & (sim_keys[idx] == q)
        w = np.where(hit, sim[idx], 0.0).astype(np.float64)
        resid = labels - self.item_rate[np.maximum(recent, 0)]
        weight = np.abs(w).sum(axis=1)
        return (w * resid).sum(axis=1) / (weight + 1.0), np.log1p(weight)

    def user_resid(self, recent: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Each row's user's leniency over their last events ``recent`` [n, H] (count indices, -1 = none):
        sum (label_j - fit-part like-rate of j) / (events + ``SMOOTHING``) - "does this user like more or less
        than people in general, on the items they chose?" (a raw like-rate mixes the two)."""
        recent = np.asarray(recent, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.float64).reshape(recent.shape)
        valid = recent >= 0
        if self.item_rate is None or not valid.any():
            return np.zeros(len(recent))
        resid = np.where(valid, labels - self.item_rate[np.maximum(recent, 0)], 0.0)
        return resid.sum(axis=1) / (valid.sum(axis=1) + SMOOTHING)

    def text_resid(self, sim: np.ndarray, recent: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``text_resid`` per row: ``sim`` [n, H] cosines of the candidate's text to the user's last events
        (NaN: no event; :func:`text_similarity`), ``recent`` their count indices (-1: outside the fit part:
        like-rate = the prior), ``labels`` their labels."""
        sim = np.asarray(sim, dtype=np.float64)
        valid = ~np.isnan(sim)
        if self.item_rate is None or not valid.any():
            return np.zeros(len(sim))
        recent = np.asarray(recent, dtype=np.int64).reshape(sim.shape)
        rate = np.where(recent >= 0, self.item_rate[np.maximum(recent, 0)], self.prior)
        resid = np.where(valid, np.asarray(labels, dtype=np.float64).reshape(sim.shape) - rate, 0.0)
        s = np.where(valid, sim, 0.0)
        mean = s.sum(axis=1, keepdims=True) / np.maximum(valid.sum(axis=1, keepdims=True), 1)
        w = np.where(valid, s - mean, 0.0)
        return (w * resid).sum(axis=1) / (np.abs(w).sum(axis=1) + TEXT_RESID_SHRINK)

    def stats_logit(self, wide: np.ndarray) -> np.ndarray:
        """The statistics head's log-odds per row of ``WIDE_COLUMNS`` (row by row, batch-independent)."""
        wide = np.asarray(wide, dtype=np.float64)
        if self.wide_coef is None:
            return np.zeros(len(wide))
        return (((wide - self.wide_mean) / self.wide_scale) * self.wide_coef).sum(axis=1) + self.wide_b

    def features(self, hist: np.ndarray, cand: np.ndarray, cat_n: np.ndarray, cat_pos: np.ndarray,
                 text_prior: np.ndarray, prior: float, wide: np.ndarray, recent: np.ndarray | None = None,
                 recent_labels: np.ndarray | None = None, text_sim: np.ndarray | None = None) -> np.ndarray:
        """``CF_COLUMNS`` [n, len(CF_COLUMNS)] float32. ``hist``/``cand``: count indices (:meth:`index_of`);
        ``cat_n``/``cat_pos``: population counts of the row's category; ``text_prior``: :meth:`text_prior`
        of the candidate; ``prior``: the model's prior; ``wide``: the rows' ``WIDE_COLUMNS``;
        ``recent`` / ``recent_labels``: the user's last events (count indices) and labels (:meth:`knn`);
        ``text_sim``: the candidate's text cosines to those events (:func:`text_similarity`; None: zeros)."""
        prior = float(np.clip(prior, 0.01, 0.99))
        k, n = self.pair_counts(hist, cand)
        if recent is None:
            kr, kw, ur, rr = np.zeros(len(k)), np.zeros(len(k)), np.zeros(len(k)), np.zeros(len(k))
        else:
            kr, kw = self.knn(recent, recent_labels, cand)
            rr = self.rknn(recent, recent_labels, cand)
            ur = self.user_resid(np.asarray(recent).reshape(len(k), -1), recent_labels)
        tr = np.zeros(len(k)) if recent is None or text_sim is None else \
            self.text_resid(text_sim, np.asarray(recent).reshape(len(k), -1), recent_labels)
        return np.stack([
            _rate(np.asarray(cat_pos), np.asarray(cat_n), prior), np.log1p(np.asarray(cat_n, dtype=np.float64)),
            np.asarray(text_prior, dtype=np.float64), _rate(k, n, prior), np.log1p(n), self.stats_logit(wide),
            kr, kw, ur, tr, rr,
        ], axis=1).astype(np.float32)

    # ---------------------------------------------------------------- persistence (no pickle)
    def save(self, directory: str | Path, prefix: str = "collab") -> None:
        import torch
        from safetensors.torch import save_file

        d = Path(directory)
        tensors = {"keys": torch.as_tensor(self.keys), "k": torch.as_tensor(self.k), "n": torch.as_tensor(self.n),
                   "text_w": torch.as_tensor(self.text_w)}
        if self.sim_keys is not None:
            tensors.update({"sim_keys": torch.as_tensor(self.sim_keys), "sim": torch.as_tensor(self.sim),
                            "item_rate": torch.as_tensor(self.item_rate)})
        if self.rsim_keys is not None:
            tensors.update({"rsim_keys": torch.as_tensor(self.rsim_keys), "rsim": torch.as_tensor(self.rsim)})
        if self.wide_coef is not None:
            tensors.update({f"wide_{k}": torch.as_tensor(np.asarray(getattr(self, f"wide_{k}"), dtype=np.float64))
                            for k in ("mean", "scale", "coef")})
        save_file(tensors, str(d / f"{prefix}.safetensors"))
        (d / f"{prefix}.json").write_text(json.dumps({"item_ids": list(self.item_ids), "text_b": self.text_b,
                                                      "prior": self.prior, "wide_b": self.wide_b}),
                                          encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path, prefix: str = "collab") -> CollabModel:
        from safetensors.numpy import load_file

        d = Path(directory)
        t = load_file(str(d / f"{prefix}.safetensors"))
        meta = json.loads((d / f"{prefix}.json").read_text(encoding="utf-8"))
        return cls(meta["item_ids"], t["keys"], t["k"], t["n"], t["text_w"], float(meta["text_b"]),
                   float(meta["prior"]), t.get("wide_mean"), t.get("wide_scale"), t.get("wide_coef"),
                   float(meta.get("wide_b", 0.0)), t.get("sim_keys"), t.get("sim"), t.get("item_rate"),
                   t.get("rsim_keys"), t.get("rsim"))  # a model saved before rknn_resid: None (the feature is 0)


def text_similarity(vecs: np.ndarray, cand: np.ndarray, recent: np.ndarray,
                    rows: int = TEXT_SIM_ROWS) -> np.ndarray:
    """Cosine [n, H] float32 between ``vecs[cand[i]]`` and ``vecs[recent[i, h]]`` (``vecs`` [m, d] text
    vectors; ``recent`` [n, H] indices into them, -1: no event -> NaN), in blocks of ``rows`` rows. The
    table is read, never copied (a catalog's vectors can be GBs): only its row norms are computed."""
    v = np.asarray(vecs, dtype=np.float32)
    norm = np.maximum(np.sqrt(np.einsum("ij,ij->i", v, v)), 1e-12)
    cand = np.asarray(cand, dtype=np.int64)
    recent = np.asarray(recent, dtype=np.int64).reshape(len(cand), -1)
    out = np.full(recent.shape, np.nan, dtype=np.float32)
    for a in range(0, len(cand), rows):
        c, r = cand[a:a + rows], np.maximum(recent[a:a + rows], 0)
        sim = np.einsum("nd,nhd->nh", v[c], v[r]) / (norm[c][:, None] * norm[r])
        out[a:a + rows] = np.where(recent[a:a + rows] >= 0, sim, np.nan)
    return out


def unit_rows(vecs: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32; a zero row stays zero)."""
    v = np.asarray(vecs, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _item_blocks(n_items: int):
    """Row blocks of an item x item product, each at most ``BLOCK_CELLS`` cells when dense: the co-occurrence
    counts are built block by block, so their peak memory is bounded by the block, not by the catalog
    squared (a 20,000-item catalog: 200 items a block)."""
    step = max(1, BLOCK_CELLS // max(n_items, 1))
    for start in range(0, n_items, step):
        yield start, min(n_items, start + step)


def _top_pairs(keys: np.ndarray, support: np.ndarray, limit: int) -> np.ndarray:
    """Positions of the ``limit`` best-supported pairs (ties: the smaller key), in key order."""
    if len(keys) <= limit:
        return np.arange(len(keys))
    return np.sort(np.lexsort((keys, -support))[:limit])


def _pair_counts(liked, had, max_pairs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted keys p * n_items + c, float32 N, float32 K) of the off-diagonal pairs with N > 0, where
    N[p, c] = users who liked p and had an event on c, K[p, c] = users who liked both; at most
    ``max_pairs`` pairs (the best-supported), computed in item blocks (:func:`_item_blocks`)."""
    ni = had.shape[1]
    liked_cols = liked.tocsc()
    keys, nn, kk = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32), np.empty(0, dtype=np.float32)
    for b0, b1 in _item_blocks(ni):
        rows = liked_cols[:, b0:b1].T.tocsr()
        n_blk = (rows @ had).tocoo()
        k_blk = (rows @ liked).tocoo()
        bk = (n_blk.row.astype(np.int64) + b0) * ni + n_blk.col.astype(np.int64)
        bn = n_blk.data.astype(np.float32)
        off = (n_blk.row.astype(np.int64) + b0) != n_blk.col
        bk, bn = bk[off], bn[off]
        order = np.argsort(bk, kind="stable")
        bk, bn = bk[order], bn[order]
        bkk = np.zeros(len(bk), dtype=np.float32)
        k_keys = (k_blk.row.astype(np.int64) + b0) * ni + k_blk.col.astype(np.int64)
        if len(k_keys) and len(bk):  # K's cells are a subset of N's (liked implies had an event)
            idx = np.clip(np.searchsorted(bk, k_keys), 0, len(bk) - 1)
            hit = bk[idx] == k_keys
            np.add.at(bkk, idx[hit], k_blk.data[hit].astype(np.float32))
        del n_blk, k_blk, rows
        keys, nn, kk = np.concatenate([keys, bk]), np.concatenate([nn, bn]), np.concatenate([kk, bkk])
        if len(keys) > max_pairs:  # the best of (kept so far + this block) = the best of everything so far
            keep = _top_pairs(keys, nn, max_pairs)
            keys, nn, kk = keys[keep], nn[keep], kk[keep]
    return keys, nn, kk


def _knn_similarity(had, neighbours: int, shrink: float, values=None) -> tuple[np.ndarray, np.ndarray]:
    """Item-item cosine of the users x items 0/1 matrix ``had``, times c / (c + shrink) (c = co-users),
    the ``neighbours`` largest per item: (sorted keys p * n_items + c, float32 similarities). Computed in
    item blocks (:func:`_item_blocks`): each item's neighbours only depend on its own row of the product.

    ``values`` (users x items, non-zero only where ``had`` is: e.g. residuals): the cosine of its columns
    instead, signed, still shrunk by the co-users of ``had``; the ``neighbours`` largest in magnitude kept."""
    ni = had.shape[1]
    signed = values is not None
    if signed:
        vals = values.tocsr()
        d = np.sqrt(np.asarray(vals.multiply(vals).sum(axis=0)).reshape(-1).astype(np.float64))
        val_cols = vals.tocsc()
    else:
        d = np.sqrt(np.asarray(had.sum(axis=0)).reshape(-1).astype(np.float64))
    had_cols = had.tocsc()
    out_keys, out_sim = [], []
    for b0, b1 in _item_blocks(ni):
        co = had_cols[:, b0:b1].T.tocsr() @ had
        num = val_cols[:, b0:b1].T.tocsr() @ vals if signed else None
        if co.nnz > KNN_DENSE_SHARE * (b1 - b0) * ni:
            keys, sim = _knn_dense_block(co.toarray(), b0, d, neighbours, shrink,
                                         None if num is None else num.toarray())
            out_keys.append(keys)
            out_sim.append(sim)
            continue
        co = co.tocoo()
        r = co.row.astype(np.int64) + b0
        c, v = co.col.astype(np.int64), co.data.astype(np.float64)
        del co
        x = v if num is None else _values_at(num, b0, ni, r * ni + c)
        off = (r != c) & (x != 0)
        r, c, v, x = r[off], c[off], v[off], x[off]
        if not len(v):
            continue
        s = x / (d[r] * d[c]) * (v / (v + shrink))
        # per item: most similar first (ties by neighbour id: deterministic)
        order = np.lexsort((c, -np.abs(s) if signed else -s, r))
        r, c, s = r[order], c[order], s[order]
        first = np.searchsorted(r, r, side="left")
        keep = (np.arange(len(r)) - first) < neighbours
        out_keys.append(r[keep] * ni + c[keep])
        out_sim.append(s[keep].astype(np.float32))
    if not out_keys:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    keys, sim = np.concatenate(out_keys), np.concatenate(out_sim)
    o = np.argsort(keys, kind="stable")
    return keys[o], sim[o]


def _values_at(m, b0: int, ni: int, keys: np.ndarray) -> np.ndarray:
    """The entries of the sparse block product ``m`` (rows from item ``b0``) at composite keys
    ``row * ni + col`` (0 where ``m`` has none)."""
    m = m.tocoo()
    mk = (m.row.astype(np.int64) + b0) * ni + m.col.astype(np.int64)
    order = np.argsort(mk, kind="stable")
    mk, mv = mk[order], m.data.astype(np.float64)[order]
    if not len(mk):
        return np.zeros(len(keys))
    idx = np.clip(np.searchsorted(mk, keys), 0, len(mk) - 1)
    return np.where(mk[idx] == keys, mv[idx], 0.0)


def _knn_dense_block(v: np.ndarray, b0: int, d: np.ndarray, neighbours: int, shrink: float,
                     num: np.ndarray | None = None):
    """:func:`_knn_similarity` of one block of rows ``b0..`` given as a dense co-user count array (and, signed,
    the dense ``values`` product ``num``): the same similarities (same arithmetic), the same neighbours in the
    same order (most similar first, ties by neighbour id: a stable sort of each row) - as (keys,
    similarities) in key order."""
    n_rows, ni = v.shape
    rows = np.arange(b0, b0 + n_rows)
    x = v if num is None else num
    with np.errstate(divide="ignore", invalid="ignore"):
        s = x / (d[rows][:, None] * d[None, :]) * (v / (v + shrink))
    s[(v <= 0) | (x == 0)] = np.nan  # no co-user (or a zero product): not a neighbour, as in the sparse path
    s[np.arange(n_rows), rows] = np.nan
    rank = np.where(np.isnan(s), -np.inf, s if num is None else np.abs(s))
    k = min(neighbours, ni)
    top = np.argsort(-rank, axis=1, kind="stable")[:, :k]
    top_s = np.take_along_axis(s, top, axis=1)
    keep = np.isfinite(top_s)
    r = np.broadcast_to(rows[:, None], top.shape)[keep]
    c = top[keep].astype(np.int64)
    sim = top_s[keep]
    order = np.argsort(r * ni + c, kind="stable")
    return (r * ni + c)[order], sim[order].astype(np.float32)


def _logistic(x: np.ndarray, y: np.ndarray):
    """(mean, scale, coef, intercept) of a standardised L2 logistic regression (as ``StatisticsBaseline``)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    mean = x.mean(axis=0)
    sd = x.std(axis=0)
    scale = np.where(sd > 1e-12, sd, 1.0)
    if len(np.unique(y)) < 2:
        return mean, scale, np.zeros(x.shape[1]), float(_logit(np.clip(y.mean() if len(y) else 0.5, 0.01, 0.99)))
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1.0, max_iter=1000).fit((x - mean) / scale, y)
    return mean, scale, lr.coef_.reshape(-1).astype(np.float64), float(lr.intercept_[0])


def _ridge(x: np.ndarray, y: np.ndarray, w: np.ndarray, default: float) -> tuple[np.ndarray, float]:
    """Weighted ridge (L2 chosen by generalised cross-validation); a constant when it cannot be fitted."""
    d = x.shape[1] if x.ndim == 2 else 0
    if len(y) < 5 or d == 0 or float(w.sum()) <= 0:
        return np.zeros(d), float(np.average(y, weights=w) if len(y) and w.sum() > 0 else default)
    from sklearn.linear_model import RidgeCV

    m = RidgeCV(alphas=np.logspace(-2, 3, 11)).fit(x, y, sample_weight=w)
    return np.asarray(m.coef_, dtype=np.float64).reshape(-1), float(m.intercept_)
