"""What sits in ``quarantine/`` and how it gets out again.

Two kinds of entries, each a data file with a ``<file>.validation.json`` beside it:

* ``batch``: a whole landing file (critical/batch failure, too many bad rows, unreadable);
* ``rows``: ``<stem>.rejected.parquet``, the invalid rows split off a partially
  ingested batch, with a per-row ``_reason`` column.

``release(settings, id)`` re-validates an entry after a fix (edit the file in place,
or fix the catalog, or raise a threshold in settings) through the normal ingest: on
success its valid rows are stored and the file moves to ``processed/``; otherwise it
stays in quarantine with a fresh verdict. Nothing is ever deleted.

**Services backend.** With ``services.database_url`` set the *registry* of entries is the
PostgreSQL table ``recloop_quarantine`` (:mod:`recloop.pgstate`) and the data sits under the object
store's ``quarantine/`` prefix: ingest calls :func:`register_entry` after it moved a batch there, so
``list`` / ``release`` work from any machine, with no shared disk. ``release`` fetches the object
into the local ``quarantine/`` folder (``ObjectStore.get_file``), re-validates it through the same
ingest and, when it passes, moves the object to ``processed/`` and marks the row released. Entries
still in the local ``quarantine/`` folder (files) are listed beside the database's.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from data_checks.ingest import SIDECAR_SUFFIX, IngestOutcome, ingest_batch
from recloop import pgstate

_ENTRY_FIELDS = ("n_rows", "reasons", "reason_counts", "data_docs")


def entry_from_sidecar(doc: dict, key: str) -> dict:
    """The registry entry of a quarantined object ``key`` from its ``.validation.json`` document."""
    o = doc.get("outcome", {})
    return {"id": o.get("batch_id"), "kind": doc.get("kind", "batch"), "key": key,
            **{f: o.get(f) for f in _ENTRY_FIELDS}, "sidecar": doc}


def register_entry(settings, entry: dict) -> None:
    """Record a quarantined object in the PostgreSQL registry (a no-op in the embedded default,
    where the files in ``quarantine/`` are the registry).

    ``entry``: ``id`` (the batch id) and ``key`` (its object key, e.g. ``quarantine/<file>``) are
    required; ``kind`` (batch | rows), ``n_rows``, ``reasons``, ``reason_counts``, ``data_docs``
    and anything else JSON-serialisable are kept. Registering an id again replaces its row (a fresh
    verdict) and makes it quarantined again.
    """
    if not pgstate.enabled(settings):
        return
    missing = [k for k in ("id", "key") if not entry.get(k)]
    if missing:
        raise ValueError(f"a quarantine registry entry needs {' and '.join(missing)}; got keys {sorted(entry)}")
    with pgstate.connect(settings) as conn:
        conn.execute(
            "INSERT INTO recloop_quarantine (entry_id, kind, object_key, status, doc) "
            "VALUES (%s, %s, %s, 'quarantined', %s) ON CONFLICT (entry_id) DO UPDATE SET kind = EXCLUDED.kind, "
            "object_key = EXCLUDED.object_key, status = 'quarantined', doc = EXCLUDED.doc, "
            "registered_at = now(), released_at = NULL",
            (str(entry["id"]), str(entry.get("kind") or "batch"), str(entry["key"]), pgstate.jsonb(entry)))


def _mark(settings, entry_id: str, status: str, outcome: dict) -> None:
    with pgstate.connect(settings) as conn:
        conn.execute("UPDATE recloop_quarantine SET status = %s, released_at = now(), "
                     "doc = doc || jsonb_build_object('release_outcome', %s::jsonb) WHERE entry_id = %s",
                     (status, pgstate.jsonb(outcome), entry_id))


def _registered(settings) -> tuple[list[dict], set[str]]:
    """The registry's quarantined entries, and every id it knows (released ones included)."""
    with pgstate.connect(settings) as conn:
        rows = conn.execute("SELECT entry_id, kind, object_key, status, doc FROM recloop_quarantine "
                            "ORDER BY object_key, entry_id").fetchall()
    entries = [{"id": entry_id, "kind": kind, "file": key, "key": key, "exists": True,
                **{f: doc.get(f) for f in _ENTRY_FIELDS},
                "reasons": doc.get("reasons") or [], "reason_counts": doc.get("reason_counts") or {}}
               for entry_id, kind, key, status, doc in rows if status == "quarantined"]
    return entries, {r[0] for r in rows}


def list_quarantine(settings) -> list[dict]:
    """Every quarantined entry: the database's registry (services backend), then local files.

    The registry decides for the ids it knows: a local copy of an entry released on another machine
    is not listed again."""
    if not pgstate.enabled(settings):
        return _local_entries(settings)
    entries, known = _registered(settings)
    return entries + [e for e in _local_entries(settings) if e["id"] not in known]


def _local_entries(settings) -> list[dict]:
    d = settings.quarantine_dir
    if not d.exists():
        return []
    entries = []
    for sidecar in sorted(d.glob("*" + SIDECAR_SUFFIX)):
        data_path = sidecar.with_name(sidecar.name[: -len(SIDECAR_SUFFIX)])
        try:
            doc = json.loads(sidecar.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        o = doc.get("outcome", {})
        entries.append({
            "id": o.get("batch_id"),
            "kind": doc.get("kind", "batch"),
            "file": str(data_path),
            "exists": data_path.exists(),
            "n_rows": o.get("n_rows"),
            "reasons": o.get("reasons", []),
            "reason_counts": o.get("reason_counts", {}),
            "data_docs": o.get("data_docs"),
        })
    return entries


def find_entry(settings, entry_id: str) -> dict:
    """The entry with this id, or the one entry whose id starts with it; an empty id matches nothing."""
    if entry_id is None or not str(entry_id).strip():
        raise ValueError("an empty id matches nothing; give an id (or a prefix of one) from "
                         "`recloop quarantine list`")
    entries = list_quarantine(settings)
    exact = [e for e in entries if e["id"] == entry_id]
    matches = exact or [e for e in entries if e["id"] and e["id"].startswith(entry_id)]
    if not matches:
        raise KeyError(f"no quarantined batch with id {entry_id!r}; see `recloop quarantine list`")
    if len(matches) > 1:
        raise KeyError(f"id {entry_id!r} is ambiguous: {', '.join(e['id'] for e in matches)}")
    return matches[0]


def release(settings, entry_id: str, *, now=None) -> IngestOutcome:
    """Re-validate a quarantined entry (after a fix) and ingest it if it now passes."""
    entry = find_entry(settings, entry_id)
    if entry.get("key"):
        return _release_object(settings, entry, now=now)
    path = Path(entry["file"])
    if not path.exists():
        raise FileNotFoundError(f"quarantined file {path} is missing")
    return ingest_batch(path, settings, now=now, force=True, released_from=entry["id"])


def _release_object(settings, entry: dict, *, now=None) -> IngestOutcome:
    """Release a registry entry whose data is in the object store (services backend)."""
    from data_checks.ingest import sidecar_path

    try:
        from recloop.objectstore import ObjectStore
    except ImportError as exc:
        raise RuntimeError(f"quarantine entry {entry['id']} is the object {entry['key']}, but recloop.objectstore "
                           f"cannot be imported ({exc})") from exc
    store = ObjectStore.from_settings(settings)
    if store is None:
        raise RuntimeError(f"quarantine entry {entry['id']} is the object {entry['key']}, but services.s3_bucket "
                           "is not set: no object store to fetch it from")
    key = entry["key"]
    name = PurePosixPath(key).name
    settings.quarantine_dir.mkdir(parents=True, exist_ok=True)
    local = settings.quarantine_dir / name
    if not store.exists(key):
        raise FileNotFoundError(f"quarantined object {key} is missing from the object store")
    store.get_file(key, local)  # the object is the truth: an older local copy is replaced
    stale = sidecar_path(local)
    if stale.exists():  # a verdict from an earlier local attempt: the new one replaces it
        stale.unlink()
    out = ingest_batch(local, settings, now=now, force=True, released_from=entry["id"])
    verdict = sidecar_path(Path(out.destination)) if out.destination else None
    if out.status == "quarantined":
        if verdict is not None and verdict.exists():  # the fresh verdict beside the object
            store.put_file(key + SIDECAR_SUFFIX, verdict)
        if out.batch_id != entry["id"]:  # the object was replaced by a fixed one that still fails
            _mark(settings, entry["id"], "superseded", out.to_dict())
        register_entry(settings, {"id": out.batch_id, "kind": entry.get("kind") or "batch", "key": key,
                                  **{f: getattr(out, f) for f in _ENTRY_FIELDS}})
        return out
    # its rows are stored: released now (a crash below leaves a stray object in quarantine/, never a
    # registry entry that points at an object already moved)
    target = _processed_key(store, name, out.batch_id)
    _mark(settings, entry["id"], "released", {**out.to_dict(), "object": target})
    if verdict is not None and verdict.exists():
        store.put_file(target + SIDECAR_SUFFIX, verdict)
    if store.exists(key):
        store.move(key, target)  # nothing is ever deleted: the released object joins processed/
    if store.exists(key + SIDECAR_SUFFIX):
        store.delete(key + SIDECAR_SUFFIX)  # the old verdict: the new one is beside the processed object
    return out


def _processed_key(store, name: str, batch_id: str) -> str:
    """``processed/<name>``, or ``processed/<stem>.<hash><suffix>`` when another batch has that name."""
    key = f"processed/{name}"
    if not store.exists(key):
        return key
    p = PurePosixPath(name)
    return f"processed/{p.stem}.{batch_id[-12:]}{p.suffix}"
