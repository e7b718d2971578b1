"""The serving fast path (``ServingStats`` + ``Recommender.user_context`` / ``score_items``)
equals the general point-in-time path on rows without a timestamp; the model's caches are
thread-safe and the query cache is bounded."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch

from models.features import WIDE_COLUMNS, ServingStats, point_in_time_features
from models.recommender import _LRU

T0 = pd.Timestamp("2026-01-01", tz="UTC")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models are many small ops: one thread is faster on a shared 2-core box."""


@pytest.fixture(scope="module")
def world():
    from recloop.datasets.synthetic import generate
    from tests.conftest import small_world_config

    return generate(small_world_config())


@pytest.fixture(scope="module")
def model(tmp_path_factory, world):
    from models.testing import make_tiny_encoder
    from models.train import train_recommender
    from recloop.settings import load_settings

    root = tmp_path_factory.mktemp("serving-path")
    enc = make_tiny_encoder(root / "encoder")
    s = load_settings(root / "ws", training={"encoder_path": str(enc), "max_epochs": 1, "embed_dim": 16,
                                             "batch_size": 256})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        trained = train_recommender(s, world.events[world.events["timestamp"] < world.day_start(10)],
                                    world.catalog, world.users, run_dir=root / "run")
    return trained.model


def _history(world) -> pd.DataFrame:
    """The whole world, shuffled (order must not matter beyond ties), plus events on an item the
    catalog does not know, and tied timestamps."""
    ev = world.events[["user_id", "item_id", "label", "timestamp"]].copy()
    u = str(ev["user_id"].iloc[0])
    extra = pd.DataFrame({"user_id": [u, u, "zz-only-ghost"], "item_id": ["ghost-item", "ghost-item", "ghost-item"],
                          "label": [1, 0, 1], "timestamp": [ev["timestamp"].max()] * 3})
    ev = pd.concat([ev, extra], ignore_index=True)
    return ev.sample(frac=1.0, random_state=1).reset_index(drop=True)


def _users(world, history):
    counts = history.groupby("user_id")["label"].sum().sort_values()
    return [str(counts.index[-1]), str(counts.index[len(counts) // 2]), str(history["user_id"].iloc[0]),
            "never-seen-user", "zz-only-ghost"]


@pytest.mark.parametrize("query", [None, "galaxy starship", "  a query nobody typed before  "])
def test_fast_path_equals_score_without_timestamps(model, world, query):
    history = _history(world)
    catalog = world.catalog
    stats = model.serving_stats(history, catalog)
    items = catalog["item_id"].astype(str).tolist() + ["ghost-item", "not-anywhere"]
    for user in _users(world, history):
        pairs = pd.DataFrame({"user_id": user, "item_id": items})
        if query is not None:
            pairs["query"] = query
        expected = model.score(pairs, history, catalog)
        got = model.score_user(stats, user, items, query=query)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6, err_msg=f"user {user}")
        # the retrieval vector is the user tower of user_vectors()
        ctx = model.user_context(stats, user, query)
        want = model.user_vectors([user], history, catalog, queries=[query] if query else None)[0]
        np.testing.assert_allclose(ctx.vector, want, rtol=0, atol=2e-6)
        # scoring a subset with the same context gives the same numbers (context reused, not rebuilt)
        np.testing.assert_allclose(model.score_items(stats, ctx, items[5:12]), got[5:12], rtol=0, atol=1e-7)


def test_fast_path_is_not_trivially_equal(model, world):
    """The comparison above can fail: different users / histories give different scores."""
    history = _history(world)
    stats = model.serving_stats(history, world.catalog)
    items = world.catalog["item_id"].astype(str).tolist()
    a, b = (model.score_user(stats, u, items) for u in _users(world, history)[:2])
    assert np.abs(a - b).max() > 1e-4
    early = model.serving_stats(history[history["timestamp"] < world.day_start(3)], world.catalog)
    assert np.abs(model.score_user(early, _users(world, history)[0], items) - a).max() > 1e-4


def _catalog(n=6):
    return pd.DataFrame({"item_id": [f"i{k}" for k in range(n)], "title": [f"t{k}" for k in range(n)],
                         "description": "", "category": ["a", "a", "b", None, "c", "c"][:n],
                         "created_at": [T0 - pd.Timedelta(days=10 + k) for k in range(n)]})


def test_serving_stats_equal_point_in_time_features_for_rows_without_time():
    rng = np.random.default_rng(0)
    n = 300
    hist = pd.DataFrame({"user_id": rng.choice([f"u{k}" for k in range(8)], n),
                         "item_id": rng.choice([f"i{k}" for k in range(6)] + ["x1", "x2"], n),
                         "label": rng.integers(0, 2, n),
                         "timestamp": T0 + pd.to_timedelta(rng.integers(0, 40, n), unit="h")})  # many ties
    hist.loc[5, "timestamp"] = pd.NaT  # an event without a time is never seen by rows without one
    cat = _catalog()
    cat = pd.concat([cat, cat.iloc[[1]].assign(category="b", created_at=pd.NaT)], ignore_index=True)  # dup: last wins
    cat.loc[0, "created_at"] = pd.NaT
    items = [f"i{k}" for k in range(6)] + ["x1", "x2", "nowhere"]
    users = [f"u{k}" for k in range(8)] + ["nobody"]
    rows = pd.DataFrame([(u, i) for u in users for i in items], columns=["user_id", "item_id"])
    from models.data import ItemIndex

    index = ItemIndex.from_catalog(cat, pd.concat([rows["item_id"], hist["item_id"]]))
    ref = point_in_time_features(rows, hist, cat, index.position, history_len=4, prior=0.3)
    stats = ServingStats.build(hist, cat)
    for j, u in enumerate(users):
        us = stats.user(u)
        sel = slice(j * len(items), (j + 1) * len(items))
        wide = stats.wide(us, stats.positions(items), False, 0.3)
        np.testing.assert_allclose(wide, ref.wide[sel], rtol=1e-6, atol=1e-6,
                                   err_msg=f"user {u}: {list(WIDE_COLUMNS)}")
        got_hist = [stats.item_ids[p] if p >= 0 else None for p in stats.history_items(us, 4)]
        want_hist = [index.item_ids[p] if p >= 0 else None for p in ref.history_items[sel][0]]
        assert got_hist == want_hist, u


def test_item_tower_cache_is_read_once(model, world):
    """Another thread replacing the one-entry cache between the check and the read must not break a call."""
    from models.data import ItemIndex

    items = ItemIndex.from_catalog(world.catalog)
    tower = model._item_tower(items)
    key = model._tower_cache[0]

    class Swapping(tuple):
        def __getitem__(self, i):  # simulate a concurrent swap right after the key is checked
            model._tower_cache = None
            return tuple.__getitem__(self, i)

    model._tower_cache = Swapping((key, items, tower))
    assert model._item_tower(items) is tower


def test_concurrent_scoring_matches_sequential(model, world):
    history = _history(world)
    cats = [world.catalog.iloc[: 40 + 5 * k] for k in range(4)]  # different catalogs: the tower cache churns
    users = _users(world, history)[:2]
    jobs = [(c, u) for c in cats for u in users] * 3

    def run(job):
        c, u = job
        return model.score(pd.DataFrame({"user_id": u, "item_id": c["item_id"].astype(str)}), history, c)

    expected = [run(j) for j in jobs]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(run, jobs))
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-6)


def test_query_vectors_go_to_a_bounded_lru_item_texts_stay(model, monkeypatch):
    model._query_cache = _LRU(3)
    n_items_cached = len(model._text_cache)
    encoded = []
    real = model._encode_query
    monkeypatch.setattr(model, "_encode_query", lambda text: (encoded.append(text), real(text))[1])
    qs = [f"query number {k}" for k in range(10)]
    vecs = [model.text_vectors([q], queries=True)[0] for q in qs]
    assert encoded == qs
    assert len(model._query_cache) == 3 and all(q in model._query_cache for q in qs[-3:])
    assert len(model._text_cache) == n_items_cached  # queries never grow the item cache
    for q, v in zip(qs, vecs):  # the single-query path encodes like the batch encoder
        np.testing.assert_allclose(v.numpy(), model.encoder.encode([q])[0].numpy(), rtol=0, atol=1e-5)
    encoded.clear()
    model.text_vectors([qs[-1]], queries=True)  # cached: no encoding
    assert encoded == []
    model.text_vectors([qs[0]], queries=True)  # evicted: encoded again
    assert encoded == [qs[0]] and qs[0] in model._query_cache
    # score() with a fresh query goes through the LRU too
    model.score(pd.DataFrame({"user_id": ["u"], "item_id": ["x"], "query": ["another fresh query"]}), None,
                pd.DataFrame({"item_id": ["x"], "title": ["t"], "category": ["c"], "description": [""]}))
    assert "another fresh query" in model._query_cache and len(model._text_cache) == n_items_cached + 1  # + "x"'s text
    model._text_cache.pop("t [c]")
    # item texts (queries=False) are kept for the model's life
    model.text_vectors(["an item text never seen"])
    assert "an item text never seen" in model._text_cache
    model._text_cache.pop("an item text never seen")


def test_item_text_cache_is_float16_and_survives_save_and_load(model, world, tmp_path):
    """The item-text cache keeps half-size vectors (what 1M catalog texts cost in memory and on disk), hands
    the towers float32, a text encoded now is the vector every later call gets, and a save + load round trip
    (also of a model saved before, with float32 vectors) leaves every score unchanged."""
    from safetensors.numpy import load_file, save_file

    from models.recommender import TEXT_CACHE_DTYPE, Recommender

    assert TEXT_CACHE_DTYPE == np.float16
    assert {v.dtype for v in model._text_cache.values()} == {np.dtype(np.float16)}
    t = "a text for the cache test"
    first = model.text_vectors([t])
    assert first.dtype == torch.float32 and model._text_cache[t].dtype == np.float16
    np.testing.assert_allclose(first.numpy()[0], model.encoder.encode([t])[0].numpy(), rtol=2e-3, atol=1e-4)
    np.testing.assert_array_equal(model.text_vectors([t]).numpy(), first.numpy())  # the rounded vector, every time
    model._text_cache.pop(t)
    pairs = pd.DataFrame({"user_id": world.events["user_id"].astype(str).iloc[:40].to_numpy(),
                          "item_id": world.events["item_id"].astype(str).iloc[:40].to_numpy()})
    history = world.events[["user_id", "item_id", "label", "timestamp"]]
    want = model.score(pairs, history, world.catalog)
    model.save(tmp_path / "m")
    saved = load_file(str(tmp_path / "m" / "text_vectors.safetensors"))["vectors"]
    assert saved.dtype == np.float16 and len(saved) == len(model._text_cache)
    np.testing.assert_array_equal(Recommender.load(tmp_path / "m").score(pairs, history, world.catalog), want)
    save_file({"vectors": saved.astype(np.float32)}, str(tmp_path / "m" / "text_vectors.safetensors"))  # older model
    old = Recommender.load(tmp_path / "m")
    assert {v.dtype for v in old._text_cache.values()} == {np.dtype(np.float16)}
    np.testing.assert_array_equal(old.score(pairs, history, world.catalog), want)
    with pytest.raises(ValueError, match="3 texts but 2 vectors"):
        old.remember_texts(["a", "b", "c"], np.zeros((2, 4)))


def test_lru_is_thread_safe():
    lru = _LRU(50)

    def hammer(k):
        for j in range(2000):
            lru.put(f"{k}-{j % 97}", np.zeros(1))
            lru.get(f"{(k + 1) % 4}-{j % 97}")

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(lru) == 50


def test_search_vectors_are_the_encoders_and_aligned(model, world):
    catalog = world.catalog
    ids, vecs = model.item_text_vectors(catalog)
    assert list(ids) == catalog["item_id"].astype(str).tolist()
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    from recloop.schema import item_text

    text = item_text(catalog.iloc[[7]]).iloc[0]
    q = model.query_vector(text)  # an item's own text as the query: its own row, cosine 1
    assert int(np.argmax(vecs @ q)) == 7 and float(vecs[7] @ q) > 0.999
    with pytest.raises(ValueError, match="empty"):
        model.query_vector("   ")


def test_a_model_trained_without_queries_leaves_them_out(tmp_path, world, model):
    """Its query projection never saw a query (random start): scoring and the user tower ignore the query.
    The query-trained model above does read it (the check can fail)."""
    from models.testing import make_tiny_encoder
    from models.train import train_recommender
    from recloop.settings import load_settings

    enc = make_tiny_encoder(tmp_path / "encoder")
    s = load_settings(tmp_path / "ws", training={"encoder_path": str(enc), "max_epochs": 1, "embed_dim": 16,
                                                 "batch_size": 256})
    events = world.events[world.events["timestamp"] < world.day_start(6)].assign(query=None)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        plain = train_recommender(s, events, world.catalog, world.users, run_dir=tmp_path / "run").model
    assert plain.config["n_query_texts"] == 0 and not plain.query_trained and model.query_trained
    history = _history(world)
    items = world.catalog["item_id"].astype(str).tolist()
    user = _users(world, history)[0]
    for m, reads in ((plain, False), (model, True)):
        stats = m.serving_stats(history, world.catalog)
        with_q, without = m.score_user(stats, user, items, query="galaxy starship"), m.score_user(stats, user, items)
        pairs = pd.DataFrame({"user_id": user, "item_id": items, "query": "galaxy starship"})
        np.testing.assert_allclose(m.score(pairs, history, world.catalog), with_q, rtol=0, atol=2e-6)
        assert (np.abs(with_q - without).max() > 1e-4) == reads
        assert m.user_context(stats, user, "galaxy starship").has_query == reads
