"""The cold-start list's order (models/cold_start.py): chosen on held-out data, honoured by the catalog
evaluation and by serving."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from models.catalog_eval import ModelRanker, build_eval_set
from models.cold_start import MIN_USERS, choose_cold_start_order, order_of, popular_order
from models.features import ServingStats

T0 = pd.Timestamp("2026-01-01", tz="UTC")
START = T0 + pd.Timedelta(days=10)


def _world(n_items: int = 40, n_new: int = 40, seed: int = 0):
    """Items i000..i029 by falling popularity in days 0-9 (i000 most had), each liked by half of its raters;
    i030.. rare and well liked (3 raters, all liked); ``n_new`` users with no history like 3 of the 5 most
    popular items in days 10-11 (a self-selected log: new users' next likes are the most-had items)."""
    rng = np.random.default_rng(seed)
    items = [f"i{j:03d}" for j in range(n_items)]
    catalog = pd.DataFrame({"item_id": items, "category": "c"})
    rows = []
    for j, item in enumerate(items):
        for e in range(3 if j >= 30 else 2 * (n_items - j)):
            liked = 1 if j >= 30 else e % 2
            rows.append((f"f{e}", item, liked, T0 + pd.Timedelta(hours=int(rng.integers(0, 240)))))
    for u in range(n_new):
        for j in rng.choice(5, 3, replace=False):
            rows.append((f"new{u}", items[j], 1, START + pd.Timedelta(hours=int(rng.integers(0, 48)))))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "label", "timestamp"]), catalog


class FakeModel:
    """Just what ``ModelRanker`` calls; ``score`` maps (stats, item position) -> like-probability."""

    def __init__(self, score, config=None):
        self.score, self.config = score, config or {}

    def item_vectors(self, catalog):
        ids = catalog["item_id"].astype(str).to_numpy()
        return ids, np.eye(len(ids), 8, dtype=np.float32) + 1e-3

    def user_context(self, stats, user_id):
        return SimpleNamespace(vector=np.ones(8, dtype=np.float32), stats=stats.user(user_id))

    def score_items(self, stats, ctx, item_ids):
        return np.array([self.score(stats, p) for p in stats.positions(list(item_ids))], dtype=np.float64)


def niche(stats, p):  # a model that moves less-had items up (what re-scoring by like-rate did on MovieLens)
    return 1.0 / (1.0 + stats.item_n[p])


def test_popular_order_is_servings_cold_start_score():
    ev, cat = _world()
    stats = ServingStats.build(ev[ev["timestamp"] < START], cat)
    order = popular_order(stats, len(cat))
    n_pos = stats.item_n_pos[: len(cat)].astype(float)
    score = (n_pos + 1) / (stats.item_n[: len(cat)] + 2) * np.log1p(n_pos)
    assert np.all(np.diff(score[order]) <= 0) and len(order) == len(cat)


def test_order_of_reads_the_models_choice_and_defaults_to_model():
    assert order_of(FakeModel(niche)) == "model"  # models saved before the choice
    assert order_of(SimpleNamespace()) == "model"
    assert order_of(FakeModel(niche, {"cold_start_order": "popularity"})) == "popularity"
    with pytest.raises(ValueError, match="cold_start_order"):
        order_of(FakeModel(niche, {"cold_start_order": "alphabetical"}))


def test_self_selected_log_chooses_the_lists_order():
    ev, cat = _world()
    order, info = choose_cold_start_order(FakeModel(niche), ev, cat, START, START + pd.Timedelta(days=2),
                                          k=3, rescore=20)
    assert order == "popularity", info
    assert info["n_new_users"] == 40 and info["ndcg_popularity"] > info["ndcg_model"]


def test_a_model_that_knows_new_users_keeps_its_order():
    ev, cat = _world()
    future = set(ev.loc[ev["timestamp"] >= START, "item_id"])
    knows = FakeModel(lambda stats, p: 0.9 if stats.item_ids[p] in future else 0.1)  # ranks their likes first
    order, info = choose_cold_start_order(knows, ev, cat, START, START + pd.Timedelta(days=2), k=3, rescore=20)
    assert order == "model" and info["ndcg_model"] >= info["ndcg_popularity"]


def test_too_few_new_users_keeps_model():
    ev, cat = _world(n_new=MIN_USERS - 1)
    order, info = choose_cold_start_order(FakeModel(niche), ev, cat, START, START + pd.Timedelta(days=2), k=3)
    assert order == "model" and "< 30" in info["reason"] and "ndcg_model" not in info


def test_model_ranker_serves_cold_users_in_the_models_order():
    ev, cat = _world()
    data = build_eval_set(ev, cat, START, START + pd.Timedelta(days=2))
    user, seen = data.users[0], data.seen[0]
    listed = ModelRanker(FakeModel(niche, {"cold_start_order": "popularity"}), candidates=20, rescore=20)
    rescored = ModelRanker(FakeModel(niche), candidates=20, rescore=20)
    expected = popular_order(data.stats, data.n_items)[:5]
    assert np.array_equal(listed.top_k(data.stats, user, seen, 5, data.n_items), expected)
    top = rescored.top_k(data.stats, user, seen, 5, data.n_items)
    assert not np.array_equal(top, expected) and set(top) <= set(popular_order(data.stats, data.n_items)[:20])
    assert set(data.stats.item_ids[top]) == {"i015", "i016", "i017", "i018", "i019"}  # the least had of the 20
