"""The serving API end to end (FastAPI TestClient) against a real tiny Recommender.

The model is trained once per session by models/ (tiny random BERT, one epoch on a small
synthetic world, ~10 s); version "2" is a copy of version "1" so hot-swap tests can watch
the served version change.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from recloop.store import FeedbackStore
from serving.app import create_app
from serving.feedback import read_impressions
from serving.lifecycle import LocalDirModelSource
from tests.conftest import small_world_config

LOCAL = "http://127.0.0.1"  # the server answers to loopback Host names only (serving.allowed_hosts)


@pytest.fixture(scope="session")
def tiny_world():
    from recloop.datasets.synthetic import generate

    return generate(small_world_config())


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_world):
    """A folder with model versions "1" and "2" (same weights) and CHAMPION -> 1."""
    from models.testing import make_tiny_encoder
    from models.train import train_recommender
    from recloop.settings import load_settings

    root = tmp_path_factory.mktemp("tiny-models")
    enc = make_tiny_encoder(root / "encoder")
    s = load_settings(root / "ws", training={"encoder_path": str(enc), "max_epochs": 1, "embed_dim": 16,
                                             "batch_size": 256})
    day10 = tiny_world.day_start(10)
    trained = train_recommender(s, tiny_world.events[tiny_world.events["timestamp"] < day10],
                                tiny_world.catalog, tiny_world.users, run_dir=root / "run")
    trained.model.save(root / "models" / "1")
    shutil.copytree(root / "models" / "1", root / "models" / "2")
    (root / "models" / "CHAMPION").write_text("1")
    return root / "models"


@pytest.fixture
def served(settings, tiny_world, tiny_models, tmp_path):
    """(client, app, source, settings): a workspace with the world in its store, served by version 1."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    store = FeedbackStore.from_settings(settings)
    store.upsert_catalog(tiny_world.catalog)
    store.upsert_users(tiny_world.users)
    store.append(tiny_world.events, batch_id="world")
    source = LocalDirModelSource(models)
    app = create_app(settings, model_source=source, start_background=False)
    with TestClient(app, base_url=LOCAL) as client:
        yield client, app, source, settings


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_world, tiny_models):
    """One read-mostly server for the bad-input tests (they must not write anything)."""
    from recloop.settings import load_settings

    root = tmp_path_factory.mktemp("shared")
    settings = load_settings(root / "ws").ensure_dirs()
    store = FeedbackStore.from_settings(settings)
    store.upsert_catalog(tiny_world.catalog)
    store.append(tiny_world.events, batch_id="world")
    shutil.copytree(tiny_models, root / "models")
    app = create_app(settings, model_source=LocalDirModelSource(root / "models"), start_background=False)
    with TestClient(app, base_url=LOCAL) as client:
        yield client, app, None, settings


def _event(eid, user="u0001", item=None, etype="click", **kw):
    return {"event_id": eid, "user_id": user, "item_id": item, "event_type": etype,
            "timestamp": "2026-01-18T10:00:00+00:00", **kw}


def _an_item(settings):
    return str(FeedbackStore(settings.store_dir).catalog()["item_id"].iloc[0])


# ---- the happy paths ------------------------------------------------------------------------------
def test_recommend_returns_ranked_explained_items(served, tiny_world):
    client, app, _, settings = served
    user = tiny_world.events[tiny_world.events["label"] == 1]["user_id"].value_counts().index[0]
    r = client.get("/recommend", params={"user_id": user, "k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "1" and r.headers["x-model-version"] == "1"
    assert len(body["items"]) == 7 and [it["rank"] for it in body["items"]] == list(range(1, 8))
    assert not body["cold_start"] and body["impression_id"]
    liked = set(tiny_world.events[(tiny_world.events["user_id"] == user) & (tiny_world.events["label"] == 1)]["item_id"])
    assert not liked & {it["item_id"] for it in body["items"]}
    assert all(it["reason"].startswith("because you liked: ") for it in body["items"])
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True) and all(0 < x < 1 for x in scores)
    app.state.impressions.flush()
    imp = read_impressions(settings)
    assert set(imp["impression_id"]) == {body["impression_id"]} and len(imp) == 7
    assert set(imp["model_version"].astype(str)) == {"1"} and not imp["explored"].any()


def test_search_personalised_and_anonymous(served, tiny_world):
    client, *_ = served
    cat = tiny_world.catalog
    r = client.get("/search", params={"q": "starship galaxy android", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == 5 and body["query"] == "starship galaxy android"
    # (the tiny random encoder has no semantics; test_search_semantics_with_text_model checks relevance)
    assert all(it["reason"] for it in body["items"])
    r2 = client.get("/search", params={"q": "starship", "user_id": str(tiny_world.events["user_id"].iloc[0]), "k": 3})
    assert r2.status_code == 200 and len(r2.json()["items"]) == 3
    assert {it["item_id"] for it in body["items"]} <= set(cat["item_id"])


def test_cold_start_user_and_new_catalog_item_are_served(served, tiny_world):
    client, app, _, settings = served
    r = client.get("/recommend", params={"user_id": "brand-new-user", "k": 8})
    assert r.status_code == 200
    body = r.json()
    assert body["cold_start"] and len(body["items"]) == 8
    assert len({it["category"] for it in body["items"]}) >= 2  # popular *and* diverse
    # a new item lands in the catalog: retrievable right after the next refresh, via its text alone
    new = tiny_world.catalog.iloc[[0]].assign(item_id="launch-001", title="Zeppelin mooring handbook",
                                              description="zeppelin zeppelin airship mooring mast",
                                              category="aviation")
    FeedbackStore(settings.store_dir).upsert_catalog(new)
    assert client.post("/admin/reload").status_code == 200
    index = app.state.holder.current.index
    assert "launch-001" in index.row and index.n_encoded == 1  # only the new item was encoded
    assert abs(float((index.vectors[index.row["launch-001"]] ** 2).sum()) - 1.0) < 1e-4
    # feedback on the new item is accepted (it is in the catalog now)
    r = client.post("/feedback", json=_event("on-new-item", item="launch-001"))
    assert r.status_code == 202 and r.json()["accepted"] == 1


def test_search_semantics_and_new_item_with_text_model(settings):
    """With a model whose vectors follow the words (the text-hash stand-in), relevance is checkable."""
    from serving.lifecycle import InMemoryModelSource
    from tests.conftest_serving import TextHashRecommender, catalog_frame, events_frame

    store = FeedbackStore.from_settings(settings)
    store.upsert_catalog(catalog_frame())
    store.append(events_frame(catalog_frame()), batch_id="seed")
    app = create_app(settings, model_source=InMemoryModelSource(TextHashRecommender(), "3"), start_background=False)
    with TestClient(app, base_url=LOCAL) as client:
        r = client.get("/search", params={"q": "saxophone bebop", "k": 3}).json()
        assert r["items"][0]["category"] == "jazz" and r["items"][0]["reason"].startswith("matches: ")
        r = client.get("/recommend", params={"user_id": "u1", "k": 3}).json()
        assert r["items"][0]["category"] == "science fiction"
        assert r["items"][0]["reason"].startswith("because you liked: The ")
        new = catalog_frame().iloc[[0]].assign(item_id="zep1", title="Zeppelin airship mooring", category="aviation",
                                               description="zeppelin airship mast")
        store.upsert_catalog(new)
        app.state.holder.refresh_data()  # what the background thread does every store_refresh_seconds
        r = client.get("/search", params={"q": "zeppelin airship", "k": 3}).json()
        assert r["items"][0]["item_id"] == "zep1"


def test_health_and_model(served):
    client, *_ = served
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ready" and h.json()["model_version"] == "1"
    m = client.get("/model").json()
    assert m["version"] == "1" and m["items_indexed"] > 0
    assert m["trained_window"]["train_start"] and m["trained_window"]["train_end"]
    assert "best_val_auc" in m["details"]["model_info"]


def test_health_is_503_without_a_model(settings, tmp_path):
    app = create_app(settings, model_source=LocalDirModelSource(tmp_path / "empty"), start_background=False)
    with TestClient(app, base_url=LOCAL) as client:
        assert client.get("/health").status_code == 503
        assert client.get("/recommend", params={"user_id": "u1"}).status_code == 503
        assert client.get("/model").status_code == 503


# ---- feedback -------------------------------------------------------------------------------------
def test_feedback_single_and_batch_land_in_the_contract_format(served):
    client, app, _, settings = served
    item = _an_item(settings)
    r = client.post("/feedback", json=_event("f1", item=item, impression_id="imp-1"))
    assert r.status_code == 202 and r.json() == {"accepted": 1, "duplicates": 0, "batch_file": r.json()["batch_file"]}
    r = client.post("/feedback", json={"events": [_event("f2", item=item, etype="like"), _event("f1", item=item)]})
    assert r.status_code == 202 and r.json()["accepted"] == 1 and r.json()["duplicates"] == 1
    assert app.state.writer.flush() == r.json()["batch_file"]  # micro-batched: one landing file for both posts
    files = sorted(settings.landing_dir.glob("serving-*.parquet"))
    assert [f.name for f in files] == [r.json()["batch_file"]]
    landed = pd.concat([pd.read_parquet(f) for f in files])
    assert sorted(landed["event_id"]) == ["f1", "f2"]
    assert dict(zip(landed["event_id"], landed["label"])) == {"f1": 1, "f2": 1}
    assert "impression_id" not in landed.columns
    app.state.impressions.flush()
    links = read_impressions(settings, links=True)
    assert list(links["impression_id"]) == ["imp-1"]


def test_concurrent_duplicate_feedback_is_stored_once(served):
    client, app, _, settings = served
    item = _an_item(settings)
    batch = {"events": [_event(f"dup-{i}", item=item, user=f"u{i:04d}") for i in range(10)]}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: client.post("/feedback", json=batch), range(16)))
    assert all(r.status_code == 202 for r in results)
    assert sum(r.json()["accepted"] for r in results) == 10
    app.state.writer.flush()
    landed = pd.concat([pd.read_parquet(f) for f in settings.landing_dir.glob("serving-*.parquet")])
    assert sorted(landed["event_id"]) == sorted(e["event_id"] for e in batch["events"])


@pytest.mark.slow
def test_landed_feedback_passes_the_ingest_checks(served):
    from data_checks import ingest as dc

    client, app, _, settings = served
    item = _an_item(settings)
    now = pd.Timestamp.now(tz="UTC").isoformat()
    assert client.post("/feedback", json={"events": [_event("ing-1", item=item, timestamp=now)]}).status_code == 202
    app.state.writer.flush()
    out = dc.ingest_all(settings)
    assert [o.status for o in out if o.batch_id.startswith("serving")] == ["ingested"]


# ---- bad input and limits ---------------------------------------------------------------------------
@pytest.mark.parametrize("payload, why", [
    ({"event_id": "b1", "user_id": "u", "item_id": "ITEM", "event_type": "click", "timestamp": 123456789012345678901},
     "timestamp out of range"),
    ({"event_id": "b1", "user_id": "u", "item_id": "ITEM", "event_type": "clicked", "timestamp": "2026-01-18T10:00:00Z"},
     "unknown event type"),
    ({"event_id": "b1", "user_id": "u", "item_id": "ITEM", "event_type": "click",
      "timestamp": "2026-01-18T10:00:00Z", "surprise": 1}, "extra field"),
    ({"event_id": "b1", "user_id": "u", "item_id": "ITEM", "event_type": "click",
      "timestamp": "2026-01-18T10:00:00"}, "naive timestamp"),
    ({"event_id": "b1", "user_id": ["u"], "item_id": "ITEM", "event_type": "click",
      "timestamp": "2026-01-18T10:00:00Z"}, "wrong type"),
    ({"event_id": "b1", "user_id": "u", "item_id": "ITEM", "event_type": "dislike", "label": 1,
      "timestamp": "2026-01-18T10:00:00Z"}, "label contradicts type"),
    ({"event_id": "b1", "user_id": "u", "item_id": "no-such-item", "event_type": "click",
      "timestamp": "2026-01-18T10:00:00Z"}, "unknown item"),
    ({"event_id": "b1", "user_id": "u", "item_id": "ITEM", "event_type": "click",
      "timestamp": "2999-01-01T00:00:00Z"}, "future timestamp"),
    ({"events": []}, "empty batch"),
    ("just a string", "not an object"),
    ({"events": [{"event_id": "x"}]}, "incomplete event in batch"),
])
def test_bad_feedback_is_422_and_nothing_lands(shared, payload, why):
    client, _, _, settings = shared
    item = _an_item(settings)
    body = json.dumps(payload).replace("ITEM", item)
    r = client.post("/feedback", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, (why, r.text)
    assert "detail" in r.json()
    assert not list(settings.landing_dir.glob("serving-*"))


def test_malformed_and_deeply_nested_json_is_422_not_500(shared):
    client, *_ = shared
    for body in (b"{not json", b"[" * 100_000 + b"]" * 100_000, b'{"events": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                 b"", b'{"event_id": "a", "user_id": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}"):
        r = client.post("/feedback", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (body[:30], r.status_code, r.text[:200])


def test_huge_body_is_413(shared):
    client, _, _, settings = shared
    big = b'{"events": [' + b" " * (settings.serving.max_body_bytes + 10) + b"]}"
    r = client.post("/feedback", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413

    def chunks():  # no Content-Length: the streamed body is counted
        for _ in range(30):
            yield b" " * 50_000

    r = client.post("/feedback", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_too_many_events_in_one_batch_is_422(shared):
    client, _, _, settings = shared
    item = _an_item(settings)
    n = settings.serving.max_batch_events + 1
    r = client.post("/feedback", json={"events": [_event(f"m{i}", item=item) for i in range(n)]})
    assert r.status_code == 422


@pytest.mark.parametrize("params", [{"user_id": "u1", "k": "ten"}, {"user_id": "u1", "k": 0}, {"user_id": "u1", "k": 10_000},
                                    {}, {"user_id": ""}, {"user_id": "x" * 500}, {"user_id": "bad id\n"}])
def test_bad_recommend_params_are_422(shared, params):
    client, *_ = shared
    assert client.get("/recommend", params=params).status_code == 422


def test_bad_search_params_are_422(shared):
    client, *_ = shared
    assert client.get("/search", params={"q": "   "}).status_code == 422
    assert client.get("/search", params={"q": "x" * 10_000}).status_code == 422
    assert client.get("/search").status_code == 422


def test_token_guards_feedback_and_admin(settings, tiny_world, tiny_models, tmp_path):
    settings.serving.token = "s3cret"
    FeedbackStore.from_settings(settings).upsert_catalog(tiny_world.catalog)
    models = tmp_path / "m"
    shutil.copytree(tiny_models, models)
    app = create_app(settings, model_source=LocalDirModelSource(models), start_background=False)
    item = str(tiny_world.catalog["item_id"].iloc[0])
    with TestClient(app, base_url=LOCAL) as client:
        assert client.post("/feedback", json=_event("t1", item=item)).status_code == 401
        assert client.post("/feedback", json=_event("t1", item=item),
                           headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/admin/reload").status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert client.post("/feedback", json=_event("t1", item=item), headers=ok).status_code == 202
        assert client.post("/admin/reload", headers=ok).status_code == 200
        assert client.get("/recommend", params={"user_id": "u1"}).status_code == 200  # reads stay open


def test_feedback_rate_limit_per_user_is_429(served):
    client, app, _, settings = served
    from serving.security import RateLimiter

    app.state.limiter.__init__(5)  # 5 events per minute per user
    item = _an_item(settings)
    r = client.post("/feedback", json={"events": [_event(f"r{i}", item=item, user="chatty") for i in range(5)]})
    assert r.status_code == 202
    r = client.post("/feedback", json=_event("r99", item=item, user="chatty"))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert client.post("/feedback", json=_event("q1", item=item, user="quiet")).status_code == 202
    assert isinstance(app.state.limiter, RateLimiter)


# ---- lifecycle ------------------------------------------------------------------------------------------
def test_hot_swap_under_concurrent_requests(served, tiny_world):
    client, app, source, _ = served
    users = list(tiny_world.events["user_id"].unique()[:20]) + ["cold-1", "cold-2"]
    stop = threading.Event()
    seen, errors = [], []

    def hammer(i):
        n = 0
        while not stop.is_set() or n < 3:
            u = users[(i + n) % len(users)]
            t_start = time.monotonic()
            r = client.get("/recommend", params={"user_id": u, "k": 5}) if n % 3 else \
                client.get("/search", params={"q": "galaxy recipe", "user_id": u, "k": 5})
            if r.status_code != 200 or len(r.json()["items"]) != 5:
                errors.append((r.status_code, r.text[:200]))
            else:
                seen.append((t_start, r.json()["model_version"]))
            n += 1

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(hammer, i) for i in range(4)]
        time.sleep(0.5)
        source.set_champion("2")
        swap_at = time.monotonic()
        assert app.state.holder.poll_once() is True  # what the polling thread does every poll_seconds
        swapped_at = time.monotonic()
        time.sleep(0.5)
        stop.set()
        for f in futures:
            f.result()
    assert not errors, errors[:3]
    versions = [v for _, v in sorted(seen)]
    assert "1" in versions and "2" in versions
    assert all(v == "2" for t, v in seen if t > swapped_at)  # a request started after the swap: new model
    assert all(v == "1" for t, v in seen if t < swap_at)
    assert client.get("/model").json()["version"] == "2"


def test_polling_thread_picks_up_a_new_champion(settings, tiny_world, tiny_models, tmp_path):
    settings.serving.poll_seconds = 0.2
    settings.serving.store_refresh_seconds = 0.2
    FeedbackStore.from_settings(settings).upsert_catalog(tiny_world.catalog)
    models = tmp_path / "m"
    shutil.copytree(tiny_models, models)
    source = LocalDirModelSource(models)
    app = create_app(settings, model_source=source)
    with TestClient(app, base_url=LOCAL) as client:
        assert client.get("/health").json()["model_version"] == "1"
        source.set_champion("2")
        deadline = time.monotonic() + 20
        while client.get("/health").json()["model_version"] != "2":
            assert time.monotonic() < deadline, "no swap within 20 s"
            time.sleep(0.1)


# ---- the real registry: a tiny model registered in a temp MLflow ------------------------------------------
def _evaluation(n: int = 200):
    import numpy as np

    from models.evaluate import Evaluation, auc

    y = np.random.default_rng(1).integers(0, 2, n)
    scored = pd.DataFrame({"event_id": [f"e{i}" for i in range(n)], "user_id": [f"u{i % 20}" for i in range(n)],
                           "item_id": [f"i{i % 15}" for i in range(n)], "label": y,
                           "score": y + np.random.default_rng(2).normal(size=n)})
    return Evaluation(auc=auc(y, scored["score"]), ndcg_at_k=0.4, recall_at_k=0.5, per_group_auc={},
                      group_auc_gap={}, cold_item_auc=0.6, tail_exposure=0.3, n_events=n, n_users=20,
                      per_group_n={}, scored=scored)


@pytest.mark.slow
def test_serves_the_registry_champion_and_follows_the_alias(settings, tiny_world, tiny_models):
    """Default model source: models:/<name>@champion in the workspace's MLflow (SQLite), no mocks."""
    from models import registry

    store = FeedbackStore.from_settings(settings)
    store.upsert_catalog(tiny_world.catalog)
    store.append(tiny_world.events, batch_id="world")
    app = create_app(settings, start_background=False)  # no source given: the registry
    with TestClient(app, base_url=LOCAL) as client:
        assert client.get("/health").status_code == 503  # no registry, no champion yet
        _, v1 = registry.log_and_register(settings, tiny_models / "1", _evaluation(), catalog=tiny_world.catalog)
        _, v2 = registry.log_and_register(settings, tiny_models / "2", _evaluation(), catalog=tiny_world.catalog)
        c = registry.client(settings)
        c.set_registered_model_alias(settings.model_name, "champion", v1)
        assert client.post("/admin/reload").json()["model_version"] == v1
        m = client.get("/model").json()
        assert m["version"] == v1 and m["source"].endswith("@champion")
        assert "auc" in m["metrics"] and m["trained_window"]["train_start"]
        assert client.get("/recommend", params={"user_id": "u0001"}).json()["model_version"] == v1
        c.set_registered_model_alias(settings.model_name, "champion", v2)
        assert app.state.holder.poll_once() is True
        assert client.get("/recommend", params={"user_id": "u0001"}).json()["model_version"] == v2


@pytest.mark.slow
def test_recloop_serve_runs_uvicorn_over_loopback(settings, tiny_world, tiny_models):
    """`recloop serve` in a subprocess, answered over real HTTP (httpx)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    FeedbackStore.from_settings(settings).upsert_catalog(tiny_world.catalog)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = Path(sys.executable).with_name("recloop")
    proc = subprocess.Popen([str(exe), "serve", "--workspace", str(settings.root), "--port", str(port),
                             "--model-dir", str(tiny_models), "--log-level", "warning"],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            while True:
                assert proc.poll() is None, "server exited"
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server not ready in 120 s"
                time.sleep(0.3)
            r = client.get("/recommend", params={"user_id": "someone", "k": 4})
            assert r.status_code == 200 and len(r.json()["items"]) == 4 and r.json()["model_version"] == "1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
