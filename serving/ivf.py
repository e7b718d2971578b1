"""Retrieval by the user vector at catalog scale: an inverted file (IVF) over the item-tower vectors.

Why not the HNSW graph (:mod:`serving.ann`): a graph is built from item-to-item neighbourhoods and a
search walks it from an entry point, which works for queries that lie among the items (search's query
text vectors against the item texts'). The user tower's vectors do not: every item vector sits in a narrow
cone (cosine ~0.9 to the mean on the served 1M-item model) and every user vector points away from it (its
best item at cosine ~0). A walk from such a query does not reach its nearest items. On the served 1M model,
the graph's answers kept 9 % of the exact top-10 that ``/recommend`` serves (overlap@10 0.09 at ef 256). The model's own mean
probability over that top-10 was 0.14 against 0.36 for the exact list (``benchmarks/bench_ann.py --served``;
benchmarks/RESULTS.md).

An inverted file bounds **every list exactly** against the query, whatever its direction, then scans the
``probes`` most promising lists exhaustively:

* **lists**: spherical k-means over a seeded sample of the (L2-normalised) item vectors (``SAMPLE_PER_LIST``
  items per list, ``ITERATIONS`` rounds); every item goes to its nearest centroid. Default ``2 x sqrt(n)``
  lists (2,000 at 1M items).
* **storage**: the item vectors copied in list order (float32, one contiguous block per list), so a probe is
  one slice and one matrix-vector product: at 1M x 128, 512 MB, about what the graph it replaces took
  (504 MB) with no build walk (seconds, not minutes).
* **search**: ``probes`` lists, half of them those with the highest **upper bound** on a member's cosine
  with the query, ``centroid · q + radius`` (``radius``: the list's largest distance from its centroid; for
  a unit query ``q · v = q · c + q · (v - c) <= q · c + |v - c|``), the rest those whose centroid scores
  highest; their items' exact cosines; exclusions dropped; the best ``n``, ordered like the exact path
  (similarity descending, ties: lower row first). Only *which* items come back is approximate, never their
  similarity or order. Why both: where a user's nearest items are outliers of their lists (the served 1M
  model) the bound finds them and the centroid does not (overlap with the exact path's served top-10 at 64
  probes: bound 0.97, centroid 0.47, both 0.87); where they sit near list centres (tight clumps of variants,
  ``tests/test_ivf_index.py``) a loose list's bound crowds them out (400 lists, 8 probes: bound 0.67,
  centroid 0.94, both 0.97). Probing every list is exact.
* **refresh** (catalog changed, same model): the previous centroids are kept and every item is re-assigned
  (one [n, d] x [d, lists] product), so a new item is retrievable at once. A new model trains new lists.

Deterministic: the sample and the initial centroids come from ``seed``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

SAMPLE_PER_LIST = 64
ITERATIONS = 12
ASSIGN_CHUNK = 65_536


@dataclass(frozen=True)
class IvfParams:
    lists: int = 0  # 0: 2 x sqrt(items)
    probes: int = 64
    seed: int = 0
    rank_by: str = "mixed"  # which lists to scan: "mixed" (default), "bound" or "centroid" (see IvfIndex._lists)

    def __post_init__(self):
        if self.rank_by not in ("mixed", "bound", "centroid"):
            raise ValueError(f"rank_by must be mixed, bound or centroid, got {self.rank_by!r}")

    @classmethod
    def from_settings(cls, settings) -> IvfParams:
        s = getattr(settings, "serving", None)
        d = cls()
        return cls(lists=int(getattr(s, "ivf_lists", d.lists)), probes=int(getattr(s, "ivf_probes", d.probes)))

    def n_lists(self, n_items: int) -> int:
        want = self.lists if self.lists > 0 else round(2 * math.sqrt(max(n_items, 1)))
        return max(1, min(int(want), int(n_items)))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _assign(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid (highest cosine) of each row, in chunks (no [n, lists] matrix at once)."""
    out = np.empty(len(vectors), dtype=np.int64)
    ct = np.ascontiguousarray(centroids.T)
    for s in range(0, len(vectors), ASSIGN_CHUNK):
        out[s: s + ASSIGN_CHUNK] = np.argmax(vectors[s: s + ASSIGN_CHUNK] @ ct, axis=1)
    return out


def train_centroids(vectors: np.ndarray, n_lists: int, seed: int = 0) -> np.ndarray:
    """Spherical k-means on a seeded sample of ``vectors`` (unit rows): [n_lists, d] unit centroids."""
    rng = np.random.default_rng(seed)
    n = len(vectors)
    sample = vectors[np.sort(rng.choice(n, size=min(n, SAMPLE_PER_LIST * n_lists), replace=False))]
    cent = sample[rng.choice(len(sample), size=n_lists, replace=False)].copy()
    for _ in range(ITERATIONS):
        lab = _assign(sample, cent)
        sums = np.zeros_like(cent)
        np.add.at(sums, lab, sample)
        empty = np.bincount(lab, minlength=n_lists) == 0
        if empty.any():  # an empty list restarts at a random sample item
            sums[empty] = sample[rng.choice(len(sample), size=int(empty.sum()), replace=False)]
        cent = _unit(sums).astype(np.float32)
    return np.ascontiguousarray(cent, dtype=np.float32)


@dataclass(eq=False)
class IvfIndex:
    centroids: np.ndarray  # float32 [lists, d], unit rows
    order: np.ndarray  # int64 [n]: catalog row of each stored vector, in list order
    starts: np.ndarray  # int64 [lists + 1]: list j is stored[starts[j]:starts[j+1]]
    radius: np.ndarray  # float32 [lists]: the largest distance of a member from its centroid (0: empty)
    stored: np.ndarray = field(repr=False)  # float32 [n, d]: the item vectors in list order
    params: IvfParams = field(default_factory=IvfParams)
    how: str = "built"  # built | reassigned
    build_seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.order)

    @property
    def n_lists(self) -> int:
        return len(self.centroids)

    @property
    def memory_bytes(self) -> int:
        return int(self.stored.nbytes + self.centroids.nbytes + self.order.nbytes + self.starts.nbytes
                   + self.radius.nbytes)

    @classmethod
    def build(cls, vectors: np.ndarray, params: IvfParams | None = None,
              centroids: np.ndarray | None = None) -> IvfIndex:
        """Lists over ``vectors`` (float32 [n, d], unit rows: the catalog's item vectors in row order).
        ``centroids``: keep these lists (a refresh of the same model's catalog) instead of training new ones."""
        params = params or IvfParams()
        t0 = time.perf_counter()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"an inverted file needs a non-empty [n, d] array, got shape {vectors.shape}")
        how = "built"
        if centroids is not None and centroids.ndim == 2 and centroids.shape[1] == vectors.shape[1]:
            how = "reassigned"
        else:
            centroids = train_centroids(vectors, params.n_lists(len(vectors)), params.seed)
        lab = _assign(vectors, centroids)
        order = np.argsort(lab, kind="stable")
        starts = np.searchsorted(lab[order], np.arange(len(centroids) + 1)).astype(np.int64)
        stored = np.ascontiguousarray(vectors[order])
        radius = np.zeros(len(centroids), dtype=np.float32)
        for s in range(0, len(stored), ASSIGN_CHUNK):
            part = lab[order[s: s + ASSIGN_CHUNK]]
            np.maximum.at(radius, part, np.linalg.norm(stored[s: s + ASSIGN_CHUNK] - centroids[part], axis=1))
        return cls(centroids=centroids, order=order.astype(np.int64), starts=starts, radius=radius,
                   stored=stored, params=params, how=how, build_seconds=time.perf_counter() - t0)

    def search(self, query: np.ndarray, n: int, exclude: np.ndarray | None = None,
               probes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Catalog rows and exact cosines of (about) the ``n`` items nearest to ``query``, best first (ties:
        lower row first); rows in ``exclude`` never come back. ``probes``: lists scanned (default the params')."""
        n = min(int(n), len(self))
        if n <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        p = max(1, min(int(probes if probes is not None else self.params.probes), self.n_lists))
        lists = self._lists(q, p)
        spans = [(int(self.starts[j]), int(self.starts[j + 1])) for j in lists]
        spans = [(a, b) for a, b in spans if b > a]  # one slice and one product per list: no gathered copy
        if not spans:  # only empty lists chosen (possible after a refresh re-assigned the items)
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        sims = np.concatenate([self.stored[a:b] @ q for a, b in spans])
        rows = np.concatenate([self.order[a:b] for a, b in spans])
        if exclude is not None and len(exclude):
            keep = ~np.isin(rows, np.asarray(exclude, dtype=np.int64))
            rows, sims = rows[keep], sims[keep]
        if len(rows) > n:
            part = np.argpartition(-sims, n - 1)[:n]
            kth = sims[part].min()
            part = np.flatnonzero(sims >= kth)  # ties at the boundary: all of them, then the lowest rows
            rows, sims = rows[part], sims[part]
        o = np.lexsort((rows, -sims))[:n]
        return rows[o], sims[o]

    def _lists(self, q: np.ndarray, p: int) -> np.ndarray:
        """The ``p`` lists to scan, ascending: half by the upper bound (``centroid · q + radius``: no member
        of list j has a higher cosine than that), the rest by the centroid's cosine alone."""
        if p >= self.n_lists:
            return np.arange(self.n_lists)
        cos = self.centroids @ q
        mode = self.params.rank_by
        if mode == "centroid":
            return np.sort(np.argpartition(-cos, p - 1)[:p])
        bound = cos + self.radius
        if mode == "bound":
            return np.sort(np.argpartition(-bound, p - 1)[:p])
        by_bound = np.argsort(-bound, kind="stable")[: (p + 1) // 2]
        by_cos = np.argsort(-cos, kind="stable")
        rest = by_cos[~np.isin(by_cos, by_bound)][: p - len(by_bound)]
        return np.sort(np.concatenate([by_bound, rest]))
