"""Issue 14, item 1: ingest and the retrain flow touch only files inside their own folders.

``recloop ingest PATH``, ``ingest_batch`` and the flow's ``paths`` parameter accept only files
that resolve (after ``..`` and symlinks) inside ``landing/``; a file from elsewhere comes in only
as a copy (``--copy-from``) and is never moved. The retrain flow's ``drift_report`` (templated
from an event payload, uploaded to MLflow) must resolve under ``reports/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from data_checks.ingest import ingest_all, ingest_batch, pending_batches
from recloop.paths import PathOutsideRoot, confine
from recloop.store import FeedbackStore
from tests.conftest_data_checks import NOW, land, make_events, with_catalog


@pytest.fixture
def dc_settings(settings):
    return with_catalog(settings)


@pytest.fixture
def outside_file(tmp_path):
    """A readable file outside the workspace, shaped like a valid batch (the worst case: it would pass)."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    path = d / "secrets.csv"
    make_events(40, seed=5, prefix="outside").to_csv(path, index=False)
    return path


def _untouched(path: Path, data: bytes) -> bool:
    return path.exists() and path.read_bytes() == data


def _nothing_happened(settings) -> bool:
    return (FeedbackStore.from_settings(settings).count() == 0
            and not any(settings.quarantine_dir.iterdir()) and not any(settings.processed_dir.iterdir()))


def test_ingest_refuses_a_path_outside_landing(dc_settings, outside_file):
    data = outside_file.read_bytes()
    with pytest.raises(ValueError, match="outside"):
        ingest_batch(outside_file, dc_settings, now=NOW)
    assert _untouched(outside_file, data) and _nothing_happened(dc_settings)


def test_ingest_refuses_a_dotdot_path_that_climbs_out_of_landing(dc_settings, outside_file):
    data = outside_file.read_bytes()
    climbing = dc_settings.landing_dir / ".." / ".." / "elsewhere" / outside_file.name
    assert climbing.resolve() == outside_file.resolve()
    with pytest.raises(ValueError, match="outside"):
        ingest_batch(climbing, dc_settings, now=NOW)
    relative = os.path.relpath(outside_file, dc_settings.landing_dir)  # relative paths are relative to landing/
    with pytest.raises(ValueError, match="outside"):
        ingest_batch(relative, dc_settings, now=NOW)
    assert _untouched(outside_file, data) and _nothing_happened(dc_settings)


def test_ingest_refuses_a_symlink_in_landing_that_points_outside(dc_settings, outside_file):
    data = outside_file.read_bytes()
    link = dc_settings.landing_dir / "innocent.csv"
    link.symlink_to(outside_file)
    with pytest.raises(ValueError, match="outside"):
        ingest_batch(link, dc_settings, now=NOW)
    assert pending_batches(dc_settings) == []  # --all and the flow leave it alone, with a warning
    assert ingest_all(dc_settings, now=NOW) == []
    assert link.is_symlink() and _untouched(outside_file, data) and _nothing_happened(dc_settings)


def test_ingest_still_takes_files_in_landing_by_absolute_or_relative_path(dc_settings):
    a = land(dc_settings, make_events(30, seed=1), "a.parquet")
    land(dc_settings, make_events(30, seed=2), "b.parquet")
    assert ingest_batch(a, dc_settings, now=NOW).status == "ingested"
    assert ingest_batch("b.parquet", dc_settings, now=NOW).status == "ingested"  # relative to landing/
    assert FeedbackStore.from_settings(dc_settings).count() == 60


def test_cli_ingest_refuses_an_outside_path_and_copy_from_leaves_the_source(dc_settings, outside_file, monkeypatch):
    from typer.testing import CliRunner

    from recloop.cli import app

    ws = str(dc_settings.root)
    data = outside_file.read_bytes()
    runner = CliRunner()
    res = runner.invoke(app, ["ingest", str(outside_file), "-w", ws, "--json"])
    assert res.exit_code == 1 and "outside" in res.output and "--copy-from" in res.output, res.output
    monkeypatch.chdir(dc_settings.landing_dir)  # a relative CLI path is relative to the shell's directory
    res = runner.invoke(app, ["ingest", os.path.relpath(outside_file), "-w", ws])
    assert res.exit_code == 1 and "outside" in res.output
    assert _untouched(outside_file, data) and _nothing_happened(dc_settings)

    res = runner.invoke(app, ["ingest", "--copy-from", str(outside_file), "-w", ws, "--json"])
    assert res.exit_code == 0, res.output
    out, = json.loads(res.stdout)
    assert out["status"] == "ingested" and out["n_new"] == 40
    assert _untouched(outside_file, data)  # copied, never moved
    assert Path(out["destination"]).parent == dc_settings.processed_dir
    assert Path(out["destination"]).read_bytes() == data
    assert not [p for p in dc_settings.landing_dir.iterdir()]  # no temp file left behind

    res = runner.invoke(app, ["ingest", str(outside_file), "--copy-from", str(outside_file), "-w", ws])
    assert res.exit_code == 1 and "either" in res.output


def test_ingest_flow_refuses_paths_outside_landing_before_touching_anything(dc_settings, outside_file):
    from flows.ingest import ingest_flow

    data = outside_file.read_bytes()
    inside = land(dc_settings, make_events(30, seed=1), "inside.parquet")
    # .fn: the flow's own body, no Prefect server; the check runs before any Prefect call
    with pytest.raises(ValueError, match="outside"):
        ingest_flow.fn(workspace=str(dc_settings.root), paths=[str(inside), str(outside_file)])
    with pytest.raises(ValueError, match="outside"):
        ingest_flow.fn(workspace=str(dc_settings.root), paths=["../../elsewhere/secrets.csv"])
    assert inside.exists() and _untouched(outside_file, data) and _nothing_happened(dc_settings)


def test_confine_keeps_a_path_inside_its_root(tmp_path):
    root = tmp_path / "reports"
    (root / "drift").mkdir(parents=True)
    (tmp_path / "mlflow.db").write_text("x")
    assert confine(root / "drift" / "d.html", root) == (root / "drift" / "d.html").resolve()
    assert confine("drift/d.html", root) == (root / "drift" / "d.html").resolve()
    for bad in (tmp_path / "mlflow.db", root / ".." / "mlflow.db", "../mlflow.db", "/etc/passwd", root, "", "  ",
                "drift/\x00x"):
        with pytest.raises(PathOutsideRoot):
            confine(bad, root)
    (root / "drift" / "link.html").symlink_to(tmp_path / "mlflow.db")
    with pytest.raises(ValueError, match="outside"):
        confine(root / "drift" / "link.html", root)


def test_retrain_drift_report_must_lie_under_reports(settings, tmp_path):
    """What ``flows/retrain.py:retrain_flow`` checks first: ``confine(drift_report, settings.reports_dir)``."""
    report = settings.reports_dir / "drift" / "drift-1.html"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("<html/>")
    assert confine(str(report), settings.reports_dir) == report.resolve()
    for stolen in ("/etc/passwd", str(settings.root / "mlflow.db"), str(settings.reports_dir / ".." / "state"),
                   "../store/catalog.parquet"):
        with pytest.raises(ValueError, match="outside"):
            confine(stolen, settings.reports_dir)


def test_retrain_flow_refuses_a_drift_report_outside_reports(settings):
    """The flow itself: a templated ``drift_report`` from an event cannot point at any readable file."""
    from flows.retrain import retrain_flow

    with pytest.raises(ValueError, match="outside"):  # .fn: the flow's body; the check precedes any Prefect call
        retrain_flow.fn(reason="drift", workspace=str(settings.root), drift_report="/etc/passwd")
