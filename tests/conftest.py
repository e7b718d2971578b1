"""Shared fixtures: a throwaway workspace per test, Prefect/HF kept offline and quiet."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """Settings bound to a fresh workspace under tmp_path; no RECLOOP_* leaks in from the shell."""
    for key in list(os.environ):
        if key.startswith("RECLOOP_"):
            monkeypatch.delenv(key)
    from recloop.settings import load_settings

    return load_settings(tmp_path / "ws").ensure_dirs()


@pytest.fixture
def small_world():
    """A small synthetic world (fast to generate) for room tests."""
    from recloop.datasets.synthetic import SyntheticConfig, generate

    return generate(SyntheticConfig(seed=3, n_users=120, n_items=80, n_days=14, drift_day=9, drift_items=16,
                                    bad_batch_day=2))


def permissive_toml(encoder, extra: str = "") -> str:
    """Workspace settings for flow tests: a tiny encoder, one epoch, and gates that let any working
    candidate through (these tests are about orchestration, not model quality)."""
    return (f'{extra}[training]\nencoder_path = "{encoder}"\nmax_epochs = 1\n'
            "[gates]\nmin_eval_events = 0\nmin_eval_positives = 0\nmin_eval_negatives = 0\n"
            "min_auc = 0.0\nmin_ndcg = 0.0\nbaseline_margin = -1.0\nmax_auc_drop = 1.0\ncatalog_eval_users = 100\n"
            "max_group_auc_gap = 1.0\nmax_gap_increase = 1.0\nmin_tail_exposure = 0.0\n")


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread, restoring the previous setting afterwards."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
