"""Limits and access: Host check (400), header size (431), body size (413), JSON-only writes (415),
bearer token (401), feedback rates (429), and the bind policy of ``recloop serve``.

* :class:`RequestGuard` is plain ASGI middleware, in this order: the ``Host`` header must name
  an allowed host (:func:`allowed_hosts`; a DNS-rebinding page cannot reach a loopback server
  under its own name; ``GET /health`` is exempt, as orchestrator probes send the pod address);
  the request headers must fit ``max_header_bytes`` (uvicorn's h11 parser enforces the same
  limit on the wire before buffering more, see ``serving/commands.py``); a declared
  ``Content-Length`` above ``max_body_bytes`` is refused before any byte is read, and a body
  streamed without one (chunked) is counted as it arrives and refused the moment it passes the
  cap — the app never holds more than ``max_body_bytes`` of a request.
* :func:`require_json` refuses write bodies that are not ``application/json`` (415): browsers
  send ``text/plain`` and form bodies cross-site without a CORS preflight, JSON they do not.
* :func:`check_token` compares ``Authorization: Bearer <token>`` in constant time; it is a no-op
  when ``serving.token`` is unset, which :func:`check_bind` allows on loopback hosts only.
* :class:`RateLimiter` is a token bucket per key: ``rate_per_minute`` events per minute with a
  burst of the same size; memory is bounded (idle buckets are dropped). :func:`acquire_all`
  charges several (global, per client address, per user id) all or nothing.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import threading
import time
from contextlib import ExitStack

from fastapi import HTTPException, Request

from serving.options import option

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class _TooLarge(Exception):
    pass


class RequestGuard:
    """Host, header-size and body-size limits in front of the app (see the module docstring)."""

    def __init__(self, app, max_bytes: int, max_header_bytes: int | None = None,
                 hosts: list[str] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.max_header_bytes = max_header_bytes
        self.hosts = None if hosts is None or "*" in hosts else [h.lower() for h in hosts]

    def _host_ok(self, scope) -> bool:
        if self.hosts is None or (scope.get("method") == "GET" and scope.get("path") == "/health"):
            return True
        host = next((v for k, v in scope.get("headers", []) if k == b"host"), b"").decode("latin-1")
        return host_matches(host, self.hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers", [])
        if self.max_header_bytes is not None:
            size = len(scope.get("raw_path") or scope.get("path", "").encode()) + len(scope.get("query_string", b""))
            size += sum(len(k) + len(v) + 4 for k, v in headers)
            if size > self.max_header_bytes:
                return await _reply(send, 431, f"request headers over the {self.max_header_bytes}-byte limit")
        if not self._host_ok(scope):
            return await _reply(send, 400, "Host header not allowed (serving.allowed_hosts)")
        for name, value in headers:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _reply(send, 400, "invalid Content-Length header")
                if declared > self.max_bytes:
                    return await _reply(send, 413, f"request body over the {self.max_bytes}-byte limit")
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _reply(send, 413, f"request body over the {self.max_bytes}-byte limit")


class BodySizeLimit(RequestGuard):
    """The body-size limit alone (kept for callers of the old name)."""

    def __init__(self, app, max_bytes: int):
        super().__init__(app, max_bytes)


def host_matches(host_header: str, allowed: list[str]) -> bool:
    """``Host: name[:port]`` against allowed names (``*.example.com`` matches its subdomains)."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if not host:
        return False
    for name in allowed:
        name = name.strip("[]")
        if host == name or (name.startswith("*.") and host.endswith(name[1:])):
            return True
    return False


def is_loopback(host: str) -> bool:
    host = (host or "").strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(serving_settings, bind_host: str | None = None) -> list[str] | None:
    """The Host names served: ``allowed_hosts`` when set (``["*"]``: any, returns None), else the
    loopback names plus the bind host (unless it is a wildcard address)."""
    configured = option(serving_settings, "allowed_hosts")
    if configured:
        return None if "*" in configured else list(configured)
    names = list(LOOPBACK_NAMES)
    host = (bind_host or serving_settings.host or "").strip("[]")
    if host and host not in ("0.0.0.0", "::") and host not in names:
        names.append(host)
    return names


def check_bind(host: str, token: str | None, insecure: bool) -> str | None:
    """Why serving on ``host`` is refused (None: allowed). Without a token only loopback is allowed,
    unless ``insecure``; with ``insecure`` the caller warns."""
    if is_loopback(host) or token or insecure:
        return None
    return (f"refusing to serve on {host!r} without a token: anyone who can reach it could write feedback "
            "and reload models. Set RECLOOP_SERVING__TOKEN (or --token), bind 127.0.0.1, or pass --insecure.")


async def _reply(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def has_token(request: Request, token: str | None) -> bool:
    """The request carries ``Authorization: Bearer <token>`` (False when no token is configured)."""
    if not token:
        return False
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def check_token(request: Request, token: str | None) -> None:
    if token and not has_token(request, token):
        raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


def require_json(request: Request, body_optional: bool = False) -> None:
    """415 unless the body is ``application/json`` (or ``*+json``); ``body_optional``: no body is fine."""
    ctype = request.headers.get("content-type")
    if ctype is None and body_optional and request.headers.get("content-length", "0") == "0" \
            and "transfer-encoding" not in request.headers:
        return
    media = (ctype or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise HTTPException(status_code=415, detail=f"expected Content-Type: application/json, got {ctype or 'none'}")


def client_key(request: Request) -> str:
    """Who is calling, for the per-client rate: the remote address (behind a proxy, the one uvicorn
    takes from X-Forwarded-For when the proxy is in ``forwarded_allow_ips``)."""
    return f"ip:{request.client.host}" if request.client else "ip:unknown"


class RateLimiter:
    """Token bucket per key: ``rate_per_minute`` tokens per minute, burst ``rate_per_minute``."""

    def __init__(self, rate_per_minute: int, max_keys: int = 100_000, clock=time.monotonic):
        self.rate = rate_per_minute / 60.0
        self.burst = float(rate_per_minute)
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def _level(self, key: str, now: float) -> float:
        level, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, level + (now - at) * self.rate)

    def try_acquire(self, costs: dict[str, int]) -> tuple[bool, float]:
        """Take ``costs[key]`` tokens from each key's bucket, all or nothing.

        Returns ``(ok, retry_after_seconds)``.
        """
        ok, retry, _ = acquire_all([(self, costs, "")])
        return ok, retry

    def _shortfall(self, costs: dict[str, int], now: float) -> float:
        """Seconds until every key can pay (0: now); caller holds the lock."""
        if self.rate <= 0:
            return 60.0
        short = [costs[k] - self._level(k, now) for k in costs]
        worst = max(short, default=0.0)
        return max(worst / self.rate, 1.0) if worst > 0 else 0.0

    def _take(self, costs: dict[str, int], now: float) -> None:
        levels = {k: self._level(k, now) for k in costs}
        if len(self._buckets) > self.max_keys:
            self._prune(now)
        for k, c in costs.items():
            self._buckets[k] = (levels[k] - c, now)

    def _prune(self, now: float) -> None:
        full = [k for k in self._buckets if self._level(k, now) >= self.burst]
        for k in full:
            del self._buckets[k]


def acquire_all(charges: list[tuple[RateLimiter, dict[str, int], str]]) -> tuple[bool, float, str | None]:
    """Charge every ``(limiter, costs, scope)`` or none: ``(ok, retry_after_seconds, refusing scope)``."""
    with ExitStack() as stack:
        for limiter, _, _ in charges:
            stack.enter_context(limiter._lock)
        stamped = [(lim, costs, scope, lim.clock()) for lim, costs, scope in charges]
        for lim, costs, scope, now in stamped:
            wait = lim._shortfall(costs, now)
            if wait > 0:
                return False, wait, scope
        for lim, costs, _, now in stamped:
            lim._take(costs, now)
    return True, 0.0, None
