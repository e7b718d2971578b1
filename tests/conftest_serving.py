"""Fixtures for the serving tests (imported by tests/test_serving*.py).

``TextHashRecommender`` is a tiny, deterministic stand-in with the ``Recommender``
interface (bag-of-words hashed into 64 dims): it lets the ranking/index/feedback tests
run in milliseconds and makes the expected answers checkable by hand. The endpoint
tests also run against a real tiny ``Recommender`` trained by models/ (see
``tiny_model_dir``).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pandas as pd
import pytest

from recloop.schema import item_text

DIM = 64
_WORD = re.compile(r"[a-z0-9]+")


def _embed(text: str) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    for w in _WORD.findall(text.lower()):
        h = int.from_bytes(hashlib.md5(w.encode()).digest()[:4], "little")
        v[h % DIM] += 1.0
    n = np.linalg.norm(v)
    return v / n if n else v


class TextHashRecommender:
    """Item vector = hashed words of the item text; user vector = mean of liked items (+ query)."""

    def __init__(self, bias: float = 0.0, name: str = "fake"):
        self.bias = bias
        self.info = {"encoder": "text-hash", "mode": name, "train_start": "2026-01-05", "train_end": "2026-01-19"}
        self.score_calls = 0
        self.item_vector_calls = 0

    def item_vectors(self, catalog: pd.DataFrame):
        self.item_vector_calls += 1
        texts = item_text(catalog)
        vecs = np.stack([_embed(t) for t in texts]) if len(texts) else np.zeros((0, DIM), np.float32)
        return catalog["item_id"].astype(str).to_numpy(), vecs

    def user_vectors(self, user_ids, history, catalog, queries=None):
        out = np.zeros((len(user_ids), DIM), dtype=np.float32)
        vec_of = dict(zip(*self.item_vectors(catalog))) if len(catalog) else {}
        for j, u in enumerate(user_ids):
            h = history[(history["user_id"] == u) & (history["label"].astype(int) == 1)] if len(history) else history
            vs = [vec_of[i] for i in h["item_id"].astype(str) if i in vec_of] if len(h) else []
            if vs:
                out[j] = np.mean(vs, axis=0)
            if queries is not None and queries[j]:
                out[j] = out[j] * 0.3 + _embed(queries[j])
            if not out[j].any():
                out[j, 0] = 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def score(self, pairs, history, catalog):
        self.score_calls += 1
        ids, vecs = self.item_vectors(catalog)
        vec_of = dict(zip(ids, vecs))
        out = []
        users = self.user_vectors(list(pairs["user_id"]), history, catalog,
                                  queries=list(pairs["query"]) if "query" in pairs.columns else None)
        pos = history[history["label"].astype(int) == 1].groupby("item_id").size() if len(history) else {}
        for j, (_, row) in enumerate(pairs.iterrows()):
            v = vec_of.get(str(row["item_id"]), np.zeros(DIM, np.float32))
            pop = float(pos.get(row["item_id"], 0)) if len(history) else 0.0
            out.append(1 / (1 + np.exp(-(3 * float(users[j] @ v) + 0.1 * np.log1p(pop) + self.bias))))
        return np.asarray(out)


class TextSearchRecommender(TextHashRecommender):
    """A stand-in with search vectors (``item_text_vectors`` / ``query_vector``: the hashed words) whose
    **user tower ignores the query**: search is relevant only if it reads the text vectors."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.text_vector_rows = 0  # how many item texts were asked for (reuse on a rebuild asks for fewer)

    def item_text_vectors(self, catalog: pd.DataFrame):
        self.text_vector_rows += len(catalog)
        return self.item_vectors(catalog)

    def query_vector(self, query: str) -> np.ndarray:
        return _embed(query)

    def user_vectors(self, user_ids, history, catalog, queries=None):
        return super().user_vectors(user_ids, history, catalog, queries=None)

    def score(self, pairs, history, catalog):
        return super().score(pairs.drop(columns="query", errors="ignore"), history, catalog)


def catalog_frame(n_per_cat: int = 6) -> pd.DataFrame:
    cats = {"science fiction": ["starship", "galaxy", "android", "alien", "orbit", "nebula"],
            "cooking": ["recipe", "kitchen", "bake", "pasta", "bread", "soup"],
            "jazz": ["saxophone", "swing", "trumpet", "bebop", "piano", "blues"]}
    rows = []
    for c, words in cats.items():
        for j in range(n_per_cat):
            w1, w2 = words[j % len(words)], words[(j + 2) % len(words)]
            rows.append({"item_id": f"{c[:3]}{j}", "title": f"The {w1} {w2} book", "category": c,
                         "description": f"all about {w1} and {w2}", "tags": None, "provider": "lumen",
                         "created_at": pd.Timestamp("2026-01-01", tz="UTC")})
    return pd.DataFrame(rows)


def events_frame(catalog: pd.DataFrame) -> pd.DataFrame:
    """u1 likes science fiction, u2 likes cooking; cooking items are the popular ones."""
    t0 = pd.Timestamp("2026-01-05", tz="UTC")
    rows = []
    k = 0
    for u, prefix in (("u1", "sci"), ("u2", "coo")):
        for j in range(3):
            rows.append((f"e{k}", u, f"{prefix}{j}", "like", 1, t0 + pd.Timedelta(minutes=k)))
            k += 1
    for extra in range(10):
        rows.append((f"e{k}", f"p{extra}", f"coo{extra % 2}", "click", 1, t0 + pd.Timedelta(minutes=k)))
        k += 1
        rows.append((f"e{k}", f"p{extra}", "jaz0", "impression", 0, t0 + pd.Timedelta(minutes=k)))
        k += 1
    return pd.DataFrame(rows, columns=["event_id", "user_id", "item_id", "event_type", "label", "timestamp"])


@pytest.fixture
def world(settings):
    """A workspace whose store holds the small catalog and events above."""
    from recloop.store import FeedbackStore

    store = FeedbackStore.from_settings(settings)
    cat = catalog_frame()
    store.upsert_catalog(cat)
    store.append(events_frame(cat), batch_id="seed")
    return settings, store, cat
