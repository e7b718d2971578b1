"""Test helpers other rooms use: a tiny random BERT encoder saved like a real one.

``make_tiny_encoder(dir)`` writes a randomly initialised, very small ``BertConfig``
model (safetensors) plus the MiniLM tokenizer files, so any test can train a
``Recommender`` in seconds without the 90 MB pretrained weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from models.network import minilm_path

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_tiny_encoder(directory: str | Path, hidden: int = 32, layers: int = 2, heads: int = 2,
                      intermediate: int = 64, seed: int = 0) -> Path:
    """Save a tiny random BERT (hidden 32, 2 layers, 2 heads) + the MiniLM tokenizer into ``directory``.

    Idempotent: a directory that already holds a tiny encoder is returned as is.
    """
    import torch
    from transformers import BertConfig, BertModel

    out = Path(directory)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and (out / "vocab.txt").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    src = minilm_path()
    vocab_size = sum(1 for _ in (src / "vocab.txt").open(encoding="utf-8"))
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=128)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return out
