"""Evaluation metrics against hand-computed values and degenerate cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from models.evaluate import (
    Evaluation,
    auc,
    auc_reason,
    cold_item_auc,
    evaluate_scores,
    group_auc_gap,
    head_items,
    item_popularity,
    ndcg_at_k,
    per_group_auc,
    recall_at_k,
    tail_exposure,
)

L2 = math.log2


def frame(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "label", "score"])


@pytest.fixture
def ranking():
    # u1: a(+,.9) b(-,.8) c(+,.7) d(-,.1); u2: e(-,.9) f(+,.5); u3: only negatives (skipped)
    return frame([
        ("u1", "a", 1, 0.9), ("u1", "b", 0, 0.8), ("u1", "c", 1, 0.7), ("u1", "d", 0, 0.1),
        ("u2", "e", 0, 0.9), ("u2", "f", 1, 0.5),
        ("u3", "g", 0, 0.3), ("u3", "h", 0, 0.2),
    ])


def test_auc_hand_computed_and_ties():
    # positive/negative pairs: (.9>.8) (.9>.1) (.3<.8) (.3>.1) -> 3/4
    assert auc([1, 0, 1, 0], [0.9, 0.8, 0.3, 0.1]) == pytest.approx(0.75)
    assert auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    assert auc([1, 0, 0], [0.2, 0.2, 0.1]) == pytest.approx(0.75)


def test_auc_matches_sklearn_on_random_data():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500) + 0.3 * y, 2)  # rounding makes ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s))


@pytest.mark.parametrize("labels,expected", [([0, 0, 0], "all negative"), ([1, 1], "all positive"), ([], "no events")])
def test_auc_one_class_is_nan_with_reason(labels, expected):
    assert math.isnan(auc(labels, [0.5] * len(labels)))
    assert expected in auc_reason(labels)


def test_auc_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in length"):
        auc([1, 0], [0.1])


def test_ndcg_hand_computed(ranking):
    u1_k2 = 1.0 / (1 + 1 / L2(3))  # top-2 = a(+), b(-); ideal has both positives
    u2_k2 = (1 / L2(3)) / 1.0  # positive at rank 2; ideal at rank 1
    assert ndcg_at_k(ranking, 2) == pytest.approx((u1_k2 + u2_k2) / 2)
    u1_k3 = (1 + 1 / L2(4)) / (1 + 1 / L2(3))
    assert ndcg_at_k(ranking, 3) == pytest.approx((u1_k3 + u2_k2) / 2)
    # a perfect ranking scores 1
    perfect = ranking.assign(score=ranking["label"] + 0.0)
    assert ndcg_at_k(perfect, 10) == pytest.approx(1.0)


def test_recall_hand_computed(ranking):
    assert recall_at_k(ranking, 2) == pytest.approx((1 / 2 + 1 / 1) / 2)
    assert recall_at_k(ranking, 1) == pytest.approx((1 / 2 + 0) / 2)
    assert recall_at_k(ranking, 10) == pytest.approx(1.0)


def test_ranking_metrics_skip_users_without_positive_and_nan_when_none(ranking):
    only_u3 = ranking[ranking["user_id"] == "u3"]
    assert math.isnan(ndcg_at_k(only_u3, 10))
    assert math.isnan(recall_at_k(only_u3, 10))
    # adding the negative-only user does not change the mean
    without = ranking[ranking["user_id"] != "u3"]
    assert ndcg_at_k(without, 2) == pytest.approx(ndcg_at_k(ranking, 2))


def test_ranking_ties_use_input_order():
    df = frame([("u", "x", 0, 0.5), ("u", "y", 1, 0.5)])
    assert ndcg_at_k(df, 1) == 0.0
    assert ndcg_at_k(df.iloc[::-1], 1) == 1.0


@pytest.mark.parametrize("bad,match", [
    (frame([("u", "a", 2, 0.1)]), "label must be 0/1"),
    (frame([("u", "a", 1, float("nan"))]), "NaN"),
    (pd.DataFrame({"user_id": ["u"], "label": [1], "score": [0.1]}), "item_id"),
])
def test_bad_input_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        ndcg_at_k(bad, 10)


def test_k_must_be_positive(ranking):
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(ranking, 0)


def test_per_group_auc_with_fairlearn_and_empty_and_one_class_groups(ranking):
    users = pd.DataFrame({"user_id": ["u1", "u2", "u3", "u9"], "gender": ["f", "m", "m", "x"]})
    t = per_group_auc(ranking, users, "gender").set_index("group")
    assert t.loc["f", "n"] == 4 and t.loc["f", "auc"] == pytest.approx(0.75)  # a,c vs b,d: 3 of 4 pairs
    # m: e(-,.9) f(+,.5) g(-,.3) h(-,.2): positive beats 2 of 3 negatives
    assert t.loc["m", "auc"] == pytest.approx(2 / 3) and t.loc["m", "n_pos"] == 1
    assert t.loc["x", "n"] == 0 and math.isnan(t.loc["x", "auc"]) and "no evaluation events" in t.loc["x", "reason"]
    gap, why = group_auc_gap(t.reset_index())
    assert gap == pytest.approx(0.75 - 2 / 3) and why is None  # the empty group is not part of the gap

    one_class = pd.DataFrame({"user_id": ["u1", "u2", "u3"], "gender": ["f", "f", "n"]})
    t2 = per_group_auc(ranking, one_class, "gender")
    gap2, why2 = group_auc_gap(t2)
    assert math.isnan(gap2) and "n: one class only" in why2


def test_per_group_missing_attribute_and_missing_column(ranking):
    users = pd.DataFrame({"user_id": ["u1", "u2"], "gender": ["f", None]})
    t = per_group_auc(ranking, users, "gender").set_index("group")
    assert t.loc["<missing>", "n"] == 4  # u2 (None) and u3 (absent)
    with pytest.raises(ValueError, match="no group column 'age'"):
        per_group_auc(ranking, users, "age")


def test_group_gap_min_events_and_single_group():
    t = pd.DataFrame({"group": ["a", "b", "c"], "n": [100, 100, 3], "n_pos": [50, 50, 0],
                      "auc": [0.7, 0.6, float("nan")], "reason": [None, None, "one class only"]})
    assert math.isnan(group_auc_gap(t)[0])
    assert group_auc_gap(t, min_events=10) == (pytest.approx(0.1), None)
    gap, why = group_auc_gap(t.iloc[:1])
    assert math.isnan(gap) and "fewer than two groups" in why
    missing = t.assign(group=["a", "b", "<missing>"])
    assert math.isnan(group_auc_gap(missing)[0])
    assert group_auc_gap(missing, include_missing=False) == (pytest.approx(0.1), None)


def test_cold_item_auc():
    df = frame([("u", "old", 1, 0.1), ("u", "new1", 1, 0.9), ("u", "new2", 0, 0.2), ("u", "new3", 0, 0.95)])
    assert cold_item_auc(df, ["old"]) == pytest.approx(0.5)  # new1 beats new2, loses to new3
    assert math.isnan(cold_item_auc(df, ["old", "new1", "new2", "new3"]))  # no cold items


def test_head_items_and_tail_exposure_hand_computed():
    pop = pd.Series({f"i{j}": 10 - j for j in range(10)})  # i0 most popular
    assert head_items(pop) == {"i0", "i1"}  # ceil(20 % of 10) = 2
    df = pd.DataFrame({
        "user_id": ["A", "A", "A", "B", "B"],
        "item_id": ["i0", "i5", "i1", "i9", "cold"],
        "score": [0.9, 0.8, 0.1, 0.5, 0.4],
    })
    # A's top-2 = i0 (head), i5 (tail) -> 1/2; B's top-2 = i9, cold (both tail) -> 1
    assert tail_exposure(df, pop, k=2) == pytest.approx(0.75)
    assert tail_exposure(df, pop, k=1) == pytest.approx(0.5)  # A: i0 head; B: i9 tail
    assert math.isnan(tail_exposure(df.iloc[:0], pop, 2))


def test_item_popularity():
    ev = pd.DataFrame({"item_id": ["a", "a", "b"], "label": [1, 0, 1]})
    assert item_popularity(ev).to_dict() == {"a": 2, "b": 1}
    assert item_popularity(ev, positive_only=True).to_dict() == {"a": 1, "b": 1}


def test_evaluate_scores_end_to_end_and_json(ranking):
    scored = ranking.assign(event_id=[f"e{j}" for j in range(len(ranking))])
    users = pd.DataFrame({"user_id": ["u1", "u2", "u3"], "gender": ["f", "m", "m"]})
    ev = evaluate_scores(scored, users, train_items=["a", "b", "e"], popularity={"a": 5, "b": 1},
                         k=2, group_columns=("gender", "age_bucket"))
    assert ev.auc == pytest.approx(auc(scored["label"], scored["score"]))
    assert ev.ndcg_at_k == pytest.approx(ndcg_at_k(scored, 2))
    assert ev.per_group_auc["gender"]["f"] == pytest.approx(0.75)
    assert ev.group_auc_gap["gender"] == pytest.approx(0.75 - 2 / 3)
    assert ev.max_group_auc_gap == pytest.approx(0.75 - 2 / 3)
    assert "age_bucket" not in ev.per_group_auc and "group:age_bucket" in ev.reasons
    assert ev.n_events == 8 and ev.n_users == 3 and ev.n_positive == 3 and ev.n_cold_events == 5
    assert list(ev.scored["event_id"]) == list(scored["event_id"])
    assert list(ev.scored["group:gender"]) == ["f"] * 4 + ["m"] * 4  # kept for the gates' resampling
    assert "group:age_bucket" not in ev.scored.columns and ev.ranking_scope == "logged_events"
    d = ev.to_dict()
    assert "scored" not in d and d["ranking_scope"] == "logged_events"
    json.dumps(d, allow_nan=False)  # JSON-safe
    back = Evaluation.from_dict(d)
    assert back.auc == pytest.approx(ev.auc) and back.per_group_n == ev.per_group_n
    ev.ranking_scope = "catalog"
    assert Evaluation.from_dict(ev.to_dict()).ranking_scope == "catalog"
    assert Evaluation.from_dict(ev.to_dict()).to_dict() == ev.to_dict()  # round trip


def test_evaluate_scores_missing_group_left_out_of_the_gap(ranking):
    users = pd.DataFrame({"user_id": ["u1", "u2"], "gender": ["f", "m"]})  # u3 has no attribute
    ev = evaluate_scores(ranking, users, train_items=[], popularity={}, k=2, group_columns=("gender",))
    assert list(ev.scored["group:gender"]) == ["f"] * 4 + ["m"] * 2 + ["<missing>"] * 2
    assert ev.per_group_n["gender"]["<missing>"] == 2  # reported
    assert ev.group_auc_gap["gender"] == pytest.approx(0.75 - 0.0)  # f 0.75, m 0 (e- above f+); <missing> out
    ev2 = evaluate_scores(ranking, users, train_items=[], popularity={}, k=2, group_columns=("gender",),
                          include_missing_group=True)
    assert math.isnan(ev2.group_auc_gap["gender"]) and "<missing>: one class" in ev2.reasons["group_auc_gap:gender"]


def test_evaluate_scores_degenerate_all_negative():
    scored = frame([("u", "a", 0, 0.2), ("v", "b", 0, 0.4)])
    ev = evaluate_scores(scored, None, train_items=["a", "b"], popularity={}, k=10)
    assert math.isnan(ev.auc) and "all negative" in ev.reasons["auc"]
    assert math.isnan(ev.ndcg_at_k) and "no user has a positive" in ev.reasons["ndcg_at_k"]
    assert "no cold items" in ev.reasons["cold_item_auc"]
    d = ev.to_dict()
    assert d["auc"] is None and d["cold_item_auc"] is None
    json.dumps(d, allow_nan=False)
