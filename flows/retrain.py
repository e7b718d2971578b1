"""The retrain flow: each task calls one step of models/pipeline.py.

Runs one at a time (Prefect global concurrency limit ``recloop-retrain``); a failure in
any task turns the run red with the reason and leaves the champion untouched, because
promotion is the last step.
"""

from __future__ import annotations

import json
import signal
import threading
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from flows.events import MODEL_PROMOTED, MODEL_REJECTED, emit
from models import pipeline
from monitoring import storm
from recloop.paths import confine
from recloop.settings import load_settings
from recloop.store import atomic_write_json

RETRAIN_LIMIT = "recloop-retrain"

prepare = task(pipeline.prepare_retrain_data, name="snapshot-and-split", retries=2, retry_delay_seconds=[2, 10],
               cache_policy=NO_CACHE)
champion = task(pipeline.load_champion_for_eval, name="load-champion", retries=2, retry_delay_seconds=[2, 10],
                cache_policy=NO_CACHE)
train = task(pipeline.train_candidate, name="train-candidate", cache_policy=NO_CACHE)
evaluate = task(pipeline.evaluate_model, name="evaluate", cache_policy=NO_CACHE)
baselines = task(pipeline.evaluate_baselines, name="baselines", cache_policy=NO_CACHE)
check_window = task(pipeline.check_champion_window, name="check-champion-window", cache_policy=NO_CACHE)


@task(name="decide", cache_policy=NO_CACHE)
def decide(candidate_eval, champion_eval, settings, baseline_evals, candidate_version, champion_version=None):
    from models.gates import decide_promotion

    return decide_promotion(candidate_eval, champion_eval, settings, baseline_evals,
                            candidate_version=candidate_version, champion_version=champion_version)


@task(name="log-and-register", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def register(settings, **kwargs):
    from models.registry import log_and_register

    return log_and_register(settings, **kwargs)


@task(name="promote-or-reject", cache_policy=NO_CACHE)
def promote_or_reject(settings, version, decision):
    from models.registry import champion_version, promote, reject

    if decision.promote:
        promote(settings, version, decision)
    else:
        reject(settings, version, decision)
    return champion_version(settings)


class Terminated(BaseException):
    """A retrain stopped by a signal (SIGTERM from a supervisor, a worker shutting down)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


@contextmanager
def _sigterm_raises():
    """In the main thread, turn SIGTERM into :class:`Terminated` so the audit line records it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ensure_retrain_limit() -> None:
    """Create the global concurrency limit (1 slot) if it does not exist."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(RETRAIN_LIMIT)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=RETRAIN_LIMIT, limit=1))
        except ObjectAlreadyExists:  # another run created it in between
            pass


@flow(name="retrain", log_prints=True,
      description="Snapshot the store, train a candidate, judge it against the champion on the same events, "
                  "register it in MLflow and promote it only if every gate passes.")
def retrain_flow(reason: str = "manual", workspace: str | None = None, drift_report: str | None = None) -> dict:
    settings = load_settings(workspace)
    # an event without a report renders the template as ""; a report must lie under reports/ (it is uploaded)
    drift_report = str(confine(drift_report, settings.reports_dir)) if drift_report else None
    logger = get_run_logger()
    ensure_retrain_limit()
    with concurrency(RETRAIN_LIMIT, occupy=1, strict=True):
        held_from = datetime.now(UTC).isoformat()
        storm.mark_retrain_started(settings, reason=reason)  # storm control: now running
        ok, error, signame = False, None, None
        try:
            with _sigterm_raises():
                outcome = _retrain(settings, reason, drift_report, logger)
            ok = True
        except Terminated as exc:
            error, signame = str(exc), signal.Signals(exc.signum).name
            logger.error("retrain %s, champion untouched", error)
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            logger.error("retrain failed, champion untouched: %s", error)
            raise
        finally:
            if signame is None:
                _housekeeping(settings, logger)
            storm.mark_retrain_finished(settings, succeeded=ok)
            _audit(settings, {"flow_run_id": str(runtime.flow_run.id or ""), "reason": reason, "held_from": held_from,
                              "held_to": datetime.now(UTC).isoformat(), "succeeded": ok, "error": error,
                              "signal": signame})
    return outcome


def _housekeeping(settings, logger) -> None:
    """Retention after every retrain (models/retention.py); a failure here is logged, never fatal."""
    from models.retention import housekeeping

    try:
        done = housekeeping(settings)
    except Exception as exc:
        logger.warning("housekeeping failed (nothing about the model changes): %s: %s", type(exc).__name__, exc)
        return
    logger.info("housekeeping: pruned versions %s, disk %.1f -> %.1f MB (models + local artifact store)",
                done["pruned"] or "none", done["disk_bytes_before"] / 1e6, done["disk_bytes_after"] / 1e6)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(done, settings.state_dir / "housekeeping.json")


def _audit(settings, record: dict) -> None:
    """One line per retrain that held the slot: when, why, how it ended (state/retrain_runs.jsonl)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with (settings.state_dir / "retrain_runs.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _retrain(settings, reason, drift_report, logger) -> dict:
    champ_model, champ_version = champion(settings)
    data = prepare(settings, champion_trained_until=pipeline.champion_train_end(champ_model))
    logger.info("window %s .. %s: %d train / %d eval events (eval: %s), snapshot %s, feature lag %s",
                data.train_start, data.eval_end, len(data.train), len(data.eval), data.cut_reason,
                data.snapshot.hash[:12], data.feature_lag)
    check_window(champ_model, data)
    trained, model_dir = train(settings, data)
    cand_eval = evaluate(settings, trained.model, data)
    champ_eval = evaluate(settings, champ_model, data) if champ_model is not None else None
    base_evals = baselines(settings, data)
    flow_run_id = str(runtime.flow_run.id) if runtime.flow_run.id else ""
    lineage = {**data.lineage(), "trigger_reason": reason, "prefect_flow_run_id": flow_run_id,
               "git_commit": pipeline.git_commit() or "", "champion_version_judged_against": champ_version or "",
               "champion_trained_until": str(pipeline.champion_train_end(champ_model) or ""),
               "epochs_chosen": str(trained.model.config.get("epochs_chosen", "")),
               "refit_full": str(trained.model.config.get("refit_full", ""))}
    # judged before registration (a failure here registers nothing); bound to the version right after
    decision = decide(cand_eval, champ_eval, settings, base_evals, None, champ_version)
    run_id, version = register(
        settings, model_dir=model_dir, evaluation=cand_eval, champion_evaluation=champ_eval, decision=decision,
        lineage=lineage, params=getattr(trained, "params", {}), history=trained.history, train_data=data.train,
        drift_report_path=drift_report, baseline_evaluations=base_evals,
    )
    try:
        decision = decision.with_versions(candidate_version=str(version))
        after = promote_or_reject(settings, version, decision)
        promoted = decision.promote and after == str(version)
        outcome = pipeline.RetrainOutcome(
            version=str(version), promoted=promoted, reason=reason, decision=decision.to_dict(),
            candidate_metrics=cand_eval.to_dict(),
            champion_metrics=None if champ_eval is None else champ_eval.to_dict(),
            baseline_metrics={k: v.to_dict() for k, v in base_evals.items()},
            champion_version_before=champ_version, champion_version_after=after,
            train_seconds=float(trained.seconds), run_id=run_id, lineage=lineage,
        ).to_dict()
        _report(settings, outcome, decision, reason, champ_version, after, promoted)
    except BaseException as exc:  # anything after registration: the version says it failed, champion untouched
        from models.registry import mark_failed

        mark_failed(settings, str(version), f"{type(exc).__name__}: {exc}")
        raise
    logger.info("version %s %s (champion now %s)", version, "promoted" if promoted else "rejected", after)
    return outcome


def _report(settings, outcome: dict, decision, reason: str, champ_version, after, promoted: bool) -> None:
    version = outcome["version"]
    report_dir = settings.reports_dir / "retrain"
    atomic_write_json(outcome, report_dir / f"version-{version}.json")
    atomic_write_json(outcome, report_dir / "latest.json")
    create_markdown_artifact(
        key="gate-report",
        markdown=f"# Retrain: version {version} {'PROMOTED' if promoted else 'REJECTED'}\n\n"
                 f"Trigger: `{reason}`. Champion before: `{champ_version}`, after: `{after}`.\n\n"
                 + decision.to_markdown(),
        description=f"Gate decision for {settings.model_name} v{version}",
    )
    emit(settings, MODEL_PROMOTED if promoted else MODEL_REJECTED,
         {"version": str(version), "reason": reason, "champion_before": champ_version, "champion_after": after,
          "decision": decision.to_dict()})


def latest_outcome(settings) -> dict | None:
    path = Path(settings.reports_dir) / "retrain" / "latest.json"
    return json.loads(path.read_text()) if path.exists() else None
