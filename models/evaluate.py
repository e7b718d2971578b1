"""Evaluation metrics: pure functions over DataFrames with named columns.

In the style of Microsoft Recommenders' ``python_evaluation.py``: every function
takes a frame of scored events with the columns

=========  ==========================================================
user_id    who saw the item
item_id    what was shown
label      0/1 outcome (``recloop.schema.LABEL_BY_EVENT``)
score      the model's score (any monotone scale; probabilities here)
event_id   optional; kept so two models can be compared event by event
=========  ==========================================================

and returns a plain number or a small table. Degenerate cases are explicit:

* AUC of a single class is undefined: :func:`auc` returns ``NaN`` and
  :func:`auc_reason` says why. Callers (the gates) treat ``NaN`` as *fail closed*.
* Ranking metrics (NDCG@k, Recall@k) are computed per user on that user's own
  evaluation events ranked by score, then averaged over users with equal weight.
  **Users with no positive event are skipped** (their NDCG and recall are undefined);
  when no user has a positive the metric is ``NaN``.
* Ties in score are broken by the original row order (stable sort), so results
  are deterministic; a model that scores everything equal gets the ranking of the
  input order, which is why AUC (which averages ties) is the primary gate metric.
* Per-group AUC: a group with events but a single class has ``NaN`` AUC and makes
  the group gap ``NaN`` (fail closed); groups listed in ``users`` but absent from
  the evaluation events are reported with ``n = 0`` and are not part of the gap.
  Events whose user has no value for the column fall in the group ``"<missing>"``,
  which is reported but left out of the gap unless ``include_missing_group``.
  :func:`evaluate_scores` keeps each event's group value in ``Evaluation.scored``
  (column ``group:<col>``) so the gates can put a bootstrap interval on the gap.
* Cold-item AUC is over events whose item was never seen in training; ``NaN`` when
  there are none (reason ``"no cold items"``).
* Long-tail exposure: the head is the top 20 % of items by training popularity
  (ties broken by item id); everything else, including items never seen in
  training, is the tail. For each user the top-k of their evaluation events by
  score are the "slots"; exposure is the tail share of the slots, averaged over users.
* **Ranking scope.** Over each user's *logged* evaluation events (what
  :func:`evaluate_scores` computes, ``Evaluation.ranking_scope = "logged_events"``),
  NDCG@k, Recall@k and tail exposure only reorder items the user was already shown,
  so they hardly depend on the model and cannot fail a gate. The pipeline replaces them
  with metrics of a top-k over the whole catalog, as served, and sets
  ``ranking_scope = "catalog"``; the gates judge ranking only in that scope.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from recloop.jsonutil import jsonable

REQUIRED = ("user_id", "item_id", "label", "score")
MISSING_GROUP = "<missing>"
GROUP_PREFIX = "group:"  # Evaluation.scored keeps the group value of each event in column "group:<col>"
RANKING_SCOPES = ("logged_events", "catalog")
HEAD_SHARE = 0.2


# --------------------------------------------------------------------------- checks
def _check_scored(df: pd.DataFrame, required: Iterable[str] = REQUIRED) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame of scored events, got {type(df).__name__}")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"scored events lack column(s) {missing}; need {list(required)}, have {list(df.columns)}")
    if len(df) == 0:
        return
    if "label" in required:
        bad = ~pd.Series(df["label"]).isin([0, 1, True, False])
        if bad.any():
            raise ValueError(f"label must be 0/1; found {sorted(map(str, pd.unique(df['label'][bad])))[:5]}")
    if "score" in required:
        s = pd.to_numeric(df["score"], errors="coerce")
        if s.isna().any() or not np.isfinite(s.to_numpy(dtype=float)).all():
            raise ValueError(f"score has {int((~np.isfinite(s.to_numpy(dtype=float))).sum())} NaN/inf value(s)")


def _check_k(k: int) -> int:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


# --------------------------------------------------------------------------- AUC
def auc_reason(labels) -> str | None:
    """Why the AUC of these labels is undefined, or ``None`` when it is defined."""
    y = np.asarray(labels).astype(int)
    if y.size == 0:
        return "no events"
    n_pos = int(y.sum())
    if n_pos == 0:
        return f"one class only: {y.size} event(s), all negative"
    if n_pos == y.size:
        return f"one class only: {y.size} event(s), all positive"
    return None


def auc(labels, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    ``NaN`` when only one class is present (see :func:`auc_reason`).
    Equal to ``sklearn.metrics.roc_auc_score`` where that is defined.
    """
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape} vs {s.shape}")
    if auc_reason(y) is not None:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(s)  # average ranks for ties
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# --------------------------------------------------------------------------- ranking metrics
def _ranked(df: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by user then score (desc, stable), with a 1-based ``rank`` per user."""
    out = df[["user_id", "item_id", "label", "score"]].copy()
    out["_order"] = np.arange(len(out))
    out["label"] = out["label"].astype(int)
    out["score"] = out["score"].astype(float)
    out = out.sort_values(["user_id", "score", "_order"], ascending=[True, False, True], kind="mergesort")
    out["rank"] = out.groupby("user_id", sort=False).cumcount() + 1
    return out


def ndcg_per_user(df: pd.DataFrame, k: int = 10) -> pd.Series:
    """NDCG@k of each user with at least one positive (index: user_id)."""
    _check_scored(df)
    k = _check_k(k)
    if len(df) == 0:
        return pd.Series(dtype=float, name="ndcg")
    r = _ranked(df)
    top = r[r["rank"] <= k]
    dcg = (top["label"] / np.log2(top["rank"] + 1.0)).groupby(top["user_id"]).sum()
    n_pos = r.groupby("user_id")["label"].sum()
    n_pos = n_pos[n_pos > 0]
    discounts = np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))  # ideal DCG for 1..k positives
    idcg = pd.Series(discounts[np.minimum(n_pos.to_numpy(), k) - 1], index=n_pos.index)
    return (dcg.reindex(idcg.index).fillna(0.0) / idcg).rename("ndcg")


def ndcg_at_k(df: pd.DataFrame, k: int = 10) -> float:
    """Mean over users (with ≥ 1 positive) of NDCG@k; binary relevance = label."""
    per_user = ndcg_per_user(df, k)
    return float(per_user.mean()) if len(per_user) else float("nan")


def recall_per_user(df: pd.DataFrame, k: int = 10) -> pd.Series:
    """Share of each user's positives that land in their top-k (users with ≥ 1 positive)."""
    _check_scored(df)
    k = _check_k(k)
    if len(df) == 0:
        return pd.Series(dtype=float, name="recall")
    r = _ranked(df)
    n_pos = r.groupby("user_id")["label"].sum()
    n_pos = n_pos[n_pos > 0]
    hits = r[r["rank"] <= k].groupby("user_id")["label"].sum()
    return (hits.reindex(n_pos.index).fillna(0) / n_pos).astype(float).rename("recall")


def recall_at_k(df: pd.DataFrame, k: int = 10) -> float:
    """Mean over users (with ≥ 1 positive) of hits in top-k / number of positives."""
    per_user = recall_per_user(df, k)
    return float(per_user.mean()) if len(per_user) else float("nan")


# --------------------------------------------------------------------------- groups
def group_column(column: str) -> str:
    """Name of the column of ``Evaluation.scored`` that holds each event's value of ``column``."""
    return f"{GROUP_PREFIX}{column}"


def _group_values(df: pd.DataFrame, users: pd.DataFrame, column: str) -> pd.Series:
    if "user_id" not in users.columns:
        raise ValueError("users table lacks column 'user_id'")
    if column not in users.columns:
        raise ValueError(f"users table has no group column {column!r}; has {list(users.columns)}")
    dedup = users.drop_duplicates("user_id")
    mapping = pd.Series(dedup[column].to_numpy(), index=dedup["user_id"].astype(str).to_numpy())
    vals = df["user_id"].astype(str).map(mapping)
    return vals.astype(object).where(vals.notna(), MISSING_GROUP).astype(str)


def per_group_auc(df: pd.DataFrame, users: pd.DataFrame, column: str) -> pd.DataFrame:
    """AUC per value of a user attribute, via Fairlearn's ``MetricFrame``.

    Returns a table with columns ``group``, ``n`` (events), ``n_pos``, ``auc`` and
    ``reason`` (why the AUC is NaN, else None), sorted by group. Groups present in
    ``users`` but without evaluation events are listed with ``n = 0``.
    """
    _check_scored(df)
    groups = _group_values(df, users, column)
    rows: dict[str, dict[str, Any]] = {}
    if len(df):
        from fairlearn.metrics import MetricFrame

        y = df["label"].astype(int).to_numpy()
        s = df["score"].astype(float).to_numpy()
        mf = MetricFrame(
            metrics={"auc": auc, "n": lambda yt, yp: len(yt), "n_pos": lambda yt, yp: int(np.sum(yt))},
            y_true=y, y_pred=s, sensitive_features=pd.Series(groups.to_numpy(), name=column),
        )
        by = mf.by_group
        for g, row in by.iterrows():
            n, n_pos = int(row["n"]), int(row["n_pos"])
            rows[str(g)] = {"group": str(g), "n": n, "n_pos": n_pos, "auc": float(row["auc"]),
                            "reason": auc_reason(np.r_[np.ones(n_pos), np.zeros(n - n_pos)])}
    for g in pd.unique(users[column].dropna().astype(str)):
        rows.setdefault(g, {"group": g, "n": 0, "n_pos": 0, "auc": float("nan"), "reason": "no evaluation events"})
    out = pd.DataFrame(list(rows.values()), columns=["group", "n", "n_pos", "auc", "reason"])
    return out.sort_values("group", kind="mergesort").reset_index(drop=True)


def group_auc_gap(table: pd.DataFrame, min_events: int = 1, include_missing: bool = True) -> tuple[float, str | None]:
    """Largest minus smallest group AUC among groups with at least ``min_events`` events.

    Returns ``(gap, reason)``: the gap is ``NaN`` (fail closed) when a measured group
    has an undefined AUC, or when fewer than two groups are measured (reason says which).
    ``include_missing = False`` leaves the ``"<missing>"`` group out.
    """
    measured = table[table["n"] >= max(1, int(min_events))]
    if not include_missing:
        measured = measured[measured["group"].astype(str) != MISSING_GROUP]
    if len(measured) < 2:
        return float("nan"), f"fewer than two groups with ≥ {max(1, int(min_events))} event(s) ({len(measured)})"
    undefined = measured[measured["auc"].isna()]
    if len(undefined):
        parts = [f"{r.group}: {r.reason}" for r in undefined.itertuples()]
        return float("nan"), "undefined AUC in group(s) " + "; ".join(parts)
    return float(measured["auc"].max() - measured["auc"].min()), None


# --------------------------------------------------------------------------- cold items, exposure
def cold_item_auc(df: pd.DataFrame, train_items: Iterable[str]) -> float:
    """AUC over events whose item never appeared in training; NaN when none / one class."""
    _check_scored(df)
    cold = df[~df["item_id"].astype(str).isin(set(map(str, train_items)))]
    return auc(cold["label"], cold["score"]) if len(cold) else float("nan")


def item_popularity(train_events: pd.DataFrame, positive_only: bool = False) -> pd.Series:
    """Training popularity: number of events (or positive events) per item_id."""
    ev = train_events[train_events["label"].astype(int) == 1] if positive_only else train_events
    return ev.groupby(ev["item_id"].astype(str)).size().rename("popularity")


def head_items(popularity, share: float = HEAD_SHARE) -> set[str]:
    """The top ``share`` of items by popularity (ceil; ties broken by item id)."""
    pop = pd.Series(popularity, dtype=float) if not isinstance(popularity, pd.Series) else popularity.astype(float)
    pop.index = pop.index.astype(str)
    if len(pop) == 0:
        return set()
    frame = pd.DataFrame({"item_id": pop.index, "pop": pop.to_numpy()})
    frame = frame.sort_values(["pop", "item_id"], ascending=[False, True], kind="mergesort")
    n_head = math.ceil(share * len(frame))
    return set(frame["item_id"].iloc[:n_head])


def tail_exposure(df: pd.DataFrame, popularity, k: int = 10) -> float:
    """Mean over users of the share of their top-k slots (by score) filled by long-tail items.

    ``popularity``: item_id → training popularity (Series or mapping). Items outside the
    top 20 % (and items never seen in training) are long tail. NaN when ``df`` is empty.
    """
    _check_scored(df, ("user_id", "item_id", "score"))
    k = _check_k(k)
    if len(df) == 0:
        return float("nan")
    head = head_items(popularity)
    tmp = df[["user_id", "item_id", "score"]].copy()
    tmp["label"] = 0
    r = _ranked(tmp)
    top = r[r["rank"] <= k]
    is_tail = ~top["item_id"].astype(str).isin(head)
    return float(is_tail.groupby(top["user_id"]).mean().mean())


# --------------------------------------------------------------------------- the report
@dataclass
class Evaluation:
    """Everything the gates and the registry need about one model on one evaluation set."""

    auc: float
    ndcg_at_k: float
    recall_at_k: float
    per_group_auc: dict[str, dict[str, float]]  # column -> group -> AUC
    group_auc_gap: dict[str, float]  # column -> max - min
    cold_item_auc: float
    tail_exposure: float
    n_events: int
    n_users: int
    k: int = 10
    n_positive: int = 0
    n_cold_events: int = 0
    per_group_n: dict[str, dict[str, int]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # metric -> why it is NaN / skipped
    model_version: str | None = None  # which registered version was scored (set by the caller)
    # "logged_events": ndcg/recall/tail rank each user's logged eval events (cannot fail a gate);
    # "catalog": the pipeline replaced them with a top-k over the whole catalog, as served
    ranking_scope: str = "logged_events"
    # event_id, user_id, item_id, label, score and group:<col> per configured group column
    scored: pd.DataFrame | None = field(default=None, repr=False, compare=False)

    @property
    def n_negative(self) -> int:
        return int(self.n_events) - int(self.n_positive)

    @property
    def max_group_auc_gap(self) -> float:
        """The worst gap over group columns (NaN if any measured column's gap is NaN)."""
        if not self.group_auc_gap:
            return float("nan")
        vals = list(self.group_auc_gap.values())
        return float("nan") if any(v is None or not np.isfinite(v) for v in vals) else float(max(vals))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (NaN → None); the scored frame is left out."""
        d = asdict(self) if self.scored is None else asdict(Evaluation(**{**self.__dict__, "scored": None}))
        d.pop("scored", None)
        return jsonable(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Evaluation:
        """Inverse of :meth:`to_dict` (None → NaN); ``scored`` is not restored."""
        nan = float("nan")

        def f(v):
            return nan if v is None else float(v)

        return cls(
            auc=f(d.get("auc")), ndcg_at_k=f(d.get("ndcg_at_k")), recall_at_k=f(d.get("recall_at_k")),
            per_group_auc={c: {g: f(v) for g, v in m.items()} for c, m in (d.get("per_group_auc") or {}).items()},
            group_auc_gap={c: f(v) for c, v in (d.get("group_auc_gap") or {}).items()},
            cold_item_auc=f(d.get("cold_item_auc")), tail_exposure=f(d.get("tail_exposure")),
            n_events=int(d.get("n_events", 0)), n_users=int(d.get("n_users", 0)), k=int(d.get("k", 10)),
            n_positive=int(d.get("n_positive", 0)), n_cold_events=int(d.get("n_cold_events", 0)),
            per_group_n={c: {g: int(v) for g, v in m.items()} for c, m in (d.get("per_group_n") or {}).items()},
            reasons=dict(d.get("reasons") or {}), model_version=d.get("model_version"),
            ranking_scope=str(d.get("ranking_scope") or "logged_events"),
        )


def evaluate_scores(
    scored: pd.DataFrame,
    users: pd.DataFrame | None,
    train_items: Iterable[str],
    popularity,
    k: int = 10,
    group_columns: Iterable[str] = ("gender", "age_bucket"),
    min_group_events: int = 1,
    include_missing_group: bool = False,
) -> Evaluation:
    """All metrics for one model's scores on one evaluation set.

    ``scored``: evaluation events with ``user_id``, ``item_id``, ``label``, ``score``
    (and ``event_id`` when available: it is kept in ``Evaluation.scored`` so the gates can
    pair two models' scores event by event). ``users``: the users table with the group
    columns (a column it lacks is skipped and noted in ``reasons``). ``train_items``:
    items seen in training (for cold-item AUC). ``popularity``: item → training popularity.
    ``min_group_events`` / ``include_missing_group``: which groups the reported point gap
    ``group_auc_gap`` spans (the gates recompute the gap, with an interval, from ``scored``).

    Ranking metrics here rank each user's logged events (``ranking_scope =
    "logged_events"``); the caller may overwrite them with catalog metrics.
    """
    _check_scored(scored)
    k = _check_k(k)
    reasons: dict[str, str] = {}
    y = scored["label"].astype(int).to_numpy()
    s = scored["score"].astype(float).to_numpy()

    g_auc = auc(y, s)
    if (r := auc_reason(y)) is not None:
        reasons["auc"] = r
    ndcg = ndcg_at_k(scored, k)
    rec = recall_at_k(scored, k)
    if not np.isfinite(ndcg):
        reasons["ndcg_at_k"] = reasons["recall_at_k"] = "no user has a positive event"

    per_group: dict[str, dict[str, float]] = {}
    per_group_n: dict[str, dict[str, int]] = {}
    gaps: dict[str, float] = {}
    users = users if users is not None else pd.DataFrame({"user_id": []})
    group_vals: dict[str, pd.Series] = {}
    for col in group_columns:
        if col not in users.columns:
            reasons[f"group:{col}"] = f"users table has no column {col!r}; fairness by {col} not measured"
            continue
        table = per_group_auc(scored, users, col)
        group_vals[group_column(col)] = _group_values(scored, users, col)
        per_group[col] = dict(zip(table["group"], table["auc"].astype(float)))
        per_group_n[col] = dict(zip(table["group"], table["n"].astype(int)))
        gap, why = group_auc_gap(table, min_group_events, include_missing=include_missing_group)
        gaps[col] = gap
        if why:
            reasons[f"group_auc_gap:{col}"] = why

    train_set = set(map(str, train_items))
    cold_mask = ~scored["item_id"].astype(str).isin(train_set)
    n_cold = int(cold_mask.sum())
    cold = cold_item_auc(scored, train_set)
    if n_cold == 0:
        reasons["cold_item_auc"] = "no cold items in the evaluation set"
    elif (r := auc_reason(y[cold_mask.to_numpy()])) is not None:
        reasons["cold_item_auc"] = r

    tail = tail_exposure(scored, popularity, k)
    if not np.isfinite(tail):
        reasons["tail_exposure"] = "no evaluation events"

    keep = [c for c in ("event_id", "user_id", "item_id", "label", "score") if c in scored.columns]
    kept = scored[keep].assign(**group_vals).reset_index(drop=True)
    return Evaluation(
        auc=g_auc, ndcg_at_k=ndcg, recall_at_k=rec, per_group_auc=per_group, group_auc_gap=gaps,
        cold_item_auc=cold, tail_exposure=tail, n_events=len(scored),
        n_users=int(scored["user_id"].nunique()), k=k, n_positive=int(y.sum()), n_cold_events=n_cold,
        per_group_n=per_group_n, reasons=reasons, scored=kept,
    )
