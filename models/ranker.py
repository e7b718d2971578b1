"""The second stage: a ranker that fuses the towers with statistics, collaborative signals and priors.

Two-stage design: the Lightning BERT two-tower retrieves (and reads text: cold items, queries);
the ranker re-scores with ``RANKER_COLUMNS`` = [tower logit, tower cosine, the wide
point-in-time statistics (``WIDE_COLUMNS``), ``models.cf.CF_COLUMNS`` (population category
like-rate, text -> like-rate prior, item-item CF over the user's recent positives)].

**Stacking** (:func:`models.train.train_recommender`): the selection run trains the towers on the
train part; the ranker is fitted on the *validation* part - rows the towers and the collaborative
counts never saw - with point-in-time features (the feature lag) and the selection towers'
scores; then the towers (and the counts, the text head) are refit on train + validation and the
ranker is applied on top. No row's own label reaches its features.

Kinds: ``"lightgbm"`` (default): LightGBM trees, binary objective, monotone increasing in the
like-rate features, the round count chosen by early stopping on a time-ordered tail of the rows
(the tail AUC of a logistic regression on the same columns is recorded beside it); saved in
LightGBM's own text model format + JSON. ``"logistic"``: a standardised L2 logistic regression on
the same columns, JSON. Never pickle. Measured (see ``benchmarks/RESULTS.md`` / the session
report): trees boosted from the linear logit (``init_score``) lost 0.027 AUC on the synthetic
default world against plain trees.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from models.cf import CF_COLUMNS
from models.features import WIDE_COLUMNS

TOWER_COLUMNS: tuple[str, ...] = ("tower_logit", "tower_cos")
FUSION_COLUMNS: tuple[str, ...] = WIDE_COLUMNS + CF_COLUMNS  # what the fusion model reads (no tower scores)
RANKER_COLUMNS: tuple[str, ...] = TOWER_COLUMNS + FUSION_COLUMNS  # the matrix every scoring path builds
BLEND_COLUMNS: tuple[str, ...] = ("fusion_logit",) + TOWER_COLUMNS
# more of these never means a lower like-probability, all else equal (a principled shape constraint)
MONOTONE_UP = ("tower_logit", "tower_cos", "user_like_rate", "item_like_rate", "user_cat_rate", "cat_like_rate",
               "text_prior", "cf_rate", "stats_logit", "knn_resid", "user_recent_rate", "user_resid", "text_resid",
               "rknn_resid")
MIN_ROWS = 200  # fewer out-of-sample rows (or a single class): no ranker, the towers score alone

LGB_PARAMS = {
    "objective": "binary", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 40,
    "feature_fraction": 0.9, "lambda_l2": 1.0, "max_bin": 127, "verbose": -1, "deterministic": True,
    "force_row_wise": True, "num_threads": 1,
}


def fit_nonnegative_logistic(z: np.ndarray, y: np.ndarray, c: float = 1.0) -> tuple[np.ndarray, np.ndarray,
                                                                                  np.ndarray, float]:
    """(mean, scale, coef, intercept) of an L2 logistic regression of ``y`` on the standardised columns of
    ``z`` with every coefficient >= 0 (the intercept free): scikit-learn's objective (0.5 |w|^2 + c * sum of
    log-losses), bounded, by L-BFGS-B. Where the unbounded optimum is non-negative it is the same fit."""
    from scipy.optimize import minimize

    y = np.asarray(y, dtype=np.float64)
    x, mean, scale = _standardised(z)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):  # L-BFGS-B would stop at its start, silently
        raise ValueError("the blend's inputs contain NaN or infinite values")

    def objective(p):
        w, b = p[:-1], p[-1]
        t = x @ w + b
        g = c * (0.5 * (1.0 + np.tanh(0.5 * t)) - y)  # c * (sigmoid(t) - y), overflow-free
        return c * float(np.sum(np.logaddexp(0.0, t) - y * t)) + 0.5 * float(w @ w), np.append(x.T @ g + w, g.sum())

    k = x.shape[1]
    res = minimize(objective, np.zeros(k + 1), jac=True, method="L-BFGS-B",
                   bounds=[(0.0, None)] * k + [(None, None)], options={"maxiter": 1000, "gtol": 1e-8})
    if not np.all(np.isfinite(res.x)):
        raise RuntimeError(f"the non-negative logistic regression did not converge: {res.message}")
    return mean, scale, np.maximum(res.x[:-1], 0.0), float(res.x[-1])


def _standardised(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(columns scaled to mean 0 and sd 1, their means, their sds; a constant column keeps scale 1), float64."""
    z = np.asarray(z, dtype=np.float64)
    mean = z.mean(axis=0)
    sd = z.std(axis=0)
    scale = np.where(sd > 1e-12, sd, 1.0)
    return (z - mean) / scale, mean, scale


def ranker_matrix(logit, cos, wide, cf) -> np.ndarray:
    """The ranker's input [n, len(RANKER_COLUMNS)] float32 (one function for training and every scoring path)."""
    n = len(logit)
    return np.concatenate([np.asarray(logit, dtype=np.float32).reshape(n, 1),
                           np.asarray(cos, dtype=np.float32).reshape(n, 1),
                           np.asarray(wide, dtype=np.float32).reshape(n, -1),
                           np.asarray(cf, dtype=np.float32).reshape(n, -1)], axis=1)


class Ranker:
    """A fitted fusion model over ``RANKER_COLUMNS``: :meth:`logit` of a feature matrix."""

    def __init__(self, kind: str, columns=RANKER_COLUMNS, booster=None, mean=None, scale=None, coef=None,
                 intercept: float = 0.0, info: dict | None = None, blend: dict | None = None):
        if kind not in ("lightgbm", "logistic"):
            raise ValueError(f"unknown ranker kind {kind!r}")
        self.kind, self.columns = kind, tuple(columns)
        self.booster = booster
        self.mean, self.scale, self.coef, self.intercept = mean, scale, coef, float(intercept)
        self.info = dict(info or {})
        # stacked: the fusion model over FUSION_COLUMNS, then a logistic blend of
        # [its logit, tower logit, tower cosine] (BLEND_COLUMNS); logit() then takes RANKER_COLUMNS rows
        self.blend = None if blend is None else {k: (np.asarray(v, dtype=np.float64) if k != "intercept" else
                                                     float(v)) for k, v in blend.items()}

    def _input_index(self) -> list[int]:
        """Where this model's columns sit in a ``RANKER_COLUMNS`` row."""
        return [RANKER_COLUMNS.index(c) for c in self.columns]

    def fit_blend(self, fusion_x: np.ndarray, tower_logit, tower_cos, y, towers: bool = True) -> Ranker:
        """Blend this (fusion) model with the towers: a standardised logistic regression of ``y`` on
        [this model's logit of ``fusion_x``, tower logit, tower cosine], on rows out-of-sample for all three,
        with every coefficient >= 0 (:func:`fit_nonnegative_logistic`).

        Non-negative because each input is declared monotone up (``MONOTONE_UP``), and because the blend is
        fitted on the selection run's towers but applied to the refit's: a negative weight on one tower score
        against a positive one on the other (their correlated difference) does not carry over to towers
        trained again on more data. Measured (``benchmarks/RESULTS.md``, 2026-12-02): the demo's first model
        0.787 -> 0.795 AUC (its blend was tower logit +0.99, cosine -0.69), synthetic default 0.7546 ->
        0.7554, MovieLens-100k unchanged (its weights were already positive)."""
        z = np.stack([self._base_logit(fusion_x), np.asarray(tower_logit, dtype=np.float64),
                      np.asarray(tower_cos, dtype=np.float64)], axis=1)
        mean, scale, coef, intercept = fit_nonnegative_logistic(z, np.asarray(y, dtype=np.int64))
        self.blend = {"mean": mean, "scale": scale, "coef": coef, "intercept": intercept}
        if not towers:  # the fusion model alone: its logit, unchanged
            self.blend = {"mean": np.zeros(3), "scale": np.ones(3), "coef": np.array([1.0, 0.0, 0.0]),
                          "intercept": 0.0}
        return self

    def refit(self, x: np.ndarray, y: np.ndarray, seed: int = 0) -> Ranker:
        """The same model (kind, round count, blend) refit on new rows ``x`` [n, len(columns)]: the refit on
        the whole window, after the round count was chosen on the earlier part."""
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        linear = self._fit_logistic(x, y, self.columns)
        booster = None
        if self.kind == "lightgbm":
            import lightgbm as lgb

            rounds = int(self.info.get("rounds") or 50)
            rounds = round(rounds * len(y) / max(int(self.info.get("n_rows") or len(y)), 1))
            booster = lgb.train(self._params(seed), lgb.Dataset(x, y, feature_name=list(self.columns)),
                                max(rounds, 10))
        info = {**self.info, "refit_rows": len(y)}
        return Ranker(self.kind, self.columns, booster=booster, mean=linear.mean, scale=linear.scale,
                      coef=linear.coef, intercept=linear.intercept, info=info, blend=self.blend)

    def _params(self, seed: int) -> dict:
        return {**LGB_PARAMS, "seed": int(seed),
                "monotone_constraints": [1 if c in MONOTONE_UP else 0 for c in self.columns]}

    # ---------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, kind: str = "lightgbm", seed: int = 0,
            columns=RANKER_COLUMNS, tail: float = 0.2, max_rounds: int = 600) -> Ranker:
        """Fit on rows ``x`` (time-ordered, out-of-sample for whatever produced the features) and labels ``y``."""
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        linear = cls._fit_logistic(x, y, columns)
        if kind == "logistic":
            return linear
        import lightgbm as lgb

        from models.evaluate import auc

        params = cls("lightgbm", columns)._params(seed)
        cut = round(len(y) * (1 - tail))
        rounds, tail = 0, {}
        if 0 < cut < len(y) and len(np.unique(y[:cut])) == 2 and len(np.unique(y[cut:])) == 2:
            head = cls._fit_logistic(x[:cut], y[:cut], columns)
            fit = lgb.Dataset(x[:cut], y[:cut], feature_name=list(columns), free_raw_data=False)
            val = lgb.Dataset(x[cut:], y[cut:], reference=fit)
            b = lgb.train(params, fit, max_rounds, valid_sets=[val],
                          callbacks=[lgb.early_stopping(40, verbose=False)])
            best = max(int(b.best_iteration or 0), 10)
            tail = {"tail_auc_linear": auc(y[cut:], head.logit(x[cut:])),
                    "tail_auc": auc(y[cut:], b.predict(x[cut:], num_iteration=best, raw_score=True))}
            rounds = round(best * len(y) / cut)  # all rows: proportionally more rounds
        else:
            rounds = 50
        booster = lgb.train(params, lgb.Dataset(x, y, feature_name=list(columns)), rounds)
        return cls("lightgbm", columns, booster=booster, mean=linear.mean, scale=linear.scale, coef=linear.coef,
                   intercept=linear.intercept, info={"rounds": rounds, "n_rows": len(y), **tail})

    @classmethod
    def _fit_logistic(cls, x, y, columns) -> Ranker:
        from sklearn.linear_model import LogisticRegression

        xs, mean, scale = _standardised(x)
        lr = LogisticRegression(C=1.0, max_iter=2000).fit(xs, y)
        return cls("logistic", columns, mean=mean, scale=scale, coef=lr.coef_.reshape(-1).astype(np.float64),
                   intercept=float(lr.intercept_[0]), info={"n_rows": len(y)})

    # ---------------------------------------------------------------- scoring
    def logit(self, x: np.ndarray) -> np.ndarray:
        """Log-odds of rows ``x``: [n, len(RANKER_COLUMNS)] when blended with the towers, else [n, len(columns)]."""
        x = np.asarray(x, dtype=np.float32)
        if len(x) == 0:
            return np.empty(0, dtype=np.float64)
        if self.blend is None:
            return self._base_logit(x)
        z = np.stack([self._base_logit(x[:, self._input_index()]), x[:, 0].astype(np.float64),
                      x[:, 1].astype(np.float64)], axis=1)
        b = self.blend
        return (((z - b["mean"]) / b["scale"]) * b["coef"]).sum(axis=1) + b["intercept"]

    def _base_logit(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if len(x) == 0:
            return np.empty(0, dtype=np.float64)
        if self.booster is not None:
            return np.asarray(self.booster.predict(x, raw_score=True, num_threads=1), dtype=np.float64)
        # row by row (elementwise product + a per-row sum): the same value whatever the batch
        return (((x.astype(np.float64) - self.mean) / self.scale) * self.coef).sum(axis=1) + self.intercept

    def importance(self) -> dict[str, float]:
        if self.booster is None:
            return dict(zip(self.columns, map(float, self.coef)))
        gain = self.booster.feature_importance("gain")
        total = float(gain.sum()) or 1.0
        return {c: float(g) / total for c, g in zip(self.columns, gain)}

    # ---------------------------------------------------------------- persistence (no pickle)
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        meta = {"kind": self.kind, "columns": list(self.columns), "info": self.info, "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "coef": self.coef.tolist(), "intercept": self.intercept,
                "trees": self.booster is not None,
                "blend": None if self.blend is None else {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                                          for k, v in self.blend.items()}}
        if self.booster is not None:
            (d / "ranker.txt").write_text(self.booster.model_to_string(), encoding="utf-8")
        (d / "ranker.json").write_text(json.dumps(meta, default=float), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> Ranker:
        d = Path(directory)
        meta = json.loads((d / "ranker.json").read_text(encoding="utf-8"))
        booster = None
        if meta.get("trees"):
            import lightgbm as lgb

            booster = lgb.Booster(model_str=(d / "ranker.txt").read_text(encoding="utf-8"))
        return cls(meta["kind"], meta["columns"], booster=booster, mean=np.asarray(meta["mean"]),
                   scale=np.asarray(meta["scale"]), coef=np.asarray(meta["coef"]), intercept=meta["intercept"],
                   info=meta.get("info"), blend=meta.get("blend"))
