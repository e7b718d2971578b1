"""Slow tier: the real pretrained MiniLM, and DDP with 2 CPU processes over gloo."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import small_world_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_real_minilm_loads_and_embeds_meaningfully():
    from models.network import TextEncoder, default_encoder_path

    enc = TextEncoder(default_encoder_path())
    assert enc.dim == 384 and enc.n_layers == 6 and enc.model.training is False
    v = torch.nn.functional.normalize(enc.encode(["a jazz saxophone album", "bebop trumpet quartet",
                                                  "sourdough bread recipe"]), dim=-1)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2])  # pretrained weights, not random ones


def test_short_training_with_real_minilm(settings, small_world, tmp_path):
    from models.recommender import Recommender
    from models.train import train_recommender

    settings.training.max_epochs = 2
    out = train_recommender(settings, small_world.events, small_world.catalog, small_world.users)
    assert out.model.info["parameters"]["encoder"] > 20_000_000
    assert out.best_val_auc is not None and out.best_val_auc > 0.55
    pairs = small_world.events.tail(100)
    before = out.model.score(pairs, small_world.events, small_world.catalog)
    loaded = Recommender.load(out.model.save(tmp_path / "m"))
    np.testing.assert_array_equal(before, loaded.score(pairs, small_world.events, small_world.catalog))
    # search relevance (serving's /search retrieval): a query sharing no word with any item text
    ids, vecs = loaded.item_text_vectors(small_world.catalog)
    category = dict(zip(small_world.catalog["item_id"].astype(str), small_world.catalog["category"]))
    for query, want in (("outer space exploration", "science fiction"), ("a dinner you make at home", "cooking")):
        top = np.argsort(-(vecs @ loaded.query_vector(query)))[:5]
        assert [category[str(ids[j])] for j in top] == [want] * 5, query


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r})
    from recloop.datasets.synthetic import SyntheticConfig, generate
    from recloop.settings import load_settings
    from models.testing import make_tiny_encoder
    from models.train import train_recommender

    out_dir = sys.argv[1]
    world = generate(SyntheticConfig(**{config!r}))
    s = load_settings(os.path.join(out_dir, "ws"))
    t = s.training
    t.encoder_path = str(make_tiny_encoder(os.path.join(out_dir, "enc")))
    t.strategy, t.devices, t.accelerator, t.max_epochs, t.embed_dim = "ddp", 2, "cpu", 2, 16
    res = train_recommender(s, world.events, world.catalog, world.users)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    if rank == 0:
        res.model.save(os.path.join(out_dir, "model"))
        with open(os.path.join(out_dir, "result.json"), "w") as fh:
            json.dump({{"best_val_auc": res.best_val_auc, "epochs": len(res.history)}}, fh)
""")


def test_ddp_two_cpu_processes_gloo(tmp_path):
    script = tmp_path / "ddp_train.py"
    config = dataclasses.asdict(small_world_config(bad_batch_day=3))  # the small world with a corrupted day 3
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), config=config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MASTER_PORT": "29533",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["epochs"] == 2 and result["best_val_auc"] is not None
    assert (tmp_path / "model" / "weights.safetensors").is_file()
