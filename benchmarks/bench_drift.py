"""Benchmark: one drift check (``detect_drift``) over a store of ~1M events.

What is timed: everything ``detect_drift`` does for a champion whose window is days 0-20 of a
28-day synthetic world with drift from day 21 - reading both windows from the Parquet
store (~750k reference + ~250k current events), the reference profile (buckets, vocabulary),
sampling to ``monitor.sample_size``, the feature frame, scoring with a cheap label-free
scorer (stands in for the champion; a real model's scoring cost is its own), the Evidently
report with tests, the HTML and JSON, the decision. Each run is a fresh process; peak memory
is that process's peak RSS (VmHWM; imports included, the peak after imports is shown too).

    .venv/bin/python benchmarks/bench_drift.py                 # build the store once, 3 runs
    .venv/bin/python benchmarks/bench_drift.py --record        # ... and append to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_DAYS, TRAIN_DAYS = 28, 21


def build_store(workdir: Path, target_events: int) -> dict:
    """A 28-day world (drift from day 21), tiled with renamed users/events up to ``target_events``."""
    import pandas as pd

    from recloop.datasets.synthetic import SyntheticConfig, generate
    from recloop.settings import load_settings
    from recloop.store import FeedbackStore

    marker = workdir / "built.json"
    if marker.exists():
        doc = json.loads(marker.read_text())
        if doc["target_events"] == target_events:
            return doc
    t0 = time.perf_counter()
    cfg = SyntheticConfig(seed=5, n_users=3000, n_items=600, n_days=N_DAYS, drift_day=TRAIN_DAYS, drift_items=80,
                          bad_batch_day=None)
    data = generate(cfg)
    copies = max(1, -(-target_events // len(data.events)))
    frames = []
    for k in range(copies):
        ev = data.events.copy()
        ev["event_id"] = ev["event_id"].astype(str) + f"-c{k}"
        ev["user_id"] = ev["user_id"].astype(str) + f"-c{k}"
        frames.append(ev)
    events = pd.concat(frames, ignore_index=True).head(target_events)
    s = load_settings(workdir / "ws").ensure_dirs()
    store = FeedbackStore.from_settings(s)
    store.upsert_catalog(data.catalog)
    store.append(events, batch_id="bench")
    doc = {"target_events": target_events, "events": int(store.count()), "workspace": str(s.root),
           "start": str(data.day_start(0)), "setup_seconds": round(time.perf_counter() - t0, 1)}
    marker.write_text(json.dumps(doc))
    return doc


def _vm_hwm_mib() -> float:
    """Peak resident set size of this process (VmHWM; unlike ru_maxrss it does not inherit the
    parent's high-water mark across fork/exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(workspace: str, start: str) -> None:
    """One timed drift check in this (fresh) process; prints one JSON line."""
    t_import = time.perf_counter()
    import evidently  # noqa: F401  - imported before the clock starts, like a warm worker would have it
    import numpy as np
    import pandas as pd

    from monitoring.drift import detect_drift
    from monitoring.windows import ChampionInfo
    from recloop.settings import load_settings
    from recloop.store import FeedbackStore

    import_s = time.perf_counter() - t_import
    rss_after_import = _vm_hwm_mib()
    s = load_settings(workspace)
    store = FeedbackStore(s.store_dir)
    day0 = pd.Timestamp(start)
    champ = ChampionInfo(version="bench", train_start=day0, train_end=day0 + pd.Timedelta(days=TRAIN_DAYS),
                         holdout_start=day0 + pd.Timedelta(days=TRAIN_DAYS - 3))
    def scorer(rows: pd.DataFrame) -> np.ndarray:  # cheap, label-free stand-in for the champion
        h = pd.util.hash_pandas_object(rows["item_id"].astype(str), index=False).to_numpy()
        return (h % 1000) / 1000.0

    t0 = time.perf_counter()
    out = detect_drift(s, store, champ, scorer=scorer, now=day0 + pd.Timedelta(days=N_DAYS), record=False)
    wall = time.perf_counter() - t0
    peak = _vm_hwm_mib()
    print(json.dumps({"wall_s": wall, "peak_rss_mib": peak, "rss_after_import_mib": rss_after_import,
                      "import_s": import_s, "n_reference": out.n_reference, "n_current": out.n_current,
                      "sampled": [out.n_reference_sampled, out.n_current_sampled], "reason": out.reason,
                      "drift_share": out.drift_share, "triggers": out.triggers}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "recloop-bench-drift"))
    p.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    p.add_argument("--note", default="", help="free text for the record (e.g. 'shared with other agents')")
    p.add_argument("--child", nargs=2, metavar=("WORKSPACE", "START"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    built = build_store(workdir, args.events)
    print(f"store: {built['events']} events at {built['workspace']} (built in {built['setup_seconds']}s)")
    runs = []
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for i in range(args.runs):
        res = subprocess.run([sys.executable, __file__, "--child", built["workspace"], built["start"]],
                             check=False, capture_output=True, text=True, env=env, cwd=ROOT)
        if res.returncode != 0:
            sys.exit(f"run {i} failed:\n{res.stderr[-4000:]}")
        doc = json.loads(res.stdout.strip().splitlines()[-1])
        runs.append(doc)
        print(f"run {i}: {doc['wall_s']:.1f}s, peak RSS {doc['peak_rss_mib']:.0f} MiB "
              f"(after imports {doc['rss_after_import_mib']:.0f} MiB); reference {doc['n_reference']}, current "
              f"{doc['n_current']}, sampled {doc['sampled']}; reason {doc['reason']} share {doc['drift_share']}")
    wall = statistics.median(r["wall_s"] for r in runs)
    peak = statistics.median(r["peak_rss_mib"] for r in runs)
    base = statistics.median(r["rss_after_import_mib"] for r in runs)
    print(f"median of {len(runs)}: {wall:.1f}s, peak RSS {peak:.0f} MiB")
    walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
    if args.record:
        r0 = runs[0]
        section = (
            f"\n## Drift check on {built['events']:,} events (monitoring, `benchmarks/bench_drift.py`)\n\n"
            f"- command: `.venv/bin/python benchmarks/bench_drift.py --runs {args.runs} --record`\n"
            f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU, Python {platform.python_version()}"
            f"{'; ' + args.note if args.note else ''}\n"
            f"- work: read reference ({r0['n_reference']:,}) + current ({r0['n_current']:,}) events from the "
            f"Parquet store, profile, sample to {r0['sampled']}, feature frame, hash scorer (stand-in for the model), Evidently "
            f"report + tests + HTML, decision (`{r0['reason']}`, drift share {r0['drift_share']})\n"
            f"- wall time, median of {len(runs)} fresh processes (imports excluded): **{wall:.1f} s** "
            f"(runs: {walls}; target < 60 s)\n"
            f"- peak memory (VmHWM of the process, imports included): **{peak:.0f} MiB** "
            f"(after imports {base:.0f} MiB; target < 4 GiB)\n"
        )
        with open(ROOT / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write(section)
        print("appended to benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
