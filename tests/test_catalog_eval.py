"""Catalog ranking metrics (models/catalog_eval.py): chance level, oracle, tail exposure, exclusion of
seen items, the history cut at the window's start, and the model ranker following serving's path."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from models.catalog_eval import (
    BaselineRanker,
    CatalogEvaluation,
    ModelRanker,
    PopularityRanker,
    RandomRanker,
    build_eval_set,
    eval_set_for,
    evaluate_catalog,
    evaluate_catalog_ranking,
    evaluate_ranker,
    ranker_for,
    top_n,
    top_n_scores,
)
from models.evaluate import item_popularity

T0 = pd.Timestamp("2026-01-01", tz="UTC")
START = T0 + pd.Timedelta(days=10)


def _world(n_items: int = 50, n_users: int = 40, n_seen: int = 3, n_relevant: int = 4, seed: int = 0):
    """Items i00.. with strictly decreasing popularity (filler users, days 0-9); eval users u.. with
    ``n_seen`` history events on random items and ``n_relevant`` positives in days 10-12."""
    rng = np.random.default_rng(seed)
    items = [f"i{j:03d}" for j in range(n_items)]
    catalog = pd.DataFrame({"item_id": items, "category": [f"c{j % 5}" for j in range(n_items)]})
    rows = []
    for j, item in enumerate(items):
        for e in range(n_items - j):
            rows.append((f"f{e}", item, int(rng.random() < 0.5), T0 + pd.Timedelta(hours=int(rng.integers(0, 240)))))
    for u in range(n_users):
        for j in rng.choice(n_items, n_seen, replace=False):
            rows.append((f"u{u}", items[j], int(rng.random() < 0.5), T0 + pd.Timedelta(hours=int(rng.integers(0, 240)))))
        for j in rng.choice(n_items, n_relevant, replace=False):
            rows.append((f"u{u}", items[j], 1, START + pd.Timedelta(hours=int(rng.integers(0, 72)))))
        rows.append((f"u{u}", items[int(rng.integers(n_items))], 0, START + pd.Timedelta(hours=1)))
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "label", "timestamp"])
    return events, catalog


class OracleRanker:
    name = "oracle"

    def __init__(self, data):
        self.rel = dict(zip(data.users, data.relevant))

    def top_k(self, stats, user_id, exclude, k, n_items):
        rel = self.rel[user_id]
        rest = np.setdiff1d(np.arange(n_items), np.concatenate([rel, exclude]))
        return np.concatenate([rel, rest])[:k]


def test_random_ranker_scores_near_its_expectation_and_low():
    events, catalog = _world(n_items=200, n_users=300)
    data = build_eval_set(events, catalog, START)
    runs = [evaluate_ranker(RandomRanker(seed), data, 10) for seed in range(8)]
    mean = float(np.mean([r.ndcg_at_k for r in runs]))
    expected = runs[0].ndcg_random
    assert 0.01 < expected < 0.1
    assert mean == pytest.approx(expected, rel=0.2)
    assert all(r.ndcg_at_k < 0.15 for r in runs)
    assert np.mean([r.tail_exposure for r in runs]) == pytest.approx(0.8, abs=0.05)  # the head is 20 %


def test_oracle_gets_ndcg_one():
    events, catalog = _world()
    data = build_eval_set(events, catalog, START)
    m = evaluate_ranker(OracleRanker(data), data, 3, per_user=True)
    assert m.ndcg_at_k == pytest.approx(1.0)
    assert m.recall_at_k == pytest.approx(np.mean([min(3, len(r)) / len(r) for r in data.relevant]))
    assert m.n_users == len(data.users) == m.per_user.shape[0] > 30
    assert (m.per_user["hits"] == np.minimum(3, m.per_user["n_relevant"])).all()
    d = m.to_dict()
    assert "per_user" not in d and d["k"] == 3


def test_popularity_ranker_shows_no_tail_and_seen_items_are_excluded():
    events, catalog = _world()
    train = events[events["timestamp"] < START]
    data = build_eval_set(events, catalog, START)
    assert data.head.sum() == 10  # 20 % of 50
    counts = item_popularity(train)
    pop = PopularityRanker(counts)
    m = evaluate_ranker(pop, data, 5, per_user=True)
    assert m.tail_exposure == 0.0
    by_pop = np.argsort(-counts.reindex(data.stats.item_ids[: data.n_items]).fillna(0).to_numpy(), kind="stable")
    # no top-5 ever holds an item the user had an event with; otherwise it is the most popular items
    for user, seen in zip(data.users, data.seen):
        top = pop.top_k(data.stats, user, seen, 5, data.n_items)
        assert len(top) == 5 and not np.isin(top, seen).any()
        assert np.array_equal(top, by_pop[~np.isin(by_pop, seen)][:5])


def test_relevant_items_are_new_to_the_user_and_cheaters_are_caught():
    events, catalog = _world()
    # u0 liked i000 before the window and again inside it: not a held-out positive
    extra = pd.DataFrame({"user_id": ["u0", "u0"], "item_id": ["i000", "i000"], "label": [1, 1],
                          "timestamp": [START - pd.Timedelta(days=1), START + pd.Timedelta(hours=2)]})
    events = pd.concat([events, extra], ignore_index=True)
    data = build_eval_set(events, catalog, START)
    j = data.users.index("u0")
    pos0 = data.stats.item_pos["i000"]
    assert pos0 in data.seen[j] and pos0 not in data.relevant[j]
    for rel, seen in zip(data.relevant, data.seen):
        assert len(rel) and not np.isin(rel, seen).any()

    class Cheater:
        name = "cheater"

        def top_k(self, stats, user_id, exclude, k, n_items):
            return np.asarray(exclude[:k])

    with pytest.raises(ValueError, match="excluded"):
        evaluate_ranker(Cheater(), data, 3)


def test_history_is_cut_at_the_window_start_minus_the_lag_and_users_are_sampled():
    events, catalog = _world()
    t = events["timestamp"]
    for lag in (None, pd.Timedelta(days=2)):
        data = build_eval_set(events, catalog, START, lag=lag)
        cut = START - (lag or pd.Timedelta(0))
        assert data.stats.n_events == int((t < cut).sum())
        assert data.stats.ref_now <= START.value
    # events after eval_end are not held-out positives
    short = build_eval_set(events, catalog, START, START + pd.Timedelta(hours=6))
    assert sum(map(len, short.relevant)) < sum(map(len, build_eval_set(events, catalog, START).relevant))
    a = build_eval_set(events, catalog, START, max_users=10, seed=1)
    b = build_eval_set(events, catalog, START, max_users=10, seed=1)
    assert len(a.users) == 10 and a.users == b.users and a.n_eligible_users == 40
    assert len(build_eval_set(events, catalog, START, max_users=0).users) == 40


def test_evaluate_catalog_takes_its_defaults_from_settings(settings):
    events, catalog = _world()
    settings.gates.k = 4
    settings.gates.catalog_eval_users = 7
    out = evaluate_catalog({"random": RandomRanker(0), "popularity": PopularityRanker()}, events, catalog, START,
                           settings=settings)
    assert set(out) == {"random", "popularity"}
    assert all(isinstance(m, CatalogEvaluation) and m.k == 4 and m.n_users == 7 for m in out.values())


def test_retrain_data_is_judged_on_one_cached_eval_set(settings, world):
    """What the pipeline calls: every baseline's ranker on the retrain's window, one eval set for all."""
    from dataclasses import dataclass

    from models.baselines import make_baselines

    @dataclass(eq=False)
    class Data:  # the fields of models.pipeline.RetrainData the catalog evaluation reads
        events: pd.DataFrame
        train: pd.DataFrame
        catalog: pd.DataFrame
        train_end: pd.Timestamp
        eval_end: pd.Timestamp
        feature_lag: pd.Timedelta

    start = world.day_start(7)
    ev = world.events
    data = Data(ev, ev[ev["timestamp"] < start], world.catalog, start, ev["timestamp"].max(), pd.Timedelta(hours=1))
    settings.gates.catalog_eval_users = 50
    first = eval_set_for(settings, data)
    assert eval_set_for(settings, data) is first and len(first.users) == 50
    assert first.stats.n_events == int((ev["timestamp"] < start - pd.Timedelta(hours=1)).sum())
    out = {}
    for name, b in make_baselines(settings).items():
        out[name] = evaluate_catalog_ranking(settings, ranker_for(b.fit(data.train, ev, world.catalog)), data)
        assert out[name].n_users == 50 and out[name].k == settings.gates.k
    assert out["statistics-lr"].ndcg_at_k > out["statistics-lr"].ndcg_random
    with pytest.raises(TypeError):
        ranker_for(object())


def test_top_n_is_the_serving_index_retrieval():
    from serving.index import ItemIndex

    rng = np.random.default_rng(0)
    v = rng.normal(size=(300, 8)).astype(np.float32)
    v[10] = v[20] = v[30]  # ties: lower row first
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    idx = ItemIndex(item_ids=np.array([f"x{j}" for j in range(300)]), vectors=v, hashes=np.zeros(300, np.uint64),
                    row={})
    for q, excl in ((v[30], None), (rng.normal(size=8), np.array([3, 4, 5])), (v[20], np.array([10]))):
        a_rows, a_sims = top_n(v, q, 25, excl)
        b_rows, b_sims = idx.top_n(q, 25, excl)
        assert np.array_equal(a_rows, b_rows) and np.allclose(a_sims, b_sims)
    rows, _ = top_n(v, v[30], 3)
    assert list(rows) == [10, 20, 30]
    rows, _ = top_n_scores(np.array([1.0, 3.0, 3.0, -np.inf, 2.0]), 10)
    assert list(rows) == [1, 2, 4, 0]  # non-finite never returned


# ------------------------------------------------------------------------------------------ with a model
@pytest.fixture(scope="module")
def world():
    from recloop.datasets.synthetic import generate
    from tests.conftest import small_world_config

    return generate(small_world_config())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, world):
    from models.testing import make_tiny_encoder
    from models.train import train_recommender
    from recloop.settings import load_settings

    root = tmp_path_factory.mktemp("catalog-eval")
    enc = make_tiny_encoder(root / "encoder")
    s = load_settings(root / "ws", training={"encoder_path": str(enc), "max_epochs": 1, "embed_dim": 16,
                                             "batch_size": 256})
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            trained = train_recommender(s, world.events[world.events["timestamp"] < world.day_start(10)],
                                        world.catalog, world.users, run_dir=root / "run")
        yield world, trained.model
    finally:
        torch.set_num_threads(saved)


def test_model_ranker_retrieves_rescores_and_orders_like_serving(tiny):
    world, model = tiny
    events, catalog = world.events, world.catalog
    start = world.day_start(10)
    data = build_eval_set(events, catalog, start, lag=pd.Timedelta(minutes=10))
    history = events[events["timestamp"] < start - pd.Timedelta(minutes=10)]
    ranker = ModelRanker(model, candidates=30, rescore=12)
    assert ModelRanker(model).candidates == 200
    _ids, vecs = model.item_vectors(catalog)
    checked = 0
    for user, seen in list(zip(data.users, data.seen))[:6]:
        top = ranker.top_k(data.stats, user, seen, 5, data.n_items)
        assert len(top) == 5 and not np.isin(top, seen).any()
        uvec = model.user_vectors([user], history, catalog)[0]
        retrieved = np.argsort(-(vecs @ uvec), kind="stable")
        retrieved = retrieved[~np.isin(retrieved, seen)][:12]
        assert set(top) <= set(retrieved)  # only the best `rescore` of the retrieved are re-scored
        # ... and ordered by the full model's probability (the general pandas path, no timestamps)
        p = model.score(pd.DataFrame({"user_id": user, "item_id": data.stats.item_ids[retrieved]}), history, catalog)
        assert np.array_equal(top, retrieved[np.argsort(-p, kind="stable")[:5]])
        checked += 1
    assert checked == 6
    # a user without any history (cold start) still gets a full list
    cold = ranker.top_k(data.stats, "nobody-at-all", np.empty(0, dtype=np.int64), 5, data.n_items)
    assert len(cold) == 5
    m = evaluate_ranker(ranker, data, 5)
    r = evaluate_ranker(RandomRanker(0), data, 5)
    assert 0.0 <= m.ndcg_at_k <= 1.0 and 0.0 <= m.tail_exposure <= 1.0 and m.n_users == r.n_users > 20


def test_statistics_ranker_beats_random_on_the_catalog(world):
    from models.baselines import FreshPopularityBaseline, StatisticsBaseline

    start = world.day_start(7)  # before the drift (day 9): 88 eval users
    train = world.events[world.events["timestamp"] < start]
    data = build_eval_set(world.events, world.catalog, start)
    stat = evaluate_ranker(BaselineRanker(StatisticsBaseline().fit(train, world.events, world.catalog)), data, 10)
    fresh = evaluate_ranker(BaselineRanker(FreshPopularityBaseline().fit(train, world.events, world.catalog)), data, 10)
    assert stat.n_users > 60
    assert stat.ndcg_at_k > 1.5 * stat.ndcg_random  # measured 0.172 vs chance 0.091
    assert fresh.ndcg_at_k > stat.ndcg_random
