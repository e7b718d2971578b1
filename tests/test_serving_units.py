"""Serving pieces in isolation: store view, item index, MMR, exploration, ranking, feedback writer, limits."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest

from serving.feedback import FeedbackWriter, ImpressionLog, read_impressions
from serving.index import ItemIndex, exploration_pool, mmr
from serving.lifecycle import InMemoryModelSource, LocalDirModelSource, ModelHolder
from serving.security import RateLimiter
from serving.storeview import StoreView
from tests.conftest_serving import TextHashRecommender, TextSearchRecommender, catalog_frame, world  # noqa: F401


def _event(eid, user="u9", item="sci0", etype="click", ts="2026-01-06T10:00:00+00:00"):
    return {"event_id": eid, "user_id": user, "item_id": item, "event_type": etype,
            "label": 1 if etype in ("click", "like", "purchase") else 0, "timestamp": pd.Timestamp(ts),
            "query": None, "model_version": "1"}


# ---- store view -------------------------------------------------------------------------------
def test_store_view_reads_incrementally_and_sees_catalog_changes(world):
    settings, store, cat = world
    view = StoreView(settings.store_dir)
    assert view.refresh() is True
    d = view.data
    assert len(d.events) == len(store.read())
    assert set(d.user_history("u1")["item_id"]) == {"sci0", "sci1", "sci2"}
    assert d.shown["jaz0"] == 10 and "jaz0" not in d.positives.index
    assert view.refresh() is False  # nothing changed: no work
    store.append(pd.DataFrame([_event("new1", user="u1", item="jaz3")]), batch_id="b2")
    assert view.refresh() is True
    assert "jaz3" in set(view.data.user_history("u1")["item_id"])
    assert len(view.data.events) == len(store.read())
    new = cat.iloc[[0]].assign(item_id="brandnew", title="Quantum nebula atlas")
    store.upsert_catalog(new)
    assert view.refresh() is True and "brandnew" in view.data.catalog.index


def test_popularity_prefers_liked_and_shown_items(world):
    settings, _, _ = world
    view = StoreView(settings.store_dir)
    view.refresh()
    pop = view.data.popularity()
    assert pop.index[0] in {"coo0", "coo1"}
    assert pop["jaz0"] == 0.0  # shown ten times, never liked


# ---- index ------------------------------------------------------------------------------------
def test_index_top_n_is_exact_and_rebuild_reuses_vectors():
    model = TextHashRecommender()
    cat = catalog_frame()
    idx = ItemIndex.build(model, cat)
    assert len(idx) == len(cat) and idx.n_encoded == len(cat)
    q = idx.vectors[idx.row["sci3"]]
    rows, sims = idx.top_n(q, 5)
    brute = np.argsort(-(idx.vectors @ q), kind="stable")[:5]
    assert rows[0] == idx.row["sci3"] and set(rows) == set(brute)
    assert np.all(np.diff(sims) <= 1e-6)
    rows2, _ = idx.top_n(q, 5, exclude=np.array([idx.row["sci3"]]))
    assert idx.row["sci3"] not in rows2
    # a new item and an edited one are the only ones encoded on rebuild
    cat2 = pd.concat([cat, cat.iloc[[0]].assign(item_id="fresh", title="Trumpet galaxy")], ignore_index=True)
    cat2.loc[cat2["item_id"] == "jaz1", "title"] = "Completely different words"
    idx2 = ItemIndex.build(model, cat2, previous=idx)
    assert idx2.n_encoded == 2 and "fresh" in idx2.row
    np.testing.assert_allclose(idx2.vectors[idx2.row["sci0"]], idx.vectors[idx.row["sci0"]])


def test_mmr_trades_relevance_for_diversity():
    v = np.array([[1, 0], [0.99, 0.141], [0, 1]], dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    rel = np.array([1.0, 0.95, 0.5])
    assert list(mmr(rel, v, 2, lam=1.0)) == [0, 1]  # pure relevance
    assert list(mmr(rel, v, 2, lam=0.5)) == [0, 2]  # the near-duplicate is skipped
    assert len(mmr(rel, v, 10, lam=0.5)) == 3


def test_exploration_pool_is_new_or_rarely_shown():
    idx = ItemIndex.build(TextHashRecommender(), catalog_frame())
    shown = pd.Series({iid: 50 for iid in idx.item_ids})
    shown["coo1"], shown["jaz2"] = 0, 1
    shown = shown.drop("sci5")  # never shown at all
    pool = {idx.item_ids[r] for r in exploration_pool(idx, shown, max_shown=1)}
    assert pool == {"coo1", "jaz2", "sci5"}


# ---- ranking ----------------------------------------------------------------------------------
@pytest.fixture
def holder(world):
    settings, _store, _ = world
    view = StoreView(settings.store_dir)
    view.refresh(force=True)
    model = TextHashRecommender()
    h = ModelHolder(InMemoryModelSource(model, "7"), view, settings)
    assert h.poll_once() is True
    return h


def test_recommend_uses_history_excludes_liked_and_explains(holder):
    from serving import ranking

    served, data = holder.current, holder.view.data
    r = ranking.recommend(served, data, holder.settings, "u1", 5, np.random.default_rng(0))
    ids = [it["item_id"] for it in r.items]
    assert not r.cold_start and len(ids) == 5
    assert not {"sci0", "sci1", "sci2"} & set(ids)  # already liked
    assert ids[0].startswith("sci")  # likes science fiction
    assert all(it["reason"].startswith("because you liked: ") for it in r.items)
    assert [it["rank"] for it in r.items] == [1, 2, 3, 4, 5]
    scores = [it["score"] for it in r.items]
    assert scores == sorted(scores, reverse=True)


def test_cold_start_user_gets_popular_and_diverse(holder):
    from serving import ranking

    r = ranking.recommend(holder.current, holder.view.data, holder.settings, "nobody", 6, np.random.default_rng(0))
    assert r.cold_start
    cats = [it["category"] for it in r.items]
    assert r.items[0]["item_id"] in {"coo0", "coo1"}  # the most popular first
    assert len(set(cats)) >= 2  # MMR spreads a cold list over categories
    assert any(it["reason"].startswith("popular in") for it in r.items)


class _NicheRecommender(TextHashRecommender):
    """Scores the least-shown items highest (a like-rate model on self-selected ratings does so for new users)."""

    def __init__(self, order: str):
        super().__init__()
        self.config = {"cold_start_order": order}

    def score(self, pairs, history, catalog):
        shown = history.groupby("item_id").size() if len(history) else pd.Series(dtype=float)
        return np.array([1.0 / (2.0 + float(shown.get(i, 0))) for i in pairs["item_id"]])


@pytest.mark.parametrize("order", ["model", "popularity"])
def test_cold_start_list_follows_the_models_cold_start_order(world, order):
    from serving import ranking

    settings, _store, _ = world
    view = StoreView(settings.store_dir)
    view.refresh(force=True)
    h = ModelHolder(InMemoryModelSource(_NicheRecommender(order), "8"), view, settings)
    assert h.poll_once() is True
    r = ranking.recommend(h.current, view.data, settings, "nobody", 4, np.random.default_rng(0))
    first = r.items[0]["item_id"]
    most_popular = view.data.popularity().index[0]
    assert r.cold_start
    assert (first == most_popular) == (order == "popularity")  # re-scored: the niche model's pick leads


def test_exploration_slot_is_marked(holder):
    from serving import ranking

    holder.settings.serving.exploration_epsilon = 1.0
    holder.settings.serving.exploration_max_shown = 0
    r = ranking.recommend(holder.current, holder.view.data, holder.settings, "u1", 5, np.random.default_rng(1))
    explored = [it for it in r.items if it["explored"]]
    assert len(explored) == 1 and len(r.items) == 5
    assert holder.view.data.shown.get(explored[0]["item_id"], 0) == 0
    assert "exploring" in explored[0]["reason"]


def test_search_matches_query_words(holder):
    from serving import ranking

    r = ranking.search(holder.current, holder.view.data, holder.settings, "saxophone bebop", None, 3,
                       np.random.default_rng(0))
    assert r.items[0]["category"] == "jazz"
    assert "saxophone" in r.items[0]["reason"] or "bebop" in r.items[0]["reason"]


def test_search_fusion_keeps_a_clear_match_first_and_lets_the_model_order_the_rest():
    from serving.ranking import standard_fusion

    # 50 candidates (serving.rescore); item 0 matches the query far better than the rest (an exact title):
    # first despite the lowest probability; the others' relevance is close, so the model orders them
    rng = np.random.default_rng(0)
    rel = np.r_[0.95, rng.uniform(0.45, 0.55, 49)]
    prob = np.r_[0.05, rng.uniform(0.1, 0.9, 49)]
    order = np.argsort(-standard_fusion(rel, prob))
    assert order[0] == 0 and prob[order[1]] > np.quantile(prob, 0.8)
    tied = np.r_[0.95, np.full(49, 0.5)]  # equal relevance: exactly the model's order
    assert list(np.argsort(-standard_fusion(tied, prob), kind="stable")[1:]) == \
        list(1 + np.argsort(-prob[1:], kind="stable"))
    assert np.argsort(-standard_fusion(rel, np.full(50, 0.5)))[0] == 0
    assert np.all(standard_fusion(np.ones(3), np.full(3, 0.5)) == 0)  # nothing to separate
    assert standard_fusion(np.empty(0), np.empty(0)).shape == (0,)  # no candidates: nothing to order
    with pytest.raises(ValueError, match="shape"):
        standard_fusion(rel, prob[:3])


def test_index_keeps_text_vectors_and_reuses_them(world):
    _settings, _store, cat = world
    model = TextSearchRecommender()
    idx = ItemIndex.build(model, cat)
    assert idx.text_vectors is not None and idx.text_vectors.shape[0] == len(cat)
    np.testing.assert_allclose(np.linalg.norm(idx.text_vectors, axis=1), 1.0, atol=1e-6)
    rows, sims = idx.top_by_text(model.query_vector("saxophone bebop"), 3)
    assert idx.item_ids[rows[0]].startswith("jaz") and np.all(np.diff(sims) <= 1e-6)
    cat2 = pd.concat([cat, cat.iloc[[0]].assign(item_id="fresh", title="Trumpet galaxy")], ignore_index=True)
    asked = model.text_vector_rows
    idx2 = ItemIndex.build(model, cat2, previous=idx)
    assert model.text_vector_rows - asked == 1  # only the new item's text; the others are reused
    assert idx2.row["fresh"] == len(cat) and idx2.text_vectors.shape[0] == len(cat2)
    np.testing.assert_allclose(idx2.text_vectors[idx2.row["jaz0"]], idx.text_vectors[idx.row["jaz0"]])
    assert ItemIndex.build(TextHashRecommender(), cat).text_vectors is None  # a model without them
    with pytest.raises(ValueError, match="no text vectors"):
        ItemIndex.build(TextHashRecommender(), cat).top_by_text(model.query_vector("x"), 3)


def test_search_reads_text_relevance_when_the_tower_ignores_the_query(world):
    """The user tower of this stand-in ignores queries (as an untrained query projection does): only the
    text path finds jazz for a jazz query, for an anonymous user and for one who likes science fiction."""
    from serving import ranking

    settings, _store, _ = world
    settings.serving.rescore = 4  # the 4 items whose words match; the whole 18-item catalog otherwise
    view = StoreView(settings.store_dir)
    view.refresh(force=True)
    h = ModelHolder(InMemoryModelSource(TextSearchRecommender(), "9"), view, settings)
    assert h.poll_once() is True
    for user in (None, "u1"):
        r = ranking.search(h.current, view.data, settings, "saxophone bebop", user, 3, np.random.default_rng(0))
        assert [it["category"] for it in r.items] == ["jazz"] * 3, user
        assert r.items[0]["reason"].startswith("matches: ")
    # the same index without text vectors: the tower path, which cannot see the query, fails it
    legacy = h.current.__class__(model=h.current.model, version="9", info={},
                                 index=h.current.index.__class__(**{**h.current.index.__dict__, "text_vectors": None}),
                                 catalog_sig=None)
    r = ranking.search(legacy, view.data, settings, "saxophone bebop", "u1", 3, np.random.default_rng(0))
    assert [it["category"] for it in r.items] != ["jazz"] * 3


def test_holder_swaps_versions_and_indexes_new_catalog_items(holder, world):
    _settings, store, cat = world
    source = holder.source
    old = holder.current
    source.set("8", TextHashRecommender(bias=1.0))
    assert holder.poll_once() is True and holder.current.version == "8" and old.version == "7"
    assert holder.poll_once() is False  # same version: nothing to do
    store.upsert_catalog(cat.iloc[[0]].assign(item_id="launch1", title="Esports arena tournament"))
    assert holder.refresh_data() is True
    assert "launch1" in holder.current.index.row and holder.current.index.n_encoded == 1


def test_holder_keeps_serving_when_a_load_fails(holder):
    class Broken(InMemoryModelSource):
        def load(self, version):
            raise OSError("disk gone")

    good = holder.current
    holder.source = Broken(TextHashRecommender(), "9")
    assert holder.poll_once() is False
    assert holder.current is good and "disk gone" in holder.last_error


def test_local_dir_source_reads_champion_pointer(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    src = LocalDirModelSource(tmp_path)
    assert src.current_version() is None
    src.set_champion("a")
    assert src.current_version() == "a"
    src.set_champion("b")
    assert src.current_version() == "b" and src.model_dir("b") == tmp_path / "b"
    with pytest.raises(FileNotFoundError):
        src.set_champion("zzz")


# ---- feedback writer ----------------------------------------------------------------------------
def test_feedback_writer_is_idempotent_across_threads_and_restarts(settings):
    rows = [_event(f"x{i}") for i in range(5)]
    w = FeedbackWriter(settings.landing_dir, settings.state_dir / "serving")
    results = []
    threads = [threading.Thread(target=lambda: results.append(w.write(rows))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.accepted for r in results) == 5 and sum(r.duplicates for r in results) == 35
    files = list(settings.landing_dir.glob("serving-*.parquet"))
    assert len(files) == 1
    landed = pd.read_parquet(files[0])
    from recloop.schema import FEEDBACK_COLUMNS

    assert list(landed.columns) == list(FEEDBACK_COLUMNS) and sorted(landed["event_id"]) == [f"x{i}" for i in range(5)]
    w2 = FeedbackWriter(settings.landing_dir, settings.state_dir / "serving")  # a restarted server
    assert w2.write(rows + [_event("x5")]).accepted == 1


def test_impression_log_round_trip(settings):
    log = ImpressionLog(settings.root / "impressions")
    log.log([{"impression_id": "i1", "timestamp": "2026-01-06T00:00:00+00:00", "item_id": "a", "rank": 1,
              "explored": False}, {"impression_id": "i1", "timestamp": "2026-01-06T00:00:00+00:00",
                                   "item_id": "b", "rank": 2, "explored": True}])
    assert log.flush() == 2
    df = read_impressions(settings)
    assert list(df["item_id"]) == ["a", "b"] and list(df["explored"]) == [False, True]


def test_rate_limiter_token_bucket():
    now = [0.0]
    lim = RateLimiter(60, clock=lambda: now[0])  # one per second, burst 60
    assert lim.try_acquire({"u": 60})[0]
    ok, retry = lim.try_acquire({"u": 1})
    assert not ok and retry >= 1.0
    assert lim.try_acquire({"v": 1})[0]  # per user
    now[0] = 5.0
    assert lim.try_acquire({"u": 5})[0] and not lim.try_acquire({"u": 1})[0]
    assert not lim.try_acquire({"w": 61})[0]  # more than the burst at once
