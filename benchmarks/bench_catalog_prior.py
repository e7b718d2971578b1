"""Why MostPop wins the catalog on MovieLens-100k, and what an interaction prior would buy (not built).

    .venv/bin/python benchmarks/bench_catalog_prior.py [--cache ~/.cache/recloop/ml-100k] [--lag 600]

The model predicts P(like | the user has the item). On self-selected feedback (ratings) what a user goes
on to like is mostly what gets rated: P(rated and liked) = P(rated) x P(like | rated). This trains the
model on ``bench_real.py --train``'s split (first 80 % of events by time) and ranks each test user's whole
catalog (``models.catalog_eval``'s evaluation set: history before the test part minus the lag, relevant =
what they went on to like) by ``logit P(like) + beta * log(1 + events of the item)`` for a grid of
``beta``, over every unseen item ("all") and over serving's candidates (the user tower's top 200, all of
them re-scored; serving itself re-scores the best 50; cold users: the popular list). beta = 0 is the model's own order; a large beta is MostPop with the model as
tie-break. Prints NDCG@10 and the tail share of the top-10 slots (the gate's floor is 0.05).

An exploration, not a setting: the grid is read on the test part itself, so the best beta here is
optimistic; a real prior would be chosen on the validation window at train time (see RESULTS).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
DEFAULT_CACHE = Path.home() / ".cache" / "recloop" / "ml-100k"
BETAS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


def run(cache: Path = DEFAULT_CACHE, lag: float = 600.0, test_events: int = 20_000) -> dict:
    from benchmarks.bench_real import _users_with_age
    from models.catalog_eval import _discounts, build_eval_set, top_n
    from models.evaluate import item_popularity
    from models.train import train_recommender
    from recloop.datasets.recbole import load_recbole
    from recloop.settings import load_settings

    data = load_recbole(cache)
    users = _users_with_age(cache, data.users)
    ev = data.events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    tr, te = ev.iloc[:-test_events].reset_index(drop=True), ev.iloc[-test_events:].reset_index(drop=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="recloop-prior-") as tmp:
        settings = load_settings(tmp, feature_lag_seconds=float(lag))
        model = train_recommender(settings, tr, data.catalog, users).model
    es = build_eval_set(ev, data.catalog, te["timestamp"].min(), te["timestamp"].max(),
                        lag=pd.Timedelta(seconds=lag), max_users=2000, seed=0, popularity=item_popularity(tr))
    st, n = es.stats, es.n_items
    _ids, vecs = model.item_vectors(st.catalog)
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    log_n = np.log1p(st.item_n[:n].astype(np.float64))
    n_pos = st.item_n_pos[:n].astype(np.float64)
    popular = np.argsort(-((n_pos + 1.0) / (st.item_n[:n] + 2.0) * np.log1p(n_pos)), kind="stable")
    disc = _discounts(10)
    ndcg = {(c, b): [] for c in ("all", "serving") for b in BETAS}
    tail = {k: [] for k in ndcg}
    for user, rel, seen in zip(es.users, es.relevant, es.seen):
        ctx = model.user_context(st, user)
        every = np.setdiff1d(np.arange(n), seen)
        p = np.clip(model.score_items(st, ctx, st.item_ids[every].tolist()), 1e-6, 1 - 1e-6)
        logit = dict(zip(every.tolist(), np.log(p / (1 - p))))
        if len(ctx.stats.positives):
            serving, _ = top_n(vecs, ctx.vector, 200, seen)
        else:
            serving = popular[~np.isin(popular, seen)][:200]
        for c, cand in (("all", every), ("serving", serving)):
            lg = np.fromiter((logit[j] for j in cand.tolist()), dtype=np.float64, count=len(cand))
            for b in BETAS:
                top = cand[np.argsort(-(lg + b * log_n[cand]), kind="stable")[:10]]
                hit = np.isin(top, rel)
                ndcg[(c, b)].append(float((hit * disc[: len(top)]).sum() / disc[: min(len(rel), 10)].sum()))
                tail[(c, b)].append(float((~es.head[top]).mean()))
    out = {"n_users": len(es.users), "seconds": round(time.perf_counter() - t0, 1),
           "grid": {c: {b: {"ndcg_at_10": round(float(np.mean(ndcg[(c, b)])), 4),
                            "tail_exposure": round(float(np.mean(tail[(c, b)])), 3)} for b in BETAS}
                    for c in ("all", "serving")}}
    print(f"catalog NDCG@10 / tail share by beta ({out['n_users']} test users, lag {lag:g} s, {out['seconds']} s):")
    for c, row in out["grid"].items():
        print(f"  {c:8s} " + "  ".join(f"{b:g}: {v['ndcg_at_10']:.4f}/{v['tail_exposure']:.2f}" for b, v in row.items()))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--lag", type=float, default=600.0, help="feature lag in seconds")
    args = ap.parse_args(argv)
    from benchmarks.bench_real import fetch

    return run(fetch(args.cache), args.lag)


if __name__ == "__main__":
    main()
