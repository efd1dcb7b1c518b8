"""Structured logs with the request id, and the outermost middleware that sets it.

Every log line is one JSON object (``ts``, ``level``, ``logger``, ``msg``, ``request_id`` and any
``extra=`` fields) when ``json_logs`` is on. ``X-Request-ID`` is honoured when it is a sane token and
generated otherwise; it is returned on every response (including 413/429 from the limit middlewares)
and carried in a context variable so that any log line inside the request carries it. The same
middleware writes the access log line and the per-endpoint request metrics.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.telemetry import ServiceMetrics

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = contextvars.ContextVar[str | None]("request_id", default=None)
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured duplicate of msg
    # stamped on every record once Ray or vLLM is imported (their record factories), not ``extra=`` fields
    "_ray_timestamp_ns",
    "vllm_process_name",
}
access_log = logging.getLogger("service.access")


def current_request_id() -> str | None:
    return _REQUEST_ID.get()


class JSONFormatter(logging.Formatter):
    """One JSON object per record; ``extra`` fields are kept, secrets are never passed in."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or current_request_id()
        if request_id:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id() or "-"
        return True


def configure_logging(level: int | str = "INFO", json_logs: bool = True) -> None:
    """Route the root logger (and uvicorn's) to one stderr handler with our format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if json_logs:
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_dpo4rec", False)]:
        root.removeHandler(old)
    handler._dpo4rec = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our access line carries the request id


def _request_id_from(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _SAFE_ID.match(text):
                return text
            break
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Request id in, request id out; access log line; request count and latency per endpoint."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id_from(scope)
        token = _REQUEST_ID.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint=endpoint, method=scope["method"], status=str(status)).inc()
            self.metrics.request_seconds.labels(endpoint=endpoint).observe(seconds)
            if endpoint not in ("/livez", "/readyz", "/metrics"):
                access_log.info(
                    "%s %s %d %.1f ms",
                    scope["method"],
                    scope["path"],
                    status,
                    seconds * 1000,
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round(seconds * 1000, 2),
                    },
                )
            _REQUEST_ID.reset(token)
