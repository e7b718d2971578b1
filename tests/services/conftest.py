"""Real PostgreSQL and S3 (SeaweedFS) for the slow tier, started by the tests themselves (issue 15).

Session-scoped servers (``postgres``, ``s3_server``), a fresh database (``pg_url``) and a fresh bucket
(``s3_bucket``) per test, and ``services_settings``: a ``Settings`` pointing every services field at
them. Every test under ``tests/services/`` is marked ``slow`` (also set by ``pytestmark`` in each
module); the fixtures skip, saying what to install, when ``initdb``/``postgres`` or ``weed`` is missing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TEST_GRACE_S = 1.0  # throwaway data: stop SeaweedFS quickly (its clean stop takes ~15 s; it keeps what it acknowledged)


@pytest.hookimpl(tryfirst=True)  # before the `-m` deselection reads the marks
def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.slow)


def services_root(prefix: str) -> Path:
    """A folder for server data that the ``postgres`` user can reach when the tests run as root
    (pytest's own temp folders are 0700 under a 0700 parent). Callers remove it."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o711)  # traverse only: other users cannot list it
    return root


@pytest.fixture(scope="session")
def services_tmp():
    root = services_root("recloop-services-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _unavailable(reason: str):
    """Skip where a developer lacks a server binary; in CI (``CI`` set) fail: the services tier must run."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the services tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres(services_tmp):
    """A real PostgreSQL 15 on 127.0.0.1 (SCRAM auth, random password) for the whole session."""
    import psycopg  # noqa: F401  (a dev dependency: missing = an error, not a skip)

    from recloop.services import ServiceUnavailable, postgres_bin_dir, start_postgres

    try:
        postgres_bin_dir()
    except ServiceUnavailable as exc:
        _unavailable(str(exc))
    pg = start_postgres(services_tmp)
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def s3_server(services_tmp):
    """A real SeaweedFS S3 gateway on 127.0.0.1 (signed requests only, random keys) for the session."""
    import boto3  # noqa: F401  (a dev dependency)

    from recloop.services import ServiceUnavailable, start_s3, weed_binary

    try:
        weed_binary()
    except ServiceUnavailable as exc:
        _unavailable(str(exc))
    s3 = start_s3(services_tmp, buckets=())
    yield s3
    s3.stop(grace=TEST_GRACE_S)


@pytest.fixture
def pg_url(postgres):
    """URL of a fresh database, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = postgres.create_database(name)
    yield url
    postgres.drop_database(name)


@pytest.fixture
def s3_bucket(s3_server):
    """Name of a fresh bucket, emptied and deleted after the test."""
    name = s3_server.create_bucket(f"t-{uuid.uuid4().hex[:16]}")
    yield name
    client = s3_server.client()
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys})
        client.delete_bucket(Bucket=name)
    except Exception:  # noqa: S110 - cleanup of a throwaway bucket must not fail the test
        pass


@pytest.fixture
def services_settings(tmp_path, monkeypatch, pg_url, s3_server, s3_bucket):
    """Settings of a fresh workspace whose services fields all point at the test servers."""
    for key in list(os.environ):
        if key.startswith("RECLOOP_"):
            monkeypatch.delenv(key)
    from recloop.settings import load_settings

    return load_settings(tmp_path / "ws", services=services_fields(pg_url, s3_server, s3_bucket)).ensure_dirs()


def services_fields(pg_url: str, s3_server, bucket: str, **extra) -> dict:
    """The ``services`` settings for a database URL and a bucket on ``s3_server`` (for tests that build
    several workspaces on the same services)."""
    return {"database_url": pg_url, "s3_endpoint": s3_server.endpoint, "s3_bucket": bucket,
            "s3_access_key": s3_server.access_key, "s3_secret_key": s3_server.secret_key,
            "s3_region": s3_server.region, **extra}
