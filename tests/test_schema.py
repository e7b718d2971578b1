from datetime import UTC, datetime

import pandas as pd
import pytest
from pydantic import ValidationError

from recloop.schema import LABEL_BY_EVENT, FeedbackEvent, label_for, normalize_feedback


def test_label_rule():
    assert LABEL_BY_EVENT == {"impression": 0, "click": 1, "like": 1, "dislike": 0, "purchase": 1}
    with pytest.raises(ValueError, match="unknown event_type"):
        label_for("share")


def test_event_label_derived_and_checked():
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    ev = FeedbackEvent(event_id="e1", user_id="u", item_id="i", event_type="like", timestamp=ts)
    assert ev.label == 1
    with pytest.raises(ValidationError, match="contradicts"):
        FeedbackEvent(event_id="e1", user_id="u", item_id="i", event_type="dislike", label=1, timestamp=ts)
    with pytest.raises(ValidationError, match="timezone"):
        FeedbackEvent(event_id="e1", user_id="u", item_id="i", event_type="click", timestamp=datetime(2026, 1, 1))
    with pytest.raises(ValidationError):
        FeedbackEvent(event_id="e1", user_id="u", item_id="i", event_type="click", timestamp=ts, extra=1)


def test_normalize_feedback_fills_optional_columns():
    df = pd.DataFrame({"event_id": ["a"], "user_id": ["u"], "item_id": ["i"], "event_type": ["click"],
                       "label": [1], "timestamp": ["2026-01-01T10:00:00Z"]})
    out = normalize_feedback(df)
    assert list(out.columns)[:8] == ["event_id", "user_id", "item_id", "event_type", "label", "timestamp",
                                     "query", "model_version"]
    assert str(out["timestamp"].dt.tz) == "UTC"
    assert out["query"].isna().all()
