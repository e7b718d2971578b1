"""One JSON cleaner (``recloop.jsonutil.jsonable``) behind validation outcomes, evaluations and gate
decisions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd


def test_jsonable_gives_standard_json():
    from recloop.jsonutil import jsonable

    doc = jsonable({1: np.float32("nan"), "inf": float("inf"), "ninf": np.float64("-inf"), "i": np.int64(3),
                    "b": np.bool_(True), "t": (1, 2.5), "ts": pd.Timestamp("2026-01-05T10:00:00Z"),
                    "p": Path("/x/y"), "nested": [{"v": np.float64(0.25)}], "none": None, "s": "a"})
    text = json.dumps(doc, allow_nan=False)  # raises on NaN / infinity
    assert json.loads(text) == {"1": None, "inf": None, "ninf": None, "i": 3, "b": True, "t": [1, 2.5],
                                "ts": "2026-01-05T10:00:00+00:00", "p": "/x/y", "nested": [{"v": 0.25}],
                                "none": None, "s": "a"}
    assert type(jsonable(np.int64(3))) is int and type(jsonable(np.float32(0.5))) is float


def test_results_share_the_one_cleaner_and_write_standard_json():
    """Validation outcomes, evaluations and gate decisions all go through ``jsonable``: an unmeasurable
    metric or an infinite parameter reads as null, never as ``NaN`` / ``Infinity`` (not JSON)."""
    from data_checks import validate
    from models import bootstrap, evaluate, gates
    from recloop.jsonutil import jsonable

    assert validate.jsonable is evaluate.jsonable is gates.jsonable is bootstrap.jsonable is jsonable
    for module, name in [(evaluate, "_clean"), (validate, "_jsonable"), (bootstrap, "_json_num"),
                         (gates, "_json_num"), (gates, "_json_tree")]:
        assert not hasattr(module, name), f"{module.__name__}.{name} is a second JSON cleaner"
    ci = bootstrap.BootstrapCI(estimate=float("nan"), low=-math.inf, high=np.float64(0.1), confidence=0.95,
                               samples=np.int64(500), unit="user", n_events=10)
    assert json.loads(json.dumps(ci.to_dict(), allow_nan=False))["low"] is None
