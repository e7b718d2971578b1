"""ANN retrieval at catalog scale: build time, memory, recall@100 against exact search, search latency.

    .venv/bin/python benchmarks/bench_ann.py                 # 1,000,000 items (the issue's target size)
    .venv/bin/python benchmarks/bench_ann.py --quick         # 50,000 items: checks the code path works
    .venv/bin/python benchmarks/bench_ann.py --served /tmp/recloop-bench-serving-1m   # a served model's vectors

``--served``: recall@100 of the saved towers graph on that model's own user vectors, and what ``/recommend``
would answer (``served_top_k``): per user, the top-10 after re-scoring from exact retrieval, from the graph at
each ``--ef`` and from the inverted file (``serving/ivf.py``) at 32 / ``serving.ivf_probes`` / 128 probes -
overlap with the exact top-10, the model's mean probability over it, retrieval time.

What it measures, on ``--items`` unit vectors at the model's item-vector dimension
(``training.embed_dim``, 128) through the code serving uses (``serving.index.ItemIndex.with_ann`` /
``ItemIndex.top_n``, usearch HNSW, :class:`serving.ann.AnnParams` defaults unless overridden):

* **data**: ``clustered`` (default; items around ``items/100`` topic centres, like the item tower's
  output, which groups items by category and wording) or ``random`` (uniform on the sphere: the
  hardest case for any ANN index); queries are catalog vectors plus noise (a user near what they like);
* **build**: wall time of the graph build (``--threads`` build threads), RSS growth of the process
  during the build, ``Index.memory_usage`` and the saved file's size; save and load time (the load
  is what a serving restart does when the saved key matches);
* **recall@100** over ``--queries`` queries: share of the exact top-100 (every similarity computed)
  that ``ItemIndex.top_n(q, 100)`` returns, for each ``--ef`` (search breadth);
* **latency**: p50 / p99 of ``ItemIndex.top_n(q, 200)`` (``serving.candidates`` = 200, 20 excluded
  rows as for a user with history) on one thread, and of exact search for comparison.

Prints one JSON line. ``/recommend`` p99 through the real FastAPI app at 1,000,000 items is
``benchmarks/bench_serving.py --items 1000000 --synthetic-text-vectors`` (see its docstring).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x.astype(np.float32, copy=False)


def make_vectors(n: int, dim: int, kind: str, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors, built in chunks (1M x 128 float32 = 512 MB, no float64 copy)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    centres = _unit(rng.standard_normal((max(n // 100, 10), dim), dtype=np.float32)) if kind == "clustered" else None
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        noise = rng.standard_normal((m, dim), dtype=np.float32)
        if centres is None:
            out[s:s + m] = _unit(noise)
        else:  # within a topic cosine ~0.6-0.8; the nearest 100 items span several topics
            out[s:s + m] = _unit(centres[rng.integers(len(centres), size=m)] + 0.1 * noise)
    return out


def make_queries(vectors: np.ndarray, n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = vectors[rng.integers(len(vectors), size=n)] + 0.05 * rng.standard_normal((n, vectors.shape[1]),
                                                                                dtype=np.float32)
    return _unit(q)


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int, batch: int = 64) -> np.ndarray:
    """Ground truth: every similarity computed, the ``k`` best rows per query (as a set)."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), batch):
        sims = queries[s:s + batch] @ vectors.T
        out[s:s + batch] = np.argpartition(-sims, k, axis=1)[:, :k]
    return out


def _pct(a: list[float]) -> dict:
    x = np.array(a) * 1000
    return {"p50_ms": round(float(np.percentile(x, 50)), 3), "p99_ms": round(float(np.percentile(x, 99)), 3),
            "mean_ms": round(float(x.mean()), 3)}


def run(n_items: int, dim: int, kind: str, n_queries: int, efs: list[int], params, workdir: Path,
        n_latency: int = 500) -> dict:
    from serving.ann import AnnParams
    from serving.index import ItemIndex

    t0 = time.perf_counter()
    vectors = make_vectors(n_items, dim, kind)
    ids = np.array([f"item-{j}" for j in range(n_items)], dtype=object)
    index = ItemIndex(item_ids=ids, vectors=vectors, hashes=np.arange(n_items, dtype=np.uint64),
                      row={})  # ``row`` (id -> row) is not used by retrieval
    queries = make_queries(vectors, n_queries)
    gen_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    truth = exact_top(vectors, queries, 100)
    exact_s = time.perf_counter() - t0

    workdir.mkdir(parents=True, exist_ok=True)
    for p in workdir.glob("*"):
        p.unlink()
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    ann_index = index.with_ann(params, directory=workdir, model_stamp="bench@0")  # builds + saves
    build_and_save_s = time.perf_counter() - t0
    rss1 = _rss_bytes()
    ann = ann_index.ann
    saved = next(workdir.glob("*.usearch"))
    t0 = time.perf_counter()
    loaded = index.with_ann(params, directory=workdir, model_stamp="bench@0")  # what a restart does
    load_s = time.perf_counter() - t0
    assert loaded.ann.how == "loaded", loaded.ann.how
    del loaded

    recall = {}
    for ef in efs:
        hits = 0
        for q, want in zip(queries, truth):
            got = ann.search(vectors, q, 100, ef=ef)[0]
            hits += len(np.intersect1d(got, want))
        recall[str(ef)] = round(hits / (100 * len(queries)), 4)
    ann.graph.expansion_search = params.ef_search

    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(3)
    lat_q = queries[: min(n_latency, len(queries))]
    excl = [rng.integers(n_items, size=20) for _ in lat_q]
    for q, e in zip(lat_q[:20], excl):  # warm-up
        ann_index.top_n(q, 200, e)
    ann_lat, exact_lat = [], []
    for q, e in zip(lat_q, excl):
        t = time.perf_counter()
        ann_index.top_n(q, 200, e)
        ann_lat.append(time.perf_counter() - t)
    for q, e in zip(lat_q[:100], excl):
        t = time.perf_counter()
        index.top_n(q, 200, e)  # exact (no graph attached)
        exact_lat.append(time.perf_counter() - t)
    default_params = AnnParams()
    return {
        "bench": "ann", "items": n_items, "dim": dim, "data": kind, "queries": n_queries,
        "machine": f"{os.cpu_count()}-core CPU, {platform.python_implementation()} {platform.python_version()}",
        "load_average": round(os.getloadavg()[0], 2),
        "params": {"connectivity": params.connectivity, "expansion_add": params.expansion_add,
                   "ef_search": params.ef_search, "dtype": params.dtype, "build_threads": params.threads,
                   "defaults": default_params.__dict__},
        "generate_seconds": round(gen_s, 1), "exact_ground_truth_seconds": round(exact_s, 1),
        "build_seconds": round(ann.build_seconds, 1), "build_and_save_seconds": round(build_and_save_s, 1),
        "load_seconds": round(load_s, 2),
        "rss_delta_mib": round((rss1 - rss0) / 2**20, 1),
        "index_memory_mib": round(ann.graph.memory_usage / 2**20, 1),
        "index_file_mib": round(saved.stat().st_size / 2**20, 1),
        "vectors_f32_mib": round(vectors.nbytes / 2**20, 1),
        "recall_at_100": recall,
        "recall_at_100_default_ef": recall.get(str(params.ef_search)),
        "ann_top200_latency": _pct(ann_lat), "exact_top200_latency": _pct(exact_lat),
    }


def run_served(workdir: Path, n_queries: int, efs: list[int], k: int = 100) -> dict:
    """Recall@``k`` of the graph ``bench_serving.py`` built for its catalog, on that model's own vectors:
    the item-tower vectors of the served catalog and user-tower vectors of stored users as queries (what
    ``/recommend`` searches with). The graph is loaded from where the server saved it (built if missing)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_serving import _settings

    from recloop.store import FeedbackStore
    from serving.ann import AnnParams
    from serving.index import ItemIndex
    from serving.ivf import IvfIndex, IvfParams
    from serving.lifecycle import LocalDirModelSource
    from serving.storeview import StoreView

    settings = _settings(workdir)
    source = LocalDirModelSource(workdir / "model")
    version = source.current_version()
    model, _ = source.load(version)
    store = FeedbackStore.from_settings(settings)
    view = StoreView(store)
    view.refresh()  # the store's events in the view's statistics, as a server's first refresh
    data = view.data
    catalog = data.catalog.reset_index()
    t0 = time.perf_counter()
    index = ItemIndex.build(model, catalog)
    vectors_s = time.perf_counter() - t0
    params = AnnParams.from_settings(settings)
    t0 = time.perf_counter()
    served = index.with_ann(params, directory=source.index_dir(version),
                            model_stamp=f"{version}@{model.config.get('saved_at')}")
    if served.ann is None:
        raise SystemExit(f"{len(index)} items, below serving.ann_min_items ({params.min_items}): no graph")
    ann_s, how = time.perf_counter() - t0, served.ann.how
    history = store.read()
    users = history["user_id"].astype(str).drop_duplicates().sample(frac=1.0, random_state=0).head(n_queries)
    queries = model.user_vectors(users.tolist(), history, catalog).astype(np.float32)
    truth = exact_top(index.vectors, queries, k)
    recall = {}
    for ef in efs:
        hits = sum(len(np.intersect1d(served.ann.search(index.vectors, q, k, ef=ef)[0], want))
                   for q, want in zip(queries, truth))
        recall[str(ef)] = round(hits / (k * len(queries)), 4)
    sims = np.sort(queries[:100] @ index.vectors.T, axis=1)[:, ::-1]
    profile = {str(r): round(float(sims[:, r - 1].mean()), 3) for r in (1, 50, 100, 150, 300)}
    retrievers = {f"graph ef {ef}": (lambda q, m, excl, ef=ef: served.ann.search(index.vectors, q, m, excl, ef=ef))
                  for ef in efs}
    ivf_params = IvfParams.from_settings(settings)
    t0 = time.perf_counter()
    ivf = IvfIndex.build(index.vectors, ivf_params)
    ivf_s = time.perf_counter() - t0
    for probes in sorted({32, ivf_params.probes, 128}):
        retrievers[f"ivf probes {probes}"] = lambda q, m, excl, p=probes: ivf.search(q, m, excl, probes=p)
    for rank_by in ("bound", "centroid"):  # which lists to probe: each ranking alone (serving/ivf.py)
        alone = replace(ivf, params=replace(ivf_params, rank_by=rank_by))
        retrievers[f"ivf probes {ivf_params.probes} {rank_by} only"] = \
            lambda q, m, excl, ix=alone: ix.search(q, m, excl)
    quality = served_top_k(model, settings, data.stats, index, retrievers, users.tolist())
    quality["ivf"] = {"lists": ivf.n_lists, "build_seconds": round(ivf_s, 1), "memory_bytes": ivf.memory_bytes}
    return {"bench": "ann-served", "items": len(index), "dim": index.dim, "queries": len(queries),
            "graph": how, "graph_seconds": round(ann_s, 1), "item_vectors_seconds": round(vectors_s, 1),
            "params": params.graph_fields(), "ef_search": params.ef_search,
            "recall_at_100": recall, "neighbour_cosine_profile": profile, "served_top_k": quality,
            "load_average": round(os.getloadavg()[0], 2)}


def served_top_k(model, settings, stats, exact, retrievers: dict, users: list[str], k: int = 10) -> dict:
    """What approximate retrieval costs in what ``/recommend`` answers: per user with liked items (serving's
    path for them: retrieve ``serving.candidates`` by the user vector, liked items excluded, re-score the best
    ``serving.rescore`` with the full model, top ``k`` by its probability), the list built from exact
    retrieval against the one built from each of ``retrievers`` (name -> ``f(query, n, exclude) -> (rows,
    sims)``): the share of the exact list it holds (overlap@k), and the model's mean probability over each list
    (what the model itself thinks was lost), plus the median / p99 retrieval time. No MMR or exploration (off by
    default for users with history)."""
    s = settings.serving
    names = ["exact", *retrievers]
    tops = {name: [] for name in names}
    probs = {name: [] for name in names}
    secs = {name: [] for name in names}
    n = 0
    for u in users:
        ctx = model.user_context(stats, u)
        liked = exact.rows_of(stats.item_ids[ctx.stats.positives].tolist()) if len(ctx.stats.positives) else None
        if liked is None or not len(liked):
            continue  # cold users get the popular list: no retrieval by the user vector
        n += 1
        for name in names:
            fn = exact.top_n if name == "exact" else retrievers[name]
            t0 = time.perf_counter()
            cand, _ = fn(ctx.vector, s.candidates, liked)
            secs[name].append(time.perf_counter() - t0)
            cand = cand[: s.rescore]
            p = np.asarray(model.score_items(stats, ctx, [str(exact.item_ids[r]) for r in cand]), dtype=np.float64)
            top = np.argsort(-p, kind="stable")[:k]
            tops[name].append(set(cand[top].tolist()))
            probs[name].append(float(p[top].mean()))
    out = {"users": n, "k": k, "candidates": s.candidates, "rescore": s.rescore}
    for name in names:
        out[name] = {"overlap_at_k": round(float(np.mean([len(a & b) / k for a, b in zip(tops["exact"], tops[name])])), 4)
                     if n else None,
                     "mean_probability": round(float(np.mean(probs[name])), 4) if n else None,
                     "retrieve_ms_p50": round(1000 * float(np.median(secs[name])), 2) if n else None,
                     "retrieve_ms_p99": round(1000 * float(np.percentile(secs[name], 99)), 2) if n else None}
    return out


def main(argv=None) -> None:
    from serving.ann import AnnParams

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="50,000 items, 300 queries (a check that it runs)")
    ap.add_argument("--dim", type=int, default=None, help="vector dimension (default: training.embed_dim)")
    ap.add_argument("--data", choices=["clustered", "random"], default="clustered")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--ef", default=None, help="comma-separated search breadths to measure recall at "
                                               "(default: 128,<ann_ef_search>,384,2x it; "
                                               "usearch searches at least 100 wide for a top-100)")
    ap.add_argument("--connectivity", type=int, default=None)
    ap.add_argument("--expansion-add", type=int, default=None)
    ap.add_argument("--ef-search", type=int, default=None, help="the serving default to report")
    ap.add_argument("--threads", type=int, default=None, help="build threads (default: all cores)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "recloop-bench-ann")
    ap.add_argument("--served", type=Path, default=None,
                    help="a bench_serving.py --workdir: recall on that served model's item and user vectors")
    args = ap.parse_args(argv)
    if args.served is not None:
        efs = [int(x) for x in args.ef.split(",")] if args.ef else [128, 256, 512]
        print(json.dumps(run_served(args.served, args.queries, efs)), flush=True)
        return
    if args.quick:
        args.items, args.queries = 50_000, 300
    d = AnnParams()
    params = AnnParams(min_items=1, connectivity=args.connectivity or d.connectivity,
                       expansion_add=args.expansion_add or d.expansion_add, ef_search=args.ef_search or d.ef_search,
                       dtype=d.dtype, threads=args.threads if args.threads is not None else (os.cpu_count() or 1))
    dim = args.dim
    if dim is None:
        from recloop.settings import Settings

        dim = int(Settings().training.embed_dim)
    efs = [int(x) for x in args.ef.split(",")] if args.ef else sorted({128, params.ef_search, 384,
                                                                         2 * params.ef_search})
    out = run(args.items, dim, args.data, args.queries, efs, params, args.workdir)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
