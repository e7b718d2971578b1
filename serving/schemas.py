"""What the API accepts and answers, and the OpenAPI document that says so.

* Ids that reach files (``event_id``, ``user_id``, ``impression_id``) are restricted to word
  characters and ``. : @ -`` (:data:`ID_PATTERN`, at most 128 characters): no control
  characters, no newlines, no path separators.
* Timestamps must lie inside what the store can hold (pandas' nanosecond range, 1677–2262):
  outside it is a 422, never a 500.
* ``POST /feedback`` parses its body by hand (pydantic's Rust JSON parser is depth-limited), so its
  request body is declared here; :func:`feedback_openapi` puts the models under
  ``components/schemas`` (FastAPI's own ``$defs`` would not resolve inside the OpenAPI document)
  and documents every answer it can give.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from recloop.schema import FeedbackEvent

ID_PATTERN = r"^[\w.:@\-]+$"
ID_MAX = 128
_ID_RE = re.compile(rf"[\w.:@\-]{{1,{ID_MAX}}}")

# pandas' datetime64[ns] range is 1677-09-21 .. 2262-04-11; a day inside it on both ends
TIMESTAMP_MIN = datetime(1677, 9, 22, tzinfo=UTC)
TIMESTAMP_MAX = datetime(2262, 4, 10, tzinfo=UTC)


def is_valid_id(value: object) -> bool:
    """The Python twin of :data:`ID_PATTERN` (``re.fullmatch``: a trailing newline does not pass)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


class FeedbackIn(FeedbackEvent):
    """A feedback event as posted: the contract's event plus the impression it answers (optional)."""

    event_id: str = Field(min_length=1, max_length=ID_MAX, pattern=ID_PATTERN)
    user_id: str = Field(min_length=1, max_length=ID_MAX, pattern=ID_PATTERN)
    impression_id: str | None = Field(default=None, min_length=1, max_length=64, pattern=ID_PATTERN)

    @field_validator("timestamp", mode="wrap")
    @classmethod
    def _storable(cls, v, handler) -> datetime:
        # wraps the parsing and the parent's UTC conversion, which overflows near year 1 / 9999
        try:
            v = handler(v)
        except OverflowError:
            v = None
        if v is None or not (TIMESTAMP_MIN <= v <= TIMESTAMP_MAX):
            raise ValueError(f"timestamp out of range: must lie between {TIMESTAMP_MIN.date()} and "
                             f"{TIMESTAMP_MAX.date()}")
        return v


class FeedbackBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[FeedbackIn] = Field(min_length=1)


class FeedbackAccepted(BaseModel):
    accepted: int = Field(description="events written (durable: on disk before this answer)")
    duplicates: int = Field(description="events whose event_id was accepted before (not written again)")
    batch_file: str | None = Field(description="the landing/ file these events land in (null: nothing new)")


class HealthOut(BaseModel):
    status: str = Field(description="ready | degraded (a fallback version serves) | no_model")
    model_version: str | None
    items_indexed: int
    events_cached: int = Field(description="recent events kept per user (the view is bounded)")
    events_counted: int = Field(description="every stored event the statistics count")
    degraded_reason: str | None = Field(description="why the champion is not the version served")
    last_error: str | None


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorOut(BaseModel):
    detail: str | list[ErrorItem]


def _schemas(*models: type[BaseModel]) -> dict[str, dict]:
    """JSON schemas of ``models`` (and the models they use) keyed by name, refs into components."""
    out: dict[str, dict] = {}
    for m in models:
        doc = m.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(doc.pop("$defs", {}))
        out[m.__name__] = doc
    return out


def _error(description: str) -> dict:
    return {"description": description, "model": ErrorOut}


FEEDBACK_RESPONSES: dict[int | str, dict] = {
    202: {"description": "accepted (written to disk)", "model": FeedbackAccepted},
    400: _error("Host header not allowed, or an invalid Content-Length"),
    401: _error("missing or wrong bearer token (when the server has one)"),
    413: _error("request body over max_body_bytes"),
    415: _error("body is not application/json"),
    422: _error("invalid event(s): validation errors, unknown items, future or out-of-range timestamps, "
                "too many events, malformed or too deeply nested JSON"),
    429: _error("rate limit (per user, per client or global) exceeded; see Retry-After"),
    431: _error("request headers over max_header_bytes"),
}

COMMON_RESPONSES: dict[int | str, dict] = {
    400: _error("Host header not allowed"),
    422: _error("invalid query parameters"),
    431: _error("request headers over max_header_bytes"),
}

MODEL_RESPONSES: dict[int | str, dict] = {**COMMON_RESPONSES, 503: _error("no model loaded yet (Retry-After)")}

HEALTH_RESPONSES: dict[int | str, dict] = {
    200: {"description": "a model is served (status ready, or degraded: a fallback version)", "model": HealthOut},
    503: {"description": "no model loaded (status no_model; degraded_reason says why)", "model": HealthOut},
    431: COMMON_RESPONSES[431],
}

FEEDBACK_REQUEST_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
    {"$ref": "#/components/schemas/FeedbackIn"},
    {"$ref": "#/components/schemas/FeedbackBatchIn"},
    {"type": "array", "items": {"$ref": "#/components/schemas/FeedbackIn"}, "minItems": 1},
]}}}}}


def add_component_schemas(openapi: dict) -> dict:
    """Put the models of the hand-parsed request body under ``components/schemas``."""
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for name, doc in _schemas(FeedbackIn, FeedbackBatchIn).items():
        schemas.setdefault(name, doc)
    return openapi
