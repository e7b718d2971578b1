"""``detect_drift``: has the world changed since the champion was trained, and should we retrain?

Steps: windows (windows.py) -> sample -> feature frame (features.py) -> champion scores
(optional ``scorer``) -> one Evidently 0.7 report with tests (data drift preset on the
features, value drift on label and score) -> live AUC on fresh labels -> triggers ->
storm control (storm.py) -> ``DriftOutcome`` (+ HTML report and JSON under reports/drift/).

Triggers (``reason`` is the first that fired, in this order):

* ``no_champion``        nothing in production yet: initial training
* ``performance_decay``  live AUC below the champion's offline AUC by more than ``max_auc_drop``
* ``data_drift``         share of drifted feature columns >= ``drift_share``
* ``target_drift``       the label distribution (like-rate) moved (``target_threshold``)
* ``prediction_drift``   the champion's score distribution moved (``prediction_threshold``)

Column drift is an *effect size* (normed Wasserstein, Jensen-Shannon distance), not a
p-value: with windows of tens of thousands of events every p-value test fires on
harmless wobbles, while effect sizes stay put on a stationary stream.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from monitoring import storm
from monitoring.features import (
    CATEGORICAL,
    FEATURES,
    NUMERICAL,
    PREDICTION,
    TARGET,
    build_feature_frame,
    build_profile_from_window,
)
from monitoring.windows import ChampionInfo, count_window, load_window, resolve_windows, to_utc

Scorer = Callable[[pd.DataFrame], np.ndarray]
TRIGGER_ORDER = ("no_champion", "performance_decay", "data_drift", "target_drift", "prediction_drift")
ABS_WASSERSTEIN = "recloop_abs_wasserstein"


def _register_stattests() -> None:
    """An un-normed Wasserstein for bounded shares (text novelty): "how much mass moved", in the
    column's own units. The normed one divides by the reference std, which explodes when the
    reference is (almost) constant."""
    from evidently.legacy.calculations.stattests.registry import (
        StatTest,
        _registered_stat_tests,
        register_stattest,
    )
    from evidently.legacy.core import ColumnType
    from scipy import stats

    if ABS_WASSERSTEIN in _registered_stat_tests:
        return

    def _abs_wasserstein(reference: pd.Series, current: pd.Series, feature_type, threshold: float):
        value = float(stats.wasserstein_distance(reference, current))
        return value, value >= threshold

    register_stattest(StatTest(name=ABS_WASSERSTEIN, display_name="Wasserstein distance (absolute, column units)",
                               allowed_feature_types=[ColumnType.Numerical], default_threshold=0.02),
                      default_impl=_abs_wasserstein)


@dataclass
class ColumnDrift:
    column: str
    role: str  # feature | target | prediction
    kind: str  # categorical | numerical
    method: str
    threshold: float
    score: float
    drifted: bool
    reference: float | None = None  # a summary to read: mean (numerical) or like-rate (label)
    current: float | None = None


@dataclass
class DriftOutcome:
    status: str  # checked | no_reference | too_little_data | empty_store
    should_retrain: bool
    reason: str | None
    triggers: list[str] = field(default_factory=list)
    suppressed_by: list[str] = field(default_factory=list)
    champion_version: str | None = None
    windows: dict = field(default_factory=dict)
    n_reference: int = 0
    n_current: int = 0
    n_reference_sampled: int = 0
    n_current_sampled: int = 0
    sampled: bool = False
    drift_share: float | None = None
    drift_share_threshold: float | None = None
    drifted_columns: list[str] = field(default_factory=list)
    columns: list[dict] = field(default_factory=list)
    skipped_columns: list[str] = field(default_factory=list)
    target_drift: bool | None = None
    like_rate_reference: float | None = None
    like_rate_current: float | None = None
    prediction_drift: bool | None = None
    live_auc: float | None = None
    live_auc_se: float | None = None
    live_auc_n: int = 0
    offline_auc: float | None = None
    offline_auc_source: str | None = None  # champion | reference_holdout
    auc_drop: float | None = None
    storm: dict = field(default_factory=dict)
    report_path: str | None = None
    json_path: str | None = None
    checked_at: str = ""  # wall clock (names the report files)
    as_of: str | None = None  # the ``now`` the check was asked for (data time), if any
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))

    def table_rows(self) -> list[list]:
        rows = []
        for c in self.columns:
            rows.append([c["column"], c["role"], c["method"], f"{c['score']:.4f}", f"{c['threshold']:.3g}",
                         "DRIFT" if c["drifted"] else "ok"])
        return rows

    def to_markdown(self) -> str:
        verdict = "RETRAIN" if self.should_retrain else "no retrain"
        lines = [f"# Drift check: {verdict}", "",
                 f"- status: `{self.status}`, reason: `{self.reason}`, triggers: {', '.join(self.triggers) or 'none'}",
                 f"- suppressed by: {', '.join(self.suppressed_by) or 'nothing'}",
                 f"- champion: `{self.champion_version}`; checked {self.checked_at} (as of {self.as_of or 'latest'})",
                 (f"- reference {self.windows.get('reference_start')} .. {self.windows.get('reference_end')} "
                 f"({self.n_reference} events, {self.n_reference_sampled} sampled)"),
                 (f"- current {self.windows.get('current_start')} .. {self.windows.get('current_end')} "
                 f"({self.n_current} events, {self.n_current_sampled} sampled)")]
        if self.drift_share is not None:
            lines.append(f"- drifted feature share: {self.drift_share:.2f} (threshold {self.drift_share_threshold})")
        if self.live_auc is not None:
            lines.append(f"- live AUC {self.live_auc:.4f} vs offline {self.offline_auc} (drop {self.auc_drop})")
        if self.report_path:
            lines.append(f"- Evidently report: `{self.report_path}`")
        if self.columns:
            lines += ["", "| column | role | method | score | threshold | verdict |", "|---|---|---|---|---|---|"]
            lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in self.table_rows()]
        for n in self.notes:
            lines.append(f"\n> {n}")
        return "\n".join(lines)


# ---- the check ---------------------------------------------------------------------------------

def detect_drift(settings, store, champion: ChampionInfo | None = None, scorer: Scorer | None = None,
                 now=None, record: bool = True) -> DriftOutcome:
    """Compare the current window with the champion's reference window and decide on a retrain.

    ``now`` (UTC) ends the current window and is the clock of storm control; default: the
    newest stored event for the window, the wall clock for storm control. ``record=True``
    (the flow) writes the decision into storm state (a retrain becomes *pending*) and logs
    suppressions; ``record=False`` (the CLI) only looks.
    """
    t0 = time.perf_counter()
    cfg = settings.monitor
    clock = to_utc(now)
    out = DriftOutcome(status="checked", should_retrain=False, reason=None,
                       checked_at=pd.Timestamp.now(tz="UTC").isoformat(),
                       as_of=None if clock is None else clock.isoformat(),
                       drift_share_threshold=cfg.drift_share,
                       champion_version=None if champion is None else champion.version)
    n_total = store.count()
    windows = resolve_windows(settings, store, champion, now=clock)
    out.windows = windows.to_dict()

    if champion is None:
        out.status = "no_reference" if n_total else "empty_store"
        out.notes.append("no champion: no reference window to compare with; recommending initial training")
        out.triggers = ["no_champion"]
        return _finish(settings, store, out, n_total, n_new_fallback=n_total, clock=clock, record=record, t0=t0)

    # counts first (one column), then one window at a time as Arrow columns with pushdown: only the
    # samples (and the profile's three columns) become pandas rows, and only one window is held at once
    n_ref = count_window(store, windows.reference_start, windows.reference_end)
    n_cur = count_window(store, windows.current_start, windows.current_end)
    out.n_reference, out.n_current = n_ref, n_cur
    if n_ref < cfg.min_window_events or n_cur < cfg.min_window_events:
        out.status = "too_little_data"
        out.notes.append(f"reference has {n_ref} and current {n_cur} events; need {cfg.min_window_events} "
                         "in each for a drift verdict (monitor.min_window_events)")
        return _finish(settings, store, out, n_total, n_new_fallback=n_cur, clock=clock, record=record, t0=t0)

    catalog = store.catalog()
    ref_s, cur_s, profile = _window_samples(store, catalog, windows, cfg, out)
    ref_f = build_feature_frame(ref_s, catalog, profile, reference=True)
    cur_f = build_feature_frame(cur_s, catalog, profile)

    if scorer is not None:
        _add_scores(out, settings, champion, scorer, ref_s, cur_s, ref_f, cur_f)
    elif champion.offline_auc is not None:
        out.notes.append("no scorer: prediction drift and live AUC not checked")

    html = Path(settings.reports_dir) / "drift" / f"drift-{_stamp(out.checked_at)}.html"
    columns, share = run_evidently(settings, ref_f, cur_f, html, out)
    out.report_path = str(html)
    _record_columns(out, columns, share)
    out.triggers = _triggers(out, cfg)
    return _finish(settings, store, out, n_total, n_new_fallback=out.n_current, clock=clock, record=record, t0=t0)


def _window_samples(store, catalog: pd.DataFrame, windows, cfg, out: DriftOutcome):
    """(reference sample, current sample, reference profile): one window at a time as Arrow columns
    with pushdown, so only the samples (and the profile's columns) become pandas rows. Records the
    like-rates of the whole windows and the sample sizes in ``out``."""
    ref = load_window(store, windows.reference_start, windows.reference_end)
    profile = build_profile_from_window(ref, catalog)
    out.like_rate_reference = ref.like_rate()
    ref_s = ref.sample(cfg.sample_size, cfg.seed)
    del ref
    cur = load_window(store, windows.current_start, windows.current_end)
    out.like_rate_current = cur.like_rate()
    cur_s = cur.sample(cfg.sample_size, cfg.seed + 1)
    del cur
    out.n_reference_sampled, out.n_current_sampled = len(ref_s), len(cur_s)
    out.sampled = len(ref_s) < out.n_reference or len(cur_s) < out.n_current
    return ref_s, cur_s, profile


def _record_columns(out: DriftOutcome, columns: list, share: float | None) -> None:
    """The report's per-column verdicts into ``out``: drift share (Evidently's, else the drifted share of
    the feature columns), drifted columns, target drift (with the windows' like-rates), prediction drift."""
    features = [c for c in columns if c.role == "feature"]
    if share is None and features:
        share = sum(c.drifted for c in features) / len(features)
    out.drift_share = share
    out.drifted_columns = [c.column for c in columns if c.drifted]
    target = next((c for c in columns if c.role == "target"), None)
    pred = next((c for c in columns if c.role == "prediction"), None)
    if target is not None:
        target.reference, target.current = out.like_rate_reference, out.like_rate_current
    out.columns = [asdict(c) for c in columns]
    out.target_drift = None if target is None else target.drifted
    out.prediction_drift = None if pred is None else pred.drifted


def _triggers(out: DriftOutcome, cfg) -> list[str]:
    """Which of the monitor's retrain triggers the checked windows fire (``settings.monitor``)."""
    triggers = []
    if out.auc_drop is not None and out.auc_drop > cfg.max_auc_drop:
        triggers.append("performance_decay")
    has_features = any(c["role"] == "feature" for c in out.columns)
    if has_features and out.drift_share is not None and out.drift_share >= cfg.drift_share:
        triggers.append("data_drift")
    if out.target_drift and cfg.retrain_on_target_drift:
        triggers.append("target_drift")
    if out.prediction_drift and cfg.retrain_on_prediction_drift:
        triggers.append("prediction_drift")
    return triggers


def _stamp(iso: str) -> str:
    return pd.Timestamp(iso).strftime("%Y%m%dT%H%M%S%fZ")


def _finish(settings, store, out: DriftOutcome, n_total: int, n_new_fallback: int, clock, record: bool,
            t0: float) -> DriftOutcome:
    out.reason = next((t for t in TRIGGER_ORDER if t in out.triggers), None)
    if out.triggers:
        state = storm.load_state(settings)
        check = storm.check_storm(settings, state, n_total, n_new_fallback, now=clock)
        out.suppressed_by = check.suppressed_by
        out.storm = check.details
        out.notes += check.notes
        out.should_retrain = not check.suppressed_by
        if record:
            if out.should_retrain:
                storm.mark_retrain_requested(settings, out.reason, now=clock)
            else:
                storm.record_suppression(settings, {"reason": out.reason, "triggers": out.triggers,
                                                    "suppressed_by": out.suppressed_by, "storm": out.storm,
                                                    "windows": out.windows, "drift_share": out.drift_share,
                                                    "report_path": out.report_path})
    out.seconds = round(time.perf_counter() - t0, 3)
    _save_json(settings, out)
    return out


def _save_json(settings, out: DriftOutcome) -> None:
    from recloop.store import atomic_write_json

    report_dir = Path(settings.reports_dir) / "drift"
    path = report_dir / f"drift-{_stamp(out.checked_at)}.json"
    out.json_path = str(path)
    doc = out.to_dict()
    atomic_write_json(doc, path)
    atomic_write_json(doc, report_dir / "latest.json")


# ---- champion scores: prediction drift and live AUC ------------------------------------------------

def _score(scorer: Scorer, rows: pd.DataFrame) -> np.ndarray:
    pairs = rows[["user_id", "item_id", "query", "timestamp"]].reset_index(drop=True)
    scores = np.asarray(scorer(pairs), dtype=float).reshape(-1)
    if len(scores) != len(pairs):
        raise ValueError(f"scorer returned {len(scores)} scores for {len(pairs)} rows")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scorer returned non-finite scores")
    return scores


def auc_with_se(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """ROC AUC and its Hanley-McNeil standard error."""
    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(labels, scores))
    n1, n0 = int(labels.sum()), int(len(labels) - labels.sum())
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n0 - 1) * (q2 - auc * auc)) / (n1 * n0)
    return auc, float(np.sqrt(max(var, 0.0)))


def _add_scores(out, settings, champion: ChampionInfo, scorer, ref_s, cur_s, ref_f, cur_f) -> None:
    cfg = settings.monitor
    ref_pool = np.arange(len(ref_s))
    if champion.holdout_start is not None:
        ref_pool = np.flatnonzero((ref_s["timestamp"] >= champion.holdout_start).to_numpy())
    else:
        out.notes.append("champion has no holdout_start: reference scores are in-sample (prediction drift may be "
                         "overstated)")
    rng = np.random.default_rng(cfg.seed + 2)
    ref_idx = np.sort(rng.choice(ref_pool, size=min(len(ref_pool), cfg.score_sample_size), replace=False))
    cur_idx = np.sort(rng.choice(len(cur_s), size=min(len(cur_s), cfg.score_sample_size), replace=False))
    ref_f[PREDICTION] = np.nan
    cur_f[PREDICTION] = np.nan
    if len(ref_idx):
        ref_f.loc[ref_idx, PREDICTION] = _score(scorer, ref_s.iloc[ref_idx])
    cur_scores = _score(scorer, cur_s.iloc[cur_idx])
    cur_f.loc[cur_idx, PREDICTION] = cur_scores

    out.offline_auc, out.offline_auc_source = champion.offline_auc, "champion"
    if out.offline_auc is None and champion.holdout_start is not None and len(ref_idx):
        labels = ref_s["label"].to_numpy()[ref_idx].astype(int)
        if min(labels.sum(), len(labels) - labels.sum()) >= cfg.min_auc_labels:
            out.offline_auc = auc_with_se(labels, ref_f.loc[ref_idx, PREDICTION].to_numpy())[0]
            out.offline_auc_source = "reference_holdout"
    labels = cur_s["label"].to_numpy()[cur_idx].astype(int)
    n_pos = int(labels.sum())
    out.live_auc_n = len(labels)
    if min(n_pos, len(labels) - n_pos) < cfg.min_auc_labels:
        out.notes.append(f"live AUC not computed: {n_pos} positives / {len(labels) - n_pos} negatives "
                         f"(need {cfg.min_auc_labels} of each)")
        return
    out.live_auc, out.live_auc_se = auc_with_se(labels, cur_scores)
    if out.offline_auc is None:
        out.offline_auc_source = None
        out.notes.append("no offline AUC for the champion: performance decay not checked")
    else:
        out.auc_drop = float(out.offline_auc - out.live_auc)


# ---- Evidently ---------------------------------------------------------------------------------------

def _column_spec(settings, ref_f: pd.DataFrame, cur_f: pd.DataFrame, out: DriftOutcome):
    """(features to test, per-column method, per-column threshold); skips columns empty in a window."""
    cfg = settings.monitor
    method, threshold = {}, {}
    for c in CATEGORICAL:
        method[c], threshold[c] = cfg.cat_method, cfg.cat_threshold
    for c in NUMERICAL:
        method[c], threshold[c] = cfg.num_method, cfg.num_threshold
    method["text_novelty"], threshold["text_novelty"] = ABS_WASSERSTEIN, cfg.novelty_threshold
    method[TARGET], threshold[TARGET] = "jensenshannon", cfg.target_threshold
    method[PREDICTION], threshold[PREDICTION] = cfg.num_method, cfg.prediction_threshold
    usable = []
    for c in FEATURES + [TARGET, PREDICTION]:
        if c not in ref_f.columns or c not in cur_f.columns:
            continue
        if ref_f[c].notna().sum() == 0 or cur_f[c].notna().sum() == 0:
            out.skipped_columns.append(c)
            continue
        usable.append(c)
    return usable, method, threshold


def run_evidently(settings, ref_f: pd.DataFrame, cur_f: pd.DataFrame, html_path: Path, out: DriftOutcome):
    """One Evidently report (tests included) over features, label and score; returns per-column
    results as Evidently judged them and the drifted share of feature columns."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset

    _register_stattests()
    usable, method, threshold = _column_spec(settings, ref_f, cur_f, out)
    feats = [c for c in FEATURES if c in usable]
    extra = [c for c in (TARGET, PREDICTION) if c in usable]
    definition = DataDefinition(numerical_columns=[c for c in usable if c in NUMERICAL or c == PREDICTION],
                                categorical_columns=[c for c in usable if c in CATEGORICAL or c == TARGET])
    items = []
    if feats:
        items.append(DataDriftPreset(columns=feats, drift_share=settings.monitor.drift_share,
                                     per_column_method={c: method[c] for c in feats},
                                     per_column_threshold={c: threshold[c] for c in feats}))
    items += [ValueDrift(column=c, method=method[c], threshold=threshold[c]) for c in extra]
    if not items:
        out.notes.append("no column has values in both windows: nothing to compare")
        return [], None
    report = Report(items, include_tests=True)
    with warnings.catch_warnings():  # constant columns make Evidently's correlation widgets divide by zero
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = report.run(current_data=Dataset.from_pandas(cur_f[usable], data_definition=definition),
                              reference_data=Dataset.from_pandas(ref_f[usable], data_definition=definition))
        html_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = html_path.with_suffix(".html.tmp")
        snapshot.save_html(str(tmp))
    tmp.replace(html_path)
    return _parse_snapshot(snapshot.dict(), usable, method, threshold, ref_f, cur_f)


def _parse_snapshot(doc: dict, usable, method, threshold, ref_f, cur_f):
    status = {}
    for t in doc.get("tests", []):
        mid = (t.get("metric_config") or {}).get("metric_id")
        if mid is not None:
            status[mid] = t.get("status")
    results, share = {}, None
    for m in doc.get("metrics", []):
        conf = m.get("config", {})
        kind = conf.get("type", "")
        if kind.endswith("DriftedColumnsCount"):
            share = float(m["value"]["share"])
        elif kind.endswith("ValueDrift"):
            col = conf["column"]
            score = float(m["value"])
            thr = float(conf.get("threshold") if conf.get("threshold") is not None else threshold[col])
            test = status.get(m["id"])
            drifted = (test == "FAIL") if test in ("FAIL", "SUCCESS") else score >= thr
            results[col] = (conf.get("method") or method[col], thr, score, drifted)
    missing = [c for c in usable if c not in results]
    if missing:
        raise RuntimeError(f"Evidently returned no drift result for {missing}")
    columns = []
    for c in usable:
        m, thr, score, drifted = results[c]
        role = "target" if c == TARGET else "prediction" if c == PREDICTION else "feature"
        kind = "categorical" if (c in CATEGORICAL or c == TARGET) else "numerical"
        ref_mean = cur_mean = None
        if kind == "numerical":
            ref_mean, cur_mean = float(ref_f[c].mean()), float(cur_f[c].mean())
        columns.append(ColumnDrift(c, role, kind, m, thr, score, bool(drifted), ref_mean, cur_mean))
    return columns, share

