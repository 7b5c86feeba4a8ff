"""Domain errors, and their one mapping to RFC 9457 problem responses.

ProblemError             anything a client caused or must be told about, with an HTTP status
├── BadRequest           400: malformed id, cursor, Last-Event-ID, JSON...
├── NotFound             404: no such chat or message (for this principal)
├── Conflict             409: the chat is answering already; the message is not running
└── Unavailable          503: draining or a dependency is down (with Retry-After)
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import psycopg
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from psycopg_pool import PoolTimeout

from .schemas import Problem

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class ProblemError(Exception):
    """Base of the errors that become a problem+json response."""

    status = 400
    title = "Bad request"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadRequest(ProblemError):
    """The request is malformed in a way the schema could not catch."""


class NotFound(ProblemError):
    """The chat or message does not exist, or belongs to someone else."""

    status = 404
    title = "Not found"


class Conflict(ProblemError):
    """The request conflicts with the resource's state (e.g. an answer is running)."""

    status = 409
    title = "Conflict"


class Unavailable(ProblemError):
    """The gateway cannot take this request now; the client should retry later."""

    status = 503
    title = "Service unavailable"


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    errors: list[dict[str, str]] | None = None,
    instance: str | None = None,
) -> Response[Problem]:
    return Response(
        Problem(status=status, title=title, detail=detail, errors=errors, instance=instance),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def _on_problem(request: Request[Any, Any, Any], exc: ProblemError) -> Response[Problem]:
    return problem_response(
        exc.status, exc.title, exc.detail, headers=exc.headers, instance=request.url.path
    )


def _on_validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Problem]:
    errors: list[dict[str, str]] = []
    if isinstance(exc.extra, list):
        for item in exc.extra:
            if isinstance(item, dict):
                errors.append({str(k): str(v) for k, v in item.items() if v is not None})
    detail = exc.detail or "The request is not valid."
    if any(e.get("key") == "data" and e.get("message") == "'data'" for e in errors):
        # Litestar's way of saying the body is missing altogether.
        errors = [{"key": "body", "message": "missing"}]
        detail = "The request has no body; send a JSON object."
    elif errors:
        detail = "; ".join(
            f"{e.get('key', e.get('source', 'body'))}: {e.get('message', '')}" for e in errors
        )
    return problem_response(
        400, "Invalid request", detail, errors=errors or None, instance=request.url.path
    )


def _on_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Problem]:
    status = exc.status_code
    title = {
        400: "Bad request",
        401: "Unauthorized",
        403: "Forbidden",
        404: "Not found",
        405: "Method not allowed",
        413: "Content too large",
        415: "Unsupported media type",
        429: "Too many requests",
    }.get(status, "Error")
    detail = exc.detail
    if status == 404 and detail == "Not Found":
        detail = f"No route matches {request.method} {request.url.path}."
    if status == 405:
        allowed = (exc.headers or {}).get("allow", (exc.headers or {}).get("Allow", ""))
        detail = f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}."
    if status == 400 and _caused_by(exc, msgspec.DecodeError):
        detail = f"The request body is not valid JSON: {detail}"
    if status == 413:
        limit = request.route_handler.resolve_request_max_body_size()
        detail = f"The request body is larger than the limit of {limit} bytes."
    return problem_response(status, title, detail, headers=exc.headers, instance=request.url.path)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _on_database(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    """The database is down or every pooled connection is busy: the client may retry."""
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    busy = isinstance(exc, PoolTimeout)
    return problem_response(
        503,
        "Service unavailable",
        "The database is busy; retry shortly."
        if busy
        else "The database cannot be reached; retry shortly.",
        headers={"Retry-After": "2"},
        instance=request.url.path,
    )


def _on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(
        HTTP_500_INTERNAL_SERVER_ERROR,
        "Internal server error",
        "The gateway failed to handle this request; it has been logged.",
        instance=request.url.path,
    )


_STATUS_TEXT = {
    400: "Malformed request (JSON, ids, cursor, Last-Event-ID, validation)",
    401: "Missing or invalid credentials",
    403: "The principal lacks the admin scope",
    404: "No such chat or message (for this principal)",
    409: "The chat is answering another question, or the message already ended",
    413: "The body is larger than QNA_MAX_BODY_BYTES",
    429: "Over a per-principal limit; see Retry-After and RateLimit-*",
    431: "The request headers are too large",
    503: "Draining, starting, a dependency down or a global cap reached; see Retry-After",
}
COMMON_PROBLEMS = (400, 401, 404, 413, 429, 431, 503)


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI descriptions of the problem+json answers a route can give."""
    return {
        status: ResponseSpec(
            Problem, description=_STATUS_TEXT[status], media_type=PROBLEM_JSON, examples=[]
        )
        for status in sorted({*COMMON_PROBLEMS, *statuses})
    }


exception_handlers: dict[type[Exception], Any] = {
    ProblemError: _on_problem,
    ValidationException: _on_validation,
    HTTPException: _on_http,
    PoolTimeout: _on_database,
    psycopg.OperationalError: _on_database,
    Exception: _on_unexpected,
}

__all__ = [
    "PROBLEM_JSON",
    "BadRequest",
    "Conflict",
    "NotFound",
    "ProblemError",
    "Unavailable",
    "exception_handlers",
    "problem_response",
    "problem_responses",
]
