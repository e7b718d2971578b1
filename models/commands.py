"""``recloop train``: one-off training on the store window, printed against the baselines."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from recloop.cli_common import JsonOpt, WorkspaceOpt, emit, fail, settings_for, table

TestFractionOpt = typer.Option(0.2, help="Last part of the window (by time) held out as the test set")
ModeOpt = typer.Option(None, help="Override settings.training.mode: frozen | top_layers=k | full")
MaxEpochsOpt = typer.Option(None, help="Override settings.training.max_epochs")
SaveOpt = typer.Option(None, help="Also save the trained model to this folder")


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        workspace: Path = WorkspaceOpt,
        test_fraction: float = TestFractionOpt,
        mode: str = ModeOpt,
        max_epochs: int = MaxEpochsOpt,
        save: Path = SaveOpt,
        as_json: bool = JsonOpt,
    ):
        """Train the BERT recommender on the store (earlier part) and judge it on the later part against every
        baseline (statistics-only LR, fresh popularity, popularity, tuned MF) with the promotion gates."""
        from models.comparison import train_and_compare
        from recloop.store import FeedbackStore

        s = settings_for(workspace)
        if mode:
            s.training.mode = mode
        if max_epochs:
            s.training.max_epochs = max_epochs
        if not 0.0 < test_fraction < 1.0:
            fail("--test-fraction must be between 0 and 1")
        if not s.store_dir.exists():
            fail(f"no store at {s.store_dir}: run `recloop generate` (or import-movielens) and ingest first")
        store = FeedbackStore.from_settings(s)
        events = store.read()
        if len(events) < 50:
            fail(f"the store holds {len(events)} events; ingest some batches first (`recloop ingest`)")
        try:
            out = train_and_compare(s, events, store.catalog(), store.users(), test_fraction)
        except ValueError as exc:
            fail(str(exc))
        trained = out.pop("trained")
        decision = out.pop("decision")
        out["gate_decision"] = decision.to_dict()
        out["gate_report"] = decision.to_markdown()
        if save:
            out["saved_to"] = str(trained.model.save(save))
        out["model"] = trained.model.info
        emit(out, as_json, _render)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def _render(doc: dict) -> None:
    m = doc["metrics"]
    k = next(iter(m.values()))["k"]
    cols = ["model", "AUC", "cold-item AUC", f"NDCG@{k}", f"Recall@{k}", f"tail exposure@{k}", "group AUC gap"]
    rows = [[name, *(_fmt(r[c]) for c in ("auc", "cold_item_auc", "ndcg_at_k", "recall_at_k", "tail_exposure",
                                          "max_group_auc_gap"))] for name, r in m.items()]
    first = next(iter(m.values()))
    table(f"test: {doc['n_test']} events ({first['n_cold_events']} on cold items), "
          f"{doc['test_window'][0]} .. {doc['test_window'][1]}; trained on {doc['n_train']}; features lag "
          f"{doc['feature_lag_seconds']:g} s; NDCG/recall/tail over the whole catalog", cols, rows)
    gd = doc["gate_decision"]
    table(f"gates (no champion): {'PROMOTE' if gd['promote'] else 'REJECT'}", ["rule", "verdict", "detail"],
          [[r["name"], "pass" if r["passed"] else "FAIL", r["detail"]] for r in gd["rules"]])
    sec = doc["seconds"]
    table("training", ["what", "value"], [
        ["mode", doc["model"]["mode"]], ["encoder", doc["model"]["encoder"]],
        ["best val AUC", _fmt(doc["best_val_auc"])], ["epochs", len(doc["history"])],
        ["train seconds", f"{sec['train']:.1f}"], ["evaluate seconds", f"{sec['evaluate_model']:.1f}"],
        ["baselines seconds", f"{sec['baselines']:.1f}"],
        *([["saved to", doc["saved_to"]]] if doc.get("saved_to") else []),
    ])
