"""Benchmark: wall time of the gates' bootstrap, of decide_promotion, and of the metrics it reads.

    .venv/bin/python benchmarks/bench_gates.py [--repeats 5]

Prints the median wall time of: paired_bootstrap_auc with 500 resamples (events and users)
on 10k and 100k events; decide_promotion with the default settings (500 resamples of users)
for a candidate, a champion, four baselines and two group columns on 20k and 100k events;
and evaluate_scores on 100k events. (Statistical power: benchmarks/bench_gate_power.py.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def scored_events(rng, n: int, n_users: int, users: pd.DataFrame) -> pd.DataFrame:
    uid = rng.integers(0, n_users, n)
    frame = pd.DataFrame({"event_id": np.arange(n).astype(str), "user_id": uid.astype(str),
                          "item_id": (rng.zipf(1.5, n) % 2000).astype(str), "label": rng.integers(0, 2, n)})
    for col in ("gender", "age_bucket"):
        frame[f"group:{col}"] = users[col].to_numpy()[uid]
    return frame


def main() -> None:
    from models.bootstrap import paired_bootstrap_auc
    from models.evaluate import Evaluation, auc, evaluate_scores
    from models.gates import decide_promotion
    from recloop.settings import GateSettings

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n in (10_000, 100_000):
        y = rng.integers(0, 2, n)
        a, b = y * 0.6 + rng.normal(size=n), y * 0.5 + rng.normal(size=n)
        users = rng.integers(0, n // 20, n)
        for unit, groups in (("event", None), ("user", users)):
            t = median_time(lambda y=y, a=a, b=b, g=groups: paired_bootstrap_auc(y, a, b, samples=500, seed=1,
                                                                                 groups=g), args.repeats)
            rows.append((f"paired_bootstrap_auc 500 resamples, {n:,} events, by {unit}", t))

    n_users = 5000
    users = pd.DataFrame({"user_id": np.arange(n_users).astype(str), "gender": rng.choice(["f", "m"], n_users),
                          "age_bucket": rng.choice(["18-24", "25-34", "35-49", "50+"], n_users)})
    for n in (20_000, 100_000):
        frame = scored_events(rng, n, n_users, users)
        y = frame["label"].to_numpy()

        def ev(signal, y=y, n=n, frame=frame):
            s = signal * y + rng.normal(size=n)
            return Evaluation(auc=auc(y, s), ndcg_at_k=0.2, recall_at_k=0.2, per_group_auc={}, group_auc_gap={},
                              cold_item_auc=float("nan"), tail_exposure=0.3, n_events=n, n_users=n_users,
                              n_positive=int(y.sum()), ranking_scope="catalog", scored=frame.assign(score=s))

        cand, champ = ev(0.8), ev(0.8)
        baselines = {name: ev(sig) for name, sig in (("statistics-lr", 0.4), ("fresh-popularity", 0.3),
                                                     ("popularity", 0.2), ("mf", 0.5))}
        t = median_time(lambda c=cand, h=champ, b=baselines: decide_promotion(c, h, GateSettings(), b), args.repeats)
        rows.append((f"decide_promotion, {n:,} events, champion + 4 baselines + 2 group columns", t))

    n = 100_000
    scored = scored_events(rng, n, n_users, users).drop(columns=["group:gender", "group:age_bucket"])
    scored["score"] = scored["label"] * 0.5 + rng.normal(size=n)
    pop = scored.groupby("item_id").size()
    t = median_time(lambda: evaluate_scores(scored, users, set(pop.index[:1500]), pop, k=10), args.repeats)
    rows.append((f"evaluate_scores, {n:,} events, 5,000 users, 2 group columns", t))
    for name, t in rows:
        print(f"{name:80s} {t:8.3f} s")


if __name__ == "__main__":
    main()
