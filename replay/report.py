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


def summarize(policy: str, records: list[dict], drift_at: str | None = None, scores_root: Path | None = None) -> dict:
    """One row of the summary table for a policy.

    ``rejected`` counts candidates the gates turned down; ``failed`` counts retrains that raised
    (``retrain_error``: e.g. too few events stored), whose time is not training time.
    ``scores_root``: the replay's root, whose per-event scores give the pooled AUC (:func:`pooled_auc`).
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
        "auc_last_20pct_events": _last_events_auc(records, 0.2),
        "pooled_auc_last_20pct_events": None if scores_root is None else pooled_auc(scores_root, policy, records, 0.2),
        "disk_mb_max": max((r["disk_mb"] for r in records if r.get("disk_mb") is not None), default=None),
        **_strongest_baseline(scored),
    }


def newest_batches(records: list[dict], share: float) -> list[dict]:
    """The newest records whose batches hold at least ``share`` of the log's events (newest first)."""
    sizes = [int(r.get("n_rows") or 0) for r in records]
    need, got, out = share * sum(sizes), 0, []
    for r, n in zip(reversed(records), reversed(sizes)):
        if got >= need or not need:
            break
        out.append(r)
        got += n
    return out


def _last_events_auc(records: list[dict], share: float) -> float | None:
    """Event-weighted mean batch AUC over the batches that hold the newest ``share`` of the log's events
    (a batch without a champion counts as AUC 0.5: nothing better than chance was served)."""
    newest = newest_batches(records, share)
    got = sum(int(r.get("n_rows") or 0) for r in newest)
    num = sum(int(r.get("n_rows") or 0) * (r["auc"] if r.get("auc") is not None else 0.5) for r in newest)
    return num / got if got else None


def batch_file(i: int) -> str:
    """The file name of batch ``i``'s per-event scores (a policy's ``scores/``, the root's ``baseline_scores/``)."""
    return f"batch-{int(i):04d}.parquet"


def pooled_auc(root: Path, policy: str, records: list[dict], share: float) -> float | None:
    """One AUC over every scored event of the batches that hold the newest ``share`` of the events (the
    batches of :func:`newest_batches`; each event scored by the model served when it arrived), from the
    per-event scores the replay keeps under ``root``. Unlike the mean of per-batch AUCs it also ranks events
    of different weeks against each other, as a holdout benchmark over the same events does.

    An event no champion scored counts as 0.5 (a tie with all others; its label from the baselines' file); a
    batch nothing scored (no history yet, one class) is left out. ``None`` when a score file is missing (a
    replay from before the scores were kept)."""
    import pandas as pd

    from models.evaluate import auc

    labels, scores = [], []
    for r in newest_batches(records, share):
        if r.get("auc") is not None:
            path = root / policy / "scores" / batch_file(r["batch"])
        elif r.get("baselines"):
            path = root / "baseline_scores" / batch_file(r["batch"])
        else:
            continue
        if not path.exists():
            return None
        frame = pd.read_parquet(path)
        labels.append(frame["label"].to_numpy())
        scores.append(frame["score"].to_numpy(dtype=float) if r.get("auc") is not None else np.full(len(frame), 0.5))
    value = auc(np.concatenate(labels), np.concatenate(scores)) if labels else float("nan")
    return None if math.isnan(value) else value


def pooled_baseline_aucs(root: Path, records: list[dict], share: float) -> dict[str, float | None]:
    """:func:`pooled_auc` of every baseline over the same batches (``{}`` when a score file is missing); a
    baseline that could not score one of them has none."""
    import pandas as pd

    from models.evaluate import auc

    paths = [root / "baseline_scores" / batch_file(r["batch"]) for r in newest_batches(records, share)
             if r.get("baselines")]
    if not paths or not all(p.exists() for p in paths):
        return {}
    frames = [pd.read_parquet(p) for p in paths]
    names = set.intersection(*(set(f.columns) - {"label"} for f in frames))
    y = np.concatenate([f["label"].to_numpy() for f in frames])
    out = {n: auc(y, np.concatenate([f[n].to_numpy(dtype=float) for f in frames])) for n in sorted(names)}
    return {n: None if math.isnan(v) else v for n, v in out.items()}


def _strongest_baseline(scored: list[dict]) -> dict:
    """The best baseline's mean AUC over exactly the batches the policy's champion was scored on."""
    means = {name: _mean([(r.get("baselines") or {}).get(name) for r in scored])
             for name in sorted({n for r in scored for n in (r.get("baselines") or {})})}
    means = {n: m for n, m in means.items() if m is not None}
    if not means:
        return {"best_baseline": None, "best_baseline_auc": None}
    best = max(means, key=means.get)
    return {"best_baseline": best, "best_baseline_auc": means[best]}


def baseline_rows(results: dict[str, list[dict]], drift_at: str | None = None,
                  scores_root: Path | None = None) -> list[dict]:
    """Each baseline over every batch it scored (fitted on the stored history before the batch, same lag)."""
    first = next(iter(results.values()), [])
    pooled = pooled_baseline_aucs(scores_root, first, 0.2) if scores_root is not None else {}
    rows = []
    for name in sorted({n for r in first for n in (r.get("baselines") or {})}):
        vals = [(r["batch_start"], r["baselines"].get(name)) for r in first if r.get("baselines")]
        vals = [(t, v) for t, v in vals if v is not None]
        third = vals[len(vals) - math.ceil(len(vals) / 3):] if vals else []
        rows.append({"baseline": name, "batches": len(vals), "mean_auc": _mean([v for _, v in vals]),
                     "mean_auc_after_drift": _mean([v for t, v in vals if drift_at and t >= drift_at])
                     if drift_at else None, "auc_last_third": _mean([v for _, v in third]),
                     "pooled_auc_last_20pct_events": pooled.get(name)})
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
    cols = ["policy", "mean_auc", "mean_auc_after_drift", "auc_last_third", "auc_last_20pct_events",
            "pooled_auc_last_20pct_events", "worst_batch_auc",
            "mean_ndcg_at_10", "retrains", "promotions", "rejected", "failed", "train_seconds", "disk_mb_max",
            "best_baseline", "best_baseline_auc"]
    head = ["policy", "mean AUC", "mean AUC after drift", "AUC last third", "AUC newest 20 % of events",
            "pooled AUC newest 20 %",
            "worst batch AUC", "mean NDCG@10", "retrains", "promotions", "rejected", "failed", "train s",
            "disk MB (max)", "best baseline", "its AUC, same batches"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


MARKERS = {"promotion": ("^", 30), "rejected candidate": ("x", 25), "failed retrain": ("$!$", 40)}


def _batch_times(records: list[dict]):
    """Each batch's start and the moment after it (the next batch's start; the last: start + the usual step),
    as naive UTC datetimes: a retrain's marker sits after the batch it followed."""
    import pandas as pd

    starts = pd.to_datetime([r["batch_start"] for r in records], utc=True).tz_convert(None)
    if len(starts) < 2:
        return starts, starts + pd.Timedelta(days=1)
    step = pd.Series(starts).diff().median()
    return starts, starts[1:].append(starts[-1:] + step)


def draw(results: dict[str, list[dict]], drift_at: str | None = None, title: str = ""):
    """The replay figure: each policy's AUC per batch over the batches' dates; its promotions (▲),
    rejected candidates (×) and failed retrains (!) under the lines, every marker named in the legend
    beside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    import pandas as pd
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(11, 4.5), dpi=110)
    for policy, records in results.items():
        starts, after = _batch_times(records)
        scored = [i for i, r in enumerate(records) if r.get("auc") is not None]
        ys = [records[i]["auc"] for i in scored]
        (line,) = ax.plot(starts[scored], ys, marker=".", label=policy)
        floor = min(ys or [0.5])
        for k, (kind, keep) in enumerate([("promotion", lambda r: r.get("promoted")),
                                          ("rejected candidate", rejected), ("failed retrain", failed)]):
            at = [i for i, r in enumerate(records) if keep(r)]
            marker, size = MARKERS[kind]
            ax.scatter(after[at], [floor - 0.02 - 0.015 * k] * len(at), marker=marker, s=size,
                       color="red" if kind == "failed retrain" else line.get_color())
            if kind == "promotion":
                for x in after[at]:
                    ax.axvline(x, color=line.get_color(), alpha=0.25, lw=1)
    if drift_at is not None:
        when = pd.Timestamp(drift_at)
        when = when.tz_convert("UTC").tz_localize(None) if when.tzinfo else when
        ax.axvline(when, color="black", ls="--", lw=1)
        ax.text(when, ax.get_ylim()[1], " drift", va="top", fontsize=8)
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.set_xlabel("batch start (UTC); each batch scored by the champion of before it (features: the store, lagged)")
    ax.set_ylabel("AUC")
    ax.set_title(title or "replay: AUC per batch")
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], ls="", marker=m, color="red" if kind == "failed retrain" else "dimgray",
                       label=kind) for kind, (m, _) in MARKERS.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot(results: dict[str, list[dict]], path: Path, drift_at: str | None = None, title: str = "") -> Path:
    """:func:`draw`, written atomically to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = draw(results, drift_at, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_reports(out_dir: Path, results: dict[str, list[dict]], meta: dict, scores_root: Path | None = None) -> dict:
    """replay.json, summary.md and auc.png under ``out_dir``; ``scores_root``: the replay's root, whose kept
    per-event scores add the pooled AUCs."""
    drift_at = meta.get("drift_at")
    rows = [summarize(p, recs, drift_at, scores_root) for p, recs in results.items()]
    fails = failures(results)
    bases = baseline_rows(results, drift_at, scores_root)
    atomic_write_json({"meta": meta, "summary": rows, "baselines": bases, "failures": fails, "batches": results},
                      out_dir / "replay.json")
    md = f"# Replay: {meta.get('source')}\n\n" + to_markdown(rows)
    if bases:
        md += ("\n## Baselines (every batch, fitted on the history before it)\n\n"
               "| baseline | batches | mean AUC | mean AUC after drift | AUC last third | pooled AUC newest 20 % |\n"
               "|---|---|---|---|---|---|\n"
               + "".join(f"| {b['baseline']} | {b['batches']} | {_cell(b['mean_auc'])} | "
                         f"{_cell(b['mean_auc_after_drift'])} | {_cell(b['auc_last_third'])} | "
                         f"{_cell(b['pooled_auc_last_20pct_events'])} |\n" for b in bases))
    if fails:
        md += "\n## Failed retrains\n\n" + "".join(
            f"- {f['policy']}, batch {f['batch']} ({f['batch_start']}, {f['reason']}): {f['error']}\n" for f in fails)
    atomic_write_bytes(out_dir / "summary.md", md.encode())
    png = plot(results, out_dir / "auc.png", drift_at, f"replay on {meta.get('source')}: AUC per batch")
    return {"summary": rows, "failures": fails, "json": str(out_dir / "replay.json"),
            "markdown": str(out_dir / "summary.md"), "plot": str(png)}
