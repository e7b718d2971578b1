"""Importers into the recloop contracts: RecBole atomic files and generic tables with a column map."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from recloop.cli import app
from recloop.datasets.contracts import apply_map, build_events, parse_maps, parse_times, split_tags
from recloop.datasets.recbole import load_recbole, read_atomic
from recloop.datasets.tabular import load_tables
from recloop.schema import FEEDBACK_COLUMNS, LABEL_BY_EVENT
from tests.conftest import FIXTURES

RECBOLE = FIXTURES / "recbole" / "tiny"
TABLES = FIXTURES / "tables"
TABLE_MAPS = ["userId=user_id", "movieId=item_id", "events.stars=rating", "events.when=timestamp",
              "items.genres=tags", "users.sex=gender", "users.age_years=age", "users.occupation=occupation"]
runner = CliRunner()


def test_read_atomic_strips_types_and_keeps_text():
    inter = read_atomic(RECBOLE / "tiny.inter")
    assert list(inter.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert str(inter["user_id"].dtype) == "string" and inter["rating"].dtype == "float64"
    items = read_atomic(RECBOLE / "tiny.item")
    assert items.loc[2, "movie_title"] == 'Say "Cheese" Again'  # quotes are text, not CSV quoting


def test_recbole_into_the_contracts():
    data = load_recbole(RECBOLE)
    ev = data.events
    assert list(ev.columns) == list(FEEDBACK_COLUMNS) and len(ev) == 6
    assert ev["timestamp"].is_monotonic_increasing and str(ev["timestamp"].dt.tz) == "UTC"
    assert ev["timestamp"].iloc[0] == pd.Timestamp("1997-12-04 15:55:49", tz="UTC")
    # label rule: rating >= 4 -> like/1, else dislike/0 (4.5 counts)
    by_id = ev.set_index("event_id")
    assert by_id.loc["tiny-1-10-881250949", ["event_type", "label"]].tolist() == ["like", 1]
    assert by_id.loc["tiny-1-11-881250999", ["event_type", "label"]].tolist() == ["dislike", 0]
    assert ev["label"].tolist() == [1, 0, 1, 0, 0, 1] and str(ev["label"].dtype) == "int8"
    assert (ev["event_type"].map(LABEL_BY_EVENT) == ev["label"]).all()
    cat = data.catalog.set_index("item_id")
    assert cat.loc["10", "title"] == "Toy Story" and cat.loc["10", "category"] == "Animation"
    assert cat.loc["10", "tags"] == "Animation,Children's,Comedy"
    assert "1995" in cat.loc["10", "description"] and "Comedy" in cat.loc["10", "description"]
    assert cat.loc["12", "created_at"] == pd.Timestamp("1996-01-01", tz="UTC")
    users = data.users.set_index("user_id")
    assert users.loc["1", "gender"] == "male" and users.loc["2", "gender"] == "female"
    assert users["age_bucket"].tolist() == ["18-24", "50+", "<18"]
    assert users.loc["3", "occupation"] == "student" and "zip_code" not in users.columns  # not a group attribute


def test_recbole_label_rule_and_id_prefix_are_configurable():
    data = load_recbole(RECBOLE / "tiny.inter", like_threshold=3, id_prefix="rb:")
    assert data.events["label"].tolist() == [1, 0, 1, 1, 0, 1]
    assert data.events["user_id"].iloc[0] == "rb:1" and set(data.catalog["item_id"]) == {"rb:10", "rb:11", "rb:12"}


def test_recbole_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no <name>.inter"):
        load_recbole(tmp_path)
    (tmp_path / "x.inter").write_text((RECBOLE / "tiny.inter").read_text())
    with pytest.raises(FileNotFoundError, match="x.item is missing"):
        load_recbole(tmp_path)


def test_tables_with_a_column_map():
    data = load_tables(TABLES / "ratings.csv", TABLES / "movies.csv", TABLES / "users.csv", maps=TABLE_MAPS)
    ev = data.events
    assert len(ev) == 5 and data.notes["dropped_unparseable_timestamp"] == 1  # "not a time" has no period
    assert ev["label"].tolist() == [1, 0, 1, 0, 0]
    assert ev["timestamp"].iloc[2] == pd.Timestamp("2024-03-02 08:00", tz="UTC")  # +01:00 converted to UTC
    assert ev["event_id"].iloc[0].startswith("ratings-u1-m1-")
    cat = data.catalog.set_index("item_id")
    assert cat.loc["m1", "category"] == "Drama" and cat.loc["m1", "tags"] == "Drama,Sci-Fi"
    users = data.users.set_index("user_id")
    assert users.loc["u1", "gender"] == "female" and users.loc["u3", "gender"] == "other"
    assert users.loc["u2", "age_bucket"] == "50+" and users.loc["u1", "occupation"] == "engineer"
    assert "postcode" not in users.columns  # unmapped: dropped


def test_tables_event_types_parquet_and_millisecond_times(tmp_path):
    pq = tmp_path / "clicks.parquet"
    pd.read_csv(TABLES / "clicks.csv", dtype={"event_id": "string"}).to_parquet(pq)
    data = load_tables(pq, TABLES / "movies.csv", maps=["ts_ms=timestamp", "movieId=item_id", "genres=tags"],
                       time_unit="ms", source="web")
    ev = data.events
    assert ev["event_id"].tolist() == ["e1", "e2", "e3", "e4"]  # given ids are kept
    assert ev["event_type"].tolist() == ["impression", "click", "purchase", "impression"]
    assert ev["label"].tolist() == [0, 1, 1, 0]
    assert ev["timestamp"].iloc[0] == pd.Timestamp("2024-03-01 10:00", tz="UTC")
    assert set(data.users["user_id"]) == {"u1", "u2", "u3"}  # no users file: ids only


def test_map_parsing_and_errors():
    m = parse_maps(["a=user_id", "items.b=title", "users.c=shoe_size"])
    assert m["*"] == {"a": "user_id"} and m["items"] == {"b": "title"} and m["users"] == {"c": "shoe_size"}
    with pytest.raises(ValueError, match="COLUMN=FIELD"):
        parse_maps(["nonsense"])
    with pytest.raises(ValueError, match="unknown items field"):
        parse_maps(["items.b=colour"])
    df = pd.DataFrame({"uid": ["1"], "user_id": ["x"], "item": ["2"]})
    out = apply_map(df, "events", parse_maps(["uid=user_id", "item=item_id"]))
    assert list(out.columns) == ["user_id", "item_id"] and out["user_id"].iloc[0] == "1"  # the map wins
    with pytest.raises(ValueError, match="event_type, rating or label"):
        build_events(pd.DataFrame({"user_id": ["1"], "item_id": ["2"], "timestamp": [1]}), "x")
    with pytest.raises(ValueError, match="user_id"):
        build_events(pd.DataFrame({"item_id": ["2"], "timestamp": [1], "rating": [5]}), "x")


def test_small_helpers():
    assert split_tags("Drama|Sci-Fi") == ["Drama", "Sci-Fi"] and split_tags("Action Crime") == ["Action", "Crime"]
    assert split_tags(["a", " b "]) == ["a", "b"] and split_tags(None) == []
    t = parse_times(pd.Series(["881250949", "881250950"]))
    assert t.iloc[0] == pd.Timestamp("1997-12-04 15:55:49", tz="UTC")
    assert parse_times(pd.Series(["2024-01-01 10:00"])).iloc[0] == pd.Timestamp("2024-01-01 10:00", tz="UTC")


def test_cli_import_recbole_lands_weekly_batches(tmp_path):
    ws = tmp_path / "ws"
    res = runner.invoke(app, ["import-recbole", str(RECBOLE), "-w", str(ws), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (doc["source"], doc["events"], doc["items"], doc["users"], doc["batches"]) == ("tiny", 6, 3, 3, 2)
    assert sorted(p.name for p in (ws / "landing").iterdir()) == ["tiny-19971204.parquet", "tiny-19971211.parquet"]
    bad = runner.invoke(app, ["import-recbole", str(tmp_path / "nowhere"), "-w", str(ws)])
    assert bad.exit_code == 1 and "does not exist" in bad.output


def test_cli_import_tables(tmp_path):
    ws = tmp_path / "ws"
    args = ["import", "--events", str(TABLES / "ratings.csv"), "--items", str(TABLES / "movies.csv"),
            "--users", str(TABLES / "users.csv"), "--period-days", "7", "-w", str(ws), "--json"]
    for m in TABLE_MAPS:
        args += ["--map", m]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (doc["events"], doc["batches"]) == (5, 2) and doc["notes"]["dropped_unparseable_timestamp"] == 1
    bad = runner.invoke(app, ["import", "--events", str(TABLES / "ratings.csv"), "--items",
                              str(TABLES / "movies.csv"), "-w", str(ws)])
    assert bad.exit_code == 1 and "user_id" in bad.output  # unmapped columns: says what is missing
