"""Optional API keys: ``Authorization: Bearer <key>`` on the work endpoints.

The check is a pure ASGI middleware so an unauthenticated request is refused (401) before its body
is read or parsed. Keys are compared with ``hmac.compare_digest`` against every configured key (no
early exit, so timing tells nothing about which key nearly matched), kept as ``SecretStr`` and never
logged. :data:`bearer_scheme` only documents the scheme in OpenAPI.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection, Sequence

from fastapi.security import HTTPBearer
from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import AuthenticationError, error_response
from service.telemetry import ServiceMetrics

bearer_scheme = HTTPBearer(auto_error=False, description="an API key from DPO4REC_API_KEYS")


def key_matches(presented: str, keys: Sequence[SecretStr]) -> bool:
    given = presented.encode("utf-8")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.get_secret_value().encode("utf-8"))
    return matched


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class ApiKeyMiddleware:
    """401 unless a configured key is presented; a no-op when no keys are configured."""

    def __init__(self, app: ASGIApp, keys: Sequence[SecretStr], paths: Collection[str], metrics: ServiceMetrics):
        self.app = app
        self.keys = list(keys)
        self.paths = frozenset(paths)
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.keys or scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is None:
            error = AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        elif not key_matches(token, self.keys):
            error = AuthenticationError("invalid API key")
        else:
            await self.app(scope, receive, send)
            return
        self.metrics.rejected.labels(reason="unauthorized").inc()
        await error_response(error)(scope, receive, send)
