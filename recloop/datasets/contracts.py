"""Turning someone else's tables into the recloop contracts (recloop/schema.py).

Every importer (MovieLens folders, RecBole atomic files, generic CSV/Parquet with a
column map) ends up here: it renames its columns to the *fields* below and calls
:func:`build_events`, :func:`build_catalog` and :func:`build_users`, which do the rest
the same way for all of them.

Fields an importer can fill (anything else is dropped, except extra user attributes):

* events: ``user_id``, ``item_id``, ``timestamp`` (required) and one of ``event_type``,
  ``rating`` (label rule: ``rating >= like_threshold`` → ``like``/1, else ``dislike``/0)
  or ``label`` (1 → ``like``, 0 → ``dislike``); optional ``event_id``, ``query``;
* items: ``item_id`` (required), ``title``, ``description``, ``category``, ``tags``
  (a list, or text separated by ``|`` or ``,``), ``year``, ``created_at``;
* users: ``user_id`` (required), ``gender``, ``age`` (bucketed) or ``age_bucket``, and
  any other attribute (kept as text; group attributes are for fairness evaluation only).

Timestamps: numbers are epoch times in ``time_unit`` (seconds by default); text is
parsed as ISO 8601, and text without a zone is taken as UTC.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from recloop.schema import EVENT_TYPES, FEEDBACK_COLUMNS, LABEL_BY_EVENT

EVENT_FIELDS = ("event_id", "user_id", "item_id", "event_type", "label", "rating", "timestamp", "query")
ITEM_FIELDS = ("item_id", "title", "description", "category", "tags", "year", "created_at")
USER_FIELDS = ("user_id", "gender", "age", "age_bucket")  # plus any other attribute
TABLE_FIELDS = {"events": EVENT_FIELDS, "items": ITEM_FIELDS, "users": USER_FIELDS}
TIME_UNITS = ("s", "ms", "us", "ns")


@dataclass
class ImportedData:
    """A dataset in the recloop contracts: what ``land_dataset`` puts into a workspace."""

    catalog: pd.DataFrame
    users: pd.DataFrame
    events: pd.DataFrame
    notes: dict = field(default_factory=dict)  # what the import dropped or assumed, for the summary


def age_bucket(age: int) -> str:
    if age < 25:
        return "18-24" if age >= 18 else "<18"
    if age < 35:
        return "25-34"
    if age < 50:
        return "35-49"
    return "50+"


_GENDER = {"m": "male", "male": "male", "man": "male", "f": "female", "female": "female", "woman": "female"}


def gender_value(raw: pd.Series) -> pd.Series:
    """``M``/``F``/``male``/``female`` (any case) → ``male``/``female``; anything else → ``other``."""
    return raw.astype("string").str.strip().str.lower().map(_GENDER).fillna("other").astype("string")


def _ids(raw: pd.Series, prefix: str = "") -> pd.Series:
    """Ids as text (``242.0`` read as a float becomes ``242``), nulls kept."""
    s = raw
    if pd.api.types.is_float_dtype(s) and s.dropna().eq(s.dropna().round()).all():
        s = s.astype("Int64")
    s = s.astype("string").str.strip()
    return (prefix + s) if prefix else s


def parse_times(raw: pd.Series, time_unit: str = "s") -> pd.Series:
    """UTC timestamps from epoch numbers (``time_unit``) or ISO 8601 text (naive text = UTC); NaT if neither."""
    if time_unit not in TIME_UNITS:
        raise ValueError(f"time unit must be one of {', '.join(TIME_UNITS)}, got {time_unit!r}")
    if isinstance(raw.dtype, pd.DatetimeTZDtype):
        return raw.dt.tz_convert("UTC")
    if pd.api.types.is_datetime64_dtype(raw.dtype):
        return raw.dt.tz_localize("UTC")
    if pd.api.types.is_numeric_dtype(raw.dtype):
        return pd.to_datetime(raw, unit=time_unit, utc=True, errors="coerce")
    text = raw.astype("string").str.strip()
    numeric = pd.to_numeric(text, errors="coerce")
    if numeric.notna().sum() == text.notna().sum():  # epoch numbers stored as text (CSV)
        return pd.to_datetime(numeric, unit=time_unit, utc=True, errors="coerce")
    return pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")


def build_events(df: pd.DataFrame, source: str, *, like_threshold: float = 4.0, time_unit: str = "s",
                 user_prefix: str = "", item_prefix: str = "", event_prefix: str | None = None) -> tuple[
                     pd.DataFrame, dict]:
    """Feedback events in the contract, time-ordered, and notes on what was dropped.

    Rows whose timestamp cannot be parsed are dropped (a batch is a period of time: such a row
    has none) and counted in the notes; every other problem is left for the ingest's checks.
    """
    missing = [f for f in ("user_id", "item_id", "timestamp") if f not in df.columns]
    if missing:
        raise ValueError(f"events need the field(s) {', '.join(missing)}; map them with --map COLUMN=FIELD "
                         f"(columns found: {', '.join(map(str, df.columns))})")
    notes: dict = {}
    ts = parse_times(df["timestamp"], time_unit)
    keep = ts.notna().to_numpy()
    if not keep.all():
        notes["dropped_unparseable_timestamp"] = int((~keep).sum())
    df, ts = df.loc[keep].reset_index(drop=True), ts.loc[keep].reset_index(drop=True)

    if "event_type" in df.columns:
        event_type = df["event_type"].astype("string").str.strip().str.lower()
        derived = event_type.map(LABEL_BY_EVENT)
        label = pd.to_numeric(df["label"], errors="coerce") if "label" in df.columns else derived
        notes["label_rule"] = "event_type (recloop.schema.LABEL_BY_EVENT)"
        unknown = sorted(set(event_type.dropna()) - set(EVENT_TYPES))
        if unknown:
            notes["unknown_event_types"] = unknown[:10]  # left in: the ingest splits them off with a reason
    elif "rating" in df.columns:
        rating = pd.to_numeric(df["rating"], errors="coerce")
        liked = rating >= like_threshold
        event_type = pd.Series(np.where(liked, "like", "dislike"), dtype="string").where(rating.notna())
        label = liked.astype("float64").where(rating.notna())
        notes["label_rule"] = f"rating >= {like_threshold:g} -> like (1), else dislike (0)"
    elif "label" in df.columns:
        lab = pd.to_numeric(df["label"], errors="coerce")
        event_type = lab.map({1: "like", 0: "dislike"}).astype("string")
        label = lab
        notes["label_rule"] = "label 1 -> like, 0 -> dislike"
    else:
        raise ValueError("events need one of the fields event_type, rating or label (implicit-only "
                         "interactions have no negatives to learn from); map one with --map COLUMN=FIELD")

    users = _ids(df["user_id"], user_prefix)
    items = _ids(df["item_id"], item_prefix)
    if "event_id" in df.columns:
        event_id = _ids(df["event_id"])
    else:
        prefix = source if event_prefix is None else event_prefix
        secs = (ts.astype("int64") // 10**9).astype("string")
        event_id = prefix + "-" + users.fillna("?") + "-" + items.fillna("?") + "-" + secs
    label_out = pd.to_numeric(pd.Series(label).astype("object"), errors="coerce").astype("float64")
    # whole labels go out as integers (the contract's type); anything else is left as is for the checks
    if label_out.dropna().isin([0, 1]).all() and label_out.notna().all():
        label_out = label_out.astype("int8")
    events = pd.DataFrame({
        "event_id": event_id,
        "user_id": users,
        "item_id": items,
        "event_type": event_type.astype("string"),
        "label": label_out,
        "timestamp": ts,
        "query": df["query"].astype("string") if "query" in df.columns else None,
        "model_version": None,
    })[list(FEEDBACK_COLUMNS)]
    events = events.sort_values(["timestamp", "event_id"], kind="stable").reset_index(drop=True)
    return events, notes


def split_tags(raw) -> list[str]:
    """A tag list from a list/array, or from text separated by ``|``, ``,`` or (RecBole token_seq) spaces."""
    if raw is None or (isinstance(raw, float) and np.isnan(raw)) or raw is pd.NA:
        return []
    if isinstance(raw, (list, tuple, np.ndarray)):
        return [str(t).strip() for t in raw if str(t).strip()]
    text = str(raw).strip()
    sep = "|" if "|" in text else "," if "," in text else None
    return [t.strip() for t in (text.split(sep) if sep else text.split()) if t.strip()]


def _year(raw: pd.Series) -> pd.Series:
    num = pd.to_numeric(raw.astype("string").str.extract(r"(\d{4})", expand=False), errors="coerce")
    return num.where((num >= 1800) & (num <= 2200)).astype("Int64")


def build_catalog(df: pd.DataFrame, provider: str, *, item_prefix: str = "") -> tuple[pd.DataFrame, dict]:
    """Catalog items in the contract: text for the language model from title, tags and year."""
    if "item_id" not in df.columns:
        raise ValueError(f"items need the field item_id (columns found: {', '.join(map(str, df.columns))})")
    notes: dict = {}
    ids = _ids(df["item_id"], item_prefix)
    keep = ids.notna().to_numpy()
    dup = ids.duplicated(keep="last").to_numpy() & keep
    if (~keep).any():
        notes["dropped_items_without_id"] = int((~keep).sum())
    if dup.any():
        notes["duplicate_item_ids_last_kept"] = int(dup.sum())
    df, ids = df.loc[keep & ~dup].reset_index(drop=True), ids.loc[keep & ~dup].reset_index(drop=True)

    tags = [split_tags(t) for t in df["tags"]] if "tags" in df.columns else [[] for _ in range(len(df))]
    if "category" in df.columns:
        category = df["category"].astype("string").str.strip()
        category = category.where(category.notna() & (category != ""), pd.Series([t[0] if t else None for t in tags],
                                                                                  dtype="string"))
    else:
        category = pd.Series([t[0] if t else None for t in tags], dtype="string")
    category = category.fillna("unknown")
    title = df["title"].astype("string").str.strip() if "title" in df.columns else pd.Series(pd.NA, index=df.index,
                                                                                          dtype="string")
    no_title = title.isna() | (title == "")
    if no_title.any():
        notes["items_without_title"] = int(no_title.sum())
    title = title.where(~no_title, "item " + ids)
    year = _year(df["year"]) if "year" in df.columns else pd.Series(pd.NA, index=df.index, dtype="Int64")
    if "description" in df.columns:
        description = df["description"].astype("string").fillna("")
    else:
        description = pd.Series([_describe(t, y) for t, y in zip(tags, year)], dtype="string")
    if "created_at" in df.columns:
        created = parse_times(df["created_at"])
    else:
        created = pd.to_datetime(year.astype("string") + "-01-01", utc=True, errors="coerce")
    catalog = pd.DataFrame({
        "item_id": ids,
        "title": title,
        "description": description,
        "category": category,
        "tags": [",".join(t) for t in tags],
        "provider": provider,
        "created_at": created,
    })
    return catalog, notes


def _describe(tags: list[str], year) -> str:
    parts = [", ".join(tags) if tags else "unclassified"]
    if year is not None and not pd.isna(year):
        parts.append(f"released in {int(year)}")
    return "; ".join(parts) + "."


def build_users(df: pd.DataFrame, *, user_prefix: str = "") -> tuple[pd.DataFrame, dict]:
    """Users with their group attributes (``gender``, ``age_bucket``) and any other attribute, as text."""
    if "user_id" not in df.columns:
        raise ValueError(f"users need the field user_id (columns found: {', '.join(map(str, df.columns))})")
    out = pd.DataFrame({"user_id": _ids(df["user_id"], user_prefix)})
    if "gender" in df.columns:
        out["gender"] = gender_value(df["gender"])
    if "age_bucket" in df.columns:
        out["age_bucket"] = df["age_bucket"].astype("string")
    elif "age" in df.columns:
        age = pd.to_numeric(df["age"], errors="coerce")
        out["age_bucket"] = pd.Series([None if pd.isna(a) else age_bucket(int(a)) for a in age], dtype="string")
    for col in df.columns:
        if col not in out.columns and col not in ("age", "gender", "age_bucket"):
            out[col] = df[col].astype("string")
    out = out[out["user_id"].notna()].drop_duplicates("user_id", keep="last").reset_index(drop=True)
    return out, {}


# ---- column maps ---------------------------------------------------------------------------------------------
MAP_PATTERN = re.compile(r"^(?:(events|items|users)\.)?(.+?)=([A-Za-z_][A-Za-z0-9_]*)$")


def parse_maps(specs: list[str] | tuple[str, ...] | None) -> dict[str, dict[str, str]]:
    """``["userId=user_id", "items.movieId=item_id"]`` → ``{"*": {"userId": "user_id"}, "items": {...}}``.

    An unscoped ``COLUMN=FIELD`` applies to every file that has the column; ``events.``, ``items.``
    or ``users.`` in front scopes it to one file.
    """
    out: dict[str, dict[str, str]] = {"*": {}, "events": {}, "items": {}, "users": {}}
    for spec in specs or ():
        m = MAP_PATTERN.match(spec.strip())
        if not m:
            raise ValueError(f"--map wants COLUMN=FIELD or events.|items.|users.COLUMN=FIELD, got {spec!r}")
        scope, column, fld = m.group(1) or "*", m.group(2), m.group(3)
        if scope != "*" and scope != "users" and fld not in TABLE_FIELDS[scope]:
            raise ValueError(f"unknown {scope} field {fld!r} in --map {spec!r}; "
                             f"known: {', '.join(TABLE_FIELDS[scope])}")
        out[scope][column] = fld
    return out


def apply_map(df: pd.DataFrame, table: str, maps: dict[str, dict[str, str]],
              defaults: dict[str, str] | None = None) -> pd.DataFrame:
    """Rename ``df``'s columns to the fields of ``table`` and keep only those (users: also every mapped
    attribute). The caller's maps (unscoped, then scoped to ``table``) win over ``defaults``, and a
    default maps a field only once (the first of its candidate columns that is present)."""
    user = {c: f for c, f in {**maps.get("*", {}), **maps.get(table, {})}.items() if c in df.columns}
    rename: dict[str, str] = {}
    taken = set(user.values())
    for col, fld in (defaults or {}).items():
        if col in df.columns and col not in user and fld not in taken:
            rename[col] = fld
            taken.add(fld)
    rename.update(user)
    # a column already named like a field that another column is mapped to gives way to the map
    shadowed = [c for c in df.columns if c in taken and c not in rename]
    out = df.drop(columns=shadowed).rename(columns=rename)
    if out.columns.duplicated().any():
        dups = sorted(set(out.columns[out.columns.duplicated()]))
        raise ValueError(f"{table}: more than one column maps to {', '.join(dups)}")
    known = set(TABLE_FIELDS[table])
    wanted = [c for c in out.columns if c in known or (table == "users" and c in taken)]
    return out[wanted]
