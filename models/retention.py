"""Registry housekeeping: a retention policy for heavy artifacts, shared encoder files, disk use.

Every registered version keeps its MLflow record (run, params, metrics, evaluation JSON, gate
report, tags) forever. Its **heavy artifacts** - the logged model (weights, encoder, ranker), the
local download cache and the candidate folder the flow trained into - are kept only for

* the versions with an alias (``champion``, ``previous``, a pending ``challenger``), and
* the newest ``settings.retrain.keep_versions`` versions;

older ones are pruned by :func:`prune_versions` (run by the retrain flow after every decision and
by ``recloop registry prune``): the model artifacts are deleted through MLflow's artifact
repository (local folders, S3, ... alike), the version gets the tags ``artifacts_pruned`` (when)
and ``artifacts_pruned_bytes``, and loading it afterwards fails with a clear
:class:`~models.registry.ModelLoadError` ("pruned by the retention policy").

**Shared encoder files.** Versions trained in ``frozen`` mode carry the same encoder bytes.
:func:`share_files` replaces every large file under the given folders by a hard link to one
read-only copy in ``<models>/blobs/<sha256>`` (content-addressed), so N versions of one encoder
cost one encoder on disk (candidate folders, the download cache and a local MLflow artifact
store; a remote store keeps its own copies). Blobs no file links to any more are removed by
:func:`collect_blobs`. The blobs are read-only: a writer that tried to change one in place would
fail loudly instead of changing every version at once.

:func:`disk_usage` counts each inode once (hard links are not double-counted).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

PRUNED_TAG = "artifacts_pruned"
MIN_SHARED_BYTES = 1 << 20  # files below 1 MiB are not worth a link


@dataclass
class PruneReport:
    pruned: list[str] = field(default_factory=list)  # versions whose heavy artifacts were deleted now
    kept: list[str] = field(default_factory=list)  # versions that keep them (aliases, newest N)
    freed_bytes: int = 0
    errors: dict[str, str] = field(default_factory=dict)  # version -> why it could not be pruned

    def to_dict(self) -> dict:
        return {"pruned": self.pruned, "kept": self.kept, "freed_bytes": self.freed_bytes, "errors": self.errors}


def disk_usage(path: str | Path) -> int:
    """Bytes under ``path``, each inode once (hard-linked copies count once)."""
    seen, total = set(), 0
    root = Path(path)
    if not root.exists():
        return 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def blob_dir(settings) -> Path:
    return settings.models_dir / "blobs"


def share_files(settings, *roots: str | Path, min_bytes: int = MIN_SHARED_BYTES) -> int:
    """Hard-link every regular file >= ``min_bytes`` under ``roots`` to its content-addressed blob
    (creating the blob from the first copy seen). Returns the bytes saved. Files on another
    filesystem than the blob store are left as they are."""
    store = blob_dir(settings)
    store.mkdir(parents=True, exist_ok=True)
    dev = store.stat().st_dev
    saved = 0
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            st = path.stat()
            if st.st_size < min_bytes or st.st_dev != dev or st.st_nlink > 1:  # small, elsewhere, or shared already
                continue
            blob = store / _sha256(path)
            if blob.exists():
                if os.path.samestat(blob.stat(), st):
                    continue
                tmp = path.with_name(f".{path.name}.link")
                os.link(blob, tmp)
                os.replace(tmp, path)  # atomic: the path is the old copy or the shared one, never missing
                saved += st.st_size
            else:
                os.link(path, blob)
                os.chmod(blob, 0o444)
    return saved


def collect_blobs(settings) -> int:
    """Remove blobs no other file links to any more; returns the bytes freed."""
    store = blob_dir(settings)
    freed = 0
    if store.is_dir():
        for blob in store.iterdir():
            st = blob.stat()
            if blob.is_file() and st.st_nlink <= 1:
                blob.unlink()
                freed += st.st_size
    return freed


def _local_path(uri: str) -> Path | None:
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" not in uri:
        return Path(uri)
    return None


def prune_versions(settings, keep_last: int | None = None) -> PruneReport:
    """Apply the retention policy (see the module doc); safe to run at any time, idempotent."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from models.registry import _cache_dir, _lock, _registry_exists, client

    report = PruneReport()
    if not _registry_exists(settings):
        return report
    keep_last = settings.retrain.keep_versions if keep_last is None else int(keep_last)
    c = client(settings)
    name = settings.model_name
    with _lock(settings):  # never while a promotion moves the aliases
        try:
            versions = sorted(c.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version), reverse=True)
            aliased = {str(v) for v in (c.get_registered_model(name).aliases or {}).values()}
        except MlflowException:
            return report
        for k, mv in enumerate(versions):
            v = str(mv.version)
            tags = dict(mv.tags or {})
            pending = tags.get("gate_decision") in (None, "pending")
            if v in aliased or k < keep_last or pending:
                report.kept.append(v)
                continue
            if PRUNED_TAG in tags:
                continue
            try:
                uri = c.get_model_version_download_uri(name, v)
                local = _local_path(uri)
                size = disk_usage(local) if local is not None else 0
                get_artifact_repository(uri).delete_artifacts()
                cache = _cache_dir(settings, v)
                size += disk_usage(cache)
                shutil.rmtree(cache, ignore_errors=True)
                c.set_model_version_tag(name, v, PRUNED_TAG, datetime.now(UTC).isoformat(timespec="seconds"))
                c.set_model_version_tag(name, v, "artifacts_pruned_bytes", str(size))
                report.pruned.append(v)
                report.freed_bytes += size
            except Exception as exc:  # one version failing never stops the others
                report.errors[v] = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("retention: could not prune version %s: %s", v, exc)
    report.freed_bytes += collect_blobs(settings)
    if report.pruned:
        log.info("retention: pruned the model artifacts of versions %s (%.1f MB)", ", ".join(report.pruned),
                 report.freed_bytes / 1e6)
    return report


def prune_candidates(settings, keep: Path | None = None) -> int:
    """Delete candidate folders (``<models>/candidates/*``) except ``keep``: once registered, a model
    lives in MLflow; a failed run's folder is debris. Returns the bytes freed."""
    root = settings.models_dir / "candidates"
    freed = 0
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and (keep is None or d.resolve() != Path(keep).resolve()):
                freed += disk_usage(d)
                shutil.rmtree(d, ignore_errors=True)
    return freed + collect_blobs(settings)


def artifact_root_path(settings) -> Path | None:
    """The MLflow artifact root as a local folder (None for a remote store, or a tracking server that
    keeps the artifacts itself)."""
    if settings.mlflow_artifact_root is None and settings.tracking_uri.startswith(("http://", "https://")):
        return None
    return _local_path(str(settings.artifact_root))


def housekeeping(settings) -> dict:
    """After a retrain: drop candidate folders, share identical large files, apply the retention policy.
    Returns what it did and the disk use (bytes) of the models folder + local artifact store before/after."""
    roots = [settings.models_dir] + [p for p in [artifact_root_path(settings)] if p is not None]

    def used() -> int:
        return sum(disk_usage(r) for r in roots)

    before = used()
    prune_candidates(settings)
    share_files(settings, settings.models_dir / "cache", *roots[1:])
    report = prune_versions(settings)
    return {**report.to_dict(), "disk_bytes_before": before, "disk_bytes_after": used()}
