"""Baselines every report shows beside the model: same ``.fit(events)`` / ``.score(pairs)``.

* :class:`PopularityBaseline` - the item's smoothed like-rate in the training events
  (items never seen score the global rate: it cannot rank cold items, AUC 0.5 there).
* :class:`MatrixFactorizationBaseline` - id-only logistic matrix factorisation
  (user/item embeddings + biases, BCE, full-batch Adam in torch); unknown users or items
  fall back to the biases that exist.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import torch


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run a block with ``n`` torch CPU threads (None/0: unchanged). Small-op training is several
    times faster on one thread than on two spin-waiting ones when the cores are shared."""
    saved = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _check(events: pd.DataFrame, cols=("user_id", "item_id", "label")) -> None:
    missing = [c for c in cols if c not in events.columns]
    if missing:
        raise ValueError(f"missing columns {missing}")


class PopularityBaseline:
    def __init__(self, smoothing: float = 10.0):
        self.smoothing = float(smoothing)
        self.prior = 0.5
        self.rates: pd.Series = pd.Series(dtype="float64")

    def fit(self, events: pd.DataFrame) -> PopularityBaseline:
        _check(events)
        if events.empty:
            raise ValueError("no events to fit on")
        y = events["label"].astype("float64")
        self.prior = float(y.mean())
        g = y.groupby(events["item_id"].astype("string")).agg(["sum", "count"])
        self.rates = (g["sum"] + self.smoothing * self.prior) / (g["count"] + self.smoothing)
        return self

    def score(self, pairs: pd.DataFrame) -> np.ndarray:
        _check(pairs, ("item_id",))
        return pairs["item_id"].astype("string").map(self.rates).fillna(self.prior).to_numpy(dtype=np.float64)


class MatrixFactorizationBaseline:
    def __init__(self, dim: int = 16, epochs: int = 200, lr: float = 0.05, weight_decay: float = 1e-4,
                 seed: int = 0):
        self.dim, self.epochs, self.lr, self.weight_decay, self.seed = dim, epochs, lr, weight_decay, seed
        self.users: dict[str, int] = {}
        self.items: dict[str, int] = {}

    def fit(self, events: pd.DataFrame) -> MatrixFactorizationBaseline:
        _check(events)
        if events.empty:
            raise ValueError("no events to fit on")
        self.users = {u: i + 1 for i, u in enumerate(pd.unique(events["user_id"].astype(str)))}
        self.items = {x: i + 1 for i, x in enumerate(pd.unique(events["item_id"].astype(str)))}
        u = torch.as_tensor(events["user_id"].astype(str).map(self.users).to_numpy(dtype=np.int64))
        i = torch.as_tensor(events["item_id"].astype(str).map(self.items).to_numpy(dtype=np.int64))
        y = torch.as_tensor(events["label"].to_numpy(dtype=np.float32))
        g = torch.Generator().manual_seed(self.seed)
        nu, ni = len(self.users) + 1, len(self.items) + 1
        self.P = torch.nn.Parameter(torch.randn(nu, self.dim, generator=g) * 0.05)
        self.Q = torch.nn.Parameter(torch.randn(ni, self.dim, generator=g) * 0.05)
        self.bu = torch.nn.Parameter(torch.zeros(nu))
        self.bi = torch.nn.Parameter(torch.zeros(ni))
        p = float(y.mean().clamp(1e-3, 1 - 1e-3))
        self.b0 = torch.nn.Parameter(torch.tensor(np.log(p / (1 - p)), dtype=torch.float32))
        params = [self.P, self.Q, self.bu, self.bi, self.b0]
        opt = torch.optim.Adam(params, lr=self.lr)
        with torch_threads(1):
            for _ in range(self.epochs):
                opt.zero_grad()
                logits = self._logits(u, i)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
                reg = self.weight_decay * (self.P[u].pow(2).sum(1) + self.Q[i].pow(2).sum(1)).mean()
                (loss + reg).backward()
                opt.step()
        with torch.no_grad():  # index 0 = unknown: no embedding, no bias
            self.P[0].zero_()
            self.Q[0].zero_()
            self.bu[0] = 0.0
            self.bi[0] = 0.0
        return self

    def _logits(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return (self.P[u] * self.Q[i]).sum(1) + self.bu[u] + self.bi[i] + self.b0

    def score(self, pairs: pd.DataFrame) -> np.ndarray:
        _check(pairs, ("user_id", "item_id"))
        if not self.items:
            raise RuntimeError("fit() first")
        u = torch.as_tensor(pairs["user_id"].astype(str).map(self.users).fillna(0).to_numpy(dtype=np.int64))
        i = torch.as_tensor(pairs["item_id"].astype(str).map(self.items).fillna(0).to_numpy(dtype=np.int64))
        with torch.no_grad():
            return torch.sigmoid(self._logits(u, i)).double().numpy()
