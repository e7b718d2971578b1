"""recloop's Prefect events: names in one place, one resource id per workspace."""

from __future__ import annotations

from typing import Any

FEEDBACK_INGESTED = "recloop.feedback.ingested"
FEEDBACK_QUARANTINED = "recloop.feedback.quarantined"
DRIFT_DETECTED = "recloop.drift.detected"
MODEL_PROMOTED = "recloop.model.promoted"
MODEL_REJECTED = "recloop.model.rejected"


def workspace_resource(settings) -> dict[str, str]:
    return {"prefect.resource.id": f"recloop.workspace.{settings.root.name}",
            "prefect.resource.name": str(settings.root)}


def emit(settings, event: str, payload: dict[str, Any]):
    """Emit a recloop event about this workspace (JSON-safe payload)."""
    import json

    from prefect.events import emit_event

    safe = json.loads(json.dumps(payload, default=str))
    return emit_event(event=event, resource=workspace_resource(settings), payload=safe)
