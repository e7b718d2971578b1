import json

from typer.testing import CliRunner

from recloop.cli import app

runner = CliRunner()


def test_help_lists_spine_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("generate", "import-movielens", "status", "demo"):
        assert cmd in res.output


def test_generate_into_a_tmp_workspace_then_status(tmp_path):
    ws = tmp_path / "ws"
    res = runner.invoke(app, ["generate", "-w", str(ws), "--users", "40", "--items", "30", "--days", "5",
                              "--drift-day", "3", "--bad-batch-day", "1", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["batches"] == 5 and doc["events"] > 0
    assert len(list((ws / "landing").glob("*.parquet"))) == 5
    res = runner.invoke(app, ["status", "-w", str(ws), "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.stdout)
    assert st["batches_landed"] == 5 and st["catalog_items"] > 0 and st["events_stored"] == 0


def test_import_movielens(tmp_path):
    from tests.conftest import FIXTURES

    res = runner.invoke(app, ["import-movielens", str(FIXTURES / "ml100k"), "-w", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["batches"] == 4
    bad = runner.invoke(app, ["import-movielens", str(tmp_path / "none"), "-w", str(tmp_path)])
    assert bad.exit_code == 1


def test_help_shows_no_type_next_to_flags():
    """Flags take no value: no ``<bool>`` next to ``--help``, ``--json`` or ``--fresh/--no-fresh``; options
    that take a value keep their type."""
    for args in (["--help"], ["status", "--help"], ["demo", "--help"], ["models", "--help"]):
        res = runner.invoke(app, args, terminal_width=80)
        assert res.exit_code == 0, res.output
        assert "--help" in res.output and "<bool>" not in res.output, res.output
    assert "<path>" in runner.invoke(app, ["status", "--help"], terminal_width=80).output


def _versions():
    gates = {"evidence": "pass", "min_auc": "pass 0.7421 >= 0.6",
             "beats_baselines": "fail +0.0081 [-0.0002, +0.0170]",
             "vs_champion_auc": "fail -0.0300 [-0.041, -0.019]", "group_auc_gap:gender": "pass 0.031"}
    metrics = {"auc": 0.742134, "ndcg_at_10": 0.12345, "cold_item_auc": 0.6712, "tail_exposure": 0.0812}
    return [{"version": str(n), "aliases": aliases, "gate_decision": decision, "gate_reasons": "",
             "gates": gates if decision == "rejected" else {}, "metrics": metrics,
             "lineage": {"trigger_reason": "drift: data_drift share 0.62 on 2026-11-29"}}
            for n, aliases, decision in [(12, [], "rejected"), (11, ["champion"], "promoted"),
                                         (10, ["previous"], "promoted")]]


def test_models_reads_at_a_glance_in_80_columns(monkeypatch, capsys):
    """``recloop models`` in an 80-column terminal: every header and value whole (no "versi…", "champ…");
    ``--wide`` shows every metric and the trigger."""
    from models.registry_commands import _render

    monkeypatch.setenv("COLUMNS", "80")
    _render(_versions())
    out = capsys.readouterr().out
    assert "…" not in out, out
    for word in ("version", "aliases", "decision", "auc", "champion", "previous", "promoted", "rejected",
                 "0.7421", "beats_baselines", "vs_champion_auc"):
        assert word in out, (word, out)
    assert max(len(line) for line in out.splitlines()) <= 80
    monkeypatch.setenv("COLUMNS", "200")
    _render(_versions(), wide=True)
    wide = capsys.readouterr().out
    assert all(w in wide for w in ("ndcg_at_10", "cold_item_auc", "tail_exposure", "trigger",
                                   "drift: data_drift"))


def test_models_command_offers_wide(tmp_path):
    res = runner.invoke(app, ["models", "--help"], terminal_width=100)
    assert "--wide" in res.output
    res = runner.invoke(app, ["models", "--wide", "-w", str(tmp_path / "ws")])
    assert res.exit_code == 0, res.output


def test_errors_print_on_one_line_whole(tmp_path):
    """An error names its path whole, on one line, brackets kept: a long path is not wrapped at the console
    width (it broke a message in two under a long temporary folder) and "[...]" is not taken for markup."""
    deep = tmp_path / ("d" * 60) / "[weekly]" / ("e" * 60) / "nowhere"
    res = runner.invoke(app, ["import-recbole", str(deep), "-w", str(tmp_path / "ws")])
    assert res.exit_code == 1
    assert f"error: {deep} does not exist" in res.output.splitlines()
