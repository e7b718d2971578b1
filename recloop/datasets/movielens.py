"""Loader for the public MovieLens-100k folder format (``u.data``, ``u.item``, ``u.user``).

* ``u.data``: ``user \\t item \\t rating \\t unix-seconds``
* ``u.item``: latin-1, ``|``-separated: id, title, release date, video date, url, 19 genre flags
* ``u.user``: ``|``-separated: id, age, gender, occupation, zip

Produces the recloop contracts: catalog (text = title, year and genres), users
(gender, age bucket, occupation: fairness attributes only) and time-ordered feedback
(``rating >= 4`` -> ``like``/1, else ``dislike``/0). No MovieLens data ships with recloop.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from recloop.datasets.contracts import ImportedData, age_bucket, build_events, gender_value

__all__ = ["GENRES", "MovieLensData", "age_bucket", "load_movielens"]

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western"]


MovieLensData = ImportedData  # the loader's result: catalog, users, events (recloop.datasets.contracts)


def load_movielens(path: str | Path, like_threshold: int = 4) -> MovieLensData:
    root = Path(path)
    for name in ("u.data", "u.item", "u.user"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name} is missing: expected the MovieLens-100k folder format")

    ratings = pd.read_csv(root / "u.data", sep="\t", header=None, names=["user", "item", "rating", "ts"])
    items = pd.read_csv(root / "u.item", sep="|", header=None, encoding="latin-1",
                        names=["item", "title", "release", "video", "url", *GENRES])
    users = pd.read_csv(root / "u.user", sep="|", header=None, names=["user", "age", "gender", "occupation", "zip"])

    genre_lists = items[GENRES].apply(lambda r: [g for g in GENRES if r[g] == 1], axis=1)
    release = pd.to_datetime(items["release"], format="%d-%b-%Y", errors="coerce", utc=True)
    year = release.dt.year.astype("Int64").astype(str).replace("<NA>", "unknown year")
    catalog = pd.DataFrame({
        "item_id": "ml-" + items["item"].astype(str),
        "title": items["title"].astype(str),
        "description": [f"A {', '.join(g) or 'unclassified'} film released in {y}." for g, y in zip(genre_lists, year)],
        "category": [g[0] if g else "unknown" for g in genre_lists],
        "tags": [",".join(g) for g in genre_lists],
        "provider": "movielens",
        "created_at": release.fillna(pd.Timestamp("1990-01-01", tz="UTC")),
    })
    user_df = pd.DataFrame({
        "user_id": "mlu-" + users["user"].astype(str),
        "gender": gender_value(users["gender"]),
        "age_bucket": users["age"].map(age_bucket),
        "occupation": users["occupation"].astype(str),
    })
    raw = pd.DataFrame({
        "event_id": "ml-" + ratings["user"].astype(str) + "-" + ratings["item"].astype(str) + "-" + ratings["ts"].astype(str),
        "user_id": "mlu-" + ratings["user"].astype(str),
        "item_id": "ml-" + ratings["item"].astype(str),
        "rating": ratings["rating"],
        "timestamp": ratings["ts"],
    })
    events, notes = build_events(raw, "ml", like_threshold=like_threshold)  # the shared label rule
    return MovieLensData(catalog, user_df, events, notes)
