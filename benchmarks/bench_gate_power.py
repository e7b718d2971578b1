"""Benchmark: statistical power of the promotion gates on user-clustered eval sets.

    .venv/bin/python -m benchmarks.bench_gate_power --quick          # < 1 min: 5k and 20k, few repeats
    .venv/bin/python -m benchmarks.bench_gate_power --repeats 200    # full: 5k, 20k, 100k events + sensitivity

What it simulates (every number known by construction):

* users with a heavy-tailed number of eval events (1 + lognormal, mean ≈ 20) and their own
  like rate (logit ~ N(logit 0.3, 1)), so one user's events are correlated;
* a champion with population AUC 0.75 and candidates exactly 0, 0.01 and 0.02 worse. Each
  model scores ``s = (μ + ω·η_u)·label + τ·b_u + σ·e``: a per-user signal strength ``η_u``,
  a per-user offset ``b_u`` and event noise ``e``. For a positive and a negative of different
  users ``s⁺ − s⁻ ~ N(μ, 2τ² + 2σ² + ω²)``, so AUC = Φ(μ / √(2τ² + 2σ² + ω²)) exactly and
  ``μ`` is solved for the wanted AUC. The candidate's ``η, b, e`` are correlated with the
  champion's (``rho_*``: two retrains of one model are much alike; two model families less so);
* a statistics-only baseline (the user's like rate, estimated with error) and random user
  attributes (``gender``, ``age_bucket``: no true gap), so every default rule can run.

Each candidate is judged by :func:`models.gates.decide_promotion` with the **default**
``GateSettings()`` (no knob changed). Reported per eval size: how often each candidate is
rejected (overall and by ``vs_champion_auc``), the spread of the paired AUC delta, and the
coverage of the 95 % interval of the delta when resampling users (what the gates do) versus
events (what they did): on clustered data the event bootstrap is too narrow. From the same
intervals it also shows what other champion rules would have done (the CI lower bound with
a 0.01 margin; the old point rule), so the choice of default can be read off one table.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm

DELTAS = (0.0, 0.01, 0.02)  # how much worse than the champion each candidate truly is (AUC)


@dataclass(frozen=True)
class Design:
    name: str
    rho_b: float  # correlation of the per-user offsets of candidate and champion
    rho_eta: float  # ... of the per-user signal strengths
    rho_e: float  # ... of the event noise
    tau: float = 0.7
    sigma: float = 1.0
    omega: float = 0.5
    champion_auc: float = 0.75
    mean_events: float = 20.0  # per user (heavy tail: 1 + lognormal with sigma 1)
    label_rate: float = 0.3
    label_sd: float = 1.0  # per-user random effect on the label logit


DESIGNS = {
    "retrain": Design("retrain", rho_b=0.9, rho_eta=0.8, rho_e=0.85),  # scores correlate ≈ 0.89
    "moderate": Design("moderate", rho_b=0.8, rho_eta=0.5, rho_e=0.7),  # ≈ 0.77
    "different": Design("different", rho_b=0.6, rho_eta=0.3, rho_e=0.5),  # ≈ 0.60
}


def simulate(rng: np.random.Generator, d: Design, n_events: int):
    """One eval set: labels, users, group attribute, champion / candidate / baseline scores."""
    counts, total = [], 0
    while total < n_events:
        c = 1 + int(rng.lognormal(math.log(d.mean_events) - 0.5, 1.0))
        counts.append(c)
        total += c
    counts = np.array(counts)
    counts[-1] -= total - n_events
    n_users = len(counts)
    uid = np.repeat(np.arange(n_users), counts)
    z = rng.normal(size=n_users)
    p = 1 / (1 + np.exp(-(math.log(d.label_rate / (1 - d.label_rate)) + d.label_sd * z)))
    y = (rng.random(n_events) < p[uid]).astype(int)
    kappa = math.sqrt(2 * d.tau ** 2 + 2 * d.sigma ** 2 + d.omega ** 2)

    def mix(a, b, r):
        return r * a + math.sqrt(1 - r * r) * b

    b_h, b_c = rng.normal(size=n_users), rng.normal(size=n_users)
    h_h, h_c = rng.normal(size=n_users), rng.normal(size=n_users)
    e_h, e_c = rng.normal(size=n_events), rng.normal(size=n_events)
    mu = kappa * norm.ppf(d.champion_auc)
    champion = (mu + d.omega * h_h[uid]) * y + d.tau * b_h[uid] + d.sigma * e_h
    cand_eta = d.omega * mix(h_h, h_c, d.rho_eta)[uid]
    cand_rest = d.tau * mix(b_h, b_c, d.rho_b)[uid] + d.sigma * mix(e_h, e_c, d.rho_e)
    candidates = {delta: (kappa * norm.ppf(d.champion_auc - delta) + cand_eta) * y + cand_rest for delta in DELTAS}
    baseline = (z + rng.normal(size=n_users))[uid]  # the user's like rate, estimated from few events
    gender = np.where(rng.random(n_users) < 0.5, "f", "m")[uid]
    age = rng.choice(["18-24", "25-34", "35-49", "50+"], n_users)[uid]
    frame = pd.DataFrame({"event_id": np.arange(n_events), "user_id": uid, "label": y, "group:gender": gender,
                          "group:age_bucket": age})
    return frame, champion, candidates, baseline


def evaluation(frame: pd.DataFrame, scores: np.ndarray, version: str):
    from models.evaluate import Evaluation, auc

    y = frame["label"].to_numpy()
    return Evaluation(auc=auc(y, scores), ndcg_at_k=0.2, recall_at_k=0.2, per_group_auc={}, group_auc_gap={},
                      cold_item_auc=float("nan"), tail_exposure=0.3, n_events=len(frame),
                      n_users=int(frame["user_id"].nunique()), n_positive=int(y.sum()), ranking_scope="catalog",
                      model_version=version, scored=frame.assign(score=scores))


def run_size(design: Design, n_events: int, repeats: int, seed: int, settings, full_checks: int) -> dict:
    """Judge the three candidates of ``repeats`` simulated eval sets.

    The champion rule is computed by the gates' own code (:func:`models.bootstrap.bootstrap_aucs`
    with the default resampling, then :func:`models.gates.champion_rule`), sharing one set of
    resamples across the three candidates, as ``decide_promotion`` shares them across models.
    For the first ``full_checks`` eval sets every candidate also goes through
    ``decide_promotion`` itself (all default rules, with a baseline and two group columns):
    its interval must be identical, and any other rule that rejects is counted.
    """
    from models.bootstrap import bootstrap_aucs
    from models.gates import champion_rule, decide_promotion

    g = settings
    rng = np.random.default_rng(seed)
    rows = []
    for rep in range(repeats):
        frame, champ, cands, base = simulate(rng, design, n_events)
        y, users = frame["label"].to_numpy(), frame["user_id"].to_numpy()
        targets = {"champion": (champ, None), **{d: (s, None) for d, s in cands.items()}}
        by_user = bootstrap_aucs(y, targets, units=users if g.bootstrap_unit == "user" else None,
                                 samples=g.bootstrap_samples, seed=g.bootstrap_seed)
        by_event = bootstrap_aucs(y, targets, units=None, samples=g.bootstrap_samples, seed=g.bootstrap_seed)
        for delta in cands:
            rule, ci = champion_rule(by_user, g, candidate_key=delta, champion_key="champion")
            ev = by_event.delta_ci(delta, "champion", g.confidence, "by events")
            row = {"rep": rep, "delta": delta, "users": len(np.unique(users)), "rejected": not rule.passed,
                   "estimate": ci.estimate, "low": ci.low, "high": ci.high, "ev_low": ev.low, "ev_high": ev.high,
                   "other_failed": None}
            if rep < full_checks:
                champ_ev = evaluation(frame, champ, "champion")
                dec = decide_promotion(evaluation(frame, cands[delta], f"d{delta}"), champ_ev, g,
                                       {"statistics-lr": evaluation(frame, base, "statistics-lr")})
                same = (dec.bootstrap_ci.low, dec.bootstrap_ci.high) == (ci.low, ci.high)
                if not same or rule.passed != ("vs_champion_auc" not in {r.name for r in dec.failed}):
                    raise AssertionError(f"decide_promotion disagrees with the shared-resample rule: "
                                         f"{dec.bootstrap_ci} vs {ci}")
                row["other_failed"] = ",".join(r.name for r in dec.failed if r.name != "vs_champion_auc")
            rows.append(row)
    return summarize(pd.DataFrame(rows), design, n_events, repeats, settings)


def summarize(df: pd.DataFrame, design: Design, n_events: int, repeats: int, settings) -> dict:
    truth = -df["delta"]
    checked = df[df["other_failed"].notna()]
    out = {"design": design.name, "events": n_events, "repeats": repeats, "users": df["users"].mean(),
           "sd_delta": float((df["estimate"] - truth).std()),  # spread of the estimate around the truth
           "bias": float((df["estimate"] - truth).mean()),
           "cover_user": float(((df["low"] <= truth) & (truth <= df["high"])).mean()),
           "cover_event": float(((df["ev_low"] <= truth) & (truth <= df["ev_high"])).mean()),
           "width_user": float((df["high"] - df["low"]).mean()),
           "width_event": float((df["ev_high"] - df["ev_low"]).mean()),
           "checked": len(checked), "other_rejects": int((checked["other_failed"] != "").sum()),
           "other_rules": sorted({n for v in checked["other_failed"] for n in v.split(",") if n})}
    for d in DELTAS:
        part = df[df["delta"] == d]
        key = f"{d:.2f}"
        out[f"reject_{key}"] = float(part["rejected"].mean())
        out[f"reject_lower01_{key}"] = float((part["low"] < -0.01 - 1e-9).mean())  # CI lower bound, margin 0.01
        out[f"reject_point01_{key}"] = float((part["estimate"] < -0.01 - 1e-9).mean())  # the old point rule
    return out


def fmt_pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def table(results: list[dict], settings) -> str:
    m = settings.max_auc_drop
    header = ("| design | eval events | users | repeats | sd of Δ̂ | rejected: 0.02 worse | 0.01 worse | equal (false) "
              "| CI lower, margin 0.01: 0.02 / 0.01 / equal | point, margin 0.01 (old rule): 0.02 / 0.01 / equal "
              "| 95 % CI coverage: users / events | CI width: users / events |")
    intro = (f"Default rule: `vs_champion_auc` on the lower {settings.confidence:.0%} CI bound, "
             f"margin max_auc_drop = {m:g}, {settings.bootstrap_samples} resamples of {settings.bootstrap_unit}s.")
    lines = [intro, "", header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['design']} | {r['events']:,} | {r['users']:,.0f} | {r['repeats']} | {r['sd_delta']:.4f} | "
            f"{fmt_pct(r['reject_0.02'])} | {fmt_pct(r['reject_0.01'])} | {fmt_pct(r['reject_0.00'])} | "
            f"{fmt_pct(r['reject_lower01_0.02'])} / {fmt_pct(r['reject_lower01_0.01'])} / "
            f"{fmt_pct(r['reject_lower01_0.00'])} | {fmt_pct(r['reject_point01_0.02'])} / "
            f"{fmt_pct(r['reject_point01_0.01'])} / {fmt_pct(r['reject_point01_0.00'])} | "
            f"{fmt_pct(r['cover_user'])} / {fmt_pct(r['cover_event'])} | {r['width_user']:.4f} / {r['width_event']:.4f} |")
    checked = sum(r["checked"] for r in results)
    others = sum(r["other_rejects"] for r in results)
    rules = sorted({n for r in results for n in r["other_rules"]})
    lines += ["", f"decide_promotion itself (all default rules, a statistics baseline, two group columns) was run on "
              f"{checked} of these decisions: identical intervals and champion verdicts; other rules rejected "
              f"{others}" + (f" ({', '.join(rules)})" if rules else "") + "."]
    return "\n".join(lines)


def main() -> None:
    from recloop.settings import GateSettings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5k and 20k events, 12 repeats, main design only (< 1 min)")
    ap.add_argument("--repeats", type=int, default=200, help="simulated eval sets per size (100k gets a quarter)")
    ap.add_argument("--sensitivity-repeats", type=int, default=None,
                    help="repeats for the other designs at 20k (default: half of --repeats; 0 = skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full-checks", type=int, default=None,
                    help="eval sets per size that also go through decide_promotion (default: 2 quick, 10 full)")
    args = ap.parse_args()
    settings = GateSettings()
    main_design = DESIGNS["retrain"]
    if args.full_checks is None:
        args.full_checks = 2 if args.quick else 10
    if args.quick:
        plan = [(main_design, 5_000, 12), (main_design, 20_000, 12)]
    else:
        sens = args.sensitivity_repeats if args.sensitivity_repeats is not None else args.repeats // 2
        plan = [(main_design, 5_000, args.repeats), (main_design, 20_000, args.repeats),
                (main_design, 100_000, max(1, args.repeats // 4))]
        plan += [(DESIGNS[n], 20_000, sens) for n in ("moderate", "different") if sens > 0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), {platform.python_version()}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    t0 = time.perf_counter()
    for i, (design, n, reps) in enumerate(plan):
        t = time.perf_counter()
        results.append(run_size(design, n, reps, args.seed + 1000 * i, settings, args.full_checks))
        r = results[-1]
        print(f"{design.name:9s} {n:>7,} events x {reps:3d}: reject 0.02/0.01/equal = "
              f"{fmt_pct(r['reject_0.02'])} / {fmt_pct(r['reject_0.01'])} / {fmt_pct(r['reject_0.00'])}; "
              f"coverage users {fmt_pct(r['cover_user'])}, events {fmt_pct(r['cover_event'])} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    print()
    print(table(results, settings))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
