"""What the language model adds to search: /search relevance on MovieLens-100k with hand-written queries.

    .venv/bin/python benchmarks/bench_search.py [--cache ~/.cache/recloop/ml-100k] [--json]

MovieLens has no search log, so relevance is judged by genre: each query below asks for one genre
**without naming it** (no word of a query is a genre word or a title word's obvious stem: "scary
monsters" for Horror), so a ranker has to understand the words; a second, *literal* set names the
genre ("horror"), where word matching is the right tool. An item is relevant when the genre is among
its genres. For every query, over the whole catalog (1,682 films), the top 10 of:

* **served** — ``serving.ranking.search``, the code behind ``GET /search`` (anonymous), with a
  Recommender trained on all 100,000 events (frozen MiniLM, default settings) over a store holding them;
* **MiniLM cosine** — the pretrained sentence encoder alone: cosine of the query's and the items' text
  vectors (the text the model reads: title, category, description);
* **lexical (BM25)** — Okapi BM25 (k1 1.2, b 0.75) over the same text's words;
* **popularity** — most liked films, the same list for every query (what search is without the query).

A third set, *titles*: 30 films drawn at random (seed 0), each searched by its title; relevant = the
films with that title. Reported: precision@10, NDCG@10 (binary relevance) and hit@10 averaged over the
queries, paired NDCG@10 differences with a 95 % bootstrap CI over queries, and how liked the returned
films are (mean share of their ratings that are >= 4, over the whole log: what the model's score adds to
relevance; a description of the results, not a quality metric). Nothing is tuned on these queries; the
genre sets were written once, before the first run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_real import DEFAULT_CACHE, fetch

# genre -> queries that do not name it (written once, before any run; not tuned)
PARAPHRASES: dict[str, list[str]] = {
    "Action": ["explosions and car chases", "fist fights and shootouts"],
    "Adventure": ["a quest to find lost treasure", "an expedition into the jungle"],
    "Animation": ["cartoon characters drawn by hand", "pixar style cartoon"],
    "Children's": ["something for young kids", "a film to watch with little ones"],
    "Comedy": ["hilarious and funny", "makes you laugh out loud"],
    "Crime": ["gangsters and the mafia", "a bank robbery heist"],
    "Documentary": ["real footage about true events", "non-fiction interviews with real people"],
    "Fantasy": ["wizards and magic spells", "dragons and elves"],
    "Film-Noir": ["1940s hardboiled private eye", "femme fatale in shadowy black and white"],
    "Horror": ["scary monsters", "terrifying ghosts and blood"],
    "Musical": ["singing and dancing on stage", "broadway show tunes"],
    "Mystery": ["a whodunit puzzle", "solve the murder from the clues"],
    "Romance": ["a love story", "a couple falling in love"],
    "Sci-Fi": ["spaceships and aliens", "robots in the distant future"],
    "Thriller": ["edge of your seat suspense", "tense and nerve-racking"],
    "War": ["soldiers on the battlefield", "army combat in vietnam"],
    "Western": ["cowboys and outlaws", "a gunslinger on the frontier"],
}
LITERAL: dict[str, list[str]] = {g: [g.lower().replace("-", " ")] for g in PARAPHRASES}
K = 10


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", str(text).lower())


class BM25:
    """Okapi BM25 over a list of documents (k1 1.2, b 0.75, idf with +1 so it stays positive)."""

    def __init__(self, docs: list[str], k1: float = 1.2, b: float = 0.75):
        self.tf = [Counter(words(d)) for d in docs]
        self.len = np.array([sum(c.values()) for c in self.tf], dtype=np.float64)
        self.avg = float(self.len.mean()) if len(docs) else 0.0
        df = Counter(w for c in self.tf for w in c)
        n = len(docs)
        self.idf = {w: math.log(1.0 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}
        self.k1, self.b = k1, b

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(len(self.tf))
        norm = self.k1 * (1 - self.b + self.b * self.len / max(self.avg, 1e-9))
        for w in set(words(query)):
            idf = self.idf.get(w)
            if idf is None:
                continue
            f = np.array([c.get(w, 0) for c in self.tf], dtype=np.float64)
            out += idf * f * (self.k1 + 1) / (f + norm)
        return out


def precision_ndcg(ranked: list[str], relevant: set[str], k: int = K) -> tuple[float, float, float]:
    """(precision@k, NDCG@k with binary gains, hit@k) of ``ranked`` against ``relevant``."""
    if not relevant:
        raise ValueError("a query needs at least one relevant item")
    top = ranked[:k]
    gains = np.array([1.0 if i in relevant else 0.0 for i in top])
    disc = 1.0 / np.log2(np.arange(2, len(top) + 2))
    ideal = disc[: min(k, len(relevant))].sum()
    return float(gains.sum() / k), float((gains * disc[: len(gains)]).sum() / ideal), float(gains.any())


def top_ids(scores: np.ndarray, ids: np.ndarray, k: int = K) -> list[str]:
    order = np.lexsort((ids, -scores))  # score descending, then id: deterministic ties
    return [str(ids[i]) for i in order[:k]]


def paired_ci(a: np.ndarray, b: np.ndarray, samples: int = 2000, seed: int = 0) -> list[float]:
    """95 % bootstrap interval (queries resampled) of mean(a - b)."""
    d = np.asarray(a) - np.asarray(b)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def _served(model, catalog, events, workdir: Path):
    """A store holding ``events`` and a ModelHolder serving ``model``: what ``GET /search`` runs on."""
    from recloop.settings import load_settings
    from recloop.store import FeedbackStore
    from serving.lifecycle import InMemoryModelSource, ModelHolder
    from serving.storeview import StoreView

    settings = load_settings(workdir)
    store = FeedbackStore.from_settings(settings)
    store.upsert_catalog(catalog)
    store.append(events, batch_id="movielens")
    view = StoreView(settings.store_dir)
    view.refresh(force=True)
    holder = ModelHolder(InMemoryModelSource(model, "1"), view, settings)
    if not holder.poll_once():
        raise RuntimeError(f"the model did not load: {holder.last_error}")
    return holder


def run(cache: Path = DEFAULT_CACHE, seed: int = 42) -> dict:
    from models.train import train_recommender
    from recloop.datasets.recbole import load_recbole
    from recloop.schema import item_text
    from recloop.settings import load_settings
    from serving import ranking

    fetch(cache)
    data = load_recbole(cache)
    catalog = data.catalog.reset_index(drop=True)
    ids = catalog["item_id"].astype(str).to_numpy()
    genres = {i: set(str(t).split(",")) for i, t in zip(ids, catalog["tags"].fillna(""))}
    texts = item_text(catalog).tolist()
    events = data.events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    out: dict = {"n_items": len(ids), "n_events": len(events), "k": K}
    with tempfile.TemporaryDirectory(prefix="recloop-search-") as tmp:
        t0 = time.perf_counter()
        settings = load_settings(Path(tmp) / "train", training={"seed": seed})
        model = train_recommender(settings, events, catalog, data.users).model
        out["train_s"] = round(time.perf_counter() - t0, 1)
        holder = _served(model, catalog, events, Path(tmp) / "serve")
        served, view = holder.current, holder.view
        text_ids, text_vecs = model.item_text_vectors(catalog)  # what the served path compares queries with
        if list(text_ids) != list(ids):
            raise RuntimeError("the model's text vectors are not in catalog order")
        bm25 = BM25(texts)
        liked = events[events["label"] == 1]["item_id"].astype(str).value_counts()
        pop = np.array([liked.get(i, 0) for i in ids], dtype=np.float64)
        pop_top = top_ids(pop, ids)
        rate = events.groupby(events["item_id"].astype(str))["label"].mean()
        like_rate = {i: float(rate.get(i, np.nan)) for i in ids}
        titles = catalog["title"].astype(str).to_numpy()
        drawn = np.random.default_rng(0).choice(len(ids), size=30, replace=False)
        sets = {"paraphrase": [(g, q, {i for i in ids if g in genres[i]}) for g, qs in PARAPHRASES.items() for q in qs],
                "literal": [(g, q, {i for i in ids if g in genres[i]}) for g, qs in LITERAL.items() for q in qs],
                "titles": [(str(ids[j]), titles[j], set(ids[titles == titles[j]].tolist())) for j in drawn]}
        for name, queries in sets.items():
            rows = []
            for genre, q, relevant in queries:
                qv = model.query_vector(q)
                r = ranking.search(served, view.data, settings, q, None, K, np.random.default_rng(0))
                lists = {"served": [it["item_id"] for it in r.items],
                         "minilm_cosine": top_ids(text_vecs @ qv, ids),
                         "bm25": top_ids(bm25.scores(q), ids),
                         "popularity": pop_top}
                rows.append({"genre": genre, "query": q, "n_relevant": len(relevant),
                             **{m: precision_ndcg(lst, relevant) for m, lst in lists.items()},
                             "liked": {m: float(np.nanmean([like_rate.get(i, np.nan) for i in lst]))
                                       for m, lst in lists.items()}})
            methods = list(rows[0]["liked"])
            summary = {}
            for m in methods:
                p, n, h = (np.array([r[m][j] for r in rows]) for j in range(3))
                summary[m] = {"precision_at_10": float(p.mean()), "ndcg_at_10": float(n.mean()),
                              "hit_at_10": float(h.mean()), "liked_share": float(np.mean([r["liked"][m] for r in rows]))}
            pairs = {}
            for a, b in (("served", "bm25"), ("minilm_cosine", "bm25"), ("served", "minilm_cosine"),
                         ("served", "popularity")):
                na, nb = np.array([r[a][1] for r in rows]), np.array([r[b][1] for r in rows])
                pairs[f"{a} - {b}"] = {"ndcg_at_10": float((na - nb).mean()), "ci95": paired_ci(na, nb)}
            out[name] = {"n_queries": len(rows), "summary": summary, "pairs": pairs, "queries": rows}
    return out


def _print(res: dict) -> None:
    print(f"MovieLens-100k: {res['n_items']} items, model trained on {res['n_events']} events in {res['train_s']} s")
    for name in ("paraphrase", "literal", "titles"):
        part = res[name]
        print(f"\n{name} queries ({part['n_queries']}): precision@10 / NDCG@10 / hit@10 / liked share of results")
        for m, s in part["summary"].items():
            print(f"  {m:15s} {s['precision_at_10']:.3f} / {s['ndcg_at_10']:.3f} / {s['hit_at_10']:.3f} / "
                  f"{s['liked_share']:.3f}")
        for p, d in part["pairs"].items():
            print(f"  {p:30s} NDCG@10 {d['ndcg_at_10']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--json", action="store_true", help="print the full result (every query) as JSON")
    args = ap.parse_args(argv)
    res = run(args.cache)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        _print(res)
    return res


if __name__ == "__main__":
    main()
