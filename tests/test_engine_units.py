"""models.engine, fast: the embedded default is plain pandas (Ray never imported), and the retrain routes
the window's point-in-time features and its catalog pass through the engine that settings choose."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_default_engine_is_pandas_and_ray_is_not_imported(tmp_path):
    code = (
        "import sys\n"
        "from recloop.settings import load_settings\n"
        "from models.engine import feature_engine\n"
        f"s = load_settings({str(tmp_path / 'ws')!r})\n"
        "e = feature_engine(s)\n"
        "print(s.services.engine, e.name, 'ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["pandas", "pandas", "False"]


def test_unknown_engine_is_refused():
    from models.engine import feature_engine

    with pytest.raises(ValueError, match="unknown engine 'spark'"):
        feature_engine(SimpleNamespace(services=SimpleNamespace(engine="spark", ray_address=None)))


def test_partition_is_a_stable_hash_with_na_together():
    from models.engine import _partition

    a = _partition(pd.Series(["u1", "u2", None, "u1"], dtype="object"), 4)
    b = _partition(pd.Series(["u1", "u2", pd.NA, "u1"], dtype="string"), 4)
    assert np.array_equal(a, b) and a[0] == a[3] and ((a >= 0) & (a < 4)).all()


T0 = pd.Timestamp("2026-01-01", tz="UTC")


def _edge_world(n=900, seed=0):
    """Events with ties, an item the catalog lacks, a category that is missing, and rows without a time."""
    rng = np.random.default_rng(seed)
    catalog = pd.DataFrame({"item_id": [f"i{k}" for k in range(8)], "title": [f"t{k}" for k in range(8)],
                            "description": ["d"] * 8, "category": ["a", "a", "b", "b", None, "c", "c", "d"],
                            "created_at": [T0 - pd.Timedelta(days=3 + k) for k in range(8)]})
    items = [f"i{k}" for k in range(8)] + ["ghost"]
    history = pd.DataFrame({"user_id": rng.choice([f"u{k}" for k in range(9)], n),
                            "item_id": rng.choice(items, n), "label": rng.integers(0, 2, n),
                            "timestamp": T0 + pd.to_timedelta(rng.integers(0, 48 * 60, n), unit="min")})
    rows = history.sample(300, random_state=seed).reset_index(drop=True)[["user_id", "item_id", "timestamp"]]
    rows.loc[::7, "timestamp"] = pd.NaT  # scored "now": every event counts, age at the window's latest time
    rows.loc[::5, "user_id"] = "cold-user"
    rows["query"] = np.where(np.arange(len(rows)) % 4 == 0, "jazz", None)
    index = {f"i{k}": k for k in range(8)} | {"ghost": 8}
    return rows, history, catalog, index


def _same(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f))
               for f in ("history_items", "history_len", "wide", "recent_items", "recent_labels"))


@pytest.mark.parametrize("partitions", [1, 3, 7])
def test_partitioned_features_equal_the_embedded_path(partitions):
    """The plan the Ray engine runs (user pass + item pass, the window's prior and "now"), run inline."""
    from models.engine import PandasEngine, PartitionedEngine

    rows, history, catalog, index = _edge_world()
    lag = pd.Timedelta(minutes=10)
    for prior in (None, 0.3):
        want = PandasEngine().point_in_time_features(rows, history, catalog, index, 5, prior, lag)
        got = PartitionedEngine(partitions).point_in_time_features(rows, history, catalog, index, 5, prior, lag)
        assert _same(got, want)


def test_partitioned_parity_fails_when_a_partition_misses_history(monkeypatch):
    import models.engine as me

    rows, history, catalog, index = _edge_world()
    want = me.PandasEngine().point_in_time_features(rows, history, catalog, index, 5, None, pd.Timedelta(0))
    real = me._partition

    def misplaced(values, k):
        p = real(values, k)
        if len(values) == len(history):
            p[::10] = (p[::10] + 1) % k
        return p

    monkeypatch.setattr(me, "_partition", misplaced)
    got = me.PartitionedEngine(3).point_in_time_features(rows, history, catalog, index, 5, None, pd.Timedelta(0))
    assert not _same(got, want)


def test_features_now_is_the_untimed_rows_clock():
    from models.features import WIDE_COLUMNS, point_in_time_features

    rows, history, catalog, index = _edge_world()
    latest = history["timestamp"].max()
    a = point_in_time_features(rows, history, catalog, index, 5)
    b = point_in_time_features(rows, history, catalog, index, 5, now=latest)
    c = point_in_time_features(rows, history, catalog, index, 5, now=latest + pd.Timedelta(days=30))
    assert _same(a, b)
    untimed = rows["timestamp"].isna().to_numpy()
    age = WIDE_COLUMNS.index("item_log_age_days")
    known = rows["item_id"].isin(catalog["item_id"]).to_numpy()  # items without a creation time have age 0
    assert (c.wide[untimed & known, age] > a.wide[untimed & known, age]).all()
    assert np.array_equal(c.wide[~untimed], a.wide[~untimed])


class RecordingEngine:
    """The pandas engine, recording what the retrain sends through it (a non-default engine object)."""

    name = "recording"

    def __init__(self):
        from models.engine import PandasEngine

        self.inner, self.feature_rows, self.encoded, self.closed = PandasEngine(), [], [], False

    def point_in_time_features(self, rows, history, catalog, item_index, history_len=20, prior=None, lag=None):
        self.feature_rows.append((len(rows), len(history), pd.Timedelta(lag)))
        return self.inner.point_in_time_features(rows, history, catalog, item_index, history_len, prior, lag)

    def encode_texts(self, encoder, texts, batch_size=128):
        self.encoded.extend(texts)
        return self.inner.encode_texts(encoder, texts, batch_size)

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from models.testing import make_tiny_encoder

    return make_tiny_encoder(tmp_path_factory.mktemp("tiny") / "encoder")


class _StopAtFit(Exception):
    pass


def test_train_routes_window_features_and_catalog_through_the_engine(settings, tiny_encoder, one_torch_thread):
    """Stopped as the selection fit starts: by then the window's features and the catalog pass have run."""
    from pytorch_lightning.callbacks import Callback

    from models.network import _TEXT_CACHE
    from models.train import train_recommender
    from recloop.datasets.synthetic import generate
    from tests.conftest import small_world_config

    class Stop(Callback):
        def on_train_start(self, trainer, pl_module):
            raise _StopAtFit

    world = generate(small_world_config(n_days=6))
    settings.training.encoder_path = str(tiny_encoder)
    settings.training.embed_dim = 32
    _TEXT_CACHE.clear()  # the frozen pass must encode (not find every text cached by another test)
    engine = RecordingEngine()
    with pytest.raises(_StopAtFit):
        train_recommender(settings, world.events, world.catalog, fast_dev_run=True, engine=engine, callbacks=[Stop()])
    n = len(world.events)
    # the selection run's train and val parts: all rows together, each with the whole window as history
    rows = [r for r, _, _ in engine.feature_rows]
    assert len(rows) == 2 and sum(rows) == n and min(rows) > 0
    assert all(h == n and lag == settings.feature_lag for _, h, lag in engine.feature_rows)
    assert len(engine.encoded) >= world.catalog["item_id"].nunique()  # the frozen catalog pass
    assert not engine.closed  # an engine passed in belongs to the caller


def test_the_refit_uses_the_engine_too(settings, tiny_encoder, one_torch_thread):
    """A whole training with a refit (no source inspection): the refit's datamodule, built in ``_refit``,
    computes the whole window's features through the engine too, after the selection run's two parts."""
    from models import train
    from models.network import _TEXT_CACHE
    from recloop.datasets.synthetic import generate
    from tests.conftest import small_world_config

    world = generate(small_world_config(n_days=6))
    settings.training.encoder_path = str(tiny_encoder)
    settings.training.embed_dim = 32
    _TEXT_CACHE.clear()
    engine = RecordingEngine()
    trained = train.train_recommender(settings, world.events, world.catalog, fast_dev_run=True, engine=engine,
                                      refit_full=True, ranker="none")
    n = len(world.events)
    rows = [r for r, _, _ in engine.feature_rows]
    assert trained.refit_full and sum(rows[:2]) == n and min(rows[:2]) > 0, rows  # the selection run's parts
    assert rows[2:] == [n, 0] and engine.feature_rows[2][1] == n  # the refit: every row (no validation part)
    assert train._engine_kwargs(train.PandasEngine()) == {}
    eng = RecordingEngine()
    assert train._engine_kwargs(eng) == {"features": eng.point_in_time_features}
