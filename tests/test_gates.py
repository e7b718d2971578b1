"""Promotion gates on synthetic user-clustered eval sets: which gate rejects which bad model, and why.

The world: users with their own like rate (a user effect) and a varying number of events,
items with their own appeal, and an event-level signal only a real model sees. Baselines
see part of it (statistics: the user effect; popularity: the item effect; MF: both); a good
candidate sees all of it. Every model is scored on the same events, so the gates pair them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from models.bootstrap import bootstrap_aucs, paired_bootstrap_auc
from models.evaluate import (
    MISSING_GROUP,
    Evaluation,
    auc,
    evaluate_scores,
    group_column,
)
from models.gates import GateDecision, decide_promotion, pair_scores
from recloop.settings import GateSettings, load_settings

G = GateSettings()
COLS = ("gender", "age_bucket")
BASELINES = ("statistics-lr", "popularity", "fresh-popularity", "mf")


# ---------------------------------------------------------------- the synthetic world
class World:
    def __init__(self, n_users: int = 500, seed: int = 0):
        rng = np.random.default_rng(seed)
        n_ev = rng.integers(2, 19, n_users)  # 2..18 events per user, ~5,000 in all
        gender = rng.choice(["f", "m"], n_users).astype(object)
        gender[rng.random(n_users) < 0.04] = None  # users without the attribute: "<missing>"
        age = rng.choice(["18-24", "25-34", "35-49", "50+"], n_users).astype(object)
        age[:8] = "65+"  # a tiny group (< min_group_events)
        self.users = pd.DataFrame({"user_id": [f"u{i}" for i in range(n_users)], "gender": gender, "age_bucket": age})
        uidx = np.repeat(np.arange(n_users), n_ev)
        n = uidx.size
        item = np.minimum(rng.zipf(1.3, n) - 1, 299)
        self.ue = rng.normal(0, 1.0, n_users)[uidx]  # user like rate (what statistics see)
        self.ie = rng.normal(0, 0.7, 300)[item]  # item appeal (what popularity sees)
        self.x = rng.normal(size=n)  # event-level signal (what only a real model sees)
        y = (rng.random(n) < 1 / (1 + np.exp(-(-0.5 + self.ue + self.ie + 1.2 * self.x)))).astype(int)
        self.events = pd.DataFrame({"event_id": [f"e{i}" for i in range(n)],
                                    "user_id": self.users["user_id"].to_numpy()[uidx],
                                    "item_id": [f"i{j}" for j in item], "label": y})
        for col in COLS:
            vals = pd.Series(self.users[col].to_numpy()[uidx]).fillna(MISSING_GROUP).astype(str)
            self.events[group_column(col)] = vals.to_numpy()
        self.rng = np.random.default_rng(seed + 1)
        self.n = n

    def noise(self, sd: float) -> np.ndarray:
        return self.rng.normal(0, sd, self.n)

    def good(self) -> np.ndarray:
        return self.ue + self.ie + 1.2 * self.x + self.noise(0.3)

    def baselines(self) -> dict[str, np.ndarray]:
        return {"statistics-lr": self.ue + self.noise(0.2), "popularity": self.ie + self.noise(0.1),
                "fresh-popularity": self.ie + self.noise(0.3), "mf": self.ue + self.ie + self.noise(0.5)}

    def mask(self, col: str, value: str) -> np.ndarray:
        return (self.events[group_column(col)] == value).to_numpy()


def as_eval(world: World, scores, ndcg: float = 0.2, tail: float = 0.3, scope: str = "catalog",
            events: pd.DataFrame | None = None, version: str | None = None) -> Evaluation:
    """An Evaluation as the pipeline hands it to the gates: logged-event AUC + catalog ranking metrics."""
    ev = (world.events if events is None else events).assign(score=np.asarray(scores, dtype=float)[: len(
        world.events if events is None else events)])
    y = ev["label"].to_numpy()
    return Evaluation(auc=auc(y, ev["score"]), ndcg_at_k=ndcg, recall_at_k=0.3, per_group_auc={}, group_auc_gap={},
                      cold_item_auc=float("nan"), tail_exposure=tail, n_events=len(ev),
                      n_users=ev["user_id"].nunique(), n_positive=int(y.sum()), ranking_scope=scope,
                      model_version=version, scored=ev)


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture(scope="module")
def base(world) -> dict[str, Evaluation]:
    return {name: as_eval(world, s, version=name) for name, s in world.baselines().items()}


@pytest.fixture(scope="module")
def good(world) -> Evaluation:
    return as_eval(world, world.good(), version="7")


def rule(decision: GateDecision, name: str):
    matches = [r for r in decision.rules if r.name == name]
    assert matches, f"no rule {name}; have {[r.name for r in decision.rules]}"
    return matches[0]


def failed(decision: GateDecision) -> set[str]:
    return {r.name for r in decision.failed}


# ---------------------------------------------------------------- the good candidate
def test_good_candidate_passes_everything(world, good, base):
    champ = as_eval(world, world.good(), version="6")  # an equally good champion (other noise)
    d = decide_promotion(good, champ, G, base, candidate_version="7")
    assert d.promote, d.reasons
    assert {r.name for r in d.rules} == {
        "evidence", "min_auc", "min_ndcg_at_10", "beats_baselines", "vs_champion_auc", "group_auc_gap:gender",
        "gap_vs_champion:gender", "group_auc_gap:age_bucket", "gap_vs_champion:age_bucket", "tail_exposure"}
    assert d.candidate_version == "7" and d.champion_version == "6"  # defaults to champion.model_version
    assert d.bootstrap_ci.unit == "user" and d.bootstrap_ci.n_units == 500 and d.bootstrap_ci.samples == 500
    assert set(d.baseline_cis) == set(BASELINES) and d.strongest_baseline == "mf"
    assert all(ci.low > 0.05 for ci in d.baseline_cis.values())
    assert d.group_gap_cis["gender"].low <= G.max_group_auc_gap


def test_no_champion_runs_absolute_and_baseline_rules(good, base):
    d = decide_promotion(good, None, G, base)
    assert d.promote and not d.has_champion and d.bootstrap_ci is None
    assert not any(r.name.startswith(("vs_champion", "gap_vs_champion")) for r in d.rules)


def test_accepts_the_whole_settings_object(tmp_path, good, base):
    assert decide_promotion(good, None, load_settings(tmp_path), base).promote


# ---------------------------------------------------------------- bad candidates and the gates that catch them
def test_random_scores_fail_min_auc_and_baselines(world, base):
    d = decide_promotion(as_eval(world, world.noise(1.0)), None, G, base)
    assert {"min_auc", "beats_baselines"} <= failed(d)
    assert "misses >= 0.6" in rule(d, "min_auc").detail


def test_reversed_scores_fail_min_auc(world, good, base):
    d = decide_promotion(as_eval(world, -good.scored["score"].to_numpy()), good, G, base)
    assert {"min_auc", "beats_baselines", "vs_champion_auc"} <= failed(d)
    assert rule(d, "min_auc").value < 0.25


def test_statistics_only_ranker_does_not_add_value(world, base):
    same = as_eval(world, base["statistics-lr"].scored["score"].to_numpy())  # the baseline itself
    d = decide_promotion(same, None, G, {"statistics-lr": base["statistics-lr"]})
    assert failed(d) == {"beats_baselines"}, d.reasons  # AUC ~0.69 passes the floor: only this gate knows
    r = rule(d, "beats_baselines")
    assert "does not add value over the strongest baseline, statistics-lr" in r.detail
    assert d.baseline_cis["statistics-lr"].low == d.baseline_cis["statistics-lr"].high == 0.0  # paired: exactly 0
    # a re-fit of the same statistics (other noise) fails too, against all the baselines
    refit = as_eval(world, world.ue + world.noise(0.2))
    d2 = decide_promotion(refit, None, G, base)
    assert failed(d2) == {"beats_baselines"} and d2.strongest_baseline == "mf"
    assert "strongest baseline, mf" in rule(d2, "beats_baselines").detail


def test_popularity_only_ranker_fails_baselines_and_floor(world, base):
    d = decide_promotion(as_eval(world, world.ie + world.noise(0.1)), None, G, base)
    assert {"beats_baselines", "min_auc"} == failed(d)
    assert "does not add value over the strongest baseline, mf" in rule(d, "beats_baselines").detail
    md = d.to_markdown()
    for name in BASELINES:  # every baseline with its AUC and interval
        assert f"| {name} | {d.baseline_cis[name].reference_auc:.4f} |" in md


def test_candidate_003_worse_than_the_champion_fails(world, good, base):
    worse = as_eval(world, good.scored["score"].to_numpy() + world.noise(0.65))
    d = decide_promotion(worse, good, G, base)
    ci = d.bootstrap_ci
    assert -0.045 < ci.delta < -0.02, ci.delta
    assert failed(d) == {"vs_champion_auc"}
    r = rule(d, "vs_champion_auc")
    assert r.decided_on == "ci_lower" and r.low == pytest.approx(ci.low) and r.threshold == -G.max_auc_drop
    assert "misses: lower 95% CI bound" in r.detail


def test_tiny_drop_within_margin_passes_but_not_superior(world, good, base):
    same = as_eval(world, good.scored["score"].to_numpy())
    d = decide_promotion(same, good, G, base)
    assert d.promote and d.bootstrap_ci.low == d.bootstrap_ci.high == 0.0
    assert decide_promotion(same, good, GateSettings(rule="superior", min_improvement=0.0), base).promote  # tie
    sup = decide_promotion(same, good, GateSettings(rule="superior", min_improvement=0.01), base)
    assert failed(sup) == {"vs_champion_auc"}


def test_point_mode_is_looser_than_ci_lower(world, good, base):
    slightly = as_eval(world, good.scored["score"].to_numpy() + world.noise(0.35))  # ~0.01 worse
    ci = decide_promotion(slightly, good, G, base).bootstrap_ci
    assert ci.low < ci.delta < 0
    margin = -(ci.low + ci.delta) / 2  # between the two: the point estimate clears it, the lower bound does not
    lower = decide_promotion(slightly, good, GateSettings(max_auc_drop=margin), base)
    point = decide_promotion(slightly, good, GateSettings(max_auc_drop=margin, decide_on="point"), base)
    assert rule(point, "vs_champion_auc").passed and not rule(lower, "vs_champion_auc").passed
    assert rule(point, "vs_champion_auc").decided_on == "point"


def test_big_group_gap_on_enough_events_fails(world, good, base):
    s = good.scored["score"].to_numpy().copy()
    f = world.mask("gender", "f")
    s[f] = world.noise(1.0)[f] * s.std()  # useless for women
    d = decide_promotion(as_eval(world, s), good, G, base)
    assert {"group_auc_gap:gender", "gap_vs_champion:gender"} <= failed(d)
    gap = d.group_gap_cis["gender"]
    assert gap.low > G.max_group_auc_gap and gap.estimate > 0.2
    assert d.gap_vs_champion_cis["gender"].low > G.max_gap_increase
    assert rule(d, "group_auc_gap:age_bucket").passed  # unaffected
    stats = {st.group: st for st in d.group_stats["gender"]}
    assert stats["f"].gated and stats["f"].high < stats["m"].low


def test_big_gap_on_a_tiny_group_is_reported_not_gated(world, good, base):
    s = good.scored["score"].to_numpy().copy()
    tiny = world.mask("age_bucket", "65+")
    assert 0 < tiny.sum() < G.min_group_events
    s[tiny] = -s[tiny]  # reversed for the tiny group
    d = decide_promotion(as_eval(world, s), None, G, base)
    assert d.promote, d.reasons
    st = {x.group: x for x in d.group_stats["age_bucket"]}["65+"]
    assert not st.gated and st.auc < 0.3 and "min_group_events" in st.note
    assert "reported, not gated: 65+" in rule(d, "group_auc_gap:age_bucket").detail
    assert "| 65+ |" in d.to_markdown()
    # with a lower min_group_events it is gated, and fails
    d2 = decide_promotion(as_eval(world, s), None, GateSettings(min_group_events=20), base)
    assert "group_auc_gap:age_bucket" in failed(d2)


def test_missing_group_is_left_out_unless_included(world, good, base):
    s = good.scored["score"].to_numpy().copy()
    miss = world.mask("gender", MISSING_GROUP)
    s[miss] = world.noise(1.0)[miss]
    loose = {"min_group_events": 50}
    d = decide_promotion(as_eval(world, s), None, GateSettings(**loose), base)
    assert rule(d, "group_auc_gap:gender").passed
    assert "<missing> (users without this attribute" in rule(d, "group_auc_gap:gender").detail
    d2 = decide_promotion(as_eval(world, s), None, GateSettings(include_missing_group=True, **loose), base)
    assert "group_auc_gap:gender" in failed(d2)


def test_fewer_than_two_gated_groups_is_not_gated(world, good, base):
    d = decide_promotion(good, None, GateSettings(min_group_events=100_000), base)
    r = rule(d, "group_auc_gap:gender")
    assert r.passed and "not gated: fewer than two groups" in r.detail
    assert len(d.group_stats["gender"]) == 3 and "gender" not in d.group_gap_cis  # still reported


def test_unmeasured_group_column_fails_closed_and_empty_config_skips(world, good, base):
    no_age = as_eval(world, good.scored["score"], events=world.events.drop(columns=group_column("age_bucket")))
    no_age.reasons["group:age_bucket"] = "users table has no column 'age_bucket'"
    d = decide_promotion(no_age, None, G, base)
    assert failed(d) == {"group_auc_gap:age_bucket"} and "no column 'age_bucket'" in d.failed[0].detail
    d2 = decide_promotion(no_age, None, GateSettings(group_columns=[]), base)
    assert d2.promote and "skipped" in rule(d2, "group_auc_gap").detail


def test_insufficient_evidence(world, base):
    small = world.events.iloc[:600]  # 600 events < min_eval_events
    cand = as_eval(world, world.good(), events=small)
    bases = {k: as_eval(world, v.scored["score"], events=small) for k, v in base.items()}
    d = decide_promotion(cand, None, G, bases)
    assert not d.promote and d.insufficient_evidence
    assert d.reasons[0].startswith("insufficient evidence:") and "600 eval events < 1,000" in d.reasons[0]
    assert len(d.rules) > 5 and rule(d, "min_auc").passed  # every other rule is still computed and shown
    assert "insufficient evidence" in d.to_markdown() and d.to_dict()["insufficient_evidence"] is True
    few_pos = GateSettings(min_eval_events=100, min_eval_positives=10_000)
    assert "positives" in decide_promotion(cand, None, few_pos, bases).reasons[0]


@pytest.mark.parametrize("name", ["min_ndcg_at_10", "tail_exposure"])
def test_logged_events_ranking_scope_fails_closed(world, base, name):
    d = decide_promotion(as_eval(world, world.good(), scope="logged_events"), None, G, base)
    assert failed(d) == {"min_ndcg_at_10", "tail_exposure"}
    assert "cannot fail" in rule(d, name).detail and "ranking_scope = 'catalog'" in rule(d, name).detail


@pytest.mark.parametrize("cand,champ,passed", [
    (0.04, None, False),  # below the floor
    (0.04, 0.06, False),  # below the floor; being near the champion does not help (no ratchet)
    (0.06, 0.50, True),  # far below the champion but above the floor: absolute only
    (0.05, None, True),  # exactly on the floor
    (float("nan"), 0.30, False),  # undefined fails closed
])
def test_tail_exposure_is_an_absolute_floor(world, good, base, cand, champ, passed):
    c = as_eval(world, good.scored["score"], tail=cand)
    h = None if champ is None else as_eval(world, good.scored["score"], tail=champ)
    assert rule(decide_promotion(c, h, G, base), "tail_exposure").passed is passed


def test_ndcg_floor(world, good, base):
    d = decide_promotion(as_eval(world, good.scored["score"], ndcg=0.04), None, G, base)
    assert failed(d) == {"min_ndcg_at_10"}


# ---------------------------------------------------------------- fail closed
def test_missing_baselines_fail_closed_unless_not_required(good, base):
    d = decide_promotion(good, None, G)
    assert failed(d) == {"beats_baselines"} and "no baseline evaluation" in rule(d, "beats_baselines").detail
    assert decide_promotion(good, None, GateSettings(require_baseline=False)).promote


def test_unpairable_models_fail_closed(world, good, base):
    he_unscored = as_eval(world, world.good())
    he_unscored.scored = None
    r = rule(decide_promotion(good, he_unscored, G, base), "vs_champion_auc")
    assert not r.passed and "cannot pair" in r.detail
    half = as_eval(world, world.good(), events=world.events.iloc[: world.n // 2])
    r2 = rule(decide_promotion(good, half, G, base), "vs_champion_auc")
    assert not r2.passed and "were also scored for it" in r2.detail
    d3 = decide_promotion(good, None, G, {**base, "mf": half})
    assert failed(d3) == {"beats_baselines"} and "mf:" in rule(d3, "beats_baselines").detail


def test_label_disagreement_fails_closed(world, good, base):
    flipped = world.events.assign(label=1 - world.events["label"])
    champ = as_eval(world, world.good(), events=flipped)
    assert "disagrees" in rule(decide_promotion(good, champ, G, base), "vs_champion_auc").detail
    with pytest.raises(ValueError, match="disagree on labels"):
        pair_scores(good, champ)


def test_nan_auc_fails_closed(world, base):
    one_class = world.events.assign(label=0)
    ev = as_eval(world, world.good(), events=one_class)
    ev.reasons["auc"] = "one class only"
    d = decide_promotion(ev, None, G, {})
    assert {"evidence", "min_auc"} <= failed(d)
    assert "fails closed" in rule(d, "min_auc").detail and "one class only" in rule(d, "min_auc").detail


# ---------------------------------------------------------------- reports
def test_markdown_and_dict(world, good, base):
    worse = as_eval(world, good.scored["score"].to_numpy() + world.noise(1.0))
    d = decide_promotion(worse, good, G, base, candidate_version="8", champion_version="7")
    md = d.to_markdown()
    assert "REJECT" in md and "version 8 vs champion version 7" in md and "**FAIL**" in md
    assert "| rule | candidate | champion | interval | threshold | decided on | verdict | reason |" in md
    for r in d.rules:
        assert f"| {r.name} |" in md
    assert f"[{d.bootstrap_ci.low:.4f}, {d.bootstrap_ci.high:.4f}]" in md  # the champion rule's interval
    assert "### Groups by gender" in md and "Gap (max − min AUC over gated groups)" in md
    assert "### Baselines" in md and "strongest" in md
    doc = json.loads(json.dumps(d.to_dict(), allow_nan=False))
    assert doc["promote"] is False and doc["failed_rules"] == ["vs_champion_auc"]
    assert doc["candidate_version"] == "8" and doc["champion_version"] == "7"
    assert set(doc["baseline_cis"]) == set(BASELINES) and doc["baseline_cis"]["mf"]["low"] > 0
    assert doc["group_gap_cis"]["gender"]["low"] is not None and len(doc["group_stats"]["age_bucket"]) == 5
    assert "scored" not in doc["candidate"]
    json.dumps(decide_promotion(as_eval(world, world.good(), tail=float("nan")), None, G, {}).to_dict(),
               allow_nan=False)


def test_with_real_evaluations(world):
    """evaluate_scores keeps the group columns the gates resample."""
    pop = world.events.groupby("item_id").size()
    ev = world.events.drop(columns=[group_column(c) for c in COLS])
    kw = {"users": world.users, "train_items": set(pop.index), "popularity": pop, "k": 10}
    cand = evaluate_scores(ev.assign(score=world.good()), **kw)
    champ = evaluate_scores(ev.assign(score=world.noise(1.0)), **kw)
    for e in (cand, champ):
        e.ranking_scope, e.ndcg_at_k, e.tail_exposure = "catalog", 0.2, 0.3
    d = decide_promotion(cand, champ, GateSettings(require_baseline=False))
    assert d.promote, d.reasons
    assert d.group_stats["gender"][1].auc == pytest.approx(cand.per_group_auc["gender"]["f"])  # MetricFrame agrees
    back = decide_promotion(champ, cand, GateSettings(require_baseline=False))
    assert {"min_auc", "vs_champion_auc"} <= failed(back)


# ---------------------------------------------------------------- the bootstrap itself
def test_bootstrap_is_seeded_and_validates_input():
    y = np.r_[np.ones(50), np.zeros(50)]
    a, b = np.linspace(0, 1, 100), np.random.default_rng(1).random(100)
    assert paired_bootstrap_auc(y, a, b, 200, seed=3) == paired_bootstrap_auc(y, a, b, 200, seed=3)
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap_auc(y, a[:10], b)


@pytest.mark.parametrize("clustered", [False, True])
def test_bootstrap_matches_naive_resampling(clustered):
    """The vectorised weighted AUC equals resampling rows (or whole users) explicitly and calling auc()."""
    rng = np.random.default_rng(4)
    n = 300
    y = rng.integers(0, 2, n)
    a = np.round(y + rng.normal(size=n), 1)  # ties
    b = np.round(0.5 * y + rng.normal(size=n), 1)
    users = rng.integers(0, 60, n) if clustered else None
    ci = paired_bootstrap_auc(y, a, b, samples=200, seed=9, groups=users, batch=100)
    codes, n_units = (pd.factorize(pd.Series(users))[0], len(set(users))) if clustered else (np.arange(n), n)
    rng2 = np.random.default_rng(9)
    naive = []
    for _ in range(2):
        for draw in rng2.integers(0, n_units, size=(100, n_units)):
            idx = np.concatenate([np.flatnonzero(codes == u) for u in draw])
            naive.append(auc(y[idx], a[idx]) - auc(y[idx], b[idx]))
    lo, hi = np.quantile(naive, [0.025, 0.975])
    assert ci.low == pytest.approx(lo) and ci.high == pytest.approx(hi)


def test_shared_resamples_give_consistent_intervals():
    """All targets see the same resamples: a difference computed by hand from the draws is the CI's."""
    rng = np.random.default_rng(1)
    n = 2000
    y = rng.integers(0, 2, n)
    s = {"a": y + rng.normal(size=n), "b": 0.8 * y + rng.normal(size=n), "c": rng.normal(size=n)}
    half = np.arange(n) < n // 2
    d = bootstrap_aucs(y, {**{k: (v, None) for k, v in s.items()}, "a_half": (s["a"], half)},
                       units=rng.integers(0, 200, n), samples=200, seed=0)
    assert d.unit == "user" and d.n_units == 200
    ci = d.delta_ci("a", "b", 0.9, "a − b")
    assert ci.low == pytest.approx(np.quantile(d.draws["a"] - d.draws["b"], 0.05))
    assert d.point["a_half"] == pytest.approx(auc(y[half], s["a"][half]))
    assert not np.allclose(d.draws["a"], d.draws["a_half"])


@pytest.mark.parametrize("unit", ["event", "user"])
def test_bootstrap_interval_covers_the_true_difference(unit):
    """Scores = d·label + correlated Gaussian noise, so AUC = Φ(d/√2) exactly; the 95 % CI
    of the paired difference should cover the true difference about 95 % of the time."""
    d_a, d_b, n, sims = 0.9, 0.7, 800, 100
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
    assert 0.87 <= coverage <= 0.99, coverage
