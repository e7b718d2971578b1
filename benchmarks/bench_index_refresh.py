"""What a catalog refresh pays to reuse unchanged items' search vectors when only the HNSW graph holds them.

    .venv/bin/python benchmarks/bench_index_refresh.py /tmp/recloop-bench-serving-1m   # after bench_serving's 1M run

Behind a graph the item index keeps no copy of the text vectors (``serving.index.ItemIndex.with_ann``); a
refresh (``ItemIndex.build(..., previous=...)``) reads the unchanged items' vectors back from the graph
(``_GraphRows`` → ``AnnIndex.stored``). This loads the text graph that ``bench_serving.py`` saved under
``<workdir>/model/ann/`` and times that read for every item, against the same rows taken from a dense float16
array (the old path's copy), each in its own process; prints seconds and peak RSS before / after.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--one", choices=["graph", "dense"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.workdir, args.one)))
        return
    for _ in range(args.runs):  # interleaved, each in a fresh process (peak RSS is per process)
        for source in ("graph", "dense"):
            out = subprocess.run([sys.executable, __file__, str(args.workdir), "--one", source],
                                 capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
