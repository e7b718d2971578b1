"""The GX suites and the quarantine policy, one bad input at a time (validation level, no files)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data_checks.validate import ValidationOutcome, validate_catalog, validate_feedback_batch
from recloop.store import FeedbackStore
from tests.conftest_data_checks import NOW, make_catalog, make_events, with_catalog


@pytest.fixture
def dc_settings(settings):
    return with_catalog(settings)


def check(settings, df, now=NOW):
    store = FeedbackStore.from_settings(settings)
    return validate_feedback_batch(df, store, store.catalog(), settings, now=now)


def reasons_text(o: ValidationOutcome) -> str:
    return "\n".join(o.reasons)


def test_clean_batch_passes_and_outcome_is_json(dc_settings):
    o = check(dc_settings, make_events(200))
    assert o.decision == "pass" and o.success, o.reasons
    assert (o.n_rows, o.n_good, o.n_bad) == (200, 200, 0)
    doc = json.loads(json.dumps(o.to_dict()))  # JSON-serialisable, no numpy or pandas leftovers
    assert {e["rule"] for e in doc["expectations"]} >= {"schema", "item_id_unknown", "like_rate",
                                                         "user_over_event_cap", "timestamp_in_future"}
    assert all(e["success"] for e in doc["expectations"])
    again = ValidationOutcome.from_dict(doc)
    assert again.decision == "pass" and len(again.expectations) == len(o.expectations)


def test_every_expectation_says_what_it_guards():
    from data_checks.suites import catalog_expectations, feedback_expectations

    for e in feedback_expectations() + catalog_expectations():
        assert e.meta["severity"] in {"critical", "batch", "row"}
        assert e.meta["guards"] and e.meta["rule"]


def test_missing_column_quarantines_whole_batch(dc_settings):
    o = check(dc_settings, make_events(100).drop(columns=["label"]))
    assert o.decision == "quarantine" and o.n_good == 0
    assert "missing column(s): label" in reasons_text(o)


def test_missing_optional_columns_are_fine(dc_settings):
    o = check(dc_settings, make_events(100).drop(columns=["query", "model_version"]))
    assert o.decision == "pass", o.reasons


def test_extra_unexpected_column_quarantines(dc_settings):
    df = make_events(100)
    df["colour"] = "red"
    o = check(dc_settings, df)
    assert o.decision == "quarantine"
    assert "unexpected column(s): colour" in reasons_text(o)


@pytest.mark.parametrize("column,values,expect", [
    ("label", lambda n: np.where(np.arange(n) % 2, "yes", "no"), "label"),
    ("user_id", lambda n: np.arange(n), "user_id"),
    ("timestamp", lambda n: np.arange(n) * 1_000_000_000, "timestamp"),
])
def test_wrong_dtype_quarantines(dc_settings, column, values, expect):
    df = make_events(100)
    df[column] = values(len(df))
    o = check(dc_settings, df)
    assert o.decision == "quarantine"
    assert expect in reasons_text(o) and "critical" in reasons_text(o)


def test_naive_or_unparseable_timestamps_are_critical(dc_settings):
    df = make_events(100)
    df["timestamp"] = df["timestamp"].dt.tz_convert(None)  # naive: which zone?
    o = check(dc_settings, df)
    assert o.decision == "quarantine" and "timezone" in reasons_text(o)
    df = make_events(100)
    df["timestamp"] = df["timestamp"].astype(str)
    df.loc[3, "timestamp"] = "last tuesday"
    o = check(dc_settings, df)
    assert o.decision == "quarantine" and "parses" in reasons_text(o)


@pytest.mark.parametrize("column", ["event_id", "user_id", "item_id"])
def test_null_ids_few_split_many_quarantine(dc_settings, column):
    df = make_events(200)
    df[column] = df[column].astype(object)
    df.loc[[5, 6], column] = None  # 1 %: split off
    o = check(dc_settings, df)
    assert o.decision == "split" and o.n_bad == 2 and o.n_good == 198
    assert set(o.row_reasons[o.row_reasons != ""].index) == {5, 6}
    assert f"{column}_null" in o.row_reasons[5]
    df.loc[:39, column] = None  # 20 %: too many
    o = check(dc_settings, df)
    assert o.decision == "quarantine" and o.n_good == 0
    assert "max_invalid_row_share" in reasons_text(o)


def test_unknown_items_below_and_above_threshold(dc_settings):
    df = make_events(200)
    df.loc[[1, 2, 3], "item_id"] = "item-nope"  # 1.5 % <= 5 %
    o = check(dc_settings, df)
    assert o.decision == "split" and o.n_bad == 3
    assert o.reason_counts == {"item_id_unknown": 3}
    df.loc[:29, "item_id"] = "item-nope"  # 15 % > 5 %
    o = check(dc_settings, df)
    assert o.decision == "quarantine" and o.reason_counts["item_id_unknown"] == 30


def test_threshold_is_a_setting(dc_settings):
    df = make_events(200)
    df.loc[:29, "item_id"] = "item-nope"  # 15 %
    dc_settings.checks.max_invalid_row_share = 0.2
    assert check(dc_settings, df).decision == "split"


def test_duplicate_ids_inside_batch_keep_first_copy(dc_settings):
    df = make_events(100)
    df = pd.concat([df, df.iloc[[10, 20]]], ignore_index=True)
    o = check(dc_settings, df)
    assert o.decision == "split" and o.n_bad == 2
    assert list(o.row_reasons[o.row_reasons != ""].index) == [100, 101]  # the repeats, not the originals
    assert o.row_reasons[100] == "event_id_duplicate_in_batch"


def test_duplicate_ids_across_batches(dc_settings):
    store = FeedbackStore.from_settings(dc_settings)
    first = make_events(100, seed=1)
    store.append(first, batch_id="first")
    second = pd.concat([make_events(100, seed=2), first.iloc[[0, 1]]], ignore_index=True)
    o = check(dc_settings, second)
    assert o.decision == "split" and o.reason_counts == {"event_id_already_stored": 2}


def test_label_not_binary_and_label_contradicting_event_type(dc_settings):
    df = make_events(200)
    df.loc[0, "label"] = 2
    imp = df.index[df["event_type"] == "impression"][:2]
    df.loc[imp, "label"] = 1  # an impression is a 0
    o = check(dc_settings, df)
    assert o.decision == "split"
    assert "label_not_binary" in o.row_reasons[0]
    assert all(o.row_reasons[i] == "label_contradicts_event_type" for i in imp)


def test_unknown_event_type(dc_settings):
    df = make_events(200)
    df.loc[7, "event_type"] = "hover"
    o = check(dc_settings, df)
    assert o.decision == "split" and "event_type_unknown" in o.row_reasons[7]


HISTORY = pd.Timestamp("1998-01-17 10:00", tz="UTC")


def test_historical_batch_is_judged_on_its_own_clock(dc_settings):
    """A 1998 backfill into an empty store: nothing is 'too old' for being historical."""
    df = make_events(200, start=HISTORY)
    o = check(dc_settings, df)
    assert o.decision == "pass", o.reasons
    assert o.parameters["retention_clock"] == "data"
    assert o.parameters["retention_from"].startswith("1998-01-1")
    # a stale row far older than the rest of the data is still caught, with a reason that says so
    df.loc[3, "timestamp"] = HISTORY - pd.Timedelta(days=dc_settings.checks.retention_days + 30)
    o = check(dc_settings, df)
    assert o.decision == "split" and o.row_reasons[3] == "timestamp_too_old"
    line = next(r for r in o.reasons if "timestamp_too_old" in r)
    assert "1 of 200 rows older than 1988-" in line and "retention_days before the newest event" in line
    assert "not older than" not in line


def test_retention_clock_follows_the_store(dc_settings):
    store = FeedbackStore.from_settings(dc_settings)
    store.append(make_events(50, seed=5, start=HISTORY + pd.Timedelta(days=4000)), batch_id="newer")
    o = check(dc_settings, make_events(200, start=HISTORY))  # > retention_days before the stored data
    assert o.decision == "quarantine" and o.reason_counts == {"timestamp_too_old": 200}


def test_wall_clock_retention_is_a_setting(dc_settings):
    dc_settings.checks.retention_clock = "wall"
    o = check(dc_settings, make_events(200, start=HISTORY))
    assert o.decision == "quarantine" and o.reason_counts == {"timestamp_too_old": 200}
    assert "retention_days before now" in reasons_text(o)


def test_future_row_in_a_historical_batch_uses_the_wall_clock(dc_settings):
    df = make_events(200, start=HISTORY)
    df.loc[7, "timestamp"] = NOW + pd.Timedelta(days=30)  # forged: must not drag the data clock along
    o = check(dc_settings, df)
    assert o.decision == "split" and o.reason_counts == {"timestamp_in_future": 1}
    assert o.row_reasons[7] == "timestamp_in_future"
    assert o.parameters["retention_from"].startswith("1998-01-1")


def test_future_timestamps_and_tolerance(dc_settings):
    df = make_events(200)
    df.loc[0, "timestamp"] = NOW + pd.Timedelta(days=1)
    df.loc[1, "timestamp"] = NOW + pd.Timedelta(seconds=dc_settings.checks.future_tolerance_s - 10)  # clock skew: ok
    df.loc[2, "timestamp"] = NOW - pd.Timedelta(days=dc_settings.checks.retention_days + 1)
    o = check(dc_settings, df)
    assert o.decision == "split"
    assert o.row_reasons[0] == "timestamp_in_future"
    assert o.row_reasons[1] == ""
    assert o.row_reasons[2] == "timestamp_too_old"


def test_query_length_bound(dc_settings):
    df = make_events(100)
    df["query"] = df["query"].astype(object)
    df.loc[4, "query"] = "x" * (dc_settings.checks.max_query_chars + 1)
    df.loc[5, "query"] = "jazz piano"
    o = check(dc_settings, df)
    assert o.decision == "split" and o.row_reasons[4] == "query_too_long" and o.row_reasons[5] == ""


def _burst(n: int, user: str = "user-spam", event_type: str = "click", seed: int = 9) -> pd.DataFrame:
    from recloop.schema import LABEL_BY_EVENT

    burst = make_events(n, seed=seed, prefix="burst")
    burst["user_id"], burst["event_type"], burst["label"] = user, event_type, LABEL_BY_EVENT[event_type]
    return burst


def test_click_burst_splits_off_only_the_users_excess(dc_settings):
    dc_settings.checks.max_events_per_user = 500
    clean = make_events(2_000)
    df = pd.concat([clean, _burst(1_000)], ignore_index=True)
    o = check(dc_settings, df)
    # 1,000 burst rows = 33 % of the batch, but only the 500 beyond the cap are held, and they do not
    # count toward max_invalid_row_share: every other user's row flows
    assert o.decision == "split", o.reasons
    assert (o.n_rows, o.n_good, o.n_bad) == (3_000, 2_500, 500)
    assert o.reason_counts == {"user_over_event_cap": 500}
    flagged = np.flatnonzero((o.row_reasons != "").to_numpy())
    assert set(df.loc[flagged, "user_id"]) == {"user-spam"}
    assert set(o.row_reasons[flagged]) == {"user_over_event_cap"}
    spam_ts = pd.to_datetime(df.loc[df["user_id"] == "user-spam", "timestamp"])
    assert pd.to_datetime(df.loc[flagged, "timestamp"]).min() >= spam_ts.sort_values().iloc[499]  # the latest ones
    text = reasons_text(o)
    assert "events beyond a user's first 500" in text and "not counted toward max_invalid_row_share" in text
    assert o.bad_share == 0.0


def test_burst_under_the_cap_is_not_spam(dc_settings):
    df = pd.concat([make_events(2_000), _burst(737, user="user-0405", event_type="like")], ignore_index=True)
    assert dc_settings.checks.max_events_per_user >= 737  # a MovieLens sign-up burst is below the default cap
    o = check(dc_settings, df)
    assert o.decision == "pass" and o.n_good == 2_737, o.reasons


def test_burst_does_not_shield_other_bad_rows(dc_settings):
    dc_settings.checks.max_events_per_user = 500
    df = pd.concat([make_events(2_000), _burst(1_000)], ignore_index=True)
    df.loc[:199, "item_id"] = "item-nope"  # 200 of the 2,500 counted rows = 8 % > 5 %: whole batch
    o = check(dc_settings, df)
    assert o.decision == "quarantine" and o.n_good == 0
    assert o.reason_counts == {"item_id_unknown": 200, "user_over_event_cap": 500}
    assert "200 invalid rows = 8.0%" in reasons_text(o)


def test_burst_of_likes_does_not_trip_the_like_rate(dc_settings):
    dc_settings.checks.max_events_per_user = 100
    clean = make_events(200)
    df = pd.concat([clean, _burst(3_000, event_type="like")], ignore_index=True)
    assert df["label"].mean() > dc_settings.checks.like_rate_bounds[1]  # counted whole, it would quarantine
    o = check(dc_settings, df)
    assert o.decision == "split" and o.n_good == 300 and o.reason_counts == {"user_over_event_cap": 2_900}


def test_like_rate_bounds(dc_settings):
    df = make_events(200)
    df["event_type"], df["label"] = "like", 1  # a batch of 100 % likes
    o = check(dc_settings, df)
    assert o.decision == "quarantine" and "like_rate" in o.reason_counts
    assert "batch: like_rate: observed 1.000" in reasons_text(o)
    small = df.iloc[: dc_settings.checks.min_batch_rows_for_rate_check - 1]
    assert check(dc_settings, small).decision == "pass"  # too few rows for a rate to mean anything


def test_empty_frame_is_quarantined(dc_settings):
    o = check(dc_settings, make_events(10).iloc[:0])
    assert o.decision == "quarantine" and "empty" in reasons_text(o)


def test_catalog_suite(dc_settings):
    good = make_catalog()
    assert validate_catalog(good, dc_settings).success
    bad = pd.concat([good, good.iloc[[0]]], ignore_index=True)
    bad.loc[1, "title"] = ""
    bad.loc[2, "category"] = "cookng"
    bad.loc[3, "description"] = "x" * (dc_settings.checks.max_description_chars + 1)
    o = validate_catalog(bad, dc_settings, known_categories=["cooking", "travel", "jazz"])
    assert not o.success
    assert {"item_id_unique", "title_length", "category_known", "description_length"} <= set(o.reason_counts)


def _check_synthetic(data, settings, days):
    settings.checks.data_docs = False
    batches = list(data.landing_batches().values())
    lo, hi = settings.checks.like_rate_bounds
    for d, b in enumerate(batches):  # every clean day, cheaply: the batch-level statistics
        if d == data.config.bad_batch_day:
            continue
        assert lo <= b["label"].mean() <= hi, d
        assert b["user_id"].value_counts().max() <= settings.checks.max_events_per_user, d
    store = FeedbackStore.from_settings(settings)
    store.upsert_catalog(data.catalog)
    now = data.day_start(data.config.n_days)
    for d in days:
        o = validate_feedback_batch(batches[d], store, data.catalog, settings, now=now)
        if d != data.config.bad_batch_day:
            assert o.decision == "pass", (d, o.reasons)
            continue
        assert o.decision == "quarantine"
        planted = data.planted
        assert o.reason_counts == {"user_id_null": planted["null_user_id"],
                                   "item_id_unknown": planted["unknown_item_id"],
                                   "timestamp_in_future": planted["future_timestamp"],
                                   "event_id_duplicate_in_batch": planted["duplicate_event_id"]}
        assert "max_invalid_row_share" in reasons_text(o)


def test_synthetic_small_world_bad_day_quarantined_clean_days_pass(settings, small_world):
    _check_synthetic(small_world, settings, [0, small_world.config.bad_batch_day, small_world.config.n_days - 1])


@pytest.mark.slow
def test_synthetic_default_config_every_day(settings):
    """Default synthetic config: all clean days pass (like-rate, per-user cap, ...); day 3 quarantined."""
    from recloop.datasets.synthetic import SyntheticConfig, generate

    data = generate(SyntheticConfig())
    _check_synthetic(data, settings, range(data.config.n_days))
