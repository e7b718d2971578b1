"""User-vector retrieval through the inverted file (serving/ivf.py, via serving/index.py ItemIndex.top_n).

The data is the shape that made the HNSW graph miss on the served 1M-item model (benchmarks/RESULTS.md):
item vectors in a narrow cone, with a low intrinsic dimension and clumps of near-duplicates (variants of one
text), and user vectors outside the cone, all pointing roughly the same way.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from serving.ann import AnnParams
from serving.index import ItemIndex
from serving.ivf import IvfIndex, IvfParams
from tests.test_ann_index import _catalog, _holder, _Source, _VectorModel

DIM = 128
N = 10_000
PARAMS = AnnParams(min_items=1_000, connectivity=16, expansion_add=64, ef_search=128, threads=1)
IVF = IvfParams(lists=200, probes=8)  # 4 % of the items scanned per query


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _index(vectors: np.ndarray, ids=None) -> ItemIndex:
    ids = np.array(ids if ids is not None else [f"item-{j}" for j in range(len(vectors))], dtype=object)
    return ItemIndex(item_ids=ids, vectors=np.ascontiguousarray(vectors), hashes=np.arange(len(ids), dtype=np.uint64),
                     row={str(i): j for j, i in enumerate(ids)})


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    basis = _unit(rng.standard_normal((9, DIM)))
    mean, spread = basis[0], basis[1:]
    scales = np.array([1.0, 0.7, 0.5, 0.35, 0.25, 0.18, 0.12, 0.08])
    texts = 2.5 * mean + (rng.standard_normal((N // 100, 8)) * scales) @ spread  # 100 texts, ~100 variants each
    noise = 0.3 * np.linalg.norm(texts, axis=1).mean() / np.sqrt(DIM)
    vectors = _unit(texts[rng.integers(len(texts), size=N)] + noise * rng.standard_normal((N, DIM)))
    user = _unit((-mean + rng.standard_normal(8) @ spread)[None])[0]
    queries = _unit(user + 0.25 * _unit(rng.standard_normal((60, DIM))))
    exact = _index(vectors)
    return SimpleNamespace(vectors=vectors, exact=exact, queries=queries, ivf=exact.with_ann(PARAMS, ivf=IVF))


def _recall(index: ItemIndex, data, n: int = 50, exclude=None) -> float:
    hits = 0
    for q in data.queries:
        want, _ = data.exact.top_n(q, n, exclude)
        got, _ = index.top_n(q, n, exclude)
        hits += len(np.intersect1d(got, want))
    return hits / (n * len(data.queries))


def test_the_data_is_the_hard_shape(data):
    """Items in a cone (cosine ~0.85 to their mean), users outside it (their best item below cosine 0.3)."""
    m = _unit(data.vectors.mean(0, keepdims=True))[0]
    assert float((data.vectors @ m).mean()) > 0.8
    assert float((data.queries @ data.vectors.T).max(axis=1).mean()) < 0.3


def test_recall_at_50_against_exact_is_at_least_095(data):
    assert data.ivf.ivf is not None and data.ivf.ann is None and data.exact.ivf is None
    assert _recall(data.ivf, data) >= 0.95


def test_too_few_probes_fail_the_bar_so_the_measurement_can_fail(data):
    """Through the same ItemIndex.top_n: one list of 200 is not enough. This proves top_n answers from the lists
    (an exact fallback would score 1.0) and that the recall test above can fail."""
    poor = dataclasses.replace(data.ivf, ivf=dataclasses.replace(data.ivf.ivf, params=IvfParams(lists=200, probes=1)))
    assert _recall(poor, data) < 0.95


def _ranked_by(index: ItemIndex, rank_by: str, lists: int, probes: int) -> ItemIndex:
    ivf = IvfIndex.build(index.vectors, IvfParams(lists=lists, probes=probes, rank_by=rank_by))
    return dataclasses.replace(index, ivf=ivf)


def test_lists_chosen_by_both_rankings_hold_where_either_alone_fails(data):
    """Which lists to scan (serving/ivf.py): with 400 lists (clumps split across lists) and 8 probes, the
    upper bound alone lets loose lists crowd out the tight ones next to the query; with 200 lists and 4 probes
    the centroid alone misses; half of each holds in both."""
    got = {(r, lists, probes): _recall(_ranked_by(data.exact, r, lists, probes), data)
           for r in ("mixed", "bound", "centroid") for lists, probes in ((400, 8), (200, 4))}
    assert got["bound", 400, 8] < 0.9 and got["centroid", 200, 4] < 0.9, got
    assert got["mixed", 400, 8] >= 0.95 and got["mixed", 200, 4] >= 0.95, got
    with pytest.raises(ValueError, match="rank_by"):
        IvfParams(rank_by="nearest")


def test_every_list_probed_is_exact_with_exclusions_and_ties(data):
    full = IvfIndex.build(data.vectors, IvfParams(lists=50, probes=50))
    tied = np.concatenate([data.vectors, data.vectors[:3]])  # exact duplicates: ties go to the lower row
    full_tied = IvfIndex.build(tied, IvfParams(lists=50, probes=50))
    for q in data.queries[:10]:
        exclude = data.exact.top_n(q, 7)[0][::2]
        want_rows, want_sims = data.exact.top_n(q, 100, exclude)
        rows, sims = full.search(q, 100, exclude)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_allclose(sims, want_sims, rtol=1e-5, atol=1e-6)
        t_rows, _ = full_tied.search(q, 30)
        e_rows, _ = _index(tied).top_n(q, 30)
        np.testing.assert_array_equal(t_rows, e_rows)


def test_results_are_exact_similarities_best_first_without_excluded_rows(data):
    q = data.queries[0]
    exclude = data.exact.top_n(q, 20)[0]
    rows, sims = data.ivf.top_n(q, 200, exclude)
    assert len(rows) == 200 and len(set(rows.tolist())) == 200 and not set(rows.tolist()) & set(exclude.tolist())
    np.testing.assert_allclose(sims, data.vectors[rows] @ q, rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(sims) <= 0)
    assert _recall(data.ivf, data, exclude=exclude) >= 0.95
    cand, n_cand = data.ivf.retrieve_for_rescore(q, 200, 50, exclude=exclude)
    assert n_cand == 200 and len(cand) == 50


def test_built_deterministically_and_sized_by_default(data):
    a, b = IvfIndex.build(data.vectors, IvfParams()), IvfIndex.build(data.vectors, IvfParams())
    assert a.n_lists == round(2 * np.sqrt(N)) and a.how == "built"
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.order, b.order)
    assert sorted(a.order.tolist()) == list(range(N)) and a.starts[-1] == N
    assert IvfIndex.build(data.vectors[:5], IvfParams(lists=64)).n_lists == 5  # never more lists than items
    with pytest.raises(ValueError, match="non-empty"):
        IvfIndex.build(np.zeros((0, DIM), dtype=np.float32))
    # lists kept by a refresh can end up empty: probing only those answers nothing, without an error
    far = _unit(-a.centroids[:1])
    lonely = IvfIndex.build(data.vectors[:50], IvfParams(probes=1), centroids=np.concatenate([far, a.centroids[:3]]))
    assert lonely.how == "reassigned" and np.diff(lonely.starts)[0] == 0
    rows, sims = lonely.search(far[0], 5)  # the empty list's centroid is the query itself: it is the one probed
    assert len(rows) == 0 and len(sims) == 0
    assert len(lonely.search(far[0], 5, probes=4)[0]) == 5  # probing the others finds items


def test_a_refresh_keeps_the_lists_and_finds_new_items_at_once(data):
    rng = np.random.default_rng(9)
    extra = _unit(rng.standard_normal((5, DIM)))
    ids = [f"item-{j}" for j in range(N)] + [f"fresh-{j}" for j in range(5)]
    refreshed = _index(np.concatenate([data.vectors, extra]), ids).with_ann(PARAMS, previous=data.ivf, ivf=IVF)
    assert refreshed.ivf.how == "reassigned" and refreshed.ivf is not data.ivf.ivf and len(data.ivf.ivf) == N
    np.testing.assert_array_equal(refreshed.ivf.centroids, data.ivf.ivf.centroids)
    for j in range(5):
        rows, _ = refreshed.top_n(extra[j], 1)
        assert refreshed.item_ids[rows[0]] == f"fresh-{j}"


def test_below_the_threshold_retrieval_stays_exact(data):
    small = _index(data.vectors[:500]).with_ann(PARAMS, ivf=IVF)
    assert small.ivf is None and small.ann is None


def test_serving_retrieves_users_through_the_inverted_file_by_default(data, tmp_path):
    """Through serving's lifecycle with the default ``serving.ann_user_index``: no towers graph is built or
    saved, ``GET /model`` says how it retrieves, and a catalog refresh finds a new item at once."""
    ids = [f"item-{j}" for j in range(N)]
    holder = _holder(_Source(_VectorModel(), tmp_path), _catalog(data.vectors, ids), user_index="ivf")
    assert holder.poll_once()
    cur = holder.current
    assert cur.index.ivf is not None and cur.index.ann is None
    info = cur.info["retrieval"]
    assert info["kind"] == "ivf" and info["lists"] == round(2 * np.sqrt(N)) and info["probes"] == 64
    assert not list(tmp_path.rglob("*.usearch"))
    new_vec = _unit(np.random.default_rng(3).standard_normal((1, DIM)))
    holder.view.data = SimpleNamespace(catalog=_catalog(np.concatenate([data.vectors, new_vec]), ids + ["brand-new"]),
                                       catalog_sig=2)
    assert holder.refresh_data()
    idx = holder.current.index
    assert idx.ivf.how == "reassigned" and idx.item_ids[idx.top_n(new_vec[0], 1)[0][0]] == "brand-new"
