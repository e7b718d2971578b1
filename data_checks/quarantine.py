"""What sits in ``quarantine/`` and how it gets out again.

Two kinds of entries, each a data file with a ``<file>.validation.json`` beside it:

* ``batch``: a whole landing file (critical/batch failure, too many bad rows, unreadable);
* ``rows``: ``<stem>.rejected.parquet``, the invalid rows split off a partially
  ingested batch, with a per-row ``_reason`` column.

``release(settings, id)`` re-validates an entry after a fix (edit the file in place,
or fix the catalog, or raise a threshold in settings) through the normal ingest: on
success its valid rows are stored and the file moves to ``processed/``; otherwise it
stays in quarantine with a fresh verdict. Nothing is ever deleted.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_checks.ingest import SIDECAR_SUFFIX, IngestOutcome, ingest_batch


def list_quarantine(settings) -> list[dict]:
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
    path = Path(entry["file"])
    if not path.exists():
        raise FileNotFoundError(f"quarantined file {path} is missing")
    return ingest_batch(path, settings, now=now, force=True, released_from=entry["id"])
