"""Limits and access: body-size cap (413), bearer token (401), per-user feedback rate (429).

* :class:`BodySizeLimit` is plain ASGI middleware: a declared ``Content-Length`` above the
  cap is refused before any byte is read, and a body streamed without one (chunked) is
  counted as it arrives and refused the moment it passes the cap — the app never holds
  more than ``max_body_bytes`` of a request.
* :func:`require_token` compares ``Authorization: Bearer <token>`` in constant time; it is
  a no-op when ``serving.token`` is unset (loopback default).
* :class:`RateLimiter` is a token bucket per key (the user id): ``rate_per_minute`` events
  per minute with a burst of the same size; memory is bounded (idle buckets are dropped).
"""

from __future__ import annotations

import hmac
import json
import threading
import time

from fastapi import HTTPException, Request


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
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


async def _reply(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def check_token(request: Request, token: str | None) -> None:
    if not token:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


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
        if self.rate <= 0:
            return False, 60.0
        now = self.clock()
        with self._lock:
            levels = {k: self._level(k, now) for k in costs}
            short = {k: costs[k] - levels[k] for k in costs if costs[k] > levels[k]}
            if short:
                return False, max(max(short.values()) / self.rate, 1.0)
            if len(self._buckets) > self.max_keys:
                self._prune(now)
            for k, c in costs.items():
                self._buckets[k] = (levels[k] - c, now)
            return True, 0.0

    def _prune(self, now: float) -> None:
        full = [k for k in self._buckets if self._level(k, now) >= self.burst]
        for k in full:
            del self._buckets[k]
