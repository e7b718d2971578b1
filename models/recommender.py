"""The trained recommender as one self-contained object: save, load, score.

Artifact layout (``Recommender.save(dir)``), no pickle anywhere:

* ``weights.safetensors`` - towers, id embeddings, wide part;
* ``encoder/`` - the BERT encoder (``save_pretrained`` safetensors) and its tokenizer;
* ``config.json`` - dimensions, mode, id vocabularies, history length, train window, metrics;
* ``text_vectors.safetensors`` + ``text_index.json`` - the encoder's vectors of the item and
  query texts seen so far (so loading and serving need no re-encoding of the catalog).

Scoring is point-in-time (:mod:`models.features`): a row with a timestamp only sees
``history`` events strictly before it, a row without one sees all of ``history`` - so
at serving time the freshest store contents drive the user profile and the statistics.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from models.data import ItemIndex, clean_queries, encode_ids
from models.features import WIDE_COLUMNS, point_in_time_features
from models.network import TextEncoder, TwoTowerWide

FORMAT_VERSION = 1
HISTORY_COLUMNS = ("user_id", "item_id", "label", "timestamp")


def _empty_history() -> pd.DataFrame:
    return pd.DataFrame({"user_id": pd.Series([], dtype="string"), "item_id": pd.Series([], dtype="string"),
                         "label": pd.Series([], dtype="int64"),
                         "timestamp": pd.Series([], dtype="datetime64[ns, UTC]")})


class Recommender:
    """Text two-tower + wide model with its encoder; see the module docstring."""

    def __init__(self, net: TwoTowerWide, encoder: TextEncoder, config: dict):
        self.net = net.eval()
        self.encoder = encoder
        self.encoder.model.eval()
        self.config = dict(config)
        self.user_vocab = {u: i + 1 for i, u in enumerate(self.config["user_vocab"])}
        self.item_vocab = {x: i + 1 for i, x in enumerate(self.config["item_vocab"])}
        self._text_cache: dict[str, np.ndarray] = {}
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
        texts = list(self._text_cache)
        if texts:
            save_file({"vectors": torch.as_tensor(np.stack([self._text_cache[t] for t in texts]))},
                      str(out / "text_vectors.safetensors"))
        (out / "text_index.json").write_text(json.dumps({"texts": texts}), encoding="utf-8")
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
        model = cls(net, encoder, config)
        if (d / "text_vectors.safetensors").is_file():
            texts = json.loads((d / "text_index.json").read_text(encoding="utf-8"))["texts"]
            vecs = load_file(str(d / "text_vectors.safetensors"))["vectors"].numpy()
            model._text_cache = {t: vecs[i] for i, t in enumerate(texts)}
        return model

    # ------------------------------------------------------------------ description
    @property
    def info(self) -> dict:
        c = self.config
        n_heads = sum(p.numel() for p in self.net.parameters())
        n_enc = sum(p.numel() for p in self.encoder.model.parameters())
        return {
            "encoder": c.get("encoder"), "mode": c.get("mode"), "embed_dim": c.get("embed_dim"),
            "history_len": c.get("history_len"), "train_start": c.get("train_start"),
            "train_end": c.get("train_end"), "n_train": c.get("n_train"), "n_val": c.get("n_val"),
            "best_val_auc": c.get("best_val_auc"), "n_users_known": len(self.user_vocab),
            "n_items_known": len(self.item_vocab), "parameters": {"heads": n_heads, "encoder": n_enc},
            "wide_columns": list(WIDE_COLUMNS),
        }

    # ------------------------------------------------------------------ text vectors
    def text_vectors(self, texts: list[str]) -> torch.Tensor:
        """Encoder vectors of ``texts``; each distinct text is encoded once and cached."""
        missing = sorted({t for t in texts if t not in self._text_cache})
        if missing:
            vecs = self.encoder.encode(missing).numpy()
            for t, v in zip(missing, vecs):
                self._text_cache[t] = v
        if not texts:
            return torch.zeros((0, self.encoder.dim))
        return torch.as_tensor(np.stack([self._text_cache[t] for t in texts]))

    def _item_tower(self, items: ItemIndex) -> torch.Tensor:
        key = hash((tuple(items.item_ids), tuple(items.texts)))
        if self._tower_cache is not None and self._tower_cache[0] == key:
            return self._tower_cache[2]
        ids = torch.as_tensor([self.item_vocab.get(x, 0) for x in items.item_ids], dtype=torch.long)
        with torch.no_grad():
            tower = self.net.item_vectors(self.text_vectors(items.texts), ids)
        self._tower_cache = (key, items, tower)
        return tower

    # ------------------------------------------------------------------ scoring
    def _prepare(self, pairs: pd.DataFrame, history: pd.DataFrame | None, catalog: pd.DataFrame):
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
        items = ItemIndex.from_catalog(catalog, pd.concat([pairs["item_id"].astype("string"),
                                                           history["item_id"].astype("string")]))
        tower = self._item_tower(items)
        feats = point_in_time_features(pairs, history, catalog, items.position, self.config["history_len"],
                                       self.config["prior"])
        q = clean_queries(pairs["query"] if "query" in pairs.columns else None, len(pairs))
        return pairs, items, tower, feats, q

    def _users(self, tower, feats, user_ids: np.ndarray, q: pd.Series, rows: slice) -> torch.Tensor:
        qs = q.iloc[rows]
        has = qs.notna().to_numpy()
        qv = None
        if has.any():
            qv = torch.zeros((len(qs), self.encoder.dim))
            qv[torch.as_tensor(has)] = self.text_vectors(qs[has].tolist())
        return self.net.user_vectors(tower, torch.as_tensor(feats.history_items[rows]),
                                     torch.as_tensor(user_ids[rows]), qv, torch.as_tensor(has))

    def score(self, pairs: pd.DataFrame, history: pd.DataFrame | None, catalog: pd.DataFrame,
              batch_size: int = 8192) -> np.ndarray:
        """Like-probabilities for ``pairs`` (user_id, item_id, optional query / timestamp)."""
        pairs, items, tower, feats, q = self._prepare(pairs, history, catalog)
        target = pairs["item_id"].astype("string").map(items.position).to_numpy(dtype=np.int64)
        users = encode_ids(pairs["user_id"], self.user_vocab)
        out = np.empty(len(pairs), dtype=np.float64)
        with torch.no_grad():
            for s in range(0, len(pairs), batch_size):
                rows = slice(s, s + batch_size)
                u = self._users(tower, feats, users, q, rows)
                logits = self.net.head(u, tower[torch.as_tensor(target[rows])], torch.as_tensor(feats.wide[rows]))
                out[rows] = torch.sigmoid(logits).double().numpy()
        return out

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
