from pathlib import Path

import pytest

from recloop.settings import load_settings


def test_every_path_derives_from_the_workspace(tmp_path):
    s = load_settings(tmp_path / "ws")
    root = (tmp_path / "ws").resolve()
    for p in (s.landing_dir, s.processed_dir, s.quarantine_dir, s.store_dir, s.reports_dir, s.models_dir,
              s.state_dir, s.prefect_home):
        assert root in p.parents
    assert s.tracking_uri == f"sqlite:///{root / 'mlflow.db'}"
    assert s.artifact_root.startswith(str(root))
    assert s.prefect_env()["PREFECT_HOME"] == str(root / "prefect")


def test_no_side_effects_until_ensure_dirs(tmp_path):
    s = load_settings(tmp_path / "ws")
    assert not (tmp_path / "ws").exists()
    s.ensure_dirs()
    assert s.landing_dir.is_dir() and s.quarantine_dir.is_dir()


def test_env_overrides_defaults_and_nested(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLOOP_WORKSPACE", str(tmp_path / "from-env"))
    monkeypatch.setenv("RECLOOP_GATES__MIN_AUC", "0.71")
    monkeypatch.setenv("RECLOOP_MODEL_NAME", "recs")
    s = load_settings()
    assert s.root == (tmp_path / "from-env").resolve()
    assert s.gates.min_auc == pytest.approx(0.71)
    assert s.model_name == "recs"


def test_toml_file_is_read_and_env_beats_it(tmp_path, monkeypatch):
    cfg = tmp_path / "recloop.toml"
    cfg.write_text('model_name = "from-toml"\n[training]\nmax_epochs = 2\n[gates]\nmin_auc = 0.55\n')
    monkeypatch.setenv("RECLOOP_CONFIG", str(cfg))
    monkeypatch.setenv("RECLOOP_GATES__MIN_AUC", "0.65")
    s = load_settings(tmp_path / "ws")
    assert s.model_name == "from-toml"
    assert s.training.max_epochs == 2
    assert s.gates.min_auc == pytest.approx(0.65)


def test_workspace_toml_is_picked_up(tmp_path, monkeypatch):
    monkeypatch.delenv("RECLOOP_CONFIG", raising=False)
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "recloop.toml").write_text("[monitor]\ncooldown_minutes = 5\n")
    assert load_settings(ws).monitor.cooldown_minutes == 5


def test_missing_config_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLOOP_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_settings(tmp_path)


def test_unknown_setting_is_rejected(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not_a_setting"):
        load_settings(tmp_path, not_a_setting=1)


def test_explicit_mlflow_uri(tmp_path):
    s = load_settings(tmp_path, mlflow_tracking_uri="http://127.0.0.1:5000")
    assert s.tracking_uri == "http://127.0.0.1:5000"
    assert isinstance(s.workspace, Path)
