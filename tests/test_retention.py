"""Registry housekeeping (models/retention.py): heavy artifacts pruned by policy, records kept, files shared.

Real MLflow (SQLite + local artifact store), a tiny model registered five times.
"""

from __future__ import annotations

import os

import pytest

from recloop.settings import load_settings
from tests.test_registry import fake_eval, verdict


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    from models import registry
    from models.testing import make_tiny_encoder
    from models.train import train_recommender
    from recloop.datasets.synthetic import SyntheticConfig, generate

    for key in [k for k in os.environ if k.startswith("RECLOOP_")]:
        os.environ.pop(key)
    root = tmp_path_factory.mktemp("retention")
    s = load_settings(root / "ws").ensure_dirs()
    s.training.encoder_path = str(make_tiny_encoder(root / "encoder"))
    s.training.max_epochs = 1
    w = generate(SyntheticConfig(seed=3, n_users=80, n_items=60, n_days=10, drift_day=None, bad_batch_day=None))
    trained = train_recommender(s, w.events, w.catalog, w.users, ranker="none")
    model_dir = trained.model.save(root / "model")
    versions = []
    for i in range(5):
        _, v = registry.log_and_register(s, model_dir=model_dir, evaluation=fake_eval(1.0), decision=verdict(False),
                                         lineage={"snapshot_hash": f"h{i}"})
        registry.reject(s, v, verdict(False, candidate_version=v))
        versions.append(v)
    c = registry.client(s)
    c.set_registered_model_alias(s.model_name, "champion", versions[1])
    c.set_registered_model_alias(s.model_name, "previous", versions[0])
    return {"settings": s, "versions": versions}


def _model_dir(s, v):
    from models.registry import client
    from models.retention import _local_path

    return _local_path(client(s).get_model_version_download_uri(s.model_name, v))


def test_identical_encoders_are_stored_once(reg):
    from models.retention import artifact_root_path, disk_usage, share_files

    s = reg["settings"]
    art = artifact_root_path(s)
    a, b = (_model_dir(s, v) for v in reg["versions"][3:5])
    big_a = max((p for p in a.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    big_b = b / big_a.relative_to(a)
    assert big_a.read_bytes() == big_b.read_bytes() and not os.path.samefile(big_a, big_b)
    before = disk_usage(art)
    saved = share_files(s, art, min_bytes=64 * 1024)
    assert saved > 0 and os.path.samefile(big_a, big_b)  # one inode now
    assert disk_usage(art) < before
    assert big_a.stat().st_mode & 0o222 == 0  # shared blobs are read-only: an in-place writer fails loudly
    assert share_files(s, art, min_bytes=64 * 1024) == 0  # idempotent


def test_prune_keeps_aliases_and_the_newest_and_all_records(reg):
    from models import registry
    from models.retention import PRUNED_TAG, prune_versions

    s, (v1, v2, v3, v4, v5) = reg["settings"], reg["versions"]
    out = prune_versions(s, keep_last=1)
    assert sorted(out.pruned) == sorted([v3, v4]), out  # not previous (v1), champion (v2) nor the newest (v5)
    assert set(out.kept) == {v1, v2, v5} and not out.errors
    c = registry.client(s)
    for v in (v3, v4):
        mv = c.get_model_version(s.model_name, v)
        assert PRUNED_TAG in mv.tags and int(mv.tags["artifacts_pruned_bytes"]) > 0
        assert not _model_dir(s, v).exists() or not any(_model_dir(s, v).iterdir())
        assert c.get_run(mv.run_id).data.metrics["auc"] > 0  # the record stays
        with pytest.raises(registry.ModelLoadError, match="pruned by the retention policy"):
            registry.load_version(s, v)
    assert len(registry.list_versions(s)) == 5
    _model, info = registry.load_champion(s)  # champion and previous still load
    assert info["version"] == v2 and registry.load_version(s, v1)[1]["version"] == v1
    again = prune_versions(s, keep_last=1)
    assert again.pruned == []  # idempotent


def test_a_pending_challenger_is_never_pruned(reg):
    from models import registry
    from models.retention import prune_versions

    s = reg["settings"]
    _, v6 = registry.log_and_register(s, model_dir=registry.load_version(s, reg["versions"][1])[1]["model_dir"],
                                      evaluation=fake_eval(1.0), decision=verdict(False),
                                      lineage={"snapshot_hash": "h6"})
    registry.client(s).delete_registered_model_alias(s.model_name, "challenger")
    out = prune_versions(s, keep_last=0)
    assert v6 in out.kept and v6 not in out.pruned  # pending: its decision is still to come
    assert reg["versions"][4] in out.pruned  # keep_last=0: the newest decided one goes too


def test_cli_prune(reg):
    import json

    from typer.testing import CliRunner

    from recloop.cli import app

    s = reg["settings"]
    res = CliRunner().invoke(app, ["prune", "--workspace", str(s.root), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["disk_bytes_after"] <= out["disk_bytes_before"] and not out["errors"]
