"""Benchmark: validation (GX) + ingest throughput on 1M synthetic feedback events.

    .venv/bin/python benchmarks/bench_ingest.py [--rows 1000000] [--repeats 3]

Measures, each as the median of ``--repeats`` runs on a fresh workspace:

* ``bare``: ``pd.read_parquet`` + ``DataFrame.to_parquet`` of the same file (the floor);
* ``validate``: ``prepare_feedback_frame`` + the GX checkpoint (no store, no docs);
* ``ingest, docs off`` / ``ingest, docs on``: ``ingest_batch`` end to end (read, validate,
  append to the partitioned store, move, sidecar JSON; with or without Data Docs HTML).

Prints rows/s and the overhead ratio of each to ``bare``. Target: 1M events validated
and stored in under 60 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_world(n: int, n_items: int = 5_000, n_users: int = 100_000, seed: int = 0):
    from recloop.schema import EVENT_TYPES, LABEL_BY_EVENT

    rng = np.random.default_rng(seed)
    catalog = pd.DataFrame({"item_id": [f"item-{i:06d}" for i in range(n_items)],
                            "title": [f"Item {i}" for i in range(n_items)],
                            "description": [f"About item {i}" for i in range(n_items)],
                            "category": rng.choice(["cooking", "travel", "jazz", "history"], n_items)})
    etype = rng.choice(np.array(EVENT_TYPES), size=n, p=[0.6, 0.2, 0.1, 0.05, 0.05])
    now = pd.Timestamp.now(tz="UTC").floor("D")
    events = pd.DataFrame({
        "event_id": pd.Series([f"ev-{i:09d}" for i in range(n)], dtype="string"),
        "user_id": pd.Series([f"user-{u:06d}" for u in rng.integers(0, n_users, n)], dtype="string"),
        "item_id": pd.Series(catalog["item_id"].to_numpy()[rng.integers(0, n_items, n)], dtype="string"),
        "event_type": pd.Series(etype, dtype="string"),
        "label": pd.Series(etype).map(LABEL_BY_EVENT).astype("int8"),
        "timestamp": now - pd.Timedelta(days=7) + pd.to_timedelta(np.sort(rng.integers(0, 7 * 86_400, n)), unit="s"),
        "query": pd.Series(np.where(rng.random(n) < 0.1, "jazz piano", None), dtype="string"),
        "model_version": pd.Series(["3"] * n, dtype="string"),
    })
    return catalog, events


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from data_checks.ingest import ingest_batch
    from data_checks.validate import prepare_feedback_frame, validate_frame
    from recloop.settings import load_settings
    from recloop.store import FeedbackStore

    tmp = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    catalog, events = make_world(args.rows)
    source = tmp / "source.parquet"
    events.to_parquet(source, index=False)
    size_mb = source.stat().st_size / 1e6
    print(f"{args.rows:,} events, {size_mb:.1f} MB parquet, catalog {len(catalog):,} items", flush=True)

    results: dict[str, list[float]] = {"bare read_parquet + to_parquet": [], "validate (prepare + GX)": [],
                                       "ingest, Data Docs off": [], "ingest, Data Docs on": []}
    # warm-up: imports and the GX context (once per process, as in a long-running worker)
    warm = load_settings(tmp / "warm")
    warm.checks.data_docs = False
    prepare_and_validate = lambda s: validate_frame(
        prepare_feedback_frame(pd.read_parquet(source), set(), catalog["item_id"].to_numpy()), s)
    validate_frame(prepare_feedback_frame(events.head(1000), set(), catalog["item_id"].to_numpy()), warm)

    for r in range(args.repeats):
        out = tmp / "bare.parquet"
        results["bare read_parquet + to_parquet"].append(timed(lambda out=out: pd.read_parquet(source).to_parquet(out)))
        o = {}
        results["validate (prepare + GX)"].append(timed(lambda o=o: o.setdefault("v", prepare_and_validate(warm))))
        assert o["v"].decision == "pass", o["v"].reasons
        for label, docs in (("ingest, Data Docs off", False), ("ingest, Data Docs on", True)):
            ws = tmp / f"ws-{r}-{docs}"
            s = load_settings(ws).ensure_dirs()
            s.checks.data_docs = docs
            FeedbackStore.from_settings(s).upsert_catalog(catalog)
            landed = s.landing_dir / "batch.parquet"
            shutil.copy(source, landed)
            res = {}
            results[label].append(timed(lambda res=res, landed=landed, s=s: res.setdefault("o", ingest_batch(landed, s))))
            assert res["o"].status == "ingested" and res["o"].n_new == args.rows, res["o"].reasons
            assert FeedbackStore.from_settings(s).count() == args.rows
            shutil.rmtree(ws)
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in results.items()), flush=True)

    bare = statistics.median(results["bare read_parquet + to_parquet"])
    print(f"\n| step ({args.rows:,} events, median of {args.repeats}) | seconds | rows/s | ratio to bare |")
    print("|---|---:|---:|---:|")
    for k, v in results.items():
        m = statistics.median(v)
        print(f"| {k} | {m:.2f} | {args.rows / m:,.0f} | {m / bare:.1f}x |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
