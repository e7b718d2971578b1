"""Historical data with default settings: import + ingest stores every valid row; replay counts failures."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from recloop.cli import app
from recloop.store import FeedbackStore
from tests.conftest import FIXTURES

runner = CliRunner()


@pytest.fixture
def ws(tmp_path, monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("RECLOOP_"):
            monkeypatch.delenv(key)
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "recloop.toml").write_text("[checks]\ndata_docs = false\n")  # fast; everything else: defaults
    return ws


def _ingest_all(ws) -> list[dict]:
    res = runner.invoke(app, ["ingest", "--all", "-w", str(ws), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.parametrize("command,path,events", [
    ("import-movielens", FIXTURES / "ml100k", 24),
    ("import-recbole", FIXTURES / "recbole" / "tiny", 6),
])
def test_import_then_ingest_stores_every_row_of_1997_data(ws, command, path, events):
    res = runner.invoke(app, [command, str(path), "-w", str(ws), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["events"] == events
    outs = _ingest_all(ws)
    assert outs and all(o["status"] == "ingested" for o in outs), [o["reasons"] for o in outs]
    assert sum(o["n_rows"] for o in outs) == sum(o["n_new"] for o in outs) == events
    store = FeedbackStore(ws / "store")
    assert store.count() == events
    assert store.time_range()[0] < pd.Timestamp("1998-01-01", tz="UTC")


def test_default_retention_is_on_the_data_clock():
    from recloop.settings import CheckSettings

    c = CheckSettings()
    assert c.retention_clock == "data" and c.max_events_per_user >= 737


# ---- replay: a failed retrain is a failure, not a rejection -----------------------------------------------
def _recs():
    days = pd.date_range("1997-09-20", periods=4, freq="7D", tz="UTC")
    base = [{"batch": i, "batch_start": str(d), "auc": None if i == 0 else 0.6} for i, d in enumerate(days)]
    base[1].update(retrained=True, promoted=True, train_seconds=10.0, reason="initial")
    base[2].update(retrained=True, promoted=False, train_seconds=5.0, reason="periodic(every 1)")
    base[3].update(retrained=True, promoted=False, train_seconds=13.1, reason="periodic(every 1)",
                   retrain_error="ValueError: only 0 events stored (need 500)")
    return base


def test_summary_counts_failed_retrains_separately(tmp_path):
    from replay.report import summarize, to_markdown, write_reports

    row = summarize("periodic", _recs())
    assert (row["retrains"], row["promotions"], row["rejected"], row["failed"]) == (3, 1, 1, 1)
    assert row["train_seconds"] == 15.0  # the failed attempt trained nothing
    md = to_markdown([row])
    assert "| failed |" in md.splitlines()[0] and "| 3 | 1 | 1 | 1 | 15.000 |" in md.splitlines()[2]
    out = write_reports(tmp_path, {"periodic": _recs()}, {"source": "movielens", "drift_at": None})
    assert out["failures"] == [{"policy": "periodic", "batch": 3, "batch_start": _recs()[3]["batch_start"],
                                "reason": "periodic(every 1)", "error": "ValueError: only 0 events stored (need 500)"}]
    assert "only 0 events stored" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "replay.json").read_text())["failures"][0]["batch"] == 3


@pytest.mark.parametrize("with_failure,code", [(True, 1), (False, 0)])
def test_replay_command_exits_non_zero_when_a_retrain_failed(tmp_path, monkeypatch, with_failure, code):
    import replay.runner as runner_mod
    from replay.report import write_reports

    recs = _recs() if with_failure else _recs()[:3]
    monkeypatch.setattr(runner_mod, "synthetic_source",
                        lambda period_days=1: runner_mod.ReplaySource("synthetic", [], None, None))

    def fake_run(src, root, cfg, progress=None):
        return {**write_reports(tmp_path / "reports", {"periodic": recs}, {"source": "synthetic"}), "meta": {}}

    monkeypatch.setattr(runner_mod, "run_replay", fake_run)
    res = runner.invoke(app, ["replay", "--policies", "periodic", "-w", str(tmp_path / "ws"), "--json"])
    assert res.exit_code == code, res.output
    if with_failure:
        assert "1 retrain(s) failed" in res.output and "only 0 events stored" in res.output
