"""Promotion gates: every rule passing and failing, no champion, ties, NaN, the paired bootstrap."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from models.evaluate import Evaluation, auc, evaluate_scores
from models.gates import GateDecision, decide_promotion, pair_scores, paired_bootstrap_auc
from recloop.settings import GateSettings, load_settings

NAN = float("nan")


def scored_frame(n=2000, signal=1.0, seed=0, labels=None, noise_seed=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n) if labels is None else labels
    noise = np.random.default_rng(noise_seed if noise_seed is not None else seed + 1).normal(size=n)
    return pd.DataFrame({"event_id": [f"e{i}" for i in range(n)], "user_id": [f"u{i % 97}" for i in range(n)],
                         "item_id": [f"i{i % 50}" for i in range(n)], "label": y, "score": signal * y + noise})


def make_eval(auc_=0.75, ndcg=0.3, gaps=None, tail=0.3, scored=None, per_group=None, per_group_n=None,
              reasons=None, k=10):
    gaps = {"gender": 0.02, "age_bucket": 0.03} if gaps is None else gaps
    if per_group is None:
        per_group = {c: {"a": 0.7, "b": 0.7 + g if math.isfinite(g) else NAN} for c, g in gaps.items()}
        per_group_n = {c: {"a": 100, "b": 100} for c in gaps}
    return Evaluation(auc=auc_, ndcg_at_k=ndcg, recall_at_k=0.4, per_group_auc=per_group, group_auc_gap=gaps,
                      cold_item_auc=0.6, tail_exposure=tail, n_events=1000, n_users=100, k=k,
                      per_group_n=per_group_n or {}, reasons=reasons or {}, scored=scored)


def rule(decision: GateDecision, name: str):
    matches = [r for r in decision.rules if r.name == name]
    assert matches, f"no rule {name}; have {[r.name for r in decision.rules]}"
    return matches[0]


G = GateSettings()
ABSOLUTE = {"min_auc", "min_ndcg_at_10", "beats_popularity", "group_auc_gap:gender", "group_auc_gap:age_bucket",
            "tail_exposure"}


def test_no_champion_runs_absolute_gates_only_and_promotes():
    d = decide_promotion(make_eval(), None, G, baseline_auc=0.6)
    assert d.promote and not d.has_champion and d.bootstrap_ci is None
    assert {r.name for r in d.rules} == ABSOLUTE
    assert d.reasons == []


def test_accepts_the_whole_settings_object(tmp_path):
    s = load_settings(tmp_path)
    assert decide_promotion(make_eval(), None, s, baseline_auc=0.6).promote


@pytest.mark.parametrize("name,eval_kw,settings_kw,baseline", [
    ("min_auc", {"auc_": 0.59}, {}, 0.5),
    ("min_ndcg_at_10", {"ndcg": 0.04}, {}, 0.6),
    ("beats_popularity", {"auc_": 0.70}, {}, 0.71),
    ("group_auc_gap:gender", {"gaps": {"gender": 0.11, "age_bucket": 0.0}}, {}, 0.6),
    ("group_auc_gap:age_bucket", {"gaps": {"gender": 0.0, "age_bucket": 0.2}}, {}, 0.6),
    ("tail_exposure", {"tail": 0.04}, {}, 0.6),
    ("min_auc", {"auc_": 0.75}, {"min_auc": 0.8}, 0.6),
])
def test_each_absolute_rule_fails_alone(name, eval_kw, settings_kw, baseline):
    d = decide_promotion(make_eval(**eval_kw), None, GateSettings(**settings_kw), baseline_auc=baseline)
    assert not d.promote
    assert [r.name for r in d.failed] == [name]
    assert d.reasons[0].startswith(name) and "misses" in d.reasons[0]


def test_ties_inclusive_thresholds_but_strict_baseline():
    d = decide_promotion(make_eval(auc_=0.60, ndcg=0.05, tail=0.05, gaps={"gender": 0.10, "age_bucket": 0.0}),
                         None, G, baseline_auc=0.55)
    assert d.promote, d.reasons  # exactly on every inclusive threshold
    d2 = decide_promotion(make_eval(auc_=0.70), None, G, baseline_auc=0.70)
    assert [r.name for r in d2.failed] == ["beats_popularity"]  # a tie does not beat the baseline


def test_nan_auc_fails_closed_with_reason():
    ev = make_eval(auc_=NAN, reasons={"auc": "one class only: 40 event(s), all negative"})
    d = decide_promotion(ev, None, G, baseline_auc=0.5)
    r = rule(d, "min_auc")
    assert not r.passed and "fails closed" in r.detail and "all negative" in r.detail
    assert not rule(d, "beats_popularity").passed


def test_nan_group_auc_fails_closed_naming_the_group():
    ev = make_eval(per_group={"gender": {"f": 0.7, "m": NAN}, "age_bucket": {"a": 0.7, "b": 0.7}},
                   per_group_n={"gender": {"f": 50, "m": 5}, "age_bucket": {"a": 50, "b": 50}},
                   gaps={"gender": NAN, "age_bucket": 0.0})
    d = decide_promotion(ev, None, G, baseline_auc=0.5)
    r = rule(d, "group_auc_gap:gender")
    assert not r.passed and "fails closed" in r.detail and "m" in r.detail
    # min_group_events leaves the 5-event group out of the gap (documented knob)
    assert decide_promotion(ev, None, GateSettings(min_group_events=10), baseline_auc=0.5).promote is False  # one group left
    assert "fewer than two groups" in rule(decide_promotion(ev, None, GateSettings(min_group_events=10), 0.5),
                                           "group_auc_gap:gender").detail


def test_unmeasured_group_column_fails_closed_and_empty_config_skips():
    ev = make_eval(gaps={"gender": 0.02}, reasons={"group:age_bucket": "users table has no column 'age_bucket'"})
    d = decide_promotion(ev, None, G, baseline_auc=0.5)
    assert [r.name for r in d.failed] == ["group_auc_gap:age_bucket"]
    assert "no column 'age_bucket'" in d.failed[0].detail
    d2 = decide_promotion(ev, None, GateSettings(group_columns=[]), baseline_auc=0.5)
    assert d2.promote and "skipped" in rule(d2, "group_auc_gap").detail


def test_missing_baseline_fails_closed_unless_not_required():
    d = decide_promotion(make_eval(), None, G)
    assert [r.name for r in d.failed] == ["beats_popularity"] and "no popularity-baseline" in d.failed[0].detail
    assert decide_promotion(make_eval(), None, GateSettings(require_baseline=False)).promote


# ---------------------------------------------------------------- against a champion
def pair(cand_signal, champ_signal, n=3000, same_noise=False, **kw):
    y = np.random.default_rng(5).integers(0, 2, n)
    cand = scored_frame(n, cand_signal, labels=y, noise_seed=11)
    champ = scored_frame(n, champ_signal, labels=y, noise_seed=11 if same_noise else 12)
    ce = make_eval(auc_=auc(y, cand["score"]), scored=cand, **kw)
    he = make_eval(auc_=auc(y, champ["score"]), scored=champ)
    return ce, he


def test_identical_candidate_is_non_inferior_but_not_superior():
    ce, he = pair(1.0, 1.0, same_noise=True)
    d = decide_promotion(ce, he, G, baseline_auc=0.5, champion_version="3")
    r = rule(d, "vs_champion_auc")
    assert d.promote and r.passed and d.bootstrap_ci.delta == 0.0 and d.champion_version == "3"
    assert d.bootstrap_ci.low == d.bootstrap_ci.high == 0.0
    assert decide_promotion(ce, he, GateSettings(rule="superior", min_improvement=0.0), 0.5).promote  # tie
    d2 = decide_promotion(ce, he, GateSettings(rule="superior", min_improvement=0.01), 0.5)
    assert [r.name for r in d2.failed] == ["vs_champion_auc"]


def test_worse_candidate_fails_vs_champion_with_ci():
    ce, he = pair(0.6, 1.2)
    d = decide_promotion(ce, he, G, baseline_auc=0.5)
    r = rule(d, "vs_champion_auc")
    assert not r.passed and "misses" in r.detail
    ci = d.bootstrap_ci
    assert ci.delta < -0.05 and ci.low < ci.delta < ci.high < 0
    assert r.champion == pytest.approx(he.auc) and r.threshold == pytest.approx(he.auc - G.max_auc_drop)


def test_delta_exactly_on_the_margin_passes():
    ce, he = pair(0.9, 1.0)
    delta = auc(ce.scored["label"], ce.scored["score"]) - auc(he.scored["label"], he.scored["score"])
    assert delta < 0
    assert rule(decide_promotion(ce, he, GateSettings(max_auc_drop=-delta), 0.5), "vs_champion_auc").passed
    assert not rule(decide_promotion(ce, he, GateSettings(max_auc_drop=-delta - 1e-4), 0.5), "vs_champion_auc").passed


def test_ci_lower_mode_is_stricter_than_point():
    ce, he = pair(1.08, 1.0)  # better by ~0.01 AUC, but the 95 % CI still reaches below 0
    point = decide_promotion(ce, he, GateSettings(rule="superior"), 0.5)
    lower = decide_promotion(ce, he, GateSettings(rule="superior", decide_on="ci_lower"), 0.5)
    assert point.bootstrap_ci.delta > 0 > point.bootstrap_ci.low
    assert rule(point, "vs_champion_auc").passed and not rule(lower, "vs_champion_auc").passed


def test_champion_not_scored_on_the_same_events_fails_closed():
    ce, he = pair(1.0, 1.0)
    he_unscored = make_eval(scored=None)
    r = rule(decide_promotion(ce, he_unscored, G, 0.5), "vs_champion_auc")
    assert not r.passed and "cannot pair" in r.detail
    he_part = make_eval(scored=he.scored.iloc[: len(he.scored) // 2])
    r2 = rule(decide_promotion(ce, he_part, G, 0.5), "vs_champion_auc")
    assert not r2.passed and "were also scored for the champion" in r2.detail


def test_pair_scores_rejects_label_disagreement():
    ce, he = pair(1.0, 1.0)
    he.scored.loc[0, "label"] = 1 - he.scored.loc[0, "label"]
    with pytest.raises(ValueError, match="disagree on labels"):
        pair_scores(ce, he)


def test_gap_vs_champion_rule():
    ce, he = pair(1.0, 1.0, same_noise=True, gaps={"gender": 0.08, "age_bucket": 0.0})
    he.per_group_auc = {"gender": {"a": 0.7, "b": 0.72}, "age_bucket": {"a": 0.7, "b": 0.7}}
    he.per_group_n = {"gender": {"a": 100, "b": 100}, "age_bucket": {"a": 100, "b": 100}}
    d = decide_promotion(ce, he, G, 0.5)
    assert rule(d, "group_auc_gap:gender").passed  # 0.08 ≤ 0.10
    r = rule(d, "gap_vs_champion:gender")
    assert not r.passed and r.champion == pytest.approx(0.02) and r.threshold == pytest.approx(0.05)
    assert [x.name for x in d.failed] == ["gap_vs_champion:gender"]


@pytest.mark.parametrize("cand,champ,passed", [
    (0.03, None, False),  # below the floor, no champion
    (0.03, 0.06, True),  # below the floor but within 0.05 of the champion's
    (0.03, 0.20, False),  # floor missed and far below the champion
    (0.15, 0.30, True),  # far below the champion but above the floor
    (NAN, 0.30, False),  # undefined fails closed
])
def test_tail_exposure_rule(cand, champ, passed):
    ce, he = pair(1.0, 1.0, same_noise=True, tail=cand)
    he.tail_exposure = NAN if champ is None else champ
    d = decide_promotion(ce, he if champ is not None else None, G, 0.5)
    assert rule(d, "tail_exposure").passed is passed


def test_markdown_and_dict():
    ce, he = pair(0.6, 1.2)
    d = decide_promotion(ce, he, G, baseline_auc=0.5, champion_version="2").with_versions(candidate_version="3")
    md = d.to_markdown()
    assert "| rule | candidate | champion | threshold | verdict |" in md
    assert "REJECT" in md and "version 3 vs champion version 2" in md and "**FAIL**" in md
    for r in d.rules:
        assert f"| {r.name} |" in md
    doc = json.loads(json.dumps(d.to_dict(), allow_nan=False))
    assert doc["promote"] is False and doc["failed_rules"] == ["vs_champion_auc"]
    assert doc["candidate_version"] == "3" and doc["champion_version"] == "2"
    assert doc["bootstrap_ci"]["low"] < doc["bootstrap_ci"]["high"]
    assert "scored" not in doc["candidate"]
    nan_doc = decide_promotion(make_eval(auc_=NAN), None, G, 0.5).to_dict()
    json.dumps(nan_doc, allow_nan=False)


def test_with_real_evaluations(small_world):
    ev = small_world.events.head(3000).reset_index(drop=True)
    rng = np.random.default_rng(0)
    good = ev.assign(score=ev["label"] * 1.0 + rng.normal(size=len(ev)))
    bad = ev.assign(score=rng.normal(size=len(ev)))
    pop = ev.groupby("item_id").size()
    kw = dict(users=small_world.users, train_items=set(ev["item_id"][:1500]), popularity=pop, k=10)
    cand, champ = evaluate_scores(good, **kw), evaluate_scores(bad, **kw)
    d = decide_promotion(cand, champ, GateSettings(max_group_auc_gap=0.5), baseline_auc=0.5)
    assert rule(d, "vs_champion_auc").passed and d.bootstrap_ci.low > 0.1
    back = decide_promotion(champ, cand, GateSettings(max_group_auc_gap=0.5), baseline_auc=0.5)
    assert not back.promote and "vs_champion_auc" in back.to_dict()["failed_rules"]


# ---------------------------------------------------------------- the bootstrap itself
def test_bootstrap_is_seeded_and_validates_input():
    y = np.r_[np.ones(50), np.zeros(50)]
    a, b = np.linspace(0, 1, 100), np.random.default_rng(1).random(100)
    assert paired_bootstrap_auc(y, a, b, 200, seed=3) == paired_bootstrap_auc(y, a, b, 200, seed=3)
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap_auc(y, a[:10], b)


def test_bootstrap_matches_naive_resampling():
    """The vectorised weighted AUC equals resampling rows explicitly and calling auc()."""
    rng = np.random.default_rng(4)
    n = 300
    y = rng.integers(0, 2, n)
    a = np.round(y + rng.normal(size=n), 1)  # ties
    b = np.round(0.5 * y + rng.normal(size=n), 1)
    ci = paired_bootstrap_auc(y, a, b, samples=400, seed=9)
    rng2 = np.random.default_rng(9)
    naive = []
    for _ in range(4):  # same draws as the first batch of the vectorised version
        draws = rng2.integers(0, n, size=(100, n))
        naive += [auc(y[d], a[d]) - auc(y[d], b[d]) for d in draws]
    lo, hi = np.quantile(naive, [0.025, 0.975])
    assert ci.low == pytest.approx(lo) and ci.high == pytest.approx(hi)


@pytest.mark.parametrize("unit", ["event", "user"])
def test_bootstrap_interval_covers_the_true_difference(unit):
    """Scores = d·label + correlated Gaussian noise, so AUC = Φ(d/√2) exactly; the 95 % CI
    of the paired difference should cover the true difference about 95 % of the time."""
    d_a, d_b, n, sims = 0.9, 0.7, 800, 160
    true = norm.cdf(d_a / math.sqrt(2)) - norm.cdf(d_b / math.sqrt(2))
    rng = np.random.default_rng(2024)
    covered = 0
    for s in range(sims):
        y = rng.integers(0, 2, n)
        z = rng.normal(size=n)
        a = d_a * y + z
        b = d_b * y + 0.6 * z + 0.8 * rng.normal(size=n)  # correlated with a (paired), unit variance
        groups = np.arange(n) if unit == "user" else None  # one event per user: same coverage
        ci = paired_bootstrap_auc(y, a, b, samples=300, seed=s, groups=groups)
        covered += ci.low <= true <= ci.high
    coverage = covered / sims
    assert 0.88 <= coverage <= 0.99, coverage


def test_baseline_margin_raises_or_lowers_the_popularity_bar():
    cand = make_eval(auc_=0.70)
    strict = decide_promotion(cand, None, GateSettings(baseline_margin=0.05), baseline_auc=0.68)
    loose = decide_promotion(cand, None, GateSettings(baseline_margin=-0.2), baseline_auc=0.68)
    assert not rule(strict, "beats_popularity").passed
    assert rule(strict, "beats_popularity").threshold == pytest.approx(0.73)
    assert rule(loose, "beats_popularity").passed
