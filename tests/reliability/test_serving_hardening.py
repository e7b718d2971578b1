"""Serving hardening (issue 14): ids that cannot poison the accepted-id log, timestamps out of the
store's range, the OpenAPI document, open write paths, click spam, a broken champion at start,
and the body / nesting / field limits that must keep holding.

Fast: a tiny text-hash model (``tests/conftest_serving.py``) served in-process by TestClient.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.feedback import FeedbackWriter
from serving.lifecycle import InMemoryModelSource, LocalDirModelSource
from tests.conftest_serving import TextHashRecommender, world  # noqa: F401  (fixture)

LOCAL = "http://127.0.0.1"
REPO = Path(__file__).resolve().parents[2]


def make_app(settings, source=None, **options):
    """The real app over the fake model; ``options`` are serving knobs (declared or not)."""
    if options:
        settings.serving = settings.serving.model_copy(update=options)
    source = source if source is not None else InMemoryModelSource(TextHashRecommender(), "1")
    return create_app(settings, model_source=source, start_background=False)


def event(eid, user="u1", item="sci0", etype="click", ts="2026-01-06T10:00:00+00:00", **kw):
    return {"event_id": eid, "user_id": user, "item_id": item, "event_type": etype, "timestamp": ts, **kw}


def landed(settings) -> pd.DataFrame:
    files = sorted(settings.landing_dir.glob("serving-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files]) if files else pd.DataFrame(columns=["event_id"])


def nothing_written(settings) -> bool:
    spool = settings.state_dir / "serving" / "spool"
    return (not list(settings.landing_dir.glob("serving-*"))
            and not (spool.exists() and any(spool.iterdir())))


# ==== item 3: the accepted-id log cannot be poisoned =========================================================
@pytest.mark.parametrize("field, value", [
    ("event_id", "poison-1\nvictim-42"), ("event_id", "victim-42\n"), ("event_id", "a\rb"), ("event_id", "a\x00b"),
    ("event_id", "tab\there"), ("event_id", "x\u2028y"), ("event_id", "../../etc/passwd"), ("event_id", "x" * 129),
    ("event_id", ""), ("user_id", "u1\nu2"), ("user_id", "u\x1b[31m"), ("impression_id", "imp\n1"),
])
def test_ids_with_control_characters_newlines_or_separators_are_422_and_nothing_lands(world, field, value):
    settings, *_ = world
    with TestClient(make_app(settings), base_url=LOCAL) as client:
        r = client.post("/feedback", json=event("ok-1", **{field: value}))
        assert r.status_code == 422, r.text
        assert field in json.dumps(r.json()["detail"])
    assert nothing_written(settings)


def test_a_poisoning_id_written_to_the_log_cannot_make_a_later_event_a_duplicate_after_restart(settings):
    """The attack of the issue at the storage layer (no request validation in front): with the
    newline-delimited log, "poison-1\\nvictim-42" made "victim-42" a duplicate after a restart."""
    state = settings.state_dir / "serving"
    w = FeedbackWriter(settings.landing_dir, state)
    base = {"user_id": "u1", "item_id": "sci0", "event_type": "click", "label": 1,
            "timestamp": pd.Timestamp("2026-01-06T10:00:00Z"), "query": None, "model_version": None}
    assert w.write([{**base, "event_id": "poison-1\nvictim-42"}]).accepted == 1
    restarted = FeedbackWriter(settings.landing_dir, state)
    result = restarted.write([{**base, "event_id": "victim-42"}])
    assert result.accepted == 1 and result.duplicates == 0
    assert "victim-42" in set(landed(settings)["event_id"])
    assert not (state / "accepted_event_ids.log").exists()


def test_an_old_newline_log_is_migrated_keeping_only_ids_found_in_the_store_or_landing(world):
    settings, _, _ = world  # the store holds e0..e25
    state = settings.state_dir / "serving"
    state.mkdir(parents=True, exist_ok=True)
    # what the old server wrote for "e1", "poison-1\nvictim-42" and "pending-7" (landed, not ingested yet)
    (state / "accepted_event_ids.log").write_bytes(b"e1\npoison-1\nvictim-42\npending-7\ntorn-la")
    pd.DataFrame({"event_id": ["pending-7"]}).to_parquet(settings.landing_dir / "serving-old-batch.parquet")
    w = FeedbackWriter(settings.landing_dir, state, store_dir=settings.store_dir)
    assert w.seen("e1") and w.seen("pending-7")
    assert not w.seen("victim-42") and not w.seen("poison-1") and not w.seen("torn-la")
    assert (state / "accepted_event_ids.log.migrated").exists() and not (state / "accepted_event_ids.log").exists()
    base = {"user_id": "u1", "item_id": "sci0", "event_type": "click", "label": 1,
            "timestamp": pd.Timestamp("2026-01-06T10:00:00Z"), "query": None, "model_version": None}
    r = w.write([{**base, "event_id": "victim-42"}, {**base, "event_id": "e1"}])
    assert (r.accepted, r.duplicates) == (1, 1)


# ==== item 8: small crashes ====================================================================================
@pytest.mark.parametrize("ts", ["1500-01-01T00:00:00Z", "1677-09-21T00:00:00Z", "0001-01-01T00:00:00+05:00",
                                "9999-12-31T23:59:59-05:00", -(10 ** 13)])
def test_a_timestamp_outside_the_store_range_is_422_not_500(world, ts):
    settings, *_ = world
    with TestClient(make_app(settings), base_url=LOCAL, raise_server_exceptions=False) as client:
        r = client.post("/feedback", json=event("old-1", ts=ts))
        assert r.status_code == 422, r.text
        assert client.get("/health").status_code == 200  # the server is fine afterwards
    assert nothing_written(settings)


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def _resolve(doc, ref):
    assert ref.startswith("#/"), ref
    node = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_openapi_feedback_body_resolves_and_its_4xx_answers_are_documented(world):
    settings, *_ = world
    with TestClient(make_app(settings), base_url=LOCAL) as client:
        doc = client.get("/openapi.json").json()
    refs = set(_refs(doc))
    assert refs and all(r.startswith("#/components/schemas/") for r in refs), refs
    for ref in refs:
        _resolve(doc, ref)  # KeyError: an unresolvable reference
    post = doc["paths"]["/feedback"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert "#/components/schemas/FeedbackIn" in set(_refs(body))
    assert {"202", "401", "413", "415", "422", "429"} <= set(post["responses"])
    event_id = _resolve(doc, "#/components/schemas/FeedbackIn")["properties"]["event_id"]
    assert event_id["pattern"] and event_id["maxLength"] == 128


# ==== item 4: open write paths ==================================================================================
@pytest.mark.parametrize("ctype, body", [
    ("text/plain", json.dumps(event("csrf-1"))),
    ("application/x-www-form-urlencoded", "event_id=csrf-1&user_id=u1"),
    ("multipart/form-data; boundary=x", "--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--\r\n"),
    (None, json.dumps(event("csrf-1"))),
])
def test_feedback_refuses_bodies_a_browser_can_post_cross_site_with_415(world, ctype, body):
    settings, *_ = world
    with TestClient(make_app(settings), base_url=LOCAL) as client:
        headers = {"content-type": ctype} if ctype else {}
        r = client.post("/feedback", content=body.encode(), headers=headers)
        assert r.status_code == 415, r.text
        assert client.post("/admin/reload", content=b"a=1",
                           headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 415
        assert client.post("/admin/reload").status_code == 200  # no body: fine
    assert nothing_written(settings)


def test_a_foreign_host_header_is_refused_but_health_probes_pass(world):
    settings, *_ = world
    with TestClient(make_app(settings), base_url="http://evil.example") as client:
        assert client.get("/recommend", params={"user_id": "u1"}).status_code == 400
        assert client.post("/feedback", json=event("rebind-1")).status_code == 400
        assert client.get("/model").status_code == 400
        assert client.get("/health").status_code == 200  # kubelet probes send the pod address
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        with TestClient(make_app(settings), base_url=f"http://{host}") as client:
            assert client.get("/recommend", params={"user_id": "u1"}).status_code == 200, host
    with TestClient(make_app(settings, allowed_hosts=["reco.example.com"]), base_url="http://reco.example.com") as c:
        assert c.get("/recommend", params={"user_id": "u1"}).status_code == 200
    assert nothing_written(settings)


def test_an_oversized_request_header_is_431_in_process(world):
    settings, *_ = world
    with TestClient(make_app(settings), base_url=LOCAL) as client:
        assert client.get("/health", headers={"x-filler": "a" * 8_000}).status_code == 200
        r = client.post("/feedback", json=event("h-1"), headers={"x-filler": "a" * 100_000})
        assert r.status_code == 431
    assert nothing_written(settings)


def test_an_oversized_request_header_is_refused_on_the_wire_by_the_serve_options(world):
    """``recloop serve`` runs uvicorn with h11 and a head limit: the header is refused while it
    streams in (httptools, uvicorn's default, accepted a 200 MiB header)."""
    import socket

    import uvicorn

    from serving.commands import uvicorn_options

    settings, *_ = world
    app = make_app(settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, **{**uvicorn_options(settings.serving, "127.0.0.1", port, "error"),
                                                   "lifespan": "off"}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn did not start"
            threading.Event().wait(0.05)
        sent = 0
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: ")
            try:
                for _ in range(64):  # up to 4 MiB; the server answers and closes long before
                    sock.sendall(b"a" * 65_536)
                    sent += 65_536
            except OSError:
                pass  # the server closed the connection: refused
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 4"), answer[:100]
        assert sent < 4 * 2 ** 20 or answer  # refused while the header streamed in
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_model_shows_no_filesystem_paths_to_anonymous_callers(world):
    settings, *_ = world
    source = InMemoryModelSource(TextHashRecommender(), "1", info={
        "source": "local:/srv/secret/models/1", "model_dir": "/srv/secret/cache/v1",
        "model_info": {"encoder": "/home/alice/encoders/minilm", "mode": "frozen"}})
    with TestClient(make_app(settings, source, token="s3cret"), base_url=LOCAL) as client:
        anonymous = client.get("/model")
        assert anonymous.status_code == 200 and "/srv/" not in anonymous.text and "/home/" not in anonymous.text
        assert anonymous.json()["version"] == "1" and anonymous.json()["details"]["model_info"]["mode"] == "frozen"
        full = client.get("/model", headers={"Authorization": "Bearer s3cret"})
        assert "/srv/secret/cache/v1" in full.text
    with TestClient(make_app(settings, source, token=None), base_url=LOCAL) as client:
        assert "/srv/" not in client.get("/model").text  # no token configured: everyone is anonymous


def _serve(tmp_path, monkeypatch, *args):
    """``recloop serve`` in-process with uvicorn.run replaced by a recorder (a tiny fake: no server)."""
    import uvicorn
    from typer.testing import CliRunner

    from recloop.cli import app as cli

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    for key in [k for k in os.environ if k.startswith("RECLOOP_")]:
        monkeypatch.delenv(key)
    models = tmp_path / "no-models"
    models.mkdir(exist_ok=True)
    r = CliRunner().invoke(cli, ["serve", "--workspace", str(tmp_path / "ws"), "--model-dir", str(models), *args])
    return r, calls


def test_serve_refuses_a_non_loopback_host_without_a_token(tmp_path, monkeypatch):
    r, calls = _serve(tmp_path, monkeypatch, "--host", "0.0.0.0")
    assert r.exit_code != 0 and not calls
    assert "without a token" in r.output and "--insecure" in r.output


def test_serve_allows_a_public_host_with_a_token_or_insecure_and_warns(tmp_path, monkeypatch):
    r, calls = _serve(tmp_path, monkeypatch, "--host", "0.0.0.0", "--token", "t0ken")
    assert r.exit_code == 0, r.output
    assert calls[0]["host"] == "0.0.0.0" and calls[0]["http"] == "h11" and calls[0]["h11_max_incomplete_event_size"]
    r, calls = _serve(tmp_path, monkeypatch, "--host", "0.0.0.0", "--insecure")
    assert r.exit_code == 0 and "WITHOUT a token" in r.output and calls
    r, calls = _serve(tmp_path, monkeypatch)  # loopback default: no token needed
    assert r.exit_code == 0 and calls[0]["host"] == "127.0.0.1" and "WARNING" not in r.output


def test_serve_help_offers_token_and_insecure(tmp_path, monkeypatch):
    r, _ = _serve(tmp_path, monkeypatch, "--help")
    assert "--token" in r.output and "--insecure" in r.output and "--allowed-host" in r.output


def test_compose_example_guards_mlflow_and_prefect_with_secrets_from_the_environment():
    import yaml  # PyYAML: installed with prefect and mlflow
    text = (REPO / "deploy" / "docker-compose.yml").read_text()
    doc = yaml.safe_load(text)
    services = doc["services"]
    mlflow = json.dumps(services["mlflow"])
    assert "--app-name basic-auth" in mlflow
    prefect_env = services["prefect-server"]["environment"]
    assert prefect_env["PREFECT_SERVER_API_AUTH_STRING"].startswith("${") and ":?" in prefect_env[
        "PREFECT_SERVER_API_AUTH_STRING"]
    assert services["worker"]["environment"]["PREFECT_API_AUTH_STRING"].startswith("${")
    for secret in ("recloop-secret", "POSTGRES_PASSWORD: recloop\n", "password1234", "admin:password"):
        assert secret not in text, secret
    for name, svc in services.items():  # every published port on loopback only
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


# ==== item 2: click spam ==========================================================================================
def test_feedback_is_micro_batched_into_landing_files_by_size(world):
    settings, *_ = world
    app = make_app(settings, feedback_flush_events=50, feedback_flush_seconds=3600)
    with TestClient(app, base_url=LOCAL) as client:
        names = {client.post("/feedback", json=event(f"b{i}", user=f"u{i}")).json()["batch_file"] for i in range(25)}
        assert len(names) == 1 and not list(settings.landing_dir.glob("serving-*"))  # open, not landed yet
        for i in range(25, 50):
            client.post("/feedback", json=event(f"b{i}", user=f"u{i}"))
        files = list(settings.landing_dir.glob("serving-*.parquet"))
        assert [f.name for f in files] == list(names)  # the 50th event cut the batch
        client.post("/feedback", json=event("b50"))
    # shutdown lands the open batch
    assert sorted(landed(settings)["event_id"]) == sorted(f"b{i}" for i in range(51))
    assert len(list(settings.landing_dir.glob("serving-*.parquet"))) == 2


def test_the_open_batch_lands_after_the_time_limit(settings):
    w = FeedbackWriter(settings.landing_dir, settings.state_dir / "serving", flush_events=10_000, flush_seconds=0.01)
    base = {"user_id": "u1", "item_id": "sci0", "event_type": "click", "label": 1,
            "timestamp": pd.Timestamp("2026-01-06T10:00:00Z"), "query": None, "model_version": None}
    name = w.write([{**base, "event_id": "t1"}]).batch_file
    threading.Event().wait(0.05)
    assert w.flush_due() == name and (settings.landing_dir / name).exists()


def test_an_accepted_event_survives_a_crash_before_its_batch_lands(settings):
    """A server process accepts events into its open batch and dies (os._exit: no cleanup, no flush);
    the next server on the workspace lands them."""
    state = settings.state_dir / "serving"
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        import pandas as pd
        from serving.feedback import FeedbackWriter
        w = FeedbackWriter({str(settings.landing_dir)!r}, {str(state)!r}, flush_events=1000, flush_seconds=3600)
        base = dict(user_id="u1", item_id="sci0", event_type="click", label=1,
                    timestamp=pd.Timestamp("2026-01-06T10:00:00Z"), query=None, model_version=None)
        r = w.write([dict(base, event_id="crash-1"), dict(base, event_id="crash-2")])
        print(r.accepted, flush=True)
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.stdout.strip() == "2", out.stderr[-2000:]
    assert not list(settings.landing_dir.glob("serving-*"))  # accepted, not landed: only in the spool
    restarted = FeedbackWriter(settings.landing_dir, state)
    assert sorted(landed(settings)["event_id"]) == ["crash-1", "crash-2"]
    assert not list((state / "spool").iterdir())
    assert restarted.write([{"event_id": "crash-1", "user_id": "u1", "item_id": "sci0", "event_type": "click",
                             "label": 1, "timestamp": pd.Timestamp("2026-01-06T10:00:00Z")}]).duplicates == 1


def test_a_live_servers_open_batch_is_not_taken_by_another_server(settings):
    state = settings.state_dir / "serving"
    first = FeedbackWriter(settings.landing_dir, state, flush_events=1000, flush_seconds=3600)
    base = {"user_id": "u1", "item_id": "sci0", "event_type": "click", "label": 1,
            "timestamp": pd.Timestamp("2026-01-06T10:00:00Z"), "query": None, "model_version": None}
    first.write([{**base, "event_id": "live-1"}])
    second = FeedbackWriter(settings.landing_dir, state)  # starts while the first is serving
    assert second.recover() == [] and not list(settings.landing_dir.glob("serving-*"))
    assert second.write([{**base, "event_id": "live-1"}]).duplicates == 1  # the id log is shared
    first.close()
    assert list(landed(settings)["event_id"]) == ["live-1"]


def test_a_torn_append_is_skipped_and_an_unconvertible_batch_is_set_aside_not_lost(settings):
    spool = settings.state_dir / "serving" / "spool"
    spool.mkdir(parents=True)
    good = json.dumps({"event_id": "whole-1", "user_id": "u1", "item_id": "sci0", "event_type": "click", "label": 1,
                       "timestamp": "2026-01-06T10:00:00+00:00", "query": None, "model_version": None})
    (spool / "serving-20260106T100000000000-aaaaaaaa.jsonl").write_text(good + "\n" + good[:40])  # died mid-append
    bad = good.replace('"label": 1', '"label": "x"').replace("whole-1", "bad-1")
    (spool / "serving-20260106T100001000000-bbbbbbbb.jsonl").write_text(bad + "\n")
    FeedbackWriter(settings.landing_dir, settings.state_dir / "serving")  # a restart recovers both
    assert list(landed(settings)["event_id"]) == ["whole-1"]
    assert [p.name for p in (spool / "failed").iterdir()] == ["serving-20260106T100001000000-bbbbbbbb.jsonl"]
    assert not list(spool.glob("*.jsonl"))


def test_rotating_user_ids_still_hits_the_per_client_limit(world):
    settings, *_ = world
    app = make_app(settings, feedback_rate_per_client_per_minute=40, feedback_flush_seconds=0)
    with TestClient(app, base_url=LOCAL) as client:
        codes = [client.post("/feedback", json={"events": [event(f"s{i}-{j}", user=f"sock-{i}-{j}")
                                                           for j in range(4)]}).status_code for i in range(12)]
        assert codes[:10] == [202] * 10 and codes[10:] == [429, 429]
        r = client.post("/feedback", json=event("s-x", user="fresh-user"))
        assert r.status_code == 429 and "client" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
    with TestClient(app, base_url=LOCAL, client=("10.0.0.2", 5000)) as other:  # another client is not blocked
        assert other.post("/feedback", json=event("o-1", user="someone")).status_code == 202
    assert len(landed(settings)) == 41


def test_the_global_feedback_rate_caps_all_clients_together(world):
    settings, *_ = world
    app = make_app(settings, feedback_rate_global_per_minute=10, feedback_flush_seconds=0)
    for n, host in enumerate(("10.0.0.1", "10.0.0.2", "10.0.0.3")):
        with TestClient(app, base_url=LOCAL, client=(host, 5000)) as client:
            r = client.post("/feedback", json={"events": [event(f"g{n}-{j}", user=f"g{n}-{j}") for j in range(4)]})
            assert r.status_code == (202 if n < 2 else 429)
            if n == 2:
                assert "server" in r.json()["detail"]
    assert len(landed(settings)) == 8


# ==== item 6: a broken champion at start ===========================================================================
class _Flaky(InMemoryModelSource):
    """Versions listed in ``broken`` fail to load, like a corrupt download."""

    def __init__(self):
        super().__init__()
        self.broken: set[str] = set()

    def load(self, version):
        if version in self.broken:
            raise OSError(f"version {version}: /srv/models/{version}/weights.safetensors fails its checksum")
        return super().load(version)


def test_a_broken_champion_at_start_falls_back_to_the_newest_healthy_version(world, caplog):
    settings, *_ = world
    source = _Flaky()
    for v in ("1", "2", "3"):
        source.set(v, TextHashRecommender(bias=float(v), name=f"v{v}"))
    source.broken = {"3", "2"}  # champion 3 and previous 2 broken: 1 is the newest healthy version
    app = make_app(settings, source)
    caplog.set_level(logging.INFO, logger="serving.lifecycle")
    with TestClient(app, base_url=LOCAL) as client:
        h = client.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "degraded" and h.json()["model_version"] == "1"
        assert "champion version 3" in h.json()["degraded_reason"] and "2" in h.json()["degraded_reason"]
        assert "/srv/" not in h.text  # the load error's paths are not shown to anonymous callers
        assert client.get("/recommend", params={"user_id": "u1"}).json()["model_version"] == "1"
        assert any("degraded" in r.getMessage() for r in caplog.records)
        source.broken = set()  # the champion's files are repaired
        app.state.holder._failed.clear()  # its retry time has come
        assert app.state.holder.poll_once() is True
        h = client.get("/health").json()
        assert h["status"] == "ready" and h["model_version"] == "3" and h["degraded_reason"] is None
        assert any("repaired" in r.getMessage() for r in caplog.records)


def test_a_champion_that_breaks_later_keeps_the_served_model_and_reports_degraded(world):
    settings, *_ = world
    source = _Flaky()
    source.set("1", TextHashRecommender())
    app = make_app(settings, source)
    with TestClient(app, base_url=LOCAL) as client:
        source.set("2", TextHashRecommender(bias=1.0))
        source.broken = {"2"}
        assert app.state.holder.poll_once() is False
        h = client.get("/health").json()
        assert h["status"] == "degraded" and h["model_version"] == "1" and "still serving version 1" in \
            h["degraded_reason"]


def test_no_loadable_version_at_all_is_503_with_the_reason(world):
    settings, *_ = world
    source = _Flaky()
    source.set("1", TextHashRecommender())
    source.broken = {"1"}
    with TestClient(make_app(settings, source), base_url=LOCAL) as client:
        h = client.get("/health")
        assert h.status_code == 503 and "no fallback version loads" in h.json()["degraded_reason"]


def test_local_dir_fallbacks_are_previous_then_newest_folders(tmp_path):
    for v in ("1", "2", "10", "b"):
        (tmp_path / v).mkdir()
        (tmp_path / v / "config.json").write_text("{}")
    src = LocalDirModelSource(tmp_path)
    src.set_champion("2")
    src.set_champion("10")
    assert src.fallback_versions("10") == ["2", "1", "b"]


# ==== limits that must keep holding ================================================================================
def _call_asgi(app, headers, chunks: int):
    """POST /feedback straight into the ASGI app, the body streamed as ``chunks`` x 1 MiB (TestClient
    would read a streamed body whole first); returns (status, chunks pulled)."""
    import anyio

    pulled, sent = [], []

    async def receive():
        pulled.append(1)
        more = len(pulled) < chunks
        return {"type": "http.request", "body": b" " * 2 ** 20, "more_body": more}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/feedback", "raw_path": b"/feedback", "query_string": b"", "root_path": "",
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), *headers]}
    anyio.run(app, scope, receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start"), len(pulled)


def test_a_streamed_50mb_body_is_413_without_being_read_whole(world):
    settings, *_ = world
    status, pulled = _call_asgi(make_app(settings), [(b"transfer-encoding", b"chunked")], chunks=50)
    assert status == 413
    assert pulled <= settings.serving.max_body_bytes // 2 ** 20 + 1  # refused after ~1 MiB, not 50
    assert nothing_written(settings)


def test_a_declared_50mb_body_is_413_before_any_byte_is_read(world):
    settings, *_ = world
    status, pulled = _call_asgi(make_app(settings), [(b"content-length", str(50 * 2 ** 20).encode())], chunks=50)
    assert status == 413 and pulled == 0
    assert nothing_written(settings)


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000,
                                  b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
                                  b'{"events": [' + b'{"x":[' * 50_000 + b"]}" * 50_000 + b"]}"])
def test_json_nested_100000_deep_is_4xx(world, body):
    settings, *_ = world
    with TestClient(make_app(settings, max_body_bytes=2_000_000), base_url=LOCAL,
                    raise_server_exceptions=False) as client:
        r = client.post("/feedback", content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
    assert nothing_written(settings)
