"""The cold-start list's order, chosen on held-out data.

A user without a positive in the history gets serving's popular list (smoothed like-rate x log
positives: "popular *and* liked", :func:`popular_order`). Two orders of it compete:

* ``"model"`` - the best ``serving.rescore`` of the list re-scored by the model's like-probability
  (the order before this module existed, and the default for models saved without a choice);
* ``"popularity"`` - the list's own order.

The model answers "is this item liked once the user has it". On self-selected feedback (ratings) a new
user's next likes are mostly among the most-had items, and re-ordering the popular list by like-rate
moves well-liked but less-had items up (MovieLens-100k: NDCG@10 for new users 0.14-0.23 re-scored, 0.30
in the list's order). Where feedback follows what was shown, re-scoring can win. So the training run
decides with the selection run's model (towers, ranker and collaborative counts fitted on the train part;
the validation part chose only its epoch count and its 3 blend weights, which if anything favours
re-scoring): over the users of the validation part who have no positive before it, the catalog NDCG@``k`` (``models.catalog_eval``, as
served) of both orders; ``"popularity"`` only when it is higher on at least ``MIN_USERS`` such users.
The cold-start list's long-tail share is the same either way (its candidates are the most popular items).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from models.features import ServingStats

ORDERS = ("model", "popularity")
MIN_USERS = 30  # fewer new users with a like in the validation part: keep "model" (no evidence)


def popular_order(stats: ServingStats, n_items: int) -> np.ndarray:
    """Positions of the items with at least one event, by serving's cold-start score (smoothed like-rate x
    log(1 + positives)), best first; ties keep the catalog order."""
    n_pos = stats.item_n_pos[:n_items].astype(np.float64)
    score = (n_pos + 1.0) / (stats.item_n[:n_items] + 2.0) * np.log1p(n_pos)
    seen = stats.item_n[:n_items] > 0
    return np.flatnonzero(seen)[np.argsort(-score[seen], kind="stable")]


def order_of(model) -> str:
    """The model's cold-start order (``"model"`` when it carries none: models saved before the choice)."""
    config = getattr(model, "config", None)
    order = (config.get("cold_start_order") if isinstance(config, dict) else None) or "model"
    if order not in ORDERS:
        raise ValueError(f"unknown cold_start_order {order!r} (expected one of {ORDERS})")
    return order


class _PopularList:
    """The cold-start list in its own order (what ``"popularity"`` serves)."""

    name = "popular list"

    def top_k(self, stats, user_id, exclude, k, n_items):
        order = popular_order(stats, n_items)
        return order[~np.isin(order, np.asarray(exclude, dtype=np.int64))][:k]


def choose_cold_start_order(model, events, catalog, start, end, *, lag=None, k: int = 10,
                            candidates: int = 200, rescore: int = 50, min_users: int = MIN_USERS) -> tuple[str, dict]:
    """``(order, evidence)``: the cold-start order for ``model`` judged on the window ``[start, end]`` of
    ``events`` (history = events before ``start - lag``), over the window's users without a positive in
    the history. ``model`` must not have been fitted on the window's events."""
    from models.catalog_eval import ModelRanker, build_eval_set, evaluate_ranker

    es = build_eval_set(events, catalog, start, end, lag=lag, max_users=0, seed=0)
    new = [j for j, u in enumerate(es.users) if not len(es.stats.user(u).positives)]
    info = {"n_new_users": len(new), "min_users": int(min_users), "k": int(k)}
    if len(new) < min_users:
        info["reason"] = f"{len(new)} new users with a like in the validation part (< {min_users}): kept 'model'"
        return "model", info
    sub = dataclasses.replace(es, users=[es.users[j] for j in new], relevant=[es.relevant[j] for j in new],
                              seen=[es.seen[j] for j in new])
    ranked = ModelRanker(model, candidates=candidates, rescore=rescore)
    ranked.cold_start_order = "model"  # judge the re-scored list whatever the model already carries
    ndcg = {"model": evaluate_ranker(ranked, sub, k).ndcg_at_k,
            "popularity": evaluate_ranker(_PopularList(), sub, k).ndcg_at_k}
    info.update({f"ndcg_{name}": round(float(v), 4) for name, v in ndcg.items()})
    order = "popularity" if ndcg["popularity"] > ndcg["model"] else "model"
    info["reason"] = f"NDCG@{k} over {len(new)} new users: re-scored {ndcg['model']:.4f}, list order {ndcg['popularity']:.4f}"
    return order, info
