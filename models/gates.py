"""Promotion gates: may this candidate replace the champion? A pure function.

:func:`decide_promotion` turns :class:`~models.evaluate.Evaluation` objects — the
candidate's, the champion's and each baseline's, **all scored on the same evaluation
events** — and the thresholds in ``settings.gates`` into a :class:`GateDecision`: one
:class:`GateRule` line per rule, and ``promote`` = the conjunction of all lines.

Every comparison is paired on ``event_id`` and judged on a percentile-bootstrap interval.
All intervals of one decision come from **one** set of resamples (the same weights for
every model, group and statistic), drawn over *users* by default: one user's events are
correlated, and resampling events as if independent makes intervals too narrow
(``benchmarks/bench_gate_power.py`` measures by how much).

Rules (thresholds from :class:`recloop.settings.GateSettings`, defaults in brackets):

=========================  ===================================================  ==========================================
rule                       passes when                                          cannot catch
=========================  ===================================================  ==========================================
``evidence``               eval events ≥ ``min_eval_events`` (1000),            many events from very few users (the
                           positives ≥ ``min_eval_positives`` (100),            user bootstrap then has few clusters)
                           negatives ≥ ``min_eval_negatives`` (100); else
                           reject with "insufficient evidence: …"
``min_auc``                candidate AUC ≥ ``min_auc`` (0.60), point            a model that is good on average but bad
                           estimate (its interval is shown)                     for a subgroup below ``min_group_events``
``min_ndcg_at_<k>``        catalog NDCG@k ≥ ``min_ndcg`` (0.05); fails closed   quality beyond the top k; items a
                           unless ``ranking_scope == "catalog"``                user would like but never saw
``beats_baselines``        lower CI bound of AUC(candidate) − AUC(strongest     value over baselines that were not given
                           baseline) > ``baseline_margin`` (0); strongest =     (no baselines + ``require_baseline``
                           highest AUC on the paired events                     → fails closed)
``vs_champion_auc``        lower CI bound of AUC(candidate) − AUC(champion)     a drop smaller than ``max_auc_drop``;
                           ≥ −``max_auc_drop`` (0.02, ``non_inferior``) or      repeated small drops over many
                           ≥ ``min_improvement`` (``superior``);                promotions (each judged vs the last)
                           ``decide_on = "point"`` uses the point estimate
``group_auc_gap:<col>``    lower CI bound of max − min per-group AUC over       a large gap that is too noisy to prove;
                           gated groups ≤ ``max_group_auc_gap`` (0.10)          unfairness in groups < ``min_group_events``
                                                                                (reported, not gated) or in ``<missing>``
``gap_vs_champion:<col>``  lower CI bound of (candidate gap − champion gap)     the same; and a gap the champion had too
                           ≤ ``max_gap_increase`` (0.03)
``tail_exposure``          catalog long-tail share of top-k slots ≥             concentration inside the tail; an
                           ``min_tail_exposure`` (0.05), an absolute floor      unhelpful tail (only share is measured)
                           (no champion ratchet); fails closed unless
                           ``ranking_scope == "catalog"``
=========================  ===================================================  ==========================================

* **Insufficient evidence**: the ``evidence`` rule fails (the decision is a reject with
  a first reason starting "insufficient evidence:"), and every other rule is still
  computed and shown.
* **No champion yet**: ``vs_champion_auc`` and ``gap_vs_champion:*`` are left out.
* **Groups**: a group with fewer than ``min_group_events`` events is reported (AUC and
  interval) but not gated; ``"<missing>"`` (users without the attribute) is left out of
  the gap unless ``include_missing_group``. Fewer than two gated groups: the fairness rules
  pass with "not gated" in their detail. The gap statistic is max − min, which is biased
  upwards on small groups; deciding on the lower bound keeps that from rejecting on noise.
* **Fail closed**: an undefined figure (a single class, an unmeasured group column, a
  model whose scored events cannot be paired with the candidate's on at least
  ``min_paired_share`` of them, labels that disagree) fails its rule with the reason.
* **Ties**: thresholds are inclusive except ``beats_baselines`` (must be strictly above).
* **Ranking scope**: NDCG@k and tail exposure over each user's *logged* eval events only
  reorder what the user was shown and cannot fail, so both rules fail closed unless the
  pipeline replaced them with catalog metrics (``Evaluation.ranking_scope = "catalog"``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from models.bootstrap import CANDIDATE, CHAMPION, BootstrapCI, BootstrapDraws, _fmt, bootstrap_aucs
from models.evaluate import MISSING_GROUP, Evaluation, group_column
from recloop.jsonutil import jsonable

BASELINE = "baseline:"
EPS = 1e-9  # inclusive thresholds are compared with this tolerance (0.79 - 0.80 is not < -0.01)


# --------------------------------------------------------------------------- results
@dataclass
class GateRule:
    name: str
    value: float | None  # the candidate's figure (the point estimate of what is judged)
    threshold: float | None
    passed: bool
    detail: str  # why it passed or failed (the reason shown in reports)
    champion: float | None = None  # the champion's figure, when there is one
    op: str = ">="  # how the decided statistic is compared with threshold: >=, >, <=
    low: float | None = None  # interval of value, when the rule has one
    high: float | None = None
    decided_on: str = "point"  # "point" (value) or "ci_lower" (low) is compared with threshold
    label: str | None = None  # reason prefix (default: the rule name)

    @property
    def reason(self) -> str:
        return f"{self.label or self.name}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


@dataclass
class GroupStat:
    """The candidate's AUC in one group of one column, with its interval."""

    group: str
    n: int
    n_pos: int
    auc: float
    low: float
    high: float
    gated: bool  # part of the gap
    note: str = ""  # why it is not gated
    champion_auc: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


@dataclass
class GateDecision:
    promote: bool
    rules: list[GateRule]
    bootstrap_ci: BootstrapCI | None = None  # AUC(candidate) − AUC(champion)
    baseline_cis: dict[str, BootstrapCI] = field(default_factory=dict)  # AUC(candidate) − AUC(baseline)
    strongest_baseline: str | None = None
    auc_ci: BootstrapCI | None = None  # the candidate's AUC
    group_stats: dict[str, list[GroupStat]] = field(default_factory=dict)  # column -> groups
    group_gap_cis: dict[str, BootstrapCI] = field(default_factory=dict)  # column -> candidate gap
    gap_vs_champion_cis: dict[str, BootstrapCI] = field(default_factory=dict)  # column -> gap − champion's
    evidence: dict[str, int] = field(default_factory=dict)
    has_champion: bool = False
    champion_version: str | None = None  # the version the candidate was judged against
    candidate_version: str | None = None
    rule_mode: str = "non_inferior"
    thresholds: dict[str, Any] = field(default_factory=dict)
    candidate: dict[str, Any] = field(default_factory=dict)  # Evaluation.to_dict()
    champion: dict[str, Any] | None = None
    decided_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def failed(self) -> list[GateRule]:
        return [r for r in self.rules if not r.passed]

    @property
    def reasons(self) -> list[str]:
        """One line per failed rule (empty when promoted); "insufficient evidence: …" first when so."""
        return [r.reason for r in self.failed]

    @property
    def insufficient_evidence(self) -> bool:
        return any(r.name == "evidence" and not r.passed for r in self.rules)

    @property
    def verdict(self) -> str:
        return "pass" if self.promote else "fail"

    def with_versions(self, candidate_version: str | None = None, champion_version: str | None = None) -> GateDecision:
        return replace(self, candidate_version=candidate_version or self.candidate_version,
                       champion_version=champion_version or self.champion_version)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe; what the ``recloop.model.promoted/rejected`` event payload carries."""
        return {
            "promote": self.promote,
            "verdict": self.verdict,
            "insufficient_evidence": self.insufficient_evidence,
            "candidate_version": self.candidate_version,
            "champion_version": self.champion_version,
            "has_champion": self.has_champion,
            "rule_mode": self.rule_mode,
            "failed_rules": [r.name for r in self.failed],
            "reasons": self.reasons,
            "rules": [r.to_dict() for r in self.rules],
            "evidence": {k: int(v) for k, v in self.evidence.items()},
            "bootstrap_ci": None if self.bootstrap_ci is None else self.bootstrap_ci.to_dict(),
            "auc_ci": None if self.auc_ci is None else self.auc_ci.to_dict(),
            "strongest_baseline": self.strongest_baseline,
            "baseline_cis": {k: v.to_dict() for k, v in self.baseline_cis.items()},
            "group_stats": {c: [s.to_dict() for s in v] for c, v in self.group_stats.items()},
            "group_gap_cis": {k: v.to_dict() for k, v in self.group_gap_cis.items()},
            "gap_vs_champion_cis": {k: v.to_dict() for k, v in self.gap_vs_champion_cis.items()},
            "thresholds": jsonable(self.thresholds),
            "candidate": self.candidate,
            "champion": self.champion,
            "decided_at": self.decided_at,
        }

    def to_markdown(self) -> str:
        """The gate table (every rule with its interval and reason), the baselines and the groups."""
        head = "PROMOTE" if self.promote else ("REJECT (insufficient evidence)" if self.insufficient_evidence
                                               else "REJECT")
        cand = f"version {self.candidate_version}" if self.candidate_version else "candidate"
        champ = (f"champion version {self.champion_version}" if self.champion_version
                 else "the champion" if self.has_champion else "no champion (absolute gates only)")
        lines = [f"## Gate decision: **{head}** ({cand} vs {champ})", ""]
        ci = self.bootstrap_ci or self.auc_ci
        if self.evidence:
            e = self.evidence
            lines.append(f"Evidence: {e.get('n_events', 0):,} eval events ({e.get('n_positive', 0):,} positive, "
                         f"{e.get('n_negative', 0):,} negative) from {e.get('n_users', 0):,} users; "
                         f"{e.get('n_paired', 0):,} events paired across all models.")
        if ci is not None:
            lines.append(f"Intervals: {ci.confidence:.0%} percentile bootstrap, {ci.samples} resamples of "
                         f"{ci.n_units:,} {ci.unit}s, shared by every model, group and statistic below.")
        lines += ["", "| rule | candidate | champion | interval | threshold | decided on | verdict | reason |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in self.rules:
            thr = "" if r.threshold is None else f"{r.op} {_fmt(r.threshold)}"
            iv = "" if r.low is None and r.high is None else f"[{_fmt(r.low)}, {_fmt(r.high)}]"
            on = {"ci_lower": "CI lower bound", "point": "point"}.get(r.decided_on, r.decided_on)
            lines.append(f"| {r.name} | {_fmt(r.value)} | {_fmt(r.champion)} | {iv} | {thr} | {on} | "
                         f"{'pass' if r.passed else '**FAIL**'} | {_cell(r.detail)} |")
        if self.baseline_cis:
            lines += ["", "### Baselines (same events, same resamples)", "",
                      "| baseline | AUC | candidate AUC | candidate − baseline | interval | |", "|---|---|---|---|---|---|"]
            for name, b in self.baseline_cis.items():
                mark = "strongest" if name == self.strongest_baseline else ""
                lines.append(f"| {name} | {_fmt(b.reference_auc)} | {_fmt(b.candidate_auc)} | "
                             f"{_fmt(b.estimate, True)} | [{_fmt(b.low, True)}, {_fmt(b.high, True)}] | {mark} |")
        for col, stats in self.group_stats.items():
            lines += ["", f"### Groups by {col}", ""]
            gap = self.group_gap_cis.get(col)
            if gap is not None:
                lines.append(f"Gap (max − min AUC over gated groups): {gap.describe(signed=False)}.")
            inc = self.gap_vs_champion_cis.get(col)
            if inc is not None:
                lines.append(f"Gap − champion's gap: {inc.describe()}.")
            lines += ["", "| group | events | positives | AUC | interval | champion AUC | gated |",
                      "|---|---|---|---|---|---|---|"]
            for s in stats:
                gated = "yes" if s.gated else f"no: {_cell(s.note)}"
                lines.append(f"| {s.group} | {s.n:,} | {s.n_pos:,} | {_fmt(s.auc)} | [{_fmt(s.low)}, {_fmt(s.high)}] | "
                             f"{_fmt(s.champion_auc)} | {gated} |")
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def _finite(*vals: Any) -> bool:
    return all(v is not None and isinstance(v, (int, float, np.number)) and math.isfinite(v) for v in vals)


def _compare(value: float, op: str, threshold: float) -> bool:
    return {">=": value >= threshold - EPS, ">": value > threshold + EPS, "<=": value <= threshold + EPS}[op]


# --------------------------------------------------------------------------- pairing the models' events
def _scored(ev: Evaluation | None, who: str, need_event_id: bool = True) -> pd.DataFrame:
    cols = ["event_id", "user_id", "label", "score"] if need_event_id else ["user_id", "label", "score"]
    if ev is None or ev.scored is None or any(c not in ev.scored.columns for c in cols):
        raise ValueError(f"the {who} evaluation carries no scored events with {', '.join(cols)}; "
                         "score every model on the same evaluation events with evaluate_scores")
    if need_event_id and ev.scored["event_id"].duplicated().any():
        raise ValueError(f"event_id is not unique in the {who}'s scored events")
    return ev.scored


def pair_scores(candidate: Evaluation, champion: Evaluation) -> pd.DataFrame:
    """Join two models' scores on ``event_id``: columns event_id, user_id, label, cand, champ."""
    a = _scored(candidate, "candidate")[["event_id", "user_id", "label", "score"]].rename(columns={"score": "cand"})
    b = _scored(champion, "champion")[["event_id", "label", "score"]].rename(
        columns={"score": "champ", "label": "label_champ"})
    joined = a.merge(b, on="event_id", how="inner")
    if (joined["label"].astype(int) != joined["label_champ"].astype(int)).any():
        raise ValueError("the two evaluations disagree on labels for the same event_id")
    return joined.drop(columns="label_champ")


@dataclass
class PairedEvents:
    """The events every pairable model was scored on, in the candidate's order."""

    labels: np.ndarray
    users: np.ndarray
    scores: dict[str, np.ndarray]  # model key ("candidate", "champion", "baseline:<name>") -> scores
    groups: dict[str, np.ndarray]  # group column -> value per event (columns the candidate carries)
    problems: dict[str, str]  # model key -> why it could not be paired (its rules fail closed)
    n_candidate: int


def pair_events(candidate: Evaluation, others: Mapping[str, Evaluation | None], min_share: float,
                group_columns=()) -> PairedEvents:
    """Intersect the candidate's scored events with each other model's on ``event_id``.

    A model that covers less than ``min_share`` of the candidate's events, or disagrees on
    a label, is left out (listed in ``problems``). Raises ``ValueError`` when the candidate
    itself has no usable scored events.
    """
    base = _scored(candidate, "candidate", need_event_id=bool(others))
    keep = np.ones(len(base), dtype=bool)
    base_ids = pd.Index(base["event_id"]) if others else None
    aligned: dict[str, pd.Series] = {}
    problems: dict[str, str] = {}
    for key, ev in others.items():
        try:
            o = _scored(ev, key.removeprefix(BASELINE) if key.startswith(BASELINE) else key).set_index("event_id")
            present = base_ids.isin(o.index)
            share = present.sum() / max(1, len(base))
            if share < min_share:
                raise ValueError(f"only {int(present.sum())} of the candidate's {len(base)} events ({share:.0%}) "
                                 f"were also scored for it (need ≥ {min_share:.0%})")
            lab = o["label"].reindex(base_ids[present]).astype(int).to_numpy()
            if (lab != base["label"].to_numpy()[present].astype(int)).any():
                raise ValueError("it disagrees with the candidate on labels for the same event_id")
            aligned[key] = o["score"].reindex(base_ids)
            keep &= present
        except ValueError as exc:
            problems[key] = str(exc)
    rows = base[keep]
    scores = {CANDIDATE: rows["score"].to_numpy(dtype=float)}
    scores.update({k: s.to_numpy(dtype=float)[keep] for k, s in aligned.items()})
    groups = {c: rows[group_column(c)].astype(str).to_numpy() for c in group_columns
              if group_column(c) in rows.columns}
    return PairedEvents(labels=rows["label"].astype(int).to_numpy(), users=rows["user_id"].astype(str).to_numpy(),
                        scores=scores, groups=groups, problems=problems, n_candidate=len(base))


# --------------------------------------------------------------------------- the rules
def _gate_settings(settings):
    return getattr(settings, "gates", settings)


def _rule(name: str, value, threshold, op: str, note: str, champion=None, why_nan: str | None = None,
          ci: BootstrapCI | None = None) -> GateRule:
    """A point-estimate rule line; NaN/None on either side fails closed."""
    low, high = (None, None) if ci is None else (jsonable(ci.low), jsonable(ci.high))
    if not _finite(value):
        return GateRule(name, jsonable(value), threshold, False,
                        f"fails closed: the candidate's value is undefined ({why_nan or 'NaN'})", champion, op, low, high)
    passed = _compare(float(value), op, float(threshold))
    verb = "meets" if passed else "misses"
    return GateRule(name, float(value), float(threshold), passed, f"{verb} {op} {threshold:g}; {note}".rstrip("; "),
                    champion, op, low, high)


def _ci_rule(name: str, ci: BootstrapCI, threshold: float, op: str, decide_on: str, what: str, note: str = "",
             champion=None) -> GateRule:
    """A rule decided on the interval's lower bound (or the point estimate) of ``ci``."""
    stat = ci.low if decide_on == "ci_lower" else ci.estimate
    on = f"lower {ci.confidence:.0%} CI bound of {what}" if decide_on == "ci_lower" else what
    interval = (f"{what} = {ci.describe()} ({ci.n_events:,} paired events, {ci.samples} resamples of "
                f"{ci.n_units:,} {ci.unit}s)")
    if not _finite(stat):
        detail = f"fails closed: {on} is undefined (a single class in the paired events or in every resample)"
        passed = False
    else:
        passed = _compare(float(stat), op, threshold)
        verdict = f"meets: {on} = {_fmt(stat, True)} {op} {threshold:+g}" if passed else \
            f"misses: {on} = {_fmt(stat, True)}, not {op} {threshold:+g}"
        detail = f"{verdict}; {interval}"
    if note:
        detail += f"; {note}"
    return GateRule(name, jsonable(ci.estimate), float(threshold), passed, detail, champion, op,
                    jsonable(ci.low), jsonable(ci.high), decide_on)


def _failed(name: str, detail: str, value=None, threshold=None, op=">=", champion=None, label=None) -> GateRule:
    return GateRule(name, jsonable(value), jsonable(threshold), False, f"fails closed: {detail}",
                    jsonable(champion), op, label=label)


def _evidence_rule(n: int, n_pos: int, n_users: int, g) -> GateRule:
    n_neg = n - n_pos
    short = [f"{have:,} {what} < {need:,} ({knob})" for have, need, what, knob in (
        (n, g.min_eval_events, "eval events", "min_eval_events"),
        (n_pos, g.min_eval_positives, "positives", "min_eval_positives"),
        (n_neg, g.min_eval_negatives, "negatives", "min_eval_negatives")) if have < need]
    summary = f"{n:,} eval events ({n_pos:,} positive, {n_neg:,} negative) from {n_users:,} users"
    if short:
        return GateRule("evidence", n, g.min_eval_events, False,
                        "; ".join(short) + f": {summary}; the champion stays", op=">=",
                        label="insufficient evidence")
    return GateRule("evidence", n, g.min_eval_events, True, f"{summary} (≥ {g.min_eval_events:,} events, "
                    f"≥ {g.min_eval_positives:,} positives, ≥ {g.min_eval_negatives:,} negatives)", op=">=")


def _ranking_rule(name: str, value, threshold: float, ev: Evaluation, champion_value, what: str) -> GateRule:
    if ev.ranking_scope != "catalog":
        return _failed(name, f"ranking_scope = {ev.ranking_scope!r}: {what} was computed by ranking each user's "
                       "logged eval events, which only reorders items the user was shown and cannot fail; "
                       f"the gate needs a top-{ev.k} over the whole catalog, as served (ranking_scope = 'catalog')",
                       value, threshold, champion=champion_value)
    key = "ndcg_at_k" if name.startswith("min_ndcg") else "tail_exposure"
    return _rule(name, value, threshold, ">=", f"{what} of a top-{ev.k} over the whole catalog (absolute floor)",
                 champion=jsonable(champion_value), why_nan=ev.reasons.get(key))


def _baselines_rule(paired: PairedEvents | None, draws: BootstrapDraws | None, names: list[str], g,
                    why_unpaired: str | None) -> tuple[GateRule, dict[str, BootstrapCI], str | None]:
    name = "beats_baselines"
    if not names:
        if g.require_baseline:
            return _failed(name, "no baseline evaluation was given for these events (require_baseline = true): "
                           "nothing shows the model adds value over a simple baseline", op=">"), {}, None
        return GateRule(name, None, None, True, "skipped: no baselines given and require_baseline = false",
                        op=">"), {}, None
    if paired is None or draws is None:
        return _failed(name, f"cannot pair the baselines with the candidate: {why_unpaired}", op=">"), {}, None
    cis = {b: draws.delta_ci(CANDIDATE, BASELINE + b, g.confidence, f"AUC(candidate) − AUC({b})")
           for b in names if BASELINE + b not in paired.problems}
    unpaired = {b: paired.problems[BASELINE + b] for b in names if BASELINE + b in paired.problems}
    if unpaired:
        listed = "; ".join(f"{b}: {why}" for b, why in unpaired.items())
        return _failed(name, f"cannot judge against baseline(s) {listed}", op=">"), cis, None
    strongest = max(cis, key=lambda b: -math.inf if not _finite(cis[b].reference_auc) else cis[b].reference_auc)
    ci = cis[strongest]
    others = ", ".join(f"{b} {_fmt(c.reference_auc)}" for b, c in cis.items() if b != strongest)
    note = (f"strongest baseline {strongest} (AUC {_fmt(ci.reference_auc)} vs candidate {_fmt(ci.candidate_auc)})"
            + (f"; other baselines: {others}" if others else ""))
    rule = _ci_rule(name, ci, g.baseline_margin, ">", "ci_lower", f"AUC(candidate) − AUC({strongest})", note)
    if _finite(ci.low) and not rule.passed:
        rule.detail = (f"the model does not add value over the strongest baseline, {strongest}: "
                       f"lower {ci.confidence:.0%} CI bound of AUC(candidate) − AUC({strongest}) = "
                       f"{_fmt(ci.low, True)}, not > {g.baseline_margin:+g} ({ci.describe()}); {note}")
    return rule, cis, strongest


def champion_rule(draws: BootstrapDraws, settings, candidate_key: Hashable = CANDIDATE,
                  champion_key: Hashable = CHAMPION) -> tuple[GateRule, BootstrapCI]:
    """``vs_champion_auc`` from bootstrap draws: the paired interval of AUC(candidate) − AUC(champion)
    judged non-inferior (≥ −max_auc_drop) or superior (≥ min_improvement) on its lower bound
    (``decide_on = "ci_lower"``) or on the point estimate."""
    g = _gate_settings(settings)
    ci = draws.delta_ci(candidate_key, champion_key, g.confidence, "AUC(candidate) − AUC(champion)")
    if g.rule == "non_inferior":
        thr, how = -g.max_auc_drop, f"non-inferior within max_auc_drop {g.max_auc_drop:g}"
    else:
        thr, how = g.min_improvement, f"superior by min_improvement {g.min_improvement:g}"
    rule = _ci_rule("vs_champion_auc", ci, thr, ">=", g.decide_on, "AUC(candidate) − AUC(champion)", how,
                    champion=jsonable(ci.reference_auc))
    return rule, ci


def _champion_rule(paired: PairedEvents | None, draws: BootstrapDraws | None, champion: Evaluation, g,
                   why_unpaired: str | None) -> tuple[GateRule, BootstrapCI | None]:
    if paired is None or draws is None or CHAMPION in paired.problems:
        why = why_unpaired if paired is None else paired.problems.get(CHAMPION, why_unpaired)
        return _failed("vs_champion_auc", f"cannot pair with the champion: {why}", champion=champion.auc), None
    return champion_rule(draws, g)


def _gap_draws(draws: BootstrapDraws, model: str, col: str, gated: list[str]) -> tuple[float, np.ndarray]:
    pts = np.array([draws.point[(model, col, grp)] for grp in gated])
    mat = np.vstack([draws.draws[(model, col, grp)] for grp in gated])
    with np.errstate(invalid="ignore"):
        gaps = mat.max(axis=0) - mat.min(axis=0)  # NaN when any group is undefined in that resample
    return float(pts.max() - pts.min()), gaps


def _group_rules(col: str, candidate: Evaluation, champion: Evaluation | None, paired: PairedEvents | None,
                 draws: BootstrapDraws | None, g, why_unpaired: str | None):
    """(rules, group stats, gap CI, gap-vs-champion CI) for one group column."""
    names = (f"group_auc_gap:{col}", f"gap_vs_champion:{col}")
    with_champ = champion is not None
    measured = candidate.reasons.get(f"group:{col}")
    if measured is None and paired is not None and col not in paired.groups:
        measured = (f"the candidate's scored events carry no {group_column(col)!r} values "
                    "(score with evaluate_scores and this group column)")
    if paired is None or draws is None:
        measured = measured or f"no scored events to resample: {why_unpaired}"
    if measured:
        return [_failed(n, measured, op="<=") for n in names[: 1 + with_champ]], [], None, None

    values = paired.groups[col]
    y = paired.labels
    champ_ok = with_champ and CHAMPION not in paired.problems
    stats: list[GroupStat] = []
    gated: list[str] = []
    for grp in sorted(pd.unique(values)):
        mask = values == grp
        n, n_pos = int(mask.sum()), int(y[mask].sum())
        ci = draws.auc_ci((CANDIDATE, col, grp), g.confidence, f"AUC in {col} = {grp}")
        note = ""
        if grp == MISSING_GROUP and not g.include_missing_group:
            note = "users without this attribute (include_missing_group = false)"
        elif n < g.min_group_events:
            note = f"{n} < min_group_events {g.min_group_events}"
        champ_auc = draws.point.get((CHAMPION, col, grp)) if champ_ok else None
        stats.append(GroupStat(str(grp), n, n_pos, ci.estimate, ci.low, ci.high, not note, note, champ_auc))
        if not note:
            gated.append(grp)
    small = [f"{s.group} ({s.note})" for s in stats if not s.gated]
    reported = f"; reported, not gated: {', '.join(small)}" if small else ""

    if len(gated) < 2:
        detail = (f"not gated: fewer than two groups with ≥ {g.min_group_events} events "
                  f"({len(gated)}){reported}")
        rules = [GateRule(n, None, None, True, detail, op="<=") for n in names[: 1 + with_champ]]
        return rules, stats, None, None
    undefined = [s.group for s in stats if s.gated and not _finite(s.auc)]
    if undefined:
        detail = f"undefined AUC (a single class) in gated group(s) {', '.join(undefined)}"
        return [_failed(n, detail, op="<=") for n in names[: 1 + with_champ]], stats, None, None

    gap, gap_draws = _gap_draws(draws, CANDIDATE, col, gated)
    gap_ci = draws.interval(gap, gap_draws, g.confidence, f"max − min AUC by {col}")
    rules = [_ci_rule(names[0], gap_ci, g.max_group_auc_gap, "<=", "ci_lower", f"the AUC gap by {col}",
                      f"groups {', '.join(gated)}{reported}")]
    inc_ci = None
    if with_champ:
        if not champ_ok:
            rules.append(_failed(names[1], f"cannot pair with the champion: {paired.problems[CHAMPION]}", op="<="))
        else:
            cgap, cgap_draws = _gap_draws(draws, CHAMPION, col, gated)
            inc_ci = draws.interval(gap - cgap, gap_draws - cgap_draws, g.confidence,
                                    f"gap by {col}: candidate − champion", candidate_auc=None, reference_auc=None)
            rules.append(_ci_rule(names[1], inc_ci, g.max_gap_increase, "<=", "ci_lower",
                                  f"(candidate gap − champion gap) by {col}",
                                  f"champion gap {_fmt(cgap)}", champion=jsonable(cgap)))
    return rules, stats, gap_ci, inc_ci


# --------------------------------------------------------------------------- the decision
def decide_promotion(
    candidate: Evaluation,
    champion: Evaluation | None,
    settings,
    baselines: Mapping[str, Evaluation] | None = None,
    *,
    candidate_version: str | None = None,
    champion_version: str | None = None,
) -> GateDecision:
    """Judge ``candidate`` against the floors in ``settings.gates``, the baselines and ``champion``.

    ``settings``: a :class:`recloop.settings.Settings` or its ``GateSettings``.
    ``champion``: the champion's evaluation on the same events (``None``: no champion yet).
    ``baselines``: name → evaluation of each baseline on the same events (e.g.
    ``"statistics-lr"``, ``"fresh-popularity"``, ``"most-popular"``, ``"popularity"``, ``"mf"``).
    ``champion_version`` defaults to ``champion.model_version``. Every evaluation must carry
    ``scored`` (``event_id``, ``user_id``, ``label``, ``score``, ``group:<col>``).
    """
    g = _gate_settings(settings)
    baselines = dict(baselines or {})
    others: dict[str, Evaluation | None] = {}
    if champion is not None:
        others[CHAMPION] = champion
    others.update({BASELINE + name: ev for name, ev in baselines.items()})

    paired: PairedEvents | None = None
    draws: BootstrapDraws | None = None
    why_unpaired: str | None = None
    try:
        paired = pair_events(candidate, others, g.min_paired_share, g.group_columns)
    except ValueError as exc:
        why_unpaired = str(exc)
    if paired is not None:
        draws = _bootstrap(paired, g)

    evidence = _evidence(candidate, paired)
    rules = [_evidence_rule(evidence["n_events"], evidence["n_positive"], evidence["n_users"], g)]
    auc_ci = None if draws is None else draws.auc_ci(CANDIDATE, g.confidence, "AUC(candidate)")
    rules.append(_rule("min_auc", candidate.auc, g.min_auc, ">=", f"global AUC on {candidate.n_events:,} events "
                       "(point estimate; interval shown)", champion=None if champion is None else jsonable(champion.auc),
                       why_nan=candidate.reasons.get("auc"), ci=auc_ci))
    rules.append(_ranking_rule(f"min_ndcg_at_{candidate.k}", candidate.ndcg_at_k, g.min_ndcg, candidate,
                               None if champion is None else champion.ndcg_at_k, f"NDCG@{candidate.k}"))
    rule, baseline_cis, strongest = _baselines_rule(paired, draws, list(baselines), g, why_unpaired)
    rules.append(rule)
    ci = None
    if champion is not None:
        rule, ci = _champion_rule(paired, draws, champion, g, why_unpaired)
        rules.append(rule)

    group_rules, group_stats, gap_cis, inc_cis = _all_group_rules(candidate, champion, paired, draws, g,
                                                                   why_unpaired)
    rules += group_rules

    rules.append(_ranking_rule("tail_exposure", candidate.tail_exposure, g.min_tail_exposure, candidate,
                               None if champion is None else champion.tail_exposure,
                               f"long-tail share of top-{candidate.k} slots"))

    thresholds = g.model_dump() if hasattr(g, "model_dump") else dict(vars(g))
    return GateDecision(
        promote=all(r.passed for r in rules), rules=rules, bootstrap_ci=ci, baseline_cis=baseline_cis,
        strongest_baseline=strongest, auc_ci=auc_ci, group_stats=group_stats, group_gap_cis=gap_cis,
        gap_vs_champion_cis=inc_cis, evidence=evidence, has_champion=champion is not None,
        champion_version=champion_version or (getattr(champion, "model_version", None) if champion else None),
        candidate_version=candidate_version or getattr(candidate, "model_version", None),
        rule_mode=g.rule, thresholds=thresholds, candidate=candidate.to_dict(),
        champion=None if champion is None else champion.to_dict(),
    )


def _evidence(candidate: Evaluation, paired: PairedEvents | None) -> dict:
    """How much the verdict rests on: counted on the candidate's own scored events when it has them."""
    if candidate.scored is not None and {"label"} <= set(candidate.scored.columns):
        lab = candidate.scored["label"].astype(int)
        n, n_pos = len(lab), int(lab.sum())
        n_users = int(candidate.scored["user_id"].nunique()) if "user_id" in candidate.scored else candidate.n_users
    else:
        n, n_pos, n_users = int(candidate.n_events), int(candidate.n_positive), int(candidate.n_users)
    return {"n_events": n, "n_positive": n_pos, "n_negative": n - n_pos, "n_users": n_users,
            "n_paired": 0 if paired is None else int(paired.labels.size)}


def _all_group_rules(candidate: Evaluation, champion: Evaluation | None, paired: PairedEvents | None,
                     draws: BootstrapDraws | None, g, why_unpaired: str | None):
    """The fairness rules of every ``g.group_columns`` column (one skipped rule when there is none):
    (rules, per-column group statistics, gap CIs, gap-vs-champion CIs)."""
    rules: list[GateRule] = []
    group_stats, gap_cis, inc_cis = {}, {}, {}
    for col in g.group_columns:
        col_rules, stats, gap_ci, inc_ci = _group_rules(col, candidate, champion, paired, draws, g, why_unpaired)
        rules += col_rules
        if stats:
            group_stats[col] = stats
        if gap_ci is not None:
            gap_cis[col] = gap_ci
        if inc_ci is not None:
            inc_cis[col] = inc_ci
    if not g.group_columns:
        rules.append(GateRule("group_auc_gap", None, None, True, "skipped: gates.group_columns is empty", op="<="))
    return rules, group_stats, gap_cis, inc_cis


def _bootstrap(paired: PairedEvents, g) -> BootstrapDraws:
    """One set of resamples for every model, and for the candidate and champion in every group."""
    targets: dict[Hashable, tuple[np.ndarray, np.ndarray | None]] = {k: (s, None) for k, s in paired.scores.items()}
    for col, values in paired.groups.items():
        for grp in pd.unique(values):
            mask = values == grp
            for model in (CANDIDATE, CHAMPION):
                if model in paired.scores:
                    targets[(model, col, grp)] = (paired.scores[model], mask)
    return bootstrap_aucs(paired.labels, targets, units=paired.users if g.bootstrap_unit == "user" else None,
                          samples=g.bootstrap_samples, seed=g.bootstrap_seed)
