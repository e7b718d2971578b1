"""Plain JSON values out of results: the one cleaner behind validation outcomes, evaluations and gate
decisions (``ValidationOutcome.to_dict``, ``Evaluation.to_dict``, ``GateDecision.to_dict``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import date
from typing import Any

import numpy as np


def jsonable(obj: Any) -> Any:
    """``obj`` with plain JSON values only, so ``json.dumps`` writes standard JSON.

    Mappings get string keys; lists and tuples become lists (recursively); numpy scalars become Python
    ones; NaN and ±infinity become ``None`` (JSON has no such numbers: a metric that could not be
    measured reads as null); dates and timestamps become ISO strings; anything else becomes its ``str``.
    """
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, date):  # datetime and pandas.Timestamp too
        return obj.isoformat()
    return str(obj)
