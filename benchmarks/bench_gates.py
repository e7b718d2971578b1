"""Benchmark: the paired bootstrap of decide_promotion (and the evaluation metrics it reads).

    .venv/bin/python benchmarks/bench_gates.py [--repeats 5]

Prints the median wall time of: paired_bootstrap_auc with 500 resamples (events and users)
on 10k and 100k events, and evaluate_scores on 100k events.
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


def main() -> None:
    from models.evaluate import evaluate_scores
    from models.gates import paired_bootstrap_auc

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
            t = median_time(lambda: paired_bootstrap_auc(y, a, b, samples=500, seed=1, groups=groups), args.repeats)
            rows.append((f"paired_bootstrap_auc 500 resamples, {n:,} events, by {unit}", t))
    n = 100_000
    y = rng.integers(0, 2, n)
    scored = pd.DataFrame({"event_id": np.arange(n).astype(str), "user_id": (rng.integers(0, 5000, n)).astype(str),
                           "item_id": (rng.zipf(1.5, n) % 2000).astype(str), "label": y,
                           "score": y * 0.5 + rng.normal(size=n)})
    users = pd.DataFrame({"user_id": np.arange(5000).astype(str), "gender": rng.choice(["f", "m"], 5000),
                          "age_bucket": rng.choice(["18-24", "25-34", "35-49", "50+"], 5000)})
    pop = scored.groupby("item_id").size()
    t = median_time(lambda: evaluate_scores(scored, users, set(pop.index[:1500]), pop, k=10), args.repeats)
    rows.append((f"evaluate_scores, {n:,} events, 5,000 users, 2 group columns", t))
    for name, t in rows:
        print(f"{name:70s} {t:8.3f} s")


if __name__ == "__main__":
    main()
