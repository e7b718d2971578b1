"""Training the recommender on a tiny random BERT: runs, learns, is deterministic, round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_lightning.callbacks import Callback


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models are many small ops: one thread is faster on a shared 2-core box."""


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from models.testing import make_tiny_encoder

    return make_tiny_encoder(tmp_path_factory.mktemp("tiny") / "encoder")


@pytest.fixture(scope="module")
def world():
    """The conftest ``small_world``, generated once for this module (it is read-only here)."""
    from recloop.datasets.synthetic import generate
    from tests.conftest import small_world_config

    return generate(small_world_config(bad_batch_day=2))


@pytest.fixture
def tiny_settings(settings, tiny_encoder):
    settings.training.encoder_path = str(tiny_encoder)
    settings.training.max_epochs = 2
    settings.training.embed_dim = 32
    return settings


def _train(settings, world, **kw):
    from models.train import train_recommender

    return train_recommender(settings, world.events, world.catalog, world.users, **kw)


def test_make_tiny_encoder_is_a_loadable_bert(tiny_encoder):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_encoder)
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (32, 2)
    assert (Path(tiny_encoder) / "model.safetensors").is_file() and (Path(tiny_encoder) / "vocab.txt").is_file()


def test_fast_dev_run_on_tiny_bert(tiny_settings, world):
    out = _train(tiny_settings, world, fast_dev_run=True)
    assert out.n_train > 0 and out.n_val > 0
    assert out.refit_full and out.epochs_chosen == 1 and out.n_train == len(world.events)  # the refit ran too
    scores = out.model.score(world.events.head(50), world.events, world.catalog)
    assert scores.shape == (50,) and np.all((scores > 0) & (scores < 1))


def test_tiny_batch_is_overfit(tiny_settings, world):
    """Heads + ids on 64 examples: the training loss must fall far below the start."""
    from models.data import RecDataModule
    from models.features import WIDE_COLUMNS
    from models.module import RecommenderModule
    from models.network import TextEncoder, TextSource, TwoTowerWide

    torch.manual_seed(0)
    cfg = tiny_settings.training
    dm = RecDataModule(world.events.iloc[:400], world.catalog, 5, 0.2, 32)
    dm.setup()
    enc = TextEncoder(cfg.encoder_path, 32)
    net = TwoTowerWide(enc.dim, 32, len(dm.user_vocab), len(dm.item_vocab), len(WIDE_COLUMNS), True, 0.0)
    net.set_wide_stats(dm.train_wide)
    module = RecommenderModule(net, TextSource(enc, "frozen", dm.items.texts, dm.query_texts), dm.item_vocab_of_index)
    batch = next(iter(dm.train_dataloader()))
    opt = torch.optim.Adam(module.parameters(), lr=2e-2)
    losses = []
    for _ in range(120):
        opt.zero_grad()
        logits = module(*batch[:5])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch[5])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.05 < losses[0]


def test_training_is_deterministic_on_cpu(tiny_settings, world):
    a = _train(tiny_settings, world)
    b = _train(tiny_settings, world)
    pairs = world.events.tail(200)
    np.testing.assert_array_equal(a.model.score(pairs, world.events, world.catalog),
                                  b.model.score(pairs, world.events, world.catalog))
    assert a.history == b.history and len(a.history) == 2
    assert a.best_val_auc == max(h["val_auc"] for h in a.history)


def test_save_load_round_trip_without_pickle(tiny_settings, world, tmp_path):
    from models.recommender import Recommender

    out = _train(tiny_settings, world)
    pairs = world.events.tail(300).copy()
    pairs.loc[pairs.index[:20], "query"] = "robot galaxy"
    before = out.model.score(pairs, world.events, world.catalog)
    path = out.model.save(tmp_path / "model")
    names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert {"weights.safetensors", "config.json", "encoder/model.safetensors", "encoder/config.json"} <= names
    assert not any(n.endswith((".pt", ".pth", ".bin", ".pkl", ".ckpt")) for n in names)
    for p in path.rglob("*"):  # no pickle protocol header anywhere
        if p.is_file():
            assert p.read_bytes()[:2] != b"\x80\x04", p
    loaded = Recommender.load(path)
    np.testing.assert_array_equal(before, loaded.score(pairs, world.events, world.catalog))
    ids, vecs = loaded.item_vectors(world.catalog)
    assert len(ids) == len(world.catalog) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["mode"] == "frozen" and cfg["user_vocab"] and cfg["history_len"] == 20
    info = loaded.info
    assert info["parameters"]["heads"] > 0 and info["train_end"]


def test_scores_are_point_in_time(tiny_settings, world):
    """A row's score depends only on history strictly before its timestamp; no timestamp = all history."""
    out = _train(tiny_settings, world, max_epochs=1)
    ev = world.events
    cut = ev.timestamp.iloc[len(ev) // 2]
    rows = ev[ev.timestamp >= cut].head(100)[["user_id", "item_id", "timestamp"]].assign(timestamp=cut)
    past_only = out.model.score(rows, ev[ev.timestamp < cut], world.catalog)
    with_future = out.model.score(rows, ev, world.catalog)
    np.testing.assert_allclose(past_only, with_future, rtol=0, atol=1e-6)
    now = out.model.score(rows.drop(columns="timestamp"), ev, world.catalog)
    assert not np.allclose(now, with_future)  # fresh history changes the profile


def test_cold_users_and_new_items_are_scored(tiny_settings, world):
    out = _train(tiny_settings, world, max_epochs=1)
    cat = pd.concat([world.catalog, pd.DataFrame({
        "item_id": ["brand-new"], "title": ["The Quiet Robot Galaxy"], "description": ["a book about robots"],
        "category": ["science fiction"], "created_at": [pd.Timestamp("2026-02-01", tz="UTC")]})], ignore_index=True)
    pairs = pd.DataFrame({"user_id": ["nobody", "user-00001"], "item_id": ["brand-new", "brand-new"],
                          "query": ["robot", None]})
    s = out.model.score(pairs, world.events, cat)
    assert np.all(np.isfinite(s)) and s.shape == (2,)
    u = out.model.user_vectors(["nobody", "user-00001"], world.events, cat, queries=["robot", None])
    assert u.shape == (2, 32) and np.allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-5)


class _ModeProbe(Callback):
    def __init__(self):
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.append(pl_module.texts.encoder.model.training)


@pytest.mark.parametrize("mode", ["full", "top_layers=1"])
def test_fine_tuning_modes_switch_the_encoder_to_train_mode(tiny_settings, world, mode):
    """transformers loads in eval mode and Lightning keeps submodule modes: dropout must be on when fine-tuning."""
    from models.network import TextEncoder

    assert TextEncoder(tiny_settings.training.encoder_path).model.training is False  # the trap
    tiny_settings.training.mode = mode
    probe = _ModeProbe()
    before = TextEncoder(tiny_settings.training.encoder_path).model.state_dict()
    out = _train(tiny_settings, world, max_epochs=1, callbacks=[probe])
    assert probe.modes and all(probe.modes)
    after = out.model.encoder.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "fine-tuning left the encoder unchanged"
    if mode.startswith("top_layers"):
        assert all("layer.1." in k for k in changed)  # only the top layer moved
    assert out.model.encoder.model.training is False  # scoring runs in eval mode


def test_bad_inputs_fail_clearly(tiny_settings, world):
    from models.train import train_recommender

    with pytest.raises(ValueError, match="missing columns"):
        train_recommender(tiny_settings, world.events.drop(columns="label"), world.catalog, None)
    with pytest.raises(ValueError, match="no events"):
        train_recommender(tiny_settings, world.events.iloc[:0], world.catalog, None)
    tiny_settings.training.mode = "half"
    with pytest.raises(ValueError, match="unknown training mode"):
        train_recommender(tiny_settings, world.events, world.catalog, None)


# ----------------------------------------------------------------------------- label delay and refit


def test_chosen_epochs_is_the_first_best_epoch():
    from models.train import _chosen_epochs

    hist = [{"epoch": 0, "val_auc": 0.6}, {"epoch": 1, "val_auc": 0.7}, {"epoch": 2, "val_auc": 0.7},
            {"epoch": 3, "val_auc": 0.65}]
    assert _chosen_epochs(hist) == (2, 0.7)
    assert _chosen_epochs([{"epoch": 0, "train_loss": 0.5}]) == (1, None)
    assert _chosen_epochs([]) == (1, None)


def test_datamodule_features_use_the_lag(world):
    from models.data import RecDataModule
    from models.features import point_in_time_features

    ev = world.events.iloc[:1500]
    lag = pd.Timedelta(hours=2)
    dm = RecDataModule(ev, world.catalog, 5, 0.2, 64, lag=lag)
    dm.setup()
    want = point_in_time_features(dm.train_events, dm.events, world.catalog, dm.items.position, 5, dm.prior, lag=lag)
    np.testing.assert_array_equal(dm.tensors["train"]["wide"].numpy(), want.wide)
    np.testing.assert_array_equal(dm.tensors["train"]["hist"].numpy(), want.history_items)
    plain = RecDataModule(ev, world.catalog, 5, 0.2, 64)
    plain.setup()
    assert not np.array_equal(plain.tensors["train"]["wide"].numpy(), want.wide)
    full = RecDataModule(ev, world.catalog, 5, 0.0, 64, lag=lag)  # the refit: no validation part
    full.setup()
    assert full.n_train == len(ev) and full.n_val == 0 and full.val_dataloader() == []
    assert full.train_end == ev["timestamp"].max() and dm.train_end < full.train_end


def _late_world(world):
    """The world plus a user and an item that only appear in the validation part (the last hours)."""
    ev = world.events
    end = ev["timestamp"].max()
    items = ev["item_id"].drop_duplicates().head(6).tolist()
    late = pd.DataFrame({
        "event_id": [f"late-{k}" for k in range(12)],
        "user_id": ["late-user"] * 6 + ev["user_id"].drop_duplicates().head(6).tolist(),
        "item_id": items + ["late-item"] * 6, "label": [1, 0] * 6,
        "timestamp": [end - pd.Timedelta(minutes=30 * k) for k in range(12)], "query": None})
    events = pd.concat([ev, late], ignore_index=True)
    cat = pd.concat([world.catalog, pd.DataFrame({
        "item_id": ["late-item"], "title": ["Late Arrival"], "description": ["new this week"],
        "category": [world.catalog["category"].iloc[0]], "created_at": [end - pd.Timedelta(days=1)]})],
        ignore_index=True)
    return events, cat


class _EpochCounter(Callback):
    def __init__(self):
        self.per_fit: list[int] = []

    def on_train_start(self, trainer, pl_module):
        self.per_fit.append(0)

    def on_train_epoch_end(self, trainer, pl_module):
        self.per_fit[-1] += 1


def test_refit_trains_on_validation_events_for_the_chosen_epochs(tiny_settings, world, monkeypatch):
    from models.network import TextEncoder
    from models.train import train_recommender

    events, cat = _late_world(world)
    tiny_settings.training.max_epochs = 3
    tiny_settings.training.patience = 5
    from models import network

    monkeypatch.setattr(network, "_TEXT_CACHE", {})  # the per-process text cache starts empty (test order)
    calls = []
    encode = TextEncoder.encode
    monkeypatch.setattr(TextEncoder, "encode", lambda self, *a, **kw: calls.append(len(a[0])) or encode(self, *a, **kw))
    counter = _EpochCounter()
    out = train_recommender(tiny_settings, events, cat, world.users, callbacks=[counter])
    cfg = out.model.config
    # the epoch count comes from the selection run: its best epoch by val AUC
    aucs = [h["val_auc"] for h in out.history]
    assert len(out.history) == 3 and out.epochs_chosen == cfg["epochs_chosen"] == int(np.argmax(aucs)) + 1
    assert counter.per_fit == [3, out.epochs_chosen]
    assert out.best_val_auc == cfg["best_val_auc"] == max(aucs)
    # the refit knows what only the validation part holds and was fit up to the newest event
    assert cfg["refit_full"] is True and out.refit_full
    assert "late-user" in cfg["user_vocab"] and "late-item" in cfg["item_vocab"]
    newest = str(pd.to_datetime(events["timestamp"], utc=True).max())
    assert cfg["train_end"] == cfg["fit_end"] == newest and str(out.train_end) == newest
    assert cfg["n_train"] == out.n_train == len(events) and cfg["n_selection_train"] + cfg["n_val"] == len(events)
    assert cfg["val_start"] and cfg["val_end"] == newest
    assert cfg["prior"] == pytest.approx(float(events["label"].mean()))
    assert cfg["feature_lag_seconds"] == 600.0 and out.feature_lag == pd.Timedelta(minutes=10)
    assert {"fit", "refit", "refit_features"} <= set(out.timings)
    # frozen mode: one encoding pass (items + queries) shared by both fits, none when scoring the catalog
    n_calls = len(calls)
    assert n_calls == 2
    s = out.model.score(events.tail(50), events, cat)
    assert np.all(np.isfinite(s)) and len(calls) == n_calls


def test_without_refit_the_selection_model_is_returned(tiny_settings, world):
    from models.train import train_recommender

    events, cat = _late_world(world)
    tiny_settings.retrain.refit_full = False
    tiny_settings.feature_lag_seconds = 0
    out = train_recommender(tiny_settings, events, cat, world.users)
    cfg = out.model.config
    assert cfg["refit_full"] is False and "refit" not in out.timings
    assert "late-user" not in cfg["user_vocab"] and "late-item" not in cfg["item_vocab"]
    assert cfg["fit_end"] < cfg["train_end"] and cfg["n_train"] == cfg["n_selection_train"] < len(events)
    assert cfg["feature_lag_seconds"] == 0.0 and out.model.feature_lag == pd.Timedelta(0)
    assert cfg["epochs_chosen"] == int(np.argmax([h["val_auc"] for h in out.history])) + 1

