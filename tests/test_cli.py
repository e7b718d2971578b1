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
