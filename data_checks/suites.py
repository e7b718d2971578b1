"""Expectation suites, defined in code (Great Expectations 1.x).

Every rule that decides whether a feedback batch may reach training is an
expectation here, so the Data Docs show all of them. Rules that no built-in
expectation can say directly (event id already stored, label consistent with the
event type, per-user cap, ...) are expressed on *helper columns* that
:func:`data_checks.validate.prepare_feedback_frame` computes, vectorised, on the
validation frame; their names start with ``_``.

Each expectation carries ``meta``:

* ``rule``: the short name used in reasons and in the per-row ``_reason`` column;
* ``severity``: ``critical`` (fails → the whole batch is quarantined), ``batch``
  (a statistical check on the whole batch: fails → whole batch quarantined) or
  ``row`` (the failing rows can be split off, see the policy in ``validate.py``);
  rows over the per-user cap are always split off (``SPLIT_ONLY_RULES``);
* ``guards``: one line on what the expectation protects against (also in ``notes``,
  which the Data Docs render).

Settings-dependent bounds are *suite parameters* (``{"$PARAMETER": name}``), so the
suite is built once per process and the values used are recorded in each result.
"""

from __future__ import annotations

from dataclasses import dataclass

import great_expectations.expectations as gxe

from recloop.schema import EVENT_TYPES, FEEDBACK_COLUMNS

FEEDBACK_SUITE = "recloop_feedback"
CATALOG_SUITE = "recloop_catalog"

# Helper columns added to the validation frame (never stored).
HELPER_COLUMNS: tuple[str, ...] = (
    "_timestamp_utc",  # timestamp parsed to UTC (NaT when unparseable)
    "_timestamp_has_zone",  # the raw timestamp carried a timezone (naive times are ambiguous)
    "_label_num",  # label as a number (NaN when not numeric)
    "_label_expected",  # label that event_type implies (recloop.schema.LABEL_BY_EVENT)
    "_event_id_repeat",  # a 2nd, 3rd, ... occurrence of an event_id inside this batch
    "_event_id_in_store",  # the event_id is already in the feedback store
    "_item_in_catalog",  # item_id is a catalog item (NA when item_id is null)
    "_user_event_rank",  # the row's place among its user's events in this batch, in time order (1, 2, ...)
    "_label_within_cap",  # _label_num, NaN for rows beyond the per-user cap (the like-rate ignores them)
)

STRING_TYPES = ["object", "str", "string", "StringDtype"]
LABEL_TYPES = ["int8", "int16", "int32", "int64", "uint8", "float32", "float64", "bool"]

CRITICAL, BATCH, ROW = "critical", "batch", "row"
# Row rules whose failing rows are split off without counting toward max_invalid_row_share:
# they say something about one user, not about the delivery.
SPLIT_ONLY_RULES: tuple[str, ...] = ("user_over_event_cap",)


@dataclass(frozen=True)
class Rule:
    name: str
    severity: str
    guards: str


def _e(cls, rule: str, severity: str, guards: str, **kwargs):
    """Build one expectation with its rule name, severity and what it guards."""
    return cls(meta={"rule": rule, "severity": severity, "guards": guards}, notes=f"[{severity}] {guards}",
               **kwargs)


def feedback_expectations() -> list:
    P = lambda name: {"$PARAMETER": name}
    exps = [
        # --- critical: schema and types --------------------------------------------------------
        # Guards against schema drift upstream: a missing column makes every row meaningless, an
        # extra column means the producer changed its contract without telling us.
        _e(gxe.ExpectTableColumnsToMatchSet, "schema", CRITICAL,
           "exactly the contract's columns (missing or unexpected columns = upstream schema change)",
           column_set=list(FEEDBACK_COLUMNS) + list(HELPER_COLUMNS), exact_match=True),
        # Guards against an empty delivery being counted as a successful batch.
        _e(gxe.ExpectTableRowCountToBeBetween, "non_empty", CRITICAL, "the batch has at least one row",
           min_value=1),
    ]
    # Guards against ids/text arriving as numbers or other types (joins would silently miss).
    for col in ("event_id", "user_id", "item_id", "event_type", "query", "model_version"):
        exps.append(_e(gxe.ExpectColumnValuesToBeInTypeList, f"type_{col}", CRITICAL,
                       f"{col} holds strings", column=col, type_list=STRING_TYPES))
    exps += [
        # Guards against labels arriving as text ("yes"/"no") or other non-numeric types.
        _e(gxe.ExpectColumnValuesToBeInTypeList, "type_label", CRITICAL, "label is numeric",
           column="label", type_list=LABEL_TYPES),
        # Guards against unparseable or missing timestamps, epoch numbers and other non-time types
        # (point-in-time joins need every one). GX's type-list check cannot name a tz-aware dtype,
        # so the type is checked through the parse: anything that does not parse is NaT here.
        _e(gxe.ExpectColumnValuesToNotBeNull, "timestamp_parseable", CRITICAL,
           "every timestamp parses to an instant", column="_timestamp_utc"),
        # Guards against naive local times: without a zone an event can be off by hours.
        _e(gxe.ExpectColumnValuesToBeInSet, "timestamp_utc", CRITICAL,
           "every timestamp carries a timezone (converted to UTC)", column="_timestamp_has_zone",
           value_set=[True]),
        # --- batch-level statistics ---------------------------------------------------------------
        # Guards against a broken or gamed producer: a batch of 100 % likes (or none) is suspicious.
        # Bounds are widened to [0, 1] for batches smaller than min_batch_rows_for_rate_check.
        # Rows a user sends beyond the per-user cap are left out of the rate: one user's burst of
        # likes must not quarantine everyone else's rows (the excess is split off on its own below).
        _e(gxe.ExpectColumnMeanToBeBetween, "like_rate", BATCH,
           "share of positive labels within plausible bounds", column="_label_within_cap",
           min_value=P("like_rate_min"), max_value=P("like_rate_max")),
        # --- row-level: can be split off ------------------------------------------------------------
        # Guards the idempotency key: an event without an id cannot be deduplicated.
        _e(gxe.ExpectColumnValuesToNotBeNull, "event_id_null", ROW, "event_id present", column="event_id"),
        # Guards training rows without a user (nobody to learn for).
        _e(gxe.ExpectColumnValuesToNotBeNull, "user_id_null", ROW, "user_id present", column="user_id"),
        # Guards training rows without an item.
        _e(gxe.ExpectColumnValuesToNotBeNull, "item_id_null", ROW, "item_id present", column="item_id"),
        # Guards rows whose meaning is unknown.
        _e(gxe.ExpectColumnValuesToNotBeNull, "event_type_null", ROW, "event_type present", column="event_type"),
        # Guards rows without a target.
        _e(gxe.ExpectColumnValuesToNotBeNull, "label_null", ROW, "label present", column="label"),
        # Guards against a replayed or double-sent event inside one delivery (first copy is kept).
        _e(gxe.ExpectColumnValuesToBeInSet, "event_id_duplicate_in_batch", ROW,
           "event_id unique within the batch (repeats are split off, the first copy kept)",
           column="_event_id_repeat", value_set=[False]),
        # Guards against re-delivery of events already learned from (double counting).
        _e(gxe.ExpectColumnValuesToBeInSet, "event_id_already_stored", ROW,
           "event_id not already in the feedback store", column="_event_id_in_store", value_set=[False]),
        # Guards against events for items the model cannot read (no title/description).
        _e(gxe.ExpectColumnValuesToBeInSet, "item_id_unknown", ROW, "item_id is in the catalog",
           column="_item_in_catalog", value_set=[True]),
        # Guards against event types the label rule does not know.
        _e(gxe.ExpectColumnValuesToBeInSet, "event_type_unknown", ROW, "event_type in the allowed set",
           column="event_type", value_set=list(EVENT_TYPES)),
        # Guards against labels outside the binary target.
        _e(gxe.ExpectColumnValuesToBeInSet, "label_not_binary", ROW, "label in {0, 1}", column="label",
           value_set=[0, 1]),
        # Guards against a label that contradicts its event type (e.g. an impression labelled 1).
        _e(gxe.ExpectColumnPairValuesToBeEqual, "label_contradicts_event_type", ROW,
           "label equals the label its event_type implies", column_A="_label_num",
           column_B="_label_expected", ignore_row_if="either_value_is_missing"),
        # Guards against clock skew / forged times: events from the future leak into training windows.
        # Always judged against the wall clock.
        _e(gxe.ExpectColumnValuesToBeBetween, "timestamp_in_future", ROW,
           "timestamp at most future_tolerance_s after the wall clock", column="_timestamp_utc",
           max_value=P("newest_allowed")),
        # Guards against stale replays: an event far older than the rest of the data. Judged against
        # the data's own clock (the newest event stored or in the batch, never later than now), so a
        # historical backfill is not rejected for being historical (settings.checks.retention_clock).
        _e(gxe.ExpectColumnValuesToBeBetween, "timestamp_too_old", ROW,
           "timestamp at most retention_days before the newest event (stored or in this batch)",
           column="_timestamp_utc", min_value=P("oldest_allowed")),
        # Guards the text model and storage against oversized queries (and injected payloads).
        _e(gxe.ExpectColumnValueLengthsToBeBetween, "query_too_long", ROW,
           "query at most max_query_chars characters", column="query", max_value=P("max_query_chars")),
        # Guards against click spam: one user's burst dominating a batch. Only the user's events
        # beyond the first max_events_per_user (in time order) fail; they are split off without
        # counting toward max_invalid_row_share, so a burst never takes other users' rows with it.
        _e(gxe.ExpectColumnValuesToBeBetween, "user_over_event_cap", ROW,
           "a user's events in a batch beyond the first max_events_per_user (in time order) are held back",
           column="_user_event_rank", max_value=P("max_events_per_user")),
    ]
    return exps


def catalog_expectations() -> list:
    P = lambda name: {"$PARAMETER": name}
    return [
        # Guards the join key of every event: two rows for one item make lookups ambiguous.
        _e(gxe.ExpectColumnValuesToBeUnique, "item_id_unique", CRITICAL, "item_id unique", column="item_id"),
        # Guards against items that cannot be referenced.
        _e(gxe.ExpectColumnValuesToNotBeNull, "item_id_null", CRITICAL, "item_id present", column="item_id"),
        # Guards the text tower: an item without a title has nothing to read.
        _e(gxe.ExpectColumnValuesToNotBeNull, "title_null", CRITICAL, "title present", column="title"),
        # Guards against empty or runaway titles (tokenizer truncation hides the rest).
        _e(gxe.ExpectColumnValueLengthsToBeBetween, "title_length", CRITICAL, "title non-empty and bounded",
           column="title", min_value=1, max_value=P("max_title_chars")),
        # Guards against runaway descriptions (storage, tokenisation cost).
        _e(gxe.ExpectColumnValueLengthsToBeBetween, "description_length", CRITICAL, "description bounded",
           column="description", max_value=P("max_description_chars")),
        # Guards against typos / unmapped categories splitting one category into several.
        _e(gxe.ExpectColumnValuesToBeInSet, "category_known", CRITICAL, "category is a known category",
           column="category", value_set=P("known_categories")),
    ]


def rule_of(expectation_config) -> tuple[str, str, str]:
    """(rule, severity, guards) of an expectation configuration from a validation result."""
    meta = expectation_config.meta or {}
    return meta.get("rule", expectation_config.type), meta.get("severity", CRITICAL), meta.get("guards", "")
