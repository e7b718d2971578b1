"""``recloop replay``: compare retraining policies on a time-ordered log."""

from __future__ import annotations

from pathlib import Path

import typer

from recloop.cli_common import JsonOpt, WorkspaceOpt, emit, fail, settings_for, table, terminate_like_ctrl_c


def register(app: typer.Typer) -> None:
    app.command()(replay)


def _days(period: str) -> int:
    p = period.strip().lower()
    if not p.endswith("d") or not p[:-1].isdigit() or int(p[:-1]) < 1:
        raise typer.BadParameter(f"period must look like 1d or 7d, got {period!r}")
    return int(p[:-1])


def replay(
    source: str = typer.Option("synthetic", help="synthetic or movielens"),
    path: Path = typer.Option(None, help="MovieLens-100k folder for --source movielens: GroupLens files "
                                         "(u.data, u.item, u.user) or RecBole atomic files (ml-100k.inter, ...)"),
    period: str = typer.Option(None, help="Batch period, e.g. 1d or 7d (default: 1d synthetic, 7d movielens)"),
    policies: str = typer.Option("never,periodic,drift", help="Comma-separated: never, periodic, drift"),
    initial: int = typer.Option(None, help="Periods before the first training (default: 8 synthetic, 8 movielens)"),
    every: int = typer.Option(1, help="The periodic policy retrains every N periods"),
    max_batches: int = typer.Option(None, help="Stop after N batches (for a quick look)"),
    workers: int = typer.Option(None, help="Policies replayed in this many processes at once "
                                           "(default: one per policy, up to the number of CPUs)"),
    workspace: Path = WorkspaceOpt,
    as_json: bool = JsonOpt,
):
    """Replay batches in time order through ingest, monitor and retrain, per policy; writes reports/replay/."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from replay.runner import POLICIES, ReplayConfig, movielens_source, synthetic_source

    chosen = tuple(p.strip() for p in policies.split(",") if p.strip())
    bad = [p for p in chosen if p not in POLICIES]
    if bad:
        fail(f"unknown policy {', '.join(bad)}; choose from {', '.join(POLICIES)}")
    if source == "synthetic":
        src = synthetic_source(period_days=_days(period or "1d"))
        initial = 8 if initial is None else initial
    elif source == "movielens":
        if path is None:
            fail("--source movielens needs --path to a MovieLens-100k folder")
        try:
            src = movielens_source(path, _days(period or "7d"))
        except FileNotFoundError as exc:
            fail(str(exc))
        initial = 8 if initial is None else initial
    else:
        fail(f"unknown source {source!r}: synthetic or movielens")
    s = settings_for(workspace)
    root = s.root / "replay" if workspace is None else s.root
    cfg = ReplayConfig(policies=chosen, initial_periods=initial, every=every, max_batches=max_batches,
                       workers=workers)
    n = min(len(src.batches), max_batches or len(src.batches))
    from replay.runner import run_replay

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=as_json) as bar:
        tasks = {p: bar.add_task(f"replay {p}", total=n) for p in chosen}

        def progress(policy, done, total, rec):
            bar.update(tasks[policy], completed=done)

        with terminate_like_ctrl_c():  # SIGTERM unwinds like Ctrl-C: the temporary Prefect server stops
            out = run_replay(src, root, cfg, progress)
    emit(out, as_json, _render)
    if out.get("failures"):  # a retrain that raised is a failure of the run, not a rejected candidate
        fail(f"{len(out['failures'])} retrain(s) failed, e.g. {out['failures'][0]['policy']} batch "
             f"{out['failures'][0]['batch']}: {out['failures'][0]['error']} (see {out['markdown']})")


def _render(out: dict) -> None:
    cols = ["policy", "mean_auc", "mean_auc_after_drift", "auc_last_third", "auc_last_20pct_events",
            "pooled_auc_last_20pct_events", "worst_batch_auc", "retrains", "promotions", "rejected", "failed",
            "train_seconds"]
    table("replay", cols, [[_f(r.get(c)) for c in cols] for r in out["summary"]])
    print(f"plot: {out['plot']}\nsummary: {out['markdown']}\nall numbers: {out['json']}")


def _f(v):
    return f"{v:.3f}" if isinstance(v, float) else v
