"""Request limits as pure ASGI middlewares: the in-flight cap (429 + Retry-After) and the body size (413).

Pure ASGI (not ``BaseHTTPMiddleware``) so nothing is buffered or re-wrapped beyond what each limit
needs. The in-flight cap covers the work endpoints only: probes and metrics must answer under load.
The counter doubles as the drain gauge of graceful shutdown: once closing, new work gets a 503 and
the lifespan waits (bounded) until the in-flight count reaches zero before stopping the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTooLargeError, OverloadedError, ServiceError, UnavailableError, error_response
from service.telemetry import ServiceMetrics

log = logging.getLogger(__name__)


class InFlightLimiter:
    """Counts work requests in flight; refuses beyond ``limit`` and after :meth:`close`."""

    def __init__(self, limit: int, retry_after_s: int, metrics: ServiceMetrics):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.count = 0
        self.closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    def try_enter(self) -> ServiceError | None:
        """None if admitted (the caller must :meth:`leave`), else the error to answer with."""
        if self.closing:
            self.metrics.rejected.labels(reason="shutting_down").inc()
            return UnavailableError("the service is shutting down; retry on another replica")
        if self.count >= self.limit:
            self.metrics.rejected.labels(reason="in_flight_cap").inc()
            return OverloadedError(self.limit, self.retry_after_s)
        self.count += 1
        self._idle.clear()
        self.metrics.in_flight.set(self.count)
        return None

    def leave(self) -> None:
        self.count -= 1
        self.metrics.in_flight.set(self.count)
        if self.count == 0:
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work and wait for the in-flight requests; False if some were still running."""
        self.closing = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("shutdown: %d requests still in flight after %.1f s", self.count, timeout_s)
            return False
        return True


class InFlightLimitMiddleware:
    def __init__(self, app: ASGIApp, limiter: InFlightLimiter, paths: Collection[str]):
        self.app = app
        self.limiter = limiter
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        refused = self.limiter.try_enter()
        if refused is not None:
            await error_response(refused)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.limiter.leave()


class BodySizeLimitMiddleware:
    """413 for a body over ``max_bytes``: from Content-Length at once, else while reading it."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: ServiceMetrics):
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.rejected.labels(reason="body_too_large").inc()
        await error_response(BodyTooLargeError(self.max_bytes))(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._refuse(scope, receive, send)
                    return
        # Read the body here (it is small by construction) so an undeclared oversize body is
        # refused before the app starts; then replay it.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
