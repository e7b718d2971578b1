"""The Ray engine on a local cluster of two nodes gives the embedded (pandas) path's results on the same data:
point-in-time features of a training window, catalog vectors and batch scores (slow: Ray start-up)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

import ray  # the services extra (a dev dependency): missing = an error, not a skip

LAG = pd.Timedelta(minutes=30)


@pytest.fixture(scope="module")
def engine():
    """One cluster for the module: a head and a second node, 1 CPU each, joined by address like a remote one."""
    import os

    from ray.cluster_utils import Cluster

    from models.engine import ROOT, RayEngine

    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved) if p)  # the nodes' workers inherit it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        eng = RayEngine(cluster.address, partitions=3)
        try:
            yield eng
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def world():
    from recloop.datasets.synthetic import generate
    from tests.conftest import small_world_config

    return generate(small_world_config(n_days=10))


def _frame(f) -> pd.DataFrame:
    """Every output of point_in_time_features as one frame, one column per array column."""
    from models.features import WIDE_COLUMNS

    cols = {**{c: f.wide[:, k] for k, c in enumerate(WIDE_COLUMNS)}, "history_len": f.history_len}
    for name in ("history_items", "recent_items", "recent_labels"):
        arr = getattr(f, name)
        cols.update({f"{name}_{k}": arr[:, k] for k in range(arr.shape[1])})
    return pd.DataFrame(cols)


def _features(eng, world, lag=LAG):
    from models.data import ItemIndex

    ev = world.events
    items = ItemIndex.from_catalog(world.catalog, ev["item_id"])
    # as the retrain does: the rows of a part, the whole window as history, the part's prior
    rows = ev.iloc[: int(len(ev) * 0.8)]
    return eng.point_in_time_features(rows, ev, world.catalog, items.position, 20, float(rows["label"].mean()), lag)


def test_the_cluster_has_two_nodes(engine):
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2 and ray.cluster_resources()["CPU"] == 2

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1)
    def node_of_task():
        return ray.get_runtime_context().get_node_id()

    # both nodes run tasks: one pinned to each (SPREAD is best effort and may reuse a node whose task ended)
    ids = [n["NodeID"] for n in nodes]
    ran_on = ray.get([node_of_task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(i, soft=False)).remote()
                      for i in ids])
    assert ran_on == ids


def test_window_features_equal_the_embedded_path(engine, world):
    from models.engine import PandasEngine

    want, got = _frame(_features(PandasEngine(), world)), _frame(_features(engine, world))
    assert len(want) > 1000 and (want["history_len"] > 0).mean() > 0.5  # not a trivial window
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_parity_catches_a_leak(engine, world, monkeypatch):
    """The comparison is sensitive: a shifted lag (rows see the last 30 minutes too) or partitions handed the
    wrong history (events sent to another partition than their rows') give different features."""
    import models.engine as me
    from models.engine import PandasEngine

    want = _frame(_features(PandasEngine(), world))
    leaky = _frame(_features(engine, world, lag=pd.Timedelta(0)))
    with pytest.raises(AssertionError):
        pd.testing.assert_frame_equal(leaky, want, check_exact=True)
    real, n_history = me._partition, len(world.events)

    def misplaced(values, k):  # every tenth history event goes to the next partition
        p = real(values, k)
        if len(values) == n_history:
            p[::10] = (p[::10] + 1) % k
        return p

    monkeypatch.setattr(me, "_partition", misplaced)
    wrong = _frame(_features(engine, world))
    with pytest.raises(AssertionError):
        pd.testing.assert_frame_equal(wrong, want, check_exact=True)
    assert not np.array_equal(wrong["user_log_count"], want["user_log_count"])
    assert not np.array_equal(wrong["item_log_count"], want["item_log_count"])


def test_catalog_vectors_equal_the_embedded_path(engine, world, monkeypatch, tmp_path):
    """Each task loads the encoder from its local path (a tiny random BERT with the MiniLM tokenizer here)."""
    import models.engine as me
    from models.data import ItemIndex
    from models.network import TextEncoder
    from models.testing import make_tiny_encoder

    texts = ItemIndex.from_catalog(world.catalog).texts
    enc = TextEncoder(make_tiny_encoder(tmp_path / "encoder"), 64)
    monkeypatch.setattr(me, "TEXTS_PER_TASK", 48)  # two tasks for 80 texts
    got = engine.encode_texts(enc, texts, batch_size=16).numpy()
    want = enc.encode(texts, batch_size=16).numpy()
    assert got.shape == want.shape == (len(texts), enc.dim)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_batch_scores_equal_the_embedded_path(engine, world):
    from models.baselines import StatisticsBaseline
    from models.engine import PandasEngine

    ev = world.events
    cut = int(len(ev) * 0.8)
    model = StatisticsBaseline(lag=LAG).fit(ev.iloc[:cut], ev.iloc[:cut], world.catalog)
    rows = ev.iloc[cut:][["user_id", "item_id", "query", "timestamp"]]
    want = PandasEngine().score(model, rows, ev, world.catalog)
    got = engine.score(model, rows, ev, world.catalog)
    assert len(got) == len(rows)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)  # float64 dot products: last bit at most
