"""A finished replay's champions against a baseline on the newest events, pooled, with a user-bootstrap CI.

    .venv/bin/python benchmarks/replay_pooled.py WORKDIR [--baseline statistics-lr] [--share 0.2]

Reads what ``recloop replay -w WORKDIR`` kept: each policy's per-event scores (``<policy>/scores/``), the
baselines' (``baseline_scores/``) and the per-batch records (``reports/replay/replay.json``). Over the batches
that hold the newest ``share`` of the events (as the replay's summary), one AUC per policy and for the baseline
on the same events, and the difference with a 95 % paired bootstrap interval that resamples users (as the
promotion gate does; users from the policy's store). Also: in how many batches the champion beat the baseline.
Then every pair of policies that served all of those batches, on the same events: AUC(a) - AUC(b) with the same
paired user bootstrap (e.g. "drift - never": what retraining on drift buys over a model never retrained).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _scores(root: Path, policy: str, batches: list[dict]):
    """(the policy's per-event scores over ``batches``, the user of each event, from the policy's store)."""
    import pandas as pd

    from recloop.settings import load_settings
    from recloop.store import FeedbackStore
    from replay.report import batch_file

    own = pd.concat([pd.read_parquet(root / policy / "scores" / batch_file(r["batch"])) for r in batches],
                    ignore_index=True)
    stored = FeedbackStore.from_settings(load_settings(root / policy)).read(columns=["event_id", "user_id"])
    users = own["event_id"].map(dict(zip(stored["event_id"], stored["user_id"]))).astype(str).to_numpy()
    return own, users


def _batches(root: Path) -> dict[str, list[dict]]:
    return json.loads((root / "reports" / "replay" / "replay.json").read_text())["batches"]


def compare(root: Path, baseline: str = "statistics-lr", share: float = 0.2) -> dict:
    import pandas as pd

    from models.bootstrap import paired_bootstrap_auc
    from replay.report import batch_file, newest_batches

    out = {}
    for policy, records in _batches(root).items():
        scored = [r for r in newest_batches(records, share) if r.get("auc") is not None]
        if not scored:
            out[policy] = None  # no champion served these batches
            continue
        own, users = _scores(root, policy, scored)
        base = pd.concat([pd.read_parquet(root / "baseline_scores" / batch_file(r["batch"])) for r in scored],
                         ignore_index=True)
        if len(own) != len(base) or (own["label"].to_numpy() != base["label"].to_numpy()).any():
            raise ValueError(f"{policy}: its scores and the baselines' are not the same events")
        ci = paired_bootstrap_auc(own["label"].to_numpy(), own["score"].to_numpy(), base[baseline].to_numpy(),
                                  samples=500, seed=0, groups=users)
        wins = [r["auc"] > r["baselines"][baseline] for r in records
                if r.get("auc") is not None and (r.get("baselines") or {}).get(baseline) is not None]
        out[policy] = {"events": len(own), "batches": len(scored), "delta": ci.estimate, "ci95": [ci.low, ci.high],
                       "batches_won": sum(wins), "batches_compared": len(wins)}
        print(f"{policy:9s} {len(own):,} events in {len(scored)} batches: AUC - {baseline} = {ci.estimate:+.4f} "
              f"[{ci.low:+.4f}, {ci.high:+.4f}] (users resampled); above it in {sum(wins)} of {len(wins)} batches")
    return out


def compare_policies(root: Path, share: float = 0.2) -> dict:
    """AUC(a) - AUC(b) for every pair of policies on the newest ``share`` of the events, paired by event,
    95 % user-bootstrap CI. Pairs where either policy served nothing on some of those batches are skipped."""
    from itertools import combinations

    from models.bootstrap import paired_bootstrap_auc
    from replay.report import newest_batches

    order = {"drift": 0, "periodic": 1, "never": 2}  # the policy that retrains on evidence first
    scores = {}
    for policy, records in _batches(root).items():
        newest = newest_batches(records, share)
        served = bool(newest) and all(r.get("auc") is not None for r in newest)
        scores[policy] = _scores(root, policy, newest) if served else None
    out = {}
    for a, b in combinations(sorted(scores, key=lambda p: order.get(p, 9)), 2):
        if scores[a] is None or scores[b] is None:
            print(f"{a} - {b}: not compared (a policy served no model on some of the newest batches)")
            continue
        (sa, users), (sb, _) = scores[a], scores[b]
        if len(sa) != len(sb) or (sa["event_id"].to_numpy() != sb["event_id"].to_numpy()).any():
            raise ValueError(f"{a} and {b}: their scores are not the same events")
        ci = paired_bootstrap_auc(sa["label"].to_numpy(), sa["score"].to_numpy(), sb["score"].to_numpy(),
                                  samples=500, seed=0, groups=users)
        out[f"{a} - {b}"] = {"events": len(sa), "delta": ci.estimate, "ci95": [ci.low, ci.high]}
        print(f"{a} - {b}: {len(sa):,} events: AUC difference {ci.estimate:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] "
              "(users resampled)")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--baseline", default="statistics-lr")
    ap.add_argument("--share", type=float, default=0.2)
    args = ap.parse_args(argv)
    return {"vs_baseline": compare(args.workdir, args.baseline, args.share),
            "policies": compare_policies(args.workdir, args.share)}


if __name__ == "__main__":
    main()
