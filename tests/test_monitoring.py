"""Monitoring: drift decisions on synthetic worlds with and without planted drift, storm control.

False-positive bound: on worlds from the same generator config without planted drift
(reference = days 0-8, current = days 9-13, the default thresholds), the fast tier demands
0 retrains in 3 seeds and the slow tier at most 1 in 20 seeds (rate <= 0.05).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from monitoring import storm
from monitoring.drift import DriftOutcome, detect_drift
from monitoring.features import FEATURES, build_feature_frame, build_profile, tokenize
from monitoring.windows import ChampionInfo, champion_from_lineage, sample_rows
from recloop.datasets.synthetic import generate
from tests.conftest_monitoring import (
    TRAIN_DAYS,
    champion_for,
    decaying_scorer,
    make_workspace,
    now_for,
    shifting_scorer,
    world_config,
)


@pytest.fixture(scope="module")
def calm_world():
    return generate(world_config(seed=11, drift=False))


@pytest.fixture(scope="module")
def drifted_world():
    return generate(world_config(seed=11, drift=True))


def _check(tmp_path, name, data, events=None, scorer=None, offline_auc=None, record=False, **monitor):
    s, store = make_workspace(tmp_path, name, data, events, **monitor)
    out = detect_drift(s, store, champion_for(data, offline_auc), scorer=scorer, now=now_for(data), record=record)
    return s, store, out


# ---- decisions ------------------------------------------------------------------------------------

def _false_positives(tmp_path, seeds) -> list[int]:
    fired = []
    for seed in seeds:
        data = generate(world_config(seed=seed, drift=False))
        _, _, out = _check(tmp_path, f"calm-{seed}", data)
        assert out.status == "checked" and out.report_path and pd.io.common.file_exists(out.report_path)
        assert out.prediction_drift is None  # no scorer: not checked
        print(f"seed {seed}: share {out.drift_share:.3f} drifted {out.drifted_columns} triggers {out.triggers}")
        if out.should_retrain:
            fired.append(seed)
    return fired


def test_no_drift_same_generator_does_not_retrain(tmp_path):
    fired = _false_positives(tmp_path, seeds=[101, 102, 103])
    assert fired == [], f"false positives on seeds {fired}"


@pytest.mark.slow
@pytest.mark.nightly
def test_false_positive_rate_over_20_seeds(tmp_path):
    fired = _false_positives(tmp_path, seeds=range(200, 220))
    assert len(fired) / 20 <= 0.05, f"false-positive rate {len(fired)}/20 (seeds {fired})"


def test_planted_drift_triggers_retrain_with_data_drift_reason(tmp_path, drifted_world):
    s, _, out = _check(tmp_path, "drifted", drifted_world)
    assert out.should_retrain and out.reason == "data_drift", out.to_markdown()
    assert out.drift_share >= s.monitor.drift_share
    # the planted change: a new category with a new vocabulary, new (young) items
    assert {"category", "text_novelty", "item_age_days"} <= set(out.drifted_columns)
    cols = {c["column"]: c for c in out.columns}
    assert cols["text_novelty"]["current"] > 0.05 > cols["text_novelty"]["reference"]
    assert set(cols) >= set(FEATURES) | {"label"}
    # the Evidently report exists and the decision is stored as JSON next to it
    with open(out.report_path, encoding="utf-8") as fh:
        html = fh.read()
    assert out.report_path.endswith(".html") and len(html) > 10_000
    assert "text_novelty" in html and "Wasserstein" in html
    latest = json.loads((s.reports_dir / "drift" / "latest.json").read_text())
    assert latest["reason"] == "data_drift" and latest["report_path"] == out.report_path
    json.dumps(out.to_dict())  # JSON-serialisable


def test_target_only_drift_is_detected(tmp_path, calm_world):
    events = calm_world.events.copy()
    cur = (events["timestamp"] >= calm_world.day_start(TRAIN_DAYS)).to_numpy()
    rng = np.random.default_rng(0)
    flip = cur & (events["label"].to_numpy() == 0) & (rng.random(len(events)) < 0.15)
    events.loc[flip, "label"] = 1
    events.loc[flip, "event_type"] = "like"
    _, _, out = _check(tmp_path, "target", calm_world, events=events)
    assert out.target_drift is True and out.triggers == ["target_drift"], out.to_markdown()
    assert out.like_rate_current > out.like_rate_reference + 0.08
    assert out.should_retrain and out.reason == "target_drift"


def test_prediction_only_drift_is_detected(tmp_path, calm_world):
    scorer = shifting_scorer(calm_world.day_start(TRAIN_DAYS), shift=0.15)
    _, _, out = _check(tmp_path, "pred", calm_world, scorer=scorer)
    assert out.prediction_drift is True and out.triggers == ["prediction_drift"], out.to_markdown()
    assert out.target_drift is False
    # label-free scores: AUC ~0.5 before and after, so no performance decay
    assert abs(out.auc_drop) < 0.05 and out.offline_auc_source == "reference_holdout"


def test_performance_decay_triggers_on_live_auc(tmp_path, calm_world):
    scorer = decaying_scorer(calm_world.events, calm_world.day_start(TRAIN_DAYS))
    _, _, out = _check(tmp_path, "decay", calm_world, scorer=scorer, offline_auc=0.9)
    assert out.live_auc < 0.6 and out.auc_drop > 0.25
    assert out.reason == "performance_decay" and out.should_retrain
    assert out.prediction_drift is False  # same score distribution, it just stopped ranking


@pytest.mark.slow
def test_good_champion_keeps_its_auc(tmp_path, calm_world):
    scorer = decaying_scorer(calm_world.events, calm_world.day_start(TRAIN_DAYS) + pd.Timedelta(days=30))
    _, _, out = _check(tmp_path, "good", calm_world, scorer=scorer, offline_auc=None)
    assert out.live_auc > 0.9 and out.offline_auc_source == "reference_holdout"
    assert "performance_decay" not in out.triggers and not out.should_retrain


def test_no_champion_recommends_initial_training(settings, small_world):
    from recloop.store import FeedbackStore

    store = FeedbackStore.from_settings(settings)
    store.append(small_world.events, "all")
    out = detect_drift(settings, store, None, now=small_world.day_start(14))
    assert out.status == "no_reference" and out.should_retrain and out.reason == "no_champion"
    assert out.report_path is None and out.suppressed_by == []


def test_empty_current_window_is_handled(tmp_path, calm_world):
    s, store = make_workspace(tmp_path, "empty", calm_world)
    champ = champion_for(calm_world)
    out = detect_drift(s, store, champ, now=calm_world.day_start(TRAIN_DAYS), record=True)
    assert out.status == "too_little_data" and out.n_current == 0
    assert not out.should_retrain and out.triggers == [] and out.report_path is None
    assert storm.load_state(s).pending is None  # nothing recorded


def test_empty_store(settings):
    from recloop.store import FeedbackStore

    out = detect_drift(settings, FeedbackStore.from_settings(settings), None)
    assert out.status == "empty_store" and out.suppressed_by == ["not_enough_new_data"] and not out.should_retrain


def test_large_window_is_sampled(tmp_path, drifted_world):
    _, _, out = _check(tmp_path, "sampled", drifted_world, sample_size=1_500, score_sample_size=500)
    assert out.sampled and out.n_reference > 1_500 and out.n_current > 1_500
    assert out.n_reference_sampled == 1_500 and out.n_current_sampled == 1_500
    assert out.reason == "data_drift"  # still finds the planted drift on the sample


# ---- storm control --------------------------------------------------------------------------------
# One test runs storm control behind a real data-drift verdict; the others use the cheap
# no-champion trigger (same storm rules, no Evidently run).

T0 = pd.Timestamp("2026-01-19T00:00:00Z")  # the drifted world's "now" (day 14)


def test_cooldown_suppresses_and_is_logged(tmp_path, drifted_world):
    s, store = make_workspace(tmp_path, "cool", drifted_world, cooldown_minutes=60, min_new_events=0)
    storm.mark_retrain_started(s, reason="data_drift", n_events=0, now=T0 - pd.Timedelta(minutes=30))
    storm.mark_retrain_finished(s, succeeded=True, now=T0 - pd.Timedelta(minutes=20))
    out = detect_drift(s, store, champion_for(drifted_world), now=T0, record=True)
    assert out.reason == "data_drift" and out.suppressed_by == ["cooldown"] and not out.should_retrain
    log = storm.suppressions(s)
    assert log[-1]["suppressed_by"] == ["cooldown"] and log[-1]["reason"] == "data_drift"
    assert log[-1]["report_path"] == out.report_path
    later = detect_drift(s, store, None, now=T0 + pd.Timedelta(minutes=45), record=True)
    assert later.should_retrain and later.suppressed_by == []


def test_min_new_data_suppresses(tmp_path, drifted_world):
    s, store = make_workspace(tmp_path, "mindata", drifted_world, cooldown_minutes=0, min_new_events=1_000)
    storm.mark_retrain_started(s, reason="data_drift", now=T0 - pd.Timedelta(hours=2))  # counts the store now
    storm.mark_retrain_finished(s, succeeded=True, now=T0 - pd.Timedelta(hours=1))
    out = detect_drift(s, store, None, now=T0, record=True)
    assert out.suppressed_by == ["not_enough_new_data"] and out.storm["new_events"] == 0
    assert storm.suppressions(s)[-1]["suppressed_by"] == ["not_enough_new_data"]
    more = drifted_world.events.tail(1_200).copy()  # 1,200 more events arrive: enough
    more["event_id"] = "more-" + more["event_id"].astype(str)
    store.append(more, "more")
    out2 = detect_drift(s, store, None, now=T0, record=True)
    assert out2.storm["new_events"] == 1_200 and out2.should_retrain


def test_one_pending_retrain_at_a_time(tmp_path, drifted_world):
    s, store = make_workspace(tmp_path, "pending", drifted_world, cooldown_minutes=60, min_new_events=100,
                              pending_timeout_minutes=120)
    first = detect_drift(s, store, None, now=T0, record=True)
    assert first.should_retrain
    assert storm.load_state(s).pending["status"] == "requested"
    second = detect_drift(s, store, None, now=T0 + pd.Timedelta(minutes=5), record=True)
    assert not second.should_retrain and second.suppressed_by == ["retrain_pending"]
    # the retrain flow picks it up and finishes; then the cooldown and the data minimum hold
    storm.mark_retrain_started(s, reason=first.reason, now=T0 + pd.Timedelta(minutes=6))
    assert storm.load_state(s).pending["status"] == "running"
    storm.mark_retrain_finished(s, succeeded=True, now=T0 + pd.Timedelta(minutes=30))
    third = detect_drift(s, store, None, now=T0 + pd.Timedelta(minutes=40), record=True)
    assert third.suppressed_by == ["cooldown", "not_enough_new_data"]
    assert [e["suppressed_by"] for e in storm.suppressions(s)][-2:] == [["retrain_pending"], third.suppressed_by]


def test_dead_pending_retrain_expires(tmp_path, drifted_world):
    s, store = make_workspace(tmp_path, "stale", drifted_world, min_new_events=0, pending_timeout_minutes=120)
    storm.mark_retrain_requested(s, "data_drift", now=T0 - pd.Timedelta(hours=3))
    out = detect_drift(s, store, None, now=T0, record=True)
    assert out.should_retrain and any("presumed dead" in n for n in out.notes)


def test_record_false_only_looks(tmp_path, drifted_world):
    s, store = make_workspace(tmp_path, "look", drifted_world)
    for _ in range(2):
        assert detect_drift(s, store, None, now=T0, record=False).should_retrain
    assert storm.load_state(s).pending is None and storm.suppressions(s) == []


def test_corrupt_state_file_is_a_clear_error(settings):
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    (settings.state_dir / storm.STATE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        storm.load_state(settings)


# ---- pieces ----------------------------------------------------------------------------------------

def test_feature_frame_columns_and_reference_profile(small_world):
    ev = small_world.events
    ref = ev[ev["timestamp"] < small_world.day_start(9)]
    cur = ev[ev["timestamp"] >= small_world.day_start(9)]
    profile = build_profile(ref, small_world.catalog)
    rf = build_feature_frame(ref, small_world.catalog, profile, reference=True)
    cf = build_feature_frame(cur, small_world.catalog, profile)
    assert set(FEATURES) <= set(cf.columns) and len(cf) == len(cur)
    early = (ref["timestamp"] <= profile.cut).to_numpy()
    assert rf.loc[early, "item_popularity"].isna().all() and rf.loc[~early, "item_popularity"].notna().all()
    assert set(cf["item_popularity"]) <= {"head", "torso", "tail", "unseen"}
    esports = cf["category"] == "esports"
    assert esports.any() and (cf.loc[esports, "text_novelty"] > 0.2).all()
    assert (cf.loc[esports, "item_popularity"] == "unseen").all()
    search = cf["has_query"] == "yes"
    assert (cf.loc[search, "query_tokens"] == 2).all() and (cf.loc[~search, "query_tokens"] == 0).all()
    assert cf["hour"].between(0, 23).all() and (cf["item_age_days"].dropna() >= 0).all()


def test_tokenize_and_sampling():
    assert tokenize("The Quiet Starship [science fiction]") == ["the", "quiet", "starship", "science", "fiction"]
    assert tokenize(None) == [] and tokenize(pd.NA) == []
    df = pd.DataFrame({"x": range(100)})
    a, b = sample_rows(df, 10, seed=1), sample_rows(df, 10, seed=1)
    assert len(a) == 10 and a.equals(b) and a["x"].is_monotonic_increasing
    assert sample_rows(df, 1000, seed=1) is df
    with pytest.raises(ValueError):
        sample_rows(df, 0, seed=1)


def test_champion_info_validation_and_lineage():
    with pytest.raises(ValueError, match="empty"):
        ChampionInfo(version="1", train_start="2026-01-05", train_end="2026-01-05")
    with pytest.raises(ValueError, match="outside"):
        ChampionInfo(version="1", train_start="2026-01-05", train_end="2026-01-09", holdout_start="2026-02-01")
    info = champion_from_lineage(3, {"window_start": "2026-01-05 06:00:00+00:00", "window_end": "2026-01-12",
                                     "eval_start": "2026-01-12 00:00:00+00:00",
                                     "eval_end": "2026-01-14 22:00:00+00:00"}, {"auc": 0.71})
    assert info.version == "3" and info.offline_auc == 0.71 and str(info.train_start.tz) == "UTC"
    assert info.train_end > pd.Timestamp("2026-01-14 22:00:00+00:00") and info.holdout_start.day == 12
    assert champion_from_lineage(1, {}, {}) is None
    assert ChampionInfo.from_dict(info.to_dict()) == info


def test_scorer_errors_are_clear(tmp_path, calm_world):
    s, store = make_workspace(tmp_path, "badscorer", calm_world)
    with pytest.raises(ValueError, match="scores for"):
        detect_drift(s, store, champion_for(calm_world), scorer=lambda rows: np.zeros(3), now=now_for(calm_world))


def test_outcome_markdown_mentions_decision():
    out = DriftOutcome(status="checked", should_retrain=True, reason="data_drift", triggers=["data_drift"],
                       columns=[{"column": "category", "role": "feature", "method": "jensenshannon", "score": 0.3,
                                 "threshold": 0.1, "drifted": True}])
    md = out.to_markdown()
    assert "RETRAIN" in md and "| category | feature | jensenshannon | 0.3000 | 0.1 | DRIFT |" in md


def test_cli_monitor_json(settings, small_world):
    from typer.testing import CliRunner

    from recloop.cli import app
    from recloop.store import FeedbackStore

    FeedbackStore.from_settings(settings).append(small_world.events, "all")
    res = CliRunner().invoke(app, ["monitor", "--workspace", str(settings.root), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["reason"] == "no_champion" and doc["should_retrain"] and doc["status"] == "no_reference"
    assert storm.load_state(settings).pending is None  # the CLI only looks by default
    table = CliRunner().invoke(app, ["monitor", "--workspace", str(settings.root)])
    assert table.exit_code == 0 and "drift decision" in table.output and "no_champion" in table.output
