"""Examples for training: (user context, item, label) from a store window.

:class:`RecDataModule` turns feedback events + catalog into tensors once:

* a time-based split: the last ``val_fraction`` of the window **by time** is validation
  (``val_fraction=0``: every event is a training example, no validation - the refit);
* vocabularies of user and item ids seen in the *training* part (index 0 = unknown);
* an item index over every catalog item (plus items only seen in events) and a query
  index over distinct query texts: the model encodes each text once, never per example;
* point-in-time features (:mod:`models.features`) computed from the whole window but
  only from events strictly before each example's time minus the label delay ``lag``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from models import _quiet  # noqa: F401  (before lightning is imported)
from models.features import lag_ns, point_in_time_features
from recloop.schema import item_text

REQUIRED = ("user_id", "item_id", "label", "timestamp")


def clean_queries(q: pd.Series | None, n: int) -> pd.Series:
    if q is None:
        return pd.Series([pd.NA] * n, dtype="string")
    q = q.astype("string").str.strip()
    return q.where(q.str.len() > 0)


def time_split(events: pd.DataFrame, val_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Earlier part / last ``val_fraction`` of the window by time (not by row count)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ev = events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    t0, t1 = ev["timestamp"].min(), ev["timestamp"].max()
    cut = t0 + (t1 - t0) * (1.0 - val_fraction)
    is_val = (ev["timestamp"] > cut).to_numpy()
    if is_val.all() or not is_val.any():  # degenerate clock: fall back to row order
        is_val = np.arange(len(ev)) >= round(len(ev) * (1.0 - val_fraction))
    return ev[~is_val].reset_index(drop=True), ev[is_val].reset_index(drop=True)


def validate_events(events: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in REQUIRED if c not in events.columns]
    if missing:
        raise ValueError(f"events are missing columns {missing}")
    if events.empty:
        raise ValueError("no events to train on")
    ev = events.copy()
    ev["timestamp"] = pd.to_datetime(ev["timestamp"], utc=True)
    if ev["timestamp"].isna().any() or ev["user_id"].isna().any() or ev["item_id"].isna().any():
        raise ValueError("events contain null user_id, item_id or timestamp")
    if ev["label"].isna().any():
        raise ValueError("events contain null labels")
    ev["label"] = ev["label"].astype("int64")
    if not ev["label"].isin([0, 1]).all():
        raise ValueError("labels must be 0/1")
    ev["user_id"] = ev["user_id"].astype("string")
    ev["item_id"] = ev["item_id"].astype("string")
    return ev


@dataclass
class ItemIndex:
    """Every item the model can read: id -> row, and its text."""

    item_ids: list[str]
    texts: list[str]
    position: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.position = {k: i for i, k in enumerate(self.item_ids)}

    @classmethod
    def from_catalog(cls, catalog: pd.DataFrame, extra_ids=()) -> ItemIndex:
        cat = catalog.drop_duplicates("item_id", keep="last")
        ids = cat["item_id"].astype(str).tolist()
        texts = item_text(cat).tolist()
        extra = extra_ids if isinstance(extra_ids, pd.Series) else pd.Series(list(extra_ids), dtype="object")
        extra = pd.Index(extra.dropna().astype(str).unique())
        new = extra[~extra.isin(ids)].tolist()  # items only seen in events: their id is all the text there is
        return cls(ids + new, texts + new)


def encode_ids(values: pd.Series, vocab: dict[str, int]) -> np.ndarray:
    """Vocabulary index per value; 0 for ids not in the vocabulary."""
    return values.astype("string").map(vocab).fillna(0).to_numpy(dtype=np.int64)


def example_tensors(rows: pd.DataFrame, history: pd.DataFrame, catalog: pd.DataFrame, items: ItemIndex,
                    queries: dict[str, int], user_vocab: dict[str, int], history_len: int,
                    prior: float, lag=None, features=None) -> dict[str, torch.Tensor]:
    """Model inputs for ``rows``: ids, point-in-time history and wide statistics (events older than t - lag).

    ``features``: what computes them (default :func:`point_in_time_features`; ``models.engine`` passes
    its Ray implementation, same signature and results)."""
    feats = (features or point_in_time_features)(rows, history, catalog, items.position, history_len, prior,
                                                 lag=lag)
    q = clean_queries(rows["query"] if "query" in rows.columns else None, len(rows))
    return {
        "user": torch.as_tensor(encode_ids(rows["user_id"], user_vocab)),
        "item": torch.as_tensor(rows["item_id"].astype("string").map(items.position).fillna(-1)
                                .to_numpy(dtype=np.int64)),
        "hist": torch.as_tensor(feats.history_items),
        "query": torch.as_tensor(q.map(queries).fillna(-1).to_numpy(dtype=np.int64)),
        "wide": torch.as_tensor(feats.wide),
        # not model inputs of the towers (not in BATCH_KEYS): the ranker's item-kNN features read them
        "recent": feats.recent,  # ragged (models.features.RecentEvents): dense a block of rows at a time
    }


BATCH_KEYS = ("user", "item", "hist", "query", "wide", "label")


class TensorBatches(Dataset):
    """In-memory tensors fetched a whole batch at a time (``__getitems__``): one fancy index per
    tensor instead of per-example lookups and a collate. Works with any sampler, including the
    ``DistributedSampler`` Lightning injects under DDP."""

    def __init__(self, *tensors: torch.Tensor):
        self.tensors = tensors

    def __len__(self) -> int:
        return int(self.tensors[0].shape[0])

    def __getitem__(self, i):
        return tuple(t[i] for t in self.tensors)

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[idx] for t in self.tensors)


def _as_batch(batch):
    return batch


class RecDataModule(pl.LightningDataModule):
    """Tensors built once in :meth:`setup`; loaders are plain in-memory ``TensorDataset``s.

    ``lag``: the label delay of the features (``pd.Timedelta``; None = 0). ``val_fraction=0``:
    no validation part, every event is a training example (the refit on the whole window).
    ``train_start`` / ``train_end``: the first and the newest event of the training part.
    ``features``: the point-in-time feature function (default: :func:`point_in_time_features` in this
    process; ``models.engine`` passes its Ray implementation).
    """

    def __init__(self, events: pd.DataFrame, catalog: pd.DataFrame, history_len: int = 20,
                 val_fraction: float = 0.15, batch_size: int = 512, seed: int = 42, lag=None, features=None):
        super().__init__()
        self.events = validate_events(events)
        self.catalog = catalog
        self.history_len = int(history_len)
        self.val_fraction = float(val_fraction)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.lag = pd.Timedelta(lag_ns(lag), unit="ns")
        self.features = features
        self._built = False

    def setup(self, stage: str | None = None) -> None:
        if self._built:
            return
        if self.val_fraction == 0.0:
            train = self.events.sort_values("timestamp", kind="stable").reset_index(drop=True)
            val = train.iloc[0:0]
        else:
            train, val = time_split(self.events, self.val_fraction)
        self.train_events, self.val_events = train, val
        self.train_start, self.train_end = train["timestamp"].min(), train["timestamp"].max()
        self.window_start, self.window_end = self.events["timestamp"].min(), self.events["timestamp"].max()
        self.items = ItemIndex.from_catalog(self.catalog, self.events["item_id"])
        self.user_vocab = {u: i + 1 for i, u in enumerate(sorted(train["user_id"].astype(str).unique()))}
        self.item_vocab = {x: i + 1 for i, x in enumerate(sorted(train["item_id"].astype(str).unique()))}
        q = clean_queries(self.events["query"] if "query" in self.events.columns else None, len(self.events))
        self.query_texts = sorted(q.dropna().unique().tolist())
        self.queries = {t: i for i, t in enumerate(self.query_texts)}
        self.prior = float(train["label"].mean())
        # item index position -> id-vocabulary index (0 = not seen in training)
        self.item_vocab_of_index = torch.as_tensor(
            [self.item_vocab.get(x, 0) for x in self.items.item_ids], dtype=torch.long)
        history = self.events  # the whole window; features only look strictly before each row
        self.tensors = {}
        for name, part in (("train", train), ("val", val)):
            t = example_tensors(part, history, self.catalog, self.items, self.queries, self.user_vocab,
                                self.history_len, self.prior, lag=self.lag, features=self.features)
            t["label"] = torch.as_tensor(part["label"].to_numpy(dtype=np.float32))
            self.tensors[name] = t
        self.n_train, self.n_val = len(train), len(val)
        self._built = True

    @property
    def train_wide(self) -> np.ndarray:
        return self.tensors["train"]["wide"].numpy()

    def _dataset(self, name: str) -> TensorBatches:
        t = self.tensors[name]
        return TensorBatches(*(t[k] for k in BATCH_KEYS))

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self._dataset("train"), batch_size=self.batch_size, shuffle=True, generator=g,
                          num_workers=0, drop_last=False, collate_fn=_as_batch)

    def val_dataloader(self) -> DataLoader | list:
        if self.n_val == 0:  # the refit: no validation part
            return []
        return DataLoader(self._dataset("val"), batch_size=max(self.batch_size, 1024), shuffle=False, num_workers=0,
                          collate_fn=_as_batch)


