"""The MLflow model registry: log a candidate, register it, promote / reject / roll back.

Aliases of ``settings.model_name`` (default ``recommender``):

============  =================================================================
``challenger``  the version being judged (set at registration, removed once judged)
``champion``    what serving loads: ``models:/recommender@champion``
``previous``    the champion before the current one (target of ``rollback``)
============  =================================================================

Every judgement is stored on the version: tag ``gate_decision`` (pending | promoted |
rejected | failed | rolled_back), ``gate_<rule>`` per rule, ``gate_reasons`` (``gate_error``
when failed); and on its run as ``gate_report.md`` / ``gate_decision.json``. A decision is
bound to the versions it judged: :func:`promote` needs ``decision.candidate_version`` to be
the version promoted, and, under the promotion lock (:func:`_lock`), does a
compare-and-set on the champion alias: ``decision.champion_version`` must still be the
champion, otherwise the candidate is rejected with reason ``champion_changed``. A promotion
or rejection that fails part-way restores the aliases and marks the version ``failed``
(:func:`mark_failed`): no version is left ``pending`` with ``challenger`` by an error.
Registration is idempotent within a Prefect flow run (tag ``registration_key``).
That makes "two retrains finish at once" safe for every process sharing the workspace; with
``services.database_url`` set the lock is a PostgreSQL advisory lock instead, so promoters on
machines that share no disk (only the database and the MLflow registry) are ordered too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.retention import PRUNED_TAG
from recloop.store import file_sha256

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
MANIFEST = "model_manifest.json"
_MAX_TAG = 5000
_MAX_ERROR = 500
REGISTRATION_KEY = "registration_key"  # tag on the run and the version (see log_and_register)
MODEL_URI_TAG = "recloop.model_uri"  # run tag: the logged model, set right after log_model


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
    return datetime.now(UTC).isoformat(timespec="seconds")


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
            return c.create_experiment(name, artifact_location=_experiment_artifacts(settings))
        except Exception:  # created concurrently by another process
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    return exp.experiment_id


def _experiment_artifacts(settings) -> str | None:
    """Where the experiment's artifacts go: an explicit ``mlflow_artifact_root``; else, with a tracking
    *server* (http/https), the server's own default (``mlflow-artifacts:`` proxied to S3 with
    ``--serve-artifacts``), so that no worker writes to a folder only it can see; else the workspace."""
    if settings.mlflow_artifact_root is None and settings.tracking_uri.startswith(("http://", "https://")):
        return None
    return _uri(settings.artifact_root)


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
    """The promotion lock around every alias compare-and-set (``promote``, ``rollback``).

    Embedded: a file lock ``<workspace>/state/promotion.lock`` (processes sharing the workspace).
    With ``services.database_url`` set: the PostgreSQL advisory lock ``promotion:<model_name>``, so
    promoters on different machines are ordered by the database (released by the server if the
    holder dies). Both raise a ``TimeoutError`` (``filelock.Timeout`` is one) after ``timeout``.
    """
    from recloop import pgstate

    if pgstate.enabled(settings):
        return pgstate.advisory_lock(settings, f"promotion:{settings.model_name}", timeout=timeout)
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
    baseline_evaluations: dict | None = None,
) -> tuple[str, str]:
    """Log one training run to MLflow and register its model; returns ``(run_id, version)``.

    Logs: params (given + ``settings.training``), per-epoch metrics (step = epoch), the
    candidate's evaluation metrics (and the champion's on the same events, prefixed
    ``champion_``; every baseline's, prefixed ``baseline_<name>_``), evaluation / decision JSON, the gate report, the drift report,
    lineage tags, the training dataset (``mlflow.log_input``) and the model as a pyfunc
    defined by code whose artifacts are the saved model folder. The new version gets the
    ``challenger`` alias and ``gate_decision = pending`` until :func:`promote` / :func:`reject`.

    What a person reads in the MLflow UI: the version's description is the trigger and the gate
    table (:func:`version_description`); tags stay short: a list in the lineage (``batch_ids``,
    ``gx_validation_results``) is tagged as its count and first / last entry, and written whole to
    the run's artifact ``lineage/<key>.txt`` (``lineage.json`` keeps every value too).

    Idempotent across task retries: with ``lineage["prefect_flow_run_id"]`` set, the call is
    keyed by :func:`registration_key` (flow run, config fingerprint, snapshot hash, weights
    sha256), stored as tag ``registration_key`` on the run and the version. A version with the
    key is returned as it is (its ``challenger`` alias set if still pending); a run with the key
    whose model was logged but not registered is registered; nothing new is logged either way.
    Without a flow-run id every call logs and registers anew.
    """
    model_dir = Path(model_dir)
    for name in ("weights.safetensors", "config.json", "encoder"):
        if not (model_dir / name).exists():
            raise RegistryError(f"{model_dir} is not a saved Recommender ({name} missing); nothing was logged")
    exp_id = _activate(settings)
    lineage = {k: v for k, v in (lineage or {}).items()}
    lineage.setdefault("gx_validation_results",
                       ",".join(_validation_results(settings, _lineage_list(lineage.get("batch_ids")))))
    model_cfg = json.loads((model_dir / "config.json").read_text())
    for key in ("train_start", "train_end", "fingerprint", "encoder", "mode"):
        if model_cfg.get(key) is not None:
            lineage.setdefault(key if key not in ("encoder", "mode") else f"model_{key}", str(model_cfg[key]))
    manifest = file_manifest(model_dir)
    weights_sha = manifest["weights.safetensors"]["sha256"]
    description = version_description(decision, lineage)
    reg_key = registration_key(lineage.get("prefect_flow_run_id"), model_cfg.get("fingerprint"),
                               lineage.get("snapshot_hash"), weights_sha)
    if reg_key is not None:
        resumed = _resume_registration(settings, exp_id, reg_key, weights_sha, description)
        if resumed is not None:
            return resumed

    if catalog is None:
        from recloop.store import FeedbackStore

        catalog = FeedbackStore.from_settings(settings).catalog()

    run_id, model_uri, tags = _log_run(settings, exp_id, reg_key, model_dir, catalog, manifest, lineage, params,
                                       evaluation, champion_evaluation, decision, baseline_evaluations, history,
                                       train_data, drift_report_path)
    version_tags = {**tags, "gate_decision": "pending", "run_id": run_id, "weights_sha256": weights_sha}
    if reg_key:
        version_tags[REGISTRATION_KEY] = reg_key
    mv = _register(settings.model_name, model_uri, version_tags)
    version = str(mv.version)
    _finish_registration(client(settings), settings.model_name, run_id, version, description)
    return run_id, version


def _log_run(settings, exp_id: str, reg_key: str | None, model_dir: Path, catalog: pd.DataFrame, manifest: dict,
             lineage: dict, params: dict | None, evaluation, champion_evaluation, decision, baseline_evaluations,
             history, train_data: pd.DataFrame | None, drift_report_path: str | None) -> tuple[str, str, dict]:
    """The MLflow run of one training (see :func:`log_and_register`): params, results, manifest, lineage
    tags, training input and the pyfunc model. Returns (run id, model URI, the lineage tags)."""
    import mlflow

    from models import pyfunc

    with tempfile.TemporaryDirectory(prefix="recloop-register-") as tmp:
        tmp = Path(tmp)
        code = tmp / "recommender_model.py"
        code.write_text(pyfunc.MODEL_CODE, encoding="utf-8")
        (tmp / "catalog").mkdir()
        catalog.to_parquet(tmp / "catalog" / "catalog.parquet", index=False)
        run_name = f"retrain-{time.strftime('%Y%m%d-%H%M%S')}"
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name,
                              tags={REGISTRATION_KEY: reg_key} if reg_key else None) as run:
            run_id = run.info.run_id
            all_params = {f"training.{k}": v for k, v in settings.training.model_dump().items()}
            all_params.update(params or {})
            mlflow.log_params({_tag_safe(k)[:250]: _short(v)[:6000] for k, v in all_params.items()})
            _log_results(client(settings), run_id, evaluation, champion_evaluation, decision,
                         baseline_evaluations, history)
            mlflow.log_dict(manifest, MANIFEST)
            tags = _log_lineage(lineage, drift_report_path)
            mlflow.set_tags({**tags, "recloop.role": "candidate"})
            if train_data is not None and len(train_data):
                _log_training_input(settings, train_data, lineage)
            with warnings.catch_warnings():
                # the model's predict takes a DataFrame checked against the explicit signature below
                warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=str(code),
                    artifacts={"model": str(model_dir), "catalog": str(tmp / "catalog")},
                    signature=pyfunc.signature(), input_example=_input_example(model_dir, catalog),
                    model_config={"workspace": None}, pip_requirements=_requirements(),
                )
            mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
    return run_id, info.model_uri, tags


def _resume_registration(settings, exp_id: str, reg_key: str, weights_sha: str,
                         description: str) -> tuple[str, str] | None:
    """A retry of a registration that got part-way: the version with ``reg_key`` is finished, or the
    run with ``reg_key`` whose model was logged is registered; ``None`` when nothing was logged yet."""
    c = client(settings)
    done = _registered_with_key(c, settings.model_name, reg_key)
    if done is not None:  # a retry after the version was created: finish it, log nothing new
        log.info("registration %s already done as version %s (run %s); not logging again",
                 reg_key, done[1], done[0])
        _finish_registration(c, settings.model_name, *done, description)
        return done
    logged = _logged_run_with_key(c, exp_id, reg_key)
    if logged is None:
        return None
    run_id, model_uri, run_tags = logged  # the model was logged but not registered: register that run's model
    log.info("registration %s: run %s has the model logged; registering it", reg_key, run_id)
    mv = _register(settings.model_name, model_uri,
                   {**run_tags, "gate_decision": "pending", "run_id": run_id, "weights_sha256": weights_sha,
                    REGISTRATION_KEY: reg_key})
    _finish_registration(c, settings.model_name, run_id, str(mv.version), description)
    return run_id, str(mv.version)


def _log_results(c, run_id: str, evaluation, champion_evaluation, decision, baseline_evaluations,
                 history) -> None:
    """Per-epoch metrics; the candidate's, champion's and baselines' metrics on the same events; their
    evaluation JSON; the gate decision (JSON) and report (markdown)."""
    import mlflow
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
    for name, ev in (baseline_evaluations or {}).items():  # every baseline, on the same events
        metrics.update(evaluation_metrics(ev, prefix=f"baseline_{name}_"))
    mlflow.log_metrics(metrics)
    for name, ev in (baseline_evaluations or {}).items():
        mlflow.log_dict(ev.to_dict(), f"evaluation/baseline-{_tag_safe(name)}.json")
    mlflow.log_dict(evaluation.to_dict(), "evaluation/candidate.json")
    if champion_evaluation is not None:
        mlflow.log_dict(champion_evaluation.to_dict(), "evaluation/champion.json")
    if decision is not None:
        mlflow.log_dict(decision.to_dict(), "gate_decision.json")
        mlflow.log_text(decision.to_markdown(), "gate_report.md")


LIST_LINEAGE = ("batch_ids", "gx_validation_results")  # comma-joined lists: artifacts, not tags


def _lineage_list(value) -> list[str]:
    return [x for x in str(value or "").split(",") if x]


def list_tag(key: str, items: list[str]) -> str:
    """A list's tag: its count and first / last entry (file names for paths), pointing at the artifact."""
    if not items:
        return "0"
    ends = [Path(x).name or x for x in (items[0], items[-1])]
    shown = ends[0] if len(items) == 1 else f"{ends[0]} .. {ends[1]}"
    return f"{len(items)}: {shown} (lineage/{key}.txt)"


def _log_lineage(lineage: dict, drift_report_path: str | None) -> dict[str, str]:
    """``lineage.json``, each list in the lineage as ``lineage/<key>.txt`` (one entry a line) and the drift
    report; returns the run's (and version's) lineage tags, every value short."""
    import mlflow

    if drift_report_path:
        p = Path(drift_report_path)
        if p.is_file():
            mlflow.log_artifact(str(p), "drift")
            lineage.setdefault("drift_report", p.name)
        else:
            log.warning("drift report %s does not exist; not logged", p)
            lineage.setdefault("drift_report", f"missing: {p}")
    mlflow.log_dict(lineage, "lineage.json")
    tags = {}
    for key, value in lineage.items():
        if value is None:
            continue
        if key in LIST_LINEAGE:
            items = _lineage_list(value)
            mlflow.log_text("".join(f"{x}\n" for x in items), f"lineage/{key}.txt")
            value = list_tag(key, items)
        tags[_tag_safe(key)] = _short(value)
    return tags


def _log_training_input(settings, train_data: pd.DataFrame, lineage: dict) -> None:
    """The training window as an MLflow dataset input (a sample of its rows); best effort."""
    import mlflow

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


MAX_DESCRIPTION = 5000  # MLflow's model_versions.description is VARCHAR(5000) on SQL stores


def version_description(decision, lineage: dict, limit: int = MAX_DESCRIPTION) -> str:
    """The model version's description in the MLflow UI (markdown): why it was trained, the gate table
    (``decision.to_markdown()``) and what it learned from. Over ``limit`` characters, whole lines of the
    gate table are kept and the rest is left to the run's ``gate_report.md``."""
    trigger = str(lineage.get("trigger_reason") or "not recorded")[:300]
    head = f"**Trigger:** `{trigger}`\n\n"
    batches = _lineage_list(lineage.get("batch_ids"))
    said = []
    if batches:
        shown = batches[0] if len(batches) == 1 else f"{batches[0]} .. {batches[-1]}"
        noun = "batch" if len(batches) == 1 else "batches"
        said.append(f"{len(batches)} {noun} ({shown}; all in `lineage/batch_ids.txt`)")
    if lineage.get("snapshot_hash"):
        said.append(f"snapshot `{str(lineage['snapshot_hash'])[:12]}`")
    tail = f"\n**Trained on** {', '.join(said)}.\n" if said else ""
    table = decision.to_markdown() if decision is not None and hasattr(decision, "to_markdown") else (
        "No gate decision at registration.\n")
    cut = "\n… the full gate report is the run's artifact `gate_report.md`.\n"
    room = limit - len(head) - len(tail)
    if len(table) > room:
        kept = table[: max(room - len(cut), 0)]
        table = kept[: kept.rfind("\n") + 1] + cut
    return (head + table + tail)[:limit]


def registration_key(flow_run_id, fingerprint, snapshot_hash, weights_sha256) -> str | None:
    """What makes two ``log_and_register`` calls "the same registration": the Prefect flow run,
    the model's config fingerprint, the training snapshot and the weights' sha256 (a flow-level
    retry that retrains to different weights is a different model, so a new version). ``None``
    (no deduplication) outside a flow run. 32 hex chars, stored as tag ``registration_key`` on
    the run (from its start) and on the version (at creation)."""
    flow_run_id = str(flow_run_id or "").strip()
    if not flow_run_id:
        return None
    raw = "|".join(str(x or "") for x in (flow_run_id, fingerprint, snapshot_hash, weights_sha256))
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:32]


def _register(name: str, model_uri: str, tags: dict):
    import mlflow

    return mlflow.register_model(model_uri, name, tags=tags)


def _registered_with_key(c, name: str, key: str) -> tuple[str, str] | None:
    """``(run_id, version)`` of the (oldest) version carrying registration key ``key``."""
    from mlflow.exceptions import MlflowException

    try:
        found = c.search_model_versions(f"name='{name}' and tags.{REGISTRATION_KEY}='{key}'")
    except MlflowException:  # no registered model yet
        return None
    if not found:
        return None
    mv = min(found, key=lambda v: int(v.version))
    if len(found) > 1:
        log.warning("registration %s has %d versions (%s); using %s", key, len(found),
                    ", ".join(sorted(str(v.version) for v in found)), mv.version)
    return mv.run_id or (mv.tags or {}).get("run_id", ""), str(mv.version)


def _logged_run_with_key(c, exp_id: str, key: str) -> tuple[str, str, dict] | None:
    """``(run_id, model_uri, lineage tags)`` of the oldest run with key ``key`` whose model was logged."""
    runs = c.search_runs([exp_id], f"tags.{REGISTRATION_KEY} = '{key}'", order_by=["attributes.start_time ASC"])
    for run in runs:
        t = dict(run.data.tags)
        if t.get(MODEL_URI_TAG):
            lineage = {k: v for k, v in t.items()
                       if not k.startswith(("mlflow.", "recloop.")) and k not in ("model_version", "log_input_error",
                                                                                   "gate_decision", "gate_error")}
            return run.info.run_id, t[MODEL_URI_TAG], lineage
    return None


def _finish_registration(c, name: str, run_id: str, version: str, description: str | None = None) -> None:
    """The steps after ``register_model`` (idempotent): the description, ``challenger`` on a
    still-pending version, the version number on the run."""
    mv = c.get_model_version(name, version)
    if description and mv.description != description:
        c.update_model_version(name, version, description=description)
    if (mv.tags or {}).get("gate_decision", "pending") == "pending":
        c.set_registered_model_alias(name, CHALLENGER, version)
    if run_id:
        c.set_tag(run_id, "model_version", version)


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
        judged = r.low if getattr(r, "decided_on", "point") == "ci_lower" and r.low is not None else r.value
        val = "" if judged is None else (f"{judged:.4f}" if isinstance(judged, float) and math.isfinite(judged)
                                         else str(judged))
        if judged is not r.value and val:
            val = f"CI low {val}"
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


def _bound_version(decision, version: str, *, required: bool) -> None:
    """The decision must be about ``version`` (RegistryError otherwise; nothing is changed)."""
    named = getattr(decision, "candidate_version", None)
    if named is None:
        if required:
            raise RegistryError(f"version {version}: the gate decision names no candidate version; bind it with "
                                "decision.with_versions(candidate_version=...) after registering")
        return
    if str(named) != version:
        raise RegistryError(f"the gate decision judged version {named}, not version {version}; nothing was changed")


def reject(settings, version, decision, reason: str | None = None) -> PromotionResult:
    """Tag ``version`` rejected with the failed rules (and ``reason``); the champion is untouched.

    A decision naming another candidate version is refused (RegistryError). If recording the
    rejection fails, the version is marked failed (:func:`mark_failed`) and the error re-raised.
    """
    version = str(version)
    _bound_version(decision, version, required=False)
    try:
        return _reject(settings, client(settings), version, decision, reason)
    except Exception as exc:
        mark_failed(settings, version, f"reject failed: {type(exc).__name__}: {exc}")
        raise


def _reject(settings, c, version: str, decision, reason: str | None) -> PromotionResult:
    reasons = ([reason] if reason else []) + list(decision.reasons)
    _record(settings, c, version, decision, "rejected", reasons or ["rejected"])
    cur = _alias_version(c, settings.model_name, CHAMPION)
    return PromotionResult(version, False, reason.split(":")[0] if reason else "gates_failed", cur, cur)


def _verify_registration(settings, c, version: str) -> None:
    """The version is READY and its ``weights_sha256`` tag is the weights hash its run recorded
    (``model_manifest.json``) at registration; RegistryError otherwise."""
    name = settings.model_name
    mv = c.get_model_version(name, version)
    status = str(getattr(mv, "status", "READY") or "READY")
    if status != "READY":
        raise RegistryError(f"version {version} is {status}, not READY")
    tags = dict(mv.tags or {})
    tagged = tags.get("weights_sha256")
    if not tagged:
        raise RegistryError(f"version {version} has no weights_sha256 tag: not registered by log_and_register")
    if tags.get("run_id") and mv.run_id and tags["run_id"] != mv.run_id:
        raise RegistryError(f"version {version}: run_id tag {tags['run_id']} is not its run {mv.run_id}")
    if not mv.run_id:
        return
    with tempfile.TemporaryDirectory(prefix="recloop-verify-") as tmp:
        try:
            path = c.download_artifacts(mv.run_id, MANIFEST, tmp)
        except Exception as exc:  # older runs without a manifest: the tag is all there is
            log.warning("version %s: no %s on run %s (%s); weights tag not cross-checked", version, MANIFEST,
                        mv.run_id, exc)
            return
        recorded = json.loads(Path(path).read_text(encoding="utf-8")).get("weights.safetensors", {}).get("sha256")
    if recorded != tagged:
        raise RegistryError(f"version {version}: weights_sha256 tag {tagged[:12]}... differs from the weights hash "
                            f"its run recorded at registration ({str(recorded)[:12]}...)")


def _set_alias(c, name: str, alias: str, version: str | None) -> None:
    from mlflow.exceptions import MlflowException

    if version is not None:
        c.set_registered_model_alias(name, alias, version)
        return
    try:
        c.delete_registered_model_alias(name, alias)
    except MlflowException:  # not set
        pass


def promote(settings, version, decision, *, lock_timeout: float = 120.0) -> PromotionResult:
    """Move ``champion`` to ``version`` if the decision passed, is about ``version`` and the
    champion is still the one it was judged against.

    Refused with RegistryError (nothing changed) when the decision is a reject, names no
    candidate version or another one, or was judged against a champion of unknown version.
    Inside the promotion lock (waiting at most ``lock_timeout`` seconds) the version's
    registration is checked (READY, ``weights_sha256`` tag = the hash its run recorded) and the
    ``champion`` alias is compared with ``decision.champion_version`` (None = no champion then):
    if it moved, the candidate is rejected with ``champion_changed``. The old champion gets
    ``previous``. Any failure after these checks (lock timeout, registry error) restores the
    aliases as they were, marks the version failed (:func:`mark_failed`) and re-raises.
    """
    version = str(version)
    if not decision.promote:
        raise RegistryError(f"version {version}: the gate decision is 'reject' ({'; '.join(decision.reasons)}); "
                            "call reject() instead")
    _bound_version(decision, version, required=True)
    if decision.has_champion and decision.champion_version is None:
        raise RegistryError("the decision was made against a champion of unknown version: pass "
                            "champion_version= to decide_promotion")
    expected = None if decision.champion_version is None else str(decision.champion_version)
    name = settings.model_name
    c = client(settings)
    try:
        with _lock(settings, timeout=lock_timeout):
            _verify_registration(settings, c, version)
            current = _alias_version(c, name, CHAMPION)
            if current != expected:
                why = (f"champion_changed: judged against {expected or 'no champion'}, "
                       f"but the champion is now version {current or 'none'}")
                return _reject(settings, c, version, decision, why)
            if current == version:
                return PromotionResult(version, True, "already champion", current, current)
            previous = _alias_version(c, name, PREVIOUS)
            try:
                if current is not None:
                    c.set_registered_model_alias(name, PREVIOUS, current)
                c.set_registered_model_alias(name, CHAMPION, version)
                extra = {"promoted_at": _now(), "replaced_version": current or ""}
                _record(settings, c, version, decision, "promoted", [], extra)
            except Exception:
                _restore_aliases(c, name, current, previous)
                raise
            if current is not None:
                try:
                    c.set_model_version_tag(name, current, "replaced_by", version)
                except Exception as exc:  # the promotion itself is complete
                    log.warning("version %s promoted, but tagging %s replaced_by failed: %s", version, current, exc)
    except Exception as exc:
        mark_failed(settings, version, f"promotion failed: {type(exc).__name__}: {exc}")
        raise
    log.info("%s version %s promoted to champion (previous: %s)", name, version, current)
    return PromotionResult(version, True, "promoted", current, version)


def _restore_aliases(c, name: str, champion: str | None, previous: str | None) -> None:
    """Put ``champion`` / ``previous`` back after a failed promotion (best effort, loud on failure)."""
    for alias, v in ((CHAMPION, champion), (PREVIOUS, previous)):
        try:
            _set_alias(c, name, alias, v)
        except Exception as exc:
            log.error("could not restore alias %s -> %s after a failed promotion: %s; check the registry",
                      alias, v or "(none)", exc)


def _short_error(error: Any) -> str:
    s = " ".join(str(error).split())
    return s if len(s) <= _MAX_ERROR else s[: _MAX_ERROR - 3] + "..."


def mark_failed(settings, version, error: str) -> None:
    """Record that judging / promoting ``version`` failed; never raises, never moves champion/previous.

    Tags the version ``gate_decision = failed``, ``gate_error`` (the error, shortened) and
    ``gate_decided_at``; writes ``gate_report.md`` on its run (a FAILED header above the report
    that was there) and tags the run; removes ``challenger`` if it points at this version. A
    version that is the champion keeps its ``gate_decision`` (it is serving: roll back to undo)
    and only gets ``gate_error``. Each step is best effort; what could not be done is logged.
    """
    name, version = settings.model_name, str(version)
    short, when = _short_error(error), _now()
    problems: list[str] = []
    try:
        c = client(settings)
    except Exception as exc:
        log.error("mark_failed(%s v%s): no registry client (%s); error was: %s", name, version, exc, short)
        return
    champion = None
    try:
        champion = _alias_version(c, name, CHAMPION)
    except Exception as exc:
        problems.append(f"read champion alias: {exc}")
    serving = champion == version
    tags = {"gate_error": short, "gate_failed_at": when}
    if not serving:
        tags.update({"gate_decision": "failed", "gate_decided_at": when})
    for k, v in tags.items():
        try:
            c.set_model_version_tag(name, version, k, v)
        except Exception as exc:
            problems.append(f"tag {k}: {exc}")
    run_id = None
    try:
        run_id = c.get_model_version(name, version).run_id
    except Exception as exc:
        problems.append(f"read version: {exc}")
    if run_id:
        before = ""
        with tempfile.TemporaryDirectory(prefix="recloop-failed-") as tmp:
            try:
                before = Path(c.download_artifacts(run_id, "gate_report.md", tmp)).read_text(encoding="utf-8")
            except Exception as exc:  # no report yet
                log.debug("version %s: no earlier gate_report.md (%s)", version, exc)
        state = ("It is the champion (serving); its gate decision was left as it is." if serving
                 else f"It was not promoted; the champion is {'version ' + champion if champion else 'none'}.")
        report = (f"# {name} version {version}: FAILED\n\n"
                  f"Judging / promoting this version failed at {when}:\n\n    {short}\n\n{state}\n")
        if before:
            report += "\n---\n\nReport before the failure:\n\n" + before
        try:
            c.log_text(run_id, report, "gate_report.md")
        except Exception as exc:
            problems.append(f"gate_report.md: {exc}")
        for k, v in ({"gate_error": short} if serving else {"gate_decision": "failed", "gate_error": short}).items():
            try:
                c.set_tag(run_id, k, v)
            except Exception as exc:
                problems.append(f"run tag {k}: {exc}")
    try:
        if _alias_version(c, name, CHALLENGER) == version:
            c.delete_registered_model_alias(name, CHALLENGER)
    except Exception as exc:
        problems.append(f"drop challenger: {exc}")
    if problems:
        log.error("mark_failed(%s v%s) could not: %s", name, version, "; ".join(problems))
    log.warning("%s version %s marked failed: %s", name, version, short)


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
    if PRUNED_TAG in (mv.tags or {}):
        raise ModelLoadError(f"version {version}: its model artifacts were pruned by the retention policy on "
                             f"{mv.tags[PRUNED_TAG]} (its MLflow record is kept; see models/retention.py)")
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
    except ModelLoadError as exc:
        # a corrupted local cache is re-fetched once; a corrupted registry copy stays an error
        log.warning("version %s: local cache %s failed verification (%s); re-fetching from the registry",
                    version, _cache_dir(settings, version), exc)
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
            "gate_reasons": ((tags.get("gate_error") if tags.get("gate_decision") == "failed" else None)
                             or tags.get("gate_reasons") or tags.get("rollback_reason") or ""),
            "gates": {k[len("gate_"):]: v for k, v in tags.items()
                      if k.startswith("gate_") and k not in ("gate_decision", "gate_reasons", "gate_decided_at",
                                                             "gate_error", "gate_failed_at")},
            "metrics": {k: metrics[k] for k in sorted(metrics) if not k.startswith("champion_")
                        and not k.startswith(("train_", "val_"))},
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
            "run_id": mv.run_id,
            "lineage": {k: tags[k] for k in ("snapshot_hash", "window_start", "window_end", "trigger_reason",
                                             "prefect_flow_run_id", "git_commit") if k in tags},
        })
    return out
