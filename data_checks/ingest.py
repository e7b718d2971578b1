"""Ingest a landing file: read, validate, append good rows, move the file, record the verdict.

Steps for one file (``ingest_batch``), each safe to repeat:

1. ``batch_id = <file stem>-<sha256 of the content, 12 hex>``; identical content that
   was already handled is a *skipped* duplicate delivery (moved to ``processed/duplicates/``).
2. read (:mod:`data_checks.readers`) and validate (:mod:`data_checks.validate`); the
   verdict (decision + the invalid row indices) is written to
   ``state/ingest/<sha>.json`` with ``stage = "validated"`` **before** anything is
   stored;
3. valid rows → ``FeedbackStore.append(rows, batch_id)`` (idempotent on ``event_id``);
4. invalid rows of a split batch → ``quarantine/<stem>.rejected.parquet`` with a
   per-row ``_reason`` column (and its own ``.validation.json``);
5. ``<dest>/<file>.validation.json`` written, then the file is moved to ``processed/`` or
   ``quarantine/`` (``recloop.store.move_file``: ``os.replace``, or copy + fsync + rename when
   ``landing/`` is on another filesystem);
6. the state becomes ``stage = "done"``.

Only files inside ``landing/`` are ingested (``recloop.paths.confine``: after ``..`` and
symlinks are resolved); ``quarantine release`` may re-ingest files inside ``quarantine/``.
A file from elsewhere enters only as a *copy* (``copy_into_landing``), never moved.

A crash anywhere after step 2 leaves the file in ``landing/`` and the verdict in
``state/``; the next run resumes from step 3 with the same verdict (no second
validation that would now see the already-appended ids as "already stored"), and the
store's idempotency keeps every event exactly once. A crash before step 2 stored
nothing, so the re-run starts afresh.

**Object storage** (``services.s3_bucket`` set, :mod:`recloop.objectstore`): ``landing/``,
``processed/`` and ``quarantine/`` are also prefixes of the bucket, so workers on different machines
share nothing but the services. :func:`ingest_object` claims one ``landing/<name>`` object (a
PostgreSQL advisory lock when ``services.database_url`` is set, else a local lock), downloads it to
``state/ingest/objects/``, runs the same steps as above on that copy, then publishes: the sidecar(s)
and split-off rows are uploaded first, then the object is moved (server-side copy + delete) to
``processed/`` or ``quarantine/`` and a quarantined entry is registered
(``data_checks.quarantine.register_entry``). The verdict state is mirrored to ``state/ingest/<sha>.json``
in the bucket, so a batch that one machine validated and crashed on is resumed by another with the same
verdict. A crash before the move leaves the object in ``landing/``: the next run finishes it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from filelock import FileLock

from data_checks.readers import BatchReadError, read_batch
from data_checks.validate import (
    ValidationOutcome,
    clean_rows,
    newest_stored_timestamp,
    prepare_feedback_frame,
    validate_frame,
)
from recloop.objectstore import LANDING, PROCESSED, QUARANTINE, ObjectStore
from recloop.paths import confine
from recloop.store import (
    FeedbackStore,
    atomic_write_json,
    atomic_write_parquet,
    file_sha256,
    fsync_dir,
    move_file,
)

log = logging.getLogger(__name__)

STATUS_BY_DECISION = {"pass": "ingested", "split": "partial", "quarantine": "quarantined"}
SIDECAR_SUFFIX = ".validation.json"
REJECTED_SUFFIX = ".rejected.parquet"

# Test seam: called right after the store append, before anything is moved (crash injection).
_AFTER_APPEND = None


@dataclass
class IngestOutcome:
    """What happened to one landing file; JSON-serialisable through :meth:`to_dict`."""

    batch_id: str
    source: str  # the file's name as it landed
    status: str  # ingested | partial | quarantined | skipped
    n_rows: int = 0
    n_good: int = 0  # rows that passed validation and were handed to the store
    n_new: int = 0  # rows the store did not have yet
    n_duplicate: int = 0  # valid rows the store already had (re-run after a crash)
    n_quarantined: int = 0
    reasons: list[str] = field(default_factory=list)
    reason_counts: dict[str, int] = field(default_factory=dict)
    validation_path: str | None = None
    data_docs: str | None = None
    destination: str | None = None
    quarantined_rows_path: str | None = None
    released_from: str | None = None
    resumed: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IngestOutcome:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# ---- small helpers -------------------------------------------------------------------------------------
def _state_dir(settings) -> Path:
    d = settings.state_dir / "ingest"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _load_state(settings, sha: str, objstore: ObjectStore | None = None) -> dict | None:
    """The verdict state of content ``sha``: the local file, else (object storage) the bucket's mirror."""
    p = _state_dir(settings) / f"{sha}.json"
    if not p.exists() and objstore is not None and objstore.exists(_state_key(sha)):
        try:
            return json.loads(objstore.get_bytes(_state_key(sha)).decode("utf-8"))
        except json.JSONDecodeError:
            return None
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:  # written atomically, so this is not a torn write: ignore it
        return None


def _save_state(settings, sha: str, doc: dict, objstore: ObjectStore | None = None) -> None:
    atomic_write_json(doc, _state_dir(settings) / f"{sha}.json")
    if objstore is not None:  # a PUT is atomic: readers see the old document or the new one
        objstore.put_bytes(_state_key(sha), json.dumps(doc, indent=2, default=str).encode())


def _state_key(sha: str) -> str:
    return f"state/ingest/{sha}.json"


def sidecar_path(data_path: Path) -> Path:
    return data_path.with_name(data_path.name + SIDECAR_SUFFIX)


def _free_name(dest: Path, sha: str, *, reuse_same: bool = False) -> Path:
    """``dest``, or ``<stem>.<sha8><suffix>`` when another file already has that name.

    ``reuse_same``: a file there with the same bytes is this batch's own copy from an interrupted
    cross-filesystem move (or the same delivery again): reuse the name.
    """
    if not dest.exists() or (reuse_same and dest.is_file() and file_sha256(dest) == sha):
        return dest
    return dest.with_name(f"{dest.stem}.{sha[:8]}{dest.suffix}")


def pending_batches(settings) -> list[Path]:
    """Files waiting in ``landing/`` (hidden temp files of atomic writes excluded), oldest name first.

    A symlink that points outside ``landing/`` is left where it is, with a warning: following it
    would read (and quarantine) a file from anywhere on the machine.
    """
    d = settings.landing_dir
    if not d.exists():
        return []
    out = []
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        try:
            confine(p, d)
        except ValueError as exc:
            log.warning("skipping landing entry %s: %s", p.name, exc)
            continue
        out.append(p)
    return out


def confine_to_landing(path: str | Path, settings) -> Path:
    """``path`` resolved inside ``landing/`` (relative paths are relative to it); ``ValueError`` if not."""
    return confine(path, settings.landing_dir)


def copy_into_landing(source: str | Path, settings) -> Path:
    """Copy a file from anywhere into ``landing/`` (temp file + fsync + rename); the source is untouched.

    The explicit way in for a file outside the workspace (``recloop ingest --copy-from``). The copy
    keeps the source's name, or ``<stem>.<sha8><suffix>`` when that name is taken by other bytes.
    """
    src = Path(source).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"no such file to copy: {source}")
    landing = settings.landing_dir
    landing.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=landing, prefix=f".{src.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
            for chunk in iter(lambda: inp.read(1 << 20), b""):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        dest = _free_name(landing / src.name, file_sha256(Path(tmp)), reuse_same=True)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(landing)
    return dest


def _find_previous(settings, name: str) -> dict | None:
    for folder in (settings.processed_dir, settings.quarantine_dir, settings.processed_dir / "duplicates"):
        p = folder / (name + SIDECAR_SUFFIX)
        if p.exists():
            return json.loads(p.read_text(encoding="utf-8"))
    return None


# ---- the ingest ------------------------------------------------------------------------------------------
def ingest_batch(path: str | Path, settings, *, now=None, force: bool = False,
                 released_from: str | None = None) -> IngestOutcome:
    """Validate one landing file and store its valid rows; see the module docstring for the steps.

    ``path`` must resolve inside ``landing/`` (``ValueError`` otherwise; a relative path is
    relative to ``landing/``); with ``released_from`` (``quarantine release``) inside
    ``quarantine/``. ``force`` re-validates content that was already handled.
    """
    settings.ensure_dirs()
    path = confine(path, settings.quarantine_dir if released_from else settings.landing_dir)
    with FileLock(str(_state_dir(settings) / ".lock")):
        return _ingest_locked(path, settings, now=now, force=force, released_from=released_from)


def _newest_stored(store) -> pd.Timestamp | None:
    """The store's newest event time: the files store reads its newest day; Iceberg has it in the manifests."""
    if isinstance(store, FeedbackStore):
        return newest_stored_timestamp(store)
    return store.time_range()[1]


def _ingest_locked(path: Path, settings, *, now, force: bool, released_from: str | None,
                   objstore: ObjectStore | None = None) -> IngestOutcome:
    t0 = time.perf_counter()
    if not path.exists():
        prev = _find_previous(settings, path.name)
        if prev is not None:  # already moved on by an earlier run: nothing to do
            o = IngestOutcome.from_dict(prev["outcome"])
            return IngestOutcome(batch_id=o.batch_id, source=path.name, status="skipped", n_rows=o.n_rows,
                                 reasons=[f"already handled: {o.status} -> {o.destination}"],
                                 validation_path=o.validation_path, destination=o.destination)
        raise FileNotFoundError(f"no such landing file: {path}")

    sha = file_sha256(path)
    stem = path.name[: -len(REJECTED_SUFFIX)] if path.name.endswith(REJECTED_SUFFIX) else path.stem
    batch_id = f"{stem}-{sha[:12]}"
    state = _load_state(settings, sha, objstore)
    if state and state.get("stage") == "done" and not force:
        return _skip_duplicate(path, settings, sha, batch_id, state, t0)

    store = FeedbackStore.from_settings(settings)
    resumed = bool(state and state.get("stage") == "validated" and not force)
    v: pd.DataFrame | None = None
    if resumed:  # crashed after the verdict was recorded: finish the job with the same verdict
        validation = ValidationOutcome.from_dict(state["validation"])
        if validation.decision in ("pass", "split"):
            v = prepare_feedback_frame(_read(path), set(), [])
            bad_idx = np.asarray(state.get("bad_rows", []), dtype=np.int64)
            row_reasons = pd.Series("", index=range(len(v)), dtype=object)
            row_reasons.iloc[bad_idx] = state.get("bad_reasons", [])
            validation.row_reasons = row_reasons
    else:
        try:
            df = _read(path)
        except BatchReadError as exc:
            validation = ValidationOutcome(success=False, decision="quarantine", n_rows=0, n_good=0, n_bad=0,
                                           bad_share=1.0, reasons=[f"read: {exc.reason}"],
                                           reason_counts={"read": 1})
        else:
            v = prepare_feedback_frame(df, store.stored_among(df["event_id"]),
                                       store.catalog()["item_id"].astype(str).to_numpy())
            del df  # the read frame: ``v`` holds its columns now; keeping both would double the batch's memory
            validation = validate_frame(v, settings, now=now, run_name=batch_id,
                                        store_newest=_newest_stored(store))
        bad = np.flatnonzero(~validation.good_mask) if validation.decision == "split" else np.array([], int)
        _save_state(settings, sha, {
            "stage": "validated", "batch_id": batch_id, "source": path.name, "validation": validation.to_dict(),
            "bad_rows": bad.tolist(),
            "bad_reasons": validation.row_reasons.iloc[bad].tolist() if len(bad) else [],
        }, objstore)

    out = IngestOutcome(batch_id=batch_id, source=path.name, status=STATUS_BY_DECISION[validation.decision],
                        n_rows=validation.n_rows, n_good=validation.n_good, n_quarantined=validation.n_bad,
                        reasons=list(validation.reasons), reason_counts=dict(validation.reason_counts),
                        data_docs=validation.data_docs, released_from=released_from, resumed=resumed)
    if validation.decision in ("pass", "split") and v is not None:
        mask = validation.good_mask
        res = store.append(clean_rows(v, mask), batch_id=batch_id)
        out.n_new, out.n_duplicate = res.n_new, res.n_duplicate
        if _AFTER_APPEND is not None:
            _AFTER_APPEND()
        if validation.decision == "split":
            out.quarantined_rows_path = str(_write_rejected(v, ~mask, validation, settings, stem, batch_id, out))

    dest_dir = settings.quarantine_dir if validation.decision == "quarantine" else settings.processed_dir
    dest = (path if path.parent.resolve() == dest_dir.resolve()
            else _free_name(dest_dir / path.name, sha, reuse_same=True))
    out.destination = str(dest)
    out.validation_path = str(sidecar_path(dest))
    out.seconds = round(time.perf_counter() - t0, 3)
    atomic_write_json({"outcome": out.to_dict(), "validation": validation.to_dict(),
                       "bad_row_sample": _bad_sample(v, validation)}, sidecar_path(dest))
    if dest != path:
        move_file(path, dest)  # os.replace, or copy + fsync + rename across filesystems
        old_sidecar = sidecar_path(path)
        if old_sidecar.exists():  # a released file leaves its old verdict behind
            old_sidecar.unlink()
    _save_state(settings, sha, {"stage": "done", "batch_id": batch_id, "source": path.name,
                                "status": out.status, "destination": str(dest)}, objstore)
    return out


def _read(path: Path) -> pd.DataFrame:
    df = read_batch(path)
    if path.name.endswith(REJECTED_SUFFIX):  # a released rows file: its reason column is ours, not data
        df = df.drop(columns=["_reason"], errors="ignore")
    return df


def _bad_sample(v: pd.DataFrame | None, validation: ValidationOutcome, k: int = 20) -> list[dict]:
    if v is None or validation.row_reasons is None:
        return []
    bad = np.flatnonzero((validation.row_reasons != "").to_numpy())[:k]
    cols = [c for c in ("event_id", "user_id", "item_id", "event_type", "label", "timestamp") if c in v.columns]
    rows = v.iloc[bad][cols].astype(object).where(v.iloc[bad][cols].notna(), None)
    return [{"row": int(i), **{c: (None if r[c] is None else str(r[c])) for c in cols},
             "reason": validation.row_reasons.iat[i]} for i, (_, r) in zip(bad, rows.iterrows())]


def _rows_of(path: Path, batch_id: str) -> bool:
    """Whether ``path`` holds the rows split off ``batch_id`` (its sidecar says so)."""
    try:
        doc = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return doc.get("parent_batch_id") == batch_id


def _write_rejected(v, bad_mask, validation, settings, stem, batch_id, out) -> Path:
    from recloop.schema import FEEDBACK_COLUMNS

    rows = v.loc[bad_mask, [c for c in FEEDBACK_COLUMNS if c in v.columns]].copy()
    rows["_reason"] = validation.row_reasons[bad_mask].to_numpy()
    for c in rows.columns:  # mixed object columns must survive Parquet: keep them as text
        if rows[c].dtype == object:
            rows[c] = rows[c].astype("string")
    path = settings.quarantine_dir / f"{stem}{REJECTED_SUFFIX}"
    if path.exists() and not _rows_of(path, batch_id):  # this batch's own, from a run that crashed: rewrite it
        path = path.with_name(f"{stem}.{batch_id[-12:]}{REJECTED_SUFFIX}")
    atomic_write_parquet(rows, path)
    rows_outcome = IngestOutcome(batch_id=f"{batch_id}-rejected", source=out.source, status="quarantined",
                                 n_rows=len(rows), n_quarantined=len(rows), reasons=list(validation.reasons),
                                 reason_counts=dict(validation.reason_counts), destination=str(path),
                                 validation_path=str(sidecar_path(path)), data_docs=validation.data_docs)
    atomic_write_json({"outcome": rows_outcome.to_dict(), "validation": validation.to_dict(), "kind": "rows",
                       "parent_batch_id": batch_id}, sidecar_path(path))
    return path


def _skip_duplicate(path: Path, settings, sha: str, batch_id: str, state: dict, t0: float) -> IngestOutcome:
    dup_dir = settings.processed_dir / "duplicates"
    dup_dir.mkdir(parents=True, exist_ok=True)
    dest = _free_name(dup_dir / path.name, sha)
    out = IngestOutcome(batch_id=batch_id, source=path.name, status="skipped",
                        reasons=[(f"identical content already handled as {state.get('batch_id')} "
                                  f"({state.get('status')}, {state.get('destination')}); nothing stored")],
                        destination=str(dest), validation_path=str(sidecar_path(dest)),
                        seconds=round(time.perf_counter() - t0, 3))
    atomic_write_json({"outcome": out.to_dict()}, sidecar_path(dest))
    move_file(path, dest)
    return out


def ingest_all(settings, *, now=None) -> list[IngestOutcome]:
    """Ingest every pending landing file, in name order (daily batches land with sortable names); with
    object storage configured, then every object under the ``landing/`` prefix (:func:`ingest_object`)."""
    outs = [ingest_batch(p, settings, now=now) for p in pending_batches(settings)]
    objstore = ObjectStore.from_settings(settings)
    if objstore is not None:
        outs += [ingest_object(k, settings, now=now, objstore=objstore) for k in pending_objects(settings, objstore)]
    return outs


# ---- landing on object storage -------------------------------------------------------------------------
CLAIM_TIMEOUT_S = 2.0  # another worker holding a landing object's claim longer than this: leave it to them


def pending_objects(settings, objstore: ObjectStore | None = None) -> list[str]:
    """Keys directly under ``landing/`` (hidden names and deeper "folders" skipped), oldest name first;
    [] without object storage."""
    objstore = objstore if objstore is not None else ObjectStore.from_settings(settings)
    if objstore is None:
        return []
    out = []
    for key in objstore.list(LANDING):
        name = key[len(LANDING):]
        if name and "/" not in name and not name.startswith("."):
            out.append(key)
    return out


@contextlib.contextmanager
def _claim(settings, key: str):
    """One worker at a time per landing object: a PostgreSQL advisory lock across machines when
    ``services.database_url`` is set (:mod:`recloop.pgstate`), else a lock file on this machine."""
    from recloop import pgstate

    if pgstate.enabled(settings):
        with pgstate.advisory_lock(settings, f"recloop.ingest:{key}", timeout=CLAIM_TIMEOUT_S):
            yield
        return
    with FileLock(str(_state_dir(settings) / ".objects.lock"), timeout=-1):
        yield


def ingest_object(key: str, settings, *, now=None, objstore: ObjectStore | None = None) -> IngestOutcome:
    """Ingest one ``landing/<name>`` object (module docstring, "Object storage"); safe to repeat and to run
    on several machines at once: the object is claimed, and one that is gone was handled elsewhere."""
    objstore = objstore if objstore is not None else ObjectStore.from_settings(settings)
    if objstore is None:
        raise ValueError("ingest_object needs object storage: services.s3_bucket is not set")
    name = key[len(LANDING):] if key.startswith(LANDING) else ""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"{key!r} is not an object directly under {LANDING!r}")
    settings.ensure_dirs()
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_claim(settings, key))
        except TimeoutError:
            return IngestOutcome(batch_id="", source=name, status="skipped",
                                 reasons=[f"{objstore.url(key)} is being ingested by another worker"])
        if not objstore.exists(key):
            return IngestOutcome(batch_id="", source=name, status="skipped",
                                 reasons=[f"{objstore.url(key)} is gone: handled by another run"])
        local = _state_dir(settings) / "objects" / name
        objstore.get_file(key, local)
        sha = file_sha256(local)
        with FileLock(str(_state_dir(settings) / ".lock")):
            prior = _load_state(settings, sha, objstore)
            out = _ingest_locked(local, settings, now=now, force=False, released_from=None, objstore=objstore)
        _publish(objstore, key, name, out, settings, prior)
        return out


def _free_key(objstore: ObjectStore, key: str, batch_id: str) -> str:
    """``key``, or ``<stem>.<content hash><suffix>`` when another batch's object already has that name
    (names are not unique across machines and days; an object is never overwritten)."""
    if not objstore.exists(key):
        return key
    p = PurePosixPath(key)
    suffix = "".join(p.suffixes[-2:]) if p.name.endswith(REJECTED_SUFFIX) else p.suffix
    return str(p.with_name(f"{p.name[: len(p.name) - len(suffix)]}.{batch_id[-12:]}{suffix}"))


def _publish(objstore: ObjectStore, key: str, name: str, out: IngestOutcome, settings, prior: dict | None) -> None:
    """Sidecars and split-off rows up first, then the landing object moves; quarantine gets registered."""
    dest = Path(out.destination)
    if out.status == "skipped":
        # a state that says "done" for this very object whose destination object is missing: the run that
        # wrote it crashed before the move. Finish that move; any other repeat is a duplicate delivery.
        folder = QUARANTINE if (prior or {}).get("status") == "quarantined" else PROCESSED
        first = f"{folder}{name}"
        dst_key = first if (prior or {}).get("source") == name and not objstore.exists(first) \
            else f"{PROCESSED}duplicates/{dest.name}"
    else:
        folder = QUARANTINE if dest.parent.resolve() == settings.quarantine_dir.resolve() else PROCESSED
        dst_key = _free_key(objstore, f"{folder}{name}", out.batch_id)
    local_sidecar = sidecar_path(dest)
    out.destination, out.validation_path = objstore.url(dst_key), objstore.url(dst_key + SIDECAR_SUFFIX)
    rows_key = None
    if out.quarantined_rows_path:
        rows = Path(out.quarantined_rows_path)
        rows_key = _free_key(objstore, f"{QUARANTINE}{rows.name}", out.batch_id)
        objstore.put_file(rows_key + SIDECAR_SUFFIX, sidecar_path(rows))
        objstore.put_file(rows_key, rows)
        out.quarantined_rows_path = objstore.url(rows_key)
    if local_sidecar.exists():
        doc = json.loads(local_sidecar.read_text(encoding="utf-8"))
        doc["outcome"] = out.to_dict()
        objstore.put_bytes(dst_key + SIDECAR_SUFFIX, json.dumps(doc, indent=2, default=str).encode())
    objstore.move(key, dst_key)
    register = getattr(importlib.import_module("data_checks.quarantine"), "register_entry", None)
    if register is not None:
        fields = {f: getattr(out, f) for f in ("n_rows", "reasons", "reason_counts", "data_docs")}
        if dst_key.startswith(QUARANTINE):  # a quarantined batch (or the finished move of one)
            register(settings, {"id": out.batch_id, "kind": "batch", "key": dst_key, **fields})
        if rows_key is not None:
            register(settings, {"id": f"{out.batch_id}-rejected", "kind": "rows", "key": rows_key,
                                **fields, "n_rows": out.n_quarantined})
    if folder == PROCESSED and dest.exists():  # the bucket holds it now; quarantined copies stay for `release`
        dest.unlink()
