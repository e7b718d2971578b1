"""``make demo``: the whole loop on the embedded default, stage by stage.

Each stage is provided by a room; a stage whose room is not built yet is listed as
such instead of failing, so the demo always says exactly what it ran.
"""

from __future__ import annotations

import importlib.util
import shutil
import time

from rich.console import Console
from rich.table import Table

console = Console()


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def run_demo(settings, fresh: bool = True) -> dict:
    if _have("flows.demo"):
        from flows.demo import run_loop_demo  # the full loop, driven through Prefect deployments

        return run_loop_demo(settings, fresh=fresh)

    from recloop.datasets import land_synthetic

    if fresh and settings.root.exists():
        shutil.rmtree(settings.root)
    settings.ensure_dirs()
    stages: list[tuple[str, str, str]] = []
    t0 = time.perf_counter()
    out = land_synthetic(settings)
    stages.append(("generate", "done", f"{out['events']} events in {out['batches']} daily batches, "
                                       f"drift from day {out['drift_day']}, bad batch on day {out['bad_batch_day']} "
                                       f"({time.perf_counter() - t0:.1f}s)"))
    for name, module in [("ingest + validate (GX)", "data_checks"), ("train BERT recommender", "models.train"),
                         ("register + gates (MLflow)", "models.registry"), ("drift (Evidently)", "monitoring.drift"),
                         ("flows (Prefect)", "flows.demo")]:
        stages.append((name, "not built yet", f"needs {module}"))
    t = Table(title="recloop demo")
    for c in ("stage", "status", "detail"):
        t.add_column(c)
    for row in stages:
        t.add_row(*row)
    console.print(t)
    console.print(f"workspace: {settings.root}")
    return {"stages": stages}
