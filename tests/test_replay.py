"""Replay: policy decisions, reports, sources (fast); the acceptance run lives in test_replay_slow.py."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from replay.report import summarize, to_markdown, write_reports
from replay.runner import ReplayConfig, movielens_source, should_retrain, synthetic_source


@pytest.mark.parametrize("policy,done,monitor,expected", [
    ("never", 3, None, (False, "")),
    ("never", 4, None, (True, "initial")),
    ("never", 5, {"should_retrain": True, "reason": "data_drift"}, (False, "")),
    ("never", 5, None, (False, "")),
    ("periodic", 3, None, (False, "")),
    ("periodic", 5, None, (True, "periodic(every 1)")),
    ("drift", 5, {"should_retrain": False}, (False, "")),
    ("drift", 5, {"should_retrain": True, "reason": "data_drift"}, (True, "data_drift")),
    ("drift", 2, {"should_retrain": True, "reason": "data_drift"}, (False, "")),
])
def test_policy_decisions(policy, done, monitor, expected):
    assert should_retrain(policy, done, ReplayConfig(initial_periods=4), monitor) == expected


@pytest.mark.parametrize("policy,done,expected", [
    ("never", 3, (False, "")),  # before the initial periods nothing trains, champion or not
    ("never", 4, (True, "initial")),
    ("never", 5, (True, "no_champion")),  # its first candidate was rejected: it tries again
    ("never", 9, (True, "no_champion")),
    ("drift", 5, (False, "")),  # the drift policy leaves that to its monitor (which says "no champion")
])
def test_never_keeps_trying_until_a_first_model_is_deployed(policy, done, expected):
    assert should_retrain(policy, done, ReplayConfig(initial_periods=4), None, has_champion=False) == expected


def test_periodic_every_n():
    cfg = ReplayConfig(initial_periods=2, every=3)
    fired = [d for d in range(1, 12) if should_retrain("periodic", d, cfg, None)[0]]
    assert fired == [2, 5, 8, 11]


def _records(aucs, retrain_at=(), promoted_at=(), start="2026-01-05"):
    days = pd.date_range(start, periods=len(aucs), freq="D", tz="UTC")
    return [{"batch": i, "batch_start": str(d), "auc": a, "ndcg_at_k": None if a is None else a / 2,
             "retrained": i in retrain_at, "promoted": i in promoted_at, "train_seconds": 2.0 if i in retrain_at
             else None} for i, (d, a) in enumerate(zip(days, aucs))]


def test_summary_numbers_and_markdown():
    recs = _records([None, 0.6, 0.7, 0.5, 0.8, 0.9], retrain_at=(0, 3), promoted_at=(0,))
    row = summarize("drift", recs, drift_at=str(pd.Timestamp("2026-01-08", tz="UTC")))
    assert row["mean_auc"] == pytest.approx(0.7)
    assert row["mean_auc_after_drift"] == pytest.approx((0.5 + 0.8 + 0.9) / 3)
    assert row["worst_batch_auc"] == 0.5 and row["auc_last_third"] == pytest.approx(0.85)
    assert (row["retrains"], row["promotions"], row["rejected"], row["train_seconds"]) == (2, 1, 1, 4.0)
    md = to_markdown([row])
    assert md.splitlines()[2].startswith("| drift | 0.700 | 0.733 |")


def test_reports_are_written(tmp_path):
    results = {"never": _records([None, 0.6, 0.6], retrain_at=(0,), promoted_at=(0,)),
               "drift": _records([None, 0.6, 0.7], retrain_at=(0, 1), promoted_at=(0, 1))}
    out = write_reports(tmp_path, results, {"source": "test", "drift_at": None})
    doc = json.loads((tmp_path / "replay.json").read_text())
    assert set(doc["batches"]) == {"never", "drift"} and len(doc["summary"]) == 2
    png = (tmp_path / "auc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "| never |" in (tmp_path / "summary.md").read_text() and out["plot"].endswith("auc.png")


def write_movielens(world, folder):
    """A MovieLens-100k-format folder made from a synthetic world (ratings 1-5 from labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = {iid: k + 1 for k, iid in enumerate(world.catalog["item_id"])}
    users = {uid: k + 1 for k, uid in enumerate(world.users["user_id"])}
    ev = world.events
    rating = ev["label"].map({1: 5, 0: 2})
    ts = (ev["timestamp"].astype("int64") // 10**9).astype(int)
    pd.DataFrame({"u": ev["user_id"].map(users), "i": ev["item_id"].map(items), "r": rating, "t": ts}).to_csv(
        folder / "u.data", sep="\t", header=False, index=False)
    genres = ["0"] * 19
    with open(folder / "u.item", "w", encoding="latin-1") as fh:
        for iid, title, cat in zip(world.catalog["item_id"], world.catalog["title"], world.catalog["category"]):
            g = genres.copy()
            g[1 + abs(hash(cat)) % 18] = "1"
            fh.write("|".join([str(items[iid]), title, "01-Jan-1995", "", "http://x"] + g) + "\n")
    with open(folder / "u.user", "w") as fh:
        fh.writelines(f"{users[uid]}|{ {'18-24': 20, '25-34': 30, '35-49': 40, '50+': 60}[age]}|"
                     f"{'F' if gender == 'female' else 'M'}|writer|00000\n" for uid, gender, age in zip(world.users["user_id"], world.users["gender"], world.users["age_bucket"]))
    return folder


def test_movielens_format_source_batches_in_time_order(tmp_path, small_world):
    src = movielens_source(write_movielens(small_world, tmp_path / "ml"), period_days=3)
    starts = [s for s, _ in src.batches]
    assert starts == sorted(starts) and len(src.batches) == 5
    assert sum(len(b) for _, b in src.batches) == len(small_world.events)
    assert set(src.catalog["item_id"]).issuperset(set(pd.concat([b for _, b in src.batches])["item_id"]))


def test_synthetic_source_has_the_drift_point():
    from recloop.datasets.synthetic import SyntheticConfig

    src = synthetic_source(SyntheticConfig(seed=2, n_users=40, n_items=30, n_days=6, drift_day=4, drift_items=6))
    assert len(src.batches) == 6 and src.drift_at == src.batches[4][0]


def test_storm_control_in_periods_of_data():
    from replay.runner import ReplaySource, replay_overrides

    batches = [(pd.Timestamp("2026-01-01", tz="UTC"), pd.DataFrame({"x": range(n)})) for n in (100, 300, 200)]
    src = ReplaySource("t", batches, pd.DataFrame(), pd.DataFrame())
    assert replay_overrides(src, ReplayConfig())["monitor"] == {"min_new_events": 400, "cooldown_minutes": 0}
    given = ReplayConfig(settings_overrides={"monitor": {"min_new_events": 7}, "retrain": {"eval_days": 1.0}})
    out = replay_overrides(src, given)
    assert out == {"monitor": {"min_new_events": 7, "cooldown_minutes": 0}, "retrain": {"eval_days": 1.0}}
    assert given.settings_overrides["monitor"] == {"min_new_events": 7}  # the caller's dict is not mutated


def test_policy_workspace_carries_the_overrides_for_the_flows(tmp_path):
    """The flows load settings from the workspace alone, so overrides must be in its recloop.toml."""
    from recloop.settings import load_settings
    from replay.runner import PolicyRun, ReplaySource

    batches = [(pd.Timestamp("2026-01-01", tz="UTC"), pd.DataFrame({"x": range(10)}))]
    src = ReplaySource("t", batches, pd.DataFrame(), pd.DataFrame())
    cfg = ReplayConfig(settings_overrides={"model_name": "recs", "retrain": {"eval_days": 1.5},
                                           "gates": {"group_columns": ["gender"]}})
    PolicyRun("drift", src, tmp_path, cfg)
    s = load_settings(tmp_path / "drift")  # what a flow sees
    assert s.model_name == "recs" and s.retrain.eval_days == 1.5 and s.gates.group_columns == ["gender"]
    assert s.monitor.cooldown_minutes == 0 and s.monitor.min_new_events == 20


def test_baselines_are_scored_per_batch_and_compared_on_the_champions_batches(settings, small_world, tmp_path):
    from models.evaluate import auc
    from replay.report import baseline_rows
    from replay.runner import baseline_aucs

    ev = small_world.events.sort_values("timestamp").reset_index(drop=True)
    cut = ev["timestamp"].iloc[int(len(ev) * 0.8)]
    history, batch = ev[ev["timestamp"] < cut], ev[ev["timestamp"] >= cut]
    aucs = baseline_aucs(settings, batch, history, small_world.catalog, out=tmp_path / "b.parquet")
    assert set(aucs) == {"statistics-lr", "fresh-popularity", "most-popular", "popularity", "mf"}
    kept = pd.read_parquet(tmp_path / "b.parquet")  # the per-event scores behind each AUC
    assert len(kept) == len(batch) and all(auc(kept["label"], kept[n]) == pytest.approx(a) for n, a in aucs.items())
    assert aucs["statistics-lr"] > 0.55  # the statistics carry signal on this world: a real, fitted baseline
    assert baseline_aucs(settings, batch, history.iloc[0:0], small_world.catalog) == {}  # nothing to fit on yet

    recs = _records([None, 0.6, 0.7], retrain_at=(0,), promoted_at=(0,))
    for r, b in zip(recs, ({"statistics-lr": 0.9}, {"statistics-lr": 0.8, "mf": 0.5}, {"statistics-lr": 0.6})):
        r["baselines"] = b
    row = summarize("never", recs)
    assert row["best_baseline"] == "statistics-lr" and row["best_baseline_auc"] == pytest.approx(0.7)  # batches 1, 2
    assert baseline_rows({"never": recs})[1]["mean_auc"] == pytest.approx((0.9 + 0.8 + 0.6) / 3)


def test_plot_names_its_markers_in_a_legend_clear_of_the_title_over_dates():
    """The report's own title must not hide what ▲ / × / ! mean: the legend names every marker, sits
    clear of the title, and the x-axis shows the batches' dates, not their numbers."""
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    from replay.report import draw

    recs = _records([None, 0.6, 0.7, 0.5, 0.8], retrain_at=(0, 2, 3), promoted_at=(0, 3))
    recs[3]["retrain_error"] = "too few events"
    never = _records([None, 0.6, 0.6, 0.5, 0.5], retrain_at=(0,), promoted_at=(0,))
    fig = draw({"drift": recs, "never": never}, drift_at=recs[2]["batch_start"],
               title="replay on synthetic: AUC per batch")
    try:
        ax = fig.axes[0]
        legend = ax.get_legend()
        labels = [t.get_text() for t in legend.get_texts()]
        assert {"drift", "never", "promotion", "rejected candidate", "failed retrain"} <= set(labels)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        assert not legend.get_window_extent(renderer).overlaps(ax.title.get_window_extent(renderer))
        assert isinstance(ax.xaxis.get_major_formatter(), mdates.ConciseDateFormatter)
        xs = mdates.num2date(ax.lines[0].get_xdata(orig=False))
        assert [x.strftime("%Y-%m-%d") for x in xs] == ["2026-01-06", "2026-01-07", "2026-01-08",
                                                        "2026-01-09"]
    finally:
        plt.close(fig)


def test_summary_weighs_the_newest_events_and_reports_disk():
    """AUC over the newest 20 % of events is event-weighted; a batch served by no champion counts as 0.5."""
    from replay.report import summarize

    recs = [{"batch": k, "batch_start": f"2026-01-0{k + 1}", "n_rows": n, "auc": a, "disk_mb": d}
            for k, (n, a, d) in enumerate([(800, 0.9, 10.0), (100, 0.7, 30.0), (100, None, 20.0)])]
    out = summarize("periodic", recs)
    assert out["auc_last_20pct_events"] == (100 * 0.5 + 100 * 0.7) / 200
    assert out["disk_mb_max"] == 30.0
    assert summarize("never", [])["auc_last_20pct_events"] is None


def test_pooled_auc_ranks_events_of_different_batches_against_each_other(tmp_path):
    """Two batches each ranked perfectly on their own (mean batch AUC 1.0) but on different scales: pooled, the
    second batch's negative outranks the first one's positive (3 of 4 pairs right). A batch no champion scored
    ties at 0.5; a missing score file gives no pooled AUC rather than a wrong one."""
    from recloop.store import atomic_write_parquet
    from replay.report import baseline_rows, pooled_auc, pooled_baseline_aucs

    def put(folder, i, labels, **cols):
        atomic_write_parquet(pd.DataFrame({"label": labels, **cols}), tmp_path / folder / f"batch-{i:04d}.parquet")

    put("drift/scores", 1, [0, 1], score=[0.1, 0.2])
    put("drift/scores", 2, [0, 1], score=[0.8, 0.9])
    for i, s in ((0, [0.3, 0.4]), (1, [0.1, 0.9]), (2, [0.9, 0.1])):
        put("baseline_scores", i, [0, 1], mf=s, **({"popularity": [0.5, 0.6]} if i else {}))
    recs = [{"batch": i, "batch_start": f"2026-01-0{i + 1}", "n_rows": 2, "auc": a, "baselines": {"mf": 0.5}}
            for i, a in enumerate([None, 1.0, 1.0])]
    assert pooled_auc(tmp_path, "drift", recs[1:], 1.0) == pytest.approx(0.75)
    # the summary pools over the batches that hold the newest 20 % of events (here: the last one)
    row = summarize("drift", recs, scores_root=tmp_path)
    assert row["auc_last_20pct_events"] == 1.0 and row["pooled_auc_last_20pct_events"] == 1.0
    # batch 0 had no champion: its two events score 0.5 (pairs right: 1.5 + 1 + 3 of 9)
    assert pooled_auc(tmp_path, "drift", recs, 1.0) == pytest.approx(5.5 / 9)
    assert pooled_baseline_aucs(tmp_path, recs[1:], 1.0) == {"mf": pytest.approx(0.5), "popularity": pytest.approx(1.0)}
    # popularity could not score batch 0, so it has no pooled AUC over all three; mf has
    assert pooled_baseline_aucs(tmp_path, recs, 1.0) == {"mf": pytest.approx(5 / 9)}
    assert baseline_rows({"drift": recs}, scores_root=tmp_path)[0]["pooled_auc_last_20pct_events"] == 0.0  # mf, batch 2
    (tmp_path / "drift/scores/batch-0002.parquet").unlink()
    assert pooled_auc(tmp_path, "drift", recs, 1.0) is None
    (tmp_path / "baseline_scores/batch-0001.parquet").unlink()
    assert pooled_baseline_aucs(tmp_path, recs, 1.0) == {}


# ---- policies in parallel processes ---------------------------------------------------------------------------
def test_policies_are_spread_over_workers_costliest_first():
    from replay.runner import worker_groups

    assert worker_groups(("never", "periodic", "drift"), 2) == [("periodic",), ("never", "drift")]
    assert worker_groups(("never", "periodic", "drift"), 3) == [("periodic",), ("drift",), ("never",)]
    assert worker_groups(("never", "drift"), 8) == [("drift",), ("never",)]
    assert worker_groups(("never", "periodic", "drift"), 1) == [("never", "periodic", "drift")]
    assert ReplayConfig(policies=("drift",), workers=4).n_workers() == 1
    assert ReplayConfig(workers=0).n_workers() == 1 and ReplayConfig(workers=2).n_workers() == 2
    assert ReplayConfig(workers=1).n_workers() == 1  # one process even on a many-core machine


def test_baseline_cache_is_shared_through_its_file(tmp_path):
    from replay.runner import BaselineCache

    a, b = BaselineCache(tmp_path / "b.json"), BaselineCache(tmp_path / "b.json")  # two workers' views
    calls = []
    assert a.get(0, lambda: calls.append("a") or {"mf": 0.7}) == {"mf": 0.7}
    # b was opened before a wrote batch 0: it re-reads the file under the lock instead of computing again
    assert b.get(0, lambda: calls.append("b") or {"mf": 0.1}) == {"mf": 0.7}
    assert b.get(1, lambda: calls.append("b") or {"mf": 0.6}) == {"mf": 0.6}
    assert calls == ["a", "b"] and json.loads((tmp_path / "b.json").read_text()) == {"0": {"mf": 0.7},
                                                                                     "1": {"mf": 0.6}}


def test_worker_environment_is_set_only_around_the_spawn(monkeypatch, tmp_path):
    import os

    from replay.runner import _environ, _worker_env

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    env = _worker_env(tmp_path, ("drift", "never"), 1)
    assert env["PREFECT_HOME"] == str(tmp_path / "drift" / "prefect-replay") and env["OMP_NUM_THREADS"] == "1"
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].endswith("drift/prefect-replay/prefect.db")
    with _environ(env):
        assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["MKL_NUM_THREADS"] == "1"
    assert os.environ["OMP_NUM_THREADS"] == "7" and "MKL_NUM_THREADS" not in os.environ
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")  # a shared server: no own home
    assert "PREFECT_HOME" not in _worker_env(tmp_path, ("drift",), 1)


def test_a_batch_is_scored_with_features_as_fresh_as_the_lag_allows(tmp_path, monkeypatch):
    """The champion of before the batch scores it with the store as it stands once the batch is ingested (a row
    at t sees the batch's own events older than t - lag: point-in-time inside ``score``), the baselines are
    fitted on the store before the batch and score with the same history. Tiny fakes for the ingest flow, the
    model and the baselines (the real ones: tests/test_replay_workers.py, tests/test_feature_lag.py)."""
    import flows.ingest
    import models.baselines
    from recloop.store import FeedbackStore
    from replay.runner import PolicyRun, synthetic_source
    from tests.conftest import small_world_config

    src = synthetic_source(small_world_config(n_days=3, drift_day=None, bad_batch_day=None))
    run = PolicyRun("never", src, tmp_path, ReplayConfig(policies=("never",), initial_periods=10, max_batches=2))
    store = FeedbackStore.from_settings(run.settings)

    def fake_ingest(workspace=None):
        for f in sorted(run.settings.landing_dir.glob("*.parquet")):
            store.append(pd.read_parquet(f), batch_id=f.name)
            f.unlink()
        return {"outcomes": [{"status": "ingested", "n_new": 1}]}

    seen: dict[str, list] = {"model": [], "fit": [], "score": []}

    class Model:
        def score(self, pairs, history, catalog, lag=None):
            seen["model"].append(set(history["event_id"]))
            return np.linspace(0, 1, len(pairs))

    class Baseline:
        def fit(self, train, history, catalog):
            seen["fit"].append(set(train["event_id"]))
            return self

        def score(self, rows, history, catalog):
            seen["score"].append(set(history["event_id"]))
            return np.linspace(0, 1, len(rows))

    monkeypatch.setattr(flows.ingest, "ingest_flow", fake_ingest)
    monkeypatch.setattr(models.baselines, "make_baselines", lambda settings: {"fake": Baseline()})
    monkeypatch.setattr(run, "_champion_model", lambda: ("1", Model(), {}))
    run.run()
    first, second = (set(b["event_id"]) for _, b in src.batches[:2])
    assert seen["model"] == [first, first | second]  # each batch's own events are in the history it is scored with
    assert seen["fit"] == [first]  # batch 0 had nothing stored before it: no baseline; batch 1's fit without it
    assert seen["score"] == [first | second]
    assert (run.scores_dir / "batch-0001.parquet").exists()


def test_a_never_policy_whose_first_candidate_is_rejected_trains_again_then_stops(tmp_path, monkeypatch):
    """Through ``PolicyRun`` (real ingest flow; the retrain flow replaced by a stand-in whose first candidate
    the gates reject and whose second they promote): never retries while nothing is deployed, then stops."""
    import replay.runner as runner_mod
    from tests.conftest import small_world_config

    deployed: list[str] = []
    decisions = iter([False, True])

    def fake_retrain(settings, reason):
        promoted = next(decisions, True)
        if promoted:
            deployed.append("1")
        return {"retrained": True, "promoted": promoted, "reason": reason}

    monkeypatch.setattr(runner_mod, "_retrain", fake_retrain)
    monkeypatch.setattr(runner_mod.PolicyRun, "_champion_model",
                        lambda self: (deployed[-1], None, None) if deployed else (None, None, None))
    src = synthetic_source(small_world_config(n_days=3, drift_day=None))
    cfg = ReplayConfig(policies=("never",), initial_periods=1, max_batches=3, workers=1,
                       settings_overrides={"checks": {"data_docs": False}})
    recs = runner_mod.PolicyRun("never", src, tmp_path, cfg).run()
    assert [r.get("reason") for r in recs] == ["initial", "no_champion", None]
    assert [r.get("promoted") for r in recs] == [False, True, None]
