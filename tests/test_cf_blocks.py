"""models.cf builds its item x item counts in blocks (bounded memory): the result must not depend on the
block size or on where the pair cap falls - checked against a brute-force count on a small world."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models import cf


def _events(seed: int = 0, n: int = 4000) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"user_id": [f"u{x}" for x in rng.zipf(1.6, n) % 120],
                         "item_id": [f"i{x}" for x in rng.zipf(1.3, n) % 90],
                         "label": rng.integers(0, 2, n)})


def _brute_force(ev: pd.DataFrame, item_ids: list[str]) -> dict[tuple[int, int], tuple[int, int]]:
    """(N, K) per ordered item pair p != c, with a Python loop over users."""
    pos = {x: j for j, x in enumerate(item_ids)}
    had = ev.groupby("user_id")["item_id"].apply(lambda s: {pos[x] for x in s})
    liked = ev[ev["label"] > 0].groupby("user_id")["item_id"].apply(lambda s: {pos[x] for x in s})
    out: dict[tuple[int, int], list[int]] = {}
    for u, likes in liked.items():
        for p in likes:
            for c in had[u]:
                if c != p:
                    cell = out.setdefault((p, c), [0, 0])
                    cell[0] += 1
                    cell[1] += c in likes
    return {k: (v[0], v[1]) for k, v in out.items()}


@pytest.mark.parametrize("cells", [10**9, 90 * 7, 1])  # one block; 7 items a block; one item a block
def test_pair_counts_match_a_brute_force_count_whatever_the_block(monkeypatch, cells):
    ev = _events()
    monkeypatch.setattr(cf, "BLOCK_CELLS", cells)
    model = cf.CollabModel.fit(ev, lambda ids: np.zeros((len(ids), 2)), 0.5)
    truth = _brute_force(ev, model.item_ids)
    ni = model.n_items
    got = {(int(k) // ni, int(k) % ni): (int(n), int(kk)) for k, n, kk in zip(model.keys, model.n, model.k)}
    assert got == truth
    assert np.all(np.diff(model.keys) > 0)  # sorted, unique: the lookups use searchsorted


def test_the_pair_cap_keeps_the_best_supported_pairs_whatever_the_block(monkeypatch):
    ev = _events(seed=1)
    full = cf.CollabModel.fit(ev, lambda ids: np.zeros((len(ids), 2)), 0.5)
    limit = len(full.keys) // 3
    expected = np.sort(full.keys[np.lexsort((full.keys, -full.n))[:limit]])
    for cells in (10**9, 90 * 5, 1):
        monkeypatch.setattr(cf, "BLOCK_CELLS", cells)
        capped = cf.CollabModel.fit(ev, lambda ids: np.zeros((len(ids), 2)), 0.5, max_pairs=limit)
        np.testing.assert_array_equal(capped.keys, expected)


def test_knn_neighbours_do_not_depend_on_the_block(monkeypatch):
    ev = _events(seed=2)
    one = cf.CollabModel.fit(ev, lambda ids: np.zeros((len(ids), 2)), 0.5)
    monkeypatch.setattr(cf, "BLOCK_CELLS", 90 * 3)
    many = cf.CollabModel.fit(ev, lambda ids: np.zeros((len(ids), 2)), 0.5)
    np.testing.assert_array_equal(one.sim_keys, many.sim_keys)
    np.testing.assert_array_equal(one.sim, many.sim)
    assert len(one.sim_keys) > 0
    np.testing.assert_array_equal(one.rsim_keys, many.rsim_keys)  # the signed (taste) similarities too
    np.testing.assert_array_equal(one.rsim, many.rsim)
    assert (one.rsim < 0).any() and (one.rsim > 0).any()


@pytest.mark.parametrize("seed,n", [(2, 4000), (5, 4000), (3, 150)])
def test_knn_dense_and_sparse_ranking_agree_including_ties(monkeypatch, seed, n):
    """A block ranked as a dense array (a row-wise stable sort) keeps exactly the neighbours, order of ties
    and similarities of the sparse path: 90 items with 50 neighbours kept, so the cut falls inside full rows
    (4,000 events), and rows with fewer co-used items than that keep only those (150 events)."""
    ev = _events(seed=seed, n=n)
    monkeypatch.setattr(cf, "KNN_DENSE_SHARE", 2.0)  # never dense
    sparse = cf.CollabModel.fit(ev, lambda ids: np.zeros((len(ids), 2)), 0.5)
    monkeypatch.setattr(cf, "KNN_DENSE_SHARE", -1.0)  # always dense
    for cells in (10**9, 90 * 4):
        monkeypatch.setattr(cf, "BLOCK_CELLS", cells)
        dense = cf.CollabModel.fit(ev, lambda ids: np.zeros((len(ids), 2)), 0.5)
        np.testing.assert_array_equal(dense.sim_keys, sparse.sim_keys)
        np.testing.assert_array_equal(dense.sim, sparse.sim)
        np.testing.assert_array_equal(dense.rsim_keys, sparse.rsim_keys)
        np.testing.assert_array_equal(dense.rsim, sparse.rsim)
    ni = sparse.n_items
    per_item = np.bincount(sparse.sim_keys // ni, minlength=ni)
    assert per_item.max() == cf.KNN_NEIGHBOURS if n > 1000 else (per_item < cf.KNN_NEIGHBOURS).all()
    _, counts = np.unique(sparse.sim, return_counts=True)
    assert counts.max() > 1  # ties among similarities: their order matters


def test_taste_similarity_matches_a_dense_computation(monkeypatch):
    """``rsim``: the cosine of the items' residual columns (label - the item's fit-part like-rate, per user),
    times c / (c + shrink) with c the co-users - checked against a dense computation (every neighbour kept)."""
    ev = _events(seed=4, n=1500)
    monkeypatch.setattr(cf, "KNN_NEIGHBOURS", 10_000)
    monkeypatch.setattr(cf, "BLOCK_CELLS", 90 * 6)
    model = cf.CollabModel.fit(ev, lambda ids: np.zeros((len(ids), 2)), 0.5)
    pos = {x: j for j, x in enumerate(model.item_ids)}
    users = {u: k for k, u in enumerate(sorted(ev["user_id"].unique()))}
    col = ev["item_id"].map(pos).to_numpy()
    row = ev["user_id"].map(users).to_numpy()
    r = np.zeros((len(users), model.n_items))
    np.add.at(r, (row, col), ev["label"].to_numpy() - model.item_rate[col].astype(np.float64))
    h = np.zeros_like(r)
    h[row, col] = 1.0
    sup, num = h.T @ h, r.T @ r
    d = np.sqrt(np.diag(num))
    with np.errstate(divide="ignore", invalid="ignore"):
        s = num / np.outer(d, d) * sup / (sup + cf.KNN_SHRINK)
    ok = (sup > 0) & (num != 0) & ~np.eye(model.n_items, dtype=bool)
    ni = model.n_items
    want = {int(p * ni + c): s[p, c] for p, c in zip(*np.nonzero(ok))}
    got = dict(zip(model.rsim_keys.tolist(), model.rsim.tolist()))
    assert set(got) == set(want)
    np.testing.assert_allclose([got[k] for k in sorted(want)], [want[k] for k in sorted(want)], rtol=1e-4, atol=1e-6)
