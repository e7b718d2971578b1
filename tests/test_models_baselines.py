"""Baselines and the `recloop train` comparison."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from models.baselines import MatrixFactorizationBaseline, PopularityBaseline


def _toy():
    # item a: liked 9/10, item b: liked 1/10; users u1 like x-items, u2 like y-items
    rows = [("u", "a", 1)] * 9 + [("u", "a", 0)] + [("u", "b", 1)] + [("u", "b", 0)] * 9
    return pd.DataFrame(rows, columns=["user_id", "item_id", "label"])


def test_popularity_is_the_smoothed_like_rate():
    pop = PopularityBaseline(smoothing=10).fit(_toy())
    s = pop.score(pd.DataFrame({"item_id": ["a", "b", "never-seen"]}))
    prior = 0.5
    assert s[0] == pytest.approx((9 + 10 * prior) / 20) and s[1] == pytest.approx((1 + 10 * prior) / 20)
    assert s[2] == pytest.approx(prior)  # unknown item: the global rate


def test_matrix_factorisation_learns_user_item_interactions():
    rng = np.random.default_rng(0)
    users = [f"u{i}" for i in range(40)]
    items = [f"i{j}" for j in range(30)]
    taste = {u: i % 2 for i, u in enumerate(users)}
    kind = {x: j % 2 for j, x in enumerate(items)}
    rows = [(u, x, int(taste[u] == kind[x]) if rng.random() > 0.1 else int(taste[u] != kind[x]))
            for u in users for x in rng.choice(items, 15, replace=False)]
    ev = pd.DataFrame(rows, columns=["user_id", "item_id", "label"])
    mf = MatrixFactorizationBaseline(dim=8, epochs=150, seed=0).fit(ev)
    auc = roc_auc_score(ev["label"], mf.score(ev))
    assert auc > 0.85  # popularity cannot do this: every item is liked by half of the users
    assert roc_auc_score(ev["label"], PopularityBaseline().fit(ev).score(ev)) < 0.7
    s = mf.score(pd.DataFrame({"user_id": ["nobody"], "item_id": ["nothing"]}))
    assert 0 < s[0] < 1


def test_baselines_reject_bad_input():
    with pytest.raises(ValueError, match="missing columns"):
        PopularityBaseline().fit(pd.DataFrame({"item_id": ["a"]}))
    with pytest.raises(ValueError, match="no events"):
        MatrixFactorizationBaseline().fit(_toy().iloc[:0])
    with pytest.raises(RuntimeError):
        MatrixFactorizationBaseline().score(pd.DataFrame({"user_id": ["u"], "item_id": ["a"]}))


def test_recloop_train_prints_model_vs_baselines(settings, small_world, tmp_path, monkeypatch):
    import torch
    from typer.testing import CliRunner

    from models.testing import make_tiny_encoder
    from recloop.cli import app
    from recloop.store import FeedbackStore

    enc = make_tiny_encoder(tmp_path / "enc")
    monkeypatch.setenv("RECLOOP_TRAINING__ENCODER_PATH", str(enc))
    monkeypatch.setenv("RECLOOP_TRAINING__MAX_EPOCHS", "1")
    monkeypatch.setenv("RECLOOP_TRAINING__EMBED_DIM", "16")
    store = FeedbackStore.from_settings(settings)
    store.upsert_catalog(small_world.catalog)
    store.upsert_users(small_world.users)
    store.append(small_world.events, "b1")
    saved = torch.get_num_threads()
    result = CliRunner().invoke(app, ["train", "--workspace", str(settings.root), "--json",
                                      "--save", str(tmp_path / "model")])
    torch.set_num_threads(saved)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    m = doc["metrics"]
    assert set(m) == {"bert-two-tower", "popularity", "matrix-factorisation"}
    for row in m.values():
        assert 0.0 <= row["auc"] <= 1.0 and row["n_events"] == doc["n_test"]
    assert m["popularity"]["cold_item_auc"] == pytest.approx(0.5)  # cannot rank unseen items
    assert (tmp_path / "model" / "weights.safetensors").is_file()
    assert doc["train_window"][1] < doc["test_window"][0]


def test_recloop_train_on_an_empty_workspace_fails_clearly(settings):
    from typer.testing import CliRunner

    from recloop.cli import app

    result = CliRunner().invoke(app, ["train", "--workspace", str(settings.root)])
    assert result.exit_code != 0
    assert "ingest" in result.output
