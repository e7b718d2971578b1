"""Benchmark on real data: MovieLens-100k (RecBole atomic files) through import and ingest.

    .venv/bin/python benchmarks/bench_real.py [--cache ~/.cache/recloop/ml-100k] [--workspace DIR]
                                              [--period-days 7] [--train [--lags 0,600] [--gap-days D]
                                              [--mode top_layers=2] [--max-epochs N]] [--ceilings]
                                              [--ablations] [--retrain] [--replay]

1. **fetch** (once): ``pip download recbole==1.2.1 --no-deps`` into a temporary folder and
   unzip ``recbole/dataset_example/ml-100k/*`` from the wheel into the cache folder
   (outside the repository; no dataset is ever committed);
2. **import**: ``recloop import-recbole <cache> -w <workspace>`` (catalog and users into the
   store, weekly batches into landing/);
3. **ingest**: ``recloop ingest --all -w <workspace>`` with default settings (Great
   Expectations, Data Docs on);
4. prints rows in / stored / quarantined, with the reasons, and the seconds of each step.

Model benchmark (``--train``, :func:`train`; no import / ingest needed): label = rating >= 4,
events sorted by time, train = the first 80 % of events, test = the last 20 % (20,000 events).
For each feature lag (default 0 and 600 s) the recommender is trained on the train part
(``train_recommender``: towers, stacked ranker, refit) and the test events are scored two ways:
*fresh* (point-in-time over all events, each row sees events older than t - lag) and *train-only
history* (features from the training period only); beside it the statistics-only logistic
regression (``models.baselines.StatisticsBaseline``) on the same events. Reports AUC, cold-item
AUC with a 95 % bootstrap interval, per-group AUC by gender and by age bucket (<25, 25-34,
35-44, 45+; raw ages from the ``.user`` file) and their gaps, and the seconds. Then the catalog
ranking as served (``models.catalog_eval``: each test user's top 10 out of the whole catalog from the
history before the test part, against what they went on to like): NDCG@10, recall@10 and tail share
of the model and of every baseline, and model - most-popular with a user-bootstrap interval.

Other hooks (not run unless asked): :func:`retrain` (one retrain through the production flow
on the ingested workspace, ``--retrain``) and :func:`replay` (the policies replayed over the
weekly batches).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RECBOLE_VERSION = "1.2.1"
DATASET = "ml-100k"
DEFAULT_CACHE = Path(os.environ.get("RECLOOP_DATA_CACHE", Path.home() / ".cache" / "recloop")) / DATASET
FILES = (f"{DATASET}.inter", f"{DATASET}.item", f"{DATASET}.user")


def fetch(cache: Path = DEFAULT_CACHE) -> Path:
    """MovieLens-100k as RecBole atomic files in ``cache`` (downloaded from PyPI once)."""
    cache = Path(cache).expanduser()
    if all((cache / f).is_file() for f in FILES):
        return cache
    if REPO in cache.resolve().parents or cache.resolve() == REPO:
        raise SystemExit(f"refusing to put a dataset inside the repository ({cache}); pick a cache outside it")
    with tempfile.TemporaryDirectory(prefix="recloop-recbole-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", f"recbole=={RECBOLE_VERSION}", "--no-deps",
                        "--disable-pip-version-check", "-q", "-d", tmp], check=True)
        wheel, = Path(tmp).glob("recbole-*.whl")
        prefix = f"recbole/dataset_example/{DATASET}/"
        cache.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.startswith(prefix) and not member.endswith("/"):
                    target = cache / member[len(prefix):]
                    with zf.open(member) as src, open(target.with_suffix(target.suffix + ".tmp"), "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.replace(target.with_suffix(target.suffix + ".tmp"), target)
    missing = [f for f in FILES if not (cache / f).is_file()]
    if missing:
        raise SystemExit(f"the recbole {RECBOLE_VERSION} wheel did not contain {', '.join(missing)}")
    return cache


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recloop(*args: str) -> dict | list:
    """Run the ``recloop`` CLI as a user would (``--json``) and return its document."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECLOOP_")}
    proc = subprocess.run([sys.executable, "-m", "recloop.cli", *args, "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"recloop {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def import_and_ingest(cache: Path, workspace: Path, period_days: int = 7) -> dict:
    """Steps 2 and 3; returns the counts and timings."""
    t0 = time.perf_counter()
    imported = recloop("import-recbole", str(cache), "-w", str(workspace), "--period-days", str(period_days))
    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    outcomes = recloop("ingest", "--all", "-w", str(workspace))
    t_ingest = time.perf_counter() - t0
    reasons: Counter = Counter()
    for o in outcomes:
        for rule, k in o.get("reason_counts", {}).items():
            reasons[rule] += k
    return {
        "events_imported": imported["events"], "items": imported["items"], "users": imported["users"],
        "batches": imported["batches"], "first_event": imported.get("first_event"),
        "last_event": imported.get("last_event"),
        "rows_in": sum(o["n_rows"] for o in outcomes),
        "stored": sum(o["n_new"] for o in outcomes),
        "quarantined": sum(o["n_quarantined"] for o in outcomes),
        "statuses": dict(Counter(o["status"] for o in outcomes)),
        "reason_counts": dict(reasons),
        "held": [{"file": o["source"], "status": o["status"], "rows": o["n_rows"], "quarantined": o["n_quarantined"],
                  "reasons": o["reasons"]} for o in outcomes if o["status"] != "ingested"],
        "import_s": round(t_import, 1), "ingest_s": round(t_ingest, 1),
    }


# ---- hooks for the model work ------------------------------------------------------------------------------
AGE_BUCKETS = ((0, 25, "<25"), (25, 35, "25-34"), (35, 45, "35-44"), (45, 200, "45+"))


def _users_with_age(cache: Path, users):
    """The users table plus ``age_group`` (<25, 25-34, 35-44, 45+) from the raw ages of the ``.user`` file."""
    import pandas as pd

    from recloop.datasets.recbole import read_atomic

    raw = read_atomic(Path(cache) / f"{DATASET}.user")
    age = pd.to_numeric(raw["age"], errors="coerce")
    group = pd.Series(pd.NA, index=raw.index, dtype="string")
    for lo, hi, name in AGE_BUCKETS:
        group[(age >= lo) & (age < hi)] = name
    ages = pd.DataFrame({"user_id": raw["user_id"].astype(str), "age_group": group})
    out = users.copy()
    out["user_id"] = out["user_id"].astype(str)
    return out.merge(ages, on="user_id", how="left")


def _auc_table(y, score, frame, users, n_boot: int = 500, seed: int = 0) -> dict:
    import numpy as np

    from models.evaluate import auc

    y, score = np.asarray(y), np.asarray(score)
    out = {"auc": auc(y, score)}
    cold = frame["cold_item"].to_numpy()
    out["cold_item_auc"] = auc(y[cold], score[cold])
    out["n_cold"] = int(cold.sum())
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(cold)
    boots = [auc(y[b], score[b]) for b in (rng.choice(idx, len(idx)) for _ in range(n_boot))] if len(idx) else []
    boots = [b for b in boots if np.isfinite(b)]
    out["cold_item_ci95"] = [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))] if boots else None
    for col in ("gender", "age_group"):
        g = frame["user_id"].astype(str).map(users.set_index("user_id")[col]).astype("string").fillna("<missing>")
        per = {str(k): auc(y[(g == k).to_numpy()], score[(g == k).to_numpy()]) for k in sorted(g.unique())
               if k != "<missing>"}
        out[f"{col}_auc"] = per
        vals = [v for v in per.values() if np.isfinite(v)]
        out[f"{col}_gap"] = float(max(vals) - min(vals)) if vals else float("nan")
    return out


def train(cache: Path = DEFAULT_CACHE, lags=(0.0, 600.0), test_events: int = 20_000, ranker: str | None = "lightgbm",
          gap_days: float = 0.0, **training) -> dict:
    """The MovieLens-100k model benchmark (see the module doc): per lag, the model and statistics-lr.

    ``gap_days`` > 0: the model and the baseline are fitted only on training events older than the test
    part's start minus that many days (a model as stale as one judged on an eval window of that length
    before it was served); the fresh features still see every event before each test event. The stale model
    is also scored with its collaborative counts (co-likes, item-kNN, item like-rates) refit on every event
    before each test week minus the lag (``model_fresh_counts``): how much of the staleness they carry."""
    import pandas as pd

    from models.baselines import StatisticsBaseline
    from models.train import train_recommender
    from recloop.datasets.recbole import load_recbole
    from recloop.settings import load_settings

    data = load_recbole(cache)
    users = _users_with_age(cache, data.users)
    ev = data.events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    tr, te = ev.iloc[: len(ev) - test_events].reset_index(drop=True), ev.iloc[len(ev) - test_events:].reset_index(drop=True)
    if gap_days:
        tr = tr[tr["timestamp"] < te["timestamp"].min() - pd.Timedelta(days=float(gap_days))].reset_index(drop=True)
    te = te.assign(cold_item=~te["item_id"].astype(str).isin(set(tr["item_id"].astype(str))))
    rows = te[["user_id", "item_id", "timestamp"]]
    results = {"n_train": len(tr), "n_test": len(te), "gap_days": float(gap_days), "n_cold_item_test": int(te["cold_item"].sum()),
               "n_cold_user_test": int((~te["user_id"].isin(set(tr["user_id"]))).sum()), "lags": {}}
    for lag in lags:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="recloop-ml-") as tmp:
            settings = load_settings(tmp, feature_lag_seconds=float(lag), **({"training": training} if training else {}))
            trained = train_recommender(settings, tr, data.catalog, users, ranker=ranker)
        t_train = time.perf_counter() - t0
        model = trained.model
        fresh = model.score(rows, ev, data.catalog)
        t_eval = time.perf_counter() - t0 - t_train
        past = model.score(rows, tr, data.catalog)
        base = StatisticsBaseline(lag=pd.Timedelta(seconds=float(lag))).fit(tr, ev, data.catalog)
        y, base_fresh = te["label"].to_numpy(), base.score(rows, ev, data.catalog)
        res = {"train_s": round(t_train, 1), "train_eval_s": round(t_train + t_eval, 1),
               "cold_start_order": model.config.get("cold_start_order"),
               "timings": {k: round(v, 1) for k, v in trained.timings.items()}, "ranker": trained.ranker,
               "model_fresh": _auc_table(y, fresh, te, users),
               "model_train_history": _auc_table(y, past, te, users),
               "statistics_lr_fresh": _auc_table(y, base_fresh, te, users),
               "statistics_lr_train_history": _auc_table(y, base.score(rows, tr, data.catalog), te, users)}
        from models.bootstrap import paired_bootstrap_auc

        ci = paired_bootstrap_auc(y, fresh, base_fresh, samples=500, seed=0,
                                  groups=te["user_id"].astype(str).to_numpy())  # users resampled, as the gate does
        res["delta_vs_statistics_lr_fresh"] = {"delta": ci.estimate, "ci95": [ci.low, ci.high]}
        res["catalog"] = _catalog_table(settings, model, tr, ev, data.catalog, te, float(lag))
        if gap_days and model.collab is not None:
            res["model_fresh_counts"] = _auc_table(y, _score_with_weekly_counts(model, rows, ev, data.catalog, lag),
                                                   te, users)
        results["lags"][float(lag)] = res
    return results


def _catalog_table(settings, model, tr, ev, catalog, te, lag: float) -> dict:
    """Catalog NDCG@10 / recall@10 / tail exposure over the test part, as served (``models.catalog_eval``):
    each user's top 10 out of the whole catalog from the history before the test part's start minus the lag,
    against what they went on to like; the model (serving's retrieve + re-score) and every baseline."""
    import numpy as np
    import pandas as pd

    from models.baselines import make_baselines
    from models.catalog_eval import build_eval_set, evaluate_ranker, model_ranker, ranker_for
    from models.evaluate import item_popularity

    es = build_eval_set(ev, catalog, te["timestamp"].min(), te["timestamp"].max(), lag=pd.Timedelta(seconds=lag),
                        max_users=2000, seed=0, popularity=item_popularity(tr))
    rankers = {"model": model_ranker(model, settings)}
    for name, b in make_baselines(settings).items():
        rankers[name] = ranker_for(b.fit(tr, ev, catalog))
    out = {"n_users": len(es.users), "n_users_with_history": sum(u in es.stats.user_index for u in es.users)}
    per_user = {}
    for name, r in rankers.items():
        e = evaluate_ranker(r, es, 10, per_user=True)
        per_user[name] = e.per_user["ndcg"].to_numpy()
        cold = (e.per_user["n_seen"] == 0).to_numpy()  # no event before the test part: serving's cold-start list
        out[name] = {"ndcg_at_10": round(e.ndcg_at_k, 4), "recall_at_10": round(e.recall_at_k, 4),
                     "tail_exposure": round(e.tail_exposure, 3),
                     "ndcg_at_10_new_users": round(float(per_user[name][cold].mean()), 4) if cold.any() else None,
                     "ndcg_at_10_known_users": round(float(per_user[name][~cold].mean()), 4) if (~cold).any() else None}
    # model - most-popular, users resampled (paired: the same users' lists)
    d = per_user["model"] - per_user["most-popular"]
    draws = np.random.default_rng(0).integers(0, len(d), (1000, len(d)))
    out["model_minus_most_popular_ndcg"] = {"delta": round(float(d.mean()), 4),
                                            "ci95": [round(float(x), 4) for x in np.percentile(d[draws].mean(1), [2.5, 97.5])]}
    return out


def _score_with_weekly_counts(model, rows, ev, catalog, lag: float):
    """``model``'s fresh scores of ``rows`` with its collaborative counts refit, once per week of ``rows``, on
    every event before the week's start minus ``lag`` (its text and statistics heads and ranker unchanged), as
    a server that refreshed them weekly would."""
    import dataclasses

    import numpy as np
    import pandas as pd

    from models.cf import CollabModel

    stale, out = model.collab, np.empty(len(rows))
    dim = len(stale.text_w)
    week = ((rows["timestamp"] - rows["timestamp"].min()) // pd.Timedelta(days=7)).to_numpy()
    try:
        for w in np.unique(week):
            cut = rows["timestamp"].min() + w * pd.Timedelta(days=7) - pd.Timedelta(seconds=lag)
            counts = CollabModel.fit(ev[ev["timestamp"] < cut], lambda ids: np.zeros((len(ids), dim)), stale.prior)
            model.collab = dataclasses.replace(stale, item_ids=counts.item_ids, keys=counts.keys, k=counts.k,
                                               n=counts.n, sim_keys=counts.sim_keys, sim=counts.sim,
                                               item_rate=counts.item_rate)
            m = week == w
            out[m] = model.score(rows[m].reset_index(drop=True), ev, catalog)
    finally:
        model.collab = stale
    return out


def ceilings(cache: Path = DEFAULT_CACHE, test_events: int = 20_000) -> dict:
    """How far item-side signals alone can go on the test part (the bound on the *training-period history*
    protocol, where most test users are unseen): the item's like-rate over the training period; the item's
    like-rate over the test part itself, leaving the event's own label out (an oracle); and a logistic
    regression on the training-period item like-rate plus its like-rate within the user's gender, age bucket
    and occupation (fitted on the first half of the test part, judged on the second), against the item
    like-rate alone on that second half."""
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    from models.evaluate import auc
    from recloop.datasets.recbole import load_recbole

    data = load_recbole(cache)
    users = _users_with_age(cache, data.users).set_index("user_id")
    ev = data.events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    tr, te = ev.iloc[:-test_events].reset_index(drop=True), ev.iloc[-test_events:].reset_index(drop=True)
    y, p0, k = te["label"].to_numpy(), float(tr["label"].mean()), 10.0

    def logit(p):
        p = np.clip(np.asarray(p, dtype=float), 1e-3, 1 - 1e-3)
        return np.log(p / (1 - p))

    per_item = tr.groupby("item_id")["label"].agg(["sum", "count"])
    rate = te["item_id"].map((per_item["sum"] + k * p0) / (per_item["count"] + k)).fillna(p0).to_numpy()
    g = te.groupby("item_id")["label"]
    loo = (g.transform("sum") - te["label"] + k * y.mean()) / (g.transform("count") - 1 + k)
    cols, feats = [c for c in ("gender", "age_bucket", "occupation") if c in users.columns], [logit(rate)]
    trg, teg = tr.join(users[cols], on="user_id"), te.join(users[cols], on="user_id")
    for c in cols:
        cell = trg.groupby(["item_id", c])["label"].agg(["sum", "count"]).reindex(
            pd.MultiIndex.from_arrays([teg["item_id"], teg[c]]))
        feats.append(logit((cell["sum"].fillna(0).to_numpy() + k * rate) / (cell["count"].fillna(0).to_numpy() + k)))
        feats.append(logit(teg[c].map(trg.groupby(c)["label"].mean()).fillna(p0)))
    x, first = np.column_stack(feats), np.arange(len(te)) < len(te) // 2
    lr = LogisticRegression(max_iter=1000).fit(x[first], y[first])
    out = {"cold_user_share": float((~te["user_id"].isin(set(tr["user_id"]))).mean()),
           "train_item_rate": auc(y, rate), "test_item_rate_oracle": auc(y, loo.to_numpy()),
           "second_half_item_rate": auc(y[~first], rate[~first]),
           "second_half_item_and_group_rates": auc(y[~first], lr.decision_function(x[~first]))}
    print("item-side ceilings on the test part: " + ", ".join(f"{n} {v:.4f}" for n, v in out.items()))
    return out


def ablations(cache: Path = DEFAULT_CACHE, lag: float = 0.0) -> dict:
    """What each signal adds (same split, same lag, same seed): full fusion, fusion without the towers,
    without text, statistics only (trees and the logistic regression), the towers alone (BERT + statistics,
    with and without id embeddings), ids only (tuned MF)."""

    from models.baselines import MatrixFactorizationBaseline
    from models.cf import CF_COLUMNS
    from models.features import WIDE_COLUMNS
    from recloop.datasets.recbole import load_recbole

    no_text = list(WIDE_COLUMNS) + [c for c in CF_COLUMNS if c != "text_prior"]
    runs = {
        "full fusion (default)": ("lightgbm", {}),
        "fusion, no towers": ("lightgbm", {"blend_towers": False}),
        "fusion, no towers, no text": ("lightgbm", {"blend_towers": False, "fusion_columns": no_text}),
        "statistics only (trees)": ("lightgbm", {"blend_towers": False, "fusion_columns": list(WIDE_COLUMNS)}),
        "towers: BERT + statistics": ("none", {}),
        "towers, no id embeddings": ("none", {"id_embeddings": False}),
    }
    out = {}
    for name, (ranker, training) in runs.items():
        t0 = time.perf_counter()
        r = train(cache, (lag,), ranker=ranker, **training)["lags"][float(lag)]
        out[name] = {"fresh": r["model_fresh"], "train_history": r["model_train_history"],
                     "seconds": round(time.perf_counter() - t0, 1)}
        out.setdefault("statistics-lr", {"fresh": r["statistics_lr_fresh"],
                                         "train_history": r["statistics_lr_train_history"]})
        print(f"  {name:34s} AUC {r['model_fresh']['auc']:.4f}  cold-item {r['model_fresh']['cold_item_auc']:.4f}  "
              f"train-history {r['model_train_history']['auc']:.4f}  ({out[name]['seconds']} s)", flush=True)
    # ids only: the tuned MF, on the same split
    data = load_recbole(cache)
    ev = data.events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    tr, te = ev.iloc[:-20_000].reset_index(drop=True), ev.iloc[-20_000:].reset_index(drop=True)
    te = te.assign(cold_item=~te["item_id"].astype(str).isin(set(tr["item_id"].astype(str))))
    users = _users_with_age(cache, data.users)
    mf = MatrixFactorizationBaseline().fit(tr, tr, data.catalog)
    score = mf.score(te[["user_id", "item_id", "timestamp"]], ev, data.catalog)
    out["ids only (tuned MF)"] = {"fresh": _auc_table(te["label"].to_numpy(), score, te, users), "chosen": mf.chosen}
    print(f"  {'ids only (tuned MF)':34s} AUC {out['ids only (tuned MF)']['fresh']['auc']:.4f}  {mf.chosen}")
    s = out["statistics-lr"]
    print(f"  {'statistics only (logistic)':34s} AUC {s['fresh']['auc']:.4f}  cold-item {s['fresh']['cold_item_auc']:.4f}"
          f"  train-history {s['train_history']['auc']:.4f}")
    return out


def _print_holdout(res: dict) -> None:
    print(f"ml-100k holdout: train {res['n_train']:,} / test {res['n_test']:,} events "
          f"(cold-item {res['n_cold_item_test']:,}, cold-user {res['n_cold_user_test']:,})")
    for lag, r in res["lags"].items():
        print(f"  lag {lag:g} s: train {r['train_s']} s, train + eval {r['train_eval_s']} s; phases {r['timings']}")
        for name in ("model_fresh", "model_fresh_counts", "statistics_lr_fresh", "model_train_history",
                     "statistics_lr_train_history"):
            if name not in r:
                continue
            t = r[name]
            ci = t["cold_item_ci95"]
            print(f"    {name:28s} AUC {t['auc']:.4f}  cold-item {t['cold_item_auc']:.4f} "
                  f"[{ci[0]:.3f}, {ci[1]:.3f}] (n={t['n_cold']})  gender gap {t['gender_gap']:.4f} "
                  f"{ {k: round(v, 3) for k, v in t['gender_auc'].items()} }  age gap {t['age_group_gap']:.4f} "
                  f"{ {k: round(v, 3) for k, v in t['age_group_auc'].items()} }")
        d = r.get("delta_vs_statistics_lr_fresh")
        if d:
            print(f"    model - statistics-lr (fresh): {d['delta']:+.4f}, 95 % user-bootstrap CI "
                  f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]")
        cat = r.get("catalog")
        if cat:
            print(f"    catalog top-10 over the test part ({cat['n_users']} users, {cat['n_users_with_history']} with "
                  f"history): " + "; ".join(f"{n} NDCG {v['ndcg_at_10']:.4f} recall {v['recall_at_10']:.4f} tail "
                                             f"{v['tail_exposure']:.2f}" for n, v in cat.items() if isinstance(v, dict) and "ndcg_at_10" in v))
            print("    catalog NDCG@10 new users / users with history: " + "; ".join(
                f"{n} {v['ndcg_at_10_new_users']} / {v['ndcg_at_10_known_users']}" for n, v in cat.items()
                if isinstance(v, dict) and "ndcg_at_10" in v))
            d = cat["model_minus_most_popular_ndcg"]
            print(f"    catalog NDCG@10 model - most-popular: {d['delta']:+.4f}, 95 % user-bootstrap CI "
                  f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]")
        rk = r.get("ranker") or {}
        if rk:
            print(f"    ranker: {rk.get('kind')} fusion on {rk.get('n_rows')} out-of-sample rows ({rk.get('rows')}), "
                  f"refit on {rk.get('refit_rows')}, rounds {rk.get('rounds')}; blend on {rk.get('blend_rows')} "
                  f"validation rows {rk.get('blend')}; validation AUC towers {rk.get('val_auc_towers', float('nan')):.4f}"
                  f" fusion {rk.get('val_auc_fusion', float('nan')):.4f} blend {rk.get('val_auc_blend', float('nan')):.4f}")
            imp = sorted((rk.get("importance") or {}).items(), key=lambda kv: -kv[1])
            print("    fusion importance (gain share): " + ", ".join(f"{k} {v:.3f}" for k, v in imp))
            if rk.get("cold_start"):
                print(f"    cold-start order: {r.get('cold_start_order')} ({rk['cold_start'].get('reason')})")


def retrain(workspace: Path, reason: str = "bench_real", **settings_overrides) -> dict:
    """One retrain through the production flow (and its gates) on the ingested workspace."""
    from flows.retrain import retrain_flow

    if settings_overrides:
        _write_overrides(workspace, settings_overrides)
    t0 = time.perf_counter()
    out = retrain_flow(reason=reason, workspace=str(workspace))
    return {"seconds": round(time.perf_counter() - t0, 1), **{k: out.get(k) for k in
                                                              ("version", "promoted", "candidate_metrics")}}


def replay(cache: Path, root: Path, period_days: int = 7, policies: tuple[str, ...] = ("never", "periodic", "drift"),
           initial_periods: int = 4, max_batches: int | None = None, settings_overrides: dict | None = None) -> dict:
    """The retraining policies replayed over the weekly batches (replay.runner), reports under ``root``."""
    from recloop.datasets.batches import split_by_period
    from recloop.datasets.recbole import load_recbole
    from replay.runner import ReplayConfig, ReplaySource, run_replay

    data = load_recbole(cache)
    src = ReplaySource(DATASET, list(split_by_period(data.events, period_days).items()), data.catalog, data.users)
    cfg = ReplayConfig(policies=policies, initial_periods=initial_periods, max_batches=max_batches,
                       settings_overrides=settings_overrides or {})
    return run_replay(src, Path(root), cfg)


def _write_overrides(workspace: Path, overrides: dict) -> None:
    from replay.runner import to_toml

    (Path(workspace) / "recloop.toml").write_text(to_toml(overrides))


# ---- main -------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where ml-100k is kept (outside the repo)")
    ap.add_argument("--workspace", type=Path, default=None, help="workspace (default: a fresh temporary one)")
    ap.add_argument("--period-days", type=int, default=7)
    ap.add_argument("--train", action="store_true",
                    help="the model benchmark: 80/20 time split, model vs statistics-lr (no import / ingest)")
    ap.add_argument("--lags", default="0,600", help="feature lags in seconds for --train")
    ap.add_argument("--ranker", default="lightgbm", help="lightgbm | logistic | none (--train)")
    ap.add_argument("--gap-days", type=float, default=0.0,
                    help="--train: fit only on events older than the test start minus this many days (staleness)")
    ap.add_argument("--mode", default=None, help="--train: settings.training.mode (frozen | top_layers=k | full)")
    ap.add_argument("--max-epochs", type=int, default=None, help="--train: settings.training.max_epochs")
    ap.add_argument("--ablations", action="store_true", help="what each signal adds (lag 0; ~6 trainings)")
    ap.add_argument("--ceilings", action="store_true", help="how far item-side signals alone go (seconds, no training)")
    ap.add_argument("--retrain", action="store_true", help="then run one retrain through the production flow")
    ap.add_argument("--replay", action="store_true", help="then replay the policies (the replay hook)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    cache = fetch(args.cache)
    t_fetch = time.perf_counter() - t0
    print(f"data: {cache} (fetch/cache check {t_fetch:.1f} s)")
    for f in FILES:
        print(f"  {f}  sha256 {sha256(cache / f)[:16]}")
    if args.ceilings:
        res = ceilings(cache)
        if not (args.ablations or args.train or args.retrain or args.replay):
            return res
    if args.ablations:
        res = ablations(cache)
        if not (args.train or args.retrain or args.replay):
            return res
    if args.train:
        training = {k: v for k, v in (("mode", args.mode), ("max_epochs", args.max_epochs)) if v is not None}
        res = train(cache, tuple(float(x) for x in args.lags.split(",")),
                    ranker=args.ranker, gap_days=args.gap_days, **training)
        _print_holdout(res)
        if not (args.retrain or args.replay):
            return res
    tmp = None
    if args.workspace is None:
        tmp = tempfile.mkdtemp(prefix="recloop-bench-real-")
        workspace = Path(tmp) / "ws"
    else:
        workspace = args.workspace
    res = {"fetch_s": round(t_fetch, 1), **import_and_ingest(cache, workspace, args.period_days)}
    print(f"imported: {res['events_imported']:,} events, {res['items']:,} items, {res['users']:,} users, "
          f"{res['batches']} batches of {args.period_days} d ({res['first_event']} .. {res['last_event']}) "
          f"in {res['import_s']} s")
    print(f"ingest:   rows in {res['rows_in']:,} = stored {res['stored']:,} + quarantined {res['quarantined']:,} "
          f"in {res['ingest_s']} s; batches {res['statuses']}")
    for rule, k in sorted(res["reason_counts"].items()):
        print(f"  quarantined by {rule}: {k:,}")
    for h in res["held"]:
        print(f"  {h['file']}: {h['status']}, {h['quarantined']} of {h['rows']} rows held")
        for r in h["reasons"]:
            print(f"      {r}")
    if args.retrain:
        res["retrain"] = retrain(workspace)
        print(f"retrain: {res['retrain']}")
    if args.replay:
        out = replay(cache, workspace.parent / "replay", args.period_days)
        res["replay"] = out["summary"]
        print(f"replay: {out['markdown']}")
    if tmp is not None and not (args.retrain or args.replay):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"workspace: {workspace}")
    return res


if __name__ == "__main__":
    main()
