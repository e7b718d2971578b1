"""Replay outputs: every per-batch number as JSON, a markdown summary table, a PNG plot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from recloop.store import atomic_write_bytes, atomic_write_json


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None


def failed(record: dict) -> bool:
    """A retrain that did not run to a decision (the record carries ``retrain_error``): not a rejection."""
    return bool(record.get("retrained") and record.get("retrain_error"))


def rejected(record: dict) -> bool:
    """A retrain that produced a candidate the gates turned down."""
    return bool(record.get("retrained") and not record.get("promoted") and not record.get("retrain_error"))


def summarize(policy: str, records: list[dict], drift_at: str | None = None) -> dict:
    """One row of the summary table for a policy.

    ``rejected`` counts candidates the gates turned down; ``failed`` counts retrains that raised
    (``retrain_error``: e.g. too few events stored), whose time is not training time.
    """
    scored = [r for r in records if r.get("auc") is not None]
    aucs = [r["auc"] for r in scored]
    third = scored[len(scored) - math.ceil(len(scored) / 3):] if scored else []  # the newest third, rounded up
    after = [r["auc"] for r in scored if drift_at and r["batch_start"] >= drift_at]
    return {
        "policy": policy,
        "batches": len(records),
        "scored_batches": len(scored),
        "mean_auc": _mean(aucs),
        "mean_auc_after_drift": _mean(after) if drift_at else None,
        "auc_last_third": _mean([r["auc"] for r in third]),
        "worst_batch_auc": min(aucs) if aucs else None,
        "mean_ndcg_at_10": _mean([r.get("ndcg_at_k") for r in scored]),
        "mean_cold_item_auc": _mean([r.get("cold_item_auc") for r in scored]),
        "retrains": sum(1 for r in records if r.get("retrained")),
        "promotions": sum(1 for r in records if r.get("promoted")),
        "rejected": sum(1 for r in records if rejected(r)),
        "failed": sum(1 for r in records if failed(r)),
        "train_seconds": round(sum(r.get("train_seconds") or 0.0 for r in records if not failed(r)), 1),
        **_strongest_baseline(scored),
    }


def _strongest_baseline(scored: list[dict]) -> dict:
    """The best baseline's mean AUC over exactly the batches the policy's champion was scored on."""
    means = {name: _mean([(r.get("baselines") or {}).get(name) for r in scored])
             for name in sorted({n for r in scored for n in (r.get("baselines") or {})})}
    means = {n: m for n, m in means.items() if m is not None}
    if not means:
        return {"best_baseline": None, "best_baseline_auc": None}
    best = max(means, key=means.get)
    return {"best_baseline": best, "best_baseline_auc": means[best]}


def baseline_rows(results: dict[str, list[dict]], drift_at: str | None = None) -> list[dict]:
    """Each baseline over every batch it scored (fitted on the stored history before the batch, same lag)."""
    first = next(iter(results.values()), [])
    rows = []
    for name in sorted({n for r in first for n in (r.get("baselines") or {})}):
        vals = [(r["batch_start"], r["baselines"].get(name)) for r in first if r.get("baselines")]
        vals = [(t, v) for t, v in vals if v is not None]
        third = vals[len(vals) - math.ceil(len(vals) / 3):] if vals else []
        rows.append({"baseline": name, "batches": len(vals), "mean_auc": _mean([v for _, v in vals]),
                     "mean_auc_after_drift": _mean([v for t, v in vals if drift_at and t >= drift_at])
                     if drift_at else None, "auc_last_third": _mean([v for _, v in third])})
    return rows


def failures(results: dict[str, list[dict]]) -> list[dict]:
    """Every failed retrain: policy, batch, reason for retraining and the error."""
    return [{"policy": p, "batch": r.get("batch"), "batch_start": r.get("batch_start"), "reason": r.get("reason"),
             "error": r.get("retrain_error")} for p, recs in results.items() for r in recs if failed(r)]


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def to_markdown(rows: list[dict]) -> str:
    cols = ["policy", "mean_auc", "mean_auc_after_drift", "auc_last_third", "worst_batch_auc", "mean_ndcg_at_10",
            "retrains", "promotions", "rejected", "failed", "train_seconds", "best_baseline", "best_baseline_auc"]
    head = ["policy", "mean AUC", "mean AUC after drift", "AUC last third", "worst batch AUC", "mean NDCG@10",
            "retrains", "promotions", "rejected", "failed", "train s", "best baseline", "its AUC, same batches"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], path: Path, drift_at: str | None = None, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    for policy, records in results.items():
        xs = [i for i, r in enumerate(records) if r.get("auc") is not None]
        ys = [records[i]["auc"] for i in xs]
        (line,) = ax.plot(xs, ys, marker=".", label=policy)
        promos = [i for i, r in enumerate(records) if r.get("promoted")]
        rejects = [i for i, r in enumerate(records) if rejected(r)]
        fails = [i for i, r in enumerate(records) if failed(r)]
        for i in promos:
            ax.axvline(i + 0.5, color=line.get_color(), alpha=0.25, lw=1)
        floor = min(ys or [0.5])
        ax.scatter([i + 0.5 for i in promos], [floor - 0.02] * len(promos), marker="^", color=line.get_color(), s=30)
        ax.scatter([i + 0.5 for i in rejects], [floor - 0.035] * len(rejects), marker="x",
                   color=line.get_color(), s=25)
        ax.scatter([i + 0.5 for i in fails], [floor - 0.05] * len(fails), marker="$!$", color="red", s=40)
    if drift_at is not None:
        first = next(iter(results.values()), [])
        idx = next((i for i, r in enumerate(first) if r["batch_start"] >= drift_at), None)
        if idx is not None:
            ax.axvline(idx - 0.5, color="black", ls="--", lw=1)
            ax.text(idx - 0.4, ax.get_ylim()[1], " drift", va="top", fontsize=8)
    ax.set_xlabel("batch (time order); scored by the champion before ingest")
    ax.set_ylabel("AUC")
    ax.set_title(title or "replay: AUC per batch (▲ promotion, × rejected candidate, ! failed retrain)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_reports(out_dir: Path, results: dict[str, list[dict]], meta: dict) -> dict:
    drift_at = meta.get("drift_at")
    rows = [summarize(p, recs, drift_at) for p, recs in results.items()]
    fails = failures(results)
    atomic_write_json({"meta": meta, "summary": rows, "baselines": baseline_rows(results, drift_at),
                       "failures": fails, "batches": results},
                      out_dir / "replay.json")
    bases = baseline_rows(results, drift_at)
    md = f"# Replay: {meta.get('source')}\n\n" + to_markdown(rows)
    if bases:
        md += ("\n## Baselines (every batch, fitted on the history before it)\n\n"
               "| baseline | batches | mean AUC | mean AUC after drift | AUC last third |\n|---|---|---|---|---|\n"
               + "".join(f"| {b['baseline']} | {b['batches']} | {_cell(b['mean_auc'])} | "
                         f"{_cell(b['mean_auc_after_drift'])} | {_cell(b['auc_last_third'])} |\n" for b in bases))
    if fails:
        md += "\n## Failed retrains\n\n" + "".join(
            f"- {f['policy']}, batch {f['batch']} ({f['batch_start']}, {f['reason']}): {f['error']}\n" for f in fails)
    atomic_write_bytes(out_dir / "summary.md", md.encode())
    png = plot(results, out_dir / "auc.png", drift_at, f"replay on {meta.get('source')}: AUC per batch")
    return {"summary": rows, "failures": fails, "json": str(out_dir / "replay.json"),
            "markdown": str(out_dir / "summary.md"), "plot": str(png)}
