"""Generic import: events, items and (optionally) users from CSV or Parquet files with a column map.

    recloop import --events ratings.csv --items movies.csv --users users.csv \\
        --map userId=user_id --map movieId=item_id --map items.genres=tags

Columns already named like a field (:mod:`recloop.datasets.contracts`) need no map; an
unscoped ``COLUMN=FIELD`` applies to every file with that column, ``events.``/``items.``/
``users.COLUMN=FIELD`` to one file. Everything else goes through the same contract
builders as the MovieLens and RecBole importers.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from recloop.datasets.contracts import (
    ImportedData,
    apply_map,
    build_catalog,
    build_events,
    build_users,
    parse_maps,
)

READABLE = (".csv", ".tsv", ".parquet", ".pq")


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV/TSV (ids kept as text) or Parquet file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist")
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(p)
    if suffix in (".csv", ".tsv"):
        sep = "\t" if suffix == ".tsv" else ","
        try:
            return pd.read_csv(p, sep=sep, dtype="string", keep_default_na=False, na_values=[""])
        except UnicodeDecodeError:
            return pd.read_csv(p, sep=sep, dtype="string", keep_default_na=False, na_values=[""],
                               encoding="latin-1")
    raise ValueError(f"{p.name}: unsupported file type {suffix or '(none)'!r}; use one of {', '.join(READABLE)}")


def load_tables(events: str | Path, items: str | Path, users: str | Path | None = None, *,
                maps: list[str] | None = None, source: str | None = None, like_threshold: float = 4.0,
                time_unit: str = "s", id_prefix: str = "") -> ImportedData:
    """Read and map the files into the recloop contracts (see the module docstring)."""
    parsed = parse_maps(maps)
    source = source or Path(events).stem
    ev, notes = build_events(apply_map(read_table(events), "events", parsed), source, like_threshold=like_threshold,
                             time_unit=time_unit, user_prefix=id_prefix, item_prefix=id_prefix)
    catalog, cat_notes = build_catalog(apply_map(read_table(items), "items", parsed), source, item_prefix=id_prefix)
    if users is not None:
        user_df, _ = build_users(apply_map(read_table(users), "users", parsed), user_prefix=id_prefix)
    else:
        user_df = pd.DataFrame({"user_id": pd.Series(ev["user_id"].dropna().unique(), dtype="string")})
        notes["users"] = "no users file: users without group attributes"
    return ImportedData(catalog, user_df, ev, {**notes, **cat_notes, "name": source})
