"""``make demo``: the whole loop, driven through the same deployments and trigger as production.

1. a fresh workspace; the synthetic world is generated into ``upstream/`` (stands in for
   the systems that deliver feedback files)
2. the stack starts: a Prefect server and the served deployments (ingest, monitor, retrain)
3. wave 1 (days before the drift) lands -> ``ingest`` deployment (the planted bad batch is
   quarantined) -> ``monitor`` deployment (no champion yet) -> ``recloop.drift.detected`` ->
   the event trigger runs ``retrain`` -> first model registered and promoted
4. wave 2 (the drifted days) lands -> ingest -> monitor (drift) -> event -> retrain ->
   the candidate is judged against the champion on the same events -> promoted or rejected
5. a summary: stages, the gate table, versions and aliases, where the UIs and reports are
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import UTC
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()

DEMO_TOML = """# written by `recloop demo`: settings for the embedded default
[monitor]
cooldown_minutes = 0
"""


def _land(files: list[Path], landing: Path) -> None:
    landing.mkdir(parents=True, exist_ok=True)
    for f in files:
        os.replace(f, landing / f.name)


def _final(state_type: str) -> bool:
    return state_type in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def wait_for_triggered_run(deployment: str, after, timeout: float = 900.0):
    """Wait for a run of ``deployment`` created after ``after`` to appear and finish."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
    )

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                flow_run_filter=FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(after_=after)),
            )
            runs = [r for r in runs if r.created and r.created >= after]
            if runs:
                run = min(runs, key=lambda r: r.created)
                if run.state and _final(run.state.type.value):
                    return run
            time.sleep(2)
    raise TimeoutError(f"no finished run of {deployment} created after {after} within {timeout:.0f}s")


def run_loop_demo(settings, fresh: bool = True) -> dict:
    from prefect.deployments import run_deployment

    from flows.retrain import latest_outcome
    from flows.stack import Stack
    from recloop.datasets.batches import write_batches
    from recloop.datasets.synthetic import SyntheticConfig, generate
    from recloop.settings import load_settings
    from recloop.store import FeedbackStore

    t_start = time.perf_counter()
    root = settings.root
    if fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "recloop.toml").exists():
        (root / "recloop.toml").write_text(DEMO_TOML)
    settings = load_settings(root).ensure_dirs()
    stages: list[tuple[str, str, str]] = []

    def stage(name: str, t0: float, detail: str) -> None:
        stages.append((name, f"{time.perf_counter() - t0:.0f}s", detail))
        console.print(f"[bold green]✓[/] {name}: {detail}")

    # 1. the world
    t0 = time.perf_counter()
    cfg = SyntheticConfig()
    data = generate(cfg)
    store = FeedbackStore.from_settings(settings)
    store.upsert_catalog(data.catalog)
    store.upsert_users(data.users)
    upstream = root / "upstream"
    files = write_batches(data.landing_batches(), upstream, "synthetic", "parquet")
    split = cfg.drift_day - 4
    wave1, wave2 = files[:split], files[split:]
    stage("generate", t0, f"{len(data.events)} events, {len(data.catalog)} items, {len(data.users)} users; "
                          f"drift from day {cfg.drift_day}, bad batch on day {cfg.bad_batch_day}")

    # 2. the stack (MLflow UI and serving are started by `recloop up` afterwards, not needed here)
    t0 = time.perf_counter()
    stack = Stack(settings, with_mlflow=False, with_serving=False)
    stack.start()
    try:
        stack.wait_for_deployments()
        stage("prefect stack", t0, f"server {stack.prefect_url}, deployments ingest/monitor/retrain served")
        waves = {}
        with stack.client_settings():
            for label, wave in (("wave 1 (before drift)", wave1), ("wave 2 (drifted days)", wave2)):
                waves[label] = _run_wave(label, wave, settings, stage, run_deployment)
        outcome = latest_outcome(settings)
    finally:
        stack.stop()

    _summary(settings, stages, waves, outcome, time.perf_counter() - t_start)
    return {"stages": stages, "waves": waves, "retrain": outcome}


def _run_wave(label, wave, settings, stage, run_deployment) -> dict:
    from datetime import datetime

    t0 = time.perf_counter()
    _land(wave, settings.landing_dir)
    ingest = run_deployment("ingest/ingest", timeout=600)
    _check(ingest, "ingest")
    processed = len(list(settings.processed_dir.glob("*.parquet")))
    quarantined = sorted(p.name for p in settings.quarantine_dir.glob("*.parquet") if ".rejected." not in p.name)
    stage(f"{label}: ingest", t0, f"{len(wave)} files -> {processed} processed so far, quarantined: "
                                  f"{', '.join(quarantined) or 'none'} (run {ingest.name})")
    t0 = time.perf_counter()
    before_monitor = datetime.now(UTC)
    monitor = run_deployment("monitor/monitor", timeout=600)
    _check(monitor, "monitor")
    drift = _latest_drift(settings)
    stage(f"{label}: monitor", t0, f"should_retrain={drift.get('should_retrain')} reason={drift.get('reason')} "
                                   f"(run {monitor.name})")
    if not drift.get("should_retrain"):
        return {"ingest": ingest.name, "monitor": monitor.name, "retrain": None}
    t0 = time.perf_counter()
    run = wait_for_triggered_run("retrain/retrain", before_monitor)
    _check(run, "retrain")
    from flows.retrain import latest_outcome

    out = latest_outcome(settings) or {}
    stage(f"{label}: retrain (event-triggered)", t0,
          f"run {run.name}: version {out.get('version')} {'PROMOTED' if out.get('promoted') else 'rejected'}; "
          f"AUC {out.get('candidate_metrics', {}).get('auc', float('nan')):.3f}")
    return {"ingest": ingest.name, "monitor": monitor.name, "retrain": run.name, "retrain_id": str(run.id),
            "outcome": out}


def _check(run, what: str) -> None:
    if run.state is None or run.state.type.value != "COMPLETED":
        raise RuntimeError(f"{what} run {run.name} ended {run.state.type.value if run.state else 'without state'}: "
                           f"{run.state.message if run.state else ''}")


def _latest_drift(settings) -> dict:
    path = settings.reports_dir / "drift" / "latest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _summary(settings, stages, waves, outcome, seconds) -> None:
    from recloop.status import workspace_status

    t = Table(title=f"recloop demo: the loop in {seconds:.0f}s")
    for c in ("stage", "took", "what happened"):
        t.add_column(c)
    for row in stages:
        t.add_row(*row)
    console.print(t)
    if outcome:
        dec = outcome.get("decision", {})
        g = Table(title=f"gates for version {outcome['version']} vs champion v{outcome.get('champion_version_before')}: "
                        f"{'PROMOTE' if dec.get('promote') else 'REJECT'}")
        for c in ("rule", "candidate", "95% CI", "champion", "threshold", "verdict"):
            g.add_column(c)
        for r in dec.get("rules", []):
            ci = f"[{_fmt(r.get('low'))}, {_fmt(r.get('high'))}]" if r.get("low") is not None else "-"
            g.add_row(str(r.get("name")), _fmt(r.get("value")), ci, _fmt(r.get("champion")),
                      f"{r.get('op', '')} {_fmt(r.get('threshold'))}", "pass" if r.get("passed") else "[red]FAIL[/]")
        console.print(g)
        b = Table(title="the same eval events: candidate, champion and every baseline")
        for c in ("model", "AUC", "NDCG@k (catalog)", "tail exposure", "cold-item AUC"):
            b.add_column(c)
        rows = [("candidate", outcome.get("candidate_metrics") or {}),
                ("champion", outcome.get("champion_metrics") or {}),
                *(outcome.get("baseline_metrics") or {}).items()]
        for name, m in rows:
            if m:
                b.add_row(name, _fmt(m.get("auc")), _fmt(m.get("ndcg_at_k")), _fmt(m.get("tail_exposure")),
                          _fmt(m.get("cold_item_auc")))
        console.print(b)
        for reason in dec.get("reasons", []):
            console.print(f"[red]reason[/]: {reason}")
    st = workspace_status(settings)
    console.print("model versions: " + ", ".join(
        f"v{m['version']}[{','.join(m['aliases']) or '-'}]" for m in st["models"]))
    console.print(f"workspace: {settings.root}\nreports: {settings.reports_dir}\n"
                  f"Prefect UI + MLflow UI: run `recloop up -w {settings.root}` then open "
                  f"http://127.0.0.1:{settings.prefect_port} and http://127.0.0.1:{settings.mlflow_port}")


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)
