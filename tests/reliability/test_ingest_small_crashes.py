"""Issue 14, item 8 (ingest parts): a landing folder on another filesystem, and an empty quarantine id.

Cross-filesystem moves are simulated: ``os.replace`` raises ``EXDEV`` whenever a file would leave
``landing/`` for another folder, exactly as the kernel does when ``landing/`` is its own mount.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from data_checks.ingest import ingest_batch
from data_checks.quarantine import list_quarantine, release
from recloop.store import FeedbackStore
from tests.conftest_data_checks import NOW, land, make_events, with_catalog


@pytest.fixture
def dc_settings(settings):
    return with_catalog(settings)


@pytest.fixture
def landing_on_another_filesystem(dc_settings, monkeypatch):
    """``os.replace`` out of ``landing/`` into another folder fails with EXDEV, as across two mounts."""
    real_replace = os.replace
    landing = dc_settings.landing_dir.resolve()

    def replace(src, dst, *a, **kw):
        s, d = Path(src).resolve().parent, Path(dst).resolve().parent
        if (s == landing) != (d == landing):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    return dc_settings


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith(".validation.json"))


def test_ingest_completes_when_landing_is_on_another_filesystem(landing_on_another_filesystem):
    s = landing_on_another_filesystem
    path = land(s, make_events(120), "day.parquet")
    data = path.read_bytes()
    out = ingest_batch(path, s, now=NOW)
    assert out.status == "ingested" and out.n_new == 120
    assert not path.exists()
    moved, = _data_files(s.processed_dir)
    assert moved == Path(out.destination) and moved.read_bytes() == data
    assert not [p for p in s.processed_dir.iterdir() if p.name.startswith(".")]  # no temp file left
    assert FeedbackStore.from_settings(s).count() == 120
    again = ingest_batch(path, s, now=NOW)  # repeat: nothing to do
    assert again.status == "skipped" and FeedbackStore.from_settings(s).count() == 120


def test_cross_filesystem_move_interrupted_after_the_copy_resumes_without_duplicates(landing_on_another_filesystem,
                                                                                     monkeypatch):
    s = landing_on_another_filesystem
    df = make_events(150)
    df.loc[[3, 4], "item_id"] = "item-unknown"  # a split batch: its rejected rows must survive too
    path = land(s, df, "crash.parquet")
    data = path.read_bytes()
    real_unlink = os.unlink

    def unlink_crashes_on_the_landing_file(p, *a, **kw):
        if Path(p) == path:
            raise RuntimeError("power cut after the copy was published, before the source was removed")
        return real_unlink(p, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink_crashes_on_the_landing_file)
    with pytest.raises(RuntimeError, match="power cut"):
        ingest_batch(path, s, now=NOW)
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert path.exists() and (s.processed_dir / path.name).read_bytes() == data  # both copies, whole

    out = ingest_batch(path, s, now=NOW)  # the restart
    assert out.resumed and out.status == "partial" and (out.n_new, out.n_duplicate) == (0, 148)
    assert not path.exists()
    assert _data_files(s.processed_dir) == [s.processed_dir / path.name]  # one file, not a second copy
    assert FeedbackStore.from_settings(s).count() == 148
    rejected = [e for e in list_quarantine(s) if e["kind"] == "rows"]
    assert len(rejected) == 1 and rejected[0]["n_rows"] == 2


def test_cross_filesystem_move_interrupted_during_the_copy_leaves_no_partial_file(landing_on_another_filesystem,
                                                                                  monkeypatch):
    s = landing_on_another_filesystem
    path = land(s, make_events(80), "torn.parquet")
    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync_fails_once(fd):
        st = os.fstat(fd)
        if calls["n"] == 0 and st.st_size == path.stat().st_size:  # the copy of the batch itself
            calls["n"] += 1
            raise OSError(errno.EIO, "disk went away mid-copy")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_fails_once)
    with pytest.raises(OSError, match="mid-copy"):
        ingest_batch(path, s, now=NOW)
    assert path.exists() and _data_files(s.processed_dir) == []
    assert not [p for p in s.processed_dir.iterdir() if p.name.startswith(".")]
    out = ingest_batch(path, s, now=NOW)
    assert out.status == "ingested" and out.resumed and FeedbackStore.from_settings(s).count() == 80
    assert _data_files(s.processed_dir) == [s.processed_dir / path.name]


@pytest.mark.parametrize("empty", ["", "   ", "\t"])
def test_quarantine_release_rejects_an_empty_id(dc_settings, empty):
    df = make_events(100)
    df["event_type"], df["label"] = "like", 1  # 100 % likes: the whole batch is held
    out = ingest_batch(land(dc_settings, df, "likes.parquet"), dc_settings, now=NOW)
    assert out.status == "quarantined"
    held = Path(out.destination)
    data = held.read_bytes()
    with pytest.raises(ValueError, match="empty id"):
        release(dc_settings, empty, now=NOW)
    assert [e["id"] for e in list_quarantine(dc_settings)] == [out.batch_id] and held.read_bytes() == data


def test_cli_quarantine_release_rejects_an_empty_id(dc_settings):
    from typer.testing import CliRunner

    from recloop.cli import app

    bad = make_events(100)
    bad.loc[:29, "item_id"] = "item-unknown"  # 30 % bad rows: the whole batch is held
    out = ingest_batch(land(dc_settings, bad, "held.parquet"), dc_settings, now=NOW)
    assert out.status == "quarantined"
    sidecar = Path(out.validation_path).read_text()
    res = CliRunner().invoke(app, ["quarantine", "release", "", "-w", str(dc_settings.root), "--json"])
    assert res.exit_code == 1 and "empty id" in res.output, res.output
    assert Path(out.validation_path).read_text() == sidecar  # not re-validated
    assert json.loads(sidecar)["outcome"]["status"] == "quarantined"
