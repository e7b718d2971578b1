"""Promises of the model files (issue 14, "the reliability suite"): nothing is ever unpickled.

Proved elsewhere, not repeated here:

* same seed on CPU → identical metrics and scores:
  ``tests/test_models_train.py::test_training_is_deterministic_on_cpu`` (trains twice; equal
  per-epoch history, including ``val_auc``, and bit-equal scores);
* truncated weights → a clear error, champion untouched:
  ``tests/test_registry.py::test_corrupted_weights_give_a_clear_error_and_leave_the_champion``;
* two retrains never overlap: ``tests/test_flows_retrain.py::test_two_concurrent_retrains_never_overlap``;
* artifacts hold no pickle (file names and pickle headers):
  ``tests/test_models_train.py::test_save_load_round_trip_without_pickle`` and
  ``tests/test_registry.py::test_model_is_a_pyfunc_from_code_without_pickles``.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from models.testing import make_tiny_encoder

    return make_tiny_encoder(tmp_path_factory.mktemp("tiny") / "encoder")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_encoder):
    """A tiny recommender (towers + ranker + collaborative part), trained one epoch and saved; with rows to score."""
    from models.train import train_recommender
    from recloop.datasets.synthetic import SyntheticConfig, generate
    from recloop.settings import load_settings

    world = generate(SyntheticConfig(seed=5, n_users=100, n_items=40, n_days=8, drift_day=None, bad_batch_day=None))
    settings = load_settings(tmp_path_factory.mktemp("ws"))
    settings.training.encoder_path = str(tiny_encoder)
    settings.training.max_epochs = 1
    settings.training.embed_dim = 16
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = train_recommender(settings, world.events, world.catalog, world.users, refit_full=False)
        pairs = world.events.tail(50)
        scores = out.model.score(pairs, world.events, world.catalog)
        path = out.model.save(tmp_path_factory.mktemp("model") / "model")
    finally:
        torch.set_num_threads(saved)
    return path, world, pairs, scores


def _forbid_unpickling(monkeypatch):
    def unpickle(*_a, **_k):
        raise AssertionError("a load path unpickled something")

    monkeypatch.setattr(torch, "load", unpickle)
    monkeypatch.setattr(torch.serialization, "load", unpickle)
    monkeypatch.setattr(pickle, "load", unpickle)
    monkeypatch.setattr(pickle, "loads", unpickle)
    monkeypatch.setattr(pickle, "Unpickler", unpickle)
    real_np_load = np.load

    def np_load(*a, **k):
        if k.get("allow_pickle"):
            unpickle()
        return real_np_load(*a, **k)

    monkeypatch.setattr(np, "load", np_load)


def test_loading_a_saved_model_never_unpickles(saved_model, monkeypatch):
    from models.recommender import Recommender

    path, world, pairs, scores = saved_model
    assert {"weights.safetensors", "ranker.json", "collab.safetensors"} <= {p.name for p in path.iterdir()}
    _forbid_unpickling(monkeypatch)
    loaded = Recommender.load(path)
    np.testing.assert_array_equal(loaded.score(pairs, world.events, world.catalog), scores)


def test_an_encoder_saved_as_a_pickle_is_refused(tiny_encoder, tmp_path):
    """``pytorch_model.bin`` is a pickle: the encoder loads only safetensors (``use_safetensors=True``)."""
    from transformers import AutoModel

    from models.network import TextEncoder

    pickled = tmp_path / "encoder"
    pickled.mkdir()
    torch.save(AutoModel.from_pretrained(tiny_encoder).state_dict(), pickled / "pytorch_model.bin")  # a pickle
    for f in tiny_encoder.iterdir():  # config and tokenizer files, as a real folder would have them
        if f.name != "model.safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    assert (pickled / "pytorch_model.bin").is_file() and not (pickled / "model.safetensors").exists()
    with pytest.raises(OSError, match="safetensors"):
        TextEncoder(pickled)
