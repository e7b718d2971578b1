"""The paired bootstrap behind the gates: one set of resamples for every model and group.

Resampling unit: users by default (one user's events are correlated; an event bootstrap's
interval is 2-2.5x too narrow on such data, see ``benchmarks/bench_gate_power.py``). Every
resample is a row of multiplicity weights, and :class:`AUCKernel` computes the AUC of a
weighted sample from one sort per model, so k models and their groups share the draws.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from models.evaluate import auc
from recloop.jsonutil import jsonable

CANDIDATE, CHAMPION = "candidate", "champion"


def _fmt(v: Any, signed: bool = False) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "NaN"
        return f"{v:+.4f}" if signed else f"{v:.4f}"
    return str(v)



@dataclass
class BootstrapCI:
    """Percentile-bootstrap interval of one statistic (an AUC, an AUC difference, a gap)."""

    estimate: float  # the statistic on the paired events
    low: float
    high: float
    confidence: float
    samples: int
    unit: str  # what was resampled: "user" or "event"
    n_events: int
    statistic: str = "AUC(candidate) − AUC(champion)"
    n_units: int = 0
    n_valid: int = 0  # resamples where the statistic was defined (both classes present)
    candidate_auc: float | None = None  # for a difference: the two AUCs on the paired events
    reference_auc: float | None = None

    # names kept from the two-model version
    @property
    def delta(self) -> float:
        return self.estimate

    @property
    def n_paired(self) -> int:
        return self.n_events

    @property
    def champion_auc(self) -> float | None:
        return self.reference_auc

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    def describe(self, signed: bool = True) -> str:
        return (f"{_fmt(self.estimate, signed)}, {self.confidence:.0%} CI [{_fmt(self.low, signed)}, "
                f"{_fmt(self.high, signed)}]")


class Resampler:
    """Bootstrap resamples as multiplicity counts per unit (user or event), drawn in batches.

    ``units``: the unit of each event (e.g. ``user_id``: a cluster bootstrap) or ``None``
    (each event is its own unit). Resample ``b`` draws ``n_units`` units with replacement;
    an event's weight is its unit's count. Seeded: the same seed gives the same resamples.
    """

    def __init__(self, n_events: int, units=None, samples: int = 500, seed: int = 0):
        if samples < 1:
            raise ValueError(f"bootstrap samples must be ≥ 1, got {samples}")
        if units is None:
            self.codes, self.n_units, self.unit = np.arange(n_events), n_events, "event"
        else:
            codes, uniq = pd.factorize(pd.Series(np.asarray(units)))
            if len(codes) != n_events:
                raise ValueError(f"units has {len(codes)} entries for {n_events} events")
            self.codes, self.n_units, self.unit = codes, len(uniq), "user"
        self.n_events, self.samples, self.seed = int(n_events), int(samples), int(seed)

    def batches(self, batch: int) -> Iterator[np.ndarray]:
        """Count matrices (``m × n_units``, float32), ``samples`` rows in all."""
        rng = np.random.default_rng(self.seed)
        u = max(1, self.n_units)
        for start in range(0, self.samples, batch):
            m = min(batch, self.samples - start)
            draws = rng.integers(0, u, size=(m, u))
            flat = (draws + (np.arange(m) * u)[:, None]).ravel()
            yield np.bincount(flat, minlength=m * u).reshape(m, u).astype(np.float32)


class AUCKernel:
    """The AUC of one score vector (over all events or a subset) for many weightings at once.

    One sort serves every resample: negatives are sorted by score; each positive knows how
    many negatives lie strictly below it (``lo``) and at or below it (``hi``), so its weighted
    count of beaten negatives (ties count one half) is ``(C[lo] + C[hi]) / 2`` where ``C``
    is the cumulative negative weight.
    """

    def __init__(self, labels: np.ndarray, scores: np.ndarray, codes: np.ndarray, mask: np.ndarray | None = None):
        y, s, c = labels, scores, codes
        if mask is not None:
            y, s, c = y[mask], s[mask], c[mask]
        pos = y.astype(bool)
        neg_s = s[~pos]
        order = np.argsort(neg_s, kind="mergesort")
        neg_sorted = neg_s[order]
        self.neg_units = c[~pos][order]
        self.pos_units = c[pos]
        pos_s = s[pos]
        self.lo = np.searchsorted(neg_sorted, pos_s, side="left")
        self.hi = np.searchsorted(neg_sorted, pos_s, side="right")
        self.ties = bool((self.lo != self.hi).any())
        self.n_events, self.n_pos = int(y.size), int(pos.sum())
        self.point = auc(y, s)

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        m = counts.shape[0]
        if self.n_pos == 0 or self.n_pos == self.n_events:
            return np.full(m, np.nan)
        wn = np.take(counts, self.neg_units, axis=1)
        cum = np.zeros((m, wn.shape[1] + 1), dtype=np.float32)
        np.cumsum(wn, axis=1, out=cum[:, 1:])
        wp = np.take(counts, self.pos_units, axis=1)
        beaten = np.take(cum, self.lo, axis=1)
        if self.ties:
            beaten = 0.5 * (beaten + np.take(cum, self.hi, axis=1))
        num = np.einsum("ij,ij->i", wp, beaten, dtype=np.float64)
        den = wp.sum(axis=1, dtype=np.float64) * cum[:, -1].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / den, np.nan)


@dataclass
class BootstrapDraws:
    """Point AUC and per-resample AUCs of several targets, all on the same resamples."""

    point: dict[Hashable, float]
    draws: dict[Hashable, np.ndarray]  # key -> (samples,) AUCs
    unit: str
    n_units: int
    n_events: int
    samples: int

    def interval(self, estimate: float, values: np.ndarray, confidence: float, statistic: str,
                 candidate_auc: float | None = None, reference_auc: float | None = None) -> BootstrapCI:
        """Percentile interval of ``values`` (one per resample; NaN resamples are dropped)."""
        ok = values[np.isfinite(values)]
        alpha = (1.0 - confidence) / 2.0
        low, high = (np.quantile(ok, [alpha, 1 - alpha]) if ok.size else (np.nan, np.nan))
        return BootstrapCI(estimate=float(estimate), low=float(low), high=float(high), confidence=confidence,
                           samples=self.samples, unit=self.unit, n_events=self.n_events, statistic=statistic,
                           n_units=self.n_units, n_valid=int(ok.size),
                           candidate_auc=candidate_auc, reference_auc=reference_auc)

    def auc_ci(self, key: Hashable, confidence: float, statistic: str) -> BootstrapCI:
        return self.interval(self.point[key], self.draws[key], confidence, statistic)

    def delta_ci(self, a: Hashable, b: Hashable, confidence: float, statistic: str) -> BootstrapCI:
        """Paired interval of AUC(a) − AUC(b)."""
        return self.interval(self.point[a] - self.point[b], self.draws[a] - self.draws[b], confidence, statistic,
                             candidate_auc=self.point[a], reference_auc=self.point[b])


def bootstrap_aucs(
    labels, targets: Mapping[Hashable, tuple[Any, Any]], *, units=None, samples: int = 500, seed: int = 0,
    batch: int | None = None,
) -> BootstrapDraws:
    """AUC of every target on the same bootstrap resamples (paired by construction).

    ``targets``: key → ``(scores, mask)``: a model's scores on all events and a boolean mask
    of the events the AUC is over (``None``: all), e.g. one model's AUC within one group.
    ``units``: resample these (e.g. user ids; ``None``: events). Differences, gaps and any
    other function of the AUCs get their interval from the per-resample values.
    """
    y = np.asarray(labels).astype(int)
    n = y.size
    res = Resampler(n, units, samples, seed)
    kernels = {}
    for key, (scores, mask) in targets.items():
        s = np.asarray(scores, dtype=float)
        if s.size != n:
            raise ValueError(f"labels and the scores of {key!r} differ in length: {n} vs {s.size}")
        kernels[key] = AUCKernel(y, s, res.codes, None if mask is None else np.asarray(mask, dtype=bool))
    widest = max([res.n_units, *(k.n_events for k in kernels.values())], default=1)
    batch = batch or max(1, min(samples, 100_000 // max(1, widest)))  # small blocks stay in cache
    draws = {key: np.empty(samples) for key in kernels}
    start = 0
    for counts in res.batches(batch):
        m = counts.shape[0]
        for key, kernel in kernels.items():
            draws[key][start:start + m] = kernel(counts)
        start += m
    return BootstrapDraws(point={k: kern.point for k, kern in kernels.items()}, draws=draws, unit=res.unit,
                          n_units=res.n_units, n_events=n, samples=samples)


def paired_bootstrap_auc(
    labels, cand_scores, champ_scores, samples: int = 500, seed: int = 0, confidence: float = 0.95,
    groups=None, batch: int | None = None,
) -> BootstrapCI:
    """Percentile bootstrap of AUC(cand) − AUC(champ), resampling events (or ``groups``, e.g. users)."""
    y = np.asarray(labels)
    a, b = np.asarray(cand_scores, dtype=float), np.asarray(champ_scores, dtype=float)
    if not (a.size == b.size == y.size):
        raise ValueError(f"labels and the two score arrays differ in length: {y.size}, {a.size}, {b.size}")
    d = bootstrap_aucs(y, {CANDIDATE: (a, None), CHAMPION: (b, None)}, units=groups, samples=samples, seed=seed,
                       batch=batch)
    return d.delta_ci(CANDIDATE, CHAMPION, confidence, "AUC(candidate) − AUC(champion)")
