"""Data contracts: feedback events, catalog items, users.

The label rule lives here and only here (``LABEL_BY_EVENT``):

=============  =====  ==============================================
event_type     label  meaning
=============  =====  ==============================================
impression     0      shown, not engaged (a shown-and-clicked item is logged as ``click``)
click          1      engaged
like           1      explicit positive
purchase       1      strongest positive
dislike        0      explicit negative
=============  =====  ==============================================

User group attributes (``gender``, ``age_bucket``, ...) are for fairness
evaluation only and are never model inputs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EventType = Literal["impression", "click", "like", "dislike", "purchase"]
EVENT_TYPES: tuple[str, ...] = ("impression", "click", "like", "dislike", "purchase")
LABEL_BY_EVENT: dict[str, int] = {"impression": 0, "click": 1, "like": 1, "dislike": 0, "purchase": 1}

FEEDBACK_COLUMNS: dict[str, str] = {
    "event_id": "string",
    "user_id": "string",
    "item_id": "string",
    "event_type": "string",
    "label": "int8",
    "timestamp": "datetime64[ns, UTC]",
    "query": "string",
    "model_version": "string",
}
FEEDBACK_REQUIRED: tuple[str, ...] = ("event_id", "user_id", "item_id", "event_type", "label", "timestamp")
FEEDBACK_OPTIONAL: tuple[str, ...] = ("query", "model_version")

CATALOG_COLUMNS: dict[str, str] = {
    "item_id": "string",
    "title": "string",
    "description": "string",
    "category": "string",
    "tags": "string",  # comma-separated
    "provider": "string",
    "created_at": "datetime64[ns, UTC]",
}
CATALOG_REQUIRED: tuple[str, ...] = ("item_id", "title", "description", "category")

USER_COLUMNS: dict[str, str] = {"user_id": "string"}  # plus any group attribute columns
GROUP_COLUMNS: tuple[str, ...] = ("gender", "age_bucket")


def label_for(event_type: str) -> int:
    try:
        return LABEL_BY_EVENT[event_type]
    except KeyError as exc:
        raise ValueError(f"unknown event_type {event_type!r}; allowed: {', '.join(EVENT_TYPES)}") from exc


class FeedbackEvent(BaseModel):
    """One feedback event; ``event_id`` is the idempotency key."""

    model_config = ConfigDict(extra="forbid")

    event_id: str = Field(min_length=1, max_length=128)
    user_id: str = Field(min_length=1, max_length=128)
    item_id: str = Field(min_length=1, max_length=128)
    event_type: EventType
    label: int | None = None  # derived from event_type when omitted
    timestamp: datetime
    query: str | None = Field(default=None, max_length=512)
    model_version: str | None = Field(default=None, max_length=64)

    @field_validator("timestamp")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("timestamp must carry a timezone (UTC)")
        try:
            return v.astimezone(UTC)
        except OverflowError as exc:  # e.g. 0001-01-01T00:00:00+05:00: out of range once converted
            raise ValueError(f"timestamp {v.isoformat()} is out of range in UTC") from exc

    @model_validator(mode="after")
    def _label_matches_type(self) -> FeedbackEvent:
        expected = LABEL_BY_EVENT[self.event_type]
        if self.label is None:
            self.label = expected
        elif self.label != expected:
            raise ValueError(f"label {self.label} contradicts event_type {self.event_type!r} (expects {expected})")
        return self


class CatalogItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(min_length=1)
    title: str = Field(min_length=1)
    description: str = ""
    category: str = Field(min_length=1)
    tags: str | None = None
    provider: str | None = None
    created_at: datetime | None = None


class User(BaseModel):
    model_config = ConfigDict(extra="allow")  # group attributes are open-ended

    user_id: str = Field(min_length=1)


def _coerce(df: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    out = df.copy()
    for col, dtype in columns.items():
        if col not in out.columns:
            out[col] = pd.Series(pd.NA, index=out.index, dtype=dtype if "datetime" not in dtype else None)
            if "datetime" in dtype:
                out[col] = pd.to_datetime(out[col], utc=True)
            continue
        if "datetime" in dtype:
            out[col] = pd.to_datetime(out[col], utc=True)
        else:
            out[col] = out[col].astype(dtype)
    return out


def normalize_feedback(df: pd.DataFrame) -> pd.DataFrame:
    """Cast a *valid* feedback frame to the canonical dtypes and column order.

    Raises on values that cannot be cast; validation (data_checks/) runs before this.
    """
    extra = [c for c in df.columns if c not in FEEDBACK_COLUMNS]
    return _coerce(df, FEEDBACK_COLUMNS)[list(FEEDBACK_COLUMNS) + extra]


def normalize_catalog(df: pd.DataFrame) -> pd.DataFrame:
    return _coerce(df, CATALOG_COLUMNS)[list(CATALOG_COLUMNS)]


def normalize_users(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for col in out.columns:
        out[col] = out[col].astype("string")
    return out


def item_text(catalog: pd.DataFrame) -> pd.Series:
    """The text a language model reads for each item: title, category, description."""
    title = catalog["title"].fillna("").astype(str)
    category = catalog["category"].fillna("").astype(str)
    desc = catalog["description"].fillna("").astype(str)
    return (title + " [" + category + "] " + desc).str.strip()
