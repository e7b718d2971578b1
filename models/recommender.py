"""The trained recommender as one self-contained object: save, load, score.

Artifact layout (``Recommender.save(dir)``), no pickle anywhere:

* ``weights.safetensors`` - towers, id embeddings, wide part;
* ``encoder/`` - the BERT encoder (``save_pretrained`` safetensors) and its tokenizer;
* ``config.json`` - dimensions, mode, id vocabularies, history length, train window, metrics;
* ``text_vectors.safetensors`` + ``text_index.json`` - the encoder's vectors of the item and
  query texts seen so far (so loading and serving need no re-encoding of the catalog);
* with the second stage (:mod:`models.ranker`, :mod:`models.cf`): ``ranker.json`` (+ ``ranker.txt``,
  LightGBM's own text model format) and ``collab.safetensors`` + ``collab.json`` (item-item
  co-occurrence counts, the text -> like-rate head).

Two stages: the towers give a logit and a cosine; when the model has a ranker, the score is the
ranker's over [tower logit, cosine, wide statistics, ``models.cf.CF_COLUMNS``] (the same features
in :meth:`Recommender.score` and the fast path), else the towers' logit alone.

Scoring is point-in-time (:mod:`models.features`): a row with a timestamp t only sees
``history`` events older than t - lag (the label delay the model was trained with,
``config["feature_lag_seconds"]``, unless :meth:`Recommender.score` is given another), a row
without one sees all of ``history`` - so at serving time the store contents (which lag by
the ingest cadence already) drive the user profile and the statistics.

Serving fast path (one user x many items, "as of now"): build
:class:`models.features.ServingStats` once per store snapshot, then
:meth:`Recommender.user_context` (the user-tower vector, computed once per request: used for
retrieval *and* re-scoring) and :meth:`Recommender.score_items` - array lookups and a few small
matrix products, no pandas per call. Equal to :meth:`Recommender.score` on rows without a
timestamp over the same history and catalog (``tests/test_models_serving_path.py``).

Thread safety: the text-vector caches are guarded by a lock, the item-tower cache is read
once into a local; the networks run under ``torch.inference_mode`` in eval mode, so one
Recommender can answer concurrent requests.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from models.cf import (
    CF_BLOCK_ROWS,
    CF_COLUMNS,
    CollabModel,
    category_counts,
    serving_category_counts,
    text_similarity,
    unit_rows,
)
from models.data import ItemIndex, clean_queries, encode_ids
from models.features import WIDE_COLUMNS, ServingStats, UserStats, lag_ns, point_in_time_features
from models.network import TextEncoder, TwoTowerWide
from models.ranker import Ranker, ranker_matrix

FORMAT_VERSION = 1
HISTORY_COLUMNS = ("user_id", "item_id", "label", "timestamp")
QUERY_CACHE_SIZE = 4096  # query texts (not seen in training) kept in the LRU of encoder vectors
# The item-text cache holds every catalog text's encoder vector for the model's life: float16 halves it
# (1M texts x 384: 768 MB, not 1.5 GB) and its saved file; read back as float32 (the towers' input moves by
# ~1e-3 relative, the same rounding the ANN graph already applies; benchmarks/RESULTS.md)
TEXT_CACHE_DTYPE = np.float16


class _LRU:
    """A small thread-safe LRU map (text -> vector)."""

    def __init__(self, maxsize: int):
        self.maxsize = max(0, int(maxsize))
        self._d: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str):
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: str, value: np.ndarray) -> None:
        if self.maxsize == 0:
            return
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: str) -> bool:
        return key in self._d


@dataclass(frozen=True)
class UserContext:
    """One request's user: the user-tower vector (computed once) and the user's statistics."""

    user_id: str
    vector: np.ndarray  # float32 [d], L2-normalised: retrieval against item vectors
    tower: torch.Tensor  # [1, d] un-normalised user tower: the scoring head
    stats: UserStats
    has_query: bool
    history: np.ndarray | None = None  # item positions (in the stats) of the user's last positives, -1 = padding


def _empty_history() -> pd.DataFrame:
    return pd.DataFrame({"user_id": pd.Series([], dtype="string"), "item_id": pd.Series([], dtype="string"),
                         "label": pd.Series([], dtype="int64"),
                         "timestamp": pd.Series([], dtype="datetime64[ns, UTC]")})


class Recommender:
    """Text two-tower + wide model with its encoder; see the module docstring."""

    def __init__(self, net: TwoTowerWide, encoder: TextEncoder, config: dict, ranker: Ranker | None = None,
                 collab: CollabModel | None = None):
        if (ranker is None) != (collab is None):
            raise ValueError("a ranker needs its collaborative features and vice versa")
        self.ranker, self.collab = ranker, collab
        self._cat_cache: tuple | None = None  # (stats, per-category counts) of the last snapshot
        self.net = net.eval()
        self.encoder = encoder
        self.encoder.model.eval()
        self.config = dict(config)
        self.user_vocab = {u: i + 1 for i, u in enumerate(self.config["user_vocab"])}
        self.item_vocab = {x: i + 1 for i, x in enumerate(self.config["item_vocab"])}
        self._text_cache: dict[str, np.ndarray] = {}  # item (and training query) texts: bounded by the catalog;
        # values TEXT_CACHE_DTYPE (remember_texts)
        self._query_cache = _LRU(QUERY_CACHE_SIZE)  # other query texts seen while serving
        self._cache_lock = threading.Lock()
        self._tower_cache: tuple[int, ItemIndex, torch.Tensor] | None = None

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(out / "weights.safetensors"))
        self.encoder.model.save_pretrained(out / "encoder", safe_serialization=True)
        self.encoder.tokenizer.save_pretrained(out / "encoder")
        with self._cache_lock:
            cached = list(self._text_cache.items())
        texts = [t for t, _ in cached]
        if texts:
            save_file({"vectors": torch.as_tensor(np.stack([v for _, v in cached]))},
                      str(out / "text_vectors.safetensors"))
        (out / "text_index.json").write_text(json.dumps({"texts": texts}), encoding="utf-8")
        if self.ranker is not None:
            self.ranker.save(out)
            self.collab.save(out)
        cfg = dict(self.config)
        cfg["saved_at"] = datetime.now(UTC).isoformat()
        (out / "config.json").write_text(json.dumps(cfg, indent=1, default=str), encoding="utf-8")
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Recommender:
        from safetensors.torch import load_file

        d = Path(directory)
        for name in ("config.json", "weights.safetensors", "encoder"):
            if not (d / name).exists():
                raise FileNotFoundError(f"{d} is not a saved Recommender: {name} is missing")
        config = json.loads((d / "config.json").read_text(encoding="utf-8"))
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported model format {config.get('format_version')!r} in {d}")
        encoder = TextEncoder(d / "encoder", config["max_text_tokens"])
        net = _net_from_config(config)
        net.load_state_dict(load_file(str(d / "weights.safetensors")))
        ranker = collab = None
        if (d / "ranker.json").is_file():
            ranker, collab = Ranker.load(d), CollabModel.load(d)
        model = cls(net, encoder, config, ranker=ranker, collab=collab)
        if (d / "text_vectors.safetensors").is_file():
            texts = json.loads((d / "text_index.json").read_text(encoding="utf-8"))["texts"]
            vecs = load_file(str(d / "text_vectors.safetensors"))["vectors"].numpy()
            model.remember_texts(texts, vecs)  # models saved before float16 are rounded on load
        return model

    # ------------------------------------------------------------------ description
    @property
    def feature_lag(self) -> pd.Timedelta:
        """The label delay the model was trained with (0 for models saved before it was recorded)."""
        return pd.Timedelta(seconds=float(self.config.get("feature_lag_seconds") or 0.0))

    @property
    def info(self) -> dict:
        c = self.config
        n_heads = sum(p.numel() for p in self.net.parameters())
        n_enc = sum(p.numel() for p in self.encoder.model.parameters())
        return {
            "encoder": c.get("encoder"), "mode": c.get("mode"), "embed_dim": c.get("embed_dim"),
            "history_len": c.get("history_len"), "train_start": c.get("train_start"),
            "train_end": c.get("train_end"), "n_train": c.get("n_train"), "n_val": c.get("n_val"),
            "best_val_auc": c.get("best_val_auc"), "epochs_chosen": c.get("epochs_chosen"),
            "refit_full": c.get("refit_full"), "feature_lag_seconds": c.get("feature_lag_seconds", 0.0),
            "n_users_known": len(self.user_vocab),
            "n_items_known": len(self.item_vocab), "parameters": {"heads": n_heads, "encoder": n_enc},
            "wide_columns": list(WIDE_COLUMNS),
            "ranker": None if self.ranker is None else {"kind": self.ranker.kind, **self.ranker.info},
        }

    # ------------------------------------------------------------------ text vectors
    def remember_texts(self, texts, vectors) -> None:
        """Keep the encoder ``vectors`` [n, dim] of item (or training query) ``texts`` for the model's life
        (saved with it), stored as ``TEXT_CACHE_DTYPE``."""
        vecs = np.asarray(vectors).astype(TEXT_CACHE_DTYPE, copy=False)
        if len(vecs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(vecs)} vectors")
        with self._cache_lock:
            self._text_cache.update(zip(texts, vecs))

    def text_vectors(self, texts: list[str], queries: bool = False) -> torch.Tensor:
        """Encoder vectors of ``texts``; each distinct text is encoded once and cached.

        Item texts (and texts known from training) stay cached for the model's life and are saved
        with it; with ``queries=True`` texts not already cached go to a bounded LRU
        (``QUERY_CACHE_SIZE``) instead, so arbitrary search queries cannot grow memory.
        """
        found: dict[str, np.ndarray] = {}  # float16 (item cache) or float32 (queries)
        missing: list[str] = []
        for t in dict.fromkeys(texts):
            v = self._text_cache.get(t)
            if v is None and queries:
                v = self._query_cache.get(t)
            if v is None:
                missing.append(t)
            else:
                found[t] = v
        if missing:
            missing.sort()
            vecs = self._encode_query(missing[0]) if queries and len(missing) == 1 else \
                self.encoder.encode(missing).numpy()
            if not queries:  # rounded as the cache keeps them: the same vector now as on every later call
                vecs = vecs.astype(TEXT_CACHE_DTYPE)
            with self._cache_lock:
                for t, v in zip(missing, vecs):
                    found[t] = v
                    if queries:
                        self._query_cache.put(t, v)
                    else:
                        self._text_cache[t] = v
        if not texts:
            return torch.zeros((0, self.encoder.dim))
        return torch.as_tensor(np.stack([found[t] for t in texts]).astype(np.float32, copy=False))

    def _encode_query(self, text: str) -> np.ndarray:
        """One short text: one unpadded sequence, no autograd bookkeeping. [1, dim]"""
        enc = self.encoder
        ids, mask = enc.tokenize([text])
        with torch.inference_mode():
            out = enc(ids, mask)
        return out.float().numpy().copy()

    def _item_tower(self, items: ItemIndex) -> torch.Tensor:
        key = hash((tuple(items.item_ids), tuple(items.texts)))
        cache = self._tower_cache  # read once: another thread may replace it at any time
        if cache is not None and cache[0] == key:
            return cache[2]
        ids = torch.as_tensor([self.item_vocab.get(x, 0) for x in items.item_ids], dtype=torch.long)
        with torch.no_grad():
            tower = self.net.item_vectors(self.text_vectors(items.texts), ids)
        self._tower_cache = (key, items, tower)
        return tower

    # ------------------------------------------------------------------ scoring
    def _prepare(self, pairs: pd.DataFrame, history: pd.DataFrame | None, catalog: pd.DataFrame, lag=None):
        for col in ("user_id", "item_id"):
            if col not in pairs.columns:
                raise ValueError(f"pairs need a {col!r} column")
        if pairs["user_id"].isna().any() or pairs["item_id"].isna().any():
            raise ValueError("pairs contain null user_id or item_id")
        if history is None or len(history) == 0:
            history = _empty_history()
        missing = [c for c in HISTORY_COLUMNS if c not in history.columns]
        if missing:
            raise ValueError(f"history is missing columns {missing}")
        pairs = pairs.reset_index(drop=True)
        if "query" in pairs.columns and not self.query_trained:  # an untrained query projection is noise
            pairs = pairs.drop(columns="query")
        items = ItemIndex.from_catalog(catalog, pd.concat([pairs["item_id"].astype("string"),
                                                           history["item_id"].astype("string")]))
        tower = self._item_tower(items)
        feats = point_in_time_features(pairs, history, catalog, items.position, self.config["history_len"],
                                       self.config["prior"], lag=lag)
        q = clean_queries(pairs["query"] if "query" in pairs.columns else None, len(pairs))
        return pairs, items, tower, feats, q

    def _users(self, tower, feats, user_ids: np.ndarray, q: pd.Series, rows: slice) -> torch.Tensor:
        qs = q.iloc[rows]
        has = qs.notna().to_numpy()
        qv = None
        if has.any():
            qv = torch.zeros((len(qs), self.encoder.dim))
            qv[torch.as_tensor(has)] = self.text_vectors(qs[has].tolist(), queries=True)
        return self.net.user_vectors(tower, torch.as_tensor(feats.history_items[rows]),
                                     torch.as_tensor(user_ids[rows]), qv, torch.as_tensor(has))

    def score(self, pairs: pd.DataFrame, history: pd.DataFrame | None, catalog: pd.DataFrame,
              batch_size: int = 8192, lag=None) -> np.ndarray:
        """Like-probabilities for ``pairs`` (user_id, item_id, optional query / timestamp).

        A row at time t sees the ``history`` events older than t - ``lag``; ``lag=None``: the lag the
        model was trained with (:attr:`feature_lag`). Rows without a timestamp see all of ``history``.
        """
        lag = self.feature_lag if lag is None else pd.Timedelta(lag_ns(lag), unit="ns")
        pairs, items, tower, feats, q = self._prepare(pairs, history, catalog, lag=lag)
        target = pairs["item_id"].astype("string").map(items.position).to_numpy(dtype=np.int64)
        users = encode_ids(pairs["user_id"], self.user_vocab)
        logit = np.empty(len(pairs), dtype=np.float32)
        cos = np.empty(len(pairs), dtype=np.float32)
        with torch.no_grad():
            for s in range(0, len(pairs), batch_size):
                rows = slice(s, s + batch_size)
                u = self._users(tower, feats, users, q, rows)
                it = tower[torch.as_tensor(target[rows])]
                logit[rows] = self.net.head(u, it, torch.as_tensor(feats.wide[rows])).numpy()
                cos[rows] = _cosine(u, it).numpy()
        if self.ranker is None:
            return torch.sigmoid(torch.as_tensor(logit)).double().numpy()
        if history is None or len(history) == 0:
            history = _empty_history()
        pos_map = self.collab.index_of(items.item_ids)
        hist = feats.history_items
        hist_cf = np.where(hist >= 0, pos_map[np.maximum(hist, 0)], -1) if len(pos_map) else np.full_like(hist, -1)
        cat_n, cat_pos = category_counts(pairs, history, catalog, lag)
        blocks = [slice(s, s + CF_BLOCK_ROWS) for s in range(0, len(pairs), CF_BLOCK_ROWS)]
        # text vectors once, of the candidates and the users' recent events (text prior, text_resid)
        recent_items = (feats.recent[b].dense()[0] for b in blocks)
        need = np.unique(np.concatenate([np.unique(target)] + [np.unique(r[r >= 0]) for r in recent_items]))
        local = np.full(len(items.item_ids), -1, dtype=np.int64)
        local[need] = np.arange(len(need))
        vecs = self.text_vectors([items.texts[p] for p in need]).numpy()
        prior_t = self.collab.text_prior(vecs)[local[target]]
        cf = np.empty((len(pairs), len(CF_COLUMNS)), dtype=np.float32)
        for b in blocks:  # [rows, KNN_HISTORY] arrays a block at a time
            rec, labels = feats.recent[b].dense()
            rec_cf = np.where(rec >= 0, pos_map[np.maximum(rec, 0)], -1) if len(pos_map) else np.full_like(rec, -1)
            sims = text_similarity(vecs, local[target[b]], np.where(rec >= 0, local[np.maximum(rec, 0)], -1))
            cf[b] = self.collab.features(hist_cf[b], pos_map[target[b]], cat_n[b], cat_pos[b], prior_t[b],
                                         self.config["prior"], feats.wide[b], rec_cf, labels, sims)
        return _sigmoid(self.ranker.logit(ranker_matrix(logit, cos, feats.wide, cf)))

    @property
    def query_trained(self) -> bool:
        """Whether the user tower learned to read a query: its training events had queries. When they had
        none (MovieLens, most logs), the query projection and the ``has_query`` input kept their random
        start, so scoring leaves the query out (search relevance comes from :meth:`query_vector` then).
        Models saved before this was recorded (no ``n_query_texts``) keep reading it."""
        return int(self.config.get("n_query_texts", 1)) > 0

    def item_text_vectors(self, catalog: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(item_ids, L2-normalised **encoder** vectors of the items' texts [n, text_dim]): what a search
        query is compared with (:meth:`query_vector`). From the text cache: no re-encoding of known items."""
        items = ItemIndex.from_catalog(catalog)
        return np.asarray(items.item_ids, dtype=object), unit_rows(self.text_vectors(items.texts).numpy())

    def query_vector(self, query: str) -> np.ndarray:
        """L2-normalised encoder vector of a search query (float32 [text_dim]): its cosine with
        :meth:`item_text_vectors` is how close an item's text is in meaning (the pretrained sentence
        encoder's semantic search, independent of what the towers learned)."""
        q = str(query).strip()
        if not q:
            raise ValueError("the query is empty")
        return unit_rows(self.text_vectors([q], queries=True).numpy())[0].astype(np.float32)

    def item_vectors(self, catalog: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(item_ids, L2-normalised item-tower vectors [n, d]) for every catalog item."""
        items = ItemIndex.from_catalog(catalog)
        tower = self._item_tower(items)
        return np.asarray(items.item_ids, dtype=object), F.normalize(tower, dim=-1).numpy()

    def user_vectors(self, user_ids, history: pd.DataFrame | None, catalog: pd.DataFrame,
                     queries=None) -> np.ndarray:
        """L2-normalised user-tower vectors from all of ``history`` (+ an optional query per user)."""
        user_ids = [str(u) for u in user_ids]
        if len(catalog) == 0:
            raise ValueError("the catalog is empty")
        pairs = pd.DataFrame({"user_id": user_ids, "item_id": str(catalog["item_id"].iloc[0])})
        if queries is not None:
            if len(queries) != len(user_ids):
                raise ValueError("queries must have one entry per user id")
            pairs["query"] = pd.Series(list(queries), dtype="string")
        pairs, _items, tower, feats, q = self._prepare(pairs, history, catalog)
        users = encode_ids(pairs["user_id"], self.user_vocab)
        with torch.no_grad():
            u = self._users(tower, feats, users, q, slice(0, len(pairs)))
        return F.normalize(u, dim=-1).numpy()

    # ------------------------------------------------------------------ serving fast path
    def serving_stats(self, history: pd.DataFrame | None, catalog: pd.DataFrame,
                      previous: ServingStats | None = None, now=None) -> ServingStats:
        """:class:`ServingStats` of a history snapshot (model-independent; build once per snapshot).
        ``now``: when item ages are measured (default: the newest history event)."""
        return ServingStats.build(_empty_history() if history is None or len(history) == 0 else history,
                                  catalog, previous, now=now)

    def _towers_at(self, stats: ServingStats, positions: np.ndarray, item_ids=None,
                   with_texts: bool = False):
        """Item-tower vectors (not normalised) of the items at ``positions`` (-1: ``item_ids[j]``, text = id);
        ``with_texts``: (towers, their encoder text vectors)."""
        texts = [stats.item_texts[p] if p >= 0 else str(item_ids[j]) for j, p in enumerate(positions.tolist())]
        ids = [stats.item_ids[p] if p >= 0 else str(item_ids[j]) for j, p in enumerate(positions.tolist())]
        vocab = torch.as_tensor([self.item_vocab.get(str(x), 0) for x in ids], dtype=torch.long)
        vecs = self.text_vectors(texts)
        towers = self.net.item_vectors(vecs, vocab)
        return (towers, vecs) if with_texts else towers

    def user_context(self, stats: ServingStats, user_id: str, query: str | None = None) -> UserContext:
        """The user tower for ``user_id`` over all of the snapshot (+ an optional query), computed once.

        ``.vector`` equals ``user_vectors([user_id], history, catalog, [query])[0]``; pass the context to
        :meth:`score_items` to re-score candidates without rebuilding it.
        """
        user_id = str(user_id)
        us = stats.user(user_id)
        q = query.strip() if isinstance(query, str) and self.query_trained else None
        has = bool(q)
        hist = stats.history_items(us, int(self.config["history_len"]))
        real = hist[hist >= 0]
        with torch.inference_mode():
            if len(real):
                towers = self._towers_at(stats, real)
                local = np.full(len(hist), -1, dtype=np.int64)
                local[len(hist) - len(real):] = np.arange(len(real))
            else:
                towers = torch.zeros((1, int(self.net.embed_dim)))
                local = np.full(max(len(hist), 1), -1, dtype=np.int64)
            uid = torch.as_tensor([self.user_vocab.get(user_id, 0)], dtype=torch.long)
            qv = self.text_vectors([q], queries=True) if has else None
            u = self.net.user_vectors(towers, torch.as_tensor(local).reshape(1, -1), uid, qv,
                                      torch.as_tensor([True]) if has else None)
            vec = F.normalize(u, dim=-1).numpy().reshape(-1).astype(np.float32)
        return UserContext(user_id=user_id, vector=vec, tower=u.clone(), stats=us, has_query=has, history=hist)

    def score_items(self, stats: ServingStats, context: UserContext, item_ids) -> np.ndarray:
        """Like-probabilities of ``context``'s user for ``item_ids`` "as of now" (float64 [n]).

        Equals ``score(pairs without timestamp, history, catalog)`` for the snapshot ``stats`` was built from.
        """
        item_ids = [str(i) for i in item_ids]
        if not item_ids:
            return np.empty(0, dtype=np.float64)
        pos = stats.positions(item_ids)
        wide = stats.wide(context.stats, pos, context.has_query, self.config["prior"])
        with torch.inference_mode():
            towers, vecs = self._towers_at(stats, pos, item_ids, with_texts=True)
            u = context.tower.expand(len(item_ids), -1)
            logits = self.net.head(u, towers, torch.as_tensor(wide))
            if self.ranker is None:
                return torch.sigmoid(logits).double().numpy().copy()
            cos = _cosine(u, towers).numpy()
            logits = logits.numpy()
            vecs = vecs.numpy()
        collab = self.collab
        hist = context.history if context.history is not None else \
            stats.history_items(context.stats, int(self.config["history_len"]))
        real = hist >= 0
        hist_cf = np.full(len(hist), -1, dtype=np.int64)
        hist_cf[real] = collab.index_of(stats.item_ids[hist[real]])
        cache = self._cat_cache  # read once: another thread may replace it
        if cache is None or cache[0] is not stats:
            cache = (stats, *serving_category_counts(stats))
            self._cat_cache = cache
        cat = np.where(pos >= 0, stats.item_cat[np.maximum(pos, 0)], stats.unknown_cat) if stats.n_items else \
            np.full(len(pos), stats.unknown_cat, dtype=np.int64)
        rec, rec_labels = stats.recent_events(context.stats)
        rec_cf = np.full(len(rec), -1, dtype=np.int64)
        rec_cf[rec >= 0] = collab.index_of(stats.item_ids[rec[rec >= 0]])
        n = len(pos)
        # text cosines candidate x recent event (NaN: no event): every candidate shares the user's events,
        # so one [n, d] x [d, H] product (text_similarity's values; it gathers per row)
        sims = np.full((n, len(rec)), np.nan, dtype=np.float32)
        if (rec >= 0).any():
            rec_vecs = self.text_vectors([stats.item_texts[p] for p in rec[rec >= 0].tolist()]).numpy()
            sims[:, rec >= 0] = unit_rows(vecs) @ unit_rows(rec_vecs).T
        cf = collab.features(np.broadcast_to(hist_cf, (n, len(hist_cf))), collab.index_of(item_ids),
                             cache[1][cat], cache[2][cat], collab.text_prior(vecs), self.config["prior"], wide,
                             np.broadcast_to(rec_cf, (n, len(rec_cf))), np.broadcast_to(rec_labels, (n, len(rec_labels))),
                             sims)
        return _sigmoid(self.ranker.logit(ranker_matrix(logits, cos, wide, cf)))

    def score_user(self, stats: ServingStats, user_id: str, item_ids, query: str | None = None) -> np.ndarray:
        """:meth:`user_context` + :meth:`score_items` in one call."""
        return self.score_items(stats, self.user_context(stats, user_id, query), item_ids)


def _cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The towers' cosine, as in ``TwoTowerWide.head``."""
    return (F.normalize(u, dim=-1, eps=1e-6) * F.normalize(v, dim=-1, eps=1e-6)).sum(-1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _net_from_config(config: dict) -> TwoTowerWide:
    return TwoTowerWide(config["text_dim"], config["embed_dim"], len(config["user_vocab"]),
                        len(config["item_vocab"]), len(config["wide_columns"]), config["id_embeddings"],
                        config["id_dropout"])


def model_config(*, encoder_name: str, mode: str, text_dim: int, embed_dim: int, user_vocab: list[str],
                 item_vocab: list[str], history_len: int, max_text_tokens: int, prior: float, id_embeddings: bool,
                 id_dropout: float, **extra) -> dict:
    cfg = {"format_version": FORMAT_VERSION, "encoder": encoder_name, "mode": mode, "text_dim": int(text_dim),
           "embed_dim": int(embed_dim), "user_vocab": list(user_vocab), "item_vocab": list(item_vocab),
           "history_len": int(history_len), "max_text_tokens": int(max_text_tokens), "prior": float(prior),
           "id_embeddings": bool(id_embeddings), "id_dropout": float(id_dropout),
           "wide_columns": list(WIDE_COLUMNS)}
    cfg.update(extra)
    cfg["fingerprint"] = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cfg
