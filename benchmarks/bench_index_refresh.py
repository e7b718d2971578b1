"""What a catalog refresh pays to reuse unchanged items' search vectors when only the HNSW graph holds them.

    .venv/bin/python benchmarks/bench_index_refresh.py /tmp/recloop-bench-serving-1m   # after bench_serving's 1M run

Behind a graph the item index keeps no copy of the text vectors (``serving.index.ItemIndex.with_ann``); a
refresh (``ItemIndex.build(..., previous=...)``) reads the unchanged items' vectors back from the graph
(``_GraphRows`` → ``AnnIndex.stored``). This loads the text graph that ``bench_serving.py`` saved under
``<workdir>/model/ann/`` and times that read for every item, against the same rows taken from a dense float16
array (the old path's copy), each in its own process; prints seconds and peak RSS before / after.

``--refresh`` times what a refresh that adds one item does with the text vectors, each way in its own process:
``eager`` reads every unchanged vector back before the graph update (the path before 2026-12-02), ``deferred``
(``ItemIndex.build(..., defer_text_reads=True)``) leaves them in the graph, and the incremental update reads
none. ``--items N`` first saves a synthetic text graph (N random unit 384-d vectors) into ``workdir`` when it
holds none (for a machine without ``bench_serving.py``'s store):

    .venv/bin/python benchmarks/bench_index_refresh.py /tmp/bench-refresh-200k --items 200000 --refresh
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _text_graph(workdir: Path):
    from serving.ann import AnnIndex, AnnParams

    ann_dir = workdir / "model" / "ann"
    metas = [json.loads(p.read_text()) for p in ann_dir.glob("*.meta.json")]
    meta = max(metas, key=lambda m: m["ndim"], default=None)  # the text graph: 384-d (the towers': 128-d)
    if meta is None:
        raise SystemExit(f"no saved graph under {ann_dir}: run benchmarks/bench_serving.py on it first")
    ann = AnnIndex.load(ann_dir, meta["key"], meta["prefix"], AnnParams())
    if ann is None:
        raise SystemExit(f"the graph {meta['prefix']}-{meta['key']} could not be loaded")
    return ann


def run_one(workdir: Path, source: str) -> dict:
    from serving import index as ix

    ann = _text_graph(workdir)
    n = len(ann.keys)
    ids = np.array([f"i{j}" for j in range(n)], dtype=object)
    hashes = np.arange(n, dtype=np.uint64)
    if source == "graph":  # the graph's keys, in its own order, stand for the catalog's items
        previous = ix._GraphRows(ann.bind(ann.keys), n)
    else:
        previous = np.concatenate([ann.stored(ann.keys[s:s + 65_536]) for s in range(0, n, 65_536)]).astype(np.float16)
    before = _peak_mib()
    t0 = time.perf_counter()
    _vectors, computed = ix._vectors(None, ids, hashes, None, 4096, (ids, hashes, previous))
    return {"source": source, "items": n, "seconds": round(time.perf_counter() - t0, 2), "computed": computed,
            "peak_rss_mib_before": round(before), "peak_rss_mib_after": round(_peak_mib())}


def run_refresh(workdir: Path, how: str) -> dict:
    """One new item's refresh of the text vectors + incremental graph update, ``how`` = eager | deferred."""
    from serving import index as ix

    ann = _text_graph(workdir)
    n = len(ann.keys)
    ids = np.array([f"i{j}" for j in range(n)], dtype=object)
    hashes = ann.hashes.copy()
    previous = (ids, hashes, ix._GraphRows(ann.bind(ann.keys), n))
    ids2 = np.append(ids, "new-item")
    hashes2 = np.append(hashes, np.uint64(7))
    keys2 = np.append(ann.keys, np.uint64(2**63 + 12345))
    catalog = pd.DataFrame({"item_id": ids2})
    rng = np.random.default_rng(1)

    def compute(rows):
        return rows["item_id"].to_numpy(), rng.standard_normal((len(rows), int(ann.graph.ndim)))

    before = _peak_mib()
    t0 = time.perf_counter()
    vectors, computed = ix._vectors(compute, ids2, hashes2, catalog, 4096, previous, defer=how == "deferred")
    t_vec = time.perf_counter() - t0
    updated = ann.updated(vectors, keys2, hashes2)
    seconds = time.perf_counter() - t0
    assert updated.how == "updated" and updated.n_added == 1 and computed == 1
    return {"how": how, "items": n, "seconds": round(seconds, 2), "vectors_s": round(t_vec, 2),
            "update_s": round(seconds - t_vec, 2), "peak_rss_mib_before": round(before),
            "peak_rss_mib_after": round(_peak_mib())}


def _synthetic_graph(workdir: Path, items: int) -> None:
    """Save a text graph of ``items`` random unit 384-d vectors under ``workdir`` unless one is there."""
    from serving.ann import AnnIndex, AnnParams

    ann_dir = workdir / "model" / "ann"
    if list(ann_dir.glob("*.meta.json")):
        return
    ann_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((items, 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    keys = np.arange(1, items + 1, dtype=np.uint64) * np.uint64(2654435761)
    t0 = time.perf_counter()
    ann = AnnIndex.build(vecs, keys, np.arange(items, dtype=np.uint64), AnnParams())
    ann.save(ann_dir, f"synthetic{items}", "synthetic-texts")
    print(f"synthetic text graph: {items} x 384 built in {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--refresh", action="store_true", help="time a one-item refresh, eager vs deferred reads")
    ap.add_argument("--items", type=int, default=None, help="save a synthetic text graph of this size first")
    ap.add_argument("--one", choices=["graph", "dense", "eager", "deferred"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one = run_refresh if args.one in ("eager", "deferred") else run_one
        print(json.dumps(one(args.workdir, args.one)))
        return
    if args.items:
        _synthetic_graph(args.workdir, args.items)
    for _ in range(args.runs):  # interleaved, each in a fresh process (peak RSS is per process)
        for source in (("eager", "deferred") if args.refresh else ("graph", "dense")):
            out = subprocess.run([sys.executable, __file__, str(args.workdir), "--one", source],
                                 capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
