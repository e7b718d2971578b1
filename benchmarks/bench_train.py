"""Benchmark: train + evaluate the BERT recommender on synthetic data, temporal split.

Reports quality (test AUC / cold-item AUC / NDCG@10 vs popularity and MF), wall time,
training examples/s, and the encoder's achieved FLOP/s divided by a matmul peak
measured in the same run.

    # CPU default (frozen real MiniLM), the default synthetic world (~38k events) and ~100k events
    .venv/bin/python -m benchmarks.bench_train --preset default
    .venv/bin/python -m benchmarks.bench_train --preset 100k
    # GPU (run on a lent H200 on 2026-11-29: benchmarks/RESULTS.md, "GPU: training on one NVIDIA H200")
    .venv/bin/python -m benchmarks.bench_train --preset 100k --mode full --precision bf16-mixed --accelerator gpu
    # MovieLens-100k: benchmarks/bench_real.py --train (fetches it from RecBole's wheel into a cache)

FLOP accounting: transformer layers only (embeddings are lookups), forward = 2 x
(4h^2 + 2hi) per token per layer + attention scores; a training step (full /
top_layers) costs 3x forward. Frozen mode runs the encoder once (no grad) over every
distinct text, so its FLOP/s is the encode pass's. The peak is a dense fp32 (CPU) or
bf16 (GPU) matmul measured right before training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PRESETS = {
    "default": {},  # SyntheticConfig defaults: 500 users, 28 days, ~38k events
    "100k": {"n_users": 1500, "n_days": 28},
    "small": {"n_users": 120, "n_items": 80, "n_days": 14, "drift_day": 9, "drift_items": 16},
}


def matmul_peak(device: str, dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n matmul on ``device`` (median-free: the best is the peak)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        (a @ b).sum().item()
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def run_once(args) -> dict:
    import torch

    from models import train as train_mod
    from models.comparison import train_and_compare
    from models.network import TextSource
    from recloop.datasets.synthetic import SyntheticConfig, generate
    from recloop.settings import load_settings

    data = generate(SyntheticConfig(seed=args.seed, **PRESETS[args.preset]))
    settings = load_settings(tempfile.mkdtemp(prefix="bench-train-"))
    t = settings.training
    t.mode, t.precision, t.accelerator = args.mode, args.precision, args.accelerator
    if args.encoder_path:
        t.encoder_path = args.encoder_path
    if args.max_epochs:
        t.max_epochs = args.max_epochs
    if args.batch_size:
        t.batch_size = args.batch_size
    gpu = torch.cuda.is_available() and args.accelerator in ("gpu", "cuda", "auto")
    peak = matmul_peak("cuda" if gpu else "cpu", torch.bfloat16 if gpu and "bf16" in args.precision else torch.float32)

    sources: list[TextSource] = []
    original = train_mod.TextSource

    class CountingSource(original):  # keep a handle on the text source to read its token counters
        def __init__(self, encoder, mode, item_texts, query_texts, *a, **kw):
            super().__init__(encoder, mode, item_texts, query_texts, *a, **kw)
            self.bench_texts = list(item_texts) + list(query_texts)
            sources.append(self)

    train_mod.TextSource = CountingSource
    try:
        t0 = time.perf_counter()
        out = train_and_compare(settings, data.events, data.catalog, data.users, args.test_fraction)
        wall = time.perf_counter() - t0
    finally:
        train_mod.TextSource = original
    trained = out["trained"]
    enc = trained.model.encoder
    sec = out["seconds"]
    epochs = len(trained.history)
    cfg = trained.model.config
    # examples seen: the selection run (its train part x the epochs it ran) + the refit (the whole window x
    # the chosen epochs), over the time of both fits (``trained.n_train`` alone is the refit's row count)
    n_sel = int(cfg.get("n_selection_train") or trained.n_train)
    examples = n_sel * epochs + (trained.n_train * trained.epochs_chosen if trained.refit_full else 0)
    fit_s = sec["train.fit"] + (sec.get("train.refit", 0.0) if trained.refit_full else 0.0)
    # encoder FLOPs
    src = sources[0]
    if src.kind == "frozen":
        texts = src.bench_texts
        _, mask = enc.tokenize(texts) if texts else (None, None)
        tokens = int(mask.sum()) if mask is not None else 0
        seq = float(mask.sum(1).float().mean()) if mask is not None else 0.0
        flops = enc.layer_flops_per_token(int(seq)) * tokens
        enc_flops_s = flops / max(sec["train.encode"], 1e-9)
        enc_note = f"encode pass over {len(texts)} distinct texts ({tokens} tokens) in {sec['train.encode']:.1f}s"
    else:
        frac = src.k / enc.n_layers if src.kind == "top_layers" else 1.0
        flops = 3 * enc.layer_flops_per_token(32) * frac * src.padded_tokens_encoded
        enc_flops_s = flops / max(sec["train.fit"], 1e-9)
        enc_note = f"{src.tokens_encoded} real / {src.padded_tokens_encoded} padded tokens fine-tuned"
    m = out["metrics"]
    return {
        "preset": args.preset, "events": len(data.events), "n_train": out["n_train"], "n_test": out["n_test"],
        "mode": args.mode, "precision": args.precision, "device": "cuda" if gpu else "cpu",
        "wall_train_eval_s": wall, "train_s": sec["train"], "phases": {k: v for k, v in sec.items()},
        "epochs": epochs, "examples_per_s": examples / max(fit_s, 1e-9),
        "encoder_flops_per_s": enc_flops_s, "matmul_peak_flops_per_s": peak,
        "encoder_utilisation": enc_flops_s / peak, "encoder_note": enc_note,
        "best_val_auc": trained.best_val_auc,
        "test": {name: {k: r[k] for k in ("auc", "cold_item_auc", "ndcg_at_k", "recall_at_k")} for name, r in m.items()},
        "n_cold_test_events": next(iter(m.values()))["n_cold_events"],
        "decision": _decision_summary(out["decision"]), "ranker": trained.ranker,
        "cold_start_order": trained.model.config.get("cold_start_order"),
    }


def _decision_summary(decision) -> dict:
    """The gates' verdict in plain types: promote, each rule, the CI of AUC(model) - AUC(baseline)."""
    return {"promote": bool(decision.promote),
            "rules": [{"name": r.name, "passed": bool(r.passed), "detail": r.detail} for r in decision.rules],
            "baseline_cis": {k: {"estimate": c.estimate, "low": c.low, "high": c.high}
                             for k, c in decision.baseline_cis.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--mode", default="frozen")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--encoder-path", default=None)
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    runs = [run_once(args) for _ in range(args.repeats)]
    med = lambda key: statistics.median(r[key] for r in runs)
    summary = {"runs": runs, "median": {k: med(k) for k in ("wall_train_eval_s", "train_s", "examples_per_s",
                                                           "encoder_flops_per_s", "encoder_utilisation")},
               "machine": f"{platform.machine()} {os.cpu_count()} CPUs, python {sys.version.split()[0]}"}
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
        return 0
    r = runs[-1]
    print(f"preset={r['preset']} events={r['events']} train={r['n_train']} test={r['n_test']} "
          f"(cold-item test events {r['n_cold_test_events']}) mode={r['mode']} precision={r['precision']} "
          f"device={r['device']} repeats={args.repeats}")
    for name, row in r["test"].items():
        print(f"  {name:22s} AUC {row['auc']:.4f}  cold-item AUC {row['cold_item_auc']:.4f}  "
              f"NDCG@10 {row['ndcg_at_k']:.4f}  Recall@10 {row['recall_at_k']:.4f}")
    dec = r["decision"]
    print(f"  gates: promote={dec['promote']}; failed: "
          + ("; ".join(f"{x['name']} ({x['detail']})" for x in dec["rules"] if not x["passed"]) or "none"))
    for name, ci in dec["baseline_cis"].items():
        print(f"    AUC(model) - AUC({name}) = {ci['estimate']:+.4f}  95% CI [{ci['low']:+.4f}, {ci['high']:+.4f}]")
    if r.get("ranker"):
        rk = r["ranker"]
        print(f"  ranker: {rk['kind']} fusion on {rk['n_rows']} out-of-sample rows ({rk.get('rounds')} rounds), "
              f"blended with the towers on {rk.get('blend_rows')} validation rows; validation AUC towers "
              f"{rk.get('val_auc_towers', float('nan')):.4f}, fusion {rk.get('val_auc_fusion', float('nan')):.4f}, "
              f"blend {rk.get('val_auc_blend', float('nan')):.4f}")
        if rk.get("cold_start"):
            print(f"  cold-start order: {r.get('cold_start_order')} ({rk['cold_start'].get('reason')})")
    md = summary["median"]
    print("  per run: wall " + ", ".join(f"{x['wall_train_eval_s']:.1f}s" for x in runs)
          + "; examples/s " + ", ".join(f"{x['examples_per_s']:.0f}" for x in runs))
    print(f"  median wall train+eval {md['wall_train_eval_s']:.1f}s (train {md['train_s']:.1f}s; phases "
          + ", ".join(f"{k} {v:.1f}s" for k, v in r["phases"].items()) + " in the last run)")
    print(f"  {md['examples_per_s']:.0f} training examples/s (selection {r['epochs']} epochs + refit); best val AUC "
          f"{r['best_val_auc']:.4f}")
    print(f"  encoder {md['encoder_flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * md['encoder_utilisation']:.1f}% of a "
          f"{r['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s matmul peak ({r['encoder_note']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
