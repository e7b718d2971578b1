"""Validate a feedback batch with the GX suite and apply the quarantine policy.

Policy (knobs in ``settings.checks``):

* a **critical** expectation fails (schema, types, parseable zoned timestamps, empty
  batch) → ``decision = "quarantine"``: the whole batch is quarantined;
* a **batch** expectation fails (like-rate outside ``like_rate_bounds``) → the whole
  batch is quarantined: a statistical anomaly cannot be pinned on single rows;
* **row-level** expectations fail (null ids, unknown items, unknown event types,
  labels not in {0,1} or contradicting the event type, future or too-old
  timestamps, over-long queries, repeated event ids, ids already stored) → if the share
  of failing rows is at most ``max_invalid_row_share`` the batch is **split** (valid
  rows ingested, failing rows quarantined with a per-row reason), otherwise the whole
  batch is quarantined;
* a user's events **beyond** ``max_events_per_user`` in the batch (in time order) are
  always split off with the reason ``user_over_event_cap`` and do not count toward
  ``max_invalid_row_share`` (nor toward the like-rate): one user's burst never takes
  other users' rows with it.

Time: future timestamps are judged against the wall clock; retention (``timestamp_too_old``)
against the *data's own clock* (``settings.checks.retention_clock = "data"``, the default):
the newest event already stored or in the batch, never later than the wall clock. A
historical backfill (MovieLens 1997-98) is therefore not "too old" for being historical,
while a stale event far older than the rest of the data still is; ``"wall"`` restores
judging against today.

The failing rows are exactly GX's ``unexpected_index_list`` of each row-level
expectation: the per-row reasons are GX's verdict, not a second implementation.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data_checks.suites import BATCH, CATALOG_SUITE, CRITICAL, FEEDBACK_SUITE, ROW, SPLIT_ONLY_RULES, rule_of
from recloop.jsonutil import jsonable
from recloop.schema import FEEDBACK_COLUMNS, FEEDBACK_OPTIONAL, LABEL_BY_EVENT

ZONE_PATTERN = r"(?:Z|[+-]\d{2}:?\d{2})\s*$"


@dataclass
class ExpectationOutcome:
    rule: str
    expectation: str
    column: str | None
    severity: str
    success: bool
    unexpected_count: int | None = None
    observed: object = None
    error: str | None = None
    guards: str = ""


@dataclass
class ValidationOutcome:
    """Result of validating one batch; JSON-serialisable through :meth:`to_dict`."""

    success: bool  # True when the batch may proceed (decision pass or split)
    decision: str  # pass | split | quarantine
    n_rows: int
    n_good: int
    n_bad: int
    bad_share: float
    reasons: list[str] = field(default_factory=list)
    reason_counts: dict[str, int] = field(default_factory=dict)  # rule -> failing rows (or 1 for batch rules)
    expectations: list[ExpectationOutcome] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)
    data_docs: str | None = None
    seconds: float = 0.0
    # per-row verdict, aligned with the validated frame (not serialised): "" for good rows
    row_reasons: pd.Series | None = field(default=None, repr=False, compare=False)

    @property
    def good_mask(self) -> np.ndarray:
        if self.decision == "quarantine":
            return np.zeros(self.n_rows, dtype=bool)
        if self.row_reasons is None:
            return np.ones(self.n_rows, dtype=bool)
        return (self.row_reasons == "").to_numpy()

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("row_reasons")
        return jsonable(d)

    @classmethod
    def from_dict(cls, d: dict) -> ValidationOutcome:
        d = dict(d)
        d["expectations"] = [ExpectationOutcome(**e) for e in d.get("expectations", [])]
        return cls(**d)


# ---- the validation frame --------------------------------------------------------------------------
def _parse_timestamps(raw: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(parsed UTC timestamps, had-a-zone flags) for a raw timestamp column of any dtype."""
    if isinstance(raw.dtype, pd.DatetimeTZDtype):
        return raw.dt.tz_convert("UTC"), pd.Series(True, index=raw.index).where(raw.notna())
    if pd.api.types.is_datetime64_dtype(raw.dtype):  # naive datetimes: no zone
        return raw.dt.tz_localize("UTC"), pd.Series(False, index=raw.index).where(raw.notna())
    if raw.dtype == object or pd.api.types.is_string_dtype(raw.dtype):
        as_str = raw.astype("string")
        parsed = pd.to_datetime(as_str, utc=True, errors="coerce", format="ISO8601")
        has_zone = as_str.str.contains(ZONE_PATTERN, regex=True)
        return parsed, has_zone.astype("object").where(raw.notna())
    # numbers or anything else: not a timestamp (the type expectation reports it)
    nat = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns, UTC]")
    return nat, pd.Series(False, index=raw.index)


def _lookup(values: pd.Series, fn) -> np.ndarray:
    """``fn`` applied once per distinct value, broadcast back (NaN for nulls)."""
    codes, uniques = pd.factorize(values)
    table = np.array([fn(u) for u in uniques] + [np.nan], dtype="float64")
    return table[np.where(codes >= 0, codes, len(uniques))]


def prepare_feedback_frame(df: pd.DataFrame, stored_ids, catalog_ids) -> pd.DataFrame:
    """The frame GX validates: the raw columns, absent optional ones as nulls, plus helper columns."""
    v = df.reset_index(drop=True).copy()
    for col in FEEDBACK_OPTIONAL:  # optional columns may be left out by producers
        if col not in v.columns:
            v[col] = pd.Series(pd.NA, index=v.index, dtype="string")
    n = len(v)

    def col(name):
        return v[name] if name in v.columns else pd.Series(pd.NA, index=v.index, dtype="object")

    ts, has_zone = _parse_timestamps(col("timestamp"))
    v["_timestamp_utc"] = ts
    v["_timestamp_has_zone"] = has_zone
    label = col("label")
    v["_label_num"] = pd.to_numeric(label, errors="coerce").astype("float64") if n else label.astype("float64")
    v["_label_expected"] = _lookup(col("event_type"), lambda u: LABEL_BY_EVENT.get(u, np.nan))
    event_id = col("event_id")
    v["_event_id_repeat"] = event_id.duplicated(keep="first") & event_id.notna()
    ids = stored_ids if isinstance(stored_ids, (set, frozenset)) else set(stored_ids)
    v["_event_id_in_store"] = event_id.isin(ids) if ids else pd.Series(False, index=v.index)
    item = col("item_id")
    v["_item_in_catalog"] = item.isin(catalog_ids).astype("object").where(item.notna())
    v["_user_event_rank"] = user_event_rank(col("user_id"), ts)
    v["_label_within_cap"] = v["_label_num"]  # validate_frame blanks the rows beyond the cap
    return v.copy()  # one consolidated block per dtype: GX slices columns many times, fragmented frames copy


def user_event_rank(user: pd.Series, ts: pd.Series) -> np.ndarray:
    """Each row's place (1, 2, ...) among its user's rows, in time order (ties: row order); NaN without a user.

    Vectorised (a stable lexsort on factorised users, value_counts on strings is ~10x slower).
    """
    n = len(user)
    codes, _ = pd.factorize(user)
    if n == 0:
        return np.zeros(0, dtype="float64")
    t = ts.to_numpy(dtype="datetime64[ns]").view("int64")  # NaT sorts first; such rows are critical anyway
    order = np.lexsort((t, codes))  # stable: equal times keep row order
    sorted_codes = codes[order]
    pos = np.arange(n)
    starts = np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]
    rank_sorted = pos - np.maximum.accumulate(np.where(starts, pos, 0)) + 1
    rank = np.empty(n, dtype="float64")
    rank[order] = rank_sorted
    rank[codes < 0] = np.nan
    return rank


def newest_stored_timestamp(store) -> pd.Timestamp | None:
    """The newest event time in the store, reading only its newest day partition(s)."""
    if store is None:
        return None
    if not hasattr(store, "events_dir"):  # a table store answers from its metadata
        return store.time_range()[1]
    if not store.events_dir.exists():
        return None
    days = sorted(p.name.split("=", 1)[1] for p in store.events_dir.glob("date=*") if p.is_dir())
    for day in reversed(days):
        ts = store.read(start=pd.Timestamp(day, tz="UTC"), columns=["timestamp"])["timestamp"]
        if len(ts):
            return pd.Timestamp(ts.max())
    return None


def retention_reference(settings, ts: pd.Series | None, now: pd.Timestamp,
                        store_newest: pd.Timestamp | None = None) -> pd.Timestamp:
    """The instant retention is measured back from (see the module docstring).

    ``"data"``: the newest of (the store's newest event, the batch's newest parseable timestamp that
    is not in the future), capped at ``now``; ``now`` when there is neither. ``"wall"``: ``now``.
    """
    if settings.checks.retention_clock == "wall":
        return now
    newest_allowed = now + pd.Timedelta(seconds=settings.checks.future_tolerance_s)
    candidates = []
    if ts is not None and len(ts):
        ok = ts[ts.notna() & (ts <= newest_allowed)]
        if len(ok):
            candidates.append(pd.Timestamp(ok.max()))
    if store_newest is not None and not pd.isna(store_newest):
        candidates.append(pd.Timestamp(store_newest))
    return min(max(candidates), now) if candidates else now


def _utc(t) -> pd.Timestamp:
    t = pd.Timestamp(t)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def suite_parameters(settings, n_rows: int, now: pd.Timestamp | None = None,
                     retention_from: pd.Timestamp | None = None) -> dict:
    """Suite parameters; ``retention_from`` is the retention reference (default: ``now``)."""
    c = settings.checks
    now = pd.Timestamp.now(tz="UTC") if now is None else _utc(now)
    retention_from = now if retention_from is None else _utc(retention_from)
    lo, hi = c.like_rate_bounds
    if n_rows < c.min_batch_rows_for_rate_check:  # too few rows for a rate to mean anything
        lo, hi = 0.0, 1.0
    return {
        "like_rate_min": float(lo),
        "like_rate_max": float(hi),
        "newest_allowed": now + pd.Timedelta(seconds=c.future_tolerance_s),
        "oldest_allowed": retention_from - pd.Timedelta(days=c.retention_days),
        "max_query_chars": int(c.max_query_chars),
        "max_events_per_user": int(c.max_events_per_user),
    }


# ---- validation --------------------------------------------------------------------------------------
def _summarise(results) -> tuple[list[ExpectationOutcome], dict[str, np.ndarray]]:
    outs, row_hits = [], {}
    for r in results:
        cfg = r.expectation_config
        rule, severity, guards = rule_of(cfg)
        res = r.result or {}
        exc = r.exception_info or {}
        err = None
        if isinstance(exc, dict):
            if exc.get("raised_exception"):
                err = exc.get("exception_message")
            else:  # keyed by metric id when a metric failed
                msgs = [v.get("exception_message") for v in exc.values() if isinstance(v, dict)
                        and v.get("raised_exception")]
                err = msgs[0] if msgs else None
        outs.append(ExpectationOutcome(
            rule=rule, expectation=cfg.type, column=cfg.kwargs.get("column") or cfg.kwargs.get("column_A"),
            severity=severity, success=bool(r.success), unexpected_count=res.get("unexpected_count"),
            observed=jsonable(res.get("observed_value", res.get("details"))), error=err, guards=guards))
        if severity == ROW and not r.success and err is None:
            row_hits[rule] = np.asarray(res.get("unexpected_index_list") or [], dtype=np.int64)
    return outs, row_hits


def _critical_reason(o: ExpectationOutcome, vr_result) -> str:
    if o.rule == "schema":
        details = (vr_result or {}).get("details", {}).get("mismatched", {})
        parts = []
        if details.get("missing"):
            parts.append("missing column(s): " + ", ".join(sorted(map(str, details["missing"]))))
        if details.get("unexpected"):
            parts.append("unexpected column(s): " + ", ".join(sorted(map(str, details["unexpected"]))))
        return "critical: schema: " + ("; ".join(parts) or "columns differ from the contract")
    if o.rule == "non_empty":
        return "critical: empty batch (no rows)"
    if o.rule.startswith("type_"):
        return f"critical: wrong dtype: {o.column} is {o.observed!s}, expected {o.guards.split(' ', 1)[-1]}"
    count = f" ({o.unexpected_count} rows)" if o.unexpected_count else ""
    return f"critical: {o.guards}{count} failed"


def _row_reason(rule: str, k: int, n: int, guards: str, params: dict, retention_from, clock: str) -> str:
    """One sentence per failing row rule: what failed, with the bound that was applied."""
    if rule == "timestamp_too_old":
        since = "the newest event (stored or in this batch)" if clock == "data" else "now"
        return (f"row: {rule}: {k} of {n} rows older than {_day(params['oldest_allowed'])}, i.e. more than "
                f"retention_days before {since} {_day(retention_from)}")
    if rule == "timestamp_in_future":
        return (f"row: {rule}: {k} of {n} rows later than {params['newest_allowed']:%Y-%m-%d %H:%M} UTC "
                f"(wall clock + future_tolerance_s)")
    if rule == "user_over_event_cap":
        return (f"row: {rule}: {k} of {n} rows are events beyond a user's first {params['max_events_per_user']} "
                f"in this batch (max_events_per_user); split off, other users' rows unaffected")
    return f"row: {rule}: {k} of {n} rows fail \"{guards}\""


def _day(t) -> str:
    return pd.Timestamp(t).strftime("%Y-%m-%d")


def validate_frame(v: pd.DataFrame, settings, *, now=None, run_name: str | None = None,
                   store_newest: pd.Timestamp | None = None) -> ValidationOutcome:
    """Run the feedback suite on a prepared frame (see :func:`prepare_feedback_frame`).

    ``store_newest``: the newest event already stored (the data's clock for retention, together
    with the batch's own newest event; see :func:`retention_reference`).
    """
    from data_checks.gx_runtime import run_checkpoint

    t0 = time.perf_counter()
    n = len(v)
    now = pd.Timestamp.now(tz="UTC") if now is None else _utc(now)
    c = settings.checks
    retention_from = retention_reference(settings, v["_timestamp_utc"] if n else None, now, store_newest)
    params = suite_parameters(settings, n, now, retention_from)
    # the like-rate leaves out the rows beyond the per-user cap (they are split off on their own)
    over_cap = (v["_user_event_rank"] > c.max_events_per_user).to_numpy() if n else np.zeros(0, bool)
    v["_label_within_cap"] = v["_label_num"].where(~over_cap)
    docs_dir = settings.reports_dir / "data_docs" if settings.checks.data_docs else None
    vr, page = run_checkpoint(FEEDBACK_SUITE, v, params, docs_dir, run_name)
    outs, row_hits = _summarise(vr.results)
    raw = {rule_of(r.expectation_config)[0]: r.result for r in vr.results}

    reasons: list[str] = []
    counts: dict[str, int] = {}
    critical = [o for o in outs if o.severity == CRITICAL and not o.success]
    # an expectation that could not run (e.g. its column is missing) is critical whatever its severity
    broken = [o for o in outs if o.severity != CRITICAL and o.error]
    for o in critical:
        if o.error and o.rule != "schema":
            if any(c.rule == "schema" for c in critical):
                continue  # the schema reason already says which column is missing
            reasons.append(f"critical: {o.rule} could not be evaluated: {o.error}")
        else:
            reasons.append(_critical_reason(o, raw.get(o.rule)))
        counts[o.rule] = int(o.unexpected_count or 1)
    if broken and not any(c.rule == "schema" for c in critical):
        for o in broken:
            reasons.append(f"critical: {o.rule} could not be evaluated: {o.error}")
            counts[o.rule] = 1
    batch_failed = [o for o in outs if o.severity == BATCH and not o.success and not o.error]
    for o in batch_failed:
        p = params
        obs = "n/a" if o.observed is None else f"{float(o.observed):.3f}"
        reasons.append(f"batch: {o.rule}: observed {obs} outside "
                       f"[{p['like_rate_min']}, {p['like_rate_max']}] ({o.guards})"
                       if o.rule == "like_rate" else f"batch: {o.rule} failed ({o.guards})")
        counts[o.rule] = 1

    # per-row reasons from GX's unexpected indices
    row_reasons = np.full(n, "", dtype=object)
    for rule, idx in row_hits.items():
        if len(idx):
            row_reasons[idx] = row_reasons[idx] + (rule + "; ")
            counts[rule] = len(idx)
    row_reasons = pd.Series(row_reasons, dtype=object).str.rstrip("; ")
    bad = (row_reasons != "").to_numpy()
    n_bad_rows = int(bad.sum())
    # rows failing only split-only rules (the per-user cap) are held back on their own: they do not
    # count toward the share that quarantines the whole batch
    split_only = row_reasons.isin(SPLIT_ONLY_RULES).to_numpy()
    n_split_only = int(split_only.sum())
    n_counted = n_bad_rows - n_split_only
    rest = n - n_split_only
    share = n_counted / rest if rest else 0.0
    for rule, idx in row_hits.items():
        guards = next(o.guards for o in outs if o.rule == rule)
        reasons.append(_row_reason(rule, len(idx), n, guards, params, retention_from, c.retention_clock))

    limit = c.max_invalid_row_share
    if critical or broken or batch_failed or n == 0:
        decision = "quarantine"
    elif n_bad_rows == 0:
        decision = "pass"
    elif share <= limit:
        decision = "split"
    else:
        decision = "quarantine"
        of = "of the rows within the per-user cap" if n_split_only else "of the batch"
        reasons.append(f"policy: {n_counted} invalid rows = {share:.1%} {of} > max_invalid_row_share "
                       f"{limit:.1%}: whole batch quarantined")
    if decision == "split":
        if n_counted:
            reasons.append(f"policy: {n_counted} invalid rows = {share:.1%} <= max_invalid_row_share "
                           f"{limit:.1%}: valid rows ingested, invalid rows quarantined")
        if n_split_only:
            reasons.append(f"policy: {n_split_only} rows over the per-user cap split off (not counted toward "
                           f"max_invalid_row_share): the other rows ingested")
    n_good = 0 if decision == "quarantine" else n - n_bad_rows
    return ValidationOutcome(
        success=decision != "quarantine", decision=decision, n_rows=n, n_good=n_good, n_bad=n - n_good,
        bad_share=round(share, 6), reasons=reasons, reason_counts=counts, expectations=outs,
        parameters=jsonable({**params, "retention_from": retention_from, "retention_clock": c.retention_clock}),
        data_docs=page, seconds=round(time.perf_counter() - t0, 3),
        row_reasons=row_reasons)


def validate_feedback_batch(df: pd.DataFrame, store, catalog: pd.DataFrame | None, settings, *, now=None,
                            run_name: str | None = None) -> ValidationOutcome:
    """Validate ``df`` against the feedback suite, the store (already-seen ids) and the catalog."""
    catalog = store.catalog() if catalog is None else catalog
    stored = store.event_ids() if store is not None else set()
    v = prepare_feedback_frame(df, stored, catalog["item_id"].astype(str).to_numpy())
    return validate_frame(v, settings, now=now, run_name=run_name, store_newest=newest_stored_timestamp(store))


def clean_rows(v: pd.DataFrame, mask: np.ndarray) -> pd.DataFrame:
    """The valid rows in contract form (parsed UTC timestamp, int label), ready for the store."""
    good = v.loc[mask]
    out = good[[c for c in FEEDBACK_COLUMNS if c in good.columns]].copy()
    out["timestamp"] = good["_timestamp_utc"]
    out["label"] = good["_label_num"].astype("int8")
    return out


# ---- catalog -------------------------------------------------------------------------------------------
def validate_catalog(catalog: pd.DataFrame, settings, known_categories=None, store=None) -> ValidationOutcome:
    """Validate a catalog (unique ids, titles, text lengths, known categories); all rules are critical."""
    from data_checks.gx_runtime import run_checkpoint

    t0 = time.perf_counter()
    c = settings.checks
    if known_categories is None:
        known_categories = c.known_categories
    if known_categories is None and store is not None and store.has_catalog():
        known_categories = sorted(store.catalog()["category"].dropna().astype(str).unique())
    if known_categories is None:  # nothing to compare with: every present category is known
        known_categories = sorted(catalog["category"].dropna().astype(str).unique())
    v = catalog.reset_index(drop=True).copy()
    for col in ("item_id", "title", "description", "category"):
        if col not in v.columns:
            v[col] = pd.Series(pd.NA, index=v.index, dtype="string")
    params = {"max_title_chars": c.max_title_chars, "max_description_chars": c.max_description_chars,
              "known_categories": list(known_categories)}
    docs_dir = settings.reports_dir / "data_docs" if c.data_docs else None
    vr, page = run_checkpoint(CATALOG_SUITE, v, params, docs_dir, "catalog")
    outs, _ = _summarise(vr.results)
    failed = [o for o in outs if not o.success]
    reasons = [f"critical: {o.guards}" + (f" ({o.unexpected_count} rows)" if o.unexpected_count else "")
               + (f": {o.error}" if o.error else "") for o in failed]
    ok = not failed
    return ValidationOutcome(success=ok, decision="pass" if ok else "quarantine", n_rows=len(v),
                             n_good=len(v) if ok else 0, n_bad=0 if ok else len(v), bad_share=0.0 if ok else 1.0,
                             reasons=reasons, reason_counts={o.rule: int(o.unexpected_count or 1) for o in failed},
                             expectations=outs, parameters=jsonable({**params, "known_categories": len(known_categories)}),
                             data_docs=page, seconds=round(time.perf_counter() - t0, 3))


def docs_index(settings) -> Path:
    return settings.reports_dir / "data_docs" / "index.html"
