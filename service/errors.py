"""Domain exceptions and their HTTP answers, in ONE place (after vLLM's ``error_response.py``).

Every known failure is a :class:`ServiceError` subclass carrying its status code; handlers (and the
pure-ASGI middlewares in ``limits``/``auth``, which run outside FastAPI's exception handling) answer
with :func:`error_response`, so the envelope ``{"error": {message, type, code, param}, "request_id"}``
is the same everywhere. Only a bug yields a 500, and its message never echoes internals.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.logging import current_request_id

log = logging.getLogger(__name__)
_SHOWN_IDS = 20  # ids quoted in a message; the full list is in ``param`` order anyway


class ServiceError(Exception):
    """A known failure with its HTTP status; ``message`` is safe to show the client."""

    status_code = 400
    error_type = "bad_request"

    def __init__(self, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class UnknownUserError(ServiceError):
    status_code = 422
    error_type = "unknown_user"

    def __init__(self, user_id: str):
        super().__init__(
            f"unknown user {user_id!r}: send the user's history (item ids, newest last) to rank for a new user",
            param="history",
        )
        self.user_id = user_id


def _quote(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_SHOWN_IDS])
    return shown + (f" (and {len(ids) - _SHOWN_IDS} more)" if len(ids) > _SHOWN_IDS else "")


class UnknownItemsError(ServiceError):
    status_code = 422
    error_type = "unknown_items"

    def __init__(self, field: str, item_ids: Sequence[str]):
        super().__init__(f"unknown item ids in {field}: {_quote(item_ids)}", param=field)
        self.item_ids = list(item_ids)


class DuplicateItemsError(ServiceError):
    status_code = 422
    error_type = "duplicate_items"

    def __init__(self, field: str, item_ids: Sequence[str]):
        super().__init__(f"duplicate item ids in {field}: {_quote(item_ids)}; send each candidate once", param=field)
        self.item_ids = list(item_ids)


class TooManyItemsError(ServiceError):
    status_code = 422
    error_type = "too_many_items"

    def __init__(self, field: str, count: int, limit: int):
        super().__init__(f"{field} has {count} items; at most {limit} are accepted", param=field)


class AuthenticationError(ServiceError):
    status_code = 401
    error_type = "unauthorized"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class OverloadedError(ServiceError):
    status_code = 429
    error_type = "overloaded"

    def __init__(self, limit: int, retry_after_s: int):
        super().__init__(
            f"more than {limit} requests in flight; retry after {retry_after_s} s",
            headers={"Retry-After": str(retry_after_s)},
        )


class BodyTooLargeError(ServiceError):
    status_code = 413
    error_type = "body_too_large"

    def __init__(self, limit: int):
        super().__init__(f"request body larger than {limit} bytes")


class UnavailableError(ServiceError):
    status_code = 503
    error_type = "unavailable"


def error_body(exc: ServiceError) -> dict[str, Any]:
    return {
        "error": {"message": exc.message, "type": exc.error_type, "code": exc.status_code, "param": exc.param},
        "request_id": current_request_id(),
    }


def error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.status_code, headers=exc.headers)


def validation_message(errors: Sequence[Any]) -> str:
    """Pydantic/FastAPI errors as one readable line: ``body.top_n: Input should be ...; ...``."""
    parts = []
    for error in errors[:10]:
        loc = ".".join(str(p) for p in error.get("loc", ()))
        if error.get("type") == "json_invalid":
            ctx = error.get("ctx") or {}
            reason = ctx.get("error", "invalid JSON")
            parts.append(f"request body is not valid JSON ({reason}, at position {loc.split('.')[-1]})")
        else:
            parts.append(f"{loc}: {error.get('msg', 'invalid value')}")
    if len(errors) > 10:
        parts.append(f"and {len(errors) - 10} more problems")
    return "; ".join(parts)


async def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    if exc.status_code >= 500:
        log.warning("%s: %s", exc.error_type, exc.message)
    return error_response(exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    error = ServiceError(validation_message(errors), param=_first_field(errors))
    error.status_code, error.error_type = 422, "validation_error"
    return error_response(error)


def _first_field(errors: Sequence[Any]) -> str | None:
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        if loc and not loc[0].isdigit():
            return ".".join(loc)
    return None


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    error = ServiceError(str(exc.detail), headers=dict(exc.headers or {}))
    error.status_code, error.error_type = exc.status_code, "http_error"
    return error_response(error)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    error = ServiceError("internal error; the request id identifies it in the logs")
    error.status_code, error.error_type = 500, "internal_error"
    return error_response(error)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
