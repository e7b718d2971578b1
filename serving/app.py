"""The serving API: ``create_app(settings, model_source=None)``.

Routes
  ``GET  /recommend?user_id=&k=``      top-K for a user (history-based; cold start: popular and diverse)
  ``GET  /search?q=&user_id=&k=``      top-K for a query text, personalised when a user is given
  ``POST /feedback``                   one event or ``{"events": [...]}`` -> ``landing/`` (202, idempotent)
  ``GET  /health``                     200 ``ready`` / ``degraded`` (a fallback model) when a model is loaded, else 503
  ``GET  /model``                      served version, trained window, metrics (no file paths without the token)
  ``POST /admin/reload``               poll the registry and refresh the store view now (token)
  ``GET  /docs``, ``/redoc``           the API pages, from local assets (``serving/apidocs.py``)

Everything a request needs is read once at its start (``holder.current``,
``view.data``), so background swaps never change a response half-way. Limits and access
are in ``serving/security.py``, request/response models in ``serving/schemas.py``.
"""


import logging
import re
import threading
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated

import numpy as np
import pydantic_core
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from recloop.store import FeedbackStore
from serving import ranking
from serving.apidocs import mount_api_docs
from serving.feedback import FeedbackWriter, ImpressionLog, impressions_dir
from serving.lifecycle import ModelHolder, ModelSource, RegistryModelSource
from serving.options import option
from serving.schemas import (
    COMMON_RESPONSES,
    FEEDBACK_REQUEST_BODY,
    FEEDBACK_RESPONSES,
    HEALTH_RESPONSES,
    ID_MAX,
    ID_PATTERN,
    MODEL_RESPONSES,
    FeedbackBatchIn,
    FeedbackIn,
    add_component_schemas,
)
from serving.security import (
    RateLimiter,
    RequestGuard,
    acquire_all,
    allowed_hosts,
    check_token,
    client_key,
    has_token,
    require_json,
)
from serving.storeview import StoreView

log = logging.getLogger(__name__)

__all__ = ["FeedbackBatchIn", "FeedbackIn", "create_app", "public_info"]


def _errors(exc: ValidationError) -> list[dict]:
    """Validation errors without echoing the (possibly huge) input back."""
    out = []
    for e in exc.errors(include_url=False, include_input=False)[:50]:
        e.pop("ctx", None)
        out.append({"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")})
    return out


def _unprocessable(detail) -> HTTPException:
    return HTTPException(status_code=422, detail=detail)


def create_app(settings, model_source: ModelSource | None = None, start_background: bool = True) -> FastAPI:
    """Build the app. ``model_source`` defaults to the MLflow registry's champion alias.

    ``start_background=False`` skips the polling/refresh and impression-flush threads (tests drive
    ``app.state.holder`` by hand); the initial store read and model load still happen at startup.
    """
    s = settings.serving
    settings.ensure_dirs()
    source = model_source if model_source is not None else RegistryModelSource(settings)
    view = StoreView(FeedbackStore.from_settings(settings))  # files, or Iceberg tables (services.store)
    holder = ModelHolder(source, view, settings)
    # the id log in PostgreSQL and landing to the object store when services are configured
    writer = FeedbackWriter.from_settings(settings, flush_events=option(s, "feedback_flush_events"),
                                          flush_seconds=option(s, "feedback_flush_seconds"))
    impressions = ImpressionLog(impressions_dir(settings), s.impression_flush_seconds)
    limiter = RateLimiter(s.feedback_rate_per_minute)  # per user id
    client_limiter = RateLimiter(option(s, "feedback_rate_per_client_per_minute"))
    global_limiter = RateLimiter(option(s, "feedback_rate_global_per_minute"))
    seeds = np.random.default_rng(s.seed)
    seeds_lock = threading.Lock()

    def rng() -> np.random.Generator:
        with seeds_lock:
            return np.random.default_rng(int(seeds.integers(2**63)))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if s.torch_threads:
            import torch

            torch.set_num_threads(s.torch_threads)  # requests run in parallel threads: one core each
            _limit_blas_threads(s.torch_threads)
        view.refresh(force=True)
        holder.poll_once()
        if start_background:
            holder.start()
            impressions.start()
            writer.start()
        try:
            yield
        finally:
            holder.stop()
            impressions.stop()
            writer.close()  # lands the open feedback batch

    app = FastAPI(title="recloop serving", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Search and recommendations from the champion model; feedback into landing/.")
    mount_api_docs(app)  # /docs and /redoc with local assets: they work offline
    app.state.settings, app.state.holder, app.state.view = settings, holder, view
    app.state.writer, app.state.impressions, app.state.limiter = writer, impressions, limiter
    app.state.client_limiter, app.state.global_limiter = client_limiter, global_limiter
    app.add_middleware(RequestGuard, max_bytes=s.max_body_bytes, max_header_bytes=option(s, "max_header_bytes"),
                       hosts=allowed_hosts(s))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        return JSONResponse({"detail": errs[:50]}, status_code=422)

    _add_query_routes(app, rng)
    _add_feedback_route(app)
    _add_operator_routes(app)

    def openapi():
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = add_component_schemas(doc)
        return app.openapi_schema

    app.openapi = openapi
    return app


def _served_or_503(holder: ModelHolder):
    cur = holder.current
    if cur is None:
        raise HTTPException(status_code=503, detail="no model loaded yet", headers={"Retry-After": "5"})
    return cur


def _add_query_routes(app: FastAPI, rng) -> None:
    """``GET /recommend`` and ``GET /search``: rank with the served model, log the impression, answer."""
    settings, holder, view, impressions = (app.state.settings, app.state.holder, app.state.view,
                                           app.state.impressions)
    s = settings.serving

    def log_impression(endpoint: str, user_id: str | None, query: str | None, served, ranked) -> str:
        impression_id = uuid.uuid4().hex
        ts = datetime.now(UTC).isoformat()
        impressions.log([{"impression_id": impression_id, "timestamp": ts, "endpoint": endpoint, "user_id": user_id,
                          "query": query, "item_id": it["item_id"], "rank": it["rank"], "score": it["score"],
                          "explored": it["explored"], "model_version": served.version} for it in ranked.items])
        return impression_id

    def answer(endpoint, user_id, query, served, ranked, t0):
        impression_id = log_impression(endpoint, user_id, query, served, ranked)
        body = {"impression_id": impression_id, "model_version": served.version, "user_id": user_id,
                "cold_start": ranked.cold_start, "n_candidates": ranked.n_candidates, "items": ranked.items,
                "took_ms": round((time.perf_counter() - t0) * 1000, 2)}
        if query is not None:
            body["query"] = query
        return JSONResponse(body, headers={"X-Model-Version": served.version})

    UserId = Annotated[str, Query(min_length=1, max_length=ID_MAX, pattern=ID_PATTERN)]
    K = Annotated[int, Query(ge=1, le=s.max_k)]

    @app.get("/recommend", responses=MODEL_RESPONSES)
    def recommend(user_id: UserId, k: K = 10):
        t0 = time.perf_counter()
        served = _served_or_503(holder)
        ranked = ranking.recommend(served, view.data, settings, user_id, k, rng())
        return answer("recommend", user_id, None, served, ranked, t0)

    @app.get("/search", responses=MODEL_RESPONSES)
    def search(q: Annotated[str, Query(min_length=1, max_length=settings.checks.max_query_chars)],
               user_id: Annotated[str | None, Query(min_length=1, max_length=ID_MAX, pattern=ID_PATTERN)] = None,
               k: K = 10):
        t0 = time.perf_counter()
        query = q.strip()
        if not query:
            raise _unprocessable([{"loc": ["query", "q"], "msg": "query is blank", "type": "value_error"}])
        served = _served_or_503(holder)
        ranked = ranking.search(served, view.data, settings, query, user_id, k, rng())
        return answer("search", user_id, query, served, ranked, t0)


def _add_feedback_route(app: FastAPI) -> None:
    """``POST /feedback``: validated, rate-limited, written through the micro-batching writer (202)."""
    settings, view, writer, impressions = app.state.settings, app.state.view, app.state.writer, app.state.impressions
    limiter, client_limiter, global_limiter = app.state.limiter, app.state.client_limiter, app.state.global_limiter
    s = settings.serving

    @app.post("/feedback", status_code=202, responses=FEEDBACK_RESPONSES, openapi_extra=FEEDBACK_REQUEST_BODY)
    async def feedback(request: Request):
        check_token(request, s.token)
        require_json(request)
        body = await request.body()  # the size cap (middleware) already bounds this
        events = _parse_feedback(body, s.max_batch_events)
        now = datetime.now(UTC)
        late = now + timedelta(seconds=settings.checks.future_tolerance_s)
        future = [e.event_id for e in events if e.timestamp > late]
        if future:
            raise _unprocessable([{"loc": ["body", "timestamp"], "type": "value_error",
                                   "msg": f"timestamps in the future for event ids {future[:10]}"}])
        catalog = view.data.catalog
        unknown = sorted({e.item_id for e in events if e.item_id not in catalog.index})
        if unknown:
            raise _unprocessable([{"loc": ["body", "item_id"], "type": "value_error",
                                   "msg": f"unknown item ids (not in the catalog): {unknown[:10]}"}])
        n = len(events)
        ok, retry, scope = acquire_all([(global_limiter, {"*": n}, "the server"),
                                        (client_limiter, {client_key(request): n}, "this client"),
                                        (limiter, Counter(e.user_id for e in events), "this user")])
        if not ok:
            raise HTTPException(status_code=429, detail=f"feedback rate limit exceeded for {scope}",
                                headers={"Retry-After": str(int(np.ceil(retry)))})
        rows = [e.model_dump(exclude={"impression_id"}) for e in events]
        result = await _run_sync(writer.write, rows)
        impressions.link([{"event_id": e.event_id, "impression_id": e.impression_id, "user_id": e.user_id,
                           "item_id": e.item_id, "event_type": e.event_type}
                          for e in events if e.impression_id])
        return JSONResponse({"accepted": result.accepted, "duplicates": result.duplicates,
                             "batch_file": result.batch_file}, status_code=202)


def _add_operator_routes(app: FastAPI) -> None:
    """``GET /health``, ``GET /model`` (paths only for token holders) and ``POST /admin/reload``."""
    settings, holder, view = app.state.settings, app.state.holder, app.state.view
    s = settings.serving

    @app.get("/health", responses=HEALTH_RESPONSES)
    def health(request: Request):
        cur = holder.current
        status = ("degraded" if holder.degraded else "ready") if cur else "no_model"
        body = {"status": status, "model_version": cur.version if cur else None,
                "items_indexed": len(cur.index) if cur else 0, "events_cached": view.data.n_kept,
                "events_counted": view.data.n_events,
                "degraded_reason": holder.degraded, "last_error": holder.last_error}
        return JSONResponse(body if has_token(request, s.token) else public_info(body), status_code=200 if cur else 503)

    @app.get("/model", responses=MODEL_RESPONSES)
    def model_info(request: Request):
        cur = _served_or_503(holder)
        info = dict(cur.info)
        out = {"version": cur.version, "loaded_at": cur.loaded_at, "source": info.pop("source", None),
               "trained_window": info.pop("trained_window", None), "metrics": info.pop("metrics", None),
               "items_indexed": len(cur.index), "index_build_seconds": round(cur.index.build_seconds, 3),
               "details": info}
        return out if has_token(request, s.token) else public_info(out)

    @app.post("/admin/reload", responses={**COMMON_RESPONSES, 401: FEEDBACK_RESPONSES[401],
                                          415: FEEDBACK_RESPONSES[415]})
    def reload(request: Request):
        check_token(request, s.token)
        require_json(request, body_optional=True)
        refreshed = holder.refresh_data()
        swapped = holder.poll_once()
        cur = holder.current
        out = {"swapped": swapped, "store_refreshed": refreshed, "model_version": cur.version if cur else None,
               "degraded_reason": holder.degraded, "last_error": holder.last_error}
        return out if has_token(request, s.token) else public_info(out)


_PATH = re.compile(r"(?:(?<![^\s'\"=(])|(?<=local:))(?:file://)?(?:/|~/|[A-Za-z]:[\\/])[^\s'\",;]*")
_PATH_KEYS = ("path", "dir", "directory", "root", "file", "uri")


def public_info(info):
    """``info`` without filesystem paths (anonymous ``GET /model``): keys naming a path or folder are
    dropped, and any path inside a string is cut to its last component."""
    if isinstance(info, dict):
        return {k: public_info(v) for k, v in info.items()
                if not (isinstance(k, str) and k.lower().rsplit("_", 1)[-1] in _PATH_KEYS and k != "source")}
    if isinstance(info, list | tuple):
        return [public_info(v) for v in info]
    if isinstance(info, str):
        return _PATH.sub(lambda m: "…/" + m.group(0).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1], info)
    return info


def _limit_blas_threads(n: int) -> None:
    """Cap numpy's BLAS pool (the retrieval matvec) like torch's: with its default of one thread per
    core, OpenBLAS threads spin against the request threads and the rest of the machine (measured
    in-process at 100k items: /recommend p99 35-70 ms with 2 BLAS threads, 13-14 ms with 1)."""
    try:
        import threadpoolctl
    except ImportError:  # optional: then the BLAS default stays
        log.info("threadpoolctl not installed: BLAS threads left at their default")
        return
    # threadpoolctl lets only one "controlling" thread set OpenBLAS limits; the server owns the process
    clear = getattr(getattr(threadpoolctl, "OpenBLASController", None), "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)
    threadpoolctl.threadpool_limits(limits=n, user_api="blas")


async def _run_sync(fn, *args):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def _parse_feedback(body: bytes, max_events: int) -> list[FeedbackIn]:
    """One event, ``{"events": [...]}`` or a bare list -> validated events (422 on anything else)."""
    if not body.strip():
        raise _unprocessable([{"loc": ["body"], "msg": "empty body", "type": "missing"}])
    try:
        doc = pydantic_core.from_json(body)  # Rust parser: depth-limited, never a RecursionError
    except ValueError as exc:
        raise _unprocessable([{"loc": ["body"], "msg": f"invalid JSON: {str(exc)[:200]}", "type": "json_invalid"}])
    if isinstance(doc, list):
        doc = {"events": doc}
    if not isinstance(doc, dict):
        raise _unprocessable([{"loc": ["body"], "msg": "expected an event object, a list or {\"events\": [...]}",
                               "type": "type_error"}])
    if isinstance(doc.get("events"), list) and len(doc["events"]) > max_events:
        raise _unprocessable([{"loc": ["body", "events"], "type": "too_long",
                               "msg": f"at most {max_events} events per request"}])
    try:
        if "events" in doc:
            return FeedbackBatchIn.model_validate(doc).events
        return [FeedbackIn.model_validate(doc)]
    except ValidationError as exc:
        raise _unprocessable(_errors(exc))
