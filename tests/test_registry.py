"""MLflow registry: logging, pyfunc packaging, promote / reject / rollback, concurrency, corrupted files.

One module-scoped workspace: a tiny model is trained once (random tiny BERT from
``models.testing.make_tiny_encoder``) and registered three times; each test resets the
aliases it relies on. Real MLflow (SQLite + local artifacts), no mocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.evaluate import Evaluation
from models.gates import GateDecision, GateRule
from recloop.settings import load_settings

REPO = Path(__file__).resolve().parents[1]


def verdict(promote: bool = True, champion_version=None, *, has_champion: bool | None = None,
            candidate_version=None) -> GateDecision:
    """A gate decision built by hand: these tests are about the registry, not the gate rules
    (tests/test_gates.py). ``champion_version``: the champion it was judged against."""
    has_champion = champion_version is not None if has_champion is None else has_champion
    rules = [GateRule("min_auc", 0.71, 0.6, True, "0.7100 >= 0.6000")]
    if has_champion:
        rules.append(GateRule("vs_champion_auc", 0.02 if promote else -0.2, -0.01, promote,
                              "AUC delta vs the champion " + ("within" if promote else "below") + " the margin",
                              champion=0.69))
    elif not promote:
        rules[0] = GateRule("min_auc", 0.5, 0.6, False, "0.5000 < 0.6000")
    return GateDecision(promote=promote, rules=rules, has_champion=has_champion, champion_version=champion_version,
                        candidate_version=candidate_version)


def fake_eval(signal: float, n: int = 400, seed: int = 0) -> Evaluation:
    """An Evaluation with scored events (event_id) so the gates can pair two of them."""
    rng = np.random.default_rng(seed)
    y = np.random.default_rng(99).integers(0, 2, n)
    scored = pd.DataFrame({"event_id": [f"e{i}" for i in range(n)], "user_id": [f"u{i % 40}" for i in range(n)],
                           "item_id": [f"i{i % 30}" for i in range(n)], "label": y,
                           "score": signal * y + rng.normal(size=n)})
    from models.evaluate import auc

    return Evaluation(auc=auc(y, scored["score"]), ndcg_at_k=0.4, recall_at_k=0.5,
                      per_group_auc={"gender": {"female": 0.7, "male": 0.72}},
                      group_auc_gap={"gender": 0.02}, cold_item_auc=0.6, tail_exposure=0.3, n_events=n, n_users=40,
                      per_group_n={"gender": {"female": 200, "male": 200}}, scored=scored)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from models.testing import make_tiny_encoder
    from models.train import train_recommender
    from recloop.datasets.synthetic import generate
    from recloop.store import FeedbackStore
    from tests.conftest import small_world_config

    for key in [k for k in os.environ if k.startswith("RECLOOP_")]:
        os.environ.pop(key)
    root = tmp_path_factory.mktemp("registry")
    s = load_settings(root / "ws").ensure_dirs()
    s.training.encoder_path = str(make_tiny_encoder(root / "encoder"))
    s.training.max_epochs = 1
    w = generate(small_world_config())
    store = FeedbackStore.from_settings(s)
    store.upsert_catalog(w.catalog)
    store.upsert_users(w.users)
    store.append(w.events, "batch-0001")
    events = w.events.sort_values("timestamp").reset_index(drop=True)
    train = events.iloc[: int(len(events) * 0.8)]
    trained = train_recommender(s, train, w.catalog, w.users)
    model_dir = trained.model.save(root / "model")
    drift = root / "drift.html"
    drift.write_text("<html><body>drift report</body></html>")

    from models import registry

    versions, runs = [], []
    for i in range(3):
        ev = fake_eval(1.0 + 0.2 * i)
        decision = verdict(True)
        run_id, v = registry.log_and_register(
            s, model_dir=model_dir, evaluation=ev, champion_evaluation=None, decision=decision,
            lineage={"snapshot_hash": f"hash{i}", "window_start": "2024-01-01", "window_end": "2024-01-10",
                     "batch_ids": "batch-0001", "prefect_flow_run_id": f"run-{i}", "git_commit": "abc123",
                     "trigger_reason": "test"},
            params={"seed": 42}, history=trained.history, train_data=train, drift_report_path=str(drift) if i == 0 else None,
        )
        versions.append(v)
        runs.append(run_id)
    return {"settings": s, "versions": versions, "runs": runs, "events": events, "catalog": w.catalog,
            "model": trained.model, "model_dir": model_dir, "history": trained.history}


def reset(s, champion=None, previous=None):
    from models.registry import client

    c = client(s)
    for alias in ("champion", "previous", "challenger"):
        try:
            c.delete_registered_model_alias(s.model_name, alias)
        except Exception:  # noqa: S112 - the alias was not set
            continue
    if champion:
        c.set_registered_model_alias(s.model_name, "champion", champion)
    if previous:
        c.set_registered_model_alias(s.model_name, "previous", previous)


def aliases(s) -> dict:
    from models.registry import client

    return {a: str(v) for a, v in client(s).get_registered_model(s.model_name).aliases.items()}


# --------------------------------------------------------------------------- logging
def test_run_has_params_metrics_lineage_dataset_and_artifacts(world):
    from models.registry import client

    s, run_id, v = world["settings"], world["runs"][0], world["versions"][0]
    c = client(s)
    run = c.get_run(run_id)
    assert run.data.params["seed"] == "42" and run.data.params["training.mode"] == "frozen"
    m = run.data.metrics
    for key in ("auc", "ndcg_at_10", "recall_at_10", "cold_item_auc", "tail_exposure", "auc_gender_female",
                "group_auc_gap_gender"):
        assert key in m, key
    hist = c.get_metric_history(run_id, "val_auc")
    assert [h.step for h in hist] == [h["epoch"] for h in world["history"] if "val_auc" in h]
    t = run.data.tags
    assert t["snapshot_hash"] == "hash0" and t["trigger_reason"] == "test"
    assert t["batch_ids"] == "1: batch-0001 (lineage/batch_ids.txt)"  # the list itself is an artifact
    assert t["prefect_flow_run_id"] == "run-0" and t["git_commit"] == "abc123" and "model_fingerprint" not in t
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == "training-window"
    files = {f.path for f in c.list_artifacts(run_id)} | {f.path for f in c.list_artifacts(run_id, "evaluation")}
    assert {"gate_report.md", "gate_decision.json", "lineage.json", "model_manifest.json",
            "evaluation/candidate.json", "drift"} <= files
    exp = c.get_experiment(run.info.experiment_id)
    assert exp.artifact_location == Path(s.artifact_root).resolve().as_uri()
    mv = c.get_model_version(s.model_name, v)
    assert mv.tags["snapshot_hash"] == "hash0" and len(mv.tags["weights_sha256"]) == 64


def test_version_description_is_the_trigger_and_the_gate_table_and_tags_stay_short(world):
    """What a person reads on the version's page in the MLflow UI: why it was trained and the gate
    table; the batch list is an artifact, its tag only the count and first / last id."""
    from models.registry import client

    s, run_id, v = world["settings"], world["runs"][0], world["versions"][0]
    c = client(s)
    mv = c.get_model_version(s.model_name, v)
    table = verdict(True).to_markdown()
    assert mv.description.startswith("**Trigger:** `test`")
    assert "| rule | candidate | champion |" in mv.description and table.splitlines()[-1] in mv.description
    assert "1 batch (batch-0001; all in `lineage/batch_ids.txt`)" in mv.description
    with tempfile.TemporaryDirectory() as tmp:
        listed = Path(c.download_artifacts(run_id, "lineage/batch_ids.txt", tmp)).read_text()
    assert listed == "batch-0001\n"
    assert mv.tags["batch_ids"] == "1: batch-0001 (lineage/batch_ids.txt)"
    assert all(len(value) <= 250 for value in mv.tags.values()), mv.tags


def test_long_lineage_lists_become_short_tags_and_long_tables_are_cut_on_a_line():
    from models.registry import MAX_DESCRIPTION, list_tag, version_description

    batches = [f"2026-01-{d:02d}-feedback-{k:04d}" for d in range(1, 29) for k in range(40)]
    assert list_tag("batch_ids", batches) == (f"{len(batches)}: 2026-01-01-feedback-0000 .. "
                                              "2026-01-28-feedback-0039 (lineage/batch_ids.txt)")
    assert list_tag("gx_validation_results", ["/w/processed/a.parquet.validation.json"]) == (
        "1: a.parquet.validation.json (lineage/gx_validation_results.txt)")
    assert list_tag("batch_ids", []) == "0"

    class Huge:
        def to_markdown(self):
            return "## Gate decision\n\n" + "".join(f"| rule_{i} | 0.7000 | pass |\n" for i in range(400))

    text = version_description(Huge(), {"trigger_reason": "drift", "batch_ids": ",".join(batches)})
    assert len(text) <= MAX_DESCRIPTION and "gate_report.md" in text and "| rule_0 |" in text
    assert f"{len(batches)} batches" in text and "| rule_399 |" not in text
    assert all(line.endswith("|") for line in text.splitlines() if line.startswith("| rule_"))


def test_model_is_a_pyfunc_from_code_without_pickles(world):
    import mlflow
    from mlflow.models import Model

    s, v = world["settings"], world["versions"][0]
    mlflow.set_tracking_uri(s.tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{s.model_name}/{v}"))
    mlmodel = Model.load(str(local / "MLmodel"))
    assert set(mlmodel.flavors) == {"python_function"}  # not the pytorch flavour
    assert mlmodel.signature is not None and [c.name for c in mlmodel.signature.inputs.inputs][:2] == ["user_id", "item_id"]
    assert (local / "input_example.json").is_file()
    suffixes = {p.suffix for p in local.rglob("*") if p.is_file()}
    assert not suffixes & {".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt"}, suffixes
    assert any(p.name == "weights.safetensors" for p in local.rglob("*"))
    assert any(p.name == "catalog.parquet" for p in local.rglob("*"))


def test_log_and_register_rejects_a_folder_that_is_not_a_model(world, tmp_path):
    from models.registry import RegistryError, log_and_register

    with pytest.raises(RegistryError, match="not a saved Recommender"):
        log_and_register(world["settings"], tmp_path, fake_eval(1.0))


# --------------------------------------------------------------------------- promote / reject / rollback
def test_promote_reject_and_rollback_sequence(world):
    from models.registry import RegistryError, client, list_versions, promote, reject, rollback

    s = world["settings"]
    v1, v2, v3 = world["versions"]
    reset(s)
    first = verdict(True)
    with pytest.raises(RegistryError, match="names no candidate version"):
        promote(s, v1, first)  # a decision must say which version it judged
    assert aliases(s) == {}
    r = promote(s, v1, first.with_versions(candidate_version=v1))
    assert r.promoted and r.champion_before is None and aliases(s) == {"champion": v1}

    bad = verdict(False, v1)
    assert not bad.promote
    with pytest.raises(RegistryError, match="call reject"):
        promote(s, v2, bad.with_versions(candidate_version=v2))
    with pytest.raises(RegistryError, match="judged version"):
        reject(s, v2, bad.with_versions(candidate_version=v3))
    rj = reject(s, v2, bad)
    assert not rj.promoted and aliases(s) == {"champion": v1}
    tags = client(s).get_model_version(s.model_name, v2).tags
    assert tags["gate_decision"] == "rejected" and "vs_champion_auc" in tags["gate_reasons"]
    assert tags["gate_vs_champion_auc"].startswith("fail")

    good = verdict(True, v1)
    assert good.promote
    r3 = promote(s, v3, good.with_versions(candidate_version=v3))
    assert r3.promoted and aliases(s) == {"champion": v3, "previous": v1}
    assert client(s).get_model_version(s.model_name, v3).tags["replaced_version"] == v1

    listed = {d["version"]: d for d in list_versions(s)}
    assert listed[v3]["aliases"] == ["champion"] and listed[v1]["aliases"] == ["previous"]
    assert listed[v2]["gate_decision"] == "rejected" and listed[v3]["metrics"]["auc"] > 0.5
    assert listed[v3]["lineage"]["snapshot_hash"] == "hash2"

    with pytest.raises(RegistryError, match="needs a reason"):
        rollback(s, "  ")
    rb = rollback(s, "bad clicks after release")
    assert rb.champion_after == v1 and aliases(s) == {"champion": v1}  # v1 replaced nobody: no previous left
    t3 = client(s).get_model_version(s.model_name, v3).tags
    assert t3["gate_decision"] == "rolled_back" and t3["rollback_reason"] == "bad clicks after release"
    with pytest.raises(RegistryError, match="no 'previous' version"):
        rollback(s, "again")


def test_champion_changed_since_judgement_is_rejected(world):
    from models.registry import RegistryError, client, promote

    s = world["settings"]
    v1, v2, v3 = world["versions"]
    reset(s, champion=v2)
    judged_vs_v1 = verdict(True, v1).with_versions(candidate_version=v3)
    r = promote(s, v3, judged_vs_v1)
    assert not r.promoted and r.reason == "champion_changed" and aliases(s) == {"champion": v2}
    assert "champion_changed" in client(s).get_model_version(s.model_name, v3).tags["gate_reasons"]
    # there is no override: the same decision stays a decision against champion 1
    assert not promote(s, v3, judged_vs_v1).promoted and aliases(s) == {"champion": v2}
    # a first-model decision (no champion) cannot overwrite a champion that appeared meanwhile
    first = verdict(True).with_versions(candidate_version=v3)
    assert not promote(s, v3, first).promoted and aliases(s) == {"champion": v2}
    # a decision against an unnamed champion is refused loudly
    with pytest.raises(RegistryError, match="unknown version"):
        promote(s, v3, verdict(True, None, has_champion=True).with_versions(candidate_version=v3))
    # only a new judgement against the live champion can promote
    judged_vs_v2 = verdict(True, v2).with_versions(candidate_version=v3)
    assert promote(s, v3, judged_vs_v2).promoted and aliases(s) == {"champion": v3, "previous": v2}


def test_a_decision_for_one_version_cannot_promote_another(world):
    from models.registry import RegistryError, client, promote

    s = world["settings"]
    v1, v2, v3 = world["versions"]
    reset(s, champion=v1)
    client(s).set_registered_model_alias(s.model_name, "challenger", v3)
    for_v2 = verdict(True, v1, candidate_version=v2)
    assert for_v2.promote
    with pytest.raises(RegistryError, match=f"judged version {v2}, not version {v3}"):
        promote(s, v3, for_v2)
    assert aliases(s) == {"champion": v1, "challenger": v3}  # nothing changed


CONCURRENT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_registry import verdict
    from models.registry import promote
    from recloop.settings import load_settings
    s = load_settings({ws!r})
    version, champion = sys.argv[1], sys.argv[2]
    decision = verdict(True, champion, candidate_version=version)
    Path(sys.argv[3]).write_text("ready")
    go = Path({go!r})
    while not go.exists():
        time.sleep(0.01)
    r = promote(s, version, decision)
    print(json.dumps(r.to_dict()))
""")


@pytest.mark.slow
def test_two_processes_promoting_at_once_only_one_wins(world, tmp_path):
    import time

    s = world["settings"]
    v1, v2, v3 = world["versions"]
    reset(s, champion=v1)
    go = tmp_path / "go"
    script = tmp_path / "promote.py"
    script.write_text(CONCURRENT.format(tests=str(REPO / "tests"), ws=str(s.workspace), go=str(go)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(script), v, v1, str(tmp_path / f"ready{v}")], cwd=str(REPO),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in (v2, v3)]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{v}").exists() for v in (v2, v3)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.write_text("go")
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    winners = [r for r in results if r["promoted"]]
    losers = [r for r in results if not r["promoted"]]
    assert len(winners) == 1 and len(losers) == 1, results
    assert losers[0]["reason"] == "champion_changed"
    assert aliases(s)["champion"] == winners[0]["version"] and aliases(s)["previous"] == v1


# --------------------------------------------------------------------------- loading
@pytest.mark.slow
def test_pyfunc_loads_by_alias_in_a_fresh_process(world, tmp_path):
    s = world["settings"]
    reset(s, champion=world["versions"][0])
    events, catalog = world["events"], world["catalog"]
    pairs = events[["user_id", "item_id"]].head(6).copy()
    pairs["query"] = [None, "space adventure", None, None, "comedy", None]
    pairs.to_parquet(tmp_path / "pairs.parquet")
    code = textwrap.dedent(f"""
        import json, sys, pandas as pd, mlflow
        pairs = pd.read_parquet({str(tmp_path / 'pairs.parquet')!r})
        cold = mlflow.pyfunc.load_model("models:/{s.model_name}@champion")
        warm = mlflow.pyfunc.load_model("models:/{s.model_name}@champion", model_config={{"workspace": {str(s.workspace)!r}}})
        print(json.dumps({{"cold": cold.predict(pairs)["score"].tolist(), "warm": warm.predict(pairs)["score"].tolist(),
                          "noquery": cold.predict(pairs[["user_id", "item_id"]])["score"].tolist()}}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECLOOP_")}
    env.update(MLFLOW_TRACKING_URI=s.tracking_uri, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                         timeout=180, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    model = world["model"]
    q = pairs.assign(query=pairs["query"].astype("string"))
    expected_warm = model.score(q, events, catalog)
    expected_cold = model.score(q, None, catalog)
    np.testing.assert_allclose(got["warm"], expected_warm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["cold"], expected_cold, rtol=1e-5, atol=1e-6)
    assert all(0.0 <= x <= 1.0 for x in got["noquery"])


def test_load_champion_none_and_cached(world):
    from models.registry import load_champion

    s = world["settings"]
    reset(s)
    assert load_champion(s) is None
    reset(s, champion=world["versions"][1])
    model, info = load_champion(s)
    assert info["version"] == world["versions"][1] and "champion" in info["aliases"]
    pairs = world["events"][["user_id", "item_id"]].head(5)
    np.testing.assert_allclose(model.score(pairs, world["events"], world["catalog"]),
                               world["model"].score(pairs, world["events"], world["catalog"]), rtol=1e-5)
    assert Path(info["model_dir"]).is_relative_to(s.models_dir / "cache")


def test_corrupted_weights_give_a_clear_error_and_leave_the_champion(world):
    from models.registry import ModelLoadError, _cache_dir, client, load_champion, load_version

    s = world["settings"]
    v1, _v2, v3 = world["versions"]
    reset(s, champion=v3, previous=v1)
    _, info = load_version(s, v3)
    # a corrupted local cache is detected and fetched again
    cached = Path(info["model_dir"]) / "weights.safetensors"
    cached.write_bytes(cached.read_bytes()[:100])
    _, again = load_version(s, v3)
    assert Path(again["model_dir"], "weights.safetensors").stat().st_size > 100
    # a truncated copy in the registry's artifact store is an error that names the file
    import mlflow

    mlflow.set_tracking_uri(s.tracking_uri)
    src = Path(mlflow.artifacts.download_artifacts(f"models:/{s.model_name}/{v3}", dst_path=str(s.root / "peek")))
    mv = client(s).get_model_version(s.model_name, v3)
    model_id = mv.source.rsplit("/", 1)[-1]  # models:/m-<id>: the logged model behind the version
    store_copy = next(Path(s.artifact_root).rglob(f"{model_id}/artifacts/artifacts/*/weights.safetensors"))
    store_copy.write_bytes(store_copy.read_bytes()[: store_copy.stat().st_size // 2])
    import shutil

    shutil.rmtree(_cache_dir(s, v3))
    with pytest.raises(ModelLoadError, match=r"weights.safetensors is \d+ bytes, expected \d+ \(truncated\?\)"):
        load_champion(s)
    assert aliases(s) == {"champion": v3, "previous": v1}  # nothing moved
    assert src.exists()


def test_cli_models_and_rollback(world):
    from typer.testing import CliRunner

    from recloop.cli import app

    s = world["settings"]
    _v1, v2, v3 = world["versions"]
    reset(s, champion=v3, previous=v2)
    runner = CliRunner()
    out = runner.invoke(app, ["models", "--json", "-w", str(s.workspace)])
    assert out.exit_code == 0, out.output
    listed = {d["version"]: d for d in json.loads(out.stdout)}
    assert listed[v3]["aliases"] == ["champion"] and "auc" in listed[v3]["metrics"]
    table_out = runner.invoke(app, ["models", "-w", str(s.workspace)], env={"COLUMNS": "200"})
    assert table_out.exit_code == 0 and "champion" in table_out.output
    rb = runner.invoke(app, ["rollback", "--reason", "ops test", "--json", "-w", str(s.workspace)])
    assert rb.exit_code == 0, rb.output
    assert json.loads(rb.stdout)["champion_after"] == v2 and aliases(s)["champion"] == v2
    again = runner.invoke(app, ["rollback", "--reason", "ops test", "-w", str(s.workspace)])
    assert again.exit_code == 1 and "no 'previous' version" in again.output
    missing = runner.invoke(app, ["rollback", "-w", str(s.workspace)])
    assert missing.exit_code != 0


# --------------------------------------------------------------------------- integrity: retries, failures
def _with_key(s, key: str) -> tuple[list, list]:
    """(versions, runs) carrying registration key ``key``."""
    from models.registry import client

    c = client(s)
    versions = c.search_model_versions(f"name='{s.model_name}' and tags.registration_key='{key}'")
    exp = c.get_experiment_by_name(s.model_name)
    runs = c.search_runs([exp.experiment_id], f"tags.registration_key = '{key}'")
    return versions, runs


def _register_for_flow(world, flow_run: str):
    from models.registry import log_and_register

    return log_and_register(world["settings"], world["model_dir"], fake_eval(1.0), catalog=world["catalog"],
                            lineage={"prefect_flow_run_id": flow_run, "snapshot_hash": f"snap-{flow_run}"})


def _pending_challenger(s, version):
    from models.registry import client

    c = client(s)
    c.set_model_version_tag(s.model_name, version, "gate_decision", "pending")
    c.set_registered_model_alias(s.model_name, "challenger", version)


def _report(s, version) -> str:
    from models.registry import client

    c = client(s)
    run_id = c.get_model_version(s.model_name, version).run_id
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return Path(c.download_artifacts(run_id, "gate_report.md", tmp)).read_text()


def test_registration_key():
    from models.registry import registration_key

    assert registration_key(None, "fp", "snap", "w") is None and registration_key("", "fp", "snap", "w") is None
    k = registration_key("flow-1", "fp", "snap", "w")
    assert len(k) == 32 and k == registration_key("flow-1", "fp", "snap", "w")
    assert len({k, registration_key("flow-2", "fp", "snap", "w"), registration_key("flow-1", "fp2", "snap", "w"),
                registration_key("flow-1", "fp", "snap2", "w"), registration_key("flow-1", "fp", "snap", "w2")}) == 5


def test_registering_twice_in_one_flow_run_gives_one_version(world):
    from models.registry import client

    s = world["settings"]
    reset(s)
    first = _register_for_flow(world, "flow-twice")
    again = _register_for_flow(world, "flow-twice")
    assert again == first
    mv = client(s).get_model_version(s.model_name, first[1])
    versions, runs = _with_key(s, mv.tags["registration_key"])
    assert [str(v.version) for v in versions] == [first[1]] and [r.info.run_id for r in runs] == [first[0]]
    assert aliases(s) == {"challenger": first[1]} and mv.tags["gate_decision"] == "pending"


def test_retry_after_a_failure_right_after_register_model(world, monkeypatch):
    from mlflow import MlflowClient

    from models.registry import client

    s = world["settings"]
    reset(s)
    real = MlflowClient.set_registered_model_alias
    failed = []

    def flaky(self, name, alias, version):
        if alias == "challenger" and not failed:
            failed.append(version)
            raise ConnectionError("registry went away")
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", flaky)
    with pytest.raises(ConnectionError):
        _register_for_flow(world, "flow-alias")
    assert failed and aliases(s) == {}  # the version exists, pending, without its alias
    run_id, version = _register_for_flow(world, "flow-alias")  # the task's retry
    assert version == failed[0]
    c = client(s)
    versions, runs = _with_key(s, c.get_model_version(s.model_name, version).tags["registration_key"])
    assert len(versions) == 1 and len(runs) == 1 and runs[0].info.run_id == run_id
    assert aliases(s) == {"challenger": version} and c.get_run(run_id).data.tags["model_version"] == version


def test_retry_after_register_model_failed_registers_the_logged_run(world, monkeypatch):
    import mlflow

    from models.registry import client

    s = world["settings"]
    reset(s)
    real, calls = mlflow.register_model, []

    def flaky(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise ConnectionError("registry went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "register_model", flaky)
    with pytest.raises(ConnectionError):
        _register_for_flow(world, "flow-register")
    c = client(s)
    key = c.search_runs([c.get_experiment_by_name(s.model_name).experiment_id],
                        "tags.prefect_flow_run_id = 'flow-register'")[0].data.tags["registration_key"]
    versions, runs = _with_key(s, key)
    assert versions == [] and len(runs) == 1
    run_id, version = _register_for_flow(world, "flow-register")
    versions, runs = _with_key(s, key)
    assert run_id == runs[0].info.run_id and len(runs) == 1 and [str(v.version) for v in versions] == [version]
    assert calls[1][0] == calls[0][0]  # the model logged the first time, not a new one
    tags = c.get_model_version(s.model_name, version).tags
    assert tags["gate_decision"] == "pending" and tags["snapshot_hash"] == "snap-flow-register"
    assert len(tags["weights_sha256"]) == 64 and tags["run_id"] == run_id
    assert aliases(s) == {"challenger": version}


def test_mark_failed_records_the_error_and_drops_only_challenger(world):
    from models.registry import client, mark_failed

    s = world["settings"]
    v1, v2, v3 = world["versions"]
    reset(s, champion=v1, previous=v2)
    _pending_challenger(s, v3)
    mark_failed(s, v3, "RuntimeError: boom\n  at line 3\n" + "x" * 2000)
    c = client(s)
    tags = c.get_model_version(s.model_name, v3).tags
    assert tags["gate_decision"] == "failed" and tags["gate_decided_at"]
    assert tags["gate_error"].startswith("RuntimeError: boom at line 3") and len(tags["gate_error"]) <= 500
    assert aliases(s) == {"champion": v1, "previous": v2}
    report = _report(s, v3)
    assert report.startswith(f"# {s.model_name} version {v3}: FAILED") and "boom" in report
    assert c.get_run(c.get_model_version(s.model_name, v3).run_id).data.tags["gate_decision"] == "failed"
    # the champion keeps its decision (it is serving) and a challenger on another version stays
    c.set_model_version_tag(s.model_name, v1, "gate_decision", "promoted")
    _pending_challenger(s, v3)
    mark_failed(s, v1, "event emit failed")
    t1 = c.get_model_version(s.model_name, v1).tags
    assert t1["gate_decision"] == "promoted" and t1["gate_error"] == "event emit failed"
    assert aliases(s) == {"champion": v1, "previous": v2, "challenger": v3}


def test_mark_failed_is_best_effort(world, monkeypatch, caplog):
    from mlflow import MlflowClient

    from models.registry import client, mark_failed

    s = world["settings"]
    v1, v2, _v3 = world["versions"]
    reset(s, champion=v1)
    _pending_challenger(s, v2)

    def down(*args, **kwargs):
        raise OSError("artifact store down")

    monkeypatch.setattr(MlflowClient, "log_text", down)
    monkeypatch.setattr(MlflowClient, "set_tag", down)
    with caplog.at_level("ERROR", logger="models.registry"):
        mark_failed(s, v2, "lock timeout")
    assert "could not" in caplog.text and "gate_report.md" in caplog.text
    assert client(s).get_model_version(s.model_name, v2).tags["gate_decision"] == "failed"
    assert aliases(s) == {"champion": v1}


def test_promotion_that_times_out_on_the_lock_is_marked_failed(world):
    from filelock import Timeout

    from models.registry import _lock, client, promote

    s = world["settings"]
    v1, v2, _v3 = world["versions"]
    reset(s, champion=v1)
    _pending_challenger(s, v2)
    decision = verdict(True, v1)
    holder = _lock(s, timeout=5)
    holder.acquire()  # another promoter holds the lock
    try:
        with pytest.raises(Timeout):
            promote(s, v2, decision.with_versions(candidate_version=v2), lock_timeout=0.2)
    finally:
        holder.release()
    tags = client(s).get_model_version(s.model_name, v2).tags
    assert tags["gate_decision"] == "failed" and tags["gate_error"].startswith("promotion failed: Timeout")
    assert aliases(s) == {"champion": v1}
    assert "FAILED" in _report(s, v2)


def test_promotion_failing_midway_restores_the_aliases(world, monkeypatch):
    from mlflow import MlflowClient

    from models.registry import client, promote

    s = world["settings"]
    v1, v2, v3 = world["versions"]
    reset(s, champion=v1, previous=v3)
    _pending_challenger(s, v2)
    decision = verdict(True, v1)

    def down(*args, **kwargs):
        raise OSError("artifact store down")

    monkeypatch.setattr(MlflowClient, "log_text", down)  # the gate report cannot be written
    with pytest.raises(OSError, match="artifact store down"):
        promote(s, v2, decision.with_versions(candidate_version=v2))
    assert aliases(s) == {"champion": v1, "previous": v3}
    tags = client(s).get_model_version(s.model_name, v2).tags
    assert tags["gate_decision"] == "failed" and "artifact store down" in tags["gate_error"]


def test_promote_checks_the_registered_weights(world):
    from models.registry import RegistryError, client, promote

    s = world["settings"]
    v1, v2, _v3 = world["versions"]
    reset(s, champion=v1)
    _pending_challenger(s, v2)
    c = client(s)
    real = c.get_model_version(s.model_name, v2).tags["weights_sha256"]
    c.set_model_version_tag(s.model_name, v2, "weights_sha256", "0" * 64)
    try:
        decision = verdict(True, v1)
        with pytest.raises(RegistryError, match="differs from the weights hash"):
            promote(s, v2, decision.with_versions(candidate_version=v2))
    finally:
        c.set_model_version_tag(s.model_name, v2, "weights_sha256", real)
    assert aliases(s) == {"champion": v1}
    assert c.get_model_version(s.model_name, v2).tags["gate_decision"] == "failed"
