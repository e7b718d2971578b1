"""Seeded synthetic catalog, users and a time-ordered feedback stream.

The signal is learnable from text: each user has a taste over categories; an item's
title and description are built from its category's vocabulary, so a text model
that reads liked items can infer which words a user responds to. Items also carry a
latent quality (what popularity can learn).

Planted, on request:

* **drift** from day ``drift_day``: a new category (``esports``) launches with fresh
  items, a share of users take to it, and everyone's taste rotates partly;
* **a bad batch** on day ``bad_batch_day``: null user ids, unknown item ids,
  duplicate event ids and future timestamps, in known counts (``planted``);
* **cold-start items**: a share of the catalog is created late and only shown from
  its creation day on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

VOCAB: dict[str, list[str]] = {
    "science fiction": ["starship", "galaxy", "android", "alien", "quantum", "colony", "orbit", "nebula",
                        "warp", "robot", "cyborg", "asteroid"],
    "cooking": ["recipe", "kitchen", "bake", "spice", "pasta", "bread", "flavour", "chef", "grill", "soup",
                "pastry", "seasoning"],
    "travel": ["journey", "island", "passport", "coast", "mountain", "city", "backpack", "route", "voyage",
               "hostel", "harbour", "trail"],
    "fitness": ["workout", "running", "strength", "yoga", "cardio", "muscle", "marathon", "stretch",
                "training", "gym", "endurance", "sprint"],
    "finance": ["investing", "budget", "stock", "savings", "market", "retirement", "portfolio", "tax",
                "credit", "dividend", "mortgage", "bonds"],
    "gardening": ["garden", "seeds", "compost", "roses", "soil", "orchard", "bloom", "herbs", "greenhouse",
                  "pruning", "tulips", "vegetables"],
    "jazz": ["saxophone", "swing", "trumpet", "improvisation", "bebop", "quartet", "blues", "rhythm", "piano",
             "groove", "trombone", "ballad"],
    "history": ["empire", "medieval", "war", "dynasty", "ancient", "revolution", "archive", "castle",
                "pharaoh", "chronicle", "monarchy", "crusade"],
}
DRIFT_CATEGORY = "esports"
DRIFT_VOCAB = ["tournament", "gamer", "console", "streaming", "arena", "controller", "league", "speedrun",
               "clan", "pixel", "joystick", "leaderboard"]
ADJECTIVES = ["Quiet", "Bold", "Hidden", "Golden", "Modern", "Little", "Complete", "Wild", "Secret", "Essential",
              "Curious", "Brilliant"]
FORMATS = ["book", "podcast", "course", "documentary", "guide", "series", "album", "magazine"]
PROVIDERS = ["northwind", "bluepeak", "lumen", "atlas", "kestrel"]
GENDERS = ["female", "male"]
AGE_BUCKETS = ["18-24", "25-34", "35-49", "50+"]


@dataclass
class SyntheticConfig:
    seed: int = 7
    n_users: int = 500
    n_items: int = 320
    n_days: int = 28
    start: str = "2026-01-05"
    drift_day: int | None = 18
    drift_items: int = 60
    drift_user_share: float = 0.5
    bad_batch_day: int | None = 3
    cold_item_share: float = 0.12  # created during the stream, shown from creation on
    active_prob: float = 0.35
    impressions_per_session: tuple[int, int] = (5, 12)
    search_share: float = 0.15


@dataclass
class SyntheticData:
    config: SyntheticConfig
    catalog: pd.DataFrame
    users: pd.DataFrame
    events: pd.DataFrame  # clean, time-ordered (the bad day's clean events included)
    bad_batch: pd.DataFrame | None  # what lands on bad_batch_day instead of the clean events
    planted: dict[str, int] = field(default_factory=dict)

    def day_start(self, day: int) -> pd.Timestamp:
        return pd.Timestamp(self.config.start, tz="UTC") + pd.Timedelta(days=day)

    def landing_batches(self) -> dict[pd.Timestamp, pd.DataFrame]:
        """Daily batches as they land: the bad day's clean events are replaced by the bad batch."""
        day = (self.events["timestamp"] - self.day_start(0)).dt.days
        out = {}
        for d in range(self.config.n_days):
            if self.bad_batch is not None and d == self.config.bad_batch_day:
                out[self.day_start(d)] = self.bad_batch
            else:
                out[self.day_start(d)] = self.events[day == d].reset_index(drop=True)
        return out


def _make_catalog(cfg: SyntheticConfig, rng: np.random.Generator) -> pd.DataFrame:
    start = pd.Timestamp(cfg.start, tz="UTC")
    cats = list(VOCAB)
    rows = []
    n_cold = round(cfg.n_items * cfg.cold_item_share)
    for i in range(cfg.n_items):
        cat = cats[i % len(cats)]
        rows.append(_item_row(f"item-{i:05d}", cat, VOCAB[cat], rng))
        if i >= cfg.n_items - n_cold:  # cold-start items: created during the stream
            created = start + pd.Timedelta(days=int(rng.integers(cfg.n_days // 2, cfg.n_days)))
        else:
            created = start - pd.Timedelta(days=int(rng.integers(1, 720)))
        rows[-1]["created_at"] = created
    if cfg.drift_day is not None:
        for j in range(cfg.drift_items):
            rows.append(_item_row(f"item-e{j:04d}", DRIFT_CATEGORY, DRIFT_VOCAB, rng))
            rows[-1]["created_at"] = start + pd.Timedelta(days=cfg.drift_day) + pd.Timedelta(
                hours=int(rng.integers(0, 48)))
    df = pd.DataFrame(rows)
    df["created_at"] = pd.to_datetime(df["created_at"], utc=True)
    return df


def _item_row(item_id: str, category: str, vocab: list[str], rng: np.random.Generator) -> dict:
    w = rng.choice(vocab, size=4, replace=False)
    fmt = FORMATS[int(rng.integers(len(FORMATS)))]
    title = f"The {ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]} {w[0].capitalize()} {w[1].capitalize()}"
    desc = f"A {fmt} about {w[0]}, {w[2]} and {w[3]}: everything on {w[1]} for people who love {category}."
    return {
        "item_id": item_id,
        "title": title,
        "description": desc,
        "category": category,
        "tags": ",".join(w[:3]),
        "provider": PROVIDERS[int(rng.integers(len(PROVIDERS)))],
    }


def generate(cfg: SyntheticConfig | None = None) -> SyntheticData:
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    catalog = _make_catalog(cfg, rng)
    cats = list(VOCAB) + ([DRIFT_CATEGORY] if cfg.drift_day is not None else [])
    cat_index = {c: k for k, c in enumerate(cats)}
    n_base = len(VOCAB)

    users = pd.DataFrame({
        "user_id": [f"user-{u:05d}" for u in range(cfg.n_users)],
        "gender": rng.choice(GENDERS, size=cfg.n_users),
        "age_bucket": rng.choice(AGE_BUCKETS, size=cfg.n_users, p=[0.2, 0.35, 0.3, 0.15]),
    })
    # taste before drift: concentrated on a couple of base categories; drift category unknown
    taste = np.zeros((cfg.n_users, len(cats)))
    taste[:, :n_base] = rng.dirichlet(np.full(n_base, 0.35), size=cfg.n_users)
    activity = rng.lognormal(0.0, 0.6, size=cfg.n_users)
    activity = np.clip(activity / activity.mean() * cfg.active_prob, 0.02, 0.95)

    taste_after = taste.copy()
    if cfg.drift_day is not None:
        perm = rng.permutation(n_base)
        taste_after[:, :n_base] = 0.4 * taste[:, :n_base] + 0.6 * taste[:, perm]
        takers = rng.random(cfg.n_users) < cfg.drift_user_share
        taste_after[takers, cat_index[DRIFT_CATEGORY]] = rng.uniform(0.4, 0.8, size=int(takers.sum()))
        taste_after /= taste_after.sum(axis=1, keepdims=True)

    item_cat = catalog["category"].map(cat_index).to_numpy()
    quality = rng.normal(0.0, 0.6, size=len(catalog))
    created = catalog["created_at"].dt.tz_convert(None).to_numpy()  # naive UTC datetime64
    item_ids = catalog["item_id"].to_numpy()
    start = pd.Timestamp(cfg.start, tz="UTC")

    frames = []
    counter = 0
    for day in range(cfg.n_days):
        day_start = start + pd.Timedelta(days=day)
        day_end = (day_start + pd.Timedelta(days=1)).tz_convert(None).to_datetime64()
        available = np.flatnonzero(created < day_end)
        drifted = cfg.drift_day is not None and day >= cfg.drift_day
        t = taste_after if drifted else taste
        # exposure: popular items and fresh launches are shown more
        fresh = (day_end - created[available]) < np.timedelta64(7, "D")
        weight = np.exp(0.5 * quality[available]) * np.where(fresh, 3.0, 1.0)
        weight /= weight.sum()
        active = np.flatnonzero(rng.random(cfg.n_users) < activity)
        for u in active:
            n = int(rng.integers(*cfg.impressions_per_session))
            query = None
            if rng.random() < cfg.search_share:
                qcat = int(rng.choice(len(cats), p=t[u]))
                in_cat = available[item_cat[available] == qcat]
                if len(in_cat) == 0:
                    continue
                shown = rng.choice(in_cat, size=min(n, len(in_cat)), replace=False)
                words = DRIFT_VOCAB if cats[qcat] == DRIFT_CATEGORY else VOCAB[cats[qcat]]
                query = " ".join(rng.choice(words, size=2, replace=False))
            else:
                shown = rng.choice(available, size=min(n, len(available)), replace=False, p=weight)
            affinity = t[u, item_cat[shown]] * len(cats)  # ~1 for an average category
            logit = -1.6 + 1.3 * np.log(affinity + 0.05) + quality[shown]
            positive = rng.random(len(shown)) < 1.0 / (1.0 + np.exp(-logit))
            r = rng.random(len(shown))
            etype = np.where(positive, np.where(r < 0.6, "click", np.where(r < 0.9, "like", "purchase")),
                             np.where(r < 0.85, "impression", "dislike"))
            secs = rng.integers(6 * 3600, 23 * 3600) + np.sort(rng.integers(0, 900, size=len(shown)))
            ts = day_start + pd.to_timedelta(secs, unit="s")
            ids = [f"ev-{cfg.seed}-{counter + k:08d}" for k in range(len(shown))]
            counter += len(shown)
            frames.append(pd.DataFrame({
                "event_id": ids,
                "user_id": users["user_id"].iat[u],
                "item_id": item_ids[shown],
                "event_type": etype,
                "label": positive.astype("int8"),
                "timestamp": ts,
                "query": query,
                "model_version": None,
            }))
    events = pd.concat(frames, ignore_index=True)
    events["timestamp"] = pd.to_datetime(events["timestamp"], utc=True)
    events = events.sort_values(["timestamp", "event_id"], kind="stable").reset_index(drop=True)

    bad, planted = (None, {})
    if cfg.bad_batch_day is not None:
        day_mask = (events["timestamp"] - start).dt.days == cfg.bad_batch_day
        bad, planted = plant_bad_batch(events[day_mask].reset_index(drop=True), rng)
    return SyntheticData(cfg, catalog, users, events, bad, planted)


def plant_bad_batch(clean: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, dict[str, int]]:
    """Corrupt a clean batch in known ways; returns the batch and the count of each problem."""
    bad = clean.copy()
    bad["user_id"] = bad["user_id"].astype(object)
    bad["timestamp"] = bad["timestamp"].astype(object)
    n = len(bad)
    idx = rng.permutation(n)
    k = max(1, n // 25)  # 4 % each: together well above the row-split threshold
    null_rows, unknown_rows, future_rows = idx[:k], idx[k:2 * k], idx[2 * k:3 * k]
    bad.loc[null_rows, "user_id"] = None
    bad.loc[unknown_rows, "item_id"] = [f"item-unknown-{i:04d}" for i in range(k)]
    bad.loc[future_rows, "timestamp"] = pd.Timestamp("2099-01-01", tz="UTC")
    dup_source = bad.iloc[idx[3 * k:4 * k]].copy()  # same event ids again, appended
    bad = pd.concat([bad, dup_source], ignore_index=True)
    bad["timestamp"] = pd.to_datetime(bad["timestamp"], utc=True)
    planted = {"null_user_id": k, "unknown_item_id": k, "future_timestamp": k, "duplicate_event_id": k}
    return bad, planted
