"""The ANN retrieval path (serving/ann.py through serving/index.py ItemIndex.top_n).

Real usearch graphs on ~5k clustered unit vectors at the model's item-vector dimension (128), with
``min_items`` lowered so the ANN path is taken; recall is measured against exact search on that data.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from serving.ann import AnnIndex, AnnParams
from serving.index import ItemIndex

DIM = 128
N = 5_000
PARAMS = AnnParams(min_items=1_000, connectivity=16, expansion_add=64, ef_search=128, threads=1)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, seed: int) -> np.ndarray:
    """Unit vectors around 60 centres: items of a catalog fall into topics, like the item tower's output."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((60, DIM)))
    return _unit(centres[rng.integers(60, size=n)] + 0.08 * rng.standard_normal((n, DIM)))


def _index(vectors: np.ndarray, ids=None, hashes=None) -> ItemIndex:
    ids = np.array(ids if ids is not None else [f"item-{j}" for j in range(len(vectors))], dtype=object)
    hashes = np.asarray(hashes if hashes is not None else np.arange(len(ids)), dtype=np.uint64)
    return ItemIndex(item_ids=ids, vectors=np.ascontiguousarray(vectors), hashes=hashes,
                     row={str(i): j for j, i in enumerate(ids)})


def _queries(vectors: np.ndarray, n: int, seed: int) -> np.ndarray:
    """User-like queries: a catalog vector plus noise."""
    rng = np.random.default_rng(seed)
    return _unit(vectors[rng.integers(len(vectors), size=n)] + 0.05 * rng.standard_normal((n, DIM)))


def _exact_top(vectors: np.ndarray, q: np.ndarray, n: int, exclude=None) -> np.ndarray:
    """Ground truth: every similarity computed, sorted (ties: lower row first)."""
    sims = vectors @ q
    if exclude is not None:
        sims[np.asarray(exclude)] = -np.inf
    return np.argsort(-sims, kind="stable")[:n]


def _recall_at_100(index: ItemIndex, exact: ItemIndex, queries: np.ndarray, exclude=None) -> float:
    """Share of the exact top-100 (over ``exact``'s vectors) that ``index.top_n`` returns."""
    hits = 0
    for q in queries:
        got, _ = index.top_n(q, 100, exclude)
        hits += len(set(got.tolist()) & set(_exact_top(exact.vectors, q, 100, exclude).tolist()))
    return hits / (100 * len(queries))


@pytest.fixture(scope="module")
def data():
    vectors = _clustered(N, seed=1)
    exact = _index(vectors)
    ann = exact.with_ann(PARAMS)
    return SimpleNamespace(vectors=vectors, exact=exact, ann=ann, queries=_queries(vectors, 100, seed=2))


def test_recall_at_100_against_exact_is_at_least_095(data):
    assert data.ann.ann is not None and data.exact.ann is None
    recall = _recall_at_100(data.ann, data.exact, data.queries)
    assert recall >= 0.95, recall


def test_a_poor_graph_fails_the_recall_bar_so_the_measurement_can_fail(data):
    """Through the same ItemIndex.top_n: a graph of connectivity 2 built with breadth 2 misses neighbours.
    This proves top_n really answers from the graph (an exact fallback would score 1.0) and that the
    recall test above can fail."""
    poor = data.exact.with_ann(AnnParams(min_items=1_000, connectivity=2, expansion_add=2, ef_search=1, threads=1))
    recall = _recall_at_100(poor, data.exact, data.queries[:40])
    assert recall < 0.95, recall


def test_results_are_exact_similarities_best_first(data):
    q = data.queries[0]
    rows, sims = data.ann.top_n(q, 50)
    assert len(rows) == 50 and len(set(rows.tolist())) == 50
    np.testing.assert_allclose(sims, data.vectors[rows] @ q, rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(sims) <= 0)


def test_exclusions_are_honoured(data):
    q = data.queries[3]
    exact_rows = _exact_top(data.vectors, q, 100)
    exclude = exact_rows[:30]  # the 30 nearest: what a naive top-100 would return first
    rows, _ = data.ann.top_n(q, 100, exclude)
    assert len(rows) == 100
    assert not set(rows.tolist()) & set(exclude.tolist())
    assert _recall_at_100(data.ann, data.exact, data.queries[:20], exclude=exclude) >= 0.95
    cand, n_cand = data.ann.retrieve_for_rescore(q, 200, 50, exclude=exclude)
    assert n_cand == 200 and len(cand) == 50 and not set(cand.tolist()) & set(exclude.tolist())


def test_below_the_threshold_retrieval_stays_exact(data):
    small = _index(data.vectors[:500]).with_ann(PARAMS)
    assert small.ann is None
    q = data.queries[0]
    rows, _ = small.top_n(q, 20)
    np.testing.assert_array_equal(rows, _exact_top(data.vectors[:500], q, 20))


def test_save_then_load_gives_the_same_results(data, tmp_path):
    built = data.exact.with_ann(PARAMS, directory=tmp_path, model_stamp="v1@t0")
    assert built.ann.how == "built" and list(tmp_path.glob("*.usearch"))
    loaded = _index(data.vectors).with_ann(PARAMS, directory=tmp_path, model_stamp="v1@t0")
    assert loaded.ann.how == "loaded" and len(loaded.ann) == N
    for q in data.queries[:30]:
        a_rows, a_sims = built.top_n(q, 100)
        b_rows, b_sims = loaded.top_n(q, 100)
        np.testing.assert_array_equal(a_rows, b_rows)
        np.testing.assert_allclose(a_sims, b_sims)
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pickle"))


def test_a_stale_key_is_not_loaded_as_is(data, tmp_path):
    """A save for another catalog (items added, removed, edited) or another model is not served as is."""
    data.exact.with_ann(PARAMS, directory=tmp_path, model_stamp="v1@t0")
    rng = np.random.default_rng(7)
    n_new = 50
    vectors = np.concatenate([data.vectors[100:], _unit(rng.standard_normal((n_new, DIM)))])  # 100 removed
    ids = [f"item-{j}" for j in range(100, N)] + [f"new-{j}" for j in range(n_new)]
    hashes = np.concatenate([np.arange(100, N), 10_000 + np.arange(n_new)]).astype(np.uint64)
    vectors[0] = _unit(rng.standard_normal((1, DIM)))[0]  # item-100 edited: new text, new vector
    hashes[0] = 99_999
    changed = _index(vectors, ids, hashes).with_ann(PARAMS, directory=tmp_path, model_stamp="v1@t0")
    assert changed.ann.how == "updated" and changed.ann.n_added == n_new + 1 and changed.ann.n_removed == 101
    assert len(changed.ann) == len(ids)
    for j in (0, len(ids) - 1, len(ids) - n_new):  # the edited item and new items are found at their vectors
        rows, _ = changed.top_n(vectors[j], 1)
        assert rows[0] == j
    for q in data.queries[:20]:  # the removed items never come back
        rows, _ = changed.top_n(q, 100)
        assert all(changed.item_ids[r] not in {f"item-{j}" for j in range(100)} for r in rows)
    assert _recall_at_100(changed, _index(vectors, ids, hashes), data.queries[:30]) >= 0.95
    # the up-to-date graph was saved under the new catalog's key: the next start loads it
    again = _index(vectors, ids, hashes).with_ann(PARAMS, directory=tmp_path, model_stamp="v1@t0")
    assert again.ann.how == "loaded"
    other_model = _index(vectors, ids, hashes).with_ann(PARAMS, directory=tmp_path, model_stamp="v2@t1")
    assert other_model.ann.how == "built"


def test_a_torn_save_is_rebuilt_not_served(data, tmp_path):
    data.exact.with_ann(PARAMS, directory=tmp_path, model_stamp="v1@t0")
    graph = next(tmp_path.glob("*.usearch"))
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 3])
    again = _index(data.vectors).with_ann(PARAMS, directory=tmp_path, model_stamp="v1@t0")
    assert again.ann.how == "built"
    assert _recall_at_100(again, data.exact, data.queries[:20]) >= 0.95


def test_incremental_refresh_adds_new_items(data):
    """ItemIndex.with_ann(previous=...) — what serving does when the store shows new catalog items."""
    rng = np.random.default_rng(9)
    extra = _unit(rng.standard_normal((5, DIM)))
    vectors = np.concatenate([data.vectors, extra])
    ids = [f"item-{j}" for j in range(N)] + [f"fresh-{j}" for j in range(5)]
    refreshed = _index(vectors, ids, np.arange(N + 5)).with_ann(PARAMS, previous=data.ann)
    assert refreshed.ann.how == "updated" and refreshed.ann.n_added == 5
    assert refreshed.ann.graph is not data.ann.ann.graph  # the served graph is never mutated
    assert len(data.ann.ann) == N
    for j in range(5):
        rows, _ = refreshed.top_n(extra[j], 1)
        assert refreshed.item_ids[rows[0]] == f"fresh-{j}"


# ---- through serving's lifecycle ---------------------------------------------------------------
class _VectorModel:
    """A stand-in model whose item tower is a fixed vector per item id (the catalog has a ``vec`` column)."""

    def __init__(self):
        self.config = {"saved_at": "2026-01-01T00:00:00"}
        self.encoded = 0

    def item_vectors(self, catalog: pd.DataFrame):
        self.encoded += len(catalog)
        return catalog["item_id"].astype(str).to_numpy(dtype=object), np.stack(catalog["vec"].to_numpy())


class _Source:
    def __init__(self, model, root):
        self.model, self.root = model, root

    def current_version(self):
        return "7"

    def load(self, version):
        return self.model, {"source": "test"}

    def index_dir(self, version):
        return self.root / f"v{version}" / "ann"


def _catalog(vectors: np.ndarray, ids) -> pd.DataFrame:
    return pd.DataFrame({"item_id": ids, "title": ids, "category": "c", "tags": "", "description": "",
                         "vec": list(vectors)}) \
        .set_index("item_id")


def _holder(source, catalog, min_items=1_000, user_index="graph"):
    """A ModelHolder over a fixed catalog; ``user_index="graph"``: the towers graph these tests check
    (serving's default is the inverted file, tests/test_ivf_index.py)."""
    from serving.lifecycle import ModelHolder

    view = SimpleNamespace(data=SimpleNamespace(catalog=catalog, catalog_sig=1), refresh=lambda: True)
    settings = SimpleNamespace(serving=SimpleNamespace(ann_min_items=min_items, ann_connectivity=16,
                                                       ann_expansion_add=64, ann_ef_search=128,
                                                       ann_build_threads=1, poll_seconds=1.0,
                                                       ann_user_index=user_index, ivf_lists=0, ivf_probes=64))
    return ModelHolder(source, view, settings)


def test_serving_builds_saves_loads_and_refreshes_the_graph(data, tmp_path):
    ids = [f"item-{j}" for j in range(N)]
    model = _VectorModel()
    holder = _holder(_Source(model, tmp_path), _catalog(data.vectors, ids))
    assert holder.poll_once()
    cur = holder.current
    assert cur.index.ann is not None and cur.info["retrieval"]["kind"] == "ann"
    assert cur.info["retrieval"]["graph"] == "built"
    assert list((tmp_path / "v7" / "ann").glob("*.usearch"))

    second = _holder(_Source(_VectorModel(), tmp_path), _catalog(data.vectors, ids))  # a restart
    assert second.poll_once()
    assert second.current.info["retrieval"]["graph"] == "loaded"
    q = data.queries[0]
    np.testing.assert_array_equal(second.current.index.top_n(q, 100)[0], cur.index.top_n(q, 100)[0])

    new_vec = _unit(np.random.default_rng(3).standard_normal((1, DIM)))
    second.view.data = SimpleNamespace(catalog=_catalog(np.concatenate([data.vectors, new_vec]), ids + ["brand-new"]),
                                       catalog_sig=2)
    assert second.refresh_data()
    idx = second.current.index
    assert idx.ann is not None and second.current.info["retrieval"]["graph"] == "updated"
    assert idx.item_ids[idx.top_n(new_vec[0], 1)[0][0]] == "brand-new"


def test_serving_stays_exact_below_the_threshold(data, tmp_path):
    ids = [f"item-{j}" for j in range(500)]
    holder = _holder(_Source(_VectorModel(), tmp_path), _catalog(data.vectors[:500], ids))
    assert holder.poll_once()
    assert holder.current.index.ann is None and holder.current.info["retrieval"]["kind"] == "exact"
    assert not (tmp_path / "v7").exists()


def test_concurrent_searches_during_a_refresh(data):
    """Requests on the old bundle keep answering while a refresh builds the new graph from a copy."""
    errors = []

    def search():
        try:
            for q in data.queries[:50]:
                rows, _ = data.ann.top_n(q, 100)
                assert len(rows) == 100
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=search) for _ in range(2)]
    for t in threads:
        t.start()
    refreshed = _index(data.vectors[:-10], [f"item-{j}" for j in range(N - 10)]).with_ann(PARAMS, previous=data.ann)
    for t in threads:
        t.join()
    assert not errors and refreshed.ann.n_removed == 10 and len(data.ann.ann) == N


def test_registry_graphs_live_next_to_the_versions_local_cache(tmp_path):
    """Outside the checksummed model files, inside the version's cache folder (a re-fetch drops it too)."""
    from models import registry
    from recloop.settings import load_settings
    from serving.lifecycle import LocalDirModelSource, RegistryModelSource

    settings = load_settings(tmp_path / "ws")
    where = RegistryModelSource(settings).index_dir("3")
    assert where == registry._cache_dir(settings, "3") / "ann"
    assert where.parent != registry._cache_dir(settings, "3") / "model"
    (tmp_path / "models" / "5").mkdir(parents=True)
    (tmp_path / "models" / "CHAMPION").write_text("5")
    assert LocalDirModelSource(tmp_path / "models").index_dir("5") == tmp_path / "models" / "5" / "ann"


class _SearchModel(_VectorModel):
    """Also search vectors (``item_text_vectors``, another space: the catalog's ``tvec`` column, 64 dims)."""

    text_rows = 0  # how many item texts it was asked to encode

    def item_text_vectors(self, catalog: pd.DataFrame):
        self.text_rows += len(catalog)
        return catalog["item_id"].astype(str).to_numpy(dtype=object), np.stack(catalog["tvec"].to_numpy())


def test_search_vectors_get_their_own_graph_saved_loaded_and_refreshed(data, tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    centres = _unit(rng.standard_normal((40, 64)))
    texts = _unit(centres[rng.integers(40, size=N)] + 0.08 * rng.standard_normal((N, 64)))
    ids = [f"item-{j}" for j in range(N)]
    cat = _catalog(data.vectors, ids).assign(tvec=list(texts))
    model = _SearchModel()
    holder = _holder(_Source(model, tmp_path), cat)
    assert holder.poll_once()
    idx = holder.current.index
    assert idx.text_ann is not None and idx.ann is not None and idx.text_ann.graph is not idx.ann.graph
    assert len(list((tmp_path / "v7" / "ann").glob("*.usearch"))) == 2  # towers + texts, both kept
    assert holder.current.info["retrieval"]["search"] == {**holder.current.info["retrieval"]["search"],
                                                          "kind": "ann", "dim": 64, "graph": "built"}
    queries = _unit(texts[rng.integers(N, size=50)] + 0.05 * rng.standard_normal((50, 64)))
    hits = sum(len(set(idx.top_by_text(q, 100)[0].tolist()) & set(np.argsort(-(texts @ q), kind="stable")[:100].tolist()))
               for q in queries)
    assert hits / (100 * len(queries)) >= 0.95
    second_model = _SearchModel()
    second = _holder(_Source(second_model, tmp_path), cat)  # a restart loads both graphs
    assert second.poll_once()
    assert second.current.index.text_ann.how == "loaded" and second.current.index.ann.how == "loaded"
    new_t = _unit(rng.standard_normal((1, 64)))
    second.view.data = SimpleNamespace(
        catalog=pd.concat([cat, _catalog(data.vectors[:1], ["brand-new"]).assign(tvec=list(new_t))]), catalog_sig=2)
    asked = second_model.text_rows
    read = []
    stored = AnnIndex.stored
    monkeypatch.setattr(AnnIndex, "stored", lambda self, keys: read.append(len(keys)) or stored(self, keys))
    assert second.refresh_data()
    idx2 = second.current.index
    assert idx2.text_ann.how == "updated" and idx2.item_ids[idx2.top_by_text(new_t[0], 1)[0][0]] == "brand-new"
    assert second_model.text_rows - asked == 1  # the refresh encodes only the new text; the rest come from the graph
    assert sum(read) == 0  # ... and the incremental update needs none of them read back
    # an exact index (catalog below the threshold) or a rebuild (> 20 % changed) reads them all, row for row
    both = np.concatenate([texts, new_t])
    cat2 = second.view.data.catalog.reset_index()  # as serving passes it
    exact = ItemIndex.build(second_model, cat2, previous=idx2, defer_text_reads=True)
    exact = exact.with_ann(AnnParams(min_items=10 * N))
    assert isinstance(exact.text_vectors, np.ndarray) and exact.text_ann is None and sum(read) == N + 1
    np.testing.assert_allclose(exact.text_vectors, both, atol=1e-3)
    edited = cat2.assign(title=lambda c: np.where(np.arange(len(c)) < N // 3, "edited", c["title"]))
    rebuilt = ItemIndex.build(second_model, edited, previous=idx2, defer_text_reads=True).with_ann(PARAMS, previous=idx2)
    assert rebuilt.text_ann.how == "built" and rebuilt.text_vectors is None
    np.testing.assert_allclose(rebuilt.text_ann.stored_rows(np.arange(N + 1)), both, atol=1e-3)
    # behind the graph the index keeps no copy of the text vectors: the graph's own float16 copy re-scores its hits
    assert idx.text_vectors is None and idx2.text_vectors is None and idx.vectors.dtype == np.float32
    assert idx.searchable and idx.text_dim == 64
    np.testing.assert_allclose(idx.top_by_text(queries[0], 5)[1], np.sort(texts @ queries[0])[::-1][:5], atol=2e-3)
    rows = idx.top_by_text(queries[1], 20)[0]  # the graph's copy is the catalog's vectors, row for row
    assert idx.text_ann.stored(idx.text_ann.keys[:0]).shape == (0, 64)
    np.testing.assert_allclose(idx.text_ann.stored_rows(rows), texts[rows], atol=1e-3)
    with pytest.raises(KeyError, match="not in the graph"):
        idx.text_ann.stored(np.array([12345], dtype=np.uint64))


def test_reused_vectors_of_another_width_are_an_error_not_a_silent_mix():
    from serving.index import _vectors

    ids = np.array(["a", "b"], dtype=object)
    hashes = np.array([1, 2], dtype=np.uint64)
    previous = (ids[:1], hashes[:1], np.ones((1, 8), dtype=np.float32))  # "a" reused (8-d), "b" computed (4-d)
    with pytest.raises(ValueError, match="4-d vectors, the previous index 8-d"):
        _vectors(lambda c: (c["item_id"].to_numpy(), np.ones((len(c), 4))), ids, hashes,
                 pd.DataFrame({"item_id": ids}), 16, previous)
    got, computed = _vectors(lambda c: (c["item_id"].to_numpy(), np.ones((len(c), 8))), ids, hashes,
                             pd.DataFrame({"item_id": ids}), 16, previous)
    assert computed == 1 and got.shape == (2, 8)
