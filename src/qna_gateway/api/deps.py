"""What handlers are given: the running services, the caller's principal, parsed ids."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.handlers.base import BaseRouteHandler

from ..auth import Authenticator
from ..errors import BadRequest, Unavailable
from ..lifecycle import Lifecycle, Services


def provide_services(request: Request[Any, Any, Any]) -> Services:
    lifecycle: Lifecycle = request.app.state.lifecycle
    if lifecycle.services is None:
        raise Unavailable("The gateway is still starting.", headers={"Retry-After": "1"})
    return lifecycle.services


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """A guard on every /v1 route: it runs before the body is read, so an anonymous request
    learns nothing about its body's validity (401 first), and it counts the rate limit.

    An answer's stream also accepts the `token` its ask returned, since EventSource cannot
    send an Authorization header; the token opens that one stream only.
    """
    auth: Authenticator = connection.app.state.auth
    token = connection.query_params.get("token")
    message_id = connection.path_params.get("message_id")
    if (
        token
        and message_id
        and "authorization" not in connection.headers
        and str(connection.scope.get("path_template", "")).endswith("/stream")
    ):
        principal = auth.stream_principal(token, parse_uuid(str(message_id), "message id"))
    elif auth.jwks is not None:
        # The JWKS client may fetch keys over HTTP (blocking): not on the event loop.
        principal = await asyncio.to_thread(auth.principal_of, connection.headers)
    else:
        principal = auth.principal_of(connection.headers)
    if auth.enabled:
        connection.app.state.rate_limiter.hit(principal)
    connection.state.principal = principal


def provide_principal(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> str:
    """Who is asking, as the `authenticate` guard established.

    It takes `services` only to come after it: Litestar resolves two dependencies of the same
    level in an anyio task group with a task each, on every request (about 200 Python calls,
    counted with cProfile); one after the other they are two plain calls.
    """
    del services
    principal: str = request.state.principal
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
