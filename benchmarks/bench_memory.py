"""Benchmark: peak memory (and time) of the drift check, the serving store view and ingest.

    .venv/bin/python benchmarks/bench_memory.py                          # 1M and 3M events, 3 runs each
    .venv/bin/python benchmarks/bench_memory.py --baseline-tree /tmp/old # ... and the same on another checkout
    .venv/bin/python benchmarks/bench_memory.py --quick                  # 20k events, 4 MB, one run (< 60 s)
    .venv/bin/python benchmarks/bench_memory.py --events 10000000 --runs 1 \
        --only monitor,ingest-stored,retrain --window-days 7                # the 10M loop (issue 15)

Each measurement runs in a fresh subprocess (``python -c``, the code under test first on ``sys.path``); its
peak memory is the child's RSS high-water mark (``VmHWM``, i.e. ``getrusage(RUSAGE_SELF).ru_maxrss``, imports
included), and the child reports its RSS after its imports, so the growth caused by the work is the difference. With
``--baseline-tree`` every measurement alternates between that checkout (e.g. ``git archive`` of the
commit before) and this one, on the same data, so ratios are taken under the same machine load.

* **monitor**: ``detect_drift`` for a champion trained on days 0-20 of a 28-day store (current window days
  21-27), default ``monitor`` settings (50,000-row samples), a cheap label-free hash scorer as the champion;
* **serving**: a server's imports (``serving.app``, torch), ``StoreView.refresh(force=True)`` over the whole
  store (start-up), then four new ledger lines (new parts, ~0.5 % of the store each) picked up by
  incremental refreshes, then the fast path's per-user statistics (``stats.user``) for 1,000 users;
* **ingest**: ``ingest_batch`` of one landing CSV of ``--ingest-mb`` MB (~80 bytes a row) into a workspace
  whose store holds the catalog (Data Docs off, the GX context built before measuring, as in a worker);
  the ratio is the peak growth over the file's size.
* **ingest-stored**: the same CSV ingested into a copy of the big store's workspace (idempotency checked
  against every stored event, part by part), for "ingest with N events stored";
* **retrain**: the retrain's data path in one process: ``prepare_retrain_data`` (the snapshot read, bounded
  to the newest ``--window-days`` days; the retrain reads *everything stored* when ``retrain.window_days`` is
  unset), then ``train_recommender`` on its train part (the window's point-in-time features on the engine
  ``--engine`` names, the frozen MiniLM catalog pass, ``--fit-epochs`` epochs of selection fit, the ranker
  and the refit, or ``--fit-batches`` batches of each fit without the ranker). With ``--engine ray`` the
  peak of every Ray process the child started (workers, raylet) is reported too.

The stores are synthetic events written straight into the store's layout (``events/date=*/part-*.parquet``
with the pandas metadata the store writes, ``ledger.jsonl``, ``catalog.parquet``) with numpy and Arrow, two
parts a day, cached under ``--workdir`` (default: a folder in the temp dir) and never committed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_DAYS, TRAIN_DAYS = 28, 21
DAY0 = "2026-01-05"
CATEGORIES = ["jazz", "cooking", "travel", "history", "science", "poetry", "gardening", "chess", "film", "design",
              "running", "sailing"]


# ------------------------------------------------------------------------------------------- data
def _event_schema():
    """The Arrow schema (with its pandas metadata) the store writes for FEEDBACK_COLUMNS."""
    import pandas as pd
    import pyarrow as pa

    from recloop.schema import normalize_feedback

    one = normalize_feedback(pd.DataFrame({"event_id": ["e"], "user_id": ["u"], "item_id": ["i"],
                                           "event_type": ["click"], "label": [1],
                                           "timestamp": [pd.Timestamp(DAY0, tz="UTC")], "query": [None],
                                           "model_version": ["1"]}))
    return pa.Table.from_pandas(one, preserve_index=False).schema


def _catalog(n_items: int, rng):
    import numpy as np
    import pandas as pd

    day0 = pd.Timestamp(DAY0, tz="UTC")
    cat = np.asarray(CATEGORIES, dtype=object)[rng.integers(0, len(CATEGORIES), n_items)]
    created = day0 - pd.to_timedelta(rng.integers(1, 720, n_items), unit="D")
    new = np.arange(n_items) >= int(n_items * 0.9)  # the newest tenth appears during the drift period
    created = created.where(~new, day0 + pd.Timedelta(days=TRAIN_DAYS) - pd.Timedelta(days=1))
    return pd.DataFrame({"item_id": [f"item-{k:06d}" for k in range(n_items)],
                         "title": [f"The {c} book {k}" for k, c in enumerate(cat)],
                         "description": [f"All about {c}, volume {k % 97}" for k, c in enumerate(cat)],
                         "category": cat, "created_at": created})


def _day_events(d: int, n: int, n_users: int, n_items: int, rng):
    """One day's events as an Arrow table in FEEDBACK_COLUMNS order (no pandas objects)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    secs = np.sort(rng.integers(0, 86_400_000_000, n)) * 1000  # ns within the day
    day_ns = np.datetime64(DAY0, "ns").astype(np.int64) + d * 86_400 * 10**9
    users = np.minimum(rng.pareto(1.2, n) * n_users / 20, n_users - 1).astype(np.int64)  # heavy and light users
    if d >= TRAIN_DAYS:  # drift: the newest tenth of the catalog takes a third of the traffic
        pick = rng.random(n) < 0.33
        items = np.where(pick, rng.integers(int(n_items * 0.9), n_items, n),
                         np.minimum(rng.pareto(1.1, n) * n_items / 30, n_items - 1).astype(np.int64))
    else:
        items = np.minimum(rng.pareto(1.1, n) * n_items / 30, int(n_items * 0.9) - 1).astype(np.int64)
    etype_code = rng.choice(5, n, p=[0.55, 0.2, 0.12, 0.08, 0.05])
    etypes = np.asarray(["impression", "click", "like", "dislike", "purchase"], dtype=object)
    label = np.asarray([0, 1, 1, 0, 1], dtype=np.int8)[etype_code]

    def ids(prefix, codes, width):
        return pc.binary_join_element_wise(prefix, pc.utf8_lpad(pc.cast(pa.array(codes), pa.string()), width, "0"), "")

    query = pa.array(np.where(rng.random(n) < 0.1, "smooth jazz piano", None), type=pa.string())
    return pa.table({
        "event_id": ids(f"ev-{d:02d}-", np.arange(n), 8), "user_id": ids("user-", users, 7),
        "item_id": ids("item-", items, 6), "event_type": pa.array(etypes[etype_code], type=pa.string()),
        "label": pa.array(label), "timestamp": pa.array(day_ns + secs, type=pa.timestamp("ns", tz="UTC")),
        "query": query, "model_version": pa.array(np.full(n, "1", dtype=object), type=pa.string()),
    })


def build_store(workdir: Path, n_events: int, seed: int = 0) -> dict:
    """A 28-day synthetic store of ``n_events`` in the store's own layout (cached in ``workdir``)."""
    import numpy as np
    import pyarrow.parquet as pq

    marker = workdir / "built.json"
    if marker.exists():
        doc = json.loads(marker.read_text())
        if doc.get("n_events") == n_events and doc.get("seed") == seed:
            return doc
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    from recloop.settings import load_settings
    from recloop.store import FeedbackStore

    rng = np.random.default_rng(seed)
    n_users, n_items = max(2_000, n_events // 60), min(20_000, max(500, n_events // 150))
    s = load_settings(workdir / "ws").ensure_dirs()
    store = FeedbackStore.from_settings(s)
    store.upsert_catalog(_catalog(n_items, rng))
    schema = _event_schema()
    ledger = []
    per_day = np.full(N_DAYS, n_events // N_DAYS)
    per_day[: n_events % N_DAYS] += 1
    for d in range(N_DAYS):
        table = _day_events(d, int(per_day[d]), n_users, n_items, rng).cast(schema)
        day = str(np.datetime64(DAY0) + d)
        half = table.num_rows // 2
        for p, part in enumerate((table.slice(0, half), table.slice(half))):
            digest = hashlib.sha256(f"{seed}-{n_events}-{d}-{p}".encode()).hexdigest()[:16]
            rel = f"events/date={day}/part-{digest}.parquet"
            path = store.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(part, path, row_group_size=131_072)
            ledger.append(json.dumps({"batch_id": f"bench-{d}-{p}", "n_new": part.num_rows, "n_duplicate": 0,
                                      "parts": [rel], "at": datetime.now(UTC).isoformat()}))
    doc = {"n_events": n_events, "seed": seed, "n_users": n_users, "n_items": n_items, "ws": str(s.workspace),
           "store": str(store.root), "ledger": ledger, "seconds": round(time.perf_counter() - t0, 1)}
    marker.write_text(json.dumps(doc))
    return doc


def build_landing_csv(path: Path, megabytes: float, catalog_items: int, seed: int = 1) -> dict:
    """A landing CSV of about ``megabytes`` MB: valid events of the last days, 100k users."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    if path.exists() and path.with_suffix(".json").exists():
        doc = json.loads(path.with_suffix(".json").read_text())
        if doc.get("megabytes") == megabytes and doc.get("catalog_items") == catalog_items:
            return doc
    rng = np.random.default_rng(seed)
    n = int(megabytes * 1e6 / 77.2)
    t = _day_events(0, n, 100_000, catalog_items, rng)
    now = np.datetime64(datetime.now(UTC).replace(tzinfo=None), "s").astype(np.int64) * 10**9
    ts = now - 3 * 86_400 * 10**9 + np.sort(rng.integers(0, 2 * 86_400, n)) * 10**9
    users = pc.binary_join_element_wise("user-", pc.utf8_lpad(pc.cast(pa.array(rng.integers(0, 100_000, n)),
                                                                       pa.string()), 7, "0"), "")
    t = t.set_column(t.column_names.index("user_id"), "user_id", users)
    t = t.set_column(t.column_names.index("event_id"), "event_id",
                     pc.binary_join_element_wise("in-", pc.cast(pa.array(np.arange(n)), pa.string()), ""))
    t = t.set_column(t.column_names.index("timestamp"), "timestamp",
                     pc.strftime(pa.array(ts, type=pa.timestamp("ns", tz="UTC")).cast(pa.timestamp("s", tz="UTC")),
                                 format="%Y-%m-%dT%H:%M:%S+00:00"))
    path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(t, path, pacsv.WriteOptions(quoting_style="none"))
    doc = {"megabytes": megabytes, "catalog_items": catalog_items, "rows": n, "bytes": path.stat().st_size}
    path.with_suffix(".json").write_text(json.dumps(doc))
    return doc


# ------------------------------------------------------------------------------------------- children
PRELUDE = r"""
import json, os, resource, sys, time, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, TREE)
os.chdir(TREE)
def status(key):
    if key == "VmHWM":  # the peak: the kernel's high-water mark, or ru_maxrss where /proc is missing
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    else:
        peak = 0
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return max(peak, int(line.split()[1]) * 1024)
    except OSError:
        pass
    return peak
"""

MONITOR = r"""
import numpy as np, pandas as pd
import evidently  # imported by the check itself; counted as an import, not as work
from monitoring.drift import detect_drift
from monitoring.windows import ChampionInfo
from recloop.settings import load_settings
from recloop.store import FeedbackStore
s = load_settings(ARGS["ws"])
s.checks.data_docs = False
store = FeedbackStore.from_settings(s)
day = lambda d: pd.Timestamp(ARGS["day0"], tz="UTC") + pd.Timedelta(days=d)
champ = ChampionInfo("1", day(0), day(ARGS["train_days"]), offline_auc=0.70, holdout_start=day(ARGS["train_days"] - 3))
def scorer(rows):
    key = rows["user_id"].astype(str) + "|" + rows["item_id"].astype(str)
    return (pd.util.hash_pandas_object(key, index=False).to_numpy() % 10_000) / 10_000.0
base = status("VmRSS")
t0 = time.perf_counter()
out = detect_drift(s, store, champ, scorer=scorer, now=day(ARGS["n_days"]), record=False)
sec = time.perf_counter() - t0
print("RESULT " + json.dumps({"seconds": sec, "rss_after_imports": base, "vmhwm": status("VmHWM"),
      "n_reference": out.n_reference, "n_current": out.n_current, "reason": out.reason,
      "drift_share": out.drift_share}))
"""

SERVING = r"""
import numpy as np
import serving.app  # a server's imports (FastAPI, the models package, torch)
import models.recommender
from serving.storeview import StoreView
ledger = os.path.join(ARGS["store"], "ledger.jsonl")
with open(ledger, "w") as fh:
    fh.write("\n".join(ARGS["ledger"][:-ARGS["pending"]]) + "\n")
base = status("VmRSS")
view = StoreView(ARGS["store"])
t0 = time.perf_counter()
view.refresh(force=True)
startup = time.perf_counter() - t0
after_start = status("VmRSS")
inc = []
for line in ARGS["ledger"][-ARGS["pending"]:]:
    with open(ledger, "a") as fh:
        fh.write(line + "\n")
    t0 = time.perf_counter()
    assert view.refresh()
    inc.append(time.perf_counter() - t0)
data = view.data
users = [f"user-{k:07d}" for k in np.random.default_rng(0).integers(0, ARGS["n_users"], 1000)]
t0 = time.perf_counter()
n = 0
for u in users:
    n += data.stats.user(u).n if data.stats is not None else len(data.user_history(u))
per_user = (time.perf_counter() - t0) / len(users)
counted = getattr(data, "n_events", len(data.events))
print("RESULT " + json.dumps({"seconds": startup, "incremental_seconds": statistics_median(inc),
      "per_user_ms": per_user * 1e3, "rss_after_imports": base, "rss_after_startup": after_start,
      "rss_end": status("VmRSS"), "vmhwm": status("VmHWM"), "events_counted": counted,
      "events_kept": len(data.events)}))
"""

INGEST = r"""
import pandas as pd
from data_checks.ingest import ingest_batch
from data_checks.validate import prepare_feedback_frame, validate_frame
from recloop.settings import load_settings
s = load_settings(ARGS["ws"])
s.checks.data_docs = False
warm = pd.DataFrame({"event_id": ["w1"], "user_id": ["u"], "item_id": ["item-000001"], "event_type": ["click"],
                     "label": [1], "timestamp": ["2026-01-05T00:00:00+00:00"]})
validate_frame(prepare_feedback_frame(warm, set(), ["item-000001"]), s)  # the GX context, as in a worker
base = status("VmRSS")
t0 = time.perf_counter()
out = ingest_batch(ARGS["file"], s)
sec = time.perf_counter() - t0
print("RESULT " + json.dumps({"seconds": sec, "rss_after_imports": base, "vmhwm": status("VmHWM"),
      "status": out.status, "n_new": out.n_new, "n_rows": out.n_rows}))
"""


RETRAIN = r"""
import pandas as pd
import models.train  # torch, lightning, transformers: counted as imports
from models.pipeline import prepare_retrain_data
from recloop.settings import load_settings
s = load_settings(ARGS["ws"])
s.retrain.window_days = ARGS["window_days"]
s.services.engine = ARGS["engine"]
s.training.max_epochs = max(ARGS["fit_epochs"], 1)
base = status("VmRSS")
t0 = time.perf_counter()
data = prepare_retrain_data(s)
t_read, peak_read = time.perf_counter() - t0, status("VmHWM")
out = models.train.train_recommender(s, data.train, data.catalog, data.users,
                                     fast_dev_run=ARGS["fit_batches"] or False)  # closes a Ray engine it started
sec = time.perf_counter() - t0
print("RESULT " + json.dumps({"seconds": sec, "read_seconds": t_read, "rss_after_imports": base,
      "vmhwm": status("VmHWM"), "vmhwm_after_read": peak_read, "n_window": len(data.events),
      "n_train": len(data.train), "timings": out.timings, "peak_mib": out.peak_mib, "ray_peak": RAY_PEAK[0]}))
"""

RAY_PROBE = r"""
RAY_PEAK = [0]
if ARGS.get("engine") == "ray":  # before the engine stops: the high-water marks of the Ray processes it started
    import models.engine as _me
    _close = _me.RayEngine.close
    def _probing_close(self):
        import psutil
        for p in psutil.Process().children(recursive=True):
            try:
                for line in open(f"/proc/{p.pid}/status"):
                    if line.startswith("VmHWM:"):
                        RAY_PEAK[0] = max(RAY_PEAK[0], int(line.split()[1]) * 1024)
            except OSError:
                pass
        _close(self)
    _me.RayEngine.close = _probing_close
"""


def run_child(tree: Path, body: str, args: dict, timeout: float = 1800) -> dict:
    """Run ``body`` in a fresh interpreter with ``tree`` first on sys.path; its result plus its peak RSS."""
    head = (f"import json\nTREE = {str(tree)!r}\nARGS = json.loads({json.dumps(json.dumps(args))})\n"
            "import statistics\nstatistics_median = statistics.median\n")
    code = head + PRELUDE + (RAY_PROBE if body is RETRAIN else "") + body
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    env.setdefault("PREFECT_HOME", str(Path(tempfile.gettempdir()) / f"bench-memory-prefect-{os.getpid()}"))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tree, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"child timed out after {timeout}s") from None
    wall = time.perf_counter() - t0
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"child failed (exit {proc.returncode}):\n{err[-3000:]}")
    res = json.loads(line[len("RESULT "):])
    # the child's own high-water mark (VmHWM / ru_maxrss), imports included; a retrain resets it per phase
    # (recloop.memory.PhasePeaks), so its peak is the largest of the phases' and the read's
    res["peak"] = max([res["vmhwm"], res.get("vmhwm_after_read", 0)]
                      + [v * 2**20 for v in res.get("peak_mib", {}).values()])
    res["wall"] = wall
    return res


# ------------------------------------------------------------------------------------------- driver
def _mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def measure(kind: str, tree: Path, doc: dict, workdir: Path, csv: dict | None = None, opts=None) -> dict:
    if kind == "monitor":
        shutil.rmtree(Path(doc["ws"]) / "reports", ignore_errors=True)
        return run_child(tree, MONITOR, {"ws": doc["ws"], "day0": DAY0, "train_days": TRAIN_DAYS, "n_days": N_DAYS})
    if kind == "serving":
        return run_child(tree, SERVING, {"store": doc["store"], "ledger": doc["ledger"], "pending": 4,
                                         "n_users": doc["n_users"]})
    if kind == "ingest":
        from recloop.settings import load_settings
        from recloop.store import FeedbackStore

        ws = workdir / "ingest-ws"
        shutil.rmtree(ws, ignore_errors=True)
        s = load_settings(ws).ensure_dirs()
        src = FeedbackStore(doc["store"])
        FeedbackStore.from_settings(s).upsert_catalog(src.catalog())
        landed = s.landing_dir / "batch.csv"
        shutil.copy(csv["path"], landed)
        res = run_child(tree, INGEST, {"ws": str(ws), "file": str(landed)})
        shutil.rmtree(ws, ignore_errors=True)
        return res
    if kind == "ingest-stored":
        from recloop.settings import load_settings

        ws = workdir / "ingest-stored-ws"
        shutil.rmtree(ws, ignore_errors=True)
        shutil.copytree(doc["ws"], ws)
        landed = load_settings(ws).ensure_dirs().landing_dir / "batch.csv"
        shutil.copy(csv["path"], landed)
        res = run_child(tree, INGEST, {"ws": str(ws), "file": str(landed)})
        shutil.rmtree(ws, ignore_errors=True)
        return res
    if kind == "retrain":
        shutil.rmtree(Path(doc["ws"]) / "models", ignore_errors=True)
        return run_child(tree, RETRAIN, {"ws": doc["ws"], "window_days": opts.window_days, "engine": opts.engine,
                                         "fit_epochs": opts.fit_epochs, "fit_batches": opts.fit_batches},
                         timeout=opts.retrain_timeout)
    raise ValueError(kind)


def summarise(kind: str, runs: list[dict], csv: dict | None = None) -> dict:
    out = {"runs": len(runs), "seconds": _median(runs, "seconds"), "peak": _median(runs, "peak"),
           "after_imports": _median(runs, "rss_after_imports")}
    out["growth"] = statistics.median(r["peak"] - r["rss_after_imports"] for r in runs)
    if kind == "serving":
        out["incremental_seconds"] = _median(runs, "incremental_seconds")
        out["per_user_ms"] = _median(runs, "per_user_ms")
        out["events_kept"] = runs[0]["events_kept"]
        out["events_counted"] = runs[0]["events_counted"]
    if kind == "retrain":
        for key in ("read_seconds", "vmhwm_after_read", "ray_peak"):
            out[key] = _median(runs, key)
        out["n_window"], out["n_train"], out["timings"] = runs[0]["n_window"], runs[0]["n_train"], runs[0]["timings"]
        out["peak_mib"] = runs[0].get("peak_mib", {})
    if kind in ("ingest", "ingest-stored"):
        out["file_bytes"] = csv["bytes"]
        out["rows"] = csv["rows"]
        out["growth_x_file"] = out["growth"] / csv["bytes"]
        out["peak_x_file"] = out["peak"] / csv["bytes"]
        out["status"] = runs[0]["status"]
    if kind == "monitor":
        out["reason"] = runs[0]["reason"]
        out["n_reference"], out["n_current"] = runs[0]["n_reference"], runs[0]["n_current"]
    return out


def _line(kind: str, size: str, label: str, m: dict) -> str:
    extra = ""
    if kind == "serving":
        extra = (f"; incremental refresh {m['incremental_seconds']:.2f} s; stats.user {m['per_user_ms']:.2f} ms; "
                 f"kept {m['events_kept']:,} of {m['events_counted']:,} events")
    if kind in ("ingest", "ingest-stored"):
        extra = f"; growth {m['growth_x_file']:.1f}x the file, peak {m['peak_x_file']:.1f}x; {m['status']}"
    if kind == "retrain":
        extra = (f"; window {m['n_window']:,} events ({m['n_train']:,} train); read {m['read_seconds']:.1f} s, "
                 f"peak after read {_mib(m['vmhwm_after_read'])}"
                 + (f"; Ray processes' peak {_mib(m['ray_peak'])}" if m["ray_peak"] else "")
                 + "; " + ", ".join(f"{k} {v:.1f} s" for k, v in m["timings"].items())
                 + "; peak per phase " + ", ".join(f"{k} {v:,.0f} MiB" for k, v in m["peak_mib"].items()))
    if kind == "monitor":
        extra = f"; reason {m['reason']}"
    return (f"| {kind} | {size} | {label} | {m['seconds']:.1f} s | {_mib(m['peak'])} | {_mib(m['after_imports'])} | "
            f"{_mib(m['growth'])} | {m['runs']}{extra} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, nargs="+", default=[1_000_000, 3_000_000])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ingest-mb", type=float, default=200.0)
    ap.add_argument("--only", default="monitor,serving,ingest")
    ap.add_argument("--tree", type=Path, default=ROOT, help="the checkout under test (default: this one)")
    ap.add_argument("--baseline-tree", type=Path, default=None, help="a checkout to compare with, run alternately")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "recloop-bench-memory")
    ap.add_argument("--json", type=Path, default=None, help="write every run's figures here")
    ap.add_argument("--quick", action="store_true", help="20k events, a 4 MB file, one run (< 60 s)")
    ap.add_argument("--window-days", type=float, default=None,
                    help="retrain: settings.retrain.window_days (default None: the retrain reads everything stored)")
    ap.add_argument("--engine", choices=("pandas", "ray"), default="pandas", help="retrain: the feature engine")
    ap.add_argument("--fit-epochs", type=int, default=1, help="retrain: selection epochs (the refit follows)")
    ap.add_argument("--fit-batches", type=int, default=0,
                    help="retrain: only this many batches per fit, no ranker (Lightning fast_dev_run); 0 = off")
    ap.add_argument("--retrain-timeout", type=float, default=4 * 3600)
    args = ap.parse_args(argv)
    if args.quick:
        args.events, args.runs, args.ingest_mb = [20_000], 1, 4.0
    kinds = [k.strip() for k in args.only.split(",") if k.strip()]
    trees = [("after", args.tree.resolve())]
    if args.baseline_tree is not None:
        trees = [("before", args.baseline_tree.resolve()), *trees]
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; trees: "
          + ", ".join(f"{k}={v}" for k, v in trees), flush=True)

    results: dict = {}
    rows = []
    for n in args.events:
        doc = build_store(args.workdir / f"store-{n}", n)
        print(f"store: {n:,} events, {doc['n_users']:,} users, {doc['n_items']:,} items (built in {doc['seconds']} s)",
              flush=True)
        csv = None
        if ("ingest" in kinds and n == args.events[-1]) or "ingest-stored" in kinds:
            csv = build_landing_csv(args.workdir / f"landing-{args.ingest_mb:g}mb.csv", args.ingest_mb, doc["n_items"])
            csv["path"] = str(args.workdir / f"landing-{args.ingest_mb:g}mb.csv")
            print(f"landing CSV: {csv['bytes'] / 1e6:.0f} MB, {csv['rows']:,} rows", flush=True)
        for kind in kinds:
            if kind == "ingest" and (csv is None or n != args.events[-1]):
                continue
            size = {"ingest": f"{args.ingest_mb:g} MB CSV",
                    "ingest-stored": f"{args.ingest_mb:g} MB CSV into {n / 1e6:g}M events"}.get(kind, f"{n / 1e6:g}M events")
            runs = {label: [] for label, _ in trees}
            for r in range(args.runs):
                for label, tree in trees:  # alternate: the same load for both
                    res = measure(kind, tree, doc, args.workdir, csv, args)
                    runs[label].append(res)
                    print(f"  {kind} {size} {label} run {r + 1}: {res['seconds']:.1f} s, peak {_mib(res['peak'])}, "
                          f"after imports {_mib(res['rss_after_imports'])}", flush=True)
            for label, _ in trees:
                m = summarise(kind, runs[label], csv)
                results.setdefault(kind, {}).setdefault(size, {})[label] = {**m, "all": runs[label]}
                rows.append(_line(kind, size, label, m))
    print("\n| what | size | code | time (median) | peak RSS | RSS after imports | growth | runs / notes |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    if args.baseline_tree is not None:
        print()
        for kind, sizes in results.items():
            for size, by in sizes.items():
                b, a = by["before"], by["after"]
                print(f"{kind} {size}: peak {a['peak'] / b['peak']:.2f}x of before, growth "
                      f"{a['growth'] / max(b['growth'], 1):.2f}x, time {a['seconds'] / b['seconds']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
