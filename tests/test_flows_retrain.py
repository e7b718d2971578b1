"""The retrain flow on a real (ephemeral) Prefect API: success, failure, one at a time."""

from __future__ import annotations

import json
import threading

import pytest

from tests.conftest import permissive_toml

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    import os

    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def workspace(tmp_path, small_world, tiny_encoder):
    from recloop.settings import load_settings
    from recloop.store import FeedbackStore

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "recloop.toml").write_text(_toml(tiny_encoder))
    settings = load_settings(ws).ensure_dirs()
    store = FeedbackStore.from_settings(settings)
    store.upsert_catalog(small_world.catalog)
    store.upsert_users(small_world.users)
    store.append(small_world.events, batch_id="seed")
    return settings


def _toml(encoder) -> str:
    return permissive_toml(encoder)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from models.testing import make_tiny_encoder

    return make_tiny_encoder(tmp_path_factory.mktemp("enc"))


def test_retrain_registers_promotes_and_reports(harness, workspace):
    from flows.retrain import latest_outcome, retrain_flow
    from models.registry import champion_version as load_champion_version

    out = retrain_flow(reason="initial", workspace=str(workspace.root))
    failed = [(r["name"], r["detail"]) for r in out["decision"]["rules"] if not r["passed"]]
    assert out["promoted"], failed
    assert out["version"] == "1" and load_champion_version(workspace) == "1"
    assert out["lineage"]["trigger_reason"] == "initial" and out["lineage"]["prefect_flow_run_id"]
    assert latest_outcome(workspace)["version"] == "1"
    rules = {r["name"] for r in out["decision"]["rules"]}
    assert {"evidence", "min_auc", "beats_baselines", "tail_exposure"} <= rules

    # a second candidate is judged against the champion on the same events
    out2 = retrain_flow(reason="drift", workspace=str(workspace.root))
    assert out2["champion_version_before"] == "1"
    assert out2["champion_metrics"]["n_events"] == out2["candidate_metrics"]["n_events"]
    assert any(r["name"] == "vs_champion_auc" for r in out2["decision"]["rules"])


def test_failed_retrain_leaves_the_champion_and_the_run_red(harness, workspace, tmp_path):
    from flows.retrain import retrain_flow
    from models.registry import champion_version as load_champion_version

    assert retrain_flow(reason="initial", workspace=str(workspace.root))["promoted"]
    (workspace.root / "recloop.toml").write_text(_toml(tmp_path / "gone"))  # the encoder vanished
    state = retrain_flow(reason="broken", workspace=str(workspace.root), return_state=True)
    assert state.is_failed()
    assert load_champion_version(workspace) == "1"
    runs = [json.loads(line) for line in (workspace.state_dir / "retrain_runs.jsonl").read_text().splitlines()]
    assert runs[-1]["succeeded"] is False and "gone" in runs[-1]["error"]


def test_two_concurrent_retrains_never_overlap(harness, workspace):
    from flows.retrain import retrain_flow

    errors = []

    def submit(reason):
        try:
            retrain_flow(reason=reason, workspace=str(workspace.root))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(f"r{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    runs = [json.loads(line) for line in (workspace.state_dir / "retrain_runs.jsonl").read_text().splitlines()]
    assert len(runs) == 2 and all(r["succeeded"] for r in runs)
    first, second = sorted(runs, key=lambda r: r["held_from"])
    assert first["held_to"] <= second["held_from"], "the retrain slot was held by two runs at once"


def test_degraded_candidate_is_rejected_by_the_real_gates(harness, workspace, monkeypatch):
    """A candidate trained on shuffled labels goes through the real gates (defaults, except evidence
    minimums sized to this small world) and is rejected; the champion stays."""
    import numpy as np

    from flows.retrain import retrain_flow
    from models import train as train_mod
    from models.registry import champion_version as load_champion_version

    assert retrain_flow(reason="initial", workspace=str(workspace.root))["promoted"]
    toml = workspace.root / "recloop.toml"
    enc = str(workspace.training.encoder_path)
    toml.write_text(f'[training]\nencoder_path = "{enc}"\nmax_epochs = 1\n'
                    "[gates]\nmin_eval_events = 300\nmin_eval_positives = 30\nmin_eval_negatives = 30\n"
                    "catalog_eval_users = 100\n")
    real = train_mod.train_recommender

    def shuffled(settings, events, *a, **kw):
        events = events.copy()
        events["label"] = np.random.default_rng(0).permutation(events["label"].to_numpy())
        return real(settings, events, *a, **kw)

    monkeypatch.setattr(train_mod, "train_recommender", shuffled)
    out = retrain_flow(reason="degraded", workspace=str(workspace.root))
    failed = {r["name"] for r in out["decision"]["rules"] if not r["passed"]}
    assert not out["promoted"] and out["champion_version_after"] == "1" == load_champion_version(workspace)
    assert {"vs_champion_auc", "beats_baselines"} <= failed, out["decision"]["reasons"]
    assert out["decision"]["candidate_version"] == out["version"] and out["decision"]["champion_version"] == "1"


def test_sigterm_during_a_retrain_is_recorded_in_its_audit_line(harness, workspace, monkeypatch):
    import os
    import signal

    import flows.retrain as fr
    from flows.retrain import Terminated, retrain_flow
    from models.registry import champion_version as load_champion_version

    def killed(settings, data):
        os.kill(os.getpid(), signal.SIGTERM)  # what a supervisor or `docker stop` sends
        raise AssertionError("SIGTERM did not stop the retrain")

    monkeypatch.setattr(fr, "train", fr.task(killed, name="train-candidate"))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        retrain_flow(reason="sigterm", workspace=str(workspace.root))
    runs = [json.loads(line) for line in (workspace.state_dir / "retrain_runs.jsonl").read_text().splitlines()]
    assert runs[-1]["signal"] == "SIGTERM" and runs[-1]["succeeded"] is False
    assert load_champion_version(workspace) is None
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is restored
