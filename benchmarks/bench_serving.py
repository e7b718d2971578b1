"""Serving latency with a 100k-item (or 1M-item) catalog and the real MiniLM-based Recommender.

    .venv/bin/python benchmarks/bench_serving.py                 # full: 100k items
    .venv/bin/python benchmarks/bench_serving.py --items 20000 --requests 100   # a shorter run
    .venv/bin/python benchmarks/bench_serving.py --workdir /tmp/recloop-bench-serving-1m --items 1000000 \
        --distinct-texts 2680 --synthetic-text-vectors --events 300000 --requests 300 --naive 0   # 1M, ANN

What it does (all on loopback, one machine):

1. **Prepare** (cached in ``--workdir``, default ``$TMPDIR/recloop-bench-serving``): train a
   Recommender on a small synthetic world with the pretrained all-MiniLM-L6-v2 (frozen
   mode), grow the catalog to ``--items`` items of synthetic text, encode every item text
   once with MiniLM (timed: this is the one expensive step) and save the model with its
   text-vector cache; fill a workspace store with the catalog and ~``--events`` events.
   A second run reuses all of it. With ``--synthetic-text-vectors`` the items past
   ``--distinct-texts`` get distinct texts too ("... #<n>"), but their encoder vectors are not
   encoded: each is the MiniLM vector of the text it repeats plus 30 % Gaussian noise (cosine ~0.96
   to it). So a 1,000,000-item catalog has 1,000,000 distinct item vectors, clustered like real
   ones, without ~14 h of MiniLM encoding on 2 cores (the text-vector cache then holds 1M x 384
   float32, ~1.5 GB, saved with the model). Catalogs of ``serving.ann_min_items`` items or more
   are served through the ANN graph (serving/ann.py), built at server start and saved in
   ``<workdir>/model/ann/``, so a second run loads it; ``GET /model`` details report it.
2. **Serve**: ``uvicorn`` in a subprocess running ``serving.app.create_app`` on that model,
   plus one benchmark-only route, ``/naive_recommend``: the naive baseline that scores
   *every* catalog item with the full model (``Recommender.score`` over all items, with the
   whole store as history) per request.
3. **Measure** with ``httpx``: ``/recommend`` (k=10) and ``/search`` at concurrency 1 and 8,
   and the naive baseline at concurrency 1; p50 / p99 latency, requests/s,
   and the naive/served latency ratio. Prints one JSON document and, with ``--append``,
   appends a section to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --------------------------------------------------------------------------- preparation
def _settings(workdir: Path, **serving):
    from recloop.settings import load_settings

    return load_settings(workdir / "ws", training={"mode": "frozen", "embed_dim": 128, "max_epochs": 2,
                                                   "batch_size": 512},
                         serving={"poll_seconds": 3600, "store_refresh_seconds": 3600, **serving})


def _big_catalog(base, n_items: int, distinct: int, seed: int = 5, unique_titles: bool = False):
    """``base`` plus synthetic items up to ``n_items``; the extra items use ``distinct`` different texts.

    With ``distinct < n_items`` the texts repeat (under different item ids): the index and the
    request path still see ``n_items`` items, only the one-off MiniLM encoding is smaller (its
    rate is measured and the full cost reported by extrapolation).
    """
    import pandas as pd

    from recloop.datasets.synthetic import VOCAB, _item_row

    rng = np.random.default_rng(seed)
    cats = list(VOCAB)
    n_extra = max(0, n_items - len(base))
    texts = []
    for i in range(min(distinct, n_extra)):
        cat = cats[i % len(cats)]
        r = _item_row(f"big-{i:06d}", cat, VOCAB[cat], rng)
        r["title"] = f"{r['title']} no. {i}"  # distinct texts
        texts.append(r)
    rows = [{**texts[i % len(texts)], "item_id": f"big-{i:06d}"} for i in range(n_extra)] if texts else []
    extra = pd.DataFrame(rows)
    if unique_titles and len(extra) > len(texts):  # repeats get their own title: distinct texts, distinct vectors
        rep = np.arange(len(texts), len(extra))
        extra.loc[rep, "title"] = extra["title"].iloc[rep].to_numpy(dtype=object) + \
            pd.Series(rep).map(lambda i: f" #{i}").to_numpy(dtype=object)
    if len(extra):
        extra["created_at"] = pd.Timestamp("2025-06-01", tz="UTC") - pd.to_timedelta(
            rng.integers(0, 365, len(extra)), unit="D")
    return pd.concat([base, extra], ignore_index=True)


def _extra_events(catalog, n_events: int, n_users: int, start, seed: int = 6):
    """Random exposures on the big catalog: users prefer one category, like ~10 % of what they see."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    cats = catalog["category"].to_numpy()
    ids = catalog["item_id"].to_numpy()
    by_cat = {c: np.flatnonzero(cats == c) for c in np.unique(cats)}
    cat_names = list(by_cat)
    users = np.array([f"bu{i:05d}" for i in range(n_users)])
    fav = rng.integers(len(cat_names), size=n_users)
    u = rng.integers(n_users, size=n_events)
    own = rng.random(n_events) < 0.7
    items = np.empty(n_events, dtype=object)
    for j in range(n_events):
        pool = by_cat[cat_names[fav[u[j]]]] if own[j] else None
        items[j] = ids[pool[rng.integers(len(pool))]] if pool is not None else ids[rng.integers(len(ids))]
    label = (rng.random(n_events) < np.where(own, 0.25, 0.05)).astype(int)
    ts = pd.Timestamp(start) + pd.to_timedelta(np.sort(rng.integers(0, 14 * 86400, n_events)), unit="s")
    return pd.DataFrame({"event_id": [f"bench-{j}" for j in range(n_events)], "user_id": users[u], "item_id": items,
                         "event_type": np.where(label == 1, "click", "impression"), "label": label,
                         "timestamp": ts})


def _synthesise_text_vectors(model, texts, templates, seed: int = 8) -> int:
    """Cache a vector for every text of ``texts`` not cached: the vector of its ``templates`` text (same
    row, encoded) plus 30 % Gaussian noise. Returns how many were made."""
    rng = np.random.default_rng(seed)
    cache = model._text_cache
    todo = [(t, tp) for t, tp in zip(texts, templates) if t not in cache]
    for s in range(0, len(todo), 50_000):
        chunk = todo[s:s + 50_000]
        base = np.stack([cache[tp] for _, tp in chunk]).astype(np.float32)
        scale = 0.3 * np.linalg.norm(base, axis=1, keepdims=True) / np.sqrt(base.shape[1])
        vecs = (base + scale * rng.standard_normal(base.shape, dtype=np.float32)).astype(np.float32)
        model.remember_texts([t for t, _ in chunk], vecs)
    return len(todo)


def prepare(workdir: Path, n_items: int, n_events: int, distinct: int, synthetic: bool = False) -> dict:
    """Train + encode + fill the store once; returns timings (cached in ``workdir/prepared.json``)."""
    marker = workdir / "prepared.json"
    if marker.is_file():
        meta = json.loads(marker.read_text())
        if (meta.get("n_items"), meta.get("n_events"), meta.get("distinct_texts"),
                bool(meta.get("synthetic_text_vectors"))) == (n_items, n_events, distinct, synthetic):
            meta["cached"] = True
            return meta
    import shutil

    from models.recommender import Recommender
    from models.train import train_recommender
    from recloop.datasets.synthetic import SyntheticConfig, generate
    from recloop.schema import item_text
    from recloop.store import FeedbackStore

    shutil.rmtree(workdir / "ws", ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    s = _settings(workdir).ensure_dirs()
    world = generate(SyntheticConfig(seed=11, n_users=400, n_items=320, n_days=14, drift_day=None,
                                     bad_batch_day=None))
    trained_meta = workdir / "trained" / "train.json"
    if trained_meta.is_file():  # the trained model does not depend on --items / --events: reuse it
        # (workdir/model is the same weights plus the text vectors encoded by an earlier run)
        model = Recommender.load(workdir / ("model" if (workdir / "model" / "config.json").is_file() else "trained"))
        train_s, auc = json.loads(trained_meta.read_text())
    else:
        t0 = time.perf_counter()
        trained = train_recommender(s, world.events, world.catalog, world.users)
        train_s, auc = time.perf_counter() - t0, trained.best_val_auc
        model = trained.model
        model.save(workdir / "trained")
        trained_meta.write_text(json.dumps([train_s, auc]))
    t0 = time.perf_counter()
    catalog = _big_catalog(world.catalog, n_items, distinct, unique_titles=synthetic)
    texts = item_text(catalog)
    templates = item_text(_big_catalog(world.catalog, n_items, distinct)) if synthetic else texts
    catalog_s = time.perf_counter() - t0
    n_texts = int(texts.nunique())
    missing = sorted(set(templates) - set(model._text_cache))
    t0 = time.perf_counter()
    model.text_vectors(missing)  # encode each new distinct text once (cached in the model, saved with it)
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_synth = _synthesise_text_vectors(model, texts.tolist(), templates.tolist()) if synthetic else 0
    synth_s = time.perf_counter() - t0
    model.save(workdir / "model")
    sample = [f"{t} (rate sample)" for t in texts.iloc[:256]]  # fresh texts: the encoder's rate, cache or not
    t1 = time.perf_counter()
    model.encoder.encode(sample)
    rate = len(sample) / (time.perf_counter() - t1)
    store = FeedbackStore.from_settings(s)
    store.upsert_catalog(catalog)
    store.upsert_users(world.users)
    store.append(world.events, batch_id="world")
    extra = _extra_events(catalog, max(0, n_events - len(world.events)), 5000, world.day_start(0))
    if len(extra):
        store.append(extra, batch_id="bench")
    import shutil as _sh

    _sh.rmtree(workdir / "model" / "ann", ignore_errors=True)  # a new catalog: the server builds its graph
    meta = {"n_items": n_items, "n_events": n_events, "distinct_texts": distinct, "events_stored": store.count(),
            "synthetic_text_vectors": synthetic, "text_vectors_synthesised": n_synth,
            "synthesise_seconds": round(synth_s, 1), "catalog_seconds": round(catalog_s, 1),
            "train_seconds": train_s, "best_val_auc": auc, "distinct_item_texts": n_texts,
            "texts_encoded_now": len(missing), "encode_seconds": encode_s,
            "encode_texts_per_s": rate, "full_catalog_encode_minutes_est": n_items / rate / 60, "cached": False,
            "torch_threads": __import__("torch").get_num_threads()}
    marker.write_text(json.dumps(meta, indent=1))
    return meta


# --------------------------------------------------------------------------- the server (subprocess)
def serve(workdir: Path, port: int) -> None:
    import pandas as pd
    import uvicorn
    from fastapi import HTTPException

    from serving.app import create_app
    from serving.lifecycle import LocalDirModelSource

    s = _settings(workdir, port=port)
    app = create_app(s, model_source=LocalDirModelSource(workdir / "model"))

    @app.get("/naive_recommend")
    def naive_recommend(user_id: str, k: int = 10):
        """Baseline: the full model scores every catalog item, the whole store as history."""
        cur = app.state.holder.current
        if cur is None:
            raise HTTPException(503, "no model")
        data = app.state.view.data
        catalog = data.catalog.reset_index()
        pairs = pd.DataFrame({"user_id": user_id, "item_id": catalog["item_id"].astype(str)})
        history = app.state.view.store.read()  # the whole store (the view keeps only recent events per user)
        scores = cur.model.score(pairs, history, catalog)
        top = np.argsort(-scores)[:k]
        return {"items": [{"item_id": str(pairs["item_id"].iloc[j]), "score": float(scores[j])} for j in top],
                "model_version": cur.version}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --------------------------------------------------------------------------- the client
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_mib(pid: int) -> float | None:
    """Resident memory of the server process (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _run(client, paths: list[str], concurrency: int) -> dict:
    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    it = iter(paths)

    def worker():
        nonlocal errors
        while True:
            with lock:
                path = next(it, None)
            if path is None:
                return
            t0 = time.perf_counter()
            r = client.get(path)
            dt = time.perf_counter() - t0
            with lock:
                if r.status_code == 200:
                    lat.append(dt)
                else:
                    errors += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.array(lat) * 1000
    return {"n": len(lat), "errors": errors, "concurrency": concurrency,
            "p50_ms": round(float(np.percentile(a, 50)), 2) if len(a) else None,
            "p99_ms": round(float(np.percentile(a, 99)), 2) if len(a) else None,
            "mean_ms": round(float(a.mean()), 2) if len(a) else None,
            "req_per_s": round(len(lat) / wall, 1) if wall else None}


def measure(workdir: Path, n_requests: int, n_naive: int) -> dict:
    import httpx
    import pandas as pd

    from recloop.datasets.synthetic import VOCAB
    from recloop.store import FeedbackStore

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t_start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "serve", "--workdir", str(workdir),
                             "--port", str(port)], env=env, cwd=str(REPO))
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=120,
                          limits=httpx.Limits(max_connections=16, max_keepalive_connections=16)) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}")
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.perf_counter() - t_start > 900:
                    raise TimeoutError("server not ready in 15 min")
                time.sleep(0.5)
            startup = time.perf_counter() - t_start
            model = client.get("/model").json()
            events = FeedbackStore(workdir / "ws" / "store").read(columns=["user_id", "label"])
            users = events[events["label"] == 1]["user_id"].astype(str).unique()
            rng = np.random.default_rng(0)
            pick = lambda n: [str(u) for u in rng.choice(users, size=n)]
            words = [w for v in VOCAB.values() for w in v]
            queries = [" ".join(rng.choice(words, size=int(rng.integers(1, 4)), replace=False))
                       for _ in range(n_requests)]
            _run(client, [f"/recommend?user_id={u}&k=10" for u in pick(30)], 1)  # warm-up
            _run(client, [f"/search?q={q}&k=10" for q in queries[:10]], 1)
            out = {"startup_seconds": round(startup, 1), "index_build_seconds": model.get("index_build_seconds"),
                   "items_indexed": model.get("items_indexed"), "users_with_history": len(users),
                   "retrieval": (model.get("details") or {}).get("retrieval"),
                   "server_rss_mib": _rss_mib(proc.pid)}
            out["recommend_c1"] = _run(client, [f"/recommend?user_id={u}&k=10" for u in pick(n_requests)], 1)
            out["recommend_c8"] = _run(client, [f"/recommend?user_id={u}&k=10" for u in pick(n_requests)], 8)
            out["recommend_cold_c1"] = _run(client, [f"/recommend?user_id=cold-{i}&k=10"
                                                     for i in range(max(20, n_requests // 4))], 1)
            out["search_c1"] = _run(client, [f"/search?q={q}&user_id={u}&k=10"
                                             for q, u in zip(queries, pick(len(queries)))], 1)
            queries8 = [f"{q} {w}" for q, w in zip(queries, rng.choice(words, size=len(queries)))]  # fresh texts
            out["search_c8"] = _run(client, [f"/search?q={q}&user_id={u}&k=10"
                                             for q, u in zip(queries8, pick(len(queries8)))], 8)
            if n_naive > 0:  # at 1M items the naive baseline takes minutes per request: --naive 0 skips it
                out["naive_c1"] = _run(client, [f"/naive_recommend?user_id={u}&k=10" for u in pick(n_naive)], 1)
                out["naive_over_served_p50"] = round(out["naive_c1"]["p50_ms"] / out["recommend_c1"]["p50_ms"], 1)
                out["naive_over_served_rps"] = round(out["recommend_c1"]["req_per_s"] / out["naive_c1"]["req_per_s"],
                                                     1)
            del pd
            return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _markdown(doc: dict, argv: str) -> str:
    p, m = doc["prepare"], doc["measure"]
    row = lambda name, r: (f"| {name} | {r['concurrency']} | {r['n']} | {r['p50_ms']} | {r['p99_ms']} | "
                           f"{r['req_per_s']} | {r['errors']} |")
    return "\n".join([
        "", f"## Serving latency (`{argv}`) — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
        (f"Machine: {doc['machine']}; shared with other agents while measured (figures are noisy). "
         "Loopback HTTP (uvicorn in a subprocess, httpx client), real all-MiniLM-L6-v2 Recommender (frozen "
         f"mode, embed_dim 128), {p['n_items']:,} catalog items, {p['events_stored']:,} stored events; "
         f"serving.candidates=200, serving.rescore=50."), "",
        (f"- item texts: {p['distinct_item_texts']:,} distinct among {p['n_items']:,} items; MiniLM encoding "
         f"measured at {p['encode_texts_per_s'] or float('nan'):.0f} texts/s (torch threads {p['torch_threads']}), "
         f"i.e. ~{p['full_catalog_encode_minutes_est'] or float('nan'):.0f} min for {p['n_items']:,} distinct "
         "texts on this machine; done once, cached in the model's text-vector cache"),
        (f"- server start to ready (load model + text-vector cache, build the {p['n_items']:,}-item index): "
         f"{m['startup_seconds']} s (index build {m['index_build_seconds']} s)"),
        f"- retrieval: {json.dumps(m.get('retrieval'))}; server RSS {m.get('server_rss_mib')} MiB"
        + (f"; {p.get('text_vectors_synthesised'):,} text vectors synthesised (--synthetic-text-vectors)"
           if p.get("synthetic_text_vectors") else ""), "",
        "| route | concurrency | requests | p50 ms | p99 ms | req/s | errors |", "|---|---|---|---|---|---|---|",
        row("/recommend k=10 (users with history)", m["recommend_c1"]),
        row("/recommend k=10 (users with history)", m["recommend_c8"]),
        row("/recommend k=10 (cold-start users)", m["recommend_cold_c1"]),
        row("/search k=10 (one MiniLM query encoding)", m["search_c1"]),
        *([row("/search k=10 (one MiniLM query encoding)", m["search_c8"])] if "search_c8" in m else []),
        *([row("naive: score all items with the full model", m["naive_c1"])] if "naive_c1" in m else []), "",
        (f"Naive / served: {m['naive_over_served_p50']}x the p50 latency, served does "
         f"{m['naive_over_served_rps']}x the requests/s at concurrency 1. " if "naive_c1" in m else "")
        + "Targets: /recommend p99 <= 25 ms at concurrency 1, /search p99 <= 60 ms.", ""])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="bench", choices=["bench", "prepare", "serve"])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "recloop-bench-serving")
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--distinct-texts", type=int, default=100_000,
                    help="distinct item texts among the extra items (fewer: a shorter one-off encoding)")
    ap.add_argument("--synthetic-text-vectors", action="store_true",
                    help="items past --distinct-texts get distinct texts with synthesised (noised) encoder vectors")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--naive", type=int, default=8)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--append", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    if args.mode == "serve":
        serve(args.workdir, args.port)
        return
    prep = prepare(args.workdir, args.items, args.events, args.distinct_texts, args.synthetic_text_vectors)
    print(json.dumps({"prepare": prep}, indent=1), flush=True)
    if args.mode == "prepare":
        return
    doc = {"machine": f"{os.cpu_count()}-core CPU, no GPU, {platform.python_implementation()} "
                      f"{platform.python_version()}", "prepare": prep,
           "measure": measure(args.workdir, args.requests, args.naive)}
    print(json.dumps(doc, indent=1))
    if args.append:
        text = _markdown(doc, "python benchmarks/bench_serving.py " + " ".join(sys.argv[1:]))
        with (REPO / "benchmarks" / "RESULTS.md").open("a", encoding="utf-8") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
