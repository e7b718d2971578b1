"""S3-compatible object storage under one prefix: ``s3://<bucket>/<s3_prefix>/<key>``.

With ``services.s3_bucket`` set, the folders that machines must share become prefixes here:
``landing/`` (feedback waiting for ingest), ``processed/``, ``quarantine/`` and ``warehouse/`` (the
Iceberg tables, :mod:`recloop.iceberg_store`). Workers then share nothing but the services.

boto3 is imported inside :meth:`ObjectStore.from_settings`, so the embedded default does not need it.
Keys are relative to the prefix; ``list`` returns them that way too. S3 has no rename: :meth:`move`
is a server-side copy followed by a delete, so a crash in between leaves the object at both keys,
never at neither (a repeated move finishes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

LANDING = "landing/"
PROCESSED = "processed/"
QUARANTINE = "quarantine/"
WAREHOUSE = "warehouse/"


class ObjectStoreError(RuntimeError):
    """A misconfigured or unreachable object store, said in words (bucket, endpoint, credentials)."""


def _translate(exc: Exception, what: str, bucket: str, endpoint: str | None) -> Exception:
    """A boto error as an :class:`ObjectStoreError` that names the setting to fix; others unchanged."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = endpoint or "AWS S3"
    if isinstance(exc, NoCredentialsError):
        return ObjectStoreError(
            f"{what}: no S3 credentials; set RECLOOP_SERVICES__S3_ACCESS_KEY and RECLOOP_SERVICES__S3_SECRET_KEY "
            f"(or the standard AWS_* variables)")
    if isinstance(exc, EndpointConnectionError):
        return ObjectStoreError(f"{what}: cannot reach the object store at {where} (services.s3_endpoint)")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket",):
            return ObjectStoreError(f"{what}: bucket {bucket!r} does not exist at {where} (services.s3_bucket); "
                                    "create it first")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return ObjectStoreError(f"{what}: the object store at {where} refused the credentials ({code}); "
                                    "check services.s3_access_key / s3_secret_key")
    return exc


@dataclass
class ObjectStore:
    """A bucket and a prefix, with the few operations the loop needs (files in and out, list, move)."""

    client: Any  # a boto3 S3 client
    bucket: str
    prefix: str = "recloop"
    endpoint: str | None = None

    @classmethod
    def from_settings(cls, settings) -> ObjectStore | None:
        """The configured store, or None when ``services.s3_bucket`` is unset (the embedded default)."""
        sv = settings.services
        if not sv.s3_bucket:
            return None
        import boto3
        from botocore.config import Config

        if bool(sv.s3_access_key) != bool(sv.s3_secret_key):
            raise ObjectStoreError("set both services.s3_access_key and services.s3_secret_key, or neither "
                                   "(then the standard AWS credential chain is used)")
        client = boto3.client(
            "s3", endpoint_url=sv.s3_endpoint, region_name=sv.s3_region,
            aws_access_key_id=sv.s3_access_key or None, aws_secret_access_key=sv.s3_secret_key or None,
            # path-style: SeaweedFS / MinIO on a loopback port have no per-bucket DNS names
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"},
                          connect_timeout=10, read_timeout=60),
        )
        return cls(client=client, bucket=sv.s3_bucket, prefix=sv.s3_prefix.strip("/"), endpoint=sv.s3_endpoint)

    # ---- names -------------------------------------------------------------------------------------------
    def full_key(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str = "") -> str:
        """``s3://bucket/prefix/key``: how logs, sidecars and the quarantine registry name an object."""
        return f"s3://{self.bucket}/{self.full_key(key)}"

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            err = _translate(exc, what, self.bucket, self.endpoint)
            if err is exc:
                raise
            raise err from exc

    # ---- operations --------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise :class:`ObjectStoreError` now if the bucket is missing or the credentials are refused."""
        self._call(f"check {self.url()}", self.client.head_bucket, Bucket=self.bucket)

    def put_file(self, key: str, path: Path) -> None:
        self._call(f"put {self.url(key)}", self.client.upload_file, str(path), self.bucket, self.full_key(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(f"put {self.url(key)}", self.client.put_object, Bucket=self.bucket, Key=self.full_key(key),
                   Body=data)

    def get_file(self, key: str, dest: Path) -> Path:
        """Download to ``dest`` through a temp file beside it: ``dest`` is whole or absent."""
        import os
        import tempfile

        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        os.close(fd)
        try:
            self._call(f"get {self.url(key)}", self.client.download_file, self.bucket, self.full_key(key), tmp)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

    def get_bytes(self, key: str) -> bytes:
        resp = self._call(f"get {self.url(key)}", self.client.get_object, Bucket=self.bucket, Key=self.full_key(key))
        return resp["Body"].read()

    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (relative to the store's prefix), sorted; every page is read."""
        base = self.full_key("")
        out: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(f"list {self.url(prefix)}", lambda: list(
            paginator.paginate(Bucket=self.bucket, Prefix=self.full_key(prefix))))
        for page in pages:
            for obj in page.get("Contents", []) or []:
                out.append(obj["Key"][len(base):] if base and obj["Key"].startswith(base) else obj["Key"])
        return sorted(out)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.full_key(key))
            return True
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return False
            err = _translate(exc, f"head {self.url(key)}", self.bucket, self.endpoint)
            if err is exc:
                raise
            raise err from exc
        except Exception as exc:
            err = _translate(exc, f"head {self.url(key)}", self.bucket, self.endpoint)
            if err is exc:
                raise
            raise err from exc

    def move(self, src_key: str, dst_key: str) -> None:
        """Server-side copy, then delete the source (S3 has no rename; see the module docstring)."""
        if src_key == dst_key:
            return
        # the managed copy: multipart above 5 GB, where a single copy_object is refused
        self._call(f"copy {self.url(src_key)} -> {self.url(dst_key)}", self.client.copy,
                   {"Bucket": self.bucket, "Key": self.full_key(src_key)}, self.bucket, self.full_key(dst_key))
        self.delete(src_key)

    def delete(self, key: str) -> None:
        self._call(f"delete {self.url(key)}", self.client.delete_object, Bucket=self.bucket, Key=self.full_key(key))
