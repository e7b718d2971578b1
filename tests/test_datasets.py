import pandas as pd

from recloop.datasets.batches import split_by_period, write_batches
from recloop.datasets.movielens import load_movielens
from recloop.datasets.synthetic import DRIFT_CATEGORY, SyntheticConfig, generate
from tests.conftest import FIXTURES


def test_synthetic_is_deterministic_for_a_seed(small_world):
    again = generate(small_world.config)
    pd.testing.assert_frame_equal(small_world.events, again.events)
    pd.testing.assert_frame_equal(small_world.catalog, again.catalog)
    other = generate(SyntheticConfig(**{**small_world.config.__dict__, "seed": 4}))
    assert not other.events["item_id"].equals(small_world.events["item_id"].iloc[: len(other.events)])


def test_synthetic_contract(small_world):
    ev = small_world.events
    assert ev["event_id"].is_unique
    assert ev["timestamp"].is_monotonic_increasing and str(ev["timestamp"].dt.tz) == "UTC"
    assert set(ev["item_id"]) <= set(small_world.catalog["item_id"])
    from recloop.schema import LABEL_BY_EVENT

    assert (ev["event_type"].map(LABEL_BY_EVENT) == ev["label"]).all()
    assert 0.1 < ev["label"].mean() < 0.7
    assert ev["query"].notna().any()


def test_planted_drift_changes_category_mix(small_world):
    ev = small_world.events.merge(small_world.catalog[["item_id", "category"]], on="item_id")
    drift_at = small_world.day_start(small_world.config.drift_day)
    before = ev[ev["timestamp"] < drift_at]["category"].value_counts(normalize=True)
    after = ev[ev["timestamp"] >= drift_at]["category"].value_counts(normalize=True)
    assert DRIFT_CATEGORY not in before.index
    assert after.get(DRIFT_CATEGORY, 0) > 0.1
    # liked categories shift too (tastes rotate)
    pos = ev[ev["label"] == 1]
    lb = pos[pos["timestamp"] < drift_at]["category"].value_counts(normalize=True)
    la = pos[pos["timestamp"] >= drift_at]["category"].value_counts(normalize=True)
    tv = 0.5 * (lb.reindex(la.index.union(lb.index), fill_value=0) - la.reindex(la.index.union(lb.index),
                                                                              fill_value=0)).abs().sum()
    assert tv > 0.15


def test_no_drift_when_not_planted():
    data = generate(SyntheticConfig(seed=1, n_users=50, n_items=40, n_days=6, drift_day=None, bad_batch_day=None))
    assert DRIFT_CATEGORY not in set(data.catalog["category"])
    assert data.bad_batch is None and data.planted == {}


def test_bad_batch_is_bad_in_exactly_the_planted_ways(small_world):
    bad, planted = small_world.bad_batch, small_world.planted
    k = planted["null_user_id"]
    assert bad["user_id"].isna().sum() == k
    assert (~bad["item_id"].isin(small_world.catalog["item_id"])).sum() == planted["unknown_item_id"]
    assert (bad["timestamp"] > pd.Timestamp("2098-01-01", tz="UTC")).sum() == planted["future_timestamp"]
    assert bad["event_id"].duplicated().sum() == planted["duplicate_event_id"]
    clean_day = small_world.landing_batches()[small_world.day_start(small_world.config.bad_batch_day)]
    assert clean_day is bad
    good_day = small_world.landing_batches()[small_world.day_start(0)]
    assert good_day["user_id"].notna().all() and good_day["event_id"].is_unique


def test_cold_start_items_appear_late(small_world):
    cat = small_world.catalog
    late = cat[cat["created_at"] > small_world.day_start(0)]
    assert len(late) > 0
    first_seen = small_world.events.groupby("item_id")["timestamp"].min()
    for item, created in zip(late["item_id"], late["created_at"]):
        if item in first_seen:
            assert first_seen[item] >= created.normalize()


def test_batches_split_and_write(tmp_path, small_world):
    batches = split_by_period(small_world.events, 7)
    assert sum(len(b) for b in batches.values()) == len(small_world.events)
    files = write_batches(batches, tmp_path / "landing", "syn", "csv")
    assert len(files) == len(batches) and all(f.suffix == ".csv" for f in files)
    back = pd.read_csv(files[0])
    assert len(back) == len(next(iter(batches.values())))


def test_movielens_loader_on_fixture():
    data = load_movielens(FIXTURES / "ml100k")
    assert len(data.catalog) == 7 and len(data.users) == 5 and len(data.events) == 24
    assert data.events["label"].sum() == 12  # ratings >= 4
    assert set(data.events["event_type"]) == {"like", "dislike"}
    assert str(data.events["timestamp"].dt.tz) == "UTC"
    assert data.events["timestamp"].iloc[0] == pd.Timestamp("1997-12-04 15:55:49", tz="UTC")
    assert data.events["timestamp"].is_monotonic_increasing
    assert "Misérables" in data.catalog.set_index("item_id").loc["ml-7", "title"]
    toy = data.catalog.set_index("item_id").loc["ml-1"]
    assert toy["category"] == "Animation" and "1995" in toy["description"]
    assert set(data.users["age_bucket"]) == {"18-24", "50+", "25-34", "<18"}
    weeks = split_by_period(data.events, 7)
    assert [len(b) for b in weeks.values()] == [7, 7, 7, 3]


def test_movielens_missing_file_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="u.data"):
        load_movielens(tmp_path)
