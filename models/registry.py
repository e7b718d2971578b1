"""The MLflow model registry: log a candidate, register it, promote / reject / roll back.

Aliases of ``settings.model_name`` (default ``recommender``):

============  =================================================================
``challenger``  the version being judged (set at registration, removed once judged)
``champion``    what serving loads: ``models:/recommender@champion``
``previous``    the champion before the current one (target of ``rollback``)
============  =================================================================

Every judgement is stored on the version: tag ``gate_decision`` (pending | promoted |
rejected | rolled_back), ``gate_<rule>`` per rule, ``gate_reasons``; and on its run as
``gate_report.md`` / ``gate_decision.json``. Promotion and rollback run under a file
lock (``<workspace>/state/promotion.lock``) with a compare-and-set on the champion
alias: the champion a candidate was judged against must still be the champion when it
is promoted, otherwise the candidate is rejected with reason ``champion_changed``.
That makes "two retrains finish at once" safe for every process sharing the workspace
(for several machines, point ``state_dir`` at shared storage or use one promoter).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recloop.store import file_sha256

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
MANIFEST = "model_manifest.json"
_UNSET = object()
_MAX_TAG = 5000


class RegistryError(RuntimeError):
    """A registry operation could not be done (nothing was changed)."""


class ModelLoadError(RegistryError):
    """A registered version's files are missing, corrupted or truncated. Aliases are untouched."""


@dataclass
class PromotionResult:
    version: str
    promoted: bool
    reason: str  # "promoted", "champion_changed", "gates_failed", ...
    champion_before: str | None
    champion_after: str | None

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- plumbing
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _uri(path_or_uri: str) -> str:
    return path_or_uri if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path_or_uri) else Path(path_or_uri).resolve().as_uri()


def _registry_exists(settings) -> bool:
    uri = settings.tracking_uri
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).exists()


def client(settings):
    """An ``MlflowClient`` bound to the workspace's tracking / registry URI."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def _activate(settings) -> str:
    """Point the mlflow module at the workspace; create the experiment (artifacts under artifact_root)."""
    import mlflow

    settings.root.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    c = client(settings)
    name = settings.model_name
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, artifact_location=_uri(settings.artifact_root))
        except Exception:  # created concurrently by another process
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    return exp.experiment_id


def _alias_version(c, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def champion_version(settings) -> str | None:
    """The version the ``champion`` alias points at (None: no champion / no registry yet)."""
    if not _registry_exists(settings):
        return None
    return _alias_version(client(settings), settings.model_name, CHAMPION)


def _lock(settings, timeout: float = 120.0):
    from filelock import FileLock

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(settings.state_dir / "promotion.lock"), timeout=timeout)


def _tag_safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", str(name))


def _finite(x) -> bool:
    return isinstance(x, (int, float, np.number)) and math.isfinite(float(x))


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= _MAX_TAG else s[: _MAX_TAG - 20] + f"... (+{len(s) - _MAX_TAG + 20} chars)"


def file_manifest(model_dir: Path) -> dict[str, dict]:
    """sha256 and size of every file in a saved model folder (checked again at load time)."""
    model_dir = Path(model_dir)
    return {str(p.relative_to(model_dir)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
            for p in sorted(model_dir.rglob("*")) if p.is_file()}


def evaluation_metrics(evaluation, prefix: str = "") -> dict[str, float]:
    """Flat MLflow metrics from an :class:`~models.evaluate.Evaluation` (NaN left out)."""
    k = evaluation.k
    out = {"auc": evaluation.auc, f"ndcg_at_{k}": evaluation.ndcg_at_k, f"recall_at_{k}": evaluation.recall_at_k,
           "cold_item_auc": evaluation.cold_item_auc, "tail_exposure": evaluation.tail_exposure,
           "n_eval_events": evaluation.n_events, "n_eval_users": evaluation.n_users}
    for col, groups in evaluation.per_group_auc.items():
        for g, v in groups.items():
            out[f"auc_{col}_{g}"] = v
    for col, gap in evaluation.group_auc_gap.items():
        out[f"group_auc_gap_{col}"] = gap
    return {_tag_safe(prefix + k_): float(v) for k_, v in out.items() if _finite(v)}


# --------------------------------------------------------------------------- logging + registration
def _history_metrics(history: list[dict] | None) -> list[tuple[str, float, int]]:
    rows = []
    for i, epoch in enumerate(history or []):
        step = int(epoch.get("epoch", i))
        for key, v in epoch.items():
            if key != "epoch" and _finite(v):
                rows.append((_tag_safe(key), float(v), step))
    return rows


def _validation_results(settings, batch_ids: list[str]) -> list[str]:
    """The GX validation results (``<file>.validation.json`` beside each processed or quarantined
    batch, written by data_checks' ingest) of the batches a model was trained on."""
    wanted = {b for b in batch_ids if b}
    if not wanted:
        return []
    out = []
    for folder in (settings.processed_dir, settings.quarantine_dir):
        if not folder.exists():
            continue
        for p in folder.glob("*.validation.json"):
            try:
                batch_id = json.loads(p.read_text(encoding="utf-8")).get("outcome", {}).get("batch_id")
            except (OSError, ValueError):
                continue
            if batch_id in wanted:
                out.append(str(p))
    return sorted(out)


def _dataset_input(train_data: pd.DataFrame, settings, digest: str | None = None, max_rows: int = 2000):
    """An MLflow dataset for ``log_input``: schema and profile of the training events.

    MLflow infers the schema row by row (seconds per 100k rows), so the logged frame is an
    evenly spaced sample of at most ``max_rows`` events; the digest is the store snapshot
    hash of the whole window and the full row count goes in the input's tags.
    """
    import warnings

    import mlflow

    step = max(1, len(train_data) // max_rows)
    df = train_data.iloc[::step].head(max_rows).copy()
    for c in df.columns:  # MLflow's schema inference wants plain dtypes
        if isinstance(df[c].dtype, pd.DatetimeTZDtype):
            df[c] = df[c].dt.tz_convert("UTC").dt.tz_localize(None)
        elif str(df[c].dtype).startswith("string"):
            df[c] = df[c].astype(object)
    targets = "label" if "label" in df.columns else None
    with warnings.catch_warnings():  # MLflow 3.17 registers the local source twice and warns about it
        warnings.simplefilter("ignore")
        return mlflow.data.from_pandas(df, source=_uri(str(settings.store_dir)), targets=targets,
                                       name="training-window", digest=(digest or None) and digest[:36])


def _input_example(model_dir: Path, catalog: pd.DataFrame | None) -> pd.DataFrame:
    item = str(catalog["item_id"].iloc[0]) if catalog is not None and len(catalog) else "item-0"
    user = "user-0"
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        user = str(cfg["user_vocab"][0]) if cfg.get("user_vocab") else user
        item = str(cfg["item_vocab"][0]) if cfg.get("item_vocab") and catalog is None else item
    except (OSError, ValueError, KeyError):
        pass
    return pd.DataFrame({"user_id": [user, user], "item_id": [item, item], "query": [None, "something to watch"]})


def log_and_register(
    settings,
    model_dir,
    evaluation,
    champion_evaluation=None,
    decision=None,
    lineage: dict | None = None,
    params: dict | None = None,
    history: list[dict] | None = None,
    train_data: pd.DataFrame | None = None,
    drift_report_path: str | None = None,
    catalog: pd.DataFrame | None = None,
) -> tuple[str, str]:
    """Log one training run to MLflow and register its model; returns ``(run_id, version)``.

    Logs: params (given + ``settings.training``), per-epoch metrics (step = epoch), the
    candidate's evaluation metrics (and the champion's on the same events, prefixed
    ``champion_``), evaluation / decision JSON, the gate report, the drift report,
    lineage tags, the training dataset (``mlflow.log_input``) and the model as a pyfunc
    defined by code whose artifacts are the saved model folder. The new version gets the
    ``challenger`` alias and ``gate_decision = pending`` until :func:`promote` / :func:`reject`.
    """
    import mlflow

    from models import pyfunc

    model_dir = Path(model_dir)
    for name in ("weights.safetensors", "config.json", "encoder"):
        if not (model_dir / name).exists():
            raise RegistryError(f"{model_dir} is not a saved Recommender ({name} missing); nothing was logged")
    exp_id = _activate(settings)
    lineage = {k: v for k, v in (lineage or {}).items()}
    batch_ids = [b for b in str(lineage.get("batch_ids", "")).split(",") if b]
    lineage.setdefault("gx_validation_results", ",".join(_validation_results(settings, batch_ids)))
    model_cfg = json.loads((model_dir / "config.json").read_text())
    for key in ("train_start", "train_end", "fingerprint", "encoder", "mode"):
        if model_cfg.get(key) is not None:
            lineage.setdefault(key if key not in ("encoder", "mode") else f"model_{key}", str(model_cfg[key]))
    if catalog is None:
        from recloop.store import FeedbackStore

        catalog = FeedbackStore.from_settings(settings).catalog()
    manifest = file_manifest(model_dir)

    with tempfile.TemporaryDirectory(prefix="recloop-register-") as tmp:
        tmp = Path(tmp)
        code = tmp / "recommender_model.py"
        code.write_text(pyfunc.MODEL_CODE, encoding="utf-8")
        (tmp / "catalog").mkdir()
        catalog.to_parquet(tmp / "catalog" / "catalog.parquet", index=False)
        run_name = f"retrain-{time.strftime('%Y%m%d-%H%M%S')}"
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as run:
            run_id = run.info.run_id
            all_params = {f"training.{k}": v for k, v in settings.training.model_dump().items()}
            all_params.update(params or {})
            mlflow.log_params({_tag_safe(k)[:250]: _short(v)[:6000] for k, v in all_params.items()})
            c = client(settings)
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            epoch_metrics = [Metric(k, v, ts, step) for k, v, step in _history_metrics(history)]
            for i in range(0, len(epoch_metrics), 900):
                c.log_batch(run_id, metrics=epoch_metrics[i:i + 900])
            metrics = evaluation_metrics(evaluation)
            if champion_evaluation is not None:
                metrics.update(evaluation_metrics(champion_evaluation, prefix="champion_"))
            if decision is not None and decision.bootstrap_ci is not None:
                ci = decision.bootstrap_ci
                metrics.update({k: float(v) for k, v in (("auc_delta_vs_champion", ci.delta),
                                ("auc_delta_ci_low", ci.low), ("auc_delta_ci_high", ci.high)) if _finite(v)})
            if decision is not None:
                base = [r.threshold for r in decision.rules if r.name == "beats_popularity"]
                if base and _finite(base[0]):
                    metrics["popularity_baseline_auc"] = float(base[0])
            mlflow.log_metrics(metrics)
            mlflow.log_dict(evaluation.to_dict(), "evaluation/candidate.json")
            if champion_evaluation is not None:
                mlflow.log_dict(champion_evaluation.to_dict(), "evaluation/champion.json")
            if decision is not None:
                mlflow.log_dict(decision.to_dict(), "gate_decision.json")
                mlflow.log_text(decision.to_markdown(), "gate_report.md")
            mlflow.log_dict(lineage, "lineage.json")
            mlflow.log_dict(manifest, MANIFEST)
            if drift_report_path:
                p = Path(drift_report_path)
                if p.is_file():
                    mlflow.log_artifact(str(p), "drift")
                    lineage.setdefault("drift_report", p.name)
                else:
                    log.warning("drift report %s does not exist; not logged", p)
                    lineage.setdefault("drift_report", f"missing: {p}")
            tags = {_tag_safe(k): _short(v) for k, v in lineage.items() if v is not None}
            mlflow.set_tags({**tags, "recloop.role": "candidate"})
            if train_data is not None and len(train_data):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)  # MLflow's hint on int columns in the sample
                        mlflow.log_input(_dataset_input(train_data, settings, str(lineage.get("snapshot_hash") or "")),
                                         context="training",
                                         tags={"snapshot_hash": str(lineage.get("snapshot_hash", "")),
                                               "n_rows": str(len(train_data)),
                                               "sampled_rows": str(min(len(train_data), 2000))})
                except Exception as exc:  # lineage of the data is best effort, the model is not
                    log.warning("mlflow.log_input failed: %s", exc)
                    mlflow.set_tag("log_input_error", _short(str(exc)))
            with warnings.catch_warnings():
                # the model's predict takes a DataFrame checked against the explicit signature below
                warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=str(code),
                    artifacts={"model": str(model_dir), "catalog": str(tmp / "catalog")},
                    signature=pyfunc.signature(), input_example=_input_example(model_dir, catalog),
                    model_config={"workspace": None}, pip_requirements=_requirements(),
                )
        mv = mlflow.register_model(info.model_uri, settings.model_name,
                                   tags={**tags, "gate_decision": "pending", "run_id": run_id,
                                         "weights_sha256": manifest["weights.safetensors"]["sha256"]})
    version = str(mv.version)
    c = client(settings)
    c.set_registered_model_alias(settings.model_name, CHALLENGER, version)
    c.set_tag(run_id, "model_version", version)
    return run_id, version


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("mlflow", "torch", "transformers", "safetensors", "pandas", "numpy", "pyarrow"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:  # pragma: no cover
            pass
    return out


# --------------------------------------------------------------------------- judgement
def _decision_tags(decision) -> dict[str, str]:
    tags = {}
    for r in decision.rules:
        val = "" if r.value is None else (f"{r.value:.4f}" if isinstance(r.value, float) and math.isfinite(r.value)
                                          else str(r.value))
        thr = "" if r.threshold is None else (f"{r.op} {r.threshold:.4f}" if math.isfinite(r.threshold) else "NaN")
        tags[f"gate_{_tag_safe(r.name).replace(':', '_')}"] = _short(f"{'pass' if r.passed else 'fail'}: {val} {thr}".strip())
    if decision.bootstrap_ci is not None:
        ci = decision.bootstrap_ci
        tags["gate_auc_delta_ci"] = f"{ci.delta:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] ({ci.confidence:.0%}, {ci.unit})"
    return tags


def _record(settings, c, version: str, decision, outcome: str, reasons: list[str], extra: dict | None = None) -> None:
    name = settings.model_name
    tags = {**_decision_tags(decision), "gate_decision": outcome, "gate_decided_at": _now(),
            "gate_reasons": _short("; ".join(reasons)) if reasons else "", **(extra or {})}
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, str(v))
    mv = c.get_model_version(name, version)
    if mv.run_id:
        md = decision.with_versions(candidate_version=version).to_markdown()
        header = f"# {name} version {version}: {outcome.upper()}\n\n"
        if reasons:
            header += "Reasons:\n\n" + "\n".join(f"- {r}" for r in reasons) + "\n\n"
        c.log_text(mv.run_id, header + md, "gate_report.md")
        c.log_dict(mv.run_id, {**decision.with_versions(candidate_version=version).to_dict(),
                               "outcome": outcome, "outcome_reasons": reasons}, "gate_decision.json")
        c.set_tag(mv.run_id, "gate_decision", outcome)
    if _alias_version(c, name, CHALLENGER) == version:
        c.delete_registered_model_alias(name, CHALLENGER)


def reject(settings, version, decision, reason: str | None = None) -> PromotionResult:
    """Tag ``version`` rejected with the failed rules (and ``reason``); the champion is untouched."""
    c = client(settings)
    version = str(version)
    reasons = ([reason] if reason else []) + list(decision.reasons)
    _record(settings, c, version, decision, "rejected", reasons or ["rejected"])
    cur = _alias_version(c, settings.model_name, CHAMPION)
    return PromotionResult(version, False, reason.split(":")[0] if reason else "gates_failed", cur, cur)


def promote(settings, version, decision, expected_champion=_UNSET) -> PromotionResult:
    """Move ``champion`` to ``version`` if the decision passed and the champion is unchanged.

    ``expected_champion``: the champion version the candidate was judged against (None = no
    champion then). Defaults to ``decision.champion_version``. Inside the promotion lock the
    alias is re-read; if it moved since, the candidate is rejected with ``champion_changed``
    (a new judgement against the new champion is needed). The old champion gets ``previous``.
    """
    version = str(version)
    if not decision.promote:
        raise RegistryError(f"version {version}: the gate decision is 'reject' ({'; '.join(decision.reasons)}); "
                            "call reject() instead")
    if expected_champion is _UNSET:
        expected_champion = decision.champion_version
        if decision.has_champion and expected_champion is None:
            raise RegistryError("the decision was made against a champion of unknown version: pass "
                                "champion_version= to decide_promotion or expected_champion= to promote")
    expected = None if expected_champion is None else str(expected_champion)
    name = settings.model_name
    c = client(settings)
    with _lock(settings):
        current = _alias_version(c, name, CHAMPION)
        if current != expected:
            why = (f"champion_changed: judged against {expected or 'no champion'}, "
                   f"but the champion is now version {current or 'none'}")
            return reject(settings, version, decision, reason=why)
        if current == version:
            return PromotionResult(version, True, "already champion", current, current)
        if current is not None:
            c.set_registered_model_alias(name, PREVIOUS, current)
        c.set_registered_model_alias(name, CHAMPION, version)
        extra = {"promoted_at": _now(), "replaced_version": current or ""}
        _record(settings, c, version, decision, "promoted", [], extra)
        if current is not None:
            c.set_model_version_tag(name, current, "replaced_by", version)
    log.info("%s version %s promoted to champion (previous: %s)", name, version, current)
    return PromotionResult(version, True, "promoted", current, version)


def rollback(settings, reason: str) -> PromotionResult:
    """``champion`` → the ``previous`` version; records who and why on both versions.

    The rolled-back version is tagged ``gate_decision = rolled_back``; ``previous`` then
    points at the version the restored champion had replaced (if any), so repeated
    rollbacks walk back through the champion history.
    """
    if not reason or not reason.strip():
        raise RegistryError("rollback needs a reason (it is recorded on the versions)")
    name = settings.model_name
    if not _registry_exists(settings):
        raise RegistryError("no model registry in this workspace yet: nothing to roll back")
    c = client(settings)
    with _lock(settings):
        current = _alias_version(c, name, CHAMPION)
        prev = _alias_version(c, name, PREVIOUS)
        if prev is None:
            raise RegistryError(f"no 'previous' version of {name} to roll back to (champion: {current or 'none'})")
        if prev == current:
            raise RegistryError(f"'previous' and 'champion' are both version {current}; nothing to roll back to")
        c.set_registered_model_alias(name, CHAMPION, prev)
        when = _now()
        if current is not None:
            for k, v in {"gate_decision": "rolled_back", "rolled_back_at": when,
                         "rollback_reason": _short(reason), "rolled_back_to": prev}.items():
                c.set_model_version_tag(name, current, k, v)
        for k, v in {"restored_at": when, "restore_reason": _short(reason), "restored_from": current or "",
                     "gate_decision": "promoted"}.items():
            c.set_model_version_tag(name, prev, k, v)
        before = c.get_model_version(name, prev).tags.get("replaced_version") or None
        if before and before not in (prev, current):
            c.set_registered_model_alias(name, PREVIOUS, before)
        else:
            c.delete_registered_model_alias(name, PREVIOUS)
    log.warning("%s rolled back from version %s to %s: %s", name, current, prev, reason)
    return PromotionResult(prev, True, f"rollback: {reason}", current, prev)


# --------------------------------------------------------------------------- loading
def _cache_dir(settings, version: str) -> Path:
    return settings.models_dir / "cache" / f"{_tag_safe(settings.model_name)}-v{version}"


def _verify(model_dir: Path, manifest: dict | None, expected_weights: str | None, version: str) -> None:
    weights = model_dir / "weights.safetensors"
    if not weights.is_file():
        raise ModelLoadError(f"version {version}: {weights} is missing")
    problems = []
    if manifest:
        for rel, meta in manifest.items():
            p = model_dir / rel
            if not p.is_file():
                problems.append(f"{rel} missing")
            elif p.stat().st_size != meta["bytes"]:
                problems.append(f"{rel} is {p.stat().st_size} bytes, expected {meta['bytes']} (truncated?)")
            elif file_sha256(p) != meta["sha256"]:
                problems.append(f"{rel} sha256 mismatch (corrupted)")
    elif expected_weights and file_sha256(weights) != expected_weights:
        problems.append("weights.safetensors sha256 mismatch (corrupted)")
    if problems:
        raise ModelLoadError(f"version {version}: model files in {model_dir} fail their checksum: "
                             + "; ".join(problems))


def _artifact_path(local_model: Path, key: str) -> Path | None:
    """Where the pyfunc artifact ``key`` lies inside a downloaded MLflow model folder."""
    from mlflow.models import Model

    try:
        flavor = Model.load(str(local_model / "MLmodel")).flavors["python_function"]
        return local_model / flavor["artifacts"][key]["path"]
    except (OSError, KeyError) as exc:
        raise ModelLoadError(f"{local_model} is not a recloop pyfunc model: {exc}") from exc


def _download(settings, version: str) -> Path:
    """The version's model folder in the local cache (downloaded once, verified every time)."""
    import mlflow

    c = client(settings)
    mv = c.get_model_version(settings.model_name, version)
    cache = _cache_dir(settings, version)
    model_dir = cache / "model"
    if not (cache / "COMPLETE").is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=cache.parent))
        try:
            mlflow.set_tracking_uri(settings.tracking_uri)
            mlflow.set_registry_uri(settings.tracking_uri)
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{settings.model_name}/{version}",
                                                             dst_path=str(tmp / "dl")))
            src = _artifact_path(local, "model")
            if src is None or not src.is_dir():
                raise ModelLoadError(f"version {version}: the registered model has no 'model' artifact folder")
            shutil.move(str(src), str(tmp / "model"))
            manifest = None
            if mv.run_id:
                try:
                    manifest = mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/{MANIFEST}")
                except Exception:  # older versions without a manifest: weights hash tag only
                    manifest = None
            (tmp / MANIFEST).write_text(json.dumps(manifest or {}), encoding="utf-8")
            shutil.rmtree(tmp / "dl", ignore_errors=True)
            (tmp / "COMPLETE").write_text(_now(), encoding="utf-8")
            if cache.exists():
                shutil.rmtree(cache, ignore_errors=True)
            try:
                tmp.rename(cache)
            except OSError:  # another process finished the same download first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    manifest = json.loads((cache / MANIFEST).read_text(encoding="utf-8") or "{}")
    _verify(model_dir, manifest, mv.tags.get("weights_sha256"), version)
    return model_dir


def load_version(settings, version) -> tuple[Any, dict]:
    """``(Recommender, info)`` for a registered version; :class:`ModelLoadError` when its files are bad."""
    from models.recommender import Recommender

    version = str(version)
    c = client(settings)
    mv = c.get_model_version(settings.model_name, version)
    try:
        model_dir = _download(settings, version)
    except ModelLoadError:
        # a corrupted local cache is re-fetched once; a corrupted registry copy stays an error
        shutil.rmtree(_cache_dir(settings, version), ignore_errors=True)
        model_dir = _download(settings, version)
    try:
        model = Recommender.load(model_dir)
    except Exception as exc:
        raise ModelLoadError(f"version {version}: cannot load the model from {model_dir}: "
                             f"{type(exc).__name__}: {exc}") from exc
    info = {"version": version, "name": settings.model_name, "run_id": mv.run_id, "aliases": list(mv.aliases or []),
            "tags": dict(mv.tags or {}), "model_dir": str(model_dir),
            "uri": f"models:/{settings.model_name}/{version}"}
    return model, info


def load_champion(settings) -> tuple[Any, dict] | None:
    """``(Recommender, info)`` of the champion, ``None`` when there is none yet.

    A broken champion raises :class:`ModelLoadError` (the alias is left as it is: the
    caller keeps serving what it has and an operator can ``recloop rollback``).
    """
    version = champion_version(settings)
    if version is None:
        return None
    return load_version(settings, version)


# --------------------------------------------------------------------------- listing
def list_versions(settings) -> list[dict]:
    """Every version with aliases, gate outcome, key metrics and lineage (newest first)."""
    if not _registry_exists(settings):
        return []
    from mlflow.exceptions import MlflowException

    c = client(settings)
    try:
        versions = c.search_model_versions(f"name='{settings.model_name}'")
    except MlflowException:
        return []
    aliases: dict[str, list[str]] = {}
    try:
        for alias, v in (c.get_registered_model(settings.model_name).aliases or {}).items():
            aliases.setdefault(str(v), []).append(alias)
    except MlflowException:
        pass
    out = []
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        metrics: dict[str, float] = {}
        if mv.run_id:
            try:
                metrics = dict(c.get_run(mv.run_id).data.metrics)
            except MlflowException:
                pass
        tags = dict(mv.tags or {})
        out.append({
            "version": str(mv.version),
            "aliases": sorted(set(aliases.get(str(mv.version), [])) | set(mv.aliases or [])),
            "gate_decision": tags.get("gate_decision"),
            "gate_reasons": tags.get("gate_reasons") or tags.get("rollback_reason") or "",
            "gates": {k[len("gate_"):]: v for k, v in tags.items()
                      if k.startswith("gate_") and k not in ("gate_decision", "gate_reasons", "gate_decided_at")},
            "metrics": {k: metrics[k] for k in sorted(metrics) if not k.startswith("champion_")
                        and not k.startswith(("train_", "val_"))},
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).isoformat(timespec="seconds"),
            "run_id": mv.run_id,
            "lineage": {k: tags[k] for k in ("snapshot_hash", "window_start", "window_end", "trigger_reason",
                                             "prefect_flow_run_id", "git_commit") if k in tags},
        })
    return out
