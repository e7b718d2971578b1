"""Promotion gates: may this candidate replace the champion? A pure function.

:func:`decide_promotion` turns two :class:`~models.evaluate.Evaluation` objects (the
candidate's and the champion's, **scored on the same evaluation events**) and the
thresholds in ``settings.gates`` into a :class:`GateDecision`: one
:class:`GateRule` line per rule, and ``promote`` = the conjunction of all lines.

Rules (thresholds from :class:`recloop.settings.GateSettings`):

==========================  ==========================================================
``min_auc``                 candidate AUC ≥ ``min_auc``
``min_ndcg``                candidate NDCG@k ≥ ``min_ndcg``
``beats_popularity``        candidate AUC > the popularity baseline's AUC + ``baseline_margin``
                            on the same events (strictly: a tie does not beat it). No baseline given
                            → fails closed unless ``require_baseline = false``.
``vs_champion_auc``         paired on ``event_id``: AUC(candidate) − AUC(champion)
                            ≥ −``max_auc_drop`` (``rule = "non_inferior"``) or
                            ≥ ``min_improvement`` (``rule = "superior"``). The statistic is
                            the point estimate, or the lower bound of the paired-bootstrap
                            interval when ``decide_on = "ci_lower"``. The interval is
                            always computed and reported.
``group_auc_gap:<col>``     per configured group column: max − min per-group AUC
                            ≤ ``max_group_auc_gap``
``gap_vs_champion:<col>``   candidate gap ≤ champion gap + ``max_gap_increase``
``tail_exposure``           long-tail share of top-k slots ≥ ``min_tail_exposure``, OR
                            ≥ champion's − ``max_tail_exposure_drop`` (the lower of the
                            two thresholds applies)
==========================  ==========================================================

* **No champion yet**: only the absolute rules run (``min_auc``, ``min_ndcg``,
  ``beats_popularity``, ``group_auc_gap:*``, ``tail_exposure`` against
  ``min_tail_exposure``). The first model is promoted on absolute evidence alone.
* **Fail closed**: a NaN metric (e.g. a group with a single class, no positives for NDCG)
  fails its rule, and the detail says why. A configured group column the evaluation did
  not measure fails too. With ``group_columns = []`` the fairness rules are skipped.
* **Ties**: thresholds are inclusive (AUC exactly ``min_auc`` passes; a delta of
  exactly −``max_auc_drop`` passes), except ``beats_popularity`` which must be strictly
  greater.
* The champion must have been scored on (nearly) the same events: the two ``scored``
  frames are joined on ``event_id``; if the overlap covers less than
  ``min_paired_share`` of the candidate's events, ``vs_champion_auc`` fails.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from models.evaluate import Evaluation, auc


# --------------------------------------------------------------------------- results
@dataclass
class GateRule:
    name: str
    value: float | None  # the candidate's figure
    threshold: float | None  # what it is compared with (after applying the champion margin)
    passed: bool
    detail: str
    champion: float | None = None  # the champion's figure, when the rule compares with one
    op: str = ">="  # how value is compared with threshold: >=, >, <=

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_num(v) for k, v in asdict(self).items()}


@dataclass
class BootstrapCI:
    """Paired bootstrap interval of AUC(candidate) − AUC(champion) on the same events."""

    delta: float  # point estimate on the paired events
    low: float
    high: float
    confidence: float
    samples: int
    unit: str  # "event" or "user"
    n_paired: int
    candidate_auc: float
    champion_auc: float

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_num(v) for k, v in asdict(self).items()}


@dataclass
class GateDecision:
    promote: bool
    rules: list[GateRule]
    bootstrap_ci: BootstrapCI | None = None
    has_champion: bool = False
    champion_version: str | None = None  # the version the candidate was judged against
    candidate_version: str | None = None  # filled in by the registry
    rule_mode: str = "non_inferior"
    thresholds: dict[str, Any] = field(default_factory=dict)
    candidate: dict[str, Any] = field(default_factory=dict)  # Evaluation.to_dict()
    champion: dict[str, Any] | None = None
    decided_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def failed(self) -> list[GateRule]:
        return [r for r in self.rules if not r.passed]

    @property
    def reasons(self) -> list[str]:
        """One line per failed rule (empty when promoted)."""
        return [f"{r.name}: {r.detail}" for r in self.failed]

    @property
    def verdict(self) -> str:
        return "pass" if self.promote else "fail"

    def with_versions(self, candidate_version: str | None = None, champion_version: str | None = None) -> "GateDecision":
        return replace(self, candidate_version=candidate_version or self.candidate_version,
                       champion_version=champion_version or self.champion_version)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe; what the ``recloop.model.promoted/rejected`` event payload carries."""
        return {
            "promote": self.promote,
            "verdict": self.verdict,
            "candidate_version": self.candidate_version,
            "champion_version": self.champion_version,
            "has_champion": self.has_champion,
            "rule_mode": self.rule_mode,
            "failed_rules": [r.name for r in self.failed],
            "reasons": self.reasons,
            "rules": [r.to_dict() for r in self.rules],
            "bootstrap_ci": None if self.bootstrap_ci is None else self.bootstrap_ci.to_dict(),
            "thresholds": self.thresholds,
            "candidate": self.candidate,
            "champion": self.champion,
            "decided_at": self.decided_at,
        }

    def to_markdown(self) -> str:
        """The gate table: rule, candidate, champion, threshold, verdict (+ detail)."""
        head = "PROMOTE" if self.promote else "REJECT"
        cand = f"version {self.candidate_version}" if self.candidate_version else "candidate"
        champ = (f"champion version {self.champion_version}" if self.champion_version
                 else "the champion" if self.has_champion else "no champion (absolute gates only)")
        lines = [f"## Gate decision: **{head}** ({cand} vs {champ})", ""]
        if self.bootstrap_ci is not None:
            ci = self.bootstrap_ci
            lines += [f"Paired bootstrap ({ci.samples} resamples of {ci.unit}s, {ci.n_paired} paired events): "
                      f"AUC(candidate) − AUC(champion) = {_fmt(ci.delta, signed=True)}, "
                      f"{ci.confidence:.0%} CI [{_fmt(ci.low, signed=True)}, {_fmt(ci.high, signed=True)}]", ""]
        lines += ["| rule | candidate | champion | threshold | verdict | detail |",
                  "|---|---|---|---|---|---|"]
        for r in self.rules:
            thr = "" if r.threshold is None else f"{r.op} {_fmt(r.threshold)}"
            lines.append(f"| {r.name} | {_fmt(r.value)} | {_fmt(r.champion)} | {thr} | "
                         f"{'pass' if r.passed else '**FAIL**'} | {r.detail.replace('|', '/')} |")
        return "\n".join(lines) + "\n"


def _json_num(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(v) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def _fmt(v: Any, signed: bool = False) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "NaN"
        return f"{v:+.4f}" if signed else f"{v:.4f}"
    return str(v)


def _finite(*vals: Any) -> bool:
    return all(v is not None and isinstance(v, (int, float, np.number)) and math.isfinite(v) for v in vals)


EPS = 1e-9  # inclusive thresholds are compared with this tolerance (0.79 - 0.80 is not < -0.01)


def _compare(value: float, op: str, threshold: float) -> bool:
    return {">=": value >= threshold - EPS, ">": value > threshold + EPS, "<=": value <= threshold + EPS}[op]


def _rule(name: str, value, threshold, op: str, ok_detail: str, champion=None, why_nan: str | None = None) -> GateRule:
    """A rule line; NaN/None on either side fails closed."""
    if not _finite(value):
        return GateRule(name, value, threshold, False,
                        f"fails closed: candidate value is undefined ({why_nan or 'NaN'})", champion, op)
    if not _finite(threshold):
        return GateRule(name, value, threshold, False,
                        f"fails closed: threshold is undefined ({why_nan or 'NaN'})", champion, op)
    passed = _compare(float(value), op, float(threshold))
    verb = "meets" if passed else "misses"
    return GateRule(name, float(value), float(threshold), passed,
                    f"{verb} {op} {threshold:.4f}; {ok_detail}".rstrip("; "), champion, op)


# --------------------------------------------------------------------------- paired bootstrap
def _weighted_auc(order: np.ndarray, starts: np.ndarray, y_sorted: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUC for each row of weights ``w`` (B × n), scores pre-sorted by ``order``.

    ``starts`` are the first positions of each distinct score in sorted order (ties
    share a block and count one half), so one sort serves every resample.
    """
    ws = w[:, order]
    pos = ws * y_sorted
    neg = ws - pos
    if len(starts) < len(order):  # ties: collapse each block of equal scores
        pos = np.add.reduceat(pos, starts, axis=1)
        neg = np.add.reduceat(neg, starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _sort_blocks(scores: np.ndarray, y: np.ndarray):
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return order, starts, y[order].astype(float)


def paired_bootstrap_auc(
    labels, cand_scores, champ_scores, samples: int = 500, seed: int = 0, confidence: float = 0.95,
    groups=None, batch: int | None = None,
) -> BootstrapCI:
    """Percentile bootstrap of AUC(cand) − AUC(champ), resampling events (or ``groups``, e.g. users).

    The same resample is applied to both models (paired). Vectorised: every resample is a
    row of multiplicity weights; the AUC of a weighted sample comes from one sort per model.
    """
    y = np.asarray(labels).astype(int)
    a = np.asarray(cand_scores, dtype=float)
    b = np.asarray(champ_scores, dtype=float)
    n = y.size
    if not (a.size == b.size == n):
        raise ValueError(f"labels and the two score arrays differ in length: {n}, {a.size}, {b.size}")
    if samples < 1:
        raise ValueError(f"bootstrap samples must be ≥ 1, got {samples}")
    delta_hat = auc(y, a) - auc(y, b)
    rng = np.random.default_rng(seed)
    oa, sa, ya = _sort_blocks(a, y)
    ob, sb, yb = _sort_blocks(b, y)
    if groups is not None:
        codes, uniq = pd.factorize(pd.Series(groups))
        n_units, unit = len(uniq), "user"
    else:
        codes, n_units, unit = None, n, "event"
    deltas = np.empty(samples)
    batch = batch or max(1, min(samples, 100_000 // max(n, n_units)))  # small blocks stay in cache
    for start in range(0, samples, batch):
        m = min(batch, samples - start)
        draws = rng.integers(0, n_units, size=(m, n_units))
        counts = np.bincount((draws + (np.arange(m) * n_units)[:, None]).ravel(),
                             minlength=m * n_units).reshape(m, n_units).astype(np.float64)
        w = counts if codes is None else counts[:, codes]
        deltas[start:start + m] = _weighted_auc(oa, sa, ya, w) - _weighted_auc(ob, sb, yb, w)
    alpha = (1.0 - confidence) / 2.0
    ok = deltas[np.isfinite(deltas)]
    low, high = (np.quantile(ok, [alpha, 1 - alpha]) if ok.size else (np.nan, np.nan))
    return BootstrapCI(delta=float(delta_hat), low=float(low), high=float(high), confidence=confidence,
                       samples=int(samples), unit=unit, n_paired=int(n),
                       candidate_auc=auc(y, a), champion_auc=auc(y, b))


def pair_scores(candidate: Evaluation, champion: Evaluation) -> pd.DataFrame:
    """Join the two models' scores on ``event_id``: columns event_id, user_id, label, cand, champ."""
    for who, ev in (("candidate", candidate), ("champion", champion)):
        if ev.scored is None or "event_id" not in ev.scored.columns:
            raise ValueError(f"the {who} evaluation carries no scored events with event_id; "
                             "score both models on the same evaluation events with evaluate_scores")
    a = candidate.scored[["event_id", "user_id", "label", "score"]].rename(columns={"score": "cand"})
    b = champion.scored[["event_id", "label", "score"]].rename(columns={"score": "champ", "label": "label_champ"})
    if a["event_id"].duplicated().any() or b["event_id"].duplicated().any():
        raise ValueError("event_id must be unique in each evaluation's scored events")
    joined = a.merge(b, on="event_id", how="inner")
    if (joined["label"].astype(int) != joined["label_champ"].astype(int)).any():
        raise ValueError("the two evaluations disagree on labels for the same event_id")
    return joined.drop(columns="label_champ")


# --------------------------------------------------------------------------- the decision
def _gate_settings(settings):
    return getattr(settings, "gates", settings)


def _group_gap(ev: Evaluation, col: str, min_events: int) -> tuple[float, str | None]:
    """Gap for one column, recomputed with ``min_events`` when per-group counts are known."""
    if col not in ev.per_group_auc:
        return float("nan"), ev.reasons.get(f"group:{col}", f"group column {col!r} was not measured")
    aucs, ns = ev.per_group_auc[col], ev.per_group_n.get(col)
    if ns is None:
        gap = ev.group_auc_gap.get(col, float("nan"))
        return gap, ev.reasons.get(f"group_auc_gap:{col}") if not _finite(gap) else None
    measured = {g: a for g, a in aucs.items() if ns.get(g, 0) >= max(1, min_events)}
    if len(measured) < 2:
        return float("nan"), f"fewer than two groups with ≥ {max(1, min_events)} event(s) ({len(measured)})"
    undefined = [g for g, a in measured.items() if not _finite(a)]
    if undefined:
        return float("nan"), "undefined AUC (one class or no events) in group(s) " + ", ".join(map(str, undefined))
    vals = list(measured.values())
    return float(max(vals) - min(vals)), None


def decide_promotion(
    candidate: Evaluation,
    champion: Evaluation | None,
    settings,
    baseline_auc: float | None = None,
    *,
    champion_version: str | None = None,
) -> GateDecision:
    """Judge ``candidate`` against the floors in ``settings.gates`` and against ``champion``.

    ``settings``: a :class:`recloop.settings.Settings` or its ``GateSettings``.
    ``champion``: the champion's evaluation on the same events (``None``: no champion yet →
    absolute gates only). ``baseline_auc``: the popularity baseline's AUC on the same events.
    ``champion_version``: which registry version ``champion`` is (used by the registry's
    compare-and-set; defaults to ``champion.model_version`` when the evaluation has one).
    """
    g = _gate_settings(settings)
    rules: list[GateRule] = []
    ci: BootstrapCI | None = None

    # absolute floors
    rules.append(_rule("min_auc", candidate.auc, g.min_auc, ">=", f"global AUC on {candidate.n_events} events",
                       champion=None if champion is None else champion.auc, why_nan=candidate.reasons.get("auc")))
    rules.append(_rule(f"min_ndcg_at_{candidate.k}", candidate.ndcg_at_k, g.min_ndcg, ">=",
                       f"mean over {candidate.n_users} users with a positive",
                       champion=None if champion is None else champion.ndcg_at_k,
                       why_nan=candidate.reasons.get("ndcg_at_k")))
    if baseline_auc is None and not g.require_baseline:
        rules.append(GateRule("beats_popularity", _json_num(candidate.auc), None, True,
                              "skipped: no baseline AUC given and require_baseline = false", None, ">"))
    elif baseline_auc is None:
        rules.append(GateRule("beats_popularity", _json_num(candidate.auc), None, False,
                              "fails closed: no popularity-baseline AUC was given for these events", None, ">"))
    else:
        margin_note = f" by more than {g.baseline_margin:+g}" if g.baseline_margin else ""
        rules.append(_rule("beats_popularity", candidate.auc, baseline_auc + g.baseline_margin, ">",
                           f"must beat the popularity baseline's AUC ({baseline_auc:.4f}) on the same events"
                           + margin_note,
                           why_nan=candidate.reasons.get("auc") or "baseline AUC undefined"))

    # relative to the champion, paired on event_id
    if champion is not None:
        margin = -g.max_auc_drop if g.rule == "non_inferior" else g.min_improvement
        label = (f"non-inferior: delta ≥ −{g.max_auc_drop}" if g.rule == "non_inferior"
                 else f"superior: delta ≥ +{g.min_improvement}")
        try:
            pairs = pair_scores(candidate, champion)
            n_cand = len(candidate.scored)
            share = len(pairs) / max(1, n_cand)
            if share < g.min_paired_share:
                raise ValueError(f"only {len(pairs)} of the candidate's {n_cand} events "
                                 f"({share:.0%}) were also scored for the champion (need ≥ {g.min_paired_share:.0%})")
            ci = paired_bootstrap_auc(pairs["label"], pairs["cand"], pairs["champ"], samples=g.bootstrap_samples,
                                      seed=g.bootstrap_seed, confidence=g.confidence,
                                      groups=pairs["user_id"] if g.bootstrap_unit == "user" else None)
            stat = ci.delta if g.decide_on == "point" else ci.low
            stat_name = "paired AUC delta" if g.decide_on == "point" else f"lower {ci.confidence:.0%} CI bound of the AUC delta"
            detail = (f"{label} on {stat_name} = {_fmt(stat, signed=True)} "
                      f"({ci.confidence:.0%} CI [{_fmt(ci.low, signed=True)}, {_fmt(ci.high, signed=True)}], "
                      f"{ci.n_paired} paired events)")
            passed = bool(_finite(stat) and stat >= margin - EPS)
            if not _finite(stat):
                detail = "fails closed: the AUC delta is undefined (one class among the paired events)"
            rules.append(GateRule("vs_champion_auc", _json_num(ci.candidate_auc),
                                  _json_num(ci.champion_auc + margin), passed,
                                  ("meets " if passed else "misses ") + detail if _finite(stat) else detail,
                                  _json_num(ci.champion_auc), ">="))
        except ValueError as exc:
            rules.append(GateRule("vs_champion_auc", _json_num(candidate.auc), None, False,
                                  f"fails closed: cannot pair with the champion: {exc}", _json_num(champion.auc)))

    # fairness: per-group AUC gap
    for col in g.group_columns:
        gap, why = _group_gap(candidate, col, g.min_group_events)
        rules.append(_rule(f"group_auc_gap:{col}", gap, g.max_group_auc_gap, "<=",
                           f"max − min per-group AUC by {col}", why_nan=why))
        if champion is not None:
            cgap, cwhy = _group_gap(champion, col, g.min_group_events)
            r = _rule(f"gap_vs_champion:{col}", gap, cgap + g.max_gap_increase if _finite(cgap) else float("nan"),
                      "<=", f"champion gap {_fmt(cgap)} + {g.max_gap_increase}", champion=_json_num(cgap),
                      why_nan=why if not _finite(gap) else f"champion's gap is undefined: {cwhy}")
            rules.append(r)
    if not g.group_columns:
        rules.append(GateRule("group_auc_gap", None, None, True, "skipped: gates.group_columns is empty", None, "<="))

    # item side: long-tail exposure
    tail = candidate.tail_exposure
    if champion is not None and _finite(champion.tail_exposure):
        thr = min(g.min_tail_exposure, champion.tail_exposure - g.max_tail_exposure_drop)
        how = (f"≥ min_tail_exposure {g.min_tail_exposure} or ≥ champion {champion.tail_exposure:.4f} "
               f"− {g.max_tail_exposure_drop}")
    else:
        thr, how = g.min_tail_exposure, f"≥ min_tail_exposure {g.min_tail_exposure}"
    rules.append(_rule("tail_exposure", tail, thr, ">=", f"long-tail share of top-{candidate.k} slots; {how}",
                       champion=None if champion is None else _json_num(champion.tail_exposure),
                       why_nan=candidate.reasons.get("tail_exposure")))

    thresholds = {k: v for k, v in g.model_dump().items()} if hasattr(g, "model_dump") else dict(vars(g))
    return GateDecision(
        promote=all(r.passed for r in rules), rules=rules, bootstrap_ci=ci, has_champion=champion is not None,
        champion_version=champion_version or (getattr(champion, "model_version", None) if champion else None),
        rule_mode=g.rule, thresholds=thresholds, candidate=candidate.to_dict(),
        champion=None if champion is None else champion.to_dict(),
    )
