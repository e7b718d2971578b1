"""Replay a time-ordered feedback log through the whole loop, once per retraining policy.

For each policy, in its own workspace, batch by batch in time order:

a. **test**: the champion of before the batch scores it (no look-ahead: it never trained
   on the batch), with user histories and item statistics point-in-time from the store
   with the batch ingested: a row at t sees the events older than t - ``settings.feature_lag``
   (the label delay, as in training and serving), the batch's own earlier ones included,
   never its own label; AUC, NDCG@10, per-group AUC and cold-item AUC are recorded, and every
   event's score is kept (``<policy workspace>/scores/``; the baselines' in
   ``<root>/baseline_scores/``) so the report can pool AUC over many batches;
b. **ingest** the batch through the ingest flow (Great Expectations; bad batches are
   quarantined exactly as in production) - before the test of a., which reads the store;
c. **monitor** (drift policy): the monitor flow decides whether to retrain;
d. **train** according to the policy, through the production retrain flow and its gates:
   ``never`` trains once after the first ``initial_periods`` (again each period only while no candidate has
   passed the gates yet: never retrains *after* its first deployment); ``periodic`` then every
   ``every`` periods; ``drift`` whenever the monitor says so.

Progress is saved after every batch (``<policy workspace>/state/replay.json``): a killed
replay continues from the last completed batch.

The policies are independent (each its own workspace, store, MLflow registry): with
``ReplayConfig.workers`` > 1 they run in that many processes at once (:func:`run_replay`), each
worker with its own Prefect home (an ephemeral server and database of its own, unless
``PREFECT_API_URL`` names a server) and its share of the CPU threads. The per-batch baseline AUCs
are shared through one file under a lock: whichever worker reaches a batch first computes them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from models.retention import disk_usage
from recloop.store import atomic_write_json, atomic_write_parquet
from replay.report import batch_file

log = logging.getLogger(__name__)

POLICIES = ("never", "periodic", "drift")

def to_toml(settings: dict) -> str:
    """A small TOML writer for settings overrides (scalars, lists, one level of sections)."""
    import json

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = [f"{k} = {value(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    for section, body in settings.items():
        if isinstance(body, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


@dataclass
class ReplaySource:
    name: str
    batches: list[tuple[pd.Timestamp, pd.DataFrame]]
    catalog: pd.DataFrame
    users: pd.DataFrame
    drift_at: pd.Timestamp | None = None


@dataclass
class ReplayConfig:
    policies: tuple[str, ...] = POLICIES
    initial_periods: int = 8
    every: int = 1
    max_batches: int | None = None
    settings_overrides: dict = field(default_factory=dict)
    min_new_periods: float = 2.0  # storm control in data time: the drift policy waits for this many periods' data
    workers: int | None = None  # policies run in this many processes at once (None: one per policy, up to the CPUs)

    def n_workers(self) -> int:
        wanted = (os.cpu_count() or 1) if self.workers is None else int(self.workers)
        return max(1, min(len(self.policies), wanted))


def replay_overrides(source: ReplaySource, cfg: ReplayConfig) -> dict:
    """Settings for a policy workspace: the caller's overrides, plus storm control in periods of data
    (``monitor.min_new_events`` = ``min_new_periods`` x the median batch size) unless given."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.settings_overrides.items()}
    monitor = out.setdefault("monitor", {})
    monitor.setdefault("cooldown_minutes", 0)  # simulated time: no wall-clock cooldown
    if "min_new_events" not in monitor and source.batches:
        median = float(np.median([len(b) for _, b in source.batches]))
        monitor["min_new_events"] = max(1, int(cfg.min_new_periods * median))
    return out


def synthetic_source(cfg=None, period_days: int = 1) -> ReplaySource:
    from recloop.datasets.batches import split_by_period
    from recloop.datasets.synthetic import generate

    data = generate(cfg)
    if period_days == 1:
        batches = list(data.landing_batches().items())
    else:
        batches = list(split_by_period(data.events, period_days, origin=data.day_start(0)).items())
    drift = data.day_start(data.config.drift_day) if data.config.drift_day is not None else None
    return ReplaySource("synthetic", batches, data.catalog, data.users, drift)


def movielens_source(path, period_days: int = 7) -> ReplaySource:
    from recloop.datasets.batches import split_by_period
    from recloop.datasets.movielens import load_movielens
    from recloop.datasets.recbole import load_recbole

    # the GroupLens folder (u.data, u.item, u.user) or RecBole's atomic files (ml-100k.inter, ...)
    data = load_recbole(path) if any(Path(path).glob("*.inter")) else load_movielens(path)
    return ReplaySource("movielens", list(split_by_period(data.events, period_days).items()), data.catalog,
                        data.users, None)


def should_retrain(policy: str, done_periods: int, cfg: ReplayConfig, monitor: dict | None,
                   has_champion: bool = True) -> tuple[bool, str]:
    """The policy's decision after ``done_periods`` batches have been ingested (``has_champion``: whether a
    model is in production). ``never`` means "never after the first deployment": until a candidate has passed
    the gates it tries again every period, as the drift policy's monitor does ("no champion") - otherwise a
    rejected first candidate would leave it serving nothing and every comparison with it would be vacuous."""
    if done_periods < cfg.initial_periods:
        return False, ""
    if done_periods == cfg.initial_periods:
        return True, "initial"
    if policy == "never" and not has_champion:
        return True, "no_champion"
    if policy == "periodic" and (done_periods - cfg.initial_periods) % cfg.every == 0:
        return True, f"periodic(every {cfg.every})"
    if policy == "drift" and monitor and monitor.get("should_retrain"):
        return True, str(monitor.get("reason") or "drift")
    return False, ""


def _valid_rows(batch: pd.DataFrame, catalog_ids: set[str], end: pd.Timestamp) -> pd.DataFrame:
    """Rows a champion can be judged on (the ingest decides separately what is stored)."""
    df = batch.dropna(subset=["user_id", "item_id", "label", "timestamp"])
    df = df[df["item_id"].isin(catalog_ids) & df["label"].isin([0, 1])]
    df = df[pd.to_datetime(df["timestamp"], utc=True) < end].drop_duplicates("event_id")
    df = df.copy()
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True)
    if "query" not in df:
        df["query"] = None
    return df


def score_batch(model, model_config: dict, batch: pd.DataFrame, history: pd.DataFrame, catalog, users,
                k: int = 10, group_columns=("gender", "age_bucket"), lag=None, out: Path | None = None,
                known: pd.DataFrame | None = None) -> dict:
    """The champion's metrics on ``batch``, each row scored point-in-time from ``history`` older than
    its time minus ``lag`` (the label delay: ``settings.feature_lag``; None = the model's own).
    ``out``: a parquet file that receives every event's score (event_id, label, score); ``known``: the
    events before the batch, whose item popularity sorts items into head and tail (default ``history``)."""
    from models.evaluate import evaluate_scores

    scored = batch[["event_id", "user_id", "item_id", "label", "timestamp"]].copy()
    pairs = batch[["user_id", "item_id", "query", "timestamp"]]
    raw = model.score(pairs, history, catalog) if lag is None else model.score(pairs, history, catalog, lag=lag)
    scored["score"] = np.asarray(raw, dtype=float)
    if out is not None:
        atomic_write_parquet(scored[["event_id", "label", "score"]].reset_index(drop=True), out)
    train_items = set(model_config.get("item_vocab", []))
    known = history if known is None else known
    popularity = known.groupby("item_id").size() if len(known) else pd.Series(dtype=float)
    ev = evaluate_scores(scored, users, train_items, popularity, k=k, group_columns=tuple(group_columns))
    d = ev.to_dict()
    return {key: d.get(key) for key in ("auc", "ndcg_at_k", "recall_at_k", "cold_item_auc", "per_group_auc",
                                        "group_auc_gap", "n_events")}


def baseline_aucs(settings, rows: pd.DataFrame, history: pd.DataFrame, catalog, out: Path | None = None,
                  features: pd.DataFrame | None = None) -> dict:
    """AUC of every baseline on the batch, each fitted on ``history`` (the store before the batch) and scoring
    point-in-time with the same lag over ``features`` (default ``history``; the replay passes the store with the
    batch in it, as the champion gets). Test-then-train, like the champion; baselines do not depend on the policy.
    ``out``: a parquet file that receives every event's label and each baseline's score (a column each)."""
    from models.baselines import make_baselines
    from models.evaluate import auc

    if len(history) == 0 or rows["label"].nunique() < 2:
        return {}
    aucs, scores = {}, pd.DataFrame({"label": rows["label"].to_numpy()})
    for name, baseline in make_baselines(settings).items():
        try:
            baseline.fit(history, history, catalog)
            scores[name] = np.asarray(baseline.score(rows, history if features is None else features, catalog),
                                      dtype=float)
            aucs[name] = auc(scores["label"].to_numpy(), scores[name].to_numpy())
        except ValueError as exc:  # e.g. one class in the history so far
            aucs[name] = None
            log.warning("baseline %s not scored on this batch: %s", name, exc)
    if out is not None:
        atomic_write_parquet(scores, out)
    return aucs


class BaselineCache:
    """Per-batch baseline AUCs shared by the policies (same batches, same ingest), kept on disk for resumes.

    Policy workers in other processes share the file: a lookup of a batch not read yet takes the file lock
    ``<file>.lock``, re-reads the file and computes only what no worker has written yet."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict] = self._read()

    def _read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, i: int, compute) -> dict:
        key = str(i)
        if key in self.data:
            return self.data[key]
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            self.data = self._read()
            if key not in self.data:
                self.data[key] = compute()
                atomic_write_json(self.data, self.path)
        return self.data[key]


class PolicyRun:
    """One policy's replay in its own workspace."""

    def __init__(self, policy: str, source: ReplaySource, root: Path, cfg: ReplayConfig,
                 baselines: BaselineCache | None = None):
        from recloop.settings import load_settings

        self.policy, self.source, self.cfg = policy, source, cfg
        self.baselines = baselines or BaselineCache(root / "baseline_aucs.json")
        self.root = root / policy
        self.root.mkdir(parents=True, exist_ok=True)
        # the flows read settings from the workspace, so the overrides go into its recloop.toml
        toml = self.root / "recloop.toml"
        if not toml.exists():
            toml.write_text("# written by `recloop replay`\n" + to_toml(replay_overrides(source, cfg)))
        self.settings = load_settings(self.root).ensure_dirs()
        self.progress_path = self.settings.state_dir / "replay.json"
        self.scores_dir = self.root / "scores"
        self.records: list[dict] = self._load_progress()
        self._champion = (None, None, None)  # (version, model, config)

    def _load_progress(self) -> list[dict]:
        if self.progress_path.exists():
            return json.loads(self.progress_path.read_text())["records"]
        return []

    def _save_progress(self) -> None:
        atomic_write_json({"policy": self.policy, "records": self.records}, self.progress_path)

    def _champion_model(self):
        from models.registry import champion_version

        version = champion_version(self.settings)
        if version is None:
            return None, None, None
        if self._champion[0] != version:
            from models.registry import load_champion

            model, _info = load_champion(self.settings)
            self._champion = (version, model, model.config)
        return self._champion

    def run(self, progress=None) -> list[dict]:
        from flows.ingest import ingest_flow
        from recloop.datasets.batches import write_batch
        from recloop.store import FeedbackStore

        store = FeedbackStore.from_settings(self.settings)
        if not store.has_catalog():
            store.upsert_catalog(self.source.catalog)
            store.upsert_users(self.source.users)
        catalog_ids = set(self.source.catalog["item_id"])
        batches = self.source.batches[: self.cfg.max_batches] if self.cfg.max_batches else self.source.batches
        for i, (start, batch) in enumerate(batches):
            if i < len(self.records):
                continue
            end = batches[i + 1][0] if i + 1 < len(batches) else start + pd.Timedelta(days=365)
            rec: dict = {"batch": i, "batch_start": str(start), "n_rows": len(batch)}
            version, model, config = self._champion_model()  # the model as it stood before the batch
            rows = _valid_rows(batch, catalog_ids, end)
            before = store.read()
            # b. ingest the batch through the production flow
            t0 = time.perf_counter()
            write_batch(batch, self.settings.landing_dir / f"{self.source.name}-{start.strftime('%Y%m%dT%H%M')}.parquet")
            ingested = ingest_flow(workspace=str(self.settings.root))
            rec["ingest"] = _ingest_summary(ingested)
            rec["ingest_s"] = round(time.perf_counter() - t0, 2)
            # a. test: that model scores the batch; features point-in-time from the store with the batch in it,
            # so a row at t sees what the store held at t - lag (the batch's own earlier events included, as
            # serving would): as fresh as the label lag allows, never the row's own label
            t0 = time.perf_counter()
            history = store.read() if rec["ingest"]["n_new"] else before
            if model is not None:
                if len(rows) and rows["label"].nunique() == 2:
                    rec.update(score_batch(model, config, rows, history, self.source.catalog,
                                           self.source.users, k=self.settings.gates.k,
                                           group_columns=self.settings.gates.group_columns,
                                           lag=self.settings.feature_lag,
                                           out=self.scores_dir / batch_file(i), known=before))
                rec["champion_version"] = version
            rec["score_s"] = round(time.perf_counter() - t0, 2)
            # a'. the same batch, every baseline: fitted on the store before the batch, features as the champion's
            if len(rows):
                rec["baselines"] = self.baselines.get(
                    i, lambda rows=rows, before=before, history=history, i=i: baseline_aucs(
                        self.settings, rows, before, self.source.catalog,
                        out=self.baselines.path.parent / "baseline_scores" / batch_file(i), features=history))
            # c. monitor (the drift policy acts on it)
            monitor = None
            t0 = time.perf_counter()
            if self.policy == "drift" and i + 1 > self.cfg.initial_periods:
                from flows.monitor import monitor_flow

                monitor = monitor_flow(workspace=str(self.settings.root))
                rec["monitor"] = {"should_retrain": monitor.get("should_retrain"), "reason": monitor.get("reason"),
                                  "suppressed_by": monitor.get("suppressed_by")}
                rec["monitor_s"] = round(time.perf_counter() - t0, 2)
            # d. train by policy, through the production retrain flow and its gates
            go, reason = should_retrain(self.policy, i + 1, self.cfg, monitor, has_champion=version is not None)
            if go:
                rec.update(_retrain(self.settings, reason))
            rec["disk_mb"] = round(disk_usage(self.root) / 1e6, 1)  # the policy's workspace, hard links once
            self.records.append(rec)
            self._save_progress()
            if progress is not None:
                progress(self.policy, i + 1, len(batches), rec)
        return self.records


def _ingest_summary(ingested: dict) -> dict:
    """What the ingest flow did with the batch (its ``outcomes``, one per landing file)."""
    outs = ingested.get("outcomes", [])
    return {"files": len(outs), "statuses": [o["status"] for o in outs],
            "n_new": sum(o.get("n_new", 0) for o in outs),
            "n_quarantined": sum(o.get("n_quarantined", 0) for o in outs)}


def _retrain(settings, reason: str) -> dict:
    from flows.retrain import retrain_flow

    t0 = time.perf_counter()
    try:
        out = retrain_flow(reason=reason, workspace=str(settings.root))
    except Exception as exc:  # a failed retrain leaves the champion; the replay records it and goes on
        return {"retrained": True, "promoted": False, "retrain_error": f"{type(exc).__name__}: {exc}",
                "train_seconds": time.perf_counter() - t0, "reason": reason}
    failed = [r["name"] for r in out.get("decision", {}).get("rules", []) if not r.get("passed")]
    return {"retrained": True, "promoted": bool(out.get("promoted")), "reason": reason,
            "version": out.get("version"), "train_seconds": out.get("train_seconds"),
            "candidate_auc": out.get("candidate_metrics", {}).get("auc"), "failed_gates": failed}


def worker_groups(policies: tuple[str, ...], workers: int) -> list[tuple[str, ...]]:
    """Policies split over ``workers`` processes, the costliest first onto the least loaded worker
    (a periodic policy retrains most, never least)."""
    cost = {"periodic": 4.0, "drift": 2.0, "never": 1.0}
    groups: list[list[str]] = [[] for _ in range(max(1, min(workers, len(policies))))]
    load = [0.0] * len(groups)
    for p in sorted(policies, key=lambda p: -cost.get(p, 1.0)):
        j = load.index(min(load))
        groups[j].append(p)
        load[j] += cost.get(p, 1.0)
    return [tuple(p for p in policies if p in g) for g in groups if g]


def _worker_env(root: Path, group: tuple[str, ...], threads: int) -> dict[str, str]:
    """A worker's environment: its own Prefect home and database (no two ephemeral servers share a
    SQLite file) unless a Prefect server is configured, and its share of the CPU threads."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "RECLOOP_REPLAY_THREADS": str(threads), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if not os.environ.get("PREFECT_API_URL"):
        home = root / group[0] / "prefect-replay"
        env.update(PREFECT_HOME=str(home),
                   PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    return env


@contextmanager
def _environ(env: dict[str, str]):
    """``os.environ`` updated with ``env`` inside, restored after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_group(group: tuple[str, ...], source: ReplaySource, root: Path, cfg: ReplayConfig, queue,
               env: dict[str, str]) -> None:
    """A worker process: its policies one after another; progress goes to the parent through ``queue``.
    SIGTERM (the parent stopping it) unwinds like Ctrl-C, so its temporary Prefect server stops with it."""
    from recloop.cli_common import terminate_like_ctrl_c

    # ``env`` is already this process's environment (set around the spawn, see _run_workers)
    Path(env.get("PREFECT_HOME", root)).mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(int(env["RECLOOP_REPLAY_THREADS"]))
    baselines = BaselineCache(root / "baseline_aucs.json")
    with terminate_like_ctrl_c():
        for policy in group:
            PolicyRun(policy, source, root, cfg, baselines).run(
                lambda p, done, total, rec: queue.put(("progress", p, done, total, rec)))


def _run_workers(groups: list[tuple[str, ...]], source: ReplaySource, root: Path, cfg: ReplayConfig,
                 progress=None) -> None:
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")  # a fresh interpreter: no Prefect or torch state copied from this one
    q = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // len(groups))
    envs = [_worker_env(root, g, threads) for g in groups]
    procs = [ctx.Process(target=_run_group, args=(g, source, root, cfg, q, env), name=f"replay-{'+'.join(g)}")
             for g, env in zip(groups, envs)]
    try:
        for p, env in zip(procs, envs):
            with _environ(env):  # the spawned interpreter starts with it: BLAS reads its thread count at import
                p.start()
        while True:
            try:
                msg = q.get(timeout=1.0)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            if msg[0] == "progress" and progress is not None:
                progress(*msg[1:])
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(10)
    bad = [(p.name, p.exitcode) for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError("replay worker(s) failed: " + ", ".join(f"{n} (exit code {c})" for n, c in bad)
                           + "; their progress is saved, run the replay again to resume")


def run_replay(source: ReplaySource, root: Path, cfg: ReplayConfig, progress=None) -> dict:
    """Every policy of ``cfg`` over ``source`` (``cfg.n_workers()`` processes at once), then the reports."""
    from replay.report import write_reports

    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    for policy in cfg.policies:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    groups = worker_groups(cfg.policies, cfg.n_workers())
    if len(groups) > 1:
        _run_workers(groups, source, root, cfg, progress)
        results = {p: PolicyRun(p, source, root, cfg).records for p in cfg.policies}
    else:
        baselines = BaselineCache(root / "baseline_aucs.json")
        results = {p: PolicyRun(p, source, root, cfg, baselines).run(progress) for p in cfg.policies}
    meta = {"source": source.name, "batches": len(source.batches), "drift_at": None if source.drift_at is None
            else str(source.drift_at), "config": {k: v for k, v in asdict(cfg).items()},
            "workers": len(groups), "seconds": round(time.perf_counter() - t0, 1)}
    return {**write_reports(root / "reports" / "replay", results, meta, scores_root=root), "meta": meta}
