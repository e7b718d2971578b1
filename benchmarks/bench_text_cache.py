"""Memory of a saved model's item-text cache: load it, read every cached text (what the item-tower build at
server start does), report RSS and time. One process per run; pair a tree with another by ``--tree``.

    .venv/bin/python benchmarks/bench_text_cache.py /tmp/recloop-bench-serving-1m/model   # a bench_serving model
    .venv/bin/python benchmarks/bench_text_cache.py MODEL --tree /tmp/old-tree            # another checkout

Prints one JSON line: texts cached, RSS after load, RSS after reading all, peak RSS, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="a saved Recommender directory")
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1],
                    help="the source tree to import recloop from (default: this one)")
    ap.add_argument("--chunk", type=int, default=100_000)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.tree))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from models.recommender import Recommender

    t0 = time.perf_counter()
    model = Recommender.load(args.model)
    load_s, loaded = time.perf_counter() - t0, _rss_mib()
    texts = list(model._text_cache)
    t0 = time.perf_counter()
    for s in range(0, len(texts), args.chunk):
        model.text_vectors(texts[s: s + args.chunk])
    out = {"tree": str(args.tree), "model": str(args.model), "texts": len(texts), "load_s": round(load_s, 1),
           "rss_loaded_mib": round(loaded), "rss_after_reading_all_mib": round(_rss_mib()),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "read_all_s": round(time.perf_counter() - t0, 2)}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
