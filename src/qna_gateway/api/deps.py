"""What handlers are given: the running services, the caller's principal, parsed ids."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from litestar import Request
from litestar.di import NamedDependency

from ..auth import Authenticator
from ..errors import BadRequest, Unavailable
from ..lifecycle import Lifecycle, Services


def provide_services(request: Request[Any, Any, Any]) -> Services:
    lifecycle: Lifecycle = request.app.state.lifecycle
    if lifecycle.services is None:
        raise Unavailable("The gateway is still starting.", headers={"Retry-After": "1"})
    return lifecycle.services


def provide_principal(request: Request[Any, Any, Any]) -> str:
    """Who is asking (401 without valid credentials), counted against the rate limit.

    An answer's stream also accepts the `token` its ask returned, since EventSource cannot
    send an Authorization header; the token opens that one stream only.
    """
    auth: Authenticator = request.app.state.auth
    token = request.query_params.get("token")
    message_id = request.path_params.get("message_id")
    if (
        token
        and message_id
        and "authorization" not in request.headers
        and str(request.scope.get("path_template", "")).endswith("/stream")
    ):
        principal = auth.stream_principal(token, parse_uuid(str(message_id), "message id"))
    else:
        principal = auth.principal_of(request.headers)
    if auth.enabled:
        request.app.state.rate_limiter.hit(principal)
    return principal


def provide_admin(request: Request[Any, Any, Any], principal: NamedDependency[str]) -> str:
    """The principal, when it may use admin endpoints (403 otherwise). With auth off
    (loopback only) the one principal is the operator, so it may."""
    auth: Authenticator = request.app.state.auth
    auth.require_admin(principal)
    return principal


def parse_uuid(value: str, what: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise BadRequest(f"{what} {value[:80]!r} is not a UUID.") from None
