"""Loader for RecBole atomic files (``<name>.inter``, ``<name>.item``, ``<name>.user``).

RecBole (https://recbole.io) ships dozens of public datasets in one format: tab-separated
text whose header names each column with its type, ``user_id:token``, ``rating:float``,
``timestamp:float``, ``movie_title:token_seq``, ``class:token_seq`` (space-separated
tokens), ... This loader reads them into the recloop contracts through
:mod:`recloop.datasets.contracts`, with a default field map for RecBole's usual column
names (:data:`DEFAULT_MAP`) that ``--map`` entries extend or override.

* ``.inter`` (required): ``user_id``, ``item_id``, ``timestamp`` and ``rating`` (or
  ``label``); label rule ``rating >= like_threshold`` → ``like``/1, else ``dislike``/0;
* ``.item`` (required: the text model reads item text): title from ``movie_title`` /
  ``title`` / ``item_name``, tags (and the category, the first tag) from ``class`` /
  ``genre`` / ``categories``, ``release_year`` / ``year``;
* ``.user`` (optional): ``gender``, ``age`` (→ ``age_bucket``), ``occupation``; other
  columns (``zip_code``, ...) are dropped unless mapped.
"""

from __future__ import annotations

import csv
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

DEFAULT_MAP: dict[str, dict[str, str]] = {
    "events": {"user_id": "user_id", "item_id": "item_id", "rating": "rating", "timestamp": "timestamp",
               "label": "label"},
    "items": {"item_id": "item_id", "movie_title": "title", "title": "title", "item_name": "title",
              "class": "tags", "genre": "tags", "genres": "tags", "categories": "tags", "release_year": "year",
              "year": "year", "description": "description"},
    "users": {"user_id": "user_id", "age": "age", "gender": "gender", "occupation": "occupation"},
}
NUMERIC_TYPES = ("float", "float_seq")


def read_atomic(path: str | Path) -> pd.DataFrame:
    """One atomic file as a frame: column names without their ``:type``; tokens as text, floats as numbers."""
    path = Path(path)
    try:
        text_head = path.open(encoding="utf-8").readline()
        encoding = "utf-8"
    except UnicodeDecodeError:
        text_head, encoding = path.open(encoding="latin-1").readline(), "latin-1"
    header = text_head.rstrip("\r\n").split("\t")
    names, dtypes = [], {}
    for h in header:
        name, _, typ = h.partition(":")
        names.append(name)
        if typ not in NUMERIC_TYPES:
            dtypes[name] = "string"
    if len(set(names)) != len(names):
        raise ValueError(f"{path.name}: repeated column names in the header {header}")
    try:
        df = pd.read_csv(path, sep="\t", header=0, names=names, dtype=dtypes, encoding=encoding,
                         quoting=csv.QUOTE_NONE, keep_default_na=False, na_values=[""])
    except UnicodeDecodeError:
        df = pd.read_csv(path, sep="\t", header=0, names=names, dtype=dtypes, encoding="latin-1",
                         quoting=csv.QUOTE_NONE, keep_default_na=False, na_values=[""])
    return df


def find_atomic(path: str | Path, name: str | None = None) -> tuple[str, dict[str, Path]]:
    """``(name, {"inter": ..., "item": ..., "user": ...})`` for a dataset folder or its ``.inter`` file."""
    p = Path(path)
    if p.is_file():
        if p.suffix != ".inter":
            raise FileNotFoundError(f"{p} is not a RecBole .inter file")
        folder, name = p.parent, name or p.stem
    elif p.is_dir():
        folder = p
        if name is None:
            inters = sorted(folder.glob("*.inter"))
            if (folder / f"{folder.name}.inter").is_file():
                name = folder.name
            elif len(inters) == 1:
                name = inters[0].stem
            elif not inters:
                raise FileNotFoundError(f"{folder} has no <name>.inter file (RecBole atomic files)")
            else:
                raise FileNotFoundError(f"{folder} has several .inter files "
                                        f"({', '.join(i.name for i in inters)}); pick one with --name")
    else:
        raise FileNotFoundError(f"{p} does not exist")
    files = {kind: folder / f"{name}.{kind}" for kind in ("inter", "item", "user")}
    if not files["inter"].is_file():
        raise FileNotFoundError(f"{files['inter']} is missing: expected RecBole atomic files <name>.inter/.item")
    if not files["item"].is_file():
        raise FileNotFoundError(f"{files['item']} is missing: the catalog (item text) comes from the .item file")
    if not files["user"].is_file():
        files.pop("user")
    return name, files


def load_recbole(path: str | Path, *, name: str | None = None, like_threshold: float = 4.0,
                 maps: list[str] | None = None, time_unit: str = "s", id_prefix: str = "") -> ImportedData:
    """Read a RecBole dataset into the recloop contracts (see the module docstring)."""
    name, files = find_atomic(path, name)
    parsed = parse_maps(maps)
    events_raw = apply_map(read_atomic(files["inter"]), "events", parsed, DEFAULT_MAP["events"])
    items_raw = apply_map(read_atomic(files["item"]), "items", parsed, DEFAULT_MAP["items"])
    events, notes = build_events(events_raw, name, like_threshold=like_threshold, time_unit=time_unit,
                                 user_prefix=id_prefix, item_prefix=id_prefix)
    catalog, cat_notes = build_catalog(items_raw, name, item_prefix=id_prefix)
    if "user" in files:
        users, _ = build_users(apply_map(read_atomic(files["user"]), "users", parsed, DEFAULT_MAP["users"]),
                               user_prefix=id_prefix)
    else:
        users = pd.DataFrame({"user_id": pd.Series(events["user_id"].dropna().unique(), dtype="string")})
        notes["users"] = "no .user file: users without group attributes"
    return ImportedData(catalog, users, events, {**notes, **cat_notes, "name": name,
                                                 "files": [str(f) for f in files.values()]})
