"""Replay with the policies in parallel worker processes (slow tier: spawned processes, real flows)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


@pytest.mark.timeout(900)
def test_policies_replay_in_parallel_workers_with_their_own_prefect_homes(tmp_path, monkeypatch):
    """Two worker processes (spawned, real flows, each its own ephemeral Prefect server): every policy's
    batches are ingested and scored once per batch for the baselines; a worker that fails is reported."""
    import json

    from replay.runner import ReplayConfig, run_replay, synthetic_source
    from tests.conftest import small_world_config

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    src = synthetic_source(small_world_config(n_days=4, drift_day=None, bad_batch_day=None))
    cfg = ReplayConfig(policies=("never", "drift"), initial_periods=10, max_batches=3, workers=2)
    out = run_replay(src, tmp_path / "replay", cfg)
    assert out["meta"]["workers"] == 2
    doc = json.loads((tmp_path / "replay" / "reports" / "replay" / "replay.json").read_text())
    for policy in ("never", "drift"):
        recs = doc["batches"][policy]
        assert [r["batch"] for r in recs] == [0, 1, 2] and all(r["ingest"]["n_new"] > 0 for r in recs)
    for policy in ("drift", "never"):  # one Prefect database per worker, none shared
        assert (tmp_path / "replay" / policy / "prefect-replay" / "prefect.db").is_file()
    cache = json.loads((tmp_path / "replay" / "baseline_aucs.json").read_text())
    assert sorted(cache) == ["0", "1", "2"]
    assert [r.get("baselines") for r in doc["batches"]["never"]] == [r.get("baselines") for r in doc["batches"]["drift"]]
    # every baseline's per-event scores kept once (batch 0 had no history to fit on), pooled in the report
    assert sorted(f.name for f in (tmp_path / "replay" / "baseline_scores").iterdir()) == ["batch-0001.parquet",
                                                                                          "batch-0002.parquet"]
    assert doc["baselines"] and all(0.0 < b["pooled_auc_last_20pct_events"] < 1.0 for b in doc["baselines"])
    assert {r["pooled_auc_last_20pct_events"] for r in doc["summary"]} == {0.5}  # no champion yet: chance

    # a worker that cannot run (its policy folder is a file) fails the replay, naming it
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "drift").write_text("not a folder")
    with pytest.raises(RuntimeError, match=r"replay-drift \(exit code"):
        run_replay(src, tmp_path / "bad", cfg)
