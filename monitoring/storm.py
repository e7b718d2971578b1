"""Storm control: a retrain when the world changed, never a storm of them.

State lives in ``<state_dir>/monitor_state.json`` (atomic writes under a file lock):

* ``pending``: a retrain requested by the monitor (``status=requested``) or running
  (``status=running``, set by the retrain flow). One at a time: while one is pending, new
  triggers are suppressed (``retrain_pending``). A pending entry older than
  ``monitor.pending_timeout_minutes`` is presumed dead and ignored (noted in the outcome).
* ``last_retrain_*``: when the last retrain started / finished and how many events the store
  held when it started. After it, ``monitor.cooldown_minutes`` must pass (``cooldown``) and
  ``monitor.min_new_events`` new events must arrive (``not_enough_new_data``).

Every suppression is appended to ``<state_dir>/monitor_suppressions.jsonl`` with its reasons.
The retrain flow calls :func:`mark_retrain_started` and :func:`mark_retrain_finished`.

With ``services.database_url`` set (:mod:`recloop.pgstate`), the state is a row of
``recloop_storm_state`` (one per ``model_name``), changed in a transaction under
``SELECT ... FOR UPDATE``, and suppressions are rows of ``recloop_storm_suppressions``: monitors
and retrains on different machines share it without a shared disk.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock

from recloop import pgstate
from recloop.store import atomic_write_json

STATE_FILE = "monitor_state.json"
SUPPRESSION_LOG = "monitor_suppressions.jsonl"

COOLDOWN = "cooldown"
NOT_ENOUGH_NEW_DATA = "not_enough_new_data"
RETRAIN_PENDING = "retrain_pending"


def _now(now=None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    import pandas as pd

    t = pd.Timestamp(now)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return t.to_pydatetime()


def _parse(ts: str | None) -> datetime | None:
    return None if not ts else datetime.fromisoformat(ts)


@dataclass
class StormState:
    pending: dict | None = None  # {"status": requested|running, "since": iso, "reason": str}
    last_retrain_started_at: str | None = None
    last_retrain_finished_at: str | None = None
    last_retrain_succeeded: bool | None = None
    last_retrain_reason: str | None = None
    events_at_last_retrain: int | None = None
    history: list[dict] = field(default_factory=list)  # the last few transitions, newest last

    def to_dict(self) -> dict:
        return asdict(self)


def _paths(settings) -> tuple[Path, Path, FileLock]:
    d = Path(settings.state_dir)
    d.mkdir(parents=True, exist_ok=True)
    return d / STATE_FILE, d / SUPPRESSION_LOG, FileLock(str(d / (STATE_FILE + ".lock")))


def _from_doc(doc: dict) -> StormState:
    known = set(StormState.__dataclass_fields__)
    return StormState(**{k: v for k, v in doc.items() if k in known})


def load_state(settings) -> StormState:
    if pgstate.enabled(settings):
        return _pg_load(settings)
    path, _, _ = _paths(settings)
    if not path.exists():
        return StormState()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"monitor state {path} is not valid JSON ({exc}); fix or delete it") from exc
    return _from_doc(doc)


def _update(settings, change) -> StormState:
    if pgstate.enabled(settings):
        return _pg_update(settings, change)
    path, _, lock = _paths(settings)
    with lock:
        state = load_state(settings)
        change(state)
        state.history = state.history[-20:]
        atomic_write_json(state.to_dict(), path)
        return state


# ---- PostgreSQL (services.database_url): one row per model name --------------------------------------
def _pg_load(settings) -> StormState:
    with pgstate.connect(settings) as conn:
        row = conn.execute("SELECT state FROM recloop_storm_state WHERE scope = %s",
                           (settings.model_name,)).fetchone()
    return StormState() if row is None else _from_doc(row[0])


def _pg_update(settings, change) -> StormState:
    """Read-modify-write in one transaction: the row lock makes concurrent updates queue, none is lost."""
    scope = settings.model_name
    with pgstate.connect(settings) as conn:
        conn.execute("INSERT INTO recloop_storm_state (scope, state) VALUES (%s, %s) ON CONFLICT (scope) DO NOTHING",
                     (scope, pgstate.jsonb(StormState().to_dict())))
        doc = conn.execute("SELECT state FROM recloop_storm_state WHERE scope = %s FOR UPDATE", (scope,)).fetchone()[0]
        state = _from_doc(doc)
        change(state)
        state.history = state.history[-20:]
        conn.execute("UPDATE recloop_storm_state SET state = %s, updated_at = now() WHERE scope = %s",
                     (pgstate.jsonb(state.to_dict()), scope))
    return state


def _store_count(settings) -> int:
    from recloop.store import FeedbackStore

    return FeedbackStore.from_settings(settings).count()


def mark_retrain_requested(settings, reason: str, now=None) -> StormState:
    """The monitor decided to retrain and emitted the event: later triggers wait for this one."""
    at = _now(now).isoformat()

    def change(s: StormState):
        s.pending = {"status": "requested", "since": at, "reason": reason}
        s.history.append({"at": at, "what": "requested", "reason": reason})

    return _update(settings, change)


def mark_retrain_started(settings, reason: str = "manual", n_events: int | None = None, now=None,
                         **extra) -> StormState:
    """Called by the retrain flow when it starts: the pending request becomes a running retrain."""
    at = _now(now).isoformat()
    count = _store_count(settings) if n_events is None else int(n_events)

    def change(s: StormState):
        s.pending = {"status": "running", "since": at, "reason": reason}
        s.last_retrain_started_at = at
        s.last_retrain_reason = reason
        s.events_at_last_retrain = count
        s.history.append({"at": at, "what": "started", "reason": reason, "n_events": count})

    return _update(settings, change)


def mark_retrain_finished(settings, succeeded: bool = True, now=None, **extra) -> StormState:
    """Called by the retrain flow when it ends (success or failure): the cooldown starts now."""
    at = _now(now).isoformat()

    def change(s: StormState):
        s.pending = None
        s.last_retrain_finished_at = at
        s.last_retrain_succeeded = bool(succeeded)
        s.history.append({"at": at, "what": "finished", "succeeded": bool(succeeded),
                          **{k: v for k, v in extra.items() if isinstance(v, (str, int, float, bool))}})

    return _update(settings, change)


@dataclass
class StormCheck:
    suppressed_by: list[str]
    details: dict
    notes: list[str]


def check_storm(settings, state: StormState, n_events_total: int, n_new_fallback: int, now=None) -> StormCheck:
    """Which storm rules would suppress a retrain right now.

    New data = events stored since the last retrain started (store count then vs now); with
    no retrain on record, ``n_new_fallback`` (events after the champion's window, or all
    events when there is no champion).
    """
    cfg = settings.monitor
    t = _now(now)
    suppressed, notes = [], []
    details: dict = {}
    if state.pending:
        since = _parse(state.pending.get("since"))
        age_min = (t - since).total_seconds() / 60 if since else float("inf")
        details["pending"] = {**state.pending, "age_minutes": round(age_min, 1)}
        if age_min < cfg.pending_timeout_minutes:
            suppressed.append(RETRAIN_PENDING)
        else:
            notes.append(f"a {state.pending.get('status')} retrain from {state.pending.get('since')} is older than "
                         f"{cfg.pending_timeout_minutes} min: presumed dead, ignored")
    last = _parse(state.last_retrain_finished_at) or _parse(state.last_retrain_started_at)
    if last is not None:
        since_min = (t - last).total_seconds() / 60
        details["minutes_since_last_retrain"] = round(since_min, 1)
        if since_min < cfg.cooldown_minutes:
            suppressed.append(COOLDOWN)
    if state.events_at_last_retrain is not None:
        new = max(0, n_events_total - int(state.events_at_last_retrain))
    else:
        new = int(n_new_fallback)
    details["new_events"] = new
    if new < cfg.min_new_events:
        suppressed.append(NOT_ENOUGH_NEW_DATA)
    return StormCheck(suppressed, details, notes)


def record_suppression(settings, entry: dict) -> None:
    """Append one suppression (JSON line) to the log; fsync'd so a crash keeps it (a committed row
    with PostgreSQL)."""
    doc = {"at": datetime.now(UTC).isoformat(), **entry}
    if pgstate.enabled(settings):
        with pgstate.connect(settings) as conn:
            conn.execute("INSERT INTO recloop_storm_suppressions (scope, entry) VALUES (%s, %s)",
                         (settings.model_name, pgstate.jsonb(doc)))
        return
    _, log, lock = _paths(settings)
    line = json.dumps(doc, default=str)
    with lock, log.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def suppressions(settings) -> list[dict]:
    if pgstate.enabled(settings):
        with pgstate.connect(settings) as conn:
            rows = conn.execute("SELECT entry FROM recloop_storm_suppressions WHERE scope = %s ORDER BY id",
                                (settings.model_name,)).fetchall()
        return [r[0] for r in rows]
    _, log, _ = _paths(settings)
    if not log.exists():
        return []
    out = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # torn last line after a crash
            continue
    return out
