"""Serving uses the Recommender's fast path: statistics built at store-refresh time, one user
vector per request (retrieval and re-scoring), scores equal to the full point-in-time model
over the whole store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from recloop.store import FeedbackStore
from serving import ranking
from serving.lifecycle import InMemoryModelSource, ModelHolder
from serving.storeview import StoreView
from tests.conftest import small_world_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from models.testing import make_tiny_encoder
    from models.train import train_recommender
    from recloop.datasets.synthetic import generate
    from recloop.settings import load_settings

    world = generate(small_world_config())
    root = tmp_path_factory.mktemp("fastpath")
    enc = make_tiny_encoder(root / "encoder")
    s = load_settings(root / "ws", training={"encoder_path": str(enc), "max_epochs": 1, "embed_dim": 16,
                                             "batch_size": 256})
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained = train_recommender(s, world.events[world.events["timestamp"] < world.day_start(10)],
                                    world.catalog, world.users, run_dir=root / "run")
    finally:
        torch.set_num_threads(saved)
    return world, trained.model


class Counting:
    """Wraps a Recommender, counting its calls (the fast path must not fall back to pandas)."""

    def __init__(self, model):
        self._m, self.calls = model, []

    def __getattr__(self, name):
        attr = getattr(self._m, name)
        if callable(attr) and name in ("user_context", "score_items", "score", "user_vectors"):
            def wrapped(*a, **k):
                self.calls.append(name)
                return attr(*a, **k)
            return wrapped
        return attr


@pytest.fixture
def holder(settings, tiny):
    world, model = tiny
    store = FeedbackStore.from_settings(settings)
    store.upsert_catalog(world.catalog)
    store.append(world.events, batch_id="world")
    view = StoreView(settings.store_dir)
    view.refresh(force=True)
    counting = Counting(model)
    h = ModelHolder(InMemoryModelSource(counting, "1"), view, settings)
    assert h.poll_once()
    return h, view, counting, world, store


def _full_scores(model, data, store, user, item_ids, query=None):
    pairs = pd.DataFrame({"user_id": user, "item_id": item_ids})
    if query:
        pairs["query"] = query
    return model.score(pairs, store.read(), data.catalog.reset_index())


def test_recommend_scores_equal_the_full_model_over_the_whole_store(holder, settings):
    h, view, counting, _world, store = holder
    data = view.data
    everything = store.read()
    assert data.stats is not None and data.stats.n_events == len(everything)
    users = everything[everything["label"] == 1]["user_id"].astype(str).value_counts().index[:4].tolist()
    for user in users:
        counting.calls.clear()
        r = ranking.recommend(h.current, data, settings, user, 8, np.random.default_rng(0))
        assert counting.calls == ["user_context", "score_items"]  # one user vector, reused; no pandas path
        assert "events" not in vars(data)  # nor the pandas copy of the tails (built only for that path)
        assert not r.cold_start and len(r.items) == 8
        ids = [it["item_id"] for it in r.items]
        want = _full_scores(counting._m, data, store, user, ids)
        np.testing.assert_allclose([it["score"] for it in r.items], want, rtol=0, atol=2e-6)
        liked = set(everything.query("user_id == @user and label == 1")["item_id"].astype(str))
        assert not liked & set(ids)  # already-liked items are still excluded
        # retrieval used the user-tower vector of the full model
        ctx = counting._m.user_context(data.stats, user)
        np.testing.assert_allclose(ctx.vector, counting._m.user_vectors([user], everything,
                                                                         data.catalog.reset_index())[0], atol=2e-6)


def test_search_personalised_and_anonymous_use_one_context(holder, settings):
    h, view, counting, _world, store = holder
    data = view.data
    user = str(data.events["user_id"].iloc[0])
    for uid in (user, None):
        counting.calls.clear()
        r = ranking.search(h.current, data, settings, "galaxy starship", uid, 5, np.random.default_rng(0))
        assert counting.calls == ["user_context", "score_items"]
        ids = [it["item_id"] for it in r.items]
        want = _full_scores(counting._m, data, store, uid or ranking.ANONYMOUS, ids, "galaxy starship")
        np.testing.assert_allclose([it["score"] for it in r.items], want, rtol=0, atol=2e-6)


def test_cold_user_and_refresh_rebuild_the_statistics(holder, settings):
    h, view, _counting, world, store = holder
    r = ranking.recommend(h.current, view.data, settings, "brand-new-user", 5, np.random.default_rng(0))
    assert r.cold_start and len(r.items) == 5
    old = view.data.stats
    item = str(world.catalog["item_id"].iloc[3])
    t = view.data.events["timestamp"].max() + pd.Timedelta(minutes=1)
    store.append(pd.DataFrame({"event_id": ["new-1", "new-2"], "user_id": ["brand-new-user"] * 2,
                               "item_id": [item, item], "event_type": ["like", "click"], "label": [1, 1],
                               "timestamp": [t, t]}), batch_id="fresh")
    assert view.refresh()
    new = view.data.stats
    assert new is not old and new.n_events == old.n_events + 2
    assert new._catalog_part is old._catalog_part  # catalog unchanged: its part is reused
    assert new.user("brand-new-user").n_pos == 2 and new.item_n[new.item_pos[item]] == old.item_n[old.item_pos[item]] + 2
    r = ranking.recommend(h.current, view.data, settings, "brand-new-user", 5, np.random.default_rng(0))
    assert not r.cold_start and item not in [it["item_id"] for it in r.items]


def test_models_without_the_fast_path_still_work(settings):
    """A model with only user_vectors/score (the test stand-in) takes the generic path."""
    from tests.conftest_serving import TextHashRecommender, catalog_frame, events_frame

    store = FeedbackStore.from_settings(settings)
    cat = catalog_frame()
    store.upsert_catalog(cat)
    store.append(events_frame(cat), batch_id="seed")
    view = StoreView(settings.store_dir)
    view.refresh(force=True)
    model = TextHashRecommender()
    h = ModelHolder(InMemoryModelSource(model, "1"), view, settings)
    h.poll_once()
    r = ranking.recommend(h.current, view.data, settings, "u1", 3, np.random.default_rng(0))
    assert model.score_calls == 1 and next(it["category"] for it in r.items) == "science fiction"


def test_server_caps_blas_threads_like_torch(settings):
    import threadpoolctl  # scikit-learn's dependency
    from fastapi.testclient import TestClient

    from serving.app import create_app

    def numpy_blas():  # numpy's BLAS runs the retrieval matvec
        return [d["num_threads"] for d in threadpoolctl.threadpool_info()
                if d["user_api"] == "blas" and "numpy" in d["filepath"]]

    threadpoolctl.threadpool_limits(limits=2, user_api="blas")  # this thread takes control first
    assert numpy_blas() == [2]
    settings.serving.torch_threads = 1
    app = create_app(settings, model_source=InMemoryModelSource(), start_background=False)
    with TestClient(app) as client:  # startup runs in another thread: it must still win
        assert client.get("/health").status_code == 503  # no model: still started
        assert numpy_blas() == [1]
