"""A broken champion in a real (temporary, SQLite) MLflow registry: the server starts on the
``previous`` version, says ``degraded`` with the reason, and a corrupted local cache that is
re-fetched is logged. Slow: a tiny model is trained and registered twice (no mocks)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from recloop.store import FeedbackStore
from serving.app import create_app
from tests.test_serving_api import _evaluation, tiny_models, tiny_world  # noqa: F401  (fixtures)

LOCAL = "http://127.0.0.1"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
def test_a_corrupt_registry_champion_falls_back_to_previous_and_cache_repairs_are_logged(
        settings, tiny_world, tiny_models, caplog):
    from models import registry

    store = FeedbackStore.from_settings(settings)
    store.upsert_catalog(tiny_world.catalog)
    store.append(tiny_world.events, batch_id="world")
    _, v1 = registry.log_and_register(settings, tiny_models / "1", _evaluation(), catalog=tiny_world.catalog)
    run2, v2 = registry.log_and_register(settings, tiny_models / "2", _evaluation(), catalog=tiny_world.catalog)
    c = registry.client(settings)
    c.set_registered_model_alias(settings.model_name, "previous", v1)
    c.set_registered_model_alias(settings.model_name, "champion", v2)
    # the champion's weights are corrupt in the artifact store itself (not only in a cache)
    mv = c.get_model_version(settings.model_name, v2)
    # MLflow 3 stores a logged model under models/<model id> (the version's source is models:/<model id>)
    marks = {run2, mv.source.rsplit("/", 1)[-1]}
    weights = [p for p in Path(settings.artifact_root).rglob("weights.safetensors") if marks & set(p.parts)]
    assert weights, ("no stored weights found for the champion", mv.source)
    for p in weights:
        _truncate(p)

    caplog.set_level(logging.INFO)
    with TestClient(create_app(settings, start_background=False), base_url=LOCAL) as client:
        h = client.get("/health")
        assert h.status_code == 200, h.text
        assert h.json()["status"] == "degraded" and h.json()["model_version"] == v1
        assert f"champion version {v2}" in h.json()["degraded_reason"]
        assert client.get("/recommend", params={"user_id": "u0001"}).json()["model_version"] == v1
    assert any("degraded" in r.getMessage() for r in caplog.records)

    # a restart finds version 1's local cache corrupted: it is re-fetched, and that is logged
    cached = list((settings.models_dir / "cache").glob(f"*-v{v1}/model/weights.safetensors"))
    assert cached
    _truncate(cached[0])
    caplog.clear()
    with TestClient(create_app(settings, start_background=False), base_url=LOCAL) as client:
        assert client.get("/health").json()["model_version"] == v1
    assert any("re-fetched" in r.getMessage() and f"version {v1}" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
